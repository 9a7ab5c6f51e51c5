"""TopK SAEs (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

The dictionary (AutoEncoderTopK) keeps exactly k latents per token:

    π = W_enc (x − b_dec) + b_enc,   f = ReLU(TopK_k(π)),   x̂ = W_dec f + b_dec

and is trained on the reconstruction error alone, plus the AuxK auxiliary loss (appendix A.2)
that revives dead latents:

    L = (1/N) Σ_n ‖x_n − x̂_n‖²  +  α · L_aux,        α = 1/32
    e = x − x̂ (held fixed),   ê = W_dec[:, dead] ReLU(TopK_{k_aux}(π[dead]))   (no bias)
    L_aux = ‖e − ê‖² / ‖e − ē‖²        (sums over the batch; ē the batch mean of e)

where "dead" latents have not fired in `dead_tokens_threshold` (10M) tokens and k_aux = D/2
(a heuristic of saprmarks/dictionary_learning; the paper used 512). Only dead latents' encoder
rows, encoder biases and decoder columns receive L_aux's gradient.

Initialisation (appendix A.1): unit-norm decoder columns, W_enc = W_decᵀ, b_enc = 0, and b_dec at
the geometric median of the first batch (Weiszfeld's algorithm). The decoder columns stay at unit
norm: the gradient component along each column is removed before the Adam step and the column
is renormalised after it. Adam uses β = (0.9, 0.999) and ε = 6.25e-10 (the paper's code); the LR
defaults to 2e-4 / √(F / 2¹⁴) (the paper's 1/√F scaling law, Figure 3), warms up linearly over
`warmup_steps` and decays linearly to 0 over the last 20% of training unless `decay_start` says
otherwise.

Inference threshold: from `threshold_start_step` on, θ tracks the mean over tokens of the smallest
kept activation, as a bias-corrected exponential moving average (see RunningThreshold); it is
stored in the dictionary's `threshold` buffer and used by `encode(x, use_threshold=True)`.

Speed: π is one dense matmul (done without autograd); everything after the top-k is sparse.
The decoder is an embedding-bag sum over the k kept latents (`sparse_decode`), and the encoder's
backward is a sparse-transpose-times-dense product over the kept entries
(`gather_preactivations`), so a step costs about two [N, D] × [D, F] matmuls plus the top-k.

This module also holds what BatchTopK and Matryoshka share: `geometric_median`,
`RunningThreshold`, `gather_preactivations`, `sparse_auxk_loss` and the trainer itself.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dictionary import DENSE_DECODE_DENSITY, AutoEncoderTopK, SparseCodes, sparse_decode
from .base import ConstrainedAdam, LossOutput, SAETrainer, TrainerConfig, lr_multiplier

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 6.25e-10
DECAY_FRACTION = 0.2  # linear LR decay over the last 20% of the steps when decay_start is None


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


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


def prefers_dense(n_entries: int, n_rows: int, n_latents: int) -> bool:
    """Whether n_entries nonzeros of an [n_rows, n_latents] matrix are cheaper handled as a dense
    matrix (above DENSE_DECODE_DENSITY of the entries) than sparsely."""
    return n_entries > DENSE_DECODE_DENSITY * n_rows * n_latents


class _GatherPreactivations(torch.autograd.Function):
    """pre[rows, columns] of pre = (x − b_in) W_encᵀ + b_enc, with a sparse backward.

    Only the M gathered entries carry gradient g [M], so with G the [N, F] matrix holding g:

        ∂L/∂W_enc = Gᵀ (x − b_in)       (a CSR [F, N] × dense [N, D] product, O(M·D))
        ∂L/∂b_enc = Σ_n G[n]             (per-latent sums)
        ∂L/∂b_in  = −(Σ_n G[n]) W_enc    (one [F] × [F, D] vector-matrix product)

    instead of the dense [F, N] × [N, D] matmul autograd would do through π (which it falls back
    to when more than DENSE_DECODE_DENSITY of the entries are gathered).
    """

    @staticmethod
    def forward(ctx, pre, encoder_input, encoder_rows, encoder_bias, input_bias, rows, columns):
        ctx.save_for_backward(encoder_input, encoder_rows, rows, columns)
        ctx.has_input_bias = input_bias is not None
        return pre[rows, columns]

    @staticmethod
    def backward(ctx, grad):
        encoder_input, encoder_rows, rows, columns = ctx.saved_tensors
        n_rows, n_latents = encoder_input.shape[0], encoder_rows.shape[0]
        grad = grad.to(encoder_input.dtype)
        grad_bias = torch.zeros(n_latents, dtype=grad.dtype, device=grad.device).index_add_(0, columns, grad)
        grad_rows = None
        if ctx.needs_input_grad[2] and prefers_dense(columns.numel(), n_rows, n_latents):
            grad_matrix = torch.zeros(n_rows, n_latents, dtype=grad.dtype, device=grad.device)
            grad_rows = grad_matrix.index_put_((rows, columns), grad, accumulate=True).T @ encoder_input
        elif ctx.needs_input_grad[2]:
            order = torch.argsort(columns, stable=True)
            row_pointers = torch.zeros(n_latents + 1, dtype=torch.long, device=grad.device)
            row_pointers[1:] = torch.cumsum(torch.bincount(columns, minlength=n_latents), 0)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                grad_matrix_t = torch.sparse_csr_tensor(
                    row_pointers, rows[order], grad[order], (n_latents, n_rows),
                    check_invariants=False,
                )
            grad_rows = grad_matrix_t @ encoder_input  # [F, D]
        grad_input_bias = -(grad_bias @ encoder_rows) if ctx.has_input_bias and ctx.needs_input_grad[4] else None
        grad_bias = grad_bias if ctx.needs_input_grad[3] else None
        return None, None, grad_rows, grad_bias, grad_input_bias, None, None


def gather_preactivations(
    pre_activations: torch.Tensor,
    encoder_input: torch.Tensor,
    encoder_rows: torch.Tensor,
    encoder_bias: torch.Tensor,
    input_bias: torch.Tensor | None,
    rows: torch.Tensor,
    columns: torch.Tensor,
) -> torch.Tensor:
    """π[rows, columns], [M], differentiable in the encoder weights through a sparse backward.

    pre_activations [N, F] = encoder_input W_encᵀ + encoder_bias, computed by the caller without
    autograd; encoder_input [N, D] is x − b_in (b_in = `input_bias`, e.g. b_dec, or None when
    the input is not centred), encoder_rows W_enc [F, D].
    """
    return _GatherPreactivations.apply(
        pre_activations, encoder_input, encoder_rows, encoder_bias, input_bias, rows, columns
    )


class _AttachEncoderGradient(torch.autograd.Function):
    """π itself [N, F], computed without autograd, given the encoder's gradient: with G = ∂L/∂π,
    ∂L/∂W_enc = Gᵀ (x − b_in), ∂L/∂b_enc = Σ_n G[n], ∂L/∂b_in = −(Σ_n G[n]) W_enc. The dense
    counterpart of _GatherPreactivations, for when most entries matter."""

    @staticmethod
    def forward(ctx, pre, encoder_input, encoder_rows, encoder_bias, input_bias):
        ctx.save_for_backward(encoder_input, encoder_rows)
        ctx.has_input_bias = input_bias is not None
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, grad):
        encoder_input, encoder_rows = ctx.saved_tensors
        grad = grad.to(encoder_input.dtype)
        grad_bias = grad.sum(dim=0)
        grad_rows = grad.T @ encoder_input if ctx.needs_input_grad[2] else None
        grad_input_bias = -(grad_bias @ encoder_rows) if ctx.has_input_bias and ctx.needs_input_grad[4] else None
        return None, None, grad_rows, grad_bias if ctx.needs_input_grad[3] else None, grad_input_bias


def attach_encoder_gradient(
    pre_activations: torch.Tensor,
    encoder_input: torch.Tensor,
    encoder_rows: torch.Tensor,
    encoder_bias: torch.Tensor,
    input_bias: torch.Tensor | None,
) -> torch.Tensor:
    """π [N, F] (computed by the caller without autograd) made differentiable in the encoder
    weights, as if it were F.linear(x − b_in, W_enc, b_enc), without recomputing it."""
    return _AttachEncoderGradient.apply(pre_activations, encoder_input, encoder_rows, encoder_bias, input_bias)


def sparse_auxk_loss(
    pre_activations: torch.Tensor,
    encoder_input: torch.Tensor,
    encoder_rows: torch.Tensor,
    encoder_bias: torch.Tensor,
    decoder_rows: torch.Tensor,
    dead_mask: torch.Tensor,
    residual: torch.Tensor,
    k_aux: int,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024, A.2): reconstruct the main model's error e = x − x̂ (detached) from
    the top-`k_aux` dead latents of each token, sparsely:

        ê = W_dec[:, dead] ReLU(TopK_aux(π[dead])),   L_aux = ‖e − ê‖² / ‖e − ē‖²

    pre_activations [N, F] (no grad), encoder_input [N, D] = x − b_dec, encoder_rows [F, D],
    decoder_rows [F, D], dead_mask [F] bool, residual [N, D]. Gradient reaches only the dead
    latents' encoder rows, encoder biases and decoder rows (b_dec is held fixed here).
    Returns 0 when no latent is dead.
    """
    dead = dead_mask.nonzero().squeeze(-1)
    if dead.numel() == 0:
        return pre_activations.new_zeros(())
    n_rows = pre_activations.shape[0]
    k = min(k_aux, dead.numel())
    _, positions = pre_activations.index_select(1, dead).topk(k, dim=1, sorted=False)  # [N, k]
    rows = torch.arange(n_rows, device=dead.device).repeat_interleave(k)
    columns = dead[positions].reshape(-1)
    values = gather_preactivations(
        pre_activations, encoder_input.detach(), encoder_rows, encoder_bias, None, rows, columns
    ).relu()
    residual_hat = sparse_decode(SparseCodes(values, rows, columns, n_rows), decoder_rows)
    residual = residual.detach()
    total_variance = (residual - residual.mean(dim=0)).pow(2).sum()
    return (residual_hat - residual).pow(2).sum() / total_variance.clamp_min(1e-12)


