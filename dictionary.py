"""Dictionaries (sparse autoencoders): f = encode(x), x̂ = decode(f).

Every dictionary class of the library lives in this file. Each one is an `nn.Module` with
`encode`, `decode`, `forward(x, output_features=False)`, `activation_dim`, `dict_size`, and
`from_pretrained(path, dtype=None, device=None)`. Inputs may be [B, D] or [B, L, D]; every
operation acts on the last dimension.
"""
from __future__ import annotations

import math
import os
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import load_state_dict


class Dictionary(nn.Module, ABC):
    """Base class: a map between activations x ∈ R^D and features f ∈ R^F."""

    activation_dim: int
    dict_size: int

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> f [..., F]"""

    @abstractmethod
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., F] -> x̂ [..., D]"""

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """x̂ = decode(encode(x)); with `output_features`, returns (x̂, f)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def scale_biases(self, factor: float) -> None:
        """Multiply every bias and threshold by `factor` (in place).

        A dictionary trained on inputs s·x becomes, after `scale_biases(1/s)`, one that takes raw x
        and returns x̂/s·s = the raw-space reconstruction (its features are scaled by 1/s). Used to
        fold activation normalisation into saved weights.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement scale_biases")

    @classmethod
    def shape_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict:
        """Constructor arguments (activation_dim, dict_size, ...) read off the weights' shapes."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> "Dictionary":
        """Build a dictionary whose shapes are inferred from `state_dict` and load the weights.

        Raises ValueError naming the missing, unexpected or mis-shaped keys.
        """
        try:
            init_args = cls.shape_from_state_dict(state_dict)
        except KeyError as e:
            raise ValueError(
                f"not a {cls.__name__} state_dict: key {e.args[0]!r} is missing "
                f"(found keys: {sorted(state_dict)})"
            ) from None
        init_args.update(kwargs)
        with torch.device("meta"):
            dictionary = cls(**init_args)
        expected = dictionary.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"not a {cls.__name__} state_dict: missing keys {missing}, unexpected keys "
                f"{unexpected}; a {cls.__name__} has keys {sorted(expected)}"
            )
        wrong_shapes = [
            f"{k}: expected {tuple(v.shape)}, found {tuple(state_dict[k].shape)}"
            for k, v in expected.items()
            if v.shape != state_dict[k].shape
        ]
        if wrong_shapes:
            raise ValueError(f"{cls.__name__} weights have inconsistent shapes: {'; '.join(wrong_shapes)}")
        dictionary.load_state_dict(state_dict, assign=True)
        return dictionary

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Dictionary":
        """Load a dictionary from a `.pt` state_dict (torch.save) or a `.safetensors` file.

        Shapes are inferred from the weights. `dtype` casts floating-point tensors; `device` moves
        them; either works alone.
        """
        state_dict = load_state_dict(path)
        try:
            dictionary = cls.from_state_dict(state_dict, **kwargs)
        except ValueError as e:
            raise ValueError(f"cannot load {str(path)!r} as {cls.__name__}: {e}") from None
        if dtype is not None or device is not None:
            dictionary = dictionary.to(device=device, dtype=dtype)
        return dictionary


def _unit_norm_columns(weight: torch.Tensor) -> torch.Tensor:
    """weight [D, F] with each column scaled to unit L2 norm."""
    return weight / weight.norm(dim=0, keepdim=True).clamp_min(1e-12)


class AutoEncoder(Dictionary):
    """The standard one-layer SAE (Towards Monosemanticity):

        f = ReLU(W_enc (x − b_dec) + b_enc),   x̂ = W_dec f + b_dec

    State-dict keys (compatible with the published Pythia-70m dictionaries):
    `bias` = b_dec [D], `encoder.weight` = W_enc [F, D], `encoder.bias` = b_enc [F],
    `decoder.weight` = W_dec [D, F]. Decoder columns start unit-norm and W_enc starts as W_decᵀ.
    """

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        if self.bias.device.type != "meta":
            with torch.no_grad():
                self.decoder.weight.copy_(_unit_norm_columns(torch.randn(activation_dim, dict_size)))
                self.encoder.weight.copy_(self.decoder.weight.T)
                self.encoder.bias.zero_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x − b_dec) + b_enc = W_enc x + (b_enc − W_enc b_dec), [..., F].

        The second form needs no [..., D] copy of x and no gradient back into it: ∂/∂b_dec is a
        matrix-vector product instead of a full [N, F] × [F, D] matmul.
        """
        return F.linear(x, self.encoder.weight, self.encoder.bias - self.encoder.weight @ self.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.pre_activations(x))  # in place: π is a fresh tensor nobody else holds

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f) + self.bias

    def ghost_reconstruction(self, x: torch.Tensor, ghost_mask: torch.Tensor) -> torch.Tensor:
        """W_dec[:, dead] exp(W_enc[dead] (x − b_dec) + b_enc[dead]), [..., D].

        Only the latents in `ghost_mask` [F] (bool) take part, so gradients through this output reach
        only their encoder rows, encoder biases and decoder columns (b_dec is held fixed here).
        """
        dead = ghost_mask.nonzero().squeeze(-1)
        pre = F.linear(x - self.bias.detach(), self.encoder.weight[dead], self.encoder.bias[dead])
        return F.linear(torch.exp(pre), self.decoder.weight[:, dead])

    def forward(self, x: torch.Tensor, output_features: bool = False, ghost_mask: torch.Tensor | None = None):
        """x̂ (and f with `output_features`). With `ghost_mask` [F] (bool), also the ghost
        reconstruction of the masked latents: returns (x̂, x̂_ghost) or (x̂, x̂_ghost, f)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        if ghost_mask is None:
            return (x_hat, f) if output_features else x_hat
        x_ghost = self.ghost_reconstruction(x, ghost_mask)
        return (x_hat, x_ghost, f) if output_features else (x_hat, x_ghost)

    def scale_biases(self, factor: float) -> None:
        with torch.no_grad():
            self.bias.mul_(factor)
            self.encoder.bias.mul_(factor)

    @classmethod
    def shape_from_state_dict(cls, state_dict):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return {"activation_dim": activation_dim, "dict_size": dict_size}


class IdentityDict(Dictionary):
    """The no-op dictionary f = x, x̂ = f: the baseline for evaluation (it recovers everything)."""

    def __init__(self, activation_dim: int):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = activation_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def scale_biases(self, factor: float) -> None:
        pass

    @classmethod
    def from_pretrained(cls, path=None, dtype=None, device=None, activation_dim: int | None = None):
        if activation_dim is None:
            raise ValueError("IdentityDict has no weights to load; construct it with IdentityDict(activation_dim)")
        return cls(activation_dim)


# --------------------------------------------------------------------------------------------
# Gated SAE (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
# Autoencoders")
# --------------------------------------------------------------------------------------------


def _zero_where_not_positive(values: torch.Tensor, mask_source: torch.Tensor, out: torch.Tensor | None = None):
    """values ⊙ 1[mask_source > 0] in one pass with no bool temporary (ReLU's backward kernel;
    `out` may be `values` itself). Several times faster on CPU than masked_fill or torch.where."""
    if out is None:
        return torch.ops.aten.threshold_backward(values, mask_source, 0.0)
    return torch.ops.aten.threshold_backward.grad_input(values, mask_source, 0.0, grad_input=out)


class GatedEncode(torch.autograd.Function):
    """(f, g) = (1[π_gate > 0] ⊙ ReLU(π_mag), ReLU(π_gate)) with z = x W_gateᵀ [N, F],
    π_gate = z + c_gate and π_mag = s ⊙ z + c_mag (s = exp(r_mag); c_gate, c_mag, r_mag: [F]).

    z is computed by the caller without autograd and consumed (its storage becomes g); forward
    is three [N, F] passes. Backward, with δ_mag = ∂f ⊙ 1[f > 0] and δ_gate = ∂g ⊙ 1[g > 0]:
    ∂z = δ_gate + s ⊙ δ_mag, ∂W_gate = ∂zᵀ x, ∂c_gate = Σ_n δ_gate, ∂c_mag = Σ_n δ_mag,
    ∂r_mag = Σ_n δ_mag ⊙ s ⊙ z = Σ_n δ_mag ⊙ (f − c_mag) (where δ_mag ≠ 0, f = π_mag), so z is
    never stored. Matches autograd through the plain formula (tests/test_dictionary.py).
    """

    @staticmethod
    def forward(ctx, z, x, weight, gate_bias, r_mag, mag_bias):
        scale = r_mag.exp()
        f = torch.addcmul(mag_bias, z, scale).relu_()  # ReLU(π_mag)
        gate = z.add_(gate_bias).relu_()  # ReLU(π_gate), in z's storage
        _zero_where_not_positive(f, gate, out=f)
        ctx.save_for_backward(x, weight, scale, mag_bias, f, gate)
        return f, gate

    @staticmethod
    def backward(ctx, grad_f, grad_gate):
        x, weight, scale, mag_bias, f, gate = ctx.saved_tensors
        delta_mag = _zero_where_not_positive(grad_f, f)  # [N, F]
        delta = _zero_where_not_positive(grad_gate, gate)  # δ_gate, then ∂z in place
        grad_gate_bias = delta.sum(0)
        grad_mag_bias = delta_mag.sum(0)
        grad_r_mag = (delta_mag * f).sum(0) - mag_bias * grad_mag_bias
        delta.addcmul_(delta_mag, scale)
        grad_x = delta @ weight if ctx.needs_input_grad[1] else None
        grad_weight = delta.T @ x if ctx.needs_input_grad[2] else None
        return None, grad_x, grad_weight, grad_gate_bias, grad_r_mag, grad_mag_bias


class GatedAutoEncoder(Dictionary):
    """A gated SAE: a gate path decides WHICH latents fire, a magnitude path HOW MUCH.

        π_gate = W_gate (x − b_dec) + b_gate                      [..., F]
        π_mag  = W_mag (x − b_dec) + b_mag,  W_mag = exp(r_mag) ⊙ W_gate  (row i scaled by exp(r_mag_i))
        f      = 1[π_gate > 0] ⊙ ReLU(π_mag),    x̂ = W_dec f + b_dec

    The two paths share their weights up to a per-latent scale, so a gated SAE has only 2F more
    parameters than a standard one. State-dict keys are those of saprmarks/dictionary_learning:
    `decoder_bias` = b_dec [D], `encoder.weight` = W_gate [F, D], `r_mag` [F], `gate_bias` [F],
    `mag_bias` [F], `decoder.weight` = W_dec [D, F]. Initialisation: unit-norm random decoder
    columns, W_gate = W_decᵀ, every bias and r_mag zero.
    """

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.decoder_bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=False)
        self.r_mag = nn.Parameter(torch.zeros(dict_size))
        self.gate_bias = nn.Parameter(torch.zeros(dict_size))
        self.mag_bias = nn.Parameter(torch.zeros(dict_size))
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        if self.decoder_bias.device.type != "meta":
            with torch.no_grad():
                self.decoder.weight.copy_(_unit_norm_columns(torch.randn(activation_dim, dict_size)))
                self.encoder.weight.copy_(self.decoder.weight.T)

    @property
    def magnitude_weight(self) -> torch.Tensor:
        """W_mag = exp(r_mag) ⊙ W_gate, [F, D] (each gate row scaled by exp(r_mag_i))."""
        return self.r_mag.exp().unsqueeze(-1) * self.encoder.weight

    def encode(self, x: torch.Tensor, return_gate: bool = False):
        """f [..., F]; with `return_gate`, (f, ReLU(π_gate)) — the second is what the sparsity
        penalty and the auxiliary loss of the gated recipe act on.

        With z = W_gate x, both paths are z plus per-latent constants: π_gate = z + (b_gate − W_gate b_dec)
        and π_mag = exp(r_mag) ⊙ z + (b_mag − exp(r_mag) ⊙ W_gate b_dec), so b_dec's gradient is a
        matrix-vector product and the elementwise work is one fused autograd Function.
        """
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            z = flat @ self.encoder.weight.T  # [N, F]
        gate_bias, mag_bias = self.folded_biases()
        f, gate = GatedEncode.apply(z, flat, self.encoder.weight, gate_bias, self.r_mag, mag_bias)
        f, gate = f.view(*x.shape[:-1], -1), gate.view(*x.shape[:-1], -1)
        return (f, gate) if return_gate else f

    def folded_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_gate, c_mag) [F] with π_gate = W_gate x + c_gate and π_mag = exp(r_mag) ⊙ W_gate x + c_mag:
        b_dec folded in, c_gate = b_gate − W_gate b_dec and c_mag = b_mag − exp(r_mag) ⊙ W_gate b_dec."""
        centre = self.encoder.weight @ self.decoder_bias  # W_gate b_dec, [F]
        return self.gate_bias - centre, self.mag_bias - self.r_mag.exp() * centre

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f) + self.decoder_bias

    def scale_biases(self, factor: float) -> None:
        # π_gate and π_mag are linear in (x, b_dec, b_gate, b_mag): scaling all three scales f by
        # `factor` without moving the gate; r_mag is a ratio and stays.
        with torch.no_grad():
            self.decoder_bias.mul_(factor)
            self.gate_bias.mul_(factor)
            self.mag_bias.mul_(factor)

    @classmethod
    def shape_from_state_dict(cls, state_dict):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return {"activation_dim": activation_dim, "dict_size": dict_size}


