"""What a family of recipes shares, so that each recipe file states only its own choices:

- the TopK family (top_k.py, batch_top_k.py, matryoshka_batch_top_k.py): Gao et al. 2024's method
  around a top-k selection (AuxK, b_dec at the geometric median, the unit-norm decoder, the
  1/√F learning rate, the inference threshold);
- the gated family (gated.py, gated_anneal.py): the gated SAE's reconstruction and auxiliary
  losses, for any sparsity penalty on the gate path;
- p-annealing (p_anneal.py, gated_anneal.py): the Lp penalty whose exponent p shrinks during
  training, with λ rescaled at each change;
- the JumpReLU family (jumprelu.py, jumprelu_transcoder.py): per-latent thresholds trained through
  straight-through estimators, the L0 penalty, the sparse implementation;
- transcoders (transcoder.py, top_k_transcoder.py, jumprelu_transcoder.py): batches of (input,
  output) pairs, the output width, the skip connection, b_dec at the mean output.
"""
from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import kernels
from ..distributed import SINGLE_PROCESS, Replicas
from ..kernels import GatedEncode, SparseCodes
from .base import (
    ConstrainedAdam,
    LossOutput,
    SAETrainer,
    TrainerConfig,
    check_count,
    check_positive,
    check_weight,
    lr_multiplier,
    resample_dead_latents_,
)

# =============================================================================================
# The TopK family (Gao et al. 2024, "Scaling and evaluating sparse autoencoders")
# =============================================================================================

TOPK_ADAM_BETAS = (0.9, 0.999)
TOPK_ADAM_EPS = 6.25e-10
TOPK_DECAY_FRACTION = 0.2  # linear LR decay over the last 20% of the steps when decay_start is None
TOPK_DEAD_TOKENS = 10_000_000  # Gao et al.'s AuxK window: dead after 10M tokens without firing
TOPK_DEAD_FRACTION = 0.01  # ... capped at 1% of a shorter run's tokens


class TopKSchedule:
    """Gao et al.'s learning-rate schedule, for trainers with a `cfg`: LR 2e-4 / √(F / 2¹⁴) for a
    long run (times run_length_lr_scale by default), linear warmup over `warmup_steps`, linear decay
    to 0 over the last 20% of the steps unless `decay_start` says otherwise."""

    def long_run_learning_rate(self) -> float:
        return 2e-4 / math.sqrt(self.cfg.dict_size / 2**14)

    def adapts_penalty_to_target_l0(self) -> bool:
        if self.cfg.target_l0 is not None:
            raise ValueError(f"{type(self).__name__} fixes the L0 with k: pass k={max(1, round(self.cfg.target_l0))} "
                             "instead of target_l0")
        return False

    def lr_multiplier(self, step: int) -> float:
        decay_start = self.cfg.decay_start
        if decay_start is None and self.cfg.steps is not None:
            decay_start = int(self.cfg.steps * (1 - TOPK_DECAY_FRACTION))
        return lr_multiplier(step, self.cfg.warmup_steps, decay_start, self.cfg.steps)


