"""Activation normalisation: the library's one convention, stated here.

Dictionaries always take and return raw activations. To make λ and learning rates comparable
across models and layers, training may scale its inputs by one factor s per run so that
E‖s·x‖² = 1 (`trainSAE(..., normalize_activations=True)`; `activation_scale`). The factor is folded
into the saved and returned weights (`Dictionary.scale_biases(1/s)`), so the result takes raw x, and
it is recorded in config.json as `training.activation_scale` (and as `training.norm_factor` = 1/s,
the reference library's name).

One exception, for dictionaries trained elsewhere on per-batch normalised inputs (the reference
library's `normalize_batch`): `evaluate(..., normalize_batch=True)` and `loss_recovered` scale each
batch to mean norm √D before the dictionary and the reconstruction back (`batch_scale`). Never use
it with dictionaries trained here.

SAELens SAEs trained on per-token normalised inputs (`normalize_activations="layer_norm"` or
"constant_norm_rescale") are imported wrapped in `RunTimeNormalized`, which normalises each token
before the SAE and restores the scale of its reconstruction, so they too take raw activations.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from .dictionary import Dictionary

__all__ = ["activation_scale", "squared_norm_sum", "scale_from_sums", "batch_scale", "RunTimeNormalized", "RUN_TIME_NORMALIZATIONS"]


def activation_scale(x: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """s with E‖s·x‖² = 1 over the tokens of x [..., D], or of several such tensors together:
    s = 1 / √(mean over tokens of ‖x‖²), accumulated in float64. ValueError if every x is zero."""
    return scale_from_sums(*squared_norm_sum(x))


def squared_norm_sum(x: torch.Tensor | Sequence[torch.Tensor]) -> tuple[float, int]:
    """(Σ ‖x_n‖², the number of tokens) over the tokens of x [..., D] or of several such tensors,
    accumulated in float64: what `activation_scale` needs, to be summed over ranks in data-parallel
    training."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    n_tokens = sum(part[..., 0].numel() for part in parts)
    return sum(float(part.double().pow(2).sum()) for part in parts), n_tokens


def scale_from_sums(squared_norms: float, n_tokens: int) -> float:
    """s = 1 / √(Σ‖x‖² / n_tokens), the scale of `activation_scale`; ValueError if it has none."""
    mean_square = squared_norms / max(n_tokens, 1)
    if not mean_square > 0 or not math.isfinite(mean_square):
        raise ValueError(f"activations over {n_tokens} tokens have mean squared norm {mean_square}, so they give "
                         "no scale: check the data")
    return mean_square ** -0.5


def batch_scale(x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """√D / mean ‖x‖ over the tokens of x [..., D] (only those where the bool mask `real` is set),
    the reference library's per-batch normalisation: scaled by it, the mean norm is √D."""
    tokens = x if real is None else x[real.to(x.device)]
    return x.shape[-1] ** 0.5 / tokens.float().norm(dim=-1).mean().clamp_min(1e-12)


# Per-token normalisations SAELens applies at run time (its cfg's normalize_activations), which no
# fixed weights can express: how each maps x [..., D] to the dictionary's input, from statistics of x.
RUN_TIME_NORMALIZATIONS = ("layer_norm", "constant_norm_rescale")
LAYER_NORM_EPS = 1e-5


class RunTimeNormalized(Dictionary):
    """A dictionary trained on per-token normalised inputs, taking and returning raw activations
    (SAELens' `normalize_activations`):

        layer_norm:             n(x) = (x − μ) / (σ + ε),  x̂ = σ · x̂_n + μ    (μ, σ: mean and unbiased
                                std of the D entries of each token, ε = 1e-5)
        constant_norm_rescale:  n(x) = x · √D / ‖x‖,       x̂ = x̂_n · ‖x‖ / √D

    where x̂_n is the wrapped dictionary's reconstruction of n(x). A transcoder's output is not
    scaled back (SAELens' transcoders do not), and its skip term reads the raw x. `forward(x)` is
    exact; `encode(x)` keeps the statistics of x for the `decode(f)` that follows (as SAELens
    does), so decode the features of the batch last encoded. Every other attribute (W_enc, k,
    cfg's architecture, ...) is the wrapped dictionary's, `dictionary`.
    """

    def __init__(self, dictionary: Dictionary, normalization: str):
        if normalization not in RUN_TIME_NORMALIZATIONS:
            raise ValueError(f"normalization must be one of {RUN_TIME_NORMALIZATIONS}, got {normalization!r}")
        super().__init__()
        self.dictionary = dictionary
        self.normalization = normalization
        self.activation_dim, self.dict_size = dictionary.activation_dim, dictionary.dict_size
        self._statistics: tuple[torch.Tensor, torch.Tensor] | None = None

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "dictionary":
                raise
            return getattr(self.dictionary, name)

    @property
    def is_transcoder(self) -> bool:
        return self.dictionary.is_transcoder

    def statistics(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(shift, scale) [..., 1] of each token: n(x) = (x − shift) / scale."""
        if self.normalization == "layer_norm":
            mean = x.mean(dim=-1, keepdim=True)
            return mean, (x - mean).std(dim=-1, keepdim=True) + LAYER_NORM_EPS
        return torch.zeros_like(x[..., :1]), x.norm(dim=-1, keepdim=True) / x.shape[-1] ** 0.5

    def _restore(self, x_hat: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        if self.is_transcoder:
            return x_hat  # its output is another activation: not scaled back
        if self.normalization == "layer_norm":
            scale = scale - LAYER_NORM_EPS  # SAELens scales back by σ, without ε
        return x_hat * scale + shift

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        shift, scale = self._statistics = self.statistics(x)
        return self.dictionary.encode((x - shift) / scale)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        if self._statistics is None or self._statistics[0].shape[:-1] != f.shape[:-1]:
            raise ValueError("RunTimeNormalized.decode needs the statistics of the batch the features came from: "
                             "call encode(x) on that batch first, or forward(x)")
        return self._restore(self.dictionary.decode(f), *self._statistics)

    def forward(self, x: torch.Tensor, output_features: bool = False):
        shift, scale = self.statistics(x)
        f = self.dictionary.encode((x - shift) / scale)
        x_hat = self._restore(self.dictionary.decode(f), shift, scale)
        if self.is_transcoder:
            x_hat = x_hat + self.dictionary.skip_term(x)
        return (x_hat, f) if output_features else x_hat

    def default_cfg(self):
        cfg = self.dictionary.default_cfg()
        cfg.normalize_activations = self.normalization
        return cfg