# =============================================================================================
# Sparse-activation dictionaries: TopK (Gao et al. 2024), BatchTopK (Bussmann et al. 2024),
# Matryoshka BatchTopK (Bussmann et al. 2025) and JumpReLU (Rajamanoharan et al. 2024).
# Their features are exactly zero off a small set of latents, so they are held as SparseCodes
# and decoded with one embedding-bag sum instead of a dense [N, F] @ [F, D] matmul.
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


# Above this fraction of nonzero features a dense [N, F] @ [F, D] matmul is cheaper than a sparse
# sum on CPU (the crossover measured at D=512, F=8192 is ~4%).
DENSE_DECODE_DENSITY = 1 / 32


def sparse_decode(codes: SparseCodes, decoder_rows: torch.Tensor) -> torch.Tensor:
    """x̂_n = Σ_{j: rows_j = n} values_j · decoder_rows[columns_j], [N, D] (no bias).

    decoder_rows [F, D] holds one decoder direction per row. One embedding-bag sum: O(M·D) work,
    no dense [N, F] matrix, and a backward that touches only the used rows. When more than
    DENSE_DECODE_DENSITY of the N·F features are nonzero (e.g. early in JumpReLU training), the
    features are scattered into a dense matrix and multiplied instead.
    """
    dict_size = decoder_rows.shape[0]
    if codes.values.numel() > DENSE_DECODE_DENSITY * codes.n_rows * dict_size:
        return codes.to_dense(dict_size).to(decoder_rows.dtype) @ decoder_rows
    weight = decoder_rows.contiguous()
    return F.embedding_bag(
        codes.columns, weight, codes.offsets(), mode="sum", per_sample_weights=codes.values.to(weight.dtype)
    )


