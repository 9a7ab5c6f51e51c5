"""What every training recipe shares: config, LR and sparsity schedules, dead-latent tracking,
the unit-norm decoder constraint (ConstrainedAdam), dead-latent resampling, and checkpointable
state. (AuxK, which only the TopK family uses, lives with its other shared pieces in top_k.py.)

A recipe subclasses `SAETrainer`, declares its `Config` dataclass and `dictionary_class`, builds
its dictionary and optimizer in `__init__`, and implements `loss(x, step) -> (loss, metrics)`.
`update(step, x)` does one optimisation step and is the only method that changes training state.
"""
from __future__ import annotations

import ctypes
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, NamedTuple

import torch
import torch.nn as nn

from ..dictionary import Dictionary, SparseCodes


_freed_memory_kept = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS; returns whether
    that is in effect for this process.

    PyTorch has no caching allocator on CPU, and glibc serves every block above its mmap threshold
    (at most 32 MiB) with a fresh `mmap`: each [B, F] temporary of a training step then costs one
    page fault per 4 KiB touched (0.5M faults, ~2 GiB, per gated step at B=4096, F=8192; a third
    of its time). `mallopt(M_MMAP_MAX, 0)` and a maximal `M_TRIM_THRESHOLD` make those blocks come
    from the heap and stay there, so the next step reuses the same pages. Process-wide: the heap
    keeps its peak size, which a training process reaches every step anyway. Skipped (False) off
    glibc, when the user tunes malloc through MALLOC_* or GLIBC_TUNABLES, preloads another
    allocator, or sets DICTIONARY_LEARNING_KEEP_FREED_MEMORY=0. Called when a CPU trainer is built.
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if (not sys.platform.startswith("linux") or os.environ.get("DICTIONARY_LEARNING_KEEP_FREED_MEMORY") == "0"
            or "GLIBC_TUNABLES" in os.environ or "LD_PRELOAD" in os.environ
            or any(name.startswith("MALLOC_") for name in os.environ)):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    _freed_memory_kept = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
    return _freed_memory_kept


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
    def update(self, features: torch.Tensor | SparseCodes) -> None:
        """`features` of one training batch: dense [..., F] (non-negative, as every dictionary of
        the library produces) or `SparseCodes`. A latent fired if any token has it nonzero."""
        dict_size = self.steps_since_fired.shape[0]
        if isinstance(features, SparseCodes):
            fired = torch.zeros(dict_size, dtype=torch.bool, device=self.steps_since_fired.device)
            fired[features.columns[features.values != 0]] = True
            n_tokens = features.n_rows
        else:
            flat = features.reshape(-1, dict_size)
            fired = flat.amax(dim=0) > 0  # one pass over [N, F]; features are >= 0
            n_tokens = flat.shape[0]
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


def fused_adam_supported(params) -> bool:
    """Whether Adam's fused kernel (one pass over all parameters) applies: floating tensors on
    CPU or CUDA. It computes the same update as the per-parameter loop."""
    params = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


class ConstrainedAdam(torch.optim.Adam):
    """Adam whose `constrained_params` (decoder weights [D, F]) keep unit-norm columns.

    Before each step the gradient component along each column is removed; after the step each
    column is renormalised to unit norm. `norm_dim` selects the direction axis (0: columns).
    """

    def __init__(self, params, constrained_params, lr: float, betas=(0.9, 0.999), norm_dim: int = 0, **kwargs):
        params = list(params)
        kwargs.setdefault("fused", fused_adam_supported(params))
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
def scale_encoder_init_(encoder_weight: torch.Tensor, init_encoder_scale: float) -> None:
    """W_enc ← init_encoder_scale · W_enc at initialisation (W_enc starts as W_decᵀ)."""
    if not init_encoder_scale > 0:
        raise ValueError(f"init_encoder_scale must be > 0, got {init_encoder_scale}")
    encoder_weight.mul_(init_encoder_scale)


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


@torch.no_grad()
def resample_dead_latents_(
    ae: nn.Module,
    optimizer: torch.optim.Optimizer,
    dead_tracker: DeadLatentTracker,
    dead_mask: torch.Tensor,
    x: torch.Tensor,
    latent_params: Iterable[nn.Parameter],
    encoder_scale: float = 0.2,
) -> torch.Tensor:
    """Re-initialise the latents in `dead_mask` [F] (bool) from inputs x [..., D], in place.

    For a dictionary with `encoder.weight` [F, D] and `decoder.weight` [D, F]: inputs are sampled
    without replacement with probability ∝ ‖x − x̂‖²; for each resampled latent i with input x,
    decoder column i = x/‖x‖, encoder row i = encoder_scale · (mean alive encoder-row norm) · x/‖x‖,
    and every per-latent parameter in `latent_params` ([F] each: biases, r_mag) is zeroed. The
    Adam moments of exactly those rows/columns/entries are zeroed and their dead counters reset.
    At most one latent per input is resampled; returns the indices of the resampled latents.
    """
    dead = dead_mask.nonzero().squeeze(-1)
    if dead.numel() == 0:
        return dead
    x = x.reshape(-1, x.shape[-1])
    squared_error = (x - ae(x)).pow(2).sum(dim=-1)
    if not bool(squared_error.sum() > 0):
        squared_error = torch.ones_like(squared_error)
    n = min(dead.numel(), x.shape[0])
    dead = dead[:n]
    sampled = x[torch.multinomial(squared_error, n, replacement=False)]
    directions = sampled / sampled.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [n, D]

    encoder_weight, decoder_weight = ae.encoder.weight, ae.decoder.weight
    alive = ~dead_mask
    alive_norm = encoder_weight[alive].norm(dim=-1).mean() if bool(alive.any()) else torch.tensor(1.0)
    encoder_weight[dead] = directions * alive_norm * encoder_scale
    decoder_weight[:, dead] = directions.T
    reset_adam_state_(optimizer, encoder_weight, dead, dim=0)
    reset_adam_state_(optimizer, decoder_weight, dead, dim=1)
    for param in latent_params:
        param[dead] = 0.0
        reset_adam_state_(optimizer, param, dead, dim=0)
    dead_tracker.steps_since_fired[dead] = 0
    dead_tracker.tokens_since_fired[dead] = 0
    return dead


# --------------------------------------------------------------------------------------------
# The trainer base
# --------------------------------------------------------------------------------------------


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    features: torch.Tensor | SparseCodes  # the batch's features [N, F] (for dead-latent tracking)
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
        if self.device.type == "cpu":
            keep_freed_cpu_memory()
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
        """Warmup, optional decay; recipes that resample restart the warmup after each resample."""
        return lr_multiplier(
            step, self.cfg.warmup_steps, self.cfg.decay_start, self.cfg.steps,
            restart_every=getattr(self.cfg, "resample_steps", None),
        )

    def set_lr(self, step: int) -> None:
        lr = self.lr * self.lr_multiplier(step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def before_optimizer_step(self, step: int) -> None:
        """Hook between backward and the optimizer step (gradient projection, clipping)."""

    def after_optimizer_step(self, step: int, x: torch.Tensor) -> None:
        """Hook after the optimizer step (renormalisation, threshold updates). By default, a recipe
        with `resample_steps` resamples the latents that did not fire in the last window."""
        every = getattr(self.cfg, "resample_steps", None)
        if every is not None and (step + 1) % every == 0:
            self.resample_neurons(self.dead_tracker.dead_after_steps(every - 1), x)

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not resample dead latents")

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
