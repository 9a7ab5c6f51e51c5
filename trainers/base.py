"""What every training recipe shares: config, LR and sparsity schedules, dead-latent tracking,
the unit-norm decoder constraint (ConstrainedAdam), AuxK, and checkpointable state.

A recipe subclasses `SAETrainer`, declares its `Config` dataclass and `dictionary_class`, builds
its dictionary and optimizer in `__init__`, and implements `loss(x, step) -> (loss, metrics)`.
`update(step, x)` does one optimisation step and is the only method that changes training state.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from ..dictionary import Dictionary


@dataclass
class TrainerConfig:
    """Fields every recipe has. `steps` (total) is filled in by trainSAE when it knows it."""

    activation_dim: int
    dict_size: int
    lr: float | None = None  # None: the recipe's default
    warmup_steps: int = 1000  # linear LR warmup from 0
    decay_start: int | None = None  # linear LR decay to 0 from this step to `steps`
    steps: int | None = None
    sparsity_warmup_steps: int | None = None  # linear warmup of the sparsity coefficient
    seed: int | None = None
    device: str = "cpu"
    # free-form provenance, recorded in config.json (what the activations were)
    name: str | None = None
    lm_name: str | None = None
    layer: int | None = None
    submodule_name: str | None = None


def lr_multiplier(
    step: int,
    warmup_steps: int,
    decay_start: int | None = None,
    total_steps: int | None = None,
    restart_every: int | None = None,
) -> float:
    """Linear warmup to 1 over `warmup_steps` (restarted every `restart_every` steps, e.g. after
    each resample), then constant, then linear decay to 0 from `decay_start` to `total_steps`."""
    warm_step = step % restart_every if restart_every else step
    multiplier = min(1.0, (warm_step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    if decay_start is not None and total_steps is not None and step >= decay_start:
        multiplier *= max(0.0, (total_steps - step) / max(1, total_steps - decay_start))
    return multiplier


def sparsity_multiplier(step: int, sparsity_warmup_steps: int | None) -> float:
    """Linear warmup of the sparsity coefficient from 0 to 1 over `sparsity_warmup_steps`."""
    if not sparsity_warmup_steps:
        return 1.0
    return min(1.0, (step + 1) / sparsity_warmup_steps)


class DeadLatentTracker:
    """Counts, per latent, the steps and tokens since it last fired (was nonzero)."""

    def __init__(self, dict_size: int, device: torch.device | str):
        self.steps_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, f: torch.Tensor) -> None:
        """f [..., F]: the features of one training batch."""
        fired = (f.reshape(-1, f.shape[-1]) != 0).any(dim=0)
        n_tokens = f.numel() // f.shape[-1]
        self.steps_since_fired += 1
        self.tokens_since_fired += n_tokens
        self.steps_since_fired[fired] = 0
        self.tokens_since_fired[fired] = 0

    def dead_after_steps(self, steps: int) -> torch.Tensor:
        """[F] bool: not fired in more than `steps` steps."""
        return self.steps_since_fired > steps

    def dead_after_tokens(self, tokens: int) -> torch.Tensor:
        """[F] bool: not fired in at least `tokens` tokens."""
        return self.tokens_since_fired >= tokens

    def state_dict(self) -> dict:
        return {"steps_since_fired": self.steps_since_fired, "tokens_since_fired": self.tokens_since_fired}

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_fired.copy_(state["steps_since_fired"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


# --------------------------------------------------------------------------------------------
# Unit-norm decoder directions
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def normalize_directions_(weight: torch.Tensor, dim: int = 0) -> None:
    """Scale `weight` in place so every slice along `dim` has unit L2 norm
    (dim=0: the columns of a [D, F] decoder weight)."""
    weight.div_(weight.norm(dim=dim, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_gradient_(weight: torch.Tensor, dim: int = 0) -> None:
    """g_j ← g_j − (g_j · d̂_j) d̂_j for every direction d_j of `weight` (slices along `dim`).

    On the unit sphere this is the tangent component of the gradient: a step along it does not
    (to first order) change the direction's norm.
    """
    if weight.grad is None:
        return
    unit = weight / weight.norm(dim=dim, keepdim=True).clamp_min(1e-12)
    parallel = (weight.grad * unit).sum(dim=dim, keepdim=True)
    weight.grad.sub_(parallel * unit)


class ConstrainedAdam(torch.optim.Adam):
    """Adam whose `constrained_params` (decoder weights [D, F]) keep unit-norm columns.

    Before each step the gradient component along each column is removed; after the step each
    column is renormalised to unit norm. `norm_dim` selects the direction axis (0: columns).
    """

    def __init__(self, params, constrained_params, lr: float, betas=(0.9, 0.999), norm_dim: int = 0, **kwargs):
        super().__init__(params, lr=lr, betas=betas, **kwargs)
        self.constrained_params = list(constrained_params)
        self.norm_dim = norm_dim
        if not self.constrained_params:
            raise ValueError("ConstrainedAdam: constrained_params is empty; pass the decoder weight(s)")

    def step(self, closure=None):
        for p in self.constrained_params:
            remove_parallel_gradient_(p, self.norm_dim)
        loss = super().step(closure)
        for p in self.constrained_params:
            normalize_directions_(p, self.norm_dim)
        return loss


@torch.no_grad()
def reset_adam_state_(optimizer: torch.optim.Optimizer, param: torch.Tensor, index, dim: int = 0) -> None:
    """Zero Adam's moments (exp_avg, exp_avg_sq) of `param` at `index` along `dim`.

    The state is looked up by parameter object, never by position in the param groups.
    """
    state = optimizer.state.get(param)
    if not state:
        return
    for key in ("exp_avg", "exp_avg_sq"):
        if key in state:
            state[key].index_fill_(dim, index, 0.0)


# --------------------------------------------------------------------------------------------
# AuxK (Gao et al. 2024, appendix A.2)
# --------------------------------------------------------------------------------------------


def auxk_loss(
    pre_activations: torch.Tensor,
    dead_mask: torch.Tensor,
    residual: torch.Tensor,
    decoder_weight: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """Reconstruct the main model's error e = x − x̂ (detached) from the top-`k_aux` dead latents:

        ê = W_dec[:, dead] TopK_aux(ReLU(pre[dead]))
        L_aux = ‖e − ê‖² / ‖e − ē‖²   (batch sums; normalised by the residual's variance)

    pre_activations [N, F], dead_mask [F] bool, residual [N, D], decoder_weight [D, F].
    Returns 0 when no latent is dead.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return pre_activations.new_zeros(())
    dead = dead_mask.nonzero().squeeze(-1)
    k = min(k_aux, n_dead)
    dead_pre = F.relu(pre_activations[:, dead])
    values, indices = dead_pre.topk(k, dim=-1, sorted=False)
    # ê = Σ_j values_j · W_dec[:, dead[indices_j]]
    chosen_directions = decoder_weight.T[dead][indices]  # [N, k, D]
    residual_hat = torch.einsum("nk,nkd->nd", values, chosen_directions)
    residual = residual.detach()
    total_variance = (residual - residual.mean(dim=0, keepdim=True)).pow(2).sum()
    return (residual_hat - residual).pow(2).sum() / total_variance.clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# The trainer base
# --------------------------------------------------------------------------------------------


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    features: torch.Tensor  # [N, F] the batch's features (for dead-latent tracking)
    metrics: dict[str, torch.Tensor]  # detached scalars for logging


class SAETrainer:
    """One SAE being trained. Subclasses set `Config`, `dictionary_class`, `default_lr` (or
    override `default_learning_rate`), build `self.ae` and `self.optimizer`, and implement `loss`."""

    Config: ClassVar[type[TrainerConfig]] = TrainerConfig
    dictionary_class: ClassVar[type[Dictionary]]
    default_lr: ClassVar[float] = 1e-3

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:  # so that a bare config dataclass names its recipe
            cls.Config.trainer_class = cls

    def __init__(self, config: TrainerConfig):
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.cfg = config
        if config.seed is not None:
            torch.manual_seed(config.seed)
        self.device = torch.device(config.device)
        self.lr = config.lr if config.lr is not None else self.default_learning_rate()
        self.dead_tracker = DeadLatentTracker(config.dict_size, self.device)

    # -- what a recipe implements ------------------------------------------------------------
    def default_learning_rate(self) -> float:
        return self.default_lr

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        """The training loss on x [N, D] at `step`. Must not change any training state."""
        raise NotImplementedError

    # -- shared machinery --------------------------------------------------------------------
    def lr_multiplier(self, step: int) -> float:
        return lr_multiplier(step, self.cfg.warmup_steps, self.cfg.decay_start, self.cfg.steps)

    def set_lr(self, step: int) -> None:
        lr = self.lr * self.lr_multiplier(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def before_optimizer_step(self, step: int) -> None:
        """Hook between backward and the optimizer step (gradient projection, clipping)."""

    def after_optimizer_step(self, step: int, x: torch.Tensor) -> None:
        """Hook after the optimizer step (renormalisation, resampling, threshold updates)."""

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch x [B, D]; returns detached metrics."""
        self.set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss(x, step)
        out.loss.backward()
        self.before_optimizer_step(step)
        self.optimizer.step()
        self.dead_tracker.update(out.features)
        self.after_optimizer_step(step, x)
        return out.metrics

    @property
    def config(self) -> dict[str, Any]:
        """Everything needed to rebuild this trainer, JSON-serialisable."""
        return {
            "trainer_class": type(self).__name__,
            "dict_class": self.dictionary_class.__name__,
            **dataclasses.asdict(self.cfg),
            "lr": self.lr,
        }

    def extra_state(self) -> dict[str, Any]:
        """Recipe-specific training state beyond the dictionary, optimizer and dead counters."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {
            "ae": self.ae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "dead_tracker": self.dead_tracker.state_dict(),
            "extra": self.extra_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["ae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dead_tracker.load_state_dict(state["dead_tracker"])
        self.load_extra_state(state["extra"])


def config_field_names(config_class: type[TrainerConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class)]