def _check_k(k, dict_size: int) -> int:
    if isinstance(k, torch.Tensor) and k.numel() == 1:
        k = int(k.item())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= dict_size:
        raise ValueError(f"k (active latents per token) must be an int in [1, dict_size={dict_size}], got {k!r}")
    return k


def _check_scale(factor: float) -> None:
    if not factor > 0:
        raise ValueError(f"scale_biases: factor must be positive (thresholds scale with it), got {factor}")


class _TopKFamily(Dictionary):
    """What AutoEncoderTopK, BatchTopKSAE and MatryoshkaBatchTopKSAE share: a ReLU encoder
    π = W_enc (x − b_dec) + b_enc whose features are chosen by top-k, or at inference by a
    learned global threshold θ, and x̂ = W_dec f + b_dec.

    Persistent buffers: `k` (int) and `threshold` (θ, −1 until learned).
    Subclasses provide `encoder_rows` [F, D], `encoder_bias` [F], `decoder_rows` [F, D], `b_dec`
    [D], and set `batch_top_k` (False: exactly k latents per token; True: BatchTopK).
    """

    batch_top_k: ClassVar[bool] = False

    def _register_k_and_threshold(self, k: int) -> None:
        self.register_buffer("k", torch.tensor(_check_k(k, self.dict_size), dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))

    @property
    def has_threshold(self) -> bool:
        """Whether θ has been learned (it is −1 before)."""
        return bool(self.threshold >= 0)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """π = W_enc (x − b_dec) + b_enc, [..., F]."""
        return F.linear(x - self.b_dec, self.encoder_rows, self.encoder_bias)

    def select(self, pre_activations: torch.Tensor, use_threshold: bool | None = None) -> SparseCodes:
        """The features of pre-activations [N, F] as SparseCodes.

        use_threshold=False: top-k per token (AutoEncoderTopK) or over the batch (BatchTopK).
        use_threshold=True: f = π ⊙ 1[π > θ] with the learned θ. A BatchTopK dictionary whose θ
        is not learned yet (threshold < 0) falls back to per-token top-k, never to a dense ReLU.
        None: the class's inference rule (TopK: top-k per token; BatchTopK: the threshold).
        """
        if use_threshold is None:
            use_threshold = self.batch_top_k
        k = int(self.k)
        if use_threshold and self.has_threshold:
            return threshold_codes(pre_activations, self.threshold)
        if use_threshold and not self.batch_top_k:
            raise ValueError(
                f"{type(self).__name__}.threshold is not learned (it is {float(self.threshold)}); "
                "encode with use_threshold=False (top-k per token)"
            )
        if self.batch_top_k and not use_threshold:
            return batch_top_k_codes(pre_activations, k)
        return per_token_top_k_codes(pre_activations, k)

    def codes(self, x: torch.Tensor, use_threshold: bool | None = None) -> SparseCodes:
        """SparseCodes of the tokens of x [..., D] (flattened to N = x.numel() // D rows)."""
        return self.select(self.pre_activations(x.reshape(-1, x.shape[-1])), use_threshold)

    def encode(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """x [..., D] -> f [..., F]; k counts per token of [B, L, D] input (see `select`)."""
        return self.codes(x, use_threshold).to_dense(self.dict_size).reshape(*x.shape[:-1], self.dict_size)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.decoder_rows + self.b_dec

    def forward(self, x: torch.Tensor, output_features: bool = False, use_threshold: bool | None = None):
        """x̂ (and f with `output_features`), decoding the sparse features directly."""
        codes = self.codes(x, use_threshold)
        x_hat = (sparse_decode(codes, self.decoder_rows) + self.b_dec).reshape(x.shape)
        if not output_features:
            return x_hat
        return x_hat, codes.to_dense(self.dict_size).reshape(*x.shape[:-1], self.dict_size)

    def scale_biases(self, factor: float) -> None:
        _check_scale(factor)
        with torch.no_grad():
            self.b_dec.mul_(factor)
            self.encoder_bias.mul_(factor)
            if self.has_threshold:
                self.threshold.mul_(factor)


class _LinearTopKLayout(_TopKFamily):
    """TopK/BatchTopK weights as in saprmarks/dictionary_learning: `encoder` (nn.Linear, weight
    W_enc [F, D], bias b_enc [F]), `decoder` (nn.Linear without bias, weight W_dec [D, F]),
    `b_dec` [D], plus the buffers `k` and `threshold`. Decoder columns start at unit norm and
    W_enc = W_decᵀ (Gao et al. 2024, appendix A.1)."""

    def __init__(self, activation_dim: int, dict_size: int, k: int):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self._register_k_and_threshold(k)
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        if self.b_dec.device.type != "meta":
            with torch.no_grad():
                self.decoder.weight.copy_(_unit_norm_columns(torch.randn(activation_dim, dict_size)))
                self.encoder.weight.copy_(self.decoder.weight.T)
                self.encoder.bias.zero_()

    @property
    def encoder_rows(self) -> torch.Tensor:
        return self.encoder.weight  # [F, D]

    @property
    def encoder_bias(self) -> torch.Tensor:
        return self.encoder.bias

    @property
    def decoder_rows(self) -> torch.Tensor:
        return self.decoder.weight.T  # [F, D] view

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f) + self.b_dec

    @classmethod
    def shape_from_state_dict(cls, state_dict):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return {"activation_dim": activation_dim, "dict_size": dict_size, "k": int(state_dict["k"])}


