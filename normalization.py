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
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["activation_scale", "batch_scale"]


def activation_scale(x: torch.Tensor | Sequence[torch.Tensor]) -> float:
    """s with E‖s·x‖² = 1 over the tokens of x [..., D], or of several such tensors together:
    s = 1 / √(mean over tokens of ‖x‖²), accumulated in float64. ValueError if every x is zero."""
    parts = [x] if isinstance(x, torch.Tensor) else list(x)
    n_tokens = sum(part[..., 0].numel() for part in parts)
    mean_square = sum(float(part.double().pow(2).sum()) for part in parts) / max(n_tokens, 1)
    if not mean_square > 0 or not math.isfinite(mean_square):
        raise ValueError(f"activations over {n_tokens} tokens have mean squared norm {mean_square}, so they give "
                         "no scale: check the data")
    return mean_square ** -0.5


def batch_scale(x: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """√D / mean ‖x‖ over the tokens of x [..., D] (only those where the bool mask `real` is set),
    the reference library's per-batch normalisation: scaled by it, the mean norm is √D."""
    tokens = x if real is None else x[real.to(x.device)]
    return x.shape[-1] ** 0.5 / tokens.float().norm(dim=-1).mean().clamp_min(1e-12)