# --------------------------------------------------------------------------------------------
# The trainer
# --------------------------------------------------------------------------------------------


@dataclass
class TopKTrainerConfig(TrainerConfig):
    k: int | None = None  # active latents per token (required)
    auxk_alpha: float = 1 / 32  # α, the weight of AuxK (0 turns it off)
    k_aux: int | None = None  # dead latents per token in AuxK; None: activation_dim // 2
    dead_tokens_threshold: int = 10_000_000  # a latent is dead after this many tokens unfired
    threshold_beta: float = 0.999  # β of the inference threshold's moving average
    threshold_start_step: int = 1000  # first step whose batch updates the inference threshold
    grad_clip_norm: float | None = None  # clip the global gradient norm (None: no clipping)


class TopKTrainer(SAETrainer):
    """Trains an AutoEncoderTopK (see the module docstring for the method)."""

    Config = TopKTrainerConfig
    dictionary_class = AutoEncoderTopK

    def __init__(self, config: TopKTrainerConfig):
        super().__init__(config)
        self._check_config()
        self.ae = self.build_dictionary().to(self.device)
        decoder_weight, norm_dim = self.constrained_decoder()
        self.optimizer = ConstrainedAdam(
            self.ae.parameters(), [decoder_weight], lr=self.lr, betas=ADAM_BETAS, eps=ADAM_EPS, norm_dim=norm_dim
        )
        self.k_aux = config.k_aux if config.k_aux is not None else max(1, config.activation_dim // 2)
        self.running_threshold = RunningThreshold(config.threshold_beta, self.device)

    def _check_config(self) -> None:
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
        if cfg.dead_tokens_threshold <= 0:
            raise ValueError(
                f"{name}: dead_tokens_threshold must be a positive token count, got {cfg.dead_tokens_threshold}"
            )
        if cfg.grad_clip_norm is not None and cfg.grad_clip_norm <= 0:
            raise ValueError(f"{name}: grad_clip_norm must be positive or None, got {cfg.grad_clip_norm}")
        if cfg.steps is not None and cfg.threshold_start_step >= cfg.steps:
            warnings.warn(
                f"{name}: threshold_start_step={cfg.threshold_start_step} >= steps={cfg.steps}, so no "
                "inference threshold will be learned; lower threshold_start_step to learn one",
                stacklevel=3,
            )

    # -- what BatchTopK and Matryoshka override ----------------------------------------------
    def build_dictionary(self):
        return self.dictionary_class(self.cfg.activation_dim, self.cfg.dict_size, self.cfg.k)

    def constrained_decoder(self) -> tuple[torch.Tensor, int]:
        """The decoder weight kept at unit norm and the axis of its directions."""
        return self.ae.decoder.weight, 0  # [D, F]: columns

    def reconstruction_loss(self, x: torch.Tensor, codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """(loss, residual x − x̂ [N, D], extra metrics) for x [N, D] and its features."""
        x_hat = sparse_decode(codes, self.ae.decoder_rows) + self.ae.b_dec
        residual = x - x_hat
        return residual.pow(2).sum(dim=-1).mean(), residual, {}

    def threshold_statistic(self, codes: SparseCodes) -> torch.Tensor:
        """The mean over tokens of the smallest positive kept activation (NaN if none is)."""
        values = codes.values.detach().reshape(codes.n_rows, -1)  # [N, k]
        smallest = values.masked_fill(values <= 0, math.inf).min(dim=1).values
        smallest = smallest[torch.isfinite(smallest)]
        return smallest.mean() if smallest.numel() else values.new_tensor(math.nan)

    # -- the method ---------------------------------------------------------------------------
    def default_learning_rate(self) -> float:
        return 2e-4 / math.sqrt(self.cfg.dict_size / 2**14)

    def lr_multiplier(self, step: int) -> float:
        decay_start = self.cfg.decay_start
        if decay_start is None and self.cfg.steps is not None:
            decay_start = int(self.cfg.steps * (1 - DECAY_FRACTION))
        return lr_multiplier(step, self.cfg.warmup_steps, decay_start, self.cfg.steps)

    def training_codes(self, x: torch.Tensor) -> tuple[SparseCodes, torch.Tensor, torch.Tensor]:
        """(codes, π [N, F], x − b_dec [N, D]) for x [N, D]: the top-k selection with values
        differentiable through the sparse encoder backward."""
        ae = self.ae
        encoder_input = x - ae.b_dec.detach()
        with torch.no_grad():
            pre = F.linear(encoder_input, ae.encoder_rows, ae.encoder_bias)
            codes = ae.select(pre, use_threshold=False)
        values = gather_preactivations(
            pre, encoder_input, ae.encoder_rows, ae.encoder_bias, ae.b_dec, codes.rows, codes.columns
        ).relu()
        return codes._replace(values=values), pre, encoder_input

    def dead_latent_mask(self) -> torch.Tensor:
        return self.dead_tracker.dead_after_tokens(self.cfg.dead_tokens_threshold)

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x = x.reshape(-1, self.cfg.activation_dim)
        codes, pre, encoder_input = self.training_codes(x)
        recon_loss, residual, metrics = self.reconstruction_loss(x, codes)
        loss = recon_loss
        dead_mask = self.dead_latent_mask()
        if self.cfg.auxk_alpha > 0:
            aux = sparse_auxk_loss(
                pre, encoder_input, self.ae.encoder_rows, self.ae.encoder_bias, self.ae.decoder_rows,
                dead_mask, residual, self.k_aux,
            )
            loss = loss + self.cfg.auxk_alpha * aux
            metrics["auxk_loss"] = aux.detach()
        features = codes._replace(values=codes.values.detach())
        metrics.update(
            mse_loss=residual.detach().pow(2).sum(dim=-1).mean(),
            loss=loss.detach(),
            l0=(codes.values.detach() > 0).sum() / codes.n_rows,
            dead_latents=dead_mask.sum(),
            min_kept_activation=self.threshold_statistic(codes),
        )
        return LossOutput(loss, features, metrics)

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """One step; at step 0, b_dec first moves to the geometric median of the batch. From
        `threshold_start_step` on, the batch's smallest kept activation updates θ."""
        if step == 0:
            with torch.no_grad():
                self.ae.b_dec.copy_(geometric_median(x.reshape(-1, self.cfg.activation_dim)))
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