class AutoEncoderTopK(_LinearTopKLayout):
    """TopK SAE (Gao et al. 2024): f = ReLU(TopK_k(W_enc (x − b_dec) + b_enc)), exactly k active
    latents per token; x̂ = W_dec f + b_dec. `encode(x, use_threshold=True)` instead keeps
    π > θ with the threshold tracked during training.

    State-dict keys: encoder.weight [F, D], encoder.bias [F], decoder.weight [D, F], b_dec [D],
    k, threshold (those of saprmarks/dictionary_learning, whose TopK SAEs load directly).
    """

    batch_top_k = False


class BatchTopKSAE(_LinearTopKLayout):
    """BatchTopK SAE (Bussmann et al. 2024). Training keeps the k·N largest ReLU pre-activations
    over a batch of N tokens (`encode(x, use_threshold=False)`); inference keeps
    f = π ⊙ 1[π > θ] with the global threshold θ learned in training, so a token's features do
    not depend on the rest of its batch. Until θ is learned (threshold < 0), inference uses
    top-k per token. Same state-dict keys as AutoEncoderTopK.
    """

    batch_top_k = True


class MatryoshkaBatchTopKSAE(_TopKFamily):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025): a BatchTopK SAE whose latents are split
    into nested groups (sizes `group_sizes`, in order); the prefixes [0, m) of the dictionary are
    trained to reconstruct x on their own (see trainers/matryoshka_batch_top_k.py). Encoding is
    BatchTopKSAE's.

    State-dict keys (as saprmarks/dictionary_learning): W_enc [D, F], b_enc [F], W_dec [F, D],
    b_dec [D], k, threshold, group_sizes.
    """

    batch_top_k = True

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int]):
        super().__init__()
        group_sizes = [int(s) for s in group_sizes]
        if not group_sizes or any(s <= 0 for s in group_sizes) or sum(group_sizes) != dict_size:
            raise ValueError(
                f"group_sizes must be positive and sum to dict_size={dict_size}, got {group_sizes}"
            )
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self._register_k_and_threshold(k)
        self.register_buffer("group_sizes", torch.tensor(group_sizes, dtype=torch.long))
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        if self.b_dec.device.type != "meta":
            with torch.no_grad():
                self.W_dec.copy_(_unit_norm_columns(torch.randn(activation_dim, dict_size)).T)
                self.W_enc.copy_(self.W_dec.T)

    @property
    def group_boundaries(self) -> list[int]:
        """[0, s_0, s_0 + s_1, ..., F]: group g is latents [boundaries[g], boundaries[g + 1])."""
        return [0, *torch.cumsum(self.group_sizes, 0).tolist()]

    @property
    def encoder_rows(self) -> torch.Tensor:
        return self.W_enc.T  # [F, D] view

    @property
    def encoder_bias(self) -> torch.Tensor:
        return self.b_enc

    @property
    def decoder_rows(self) -> torch.Tensor:
        return self.W_dec

    @classmethod
    def shape_from_state_dict(cls, state_dict):
        activation_dim, dict_size = state_dict["W_enc"].shape
        return {
            "activation_dim": activation_dim,
            "dict_size": dict_size,
            "k": int(state_dict["k"]),
            "group_sizes": state_dict["group_sizes"].tolist(),
        }


class JumpReluAutoEncoder(Dictionary):
    """JumpReLU SAE (Rajamanoharan et al. 2024):

        π = W_enc x + b_enc,   f = π ⊙ H(π − θ),   x̂ = W_dec f + b_dec

    with one threshold θ_i = exp(log_threshold_i) > 0 per latent (x is not centred by b_dec, as
    in the paper and Gemma Scope). Training updates log θ (trainers/jumprelu.py), but the saved
    state dict holds θ itself under `threshold`, so the keys are those of
    saprmarks/dictionary_learning and SAELens: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D],
    threshold [F]. Loading a θ ≤ 0 gives a threshold of 0 (a plain ReLU for that latent).
    """

    def __init__(self, activation_dim: int, dict_size: int, initial_threshold: float = 0.001):
        super().__init__()
        if not initial_threshold > 0:
            raise ValueError(f"initial_threshold must be positive (θ = exp(log θ)), got {initial_threshold}")
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.W_enc = nn.Parameter(torch.empty(activation_dim, dict_size))
        self.b_enc = nn.Parameter(torch.zeros(dict_size))
        self.W_dec = nn.Parameter(torch.empty(dict_size, activation_dim))
        self.b_dec = nn.Parameter(torch.zeros(activation_dim))
        self.log_threshold = nn.Parameter(torch.full((dict_size,), math.log(initial_threshold)))
        if self.b_dec.device.type != "meta":
            with torch.no_grad():
                self.W_dec.copy_(_unit_norm_columns(torch.randn(activation_dim, dict_size)).T)
                self.W_enc.copy_(self.W_dec.T)
        self.register_state_dict_post_hook(_save_threshold_not_log)
        self.register_load_state_dict_pre_hook(_load_threshold_as_log)

    @property
    def threshold(self) -> torch.Tensor:
        """θ = exp(log_threshold), [F]."""
        return self.log_threshold.exp()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """π = W_enc x + b_enc, [..., F]."""
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre * (pre > self.threshold)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f @ self.W_dec + self.b_dec

    def scale_biases(self, factor: float) -> None:
        _check_scale(factor)
        with torch.no_grad():
            self.b_enc.mul_(factor)
            self.b_dec.mul_(factor)
            self.log_threshold.add_(math.log(factor))

    @classmethod
    def shape_from_state_dict(cls, state_dict):
        activation_dim, dict_size = state_dict["W_enc"].shape
        return {"activation_dim": activation_dim, "dict_size": dict_size}


def _save_threshold_not_log(module, state_dict, prefix, local_metadata) -> None:
    """state_dict() hook of JumpReluAutoEncoder: save θ = exp(log θ) under `threshold`."""
    log_threshold = state_dict.pop(prefix + "log_threshold")
    state_dict[prefix + "threshold"] = log_threshold.detach().exp()


def _load_threshold_as_log(module, state_dict, prefix, *args) -> None:
    """load_state_dict() hook of JumpReluAutoEncoder: `threshold` θ becomes log θ (θ ≤ 0 → −inf)."""
    if prefix + "threshold" in state_dict:
        threshold = state_dict.pop(prefix + "threshold")
        state_dict[prefix + "log_threshold"] = threshold.clamp_min(0).log()
