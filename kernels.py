"""Fast kernels of the sparse dictionaries and their recipes, each the exact equivalent of a dense
formula (tests/test_kernels.py checks every one against it on random inputs).

Notation: N tokens, D activation width, F latents; W_enc [D, F], b_enc [F], W_dec [F, D] (one decoder
direction per row), b_dec [D]; π = (x − b_in) W_enc + b_enc the pre-activations [N, F].

- `SparseCodes`: the nonzero features of a batch, entry by entry, instead of a dense [N, F] matrix.
- Selection: `per_token_top_k_codes` (TopK), `batch_top_k_codes` (BatchTopK, via `largest_entries`),
  `threshold_codes` (a learned threshold).
- `sparse_decode`: Σ_j f_j W_dec[j] as one embedding-bag sum, O(M·D) for M nonzeros.
- `gather_preactivations` / `attach_encoder_gradient`: π computed without autograd, then given the
  encoder's gradient: sparsely (a CSR product over the M gathered entries) or densely.
- `auxk_loss`: AuxK (Gao et al. 2024) on the dead latents, sparsely.
- `GatedEncode`: both paths of a gated SAE in one autograd Function.
- `lp_sparsity`: Σ_i f_i^p for dense or sparse features.
- `JumpReLUFunction`, `StepFunction`: JumpReLU_θ(z) and H(z − θ) with the straight-through
  pseudo-derivatives in θ of Rajamanoharan et al. 2024 (rectangle kernel of width ε).

Dense or sparse: above `DENSE_DECODE_DENSITY` of the N·F entries a dense matmul is cheaper on CPU
than a sparse sum. `prefers_dense` reads the constant at call time, so a test can patch it here.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple

import torch
import torch.nn.functional as F

# Above this fraction of nonzero features a dense [N, F] @ [F, D] matmul is cheaper than a sparse sum
# on CPU (the crossover: benchmarks/README.md).
DENSE_DECODE_DENSITY = 1 / 32


def prefers_dense(n_entries: int, n_rows: int, n_latents: int) -> bool:
    """Whether n_entries nonzeros of an [n_rows, n_latents] matrix are cheaper handled as a dense
    matrix (above DENSE_DECODE_DENSITY of the entries) than sparsely."""
    return n_entries > DENSE_DECODE_DENSITY * n_rows * n_latents


# =============================================================================================
# Sparse codes and their selection
# =============================================================================================


class SparseCodes(NamedTuple):
    """The nonzero features of N tokens, token by token: entry j is latent `columns[j]` of token
    `rows[j]`, with value `values[j]`. `rows` is non-decreasing (row-major order)."""

    values: torch.Tensor  # [M]
    rows: torch.Tensor  # [M] int64
    columns: torch.Tensor  # [M] int64
    n_rows: int  # N

    def offsets(self) -> torch.Tensor:
        """[N] position of each token's first entry (an empty token gets the next one's)."""
        return torch.searchsorted(self.rows, torch.arange(self.n_rows, device=self.rows.device))

    def to_dense(self, dict_size: int) -> torch.Tensor:
        """The features as a dense [N, F] matrix (differentiable in `values`)."""
        dense = self.values.new_zeros(self.n_rows, dict_size)
        return dense.index_put_((self.rows, self.columns), self.values)

    def detached(self) -> "SparseCodes":
        return self._replace(values=self.values.detach())


def per_token_top_k_codes(pre_activations: torch.Tensor, k: int) -> SparseCodes:
    """f_n = ReLU(TopK_k(π_n)): the k largest pre-activations of every token [N, F], then ReLU
    (ReLU commutes with the selection, so it is applied to the k kept values only)."""
    n_rows = pre_activations.shape[0]
    values, columns = pre_activations.topk(k, dim=-1, sorted=False)  # [N, k]
    rows = torch.arange(n_rows, device=columns.device).repeat_interleave(k)
    return SparseCodes(values.relu().reshape(-1), rows, columns.reshape(-1), n_rows)


def largest_entries(values: torch.Tensor, m: int, sample_stride: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The m largest entries of a 1-D tensor and their positions (unsorted): the same set as
    `values.topk(m)` up to ties, several times faster when m is a large count.

    A cutoff c is read off every `sample_stride`-th entry (the sample's (2m/stride)-th largest, so
    ~2m entries are expected to be ≥ c); if at least m entries are ≥ c, the m largest all are, and
    topk runs on those candidates only; otherwise (an unlucky sample) on everything.
    """
    sample = values[::sample_stride]
    sample_k = 2 * m // sample_stride + 8
    if m < 1024 or sample_k >= sample.numel() // 2:  # small or dense selections: plain topk
        return values.topk(m, sorted=False)
    cutoff = sample.topk(sample_k, sorted=False).values.min()
    candidates = (values >= cutoff).nonzero().squeeze(1)  # [~2m]
    if candidates.numel() < m:
        return values.topk(m, sorted=False)
    top, where = values[candidates].topk(m, sorted=False)
    return top, candidates[where]


