"""Matryoshka BatchTopK SAEs (Bussmann, Nabeshima, Karvonen & Nanda 2025, "Learning Multi-Level
Features with Matryoshka Sparse Autoencoders").

The F latents are split into G consecutive groups of sizes s_1, ..., s_G (Σ s_g = F); the
prefixes m_g = s_1 + ... + s_g are nested dictionaries, and each must reconstruct x on its own:

    f = BatchTopK_{k·N}(ReLU((x − b_dec) W_enc + b_enc))                  (as BatchTopK)
    x̂_m = b_dec + f[:m] W_dec[:m]
    L = Σ_{g=1..G} w_g · (1/N) Σ_n ‖x_n − x̂_{m_g, n}‖²  +  α L_aux

with w_g = 1 (the paper's plain sum) unless `group_weights` are given (saprmarks/
dictionary_learning uses w_g = 1/G). The early latents thus carry general features that
reconstruct x alone, and later groups refine them. L_aux is AuxK on the error of the full
reconstruction x − x̂_F. Sparsity, the inference threshold θ, initialisation, unit-norm decoder
and optimiser are BatchTopK's (batch_top_k.py; families.TopKFamilyTrainer).

Groups are given as `group_sizes` (latent counts) or `group_fractions` (of dict_size, summing to
1; the last group takes the rounding remainder), e.g. group_fractions=[1/32, 1/16, 1/8, 1/4,
17/32]. The nested reconstructions are built group by group from the sparse features, so the G
prefix losses cost G sparse decodes of the features in each group, not G dense matmuls.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import kernels
from ..dictionary import MatryoshkaBatchTopKSAE
from ..kernels import SparseCodes
from .families import TopKFamilyConfig, TopKFamilyTrainer, smallest_kept


@dataclass
class MatryoshkaBatchTopKTrainerConfig(TopKFamilyConfig):
    group_sizes: list[int] | None = None
    """latents per nested group, in order, summing to dict_size."""
    group_fractions: list[float] | None = None
    """or the groups as fractions of dict_size, summing to 1 (the last takes the remainder)."""
    group_weights: list[float] | None = None
    """w_g per prefix loss; None: all 1 (the paper's sum)."""


def group_sizes_from_fractions(fractions: list[float], dict_size: int) -> list[int]:
    """floor(fraction · dict_size) for all groups but the last, which takes the remainder."""
    sizes = [int(fraction * dict_size) for fraction in fractions[:-1]]
    return [*sizes, dict_size - sum(sizes)]


class MatryoshkaBatchTopKTrainer(TopKFamilyTrainer):
    """Trains a MatryoshkaBatchTopKSAE (see the module docstring for the method)."""

    Config = MatryoshkaBatchTopKTrainerConfig
    dictionary_class = MatryoshkaBatchTopKSAE
    threshold_statistic = staticmethod(smallest_kept)

    def check_config(self) -> None:
        super().check_config()
        self.group_sizes = self._resolve_group_sizes(self.cfg)
        weights = self.cfg.group_weights
        weights = [1.0] * len(self.group_sizes) if weights is None else [float(w) for w in weights]
        if len(weights) != len(self.group_sizes) or any(w < 0 for w in weights):
            raise ValueError(
                f"group_weights must be {len(self.group_sizes)} non-negative numbers (one per group), got {weights}"
            )
        self.group_weights = weights

    @staticmethod
    def _resolve_group_sizes(cfg: MatryoshkaBatchTopKTrainerConfig) -> list[int]:
        if (cfg.group_sizes is None) == (cfg.group_fractions is None):
            raise ValueError(
                "MatryoshkaBatchTopKTrainer needs exactly one of group_sizes (latents per group, summing "
                "to dict_size) or group_fractions (summing to 1), e.g. group_fractions=[0.25, 0.75]"
            )
        if cfg.group_fractions is not None:
            fractions = list(cfg.group_fractions)
            if not fractions or any(f <= 0 for f in fractions) or not math.isclose(sum(fractions), 1.0):
                raise ValueError(f"group_fractions must be positive and sum to 1, got {fractions}")
            sizes = group_sizes_from_fractions(fractions, cfg.dict_size)
        else:
            sizes = [int(s) for s in cfg.group_sizes]
        if any(s <= 0 for s in sizes) or sum(sizes) != cfg.dict_size:
            raise ValueError(
                f"group sizes {sizes} must be positive and sum to dict_size={cfg.dict_size}"
                + (" (a fraction is too small for this dict_size)" if cfg.group_fractions is not None else "")
            )
        return sizes

    def dictionary_arguments(self) -> tuple:
        return (self.cfg.k, self.group_sizes)

    def reconstruction_loss(self, x: torch.Tensor, codes: SparseCodes) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Σ_g w_g (1/N) Σ_n ‖x_n − x̂_{m_g, n}‖², adding one group's features at a time."""
        boundaries = self.ae.group_boundaries
        group_of_entry = torch.bucketize(
            codes.columns, torch.tensor(boundaries[1:], device=codes.columns.device), right=True
        )
        x_hat = self.ae.b_dec.expand_as(x)
        loss = x.new_zeros(())
        prefix_losses = []
        for group, weight in enumerate(self.group_weights):
            start, end = boundaries[group], boundaries[group + 1]
            entries = (group_of_entry == group).nonzero().squeeze(-1)
            group_codes = SparseCodes(
                codes.values[entries], codes.rows[entries], codes.columns[entries] - start, codes.n_rows
            )
            x_hat = x_hat + kernels.sparse_decode(group_codes, self.ae.W_dec[start:end])
            prefix_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
            loss = loss + weight * prefix_loss
            prefix_losses.append(prefix_loss.detach())
        residual = x - x_hat
        metrics = {"matryoshka_loss": loss.detach(), "smallest_prefix_mse": prefix_losses[0]}
        return loss, residual, metrics