@torch.no_grad()
def geometric_median(points: torch.Tensor, max_iter: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """argmin_y Σ_i ‖p_i − y‖ for points [N, D], by Weiszfeld's iterations

        y ← Σ_i w_i p_i / Σ_i w_i,   w_i = 1 / ‖p_i − y‖

    from the mean, until the step is below `tol` times the mean distance. Distances are floored
    at a tiny value so that landing on a data point does not divide by zero.
    """
    if points.ndim != 2 or points.shape[0] == 0:
        raise ValueError(f"geometric_median needs points [N, D] with N > 0, got shape {tuple(points.shape)}")
    points = points.float()
    median = points.mean(dim=0)
    for _ in range(max_iter):
        distances = (points - median).norm(dim=1).clamp_min(1e-12)  # [N]
        weights = 1.0 / distances
        new_median = (weights @ points) / weights.sum()
        step = (new_median - median).norm()
        median = new_median
        if step <= tol * distances.mean():
            break
    return median


class RunningThreshold:
    """θ, the running average of one statistic per training batch (the smallest kept activation),
    as a bias-corrected exponential moving average:

        m_t = β m_{t−1} + (1 − β) s_t,   θ_t = m_t / (1 − β^t)

    For t ≪ 1/(1 − β) this is the plain mean of the statistics seen so far (the "average over
    batches" of Bussmann et al. 2024); later it forgets batches older than ~1/(1 − β) steps, so θ
    follows the encoder as it trains.
    """

    def __init__(self, beta: float, device: torch.device | str):
        if not 0 <= beta < 1:
            raise ValueError(f"threshold_beta must be in [0, 1), got {beta}")
        self.beta = beta
        self.moving_average = torch.zeros((), device=device)
        self.updates = 0

    @torch.no_grad()
    def update(self, statistic: torch.Tensor) -> torch.Tensor:
        """Add one batch's statistic; returns the new θ."""
        self.moving_average.mul_(self.beta).add_((1 - self.beta) * statistic.float())
        self.updates += 1
        return self.moving_average / (1 - self.beta**self.updates)

    def state_dict(self) -> dict:
        return {"moving_average": self.moving_average.clone(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.moving_average.copy_(state["moving_average"])
        self.updates = int(state["updates"])


def mean_smallest_kept_per_token(codes: SparseCodes, replicas: Replicas = SINGLE_PROCESS) -> torch.Tensor:
    """The mean over tokens of each token's smallest positive kept activation (NaN if none is);
    `codes` holds the same number of entries for every token (top-k per token). With `replicas`,
    over the tokens of every rank."""
    values = codes.values.detach().reshape(codes.n_rows, -1)  # [N, k]
    smallest = values.masked_fill(values <= 0, math.inf).min(dim=1).values
    smallest = smallest[torch.isfinite(smallest)]
    if replicas.distributed:
        total = replicas.sum_(torch.stack([smallest.sum(), smallest.new_tensor(smallest.numel())]))
        return total[0] / total[1] if bool(total[1] > 0) else values.new_tensor(math.nan)
    return smallest.mean() if smallest.numel() else values.new_tensor(math.nan)


def smallest_kept(codes: SparseCodes, replicas: Replicas = SINGLE_PROCESS) -> torch.Tensor:
    """The smallest positive activation kept in the batch (NaN if none is); with `replicas`, in
    the global batch."""
    values = codes.values.detach()
    positive = values[values > 0]
    if not replicas.distributed:
        return positive.min() if positive.numel() else values.new_tensor(math.nan)
    smallest = replicas.min_((positive.min() if positive.numel() else values.new_tensor(math.inf)).reshape(1))[0]
    return smallest if bool(torch.isfinite(smallest)) else values.new_tensor(math.nan)


@dataclass
class TopKFamilyConfig(TrainerConfig):
    k: int | None = None
    """active latents per token (required; BatchTopK: their average over the batch)."""
    auxk_alpha: float = 1 / 32
    """α, the weight of the AuxK loss (0 turns it off)."""
    k_aux: int | None = None
    """dead latents per token in AuxK; None: activation_dim // 2."""
    dead_tokens_threshold: int | None = None
    """a latent is dead (for AuxK) after this many tokens without firing; None: Gao et al.'s 10M,
    or 1% of the run's tokens (steps × batch) when that is fewer, so that AuxK acts in a short run."""
    init_encoder_scale: float = 0.1
    """W_enc = init_encoder_scale · W_decᵀ at initialisation (1: Gao et al.'s W_enc = W_decᵀ)."""
    threshold_beta: float = 0.999
    """β of the inference threshold's moving average."""
    threshold_start_step: int = 1000
    """first step whose batch updates the inference threshold."""
    grad_clip_norm: float | None = None
    """clip the global gradient norm to this (None: no clipping)."""
    k_anneal_steps: int | None = None
    """the reference library's k annealing: k starts at activation_dim and falls linearly to `k`
    over this many steps, k_t = int(D (1 − r) + k r) with r = min(t, k_anneal_steps) / k_anneal_steps;
    None: k from the start."""


class TopKFamilyTrainer(TopKSchedule, SAETrainer):
    """Gao et al.'s method around a top-k selection (the dictionary's `select`).

        L = (1/N) Σ_n ‖x_n − x̂_n‖²  +  α · L_aux        (AuxK on latents dead for `dead_tokens_window` tokens)

    b_dec starts at the geometric median of the first batch, W_enc at `init_encoder_scale` · W_decᵀ;
    unit-norm decoder rows (the gradient along each row is removed before the Adam step, the row
    renormalised after it); Adam with β = (0.9, 0.999), ε = 6.25e-10; LR 2e-4 / √(F / 2¹⁴), linear
    warmup, linear decay over the last 20 %; from `threshold_start_step` the inference threshold θ
    tracks `threshold_statistic` of each batch's kept activations (RunningThreshold). A recipe sets `dictionary_class` and
    `threshold_statistic`, and may override `reconstruction_loss`.
    """

    Config = TopKFamilyConfig
    threshold_statistic = staticmethod(smallest_kept)

    def __init__(self, config: TopKFamilyConfig):
        super().__init__(config)
        self.check_config()
        self.ae = self.build_dictionary(*self.dictionary_arguments())
        with torch.no_grad():
            self.ae.W_enc.mul_(config.init_encoder_scale)
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr, betas=TOPK_ADAM_BETAS,
                                         eps=TOPK_ADAM_EPS)
        self.k_aux = config.k_aux if config.k_aux is not None else max(1, config.activation_dim // 2)
        self.running_threshold = RunningThreshold(config.threshold_beta, self.device)

    def check_config(self) -> None:
        cfg = self.cfg
        name = type(self).__name__
        if cfg.k is None:
            raise ValueError(f"{name} needs k, the number of active latents per token (e.g. k=32)")
        if isinstance(cfg.k, bool) or not isinstance(cfg.k, int) or not 0 < cfg.k <= cfg.dict_size:
            raise ValueError(f"{name}: k must be an int in [1, dict_size={cfg.dict_size}], got {cfg.k!r}")
        if cfg.k_aux is not None and not 0 < cfg.k_aux <= cfg.dict_size:
            raise ValueError(f"{name}: k_aux must be in [1, dict_size={cfg.dict_size}] or None, got {cfg.k_aux}")
        if cfg.auxk_alpha < 0:
            raise ValueError(f"{name}: auxk_alpha must be >= 0 (0 turns AuxK off), got {cfg.auxk_alpha}")
        check_positive("init_encoder_scale", cfg.init_encoder_scale)
        if cfg.dead_tokens_threshold is not None and cfg.dead_tokens_threshold <= 0:
            raise ValueError(
                f"{name}: dead_tokens_threshold must be a positive token count, got {cfg.dead_tokens_threshold}"
            )
        if cfg.grad_clip_norm is not None and cfg.grad_clip_norm <= 0:
            raise ValueError(f"{name}: grad_clip_norm must be positive or None, got {cfg.grad_clip_norm}")
        if cfg.k_anneal_steps is not None:
            if cfg.k_anneal_steps <= 0 or (cfg.steps is not None and cfg.k_anneal_steps >= cfg.steps):
                raise ValueError(f"{name}: k_anneal_steps must be in [1, steps={cfg.steps}), got {cfg.k_anneal_steps}")
            if cfg.activation_dim <= cfg.k or cfg.activation_dim > cfg.dict_size:
                raise ValueError(f"{name}: k_anneal_steps anneals k from activation_dim={cfg.activation_dim} down to "
                                 f"k={cfg.k}, so it needs k < activation_dim <= dict_size={cfg.dict_size}")
        if cfg.steps is not None and cfg.threshold_start_step >= cfg.steps:
            warnings.warn(
                f"{name}: threshold_start_step={cfg.threshold_start_step} >= steps={cfg.steps}, so no "
                "inference threshold will be learned; lower threshold_start_step to learn one",
                stacklevel=3,
            )

    def dictionary_arguments(self) -> tuple:
        """The dictionary's constructor arguments after (activation_dim, dict_size)."""
        return (self.cfg.k,)

    def k_at(self, step: int) -> int:
        """k at `step`: `cfg.k`, or during k annealing int(D (1 − r) + k r), r = min(step, K) / K."""
        cfg = self.cfg
        if cfg.k_anneal_steps is None:
            return cfg.k
        ratio = min(step, cfg.k_anneal_steps) / cfg.k_anneal_steps
        return int(cfg.activation_dim * (1 - ratio) + cfg.k * ratio)

    def reconstruction_loss(self, x: torch.Tensor, codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, residual x − x̂ [N, D], extra metrics) for x [N, D] and its features."""
        residual = x - (kernels.sparse_decode(codes, self.ae.W_dec) + self.ae.b_dec)
        return residual.pow(2).sum(dim=-1).mean(), residual, {}

    def training_codes(self, x: torch.Tensor) -> tuple[SparseCodes, torch.Tensor, torch.Tensor]:
        """(codes, π [N, F], x − b_dec [N, D]) for x [N, D]: the selection, with values
        differentiable through the sparse encoder backward."""
        ae = self.ae
        encoder_input = x - ae.b_dec.detach()
        with torch.no_grad():
            pre = torch.addmm(ae.b_enc, encoder_input, ae.W_enc)
            if ae.batch_top_k and self.replicas.distributed:  # the k·N largest of the global batch
                codes = self.replicas.batch_top_k_codes(pre, int(ae.k))
            else:
                codes = ae.select(pre, use_threshold=False)
        values = kernels.gather_preactivations(
            pre, encoder_input, ae.W_enc, ae.b_enc, ae.b_dec, codes.rows, codes.columns
        ).relu()
        return codes._replace(values=values), pre, encoder_input

    def dead_tokens_window(self, tokens_per_step: int) -> int:
        """Tokens without firing after which a latent is dead: `dead_tokens_threshold`, or
        min(10M, ⌊0.01 · steps · tokens_per_step⌋) (at least 1; 10M without steps)."""
        if self.cfg.dead_tokens_threshold is not None:
            return self.cfg.dead_tokens_threshold
        if self.cfg.steps is None:
            return TOPK_DEAD_TOKENS
        return max(1, min(TOPK_DEAD_TOKENS, int(TOPK_DEAD_FRACTION * self.cfg.steps * tokens_per_step)))

    def dead_latent_mask(self, tokens_per_step: int) -> torch.Tensor:
        return self.dead_tracker.dead_after_tokens(self.dead_tokens_window(tokens_per_step))

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x = x.reshape(-1, self.cfg.activation_dim)
        codes, pre, encoder_input = self.training_codes(x)
        recon_loss, residual, metrics = self.reconstruction_loss(x, codes)
        loss = recon_loss
        dead_mask = self.dead_latent_mask(x.shape[0] * self.replicas.size)
        if self.cfg.auxk_alpha > 0:
            mean_variance = (self.replicas.mean_squared_deviation(residual)
                             if self.replicas.distributed and bool(dead_mask.any()) else None)
            aux = kernels.auxk_loss(pre, encoder_input, self.ae.W_enc, self.ae.b_enc, self.ae.W_dec, dead_mask,
                                    residual, self.k_aux, mean_variance)
            loss = loss + self.cfg.auxk_alpha * aux
            metrics["auxk_loss"] = aux.detach()
        metrics.update(
            mse_loss=residual.detach().pow(2).sum(dim=-1).mean(),
            loss=loss.detach(),
            l0=(codes.values.detach() > 0).sum() / codes.n_rows,
            dead_latents=dead_mask.sum(),
            min_kept_activation=self.threshold_statistic(codes, self.replicas),
        )
        return LossOutput(loss, codes.detached(), metrics)

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step; at step 0, b_dec first moves to the geometric median of the batch. From
        `threshold_start_step` on, the batch's statistic updates θ."""
        if step == 0:
            with torch.no_grad():
                self.ae.b_dec.copy_(geometric_median(self.replicas.gather_rows(x.reshape(-1, self.cfg.activation_dim))))
        if self.cfg.k_anneal_steps is not None:
            self.ae.k.fill_(self.k_at(step))
        metrics = super().update(step, x)
        statistic = metrics["min_kept_activation"]
        if step >= self.cfg.threshold_start_step and bool(torch.isfinite(statistic)):
            self.ae.threshold.copy_(self.running_threshold.update(statistic))
        return metrics

    def before_optimizer_step(self, step: int) -> None:
        if self.cfg.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.cfg.grad_clip_norm)

    def extra_state(self) -> dict:
        return {"running_threshold": self.running_threshold.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.running_threshold.load_state_dict(state["running_threshold"])


# =============================================================================================
# The gated family (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
# Autoencoders")
# =============================================================================================

DENSITY_SAMPLE_STRIDE = 8  # dense or sparse path: decided on every 8th token (one [N/8, F] pass)
Features = torch.Tensor | SparseCodes  # [N, F] dense, or the open gates only


@dataclass
class GatedFamilyConfig(TrainerConfig):
    adam_betas: tuple[float, float] = (0.0, 0.999)
    """Adam's (β1, β2); β1 = 0 as in DeepMind's gated SAEs."""
    resample_steps: int | None = None
    """resample dead latents every this many steps (None: never)."""
    resample_encoder_scale: float = 0.2
    """a resampled encoder column's norm, as a multiple of the mean alive column norm."""
    init_encoder_scale: float = 0.1
    """W_gate = init_encoder_scale · W_decᵀ at initialisation (1: the tied init; gated.py says why 0.1)."""


class GatedFamilyTrainer(SAETrainer):
    """The gated SAE's loss for a sparsity penalty S on the gate path g = ReLU(π_gate) (a recipe
    implements `sparsity_penalty(g, step) -> (λ S(g), metrics)`):

        L = ‖x − x̂(f(x))‖²₂  +  S(g)  +  ‖x − x̂_frozen(g)‖²₂

    (batch means of per-token sums), x̂_frozen using stop-gradient copies of W_dec and b_dec, with
    unit-norm decoder rows (ConstrainedAdam) and optional resampling.

    Speed: z = x W_gate is one matmul without autograd. While more than DENSE_DECODE_DENSITY of the
    gates are open (early training) the rest is dense, with one fused autograd Function for both
    paths (kernels.GatedEncode); once they are sparse, as in a trained gated SAE, f and g are held
    on the open gates only: sparse encoder backward, embedding-bag decodes.
    """

    Config = GatedFamilyConfig

    def __init__(self, config: GatedFamilyConfig):
        super().__init__(config)
        if config.resample_steps is not None and config.resample_steps <= 0:
            raise ValueError(f"resample_steps must be a positive number of steps or None, got {config.resample_steps}")
        betas = tuple(config.adam_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {config.adam_betas!r}")
        self.ae = self.build_dictionary()
        with torch.no_grad():
            self.ae.W_enc.mul_(check_positive("init_encoder_scale", config.init_encoder_scale))
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr, betas=betas)

    def sparsity_penalty(self, gate: Features, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def loss_terms(self, x: torch.Tensor) -> tuple[Features, Features, torch.Tensor, torch.Tensor]:
        """(f, ReLU(π_gate), reconstruction loss, auxiliary loss) on x [..., D]; the features are
        dense [N, F] while many gates are open, else SparseCodes of the M open gates."""
        ae = self.ae
        x = x.reshape(-1, self.cfg.activation_dim)
        n_tokens = x.shape[0]
        with torch.no_grad():
            z = x @ ae.W_enc  # [N, F]
        gate_bias, mag_bias = ae.folded_biases()  # π_gate = z + gate_bias, π_mag = exp(r_mag) ⊙ z + mag_bias
        with torch.no_grad():  # the share of open gates (π_gate > 0), from every 8th token
            sampled = z[::DENSITY_SAMPLE_STRIDE]
            n_open_sampled = int((sampled > -gate_bias).sum())
        frozen_decoder, frozen_bias = ae.W_dec.detach(), ae.b_dec.detach()
        if kernels.prefers_dense(n_open_sampled, sampled.shape[0], self.cfg.dict_size):
            f, gate = GatedEncode.apply(z, x, ae.W_enc, gate_bias, ae.r_mag, mag_bias)  # [N, F] each
            x_hat = ae.decode(f)
            # the gate path through a frozen decoder: gradients reach W_gate and b_gate only
            x_hat_gate = F.linear(gate, frozen_decoder.T, frozen_bias)
        else:
            rows, columns = (z > -gate_bias).nonzero(as_tuple=True)  # the M open gates
            z_open = kernels.gather_preactivations(z, x, ae.W_enc, None, None, rows, columns)  # [M]
            gate = SparseCodes(z_open + gate_bias.index_select(0, columns), rows, columns, n_tokens)
            magnitude = ae.r_mag.exp().index_select(0, columns) * z_open + mag_bias.index_select(0, columns)
            f = gate._replace(values=magnitude.relu())
            x_hat = kernels.sparse_decode(f, ae.W_dec) + ae.b_dec
            x_hat_gate = kernels.sparse_decode(gate, frozen_decoder) + frozen_bias
        recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        aux_loss = (x - x_hat_gate).pow(2).sum(dim=-1).mean()
        return f, gate, recon_loss, aux_loss

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        f, gate, recon_loss, aux_loss = self.loss_terms(x)
        penalty, metrics = self.sparsity_penalty(gate, step)
        loss = recon_loss + self.penalty_scale(step) * penalty + aux_loss
        metrics.update(mse_loss=recon_loss.detach(), aux_loss=aux_loss.detach(), loss=loss.detach())
        return LossOutput(loss, f.detached() if isinstance(f, SparseCodes) else f, metrics)

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Re-initialise the latents in `dead_mask` [F] from inputs x (gate column, decoder row,
        b_gate, b_mag and r_mag); returns their indices."""
        ae = self.ae
        return resample_dead_latents_(ae, self.optimizer, self.dead_tracker, dead_mask, x,
                                      [ae.b_gate, ae.b_mag, ae.r_mag], self.cfg.resample_encoder_scale, self.generator)


# =============================================================================================
# p-annealing (Karvonen et al. 2024, "Measuring Progress in Dictionary Learning for Language Model
# Interpretability with Board Game Models")
# =============================================================================================

SPARSITY_FUNCTIONS = ("Lp^p", "Lp")
ANNEAL_START_STEPS = 15_000  # saprmarks/dictionary_learning's default anneal_start
ANNEAL_START_FRACTION = 0.2  # ... capped at this fraction of a shorter run


@dataclass
class AnnealedSparsityConfig(TrainerConfig):
    sparsity_penalty: float = 1e-1
    """λ at p = p_start (the L1 penalty of the standard recipe); rescaled at every change of p."""
    sparsity_function: str = "Lp^p"
    """"Lp^p": Σ f_i^p (the paper's); "Lp": (Σ f_i^p)^(1/p)."""
    p_start: float = 1.0
    """p at the start of training."""
    p_end: float = 0.2
    """p after the last change."""
    anneal_start: int | None = None
    """first change of p (after this step); None: the reference's 15,000, or a fifth of the run
    when that is shorter (ANNEAL_START_FRACTION), so a short run anneals too."""
    anneal_end: int | None = None
    """end of the annealing; None: the end of the run (`steps`)."""
    n_sparsity_updates: int = 10
    """N, the number of changes of p."""
    sparsity_queue_length: int = 10
    """batches averaged when rescaling λ at a change."""


class PAnnealSchedule:
    """The p schedule and the λ rescaling of p-annealing. p goes from p_start to p_end in N equal
    jumps between steps anneal_start and anneal_end; the k-th jump (k = 0 … N−1) happens after step

        t_k = anneal_start + ⌊k (anneal_end − anneal_start) / N⌋,   p ← p_start + (k+1)/N · (p_end − p_start),

    and rescales λ so that the penalty is continuous: λ_new = λ_old · mean S_p_old(f) / mean S_p_new(f),
    both means over the last `sparsity_queue_length` batches before the jump.

    State: `n_changes_done` (how many of the N jumps happened), `sparsity_coeff` (λ now) and the
    queue of (S_p(f), S_p_next(f)) measured on the batches before the coming jump.
    """

    @classmethod
    def from_config(cls, config: AnnealedSparsityConfig, anneal_end: int) -> "PAnnealSchedule":
        return cls(
            config.sparsity_penalty, config.p_start, config.p_end, config.anneal_start, anneal_end,
            config.n_sparsity_updates, config.sparsity_queue_length, config.sparsity_function,
        )

    def __init__(
        self,
        sparsity_penalty: float,
        p_start: float,
        p_end: float,
        anneal_start: int,
        anneal_end: int,
        n_sparsity_updates: int,
        sparsity_queue_length: int,
        sparsity_function: str,
    ):
        self.p_start, self.p_end = p_start, p_end
        self.n_updates = n_sparsity_updates
        self.queue_length = sparsity_queue_length
        self.sparsity_function = sparsity_function
        span = anneal_end - anneal_start
        self.change_steps = [anneal_start + (k * span) // n_sparsity_updates for k in range(n_sparsity_updates)]
        self.n_changes_done = 0
        self.sparsity_coeff = float(sparsity_penalty)
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []

    def p_after(self, n_changes: int) -> float:
        return self.p_start + n_changes / self.n_updates * (self.p_end - self.p_start)

    @property
    def p(self) -> float:
        return self.p_after(self.n_changes_done)

    @property
    def next_p(self) -> float | None:
        return self.p_after(self.n_changes_done + 1) if self.n_changes_done < self.n_updates else None

    def measures_next(self, step: int) -> bool:
        """Whether `step` is in the window whose batches set λ at the coming jump."""
        if self.n_changes_done == self.n_updates:
            return False
        return step > self.change_steps[self.n_changes_done] - self.queue_length

    def penalty(self, f: Features, step: int, replicas: Replicas = SINGLE_PROCESS
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ · mean S_p(f) for features f [..., F] (or SparseCodes), and detached metrics (with S at
        the next p inside the measuring window, where with `replicas` both are means over the
        global batch, since they set λ at the jump)."""
        sparsity = kernels.lp_sparsity(f, self.p, self.sparsity_function)
        metrics = {
            "sparsity_loss": sparsity.detach(),
            "p": torch.tensor(self.p),
            "sparsity_coeff": torch.tensor(self.sparsity_coeff),
        }
        if self.measures_next(step):
            with torch.no_grad():
                metrics["sparsity_loss_next_p"] = kernels.lp_sparsity(f, self.next_p, self.sparsity_function)
            if replicas.distributed:
                n_rows = f.n_rows if isinstance(f, SparseCodes) else f.reshape(-1, f.shape[-1]).shape[0]
                metrics["sparsity_loss"], metrics["sparsity_loss_next_p"] = replicas.means(
                    [metrics["sparsity_loss"], metrics["sparsity_loss_next_p"]], n_rows)
        return self.sparsity_coeff * sparsity, metrics

    def observe(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """After the optimizer step of `step`: queue this batch's measurements and, at a jump,
        rescale λ and advance p."""
        if "sparsity_loss_next_p" in metrics:
            self.queue.append((metrics["sparsity_loss"], metrics["sparsity_loss_next_p"]))
            self.queue = self.queue[-self.queue_length :]
        if self.n_changes_done < self.n_updates and step >= self.change_steps[self.n_changes_done]:
            if self.queue:
                current = torch.stack([c for c, _ in self.queue]).mean()
                upcoming = torch.stack([n for _, n in self.queue]).mean()
                if bool(upcoming > 0):  # no firing latents at all: nothing to match, keep λ
                    self.sparsity_coeff *= (current / upcoming).item()
            self.n_changes_done += 1
            self.queue = []

    def state_dict(self) -> dict:
        return {"n_changes_done": self.n_changes_done, "sparsity_coeff": self.sparsity_coeff, "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.n_changes_done = state["n_changes_done"]
        self.sparsity_coeff = state["sparsity_coeff"]
        self.queue = [tuple(pair) for pair in state["queue"]]


def default_anneal_start(steps: int | None) -> int:
    """anneal_start when the config leaves it None: min(15,000, ⌊0.2 · steps⌋) (15,000 without steps)."""
    if steps is None:
        return ANNEAL_START_STEPS
    return min(ANNEAL_START_STEPS, int(ANNEAL_START_FRACTION * steps))


def check_anneal_config(cfg: AnnealedSparsityConfig, trainer_name: str) -> int:
    """Validate the p-annealing fields of a config whose anneal_start is resolved; returns anneal_end
    (resolved from steps)."""
    if cfg.sparsity_function not in SPARSITY_FUNCTIONS:
        raise ValueError(f"sparsity_function must be one of {SPARSITY_FUNCTIONS}, got {cfg.sparsity_function!r}")
    if not (cfg.p_start > 0 and cfg.p_end > 0):
        raise ValueError(
            f"p_start and p_end must be > 0, got p_start={cfg.p_start}, p_end={cfg.p_end}: at p = 0 the "
            "penalty Σ f_i^0 counts every latent, firing or not, and has no gradient"
        )
    anneal_end = cfg.anneal_end if cfg.anneal_end is not None else cfg.steps
    if anneal_end is None:
        raise ValueError(
            f"{trainer_name} needs to know when annealing ends: pass steps=... (to trainSAE or the config) "
            "or set anneal_end"
        )
    if not 0 <= cfg.anneal_start < anneal_end:
        raise ValueError(
            f"anneal_start ({cfg.anneal_start}) must be >= 0 and before anneal_end ({anneal_end}, the end of "
            "the run unless set); lower anneal_start for a short run"
        )
    if not isinstance(cfg.n_sparsity_updates, int) or isinstance(cfg.n_sparsity_updates, bool):
        raise ValueError(
            f"n_sparsity_updates must be a number of changes of p, got {cfg.n_sparsity_updates!r} (for a change "
            "after every step pass anneal_end − anneal_start)"
        )
    if not 1 <= cfg.n_sparsity_updates <= anneal_end - cfg.anneal_start:
        raise ValueError(
            f"n_sparsity_updates must be between 1 and anneal_end − anneal_start = {anneal_end - cfg.anneal_start} "
            f"(one change of p per step at most), got {cfg.n_sparsity_updates}"
        )
    if cfg.sparsity_queue_length < 1:
        raise ValueError(f"sparsity_queue_length must be >= 1 batch, got {cfg.sparsity_queue_length}")
    resample_steps = getattr(cfg, "resample_steps", None)
    if resample_steps is not None and resample_steps <= 0:
        raise ValueError(f"resample_steps must be a positive number of steps or None, got {resample_steps}")
    return anneal_end


class AnnealedSparsity:
    """What the p-annealing recipes add to a trainer: `self.anneal` (a PAnnealSchedule built from
    the config), p and λ as properties, the schedule's step after each update, and its state in
    checkpoints. Listed before the trainer base class."""

    anneal: PAnnealSchedule

    def __init__(self, config: AnnealedSparsityConfig):
        if config.anneal_start is None:  # recorded resolved in cfg, so a resumed run keeps it
            config = dataclasses.replace(config, anneal_start=default_anneal_start(config.steps))
        anneal_end = check_anneal_config(config, type(self).__name__)
        super().__init__(config)
        self.anneal = PAnnealSchedule.from_config(self.cfg, anneal_end)

    @property
    def p(self) -> float:
        return self.anneal.p

    @property
    def sparsity_coeff(self) -> float:
        return self.anneal.sparsity_coeff

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = super().update(step, x)
        self.anneal.observe(step, metrics)
        return metrics

    def extra_state(self) -> dict:
        return {"anneal": self.anneal.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.anneal.load_state_dict(state["anneal"])


# =============================================================================================
# The JumpReLU family (Rajamanoharan et al. 2024, "Jumping Ahead"; the method: jumprelu.py)
# =============================================================================================

JUMPRELU_ADAM_BETAS = (0.0, 0.999)
JUMPRELU_ADAM_EPS = 1e-8
JUMPRELU_SPARSITY_WARMUP_STEPS = 10_000  # the paper's λ warmup
JUMPRELU_SPARSITY_WARMUP_FRACTION = 0.1  # ... capped at this fraction of a shorter run


def default_jumprelu_sparsity_warmup(steps: int | None) -> int:
    """sparsity_warmup_steps when the config leaves it None: min(10,000, ⌊0.1 · steps⌋)."""
    if steps is None:
        return JUMPRELU_SPARSITY_WARMUP_STEPS
    return min(JUMPRELU_SPARSITY_WARMUP_STEPS, int(JUMPRELU_SPARSITY_WARMUP_FRACTION * steps))


@dataclass
class JumpReluFamilyConfig(TrainerConfig):
    sparsity_penalty: float = 1.0
    """λ, the weight of the L0 penalty."""
    target_l0: float | None = None
    """None: the penalty is λ · L0 (the paper's); T: λ · m · (L0/T − 1)² (saprmarks/dictionary_learning's,
    times the L0Controller's m ≥ 1, which removes the excess over T the quadratic alone leaves)."""
    bandwidth: float = 0.001
    """ε, the width of the straight-through estimators' kernel."""
    initial_threshold: float = 0.001
    """θ at initialisation."""
    sparsity_warmup_steps: int | None = None
    """λ warms up linearly from 0 over these steps; None: the paper's 10,000, or a tenth of the run
    when that is shorter (so a short run reaches its full λ); 0: no warmup."""
    pre_act_penalty: float = 0.0
    """λ_p, the weight of the pre-activation loss that pulls dead latents back towards firing:
    λ_p · (1/N) Σ_n Σ_{i dead} ReLU(θ_i − π_ni) ‖W_dec,i‖; 0: none."""
    pre_act_dead_tokens: int = 10_000
    """a latent is dead, for the pre-activation loss, after this many tokens without firing."""


class JumpReluFamilyTrainer(SAETrainer):
    """Builds the dictionary (with θ = `initial_threshold`) and ConstrainedAdam (β = (0, 0.999),
    ε = 1e-8, LR 7e-5 by default); `jump_relu_decode` gives f W_dec of a batch with the estimators'
    gradients, `sparsity_loss` the L0 penalty; θ is kept ≥ 0 after each step."""

    default_lr = 7e-5
    l0_controller_min_scale = 1.0  # (L0/T − 1)² already pulls the L0 up below T: integrate only above it

    def __init__(self, config: JumpReluFamilyConfig):
        if config.sparsity_warmup_steps is None:  # recorded resolved in cfg, so a resumed run keeps it
            config = dataclasses.replace(config, sparsity_warmup_steps=default_jumprelu_sparsity_warmup(config.steps))
        super().__init__(config)
        name = type(self).__name__
        if not config.bandwidth > 0:  # sparsity_penalty and target_l0 are checked by the config itself
            raise ValueError(f"{name}: bandwidth (ε) must be positive, got {config.bandwidth}")
        check_weight(name, "pre_act_penalty (λ_p)", config.pre_act_penalty, " (0 turns it off)")
        check_count(name, "pre_act_dead_tokens", config.pre_act_dead_tokens, minimum=1)
        warmup = config.sparsity_warmup_steps
        if warmup is not None and config.steps is not None and warmup > config.steps:
            warnings.warn(
                f"{name}: sparsity_warmup_steps={warmup} > steps={config.steps}, so λ never "
                "reaches its full value; lower sparsity_warmup_steps",
                stacklevel=3,
            )
        self.ae = self.build_dictionary(initial_threshold=config.initial_threshold, **self.dictionary_arguments())
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr, betas=JUMPRELU_ADAM_BETAS,
                                         eps=JUMPRELU_ADAM_EPS)

    def dictionary_arguments(self) -> dict:
        return {}

    def jump_relu_decode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Features]:
        """(f W_dec [N, D_out] without b_dec, the batch's mean L0 (differentiable in θ), f detached)
        for inputs x [N, D].

        π is one dense matmul without autograd; only entries with π > θ − ε can have a nonzero
        value or gradient (active, or inside the kernel's window), so they are gathered once
        (kernels.gather_preactivations, sparse encoder backward) and decoded sparsely. While they
        are a large share of the N·F entries (early in training, when θ is small), dense matmuls
        are cheaper and are used instead (kernels.attach_encoder_gradient)."""
        ae, bandwidth = self.ae, self.cfg.bandwidth
        n_tokens = x.shape[0]
        threshold = ae.threshold  # [F]
        with torch.no_grad():
            pre = torch.addmm(ae.b_enc, x, ae.W_enc)  # π [N, F]
            in_window = pre > threshold - bandwidth
            n_entries = int(in_window.sum())
        if kernels.prefers_dense(n_entries, n_tokens, self.cfg.dict_size):
            z = kernels.attach_encoder_gradient(pre, x, ae.W_enc, ae.b_enc, None)  # [N, F]
            f = kernels.JumpReLUFunction.apply(z, threshold, bandwidth)
            l0 = kernels.StepFunction.apply(z, threshold, bandwidth).sum() / n_tokens
            return f @ ae.W_dec, l0, f.detach()
        rows, columns = in_window.nonzero(as_tuple=True)
        z = kernels.gather_preactivations(pre, x, ae.W_enc, ae.b_enc, None, rows, columns)  # [M]
        entry_threshold = threshold.index_select(0, columns)  # [M]
        codes = SparseCodes(kernels.JumpReLUFunction.apply(z, entry_threshold, bandwidth), rows, columns, n_tokens)
        l0 = kernels.StepFunction.apply(z, entry_threshold, bandwidth).sum() / n_tokens
        return kernels.sparse_decode(codes, ae.W_dec), l0, codes.detached()

    def sparsity_loss(self, l0: torch.Tensor, step: int, n_rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(λ(t) · m · S, S) with S = L0 (m = 1), or (L0/T − 1)² with a target T (L0 of the global batch, with
        `replicas`: S is not linear in it). l0 is the mean over this rank's n_rows rows."""
        if self.cfg.target_l0 is None:
            sparsity = l0
        else:
            sparsity = (self.replicas.mean(l0, n_rows) / self.cfg.target_l0 - 1).pow(2)
        return self.cfg.sparsity_penalty * self.penalty_scale(step) * sparsity, sparsity

    def pre_activation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """λ_p · (1/N) Σ_n Σ_{i∈S} ReLU(θ_i − π_ni) ‖W_dec,i‖ over the latents S that have not fired
        in `pre_act_dead_tokens` tokens (Anthropic's January 2025 update; SAELens' pre_act_loss): its
        gradient raises their pre-activations π and lowers their thresholds θ until they fire again,
        which the L0 penalty's estimator cannot do (it sees only π within ε of θ)."""
        if self.cfg.pre_act_penalty == 0:
            return x.new_zeros(())
        dead = self.dead_tracker.dead_after_tokens(self.cfg.pre_act_dead_tokens).nonzero().squeeze(1)  # [S]
        if dead.numel() == 0:
            return x.new_zeros(())
        ae = self.ae
        pre = torch.addmm(ae.b_enc[dead], x, ae.W_enc[:, dead])  # π [N, S]
        gap = (ae.threshold[dead] - pre).relu() * ae.W_dec[dead].norm(dim=1)
        return self.cfg.pre_act_penalty * gap.sum(dim=1).mean()

    def after_optimizer_step(self, step: int, x) -> None:
        with torch.no_grad():
            self.ae.threshold.clamp_(min=0.0)


# =============================================================================================
# Transcoders: features of a module's input that reconstruct its output
# =============================================================================================


@dataclass
class TranscoderFamilyConfig(TrainerConfig):
    """`activation_dim` is the width of the module's input, D_in."""

    output_dim: int | None = None
    """D_out, the width of the module's output (None: D_in)."""
    skip: bool = False
    """add a linear skip connection ŷ += x W_skipᵀ (W_skip [D_out, D_in], trained from zero)."""


class TranscoderFamilyTrainer(SAETrainer):
    """Trains on batches (x [N, D_in], y [N, D_out]), a site's (input, output) pairs
    (`ActivationBuffer(..., io="in_to_out")`). Before the first step b_dec moves to the mean of y,
    so the features start by explaining what varies."""

    def dictionary_arguments(self) -> dict:
        return {"output_dim": self.cfg.output_dim, "skip": self.cfg.skip}

    def pair(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(x [N, D_in], y [N, D_out]) of a batch of pairs; a clear error for anything else."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError(
                f"{type(self).__name__} trains on (input, output) pairs: read its site with io='in_to_out' "
                f"(got a {type(batch).__name__})"
            )
        x, y = batch
        return x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])

    def update(self, step: int, batch) -> dict[str, torch.Tensor]:
        if step == 0:
            with torch.no_grad():
                self.ae.b_dec.copy_(self.replicas.gather_rows(self.pair(batch)[1]).mean(dim=0))
        return super().update(step, batch)

    @staticmethod
    def fit_metrics(y: torch.Tensor, y_hat: torch.Tensor) -> dict[str, torch.Tensor]:
        """mse_loss = (1/N) Σ‖y − ŷ‖² and fvu = Σ‖y − ŷ‖² / Σ‖y − ȳ‖² (detached)."""
        with torch.no_grad():
            squared = (y - y_hat).pow(2).sum()
            variance = (y - y.mean(dim=0)).pow(2).sum().clamp_min(1e-30)
            return {"mse_loss": squared / len(y), "fvu": squared / variance}
