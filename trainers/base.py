"""What every training recipe shares: the config fields, LR and sparsity schedules, dead-latent
tracking, the unit-norm decoder constraint (ConstrainedAdam), dead-latent resampling, and
checkpointable state. (What only a family of recipes shares is in families.py.)

A recipe subclasses `SAETrainer`, declares its `Config` dataclass and `dictionary_class`, builds
its dictionary (`build_dictionary`) and optimizer in `__init__`, and implements
`loss(x, step) -> LossOutput`. `update(step, x)` does one optimisation step and is the only method
that changes training state. A trainer draws every random number (initialisation, resampling) from
its own generator, seeded by `config.seed`; it never touches torch's global RNG.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import secrets
from dataclasses import dataclass
from typing import Any, ClassVar, Iterable, NamedTuple

import torch
import torch.nn as nn

from ..checks import check_device
from ..dictionary import Dictionary
from ..distributed import SINGLE_PROCESS, Replicas
from ..kernels import SparseCodes


@dataclass
class TrainerConfig:
    """Fields every recipe has. `steps` (total) is filled in by trainSAE when it knows it."""

    activation_dim: int
    """D, the width of the activations."""
    dict_size: int
    """F, the number of latents."""
    lr: float | None = None
    """Adam's learning rate; None: the recipe's default."""
    warmup_steps: int | None = None
    """linear LR warmup from 0 over this many steps; None: 1,000, or a tenth of the run when that is
    shorter (default_warmup_steps)."""
    decay_start: int | None = None
    """linear LR decay to 0 from this step to `steps` (None: the recipe's default, often none)."""
    steps: int | None = None
    """length of the run in batches (filled in by trainSAE)."""
    sparsity_warmup_steps: int | None = None
    """linear warmup of the sparsity coefficient from 0 over this many steps."""
    target_l0: float | None = None
    """the L0 to reach: the sparsity coefficient is adapted during training (L0Controller) instead
    of fixed by hand; None: λ as given. (TopK recipes fix L0 with k; JumpReLU's target_l0 is its
    own penalty.)"""
    seed: int | None = None
    """seeds initialisation and every random draw of training; None: a random seed, recorded."""
    device: str = "cpu"
    """where the dictionary trains."""
    name: str | None = None
    """free-form name of the run, recorded in config.json."""
    lm_name: str | None = None
    """the language model the activations come from (provenance, recorded in config.json)."""
    layer: int | None = None
    """its layer (provenance)."""
    submodule_name: str | None = None
    """its submodule (provenance)."""
    site: str | None = None
    """the site this trainer reads when the data yields several (a multi-site ActivationBuffer's
    batches are dicts site -> activations); None: the data's only stream."""

    def __post_init__(self):
        """Check the fields every recipe has (a recipe checks its own where it uses them): each
        error names the field, the value given and what it must be."""
        name = type(self).__name__
        for field in ("activation_dim", "dict_size"):
            check_count(name, field, getattr(self, field), minimum=1)
        for field in ("warmup_steps", "decay_start", "steps", "sparsity_warmup_steps", "seed"):
            if getattr(self, field) is not None:
                check_count(name, field, getattr(self, field), minimum=1 if field == "steps" else 0)
        if self.lr is not None and not (is_number(self.lr) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"{name}: lr must be a positive finite number or None (the recipe's default); got "
                             f"{self.lr!r}")
        if getattr(self, "sparsity_penalty", None) is not None:
            check_weight(name, "sparsity_penalty (λ)", self.sparsity_penalty)
        if self.target_l0 is not None and not (is_number(self.target_l0) and 0 < self.target_l0 <= self.dict_size):
            raise ValueError(f"{name}: target_l0 must be a number in (0, dict_size={self.dict_size}] or None; got "
                             f"{self.target_l0!r}")
        self.device = str(check_device(self.device, f"{name}: device"))


def is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_weight(config_name: str, field: str, value: Any, note: str = "") -> None:
    """A loss term's weight: a finite number >= 0 (`note` is added to the error)."""
    if not (is_number(value) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{config_name}: {field} must be a finite number >= 0{note}; got {value!r}")


def check_count(config_name: str, field: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        what = "a positive int" if minimum == 1 else "an int >= 0"
        raise ValueError(f"{config_name}: {field} must be {what}; got {value!r}")


def config_field_names(config_class: type[TrainerConfig]) -> list[str]:
    return [f.name for f in dataclasses.fields(config_class)]


WARMUP_STEPS = 1000  # the LR warmup of every recipe of the reference library ...
WARMUP_FRACTION = 0.1  # ... capped at this fraction of a shorter run


def default_warmup_steps(steps: int | None) -> int:
    """warmup_steps when the config leaves it None: min(1,000, ⌊0.1 · steps⌋) (1,000 without steps)."""
    return WARMUP_STEPS if steps is None else min(WARMUP_STEPS, int(WARMUP_FRACTION * steps))


RUN_LENGTH_REFERENCE = 2**22  # steps × activation_dim at which a recipe's paper LR is used as is
RUN_LENGTH_MAX_LR_SCALE = 8.0


def run_length_lr_scale(steps: int | None, activation_dim: int) -> float:
    """The factor on a recipe's long-run LR for a run of `steps` batches on D-dimensional inputs:

        s = min(8, max(1, √(2²² / (steps · D))))

    Adam moves each weight by about the LR per step, and an encoder row has to travel a distance
    that does not shrink with the run, so a run with fewer steps needs larger ones; the published
    rates are tuned for runs of 10⁴–10⁵ steps on D of 512–4096 (steps · D ≳ 2²²), where s = 1.
    1 when the run's length is unknown."""
    if steps is None:
        return 1.0
    return min(RUN_LENGTH_MAX_LR_SCALE, max(1.0, math.sqrt(RUN_LENGTH_REFERENCE / (steps * activation_dim))))


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


class L0Controller:
    """Adapts a multiplier m of a recipe's sparsity coefficient (λ_eff = λ · m) so that the L0
    reaches `target` T. After each step past the sparsity warmup, with ℓ̄ the running mean
    (an EMA with β = 0.9) of the batch L0:

        log m ← max(log m_min, log m + clip(γ · log(ℓ̄ / T), −δ, δ)),     γ = 0.03, δ = 0.02

    (m_min = `min_scale`, 0 unless the recipe's penalty itself pulls the L0 up below T: JumpReLU's)

    integral control on log λ: λ grows while the L0 is above T and shrinks while it is below, by at
    most 2% a step, so a λ that is 100× off is corrected in a few hundred steps, and λ settles where
    L0 = T. The λ that gives L0 = T drifts down as the dictionary trains (its latents grow more
    selective), and an integral controller trails a drift of r per step in log λ by r / γ in
    log L0: γ = 0.01 left the L0 15–30 % under T at the end of short runs. A small gain keeps the loop
    stable although the L0 answers a change of λ only after the optimiser has moved the encoder
    (much larger gains oscillate by orders of magnitude).
    """

    GAIN = 0.03
    MAX_LOG_STEP = 0.02
    EMA = 0.9

    def __init__(self, target: float, min_scale: float = 0.0):
        """`min_scale` ≥ 0: m is kept ≥ it (1 for a penalty that already pulls the L0 up below T,
        so that only the error above T is integrated, and none winds up below it)."""
        if not target > 0:
            raise ValueError(f"target_l0 must be positive, got {target!r}")
        if not 0 <= min_scale < math.inf:
            raise ValueError(f"min_scale must be a finite number >= 0, got {min_scale!r}")
        self.target = float(target)
        self.min_log_scale = math.log(min_scale) if min_scale > 0 else -math.inf
        self.log_scale = max(0.0, self.min_log_scale)
        self.mean_l0: float | None = None

    @property
    def scale(self) -> float:
        return math.exp(self.log_scale)

    def update(self, features: torch.Tensor | SparseCodes, adapt: bool, replicas: Replicas = SINGLE_PROCESS) -> None:
        """`features` of one training batch (of this rank's rows: `replicas` makes the L0 that of
        the global batch)."""
        if isinstance(features, SparseCodes):
            active, n_rows = (features.values != 0).sum(), features.n_rows
        else:
            active, n_rows = (features != 0).sum(), features.reshape(-1, features.shape[-1]).shape[0]
        if replicas.distributed:
            counts = replicas.sum_(torch.stack([active.double(), active.new_tensor(n_rows, dtype=torch.float64)]))
            active, n_rows = counts[0], int(counts[1].item())
        l0 = float(active) / max(n_rows, 1)
        self.mean_l0 = l0 if self.mean_l0 is None else self.EMA * self.mean_l0 + (1 - self.EMA) * l0
        if adapt:
            change = self.GAIN * math.log(max(self.mean_l0, 1e-3) / self.target)
            self.log_scale = max(self.min_log_scale,
                                 self.log_scale + max(-self.MAX_LOG_STEP, min(self.MAX_LOG_STEP, change)))

    def state_dict(self) -> dict[str, Any]:
        return {"log_scale": self.log_scale, "mean_l0": self.mean_l0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log_scale, self.mean_l0 = float(state["log_scale"]), state["mean_l0"]


class DeadLatentTracker:
    """Counts, per latent, the steps and tokens since it last fired (was nonzero)."""

    def __init__(self, dict_size: int, device: torch.device | str):
        self.steps_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)
        self.tokens_since_fired = torch.zeros(dict_size, dtype=torch.long, device=device)

    @torch.no_grad()
    def update(self, features: torch.Tensor | SparseCodes, replicas: Replicas = SINGLE_PROCESS) -> None:
        """`features` of one training batch: dense [..., F] (non-negative, as every dictionary of
        the library produces) or `SparseCodes`. A latent fired if any token has it nonzero (of the
        global batch: every rank's rows, with `replicas`)."""
        dict_size = self.steps_since_fired.shape[0]
        if isinstance(features, SparseCodes):
            fired = torch.zeros(dict_size, dtype=torch.bool, device=self.steps_since_fired.device)
            fired[features.columns[features.values != 0]] = True
            n_tokens = features.n_rows
        else:
            flat = features.reshape(-1, dict_size)
            fired = flat.amax(dim=0) > 0  # one pass over [N, F]; features are >= 0
            n_tokens = flat.shape[0]
        if replicas.distributed:
            counts = replicas.sum_(torch.cat([fired.long(), fired.new_tensor([n_tokens], dtype=torch.long)]))
            fired, n_tokens = counts[:-1] > 0, counts[-1]
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

    def dead_fraction(self, steps_done: int, window_tokens: int) -> float:
        """The share of latents that have not fired in the last `window_tokens` tokens, or not at
        all in the `steps_done` steps of training (which counts them early on, before the window
        has passed)."""
        dead = (self.tokens_since_fired >= window_tokens) | (self.steps_since_fired >= max(steps_done, 1))
        return float(dead.float().mean())

    def state_dict(self) -> dict:
        return {"steps_since_fired": self.steps_since_fired, "tokens_since_fired": self.tokens_since_fired}

    def load_state_dict(self, state: dict) -> None:
        self.steps_since_fired.copy_(state["steps_since_fired"])
        self.tokens_since_fired.copy_(state["tokens_since_fired"])


# --------------------------------------------------------------------------------------------
# Unit-norm decoder directions (the rows of W_dec [F, D])
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def normalize_rows_(weight: torch.Tensor) -> None:
    """Scale every row of `weight` [F, D] to unit L2 norm, in place."""
    weight.div_(weight.norm(dim=1, keepdim=True).clamp_min(1e-12))


@torch.no_grad()
def remove_parallel_gradient_(weight: torch.Tensor) -> None:
    """g_i ← g_i − (g_i · d̂_i) d̂_i for every row d_i of `weight` [F, D] and its gradient row g_i.

    On the unit sphere this is the tangent component of the gradient: a step along it does not
    (to first order) change the direction's norm.
    """
    if weight.grad is None:
        return
    unit = weight / weight.norm(dim=1, keepdim=True).clamp_min(1e-12)
    parallel = (weight.grad * unit).sum(dim=1, keepdim=True)
    weight.grad.sub_(parallel * unit)


def fused_adam_supported(params) -> bool:
    """Whether Adam's fused kernel (one pass over all parameters) applies: floating tensors on
    CPU or CUDA. It computes the same update as the per-parameter loop."""
    params = [p for group in params for p in (group["params"] if isinstance(group, dict) else [group])]
    return bool(params) and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def adam(params, lr: float, **kwargs) -> torch.optim.Adam:
    """torch.optim.Adam, fused when every parameter allows it."""
    params = list(params)
    kwargs.setdefault("fused", fused_adam_supported(params))
    return torch.optim.Adam(params, lr=lr, **kwargs)


class ConstrainedAdam(torch.optim.Adam):
    """Adam whose `constrained_params` (decoder weights W_dec [F, D]) keep unit-norm rows.

    Before each step the gradient component along each row (decoder direction) is removed; after
    the step each row is renormalised to unit norm.
    """

    def __init__(self, params, constrained_params, lr: float, betas=(0.9, 0.999), **kwargs):
        params = list(params)
        kwargs.setdefault("fused", fused_adam_supported(params))
        super().__init__(params, lr=lr, betas=betas, **kwargs)
        self.constrained_params = list(constrained_params)
        if not self.constrained_params:
            raise ValueError("ConstrainedAdam: constrained_params is empty; pass the decoder weight(s)")

    def step(self, closure=None):
        for p in self.constrained_params:
            remove_parallel_gradient_(p)
        loss = super().step(closure)
        for p in self.constrained_params:
            normalize_rows_(p)
        return loss


def check_positive(name: str, value: float) -> float:
    if not value > 0:
        raise ValueError(f"{name} must be > 0, got {value}")
    return value


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
    ae: Dictionary,
    optimizer: torch.optim.Optimizer,
    dead_tracker: DeadLatentTracker,
    dead_mask: torch.Tensor,
    x: torch.Tensor,
    latent_params: Iterable[nn.Parameter],
    encoder_scale: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Re-initialise the latents in `dead_mask` [F] (bool) from inputs x [..., D], in place.

    Inputs are sampled without replacement with probability ∝ ‖x − x̂‖² (from `generator`); for each
    resampled latent i with input x, decoder row i = x/‖x‖, encoder column i = encoder_scale ·
    (mean alive encoder-column norm) · x/‖x‖, and every per-latent parameter in `latent_params`
    ([F] each: biases, r_mag) is zeroed. The Adam moments of exactly those columns/rows/entries are
    zeroed and their dead counters reset. At most one latent per input is resampled; returns the
    indices of the resampled latents.
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
    sampled = x[torch.multinomial(squared_error, n, replacement=False, generator=generator)]
    directions = sampled / sampled.norm(dim=-1, keepdim=True).clamp_min(1e-8)  # [n, D]

    alive = ~dead_mask
    alive_norm = ae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    ae.W_enc[:, dead] = (directions * alive_norm * encoder_scale).T
    ae.W_dec[dead] = directions
    reset_adam_state_(optimizer, ae.W_enc, dead, dim=1)
    reset_adam_state_(optimizer, ae.W_dec, dead, dim=0)
    for param in latent_params:
        param[dead] = 0.0
        reset_adam_state_(optimizer, param, dead, dim=0)
    dead_tracker.steps_since_fired[dead] = 0
    dead_tracker.tokens_since_fired[dead] = 0
    return dead


# --------------------------------------------------------------------------------------------
# The trainer base
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def add_l0_and_fvu(metrics: dict[str, torch.Tensor], features: torch.Tensor | SparseCodes, x: Any) -> None:
    """Add the metrics every recipe logs, where its own loss did not compute them, from tensors the
    step already has: `l0`, the mean number of active latents per token, and `fvu`, the fraction of
    variance unexplained Σ‖x − x̂‖² / Σ‖x − x̄‖² = mse_loss / ((1/N) Σ‖x − x̄‖²) (x̄ the batch mean;
    for a batch of pairs, of the outputs)."""
    if "l0" not in metrics:
        if isinstance(features, SparseCodes):
            metrics["l0"] = (features.values != 0).sum() / max(features.n_rows, 1)
        else:  # a byte sum of the mask: several times faster on CPU than count_nonzero or a bool sum
            active = features.ne(0).view(torch.uint8).sum(dtype=torch.int64)
            metrics["l0"] = active / max(features.numel() // features.shape[-1], 1)
    if "fvu" not in metrics and "mse_loss" in metrics:
        target = x[1] if isinstance(x, (tuple, list)) else x
        flat = target.reshape(-1, target.shape[-1]).float()
        metrics["fvu"] = metrics["mse_loss"] / flat.var(dim=0, unbiased=False).sum().clamp_min(1e-30)


class NonFiniteLoss(FloatingPointError):
    """The loss of a training step is NaN or ±inf. Raised by `SAETrainer.update` before the
    backward pass, so the step changed no training state; trainSAE turns it into an error naming
    the trainer and the likely cause (or skips the batch, with on_nonfinite="skip")."""

    def __init__(self, step: int, value: float):
        super().__init__(f"the loss is {value} at step {step}")
        self.step, self.value = step, value


def rows_of(features: torch.Tensor | SparseCodes) -> int:
    """N, the tokens of a batch's features (dense [..., F] or SparseCodes)."""
    if isinstance(features, SparseCodes):
        return features.n_rows
    return features.reshape(-1, features.shape[-1]).shape[0]


class LossOutput(NamedTuple):
    loss: torch.Tensor  # scalar to minimise
    features: torch.Tensor | SparseCodes  # the batch's features [N, F] (for dead-latent tracking)
    metrics: dict[str, torch.Tensor]  # detached scalars for logging


class SAETrainer:
    """One SAE being trained. Subclasses set `Config`, `dictionary_class`, `default_lr` (or
    override `long_run_learning_rate`), build `self.ae` and `self.optimizer`, and implement `loss`."""

    Config: ClassVar[type[TrainerConfig]] = TrainerConfig
    dictionary_class: ClassVar[type[Dictionary]]
    default_lr: ClassVar[float] = 1e-3
    scales_lr_with_run: ClassVar[bool] = True
    """whether the default LR is the long-run one times run_length_lr_scale (False: a recipe whose
    default is already set for short runs)."""
    l0_controller_min_scale: ClassVar[float] = 0.0
    """the floor of the L0Controller's multiplier m with target_l0 (L0Controller's min_scale)."""
    full_metrics: bool = True
    """whether `update` adds l0 and fvu to its metrics where the recipe's loss has none
    (add_l0_and_fvu: one more pass over the batch's features); trainSAE turns it on only for the
    steps whose metrics are logged or shown."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "Config" in cls.__dict__:  # so that a bare config dataclass names its recipe
            cls.Config.trainer_class = cls

    def __init__(self, config: TrainerConfig):
        if not isinstance(config, self.Config):
            raise TypeError(f"{type(self).__name__} expects a {self.Config.__name__}, got {type(config).__name__}")
        self.seed_was_drawn = config.seed is None
        if self.seed_was_drawn:
            config = dataclasses.replace(config, seed=secrets.randbits(62))
        if config.warmup_steps is None:  # recorded resolved in cfg, so a resumed run keeps it
            config = dataclasses.replace(config, warmup_steps=default_warmup_steps(config.steps))
        self.cfg = config
        self.device = torch.device(config.device)
        generator_device = self.device if self.device.type == "cuda" else "cpu"  # e.g. meta has no generator
        self.generator = torch.Generator(device=generator_device).manual_seed(config.seed)
        self.lr = config.lr if config.lr is not None else self.default_learning_rate()
        self.dead_tracker = DeadLatentTracker(config.dict_size, self.device)
        self.l0_controller = (L0Controller(config.target_l0, self.l0_controller_min_scale)
                              if self.adapts_penalty_to_target_l0() else None)
        self.replicas: Replicas = SINGLE_PROCESS
        """the ranks holding copies of this trainer (data-parallel training, distributed.py): `update`
        then takes this rank's rows and steps as on the global batch."""

    def build_dictionary(self, *args, **kwargs) -> Dictionary:
        """A new `dictionary_class(activation_dim, dict_size, *args, **kwargs)` on the trainer's
        device, initialised from the trainer's seed (drawn on the CPU: the same on every device)."""
        generator = self.generator if self.generator.device.type == "cpu" else torch.Generator().manual_seed(self.cfg.seed)
        dictionary = self.dictionary_class(self.cfg.activation_dim, self.cfg.dict_size, *args, generator=generator,
                                           **kwargs)
        return dictionary.to(self.device)

    # -- what a recipe implements ------------------------------------------------------------
    def long_run_learning_rate(self) -> float:
        """The recipe's published LR, meant for runs of 10⁴–10⁵ steps."""
        return self.default_lr

    def default_learning_rate(self) -> float:
        """The LR when the config gives none: the long-run one, scaled up for a short run on narrow
        inputs (run_length_lr_scale) unless the recipe opts out."""
        scale = run_length_lr_scale(self.cfg.steps, self.cfg.activation_dim) if self.scales_lr_with_run else 1.0
        return self.long_run_learning_rate() * scale

    def adapts_penalty_to_target_l0(self) -> bool:
        """Whether `target_l0` drives an L0Controller (recipes with a sparsity penalty); recipes
        whose L0 is set another way override this."""
        return self.cfg.target_l0 is not None

    def penalty_scale(self, step: int) -> float:
        """The multiplier of the sparsity coefficient at `step`: its warmup, times the
        L0Controller's m with target_l0."""
        scale = sparsity_multiplier(step, self.cfg.sparsity_warmup_steps)
        return scale * self.l0_controller.scale if self.l0_controller is not None else scale

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
            self.resample_neurons(self.dead_tracker.dead_after_steps(every - 1), self.replicas.gather_rows(x))

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} does not resample dead latents")

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One optimisation step on the batch x [B, D] (with `replicas`, this rank's rows of the
        global batch); returns detached metrics."""
        self.set_lr(step)
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss(x, step)
        if self.replicas.distributed:  # every rank learns whether any rank's loss is finite
            out.loss.backward()
            loss = self.replicas.reduce_gradients(self.ae.parameters(), rows_of(out.features), out.loss)
            if not bool(torch.isfinite(loss)):
                raise NonFiniteLoss(step, loss.item())
        else:
            if not bool(torch.isfinite(out.loss)):
                raise NonFiniteLoss(step, out.loss.item())
            out.loss.backward()
        self.before_optimizer_step(step)
        self.optimizer.step()
        self.dead_tracker.update(out.features, self.replicas)
        if self.full_metrics:
            add_l0_and_fvu(out.metrics, out.features, x)
        if self.l0_controller is not None:
            self.l0_controller.update(out.features, adapt=step + 1 >= (self.cfg.sparsity_warmup_steps or 0),
                                      replicas=self.replicas)
            out.metrics["penalty_scale"] = torch.tensor(self.l0_controller.scale)
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

    def nonfinite_parameters(self) -> list[str]:
        """The names of the dictionary's parameters that hold a NaN or ±inf (a step whose loss was
        finite can still overflow in its gradient)."""
        return [name for name, p in self.ae.named_parameters() if not bool(torch.isfinite(p).all())]

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
            "generator": self.generator.get_state(),
            "extra": self.extra_state(),
            **({"l0_controller": self.l0_controller.state_dict()} if self.l0_controller is not None else {}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ae.load_state_dict(state["ae"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.dead_tracker.load_state_dict(state["dead_tracker"])
        if "generator" in state:
            self.generator.set_state(state["generator"].cpu())
        self.load_extra_state(state["extra"])
        if self.l0_controller is not None and "l0_controller" in state:
            self.l0_controller.load_state_dict(state["l0_controller"])