def batch_top_k_codes(pre_activations: torch.Tensor, k: int) -> SparseCodes:
    """BatchTopK: the k·N largest pre-activations over the whole batch [N, F], then ReLU. A
    token may get more or fewer than k latents; the batch gets exactly k·N entries."""
    n_rows, dict_size = pre_activations.shape
    values, flat = largest_entries(pre_activations.flatten(), min(k * n_rows, pre_activations.numel()))
    flat, order = flat.sort()  # row-major
    return SparseCodes(values[order].relu(), flat // dict_size, flat % dict_size, n_rows)


def threshold_codes(pre_activations: torch.Tensor, threshold: torch.Tensor) -> SparseCodes:
    """f = π ⊙ 1[π > θ] for a threshold θ ≥ 0 (a scalar or one per latent [F])."""
    rows, columns = (pre_activations > threshold).nonzero(as_tuple=True)
    return SparseCodes(pre_activations[rows, columns], rows, columns, pre_activations.shape[0])


# =============================================================================================
# Decoding
# =============================================================================================


def sparse_decode(codes: SparseCodes, W_dec: torch.Tensor) -> torch.Tensor:
    """x̂_n = Σ_{j: rows_j = n} values_j · W_dec[columns_j], [N, D] (no bias).

    One embedding-bag sum over the decoder rows: O(M·D) work, no dense [N, F] matrix, and a
    backward that touches only the used rows. When more than DENSE_DECODE_DENSITY of the N·F
    features are nonzero (e.g. early in JumpReLU training), the features are scattered into a
    dense matrix and multiplied instead.
    """
    dict_size = W_dec.shape[0]
    if prefers_dense(codes.values.numel(), codes.n_rows, dict_size):
        return codes.to_dense(dict_size).to(W_dec.dtype) @ W_dec
    weight = W_dec.contiguous()
    return F.embedding_bag(
        codes.columns, weight, codes.offsets(), mode="sum", per_sample_weights=codes.values.to(weight.dtype)
    )


# =============================================================================================
# The encoder's gradient, given π computed without autograd
# =============================================================================================


class _GatherPreactivations(torch.autograd.Function):
    """π[rows, columns] of π = (x − b_in) W_enc + b_enc, with a sparse backward.

    Only the M gathered entries carry gradient g [M], so with G the [N, F] matrix holding g:

        ∂L/∂W_enc = (x − b_in)ᵀ G     (computed as (Gᵀ (x − b_in))ᵀ: a CSR [F, N] × dense [N, D] product)
        ∂L/∂b_enc = Σ_n G[n]           (per-latent sums)
        ∂L/∂b_in  = −W_enc Σ_n G[n]    (one [D, F] × [F] product)

    instead of the dense [D, N] × [N, F] matmul autograd would do through π (which it falls back
    to when more than DENSE_DECODE_DENSITY of the entries are gathered).
    """

    @staticmethod
    def forward(ctx, pre, encoder_input, W_enc, b_enc, input_bias, rows, columns):
        ctx.save_for_backward(encoder_input, W_enc, rows, columns)
        ctx.has_input_bias = input_bias is not None
        return pre[rows, columns]

    @staticmethod
    def backward(ctx, grad):
        encoder_input, W_enc, rows, columns = ctx.saved_tensors
        n_rows, n_latents = encoder_input.shape[0], W_enc.shape[1]
        grad = grad.to(encoder_input.dtype)
        grad_bias = torch.zeros(n_latents, dtype=grad.dtype, device=grad.device).index_add_(0, columns, grad)
        grad_weight = None
        if ctx.needs_input_grad[2] and prefers_dense(columns.numel(), n_rows, n_latents):
            grad_matrix = torch.zeros(n_rows, n_latents, dtype=grad.dtype, device=grad.device)
            grad_weight = encoder_input.T @ grad_matrix.index_put_((rows, columns), grad, accumulate=True)
        elif ctx.needs_input_grad[2]:
            order = torch.argsort(columns, stable=True)
            row_pointers = torch.zeros(n_latents + 1, dtype=torch.long, device=grad.device)
            row_pointers[1:] = torch.cumsum(torch.bincount(columns, minlength=n_latents), 0)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
                grad_matrix_t = torch.sparse_csr_tensor(
                    row_pointers, rows[order], grad[order], (n_latents, n_rows), check_invariants=False,
                )
            grad_weight = (grad_matrix_t @ encoder_input).T  # [D, F]
        grad_input_bias = -(W_enc @ grad_bias) if ctx.has_input_bias and ctx.needs_input_grad[4] else None
        grad_bias = grad_bias if ctx.needs_input_grad[3] else None
        return None, None, grad_weight, grad_bias, grad_input_bias, None, None


def gather_preactivations(
    pre_activations: torch.Tensor,
    encoder_input: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    input_bias: torch.Tensor | None,
    rows: torch.Tensor,
    columns: torch.Tensor,
) -> torch.Tensor:
    """π[rows, columns], [M], differentiable in the encoder weights through a sparse backward.

    pre_activations [N, F] = encoder_input W_enc + b_enc, computed by the caller without autograd;
    encoder_input [N, D] is x − b_in (b_in = `input_bias`, e.g. b_dec, or None when the input is
    not centred).
    """
    return _GatherPreactivations.apply(pre_activations, encoder_input, W_enc, b_enc, input_bias, rows, columns)


class _AttachEncoderGradient(torch.autograd.Function):
    """π itself [N, F], computed without autograd, given the encoder's gradient: with G = ∂L/∂π,
    ∂L/∂W_enc = (x − b_in)ᵀ G, ∂L/∂b_enc = Σ_n G[n], ∂L/∂b_in = −W_enc Σ_n G[n]. The dense
    counterpart of _GatherPreactivations, for when most entries matter."""

    @staticmethod
    def forward(ctx, pre, encoder_input, W_enc, b_enc, input_bias):
        ctx.save_for_backward(encoder_input, W_enc)
        ctx.has_input_bias = input_bias is not None
        return pre.view_as(pre)

    @staticmethod
    def backward(ctx, grad):
        encoder_input, W_enc = ctx.saved_tensors
        grad = grad.to(encoder_input.dtype)
        grad_bias = grad.sum(dim=0)
        grad_weight = encoder_input.T @ grad if ctx.needs_input_grad[2] else None
        grad_input_bias = -(W_enc @ grad_bias) if ctx.has_input_bias and ctx.needs_input_grad[4] else None
        return None, None, grad_weight, grad_bias if ctx.needs_input_grad[3] else None, grad_input_bias


def attach_encoder_gradient(
    pre_activations: torch.Tensor,
    encoder_input: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    input_bias: torch.Tensor | None,
) -> torch.Tensor:
    """π [N, F] (computed by the caller without autograd) made differentiable in the encoder
    weights, as if it were (x − b_in) W_enc + b_enc, without recomputing it."""
    return _AttachEncoderGradient.apply(pre_activations, encoder_input, W_enc, b_enc, input_bias)


# =============================================================================================
# AuxK
# =============================================================================================


def auxk_loss(
    pre_activations: torch.Tensor,
    encoder_input: torch.Tensor,
    W_enc: torch.Tensor,
    b_enc: torch.Tensor,
    W_dec: torch.Tensor,
    dead_mask: torch.Tensor,
    residual: torch.Tensor,
    k_aux: int,
    mean_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """AuxK (Gao et al. 2024, A.2): reconstruct the main model's error e = x − x̂ (detached) from
    the top-`k_aux` dead latents of each token, sparsely:

        ê = Σ_{i ∈ TopK_aux(π[dead])} ReLU(π_i) W_dec[i],   L_aux = ‖e − ê‖² / ‖e − ē‖²

    (sums over the batch; ē the batch mean of e). pre_activations [N, F] (no grad), encoder_input
    [N, D] = x − b_dec, dead_mask [F] bool, residual [N, D]. Gradient reaches only the dead latents'
    encoder columns, encoder biases and decoder rows (b_dec is held fixed here). Returns 0 when no
    latent is dead. `mean_variance`: ‖e − ē‖²'s mean over tokens when computed elsewhere (over the
    global batch of data-parallel training); the loss is then the same ratio of per-token means,
    (1/N) Σ_n ‖e_n − ê_n‖² / mean_variance.
    """
    dead = dead_mask.nonzero().squeeze(-1)
    if dead.numel() == 0:
        return pre_activations.new_zeros(())
    n_rows = pre_activations.shape[0]
    k = min(k_aux, dead.numel())
    _, positions = pre_activations.index_select(1, dead).topk(k, dim=1, sorted=False)  # [N, k]
    rows = torch.arange(n_rows, device=dead.device).repeat_interleave(k)
    columns = dead[positions].reshape(-1)
    values = gather_preactivations(pre_activations, encoder_input.detach(), W_enc, b_enc, None, rows, columns).relu()
    residual_hat = sparse_decode(SparseCodes(values, rows, columns, n_rows), W_dec)
    residual = residual.detach()
    if mean_variance is not None:
        return (residual_hat - residual).pow(2).sum() / n_rows / mean_variance.clamp_min(1e-12 / n_rows)
    total_variance = (residual - residual.mean(dim=0)).pow(2).sum()
    return (residual_hat - residual).pow(2).sum() / total_variance.clamp_min(1e-12)


# =============================================================================================
# The gated encoder
# =============================================================================================


def zero_where_not_positive(values: torch.Tensor, mask_source: torch.Tensor, out: torch.Tensor | None = None):
    """values ⊙ 1[mask_source > 0] in one pass with no bool temporary (ReLU's backward kernel;
    `out` may be `values` itself). Several times faster on CPU than masked_fill or torch.where."""
    if out is None:
        return torch.ops.aten.threshold_backward(values, mask_source, 0.0)
    return torch.ops.aten.threshold_backward.grad_input(values, mask_source, 0.0, grad_input=out)


class GatedEncode(torch.autograd.Function):
    """(f, g) = (1[π_gate > 0] ⊙ ReLU(π_mag), ReLU(π_gate)) with z = x W_gate [N, F],
    π_gate = z + c_gate and π_mag = s ⊙ z + c_mag (s = exp(r_mag); c_gate, c_mag, r_mag: [F]).

    z is computed by the caller without autograd and consumed (its storage becomes g); forward
    is three [N, F] passes. Backward, with δ_mag = ∂f ⊙ 1[f > 0] and δ_gate = ∂g ⊙ 1[g > 0]:
    ∂z = δ_gate + s ⊙ δ_mag, ∂W_gate = xᵀ ∂z, ∂c_gate = Σ_n δ_gate, ∂c_mag = Σ_n δ_mag,
    ∂r_mag = Σ_n δ_mag ⊙ s ⊙ z = Σ_n δ_mag ⊙ (f − c_mag) (where δ_mag ≠ 0, f = π_mag), so z is
    never stored.
    """

    @staticmethod
    def forward(ctx, z, x, W_gate, gate_bias, r_mag, mag_bias):
        scale = r_mag.exp()
        f = torch.addcmul(mag_bias, z, scale).relu_()  # ReLU(π_mag)
        gate = z.add_(gate_bias).relu_()  # ReLU(π_gate), in z's storage
        zero_where_not_positive(f, gate, out=f)
        ctx.save_for_backward(x, W_gate, scale, mag_bias, f, gate)
        return f, gate

    @staticmethod
    def backward(ctx, grad_f, grad_gate):
        x, W_gate, scale, mag_bias, f, gate = ctx.saved_tensors
        delta_mag = zero_where_not_positive(grad_f, f)  # [N, F]
        delta = zero_where_not_positive(grad_gate, gate)  # δ_gate, then ∂z in place
        grad_gate_bias = delta.sum(0)
        grad_mag_bias = delta_mag.sum(0)
        grad_r_mag = (delta_mag * f).sum(0) - mag_bias * grad_mag_bias
        delta.addcmul_(delta_mag, scale)
        grad_x = delta @ W_gate.T if ctx.needs_input_grad[1] else None
        grad_weight = x.T @ delta if ctx.needs_input_grad[2] else None
        return None, grad_x, grad_weight, grad_gate_bias, grad_r_mag, grad_mag_bias


# =============================================================================================
# Sparsity penalties
# =============================================================================================


def lp_sparsity(f: torch.Tensor | SparseCodes, p: float, kind: str = "Lp^p") -> torch.Tensor:
    """(1/N) Σ_n S_p(f_n) for non-negative features f, dense [..., F] or SparseCodes of N tokens:
    S_p = Σ_i f_i^p ("Lp^p") or (Σ_i f_i^p)^(1/p) ("Lp").

    Where f_i = 0 the derivative p·f_i^(p−1) is infinite, but the ReLU in front of f passes no
    gradient there (its backward masks rather than multiplies), so the gradient stays finite.
    """
    values = f.values if isinstance(f, SparseCodes) else f
    powered = values if p == 1.0 else values.pow(p)
    per_entry_sum = kind != "Lp" or p == 1.0  # S_p is a plain sum over the entries
    if isinstance(f, SparseCodes):
        if per_entry_sum:
            return powered.sum() / f.n_rows
        per_token = powered.new_zeros(f.n_rows).index_add(0, f.rows, powered)
    else:
        per_token = powered.sum(dim=-1)
    if not per_entry_sum:
        per_token = per_token.pow(1.0 / p)
    return per_token.mean()


# =============================================================================================
# JumpReLU's straight-through estimators
# =============================================================================================


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[−1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """JumpReLU_θ(z) = z ⊙ H(z − θ) with the pseudo-derivative −(θ/ε) K((z − θ)/ε) in θ
    (θ broadcasts against z; its gradient is summed back to θ's shape)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_z = grad * (z > threshold)
        grad_threshold = -(threshold / bandwidth) * rectangle((z - threshold) / bandwidth) * grad
        return grad_z, grad_threshold.sum_to_size(threshold.shape), None


class StepFunction(torch.autograd.Function):
    """H(z − θ) with the pseudo-derivative −(1/ε) K((z − θ)/ε) in θ and none in z."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_threshold = -(1.0 / bandwidth) * rectangle((z - threshold) / bandwidth) * grad
        return None, grad_threshold.sum_to_size(threshold.shape), None
