"""Gated SAE with p-annealing (Karvonen et al. 2024, "Measuring Progress in Dictionary Learning
for Language Model Interpretability with Board Game Models").

The gated recipe (gated.py, Rajamanoharan et al. 2024) with its L1 gate penalty replaced by the
annealed Lp penalty of p-annealing (p_anneal.py), applied to the gate path g = ReLU(π_gate(x)):

    L = ‖x − x̂(f(x))‖²₂  +  λ_k · S_p(g)  +  ‖x − x̂_frozen(g)‖²₂,
    S_p(g) = Σ_i g_i^p ("Lp^p", default) or (Σ_i g_i^p)^(1/p) ("Lp")

p goes linearly from `p_start` to `p_end` in `n_sparsity_updates` jumps between `anneal_start`
and `anneal_end`, and λ is rescaled at each jump (λ ← λ · mean S_p_old / mean S_p_new over the last
`sparsity_queue_length` batches) so that the penalty is continuous. Unit-norm decoder
(ConstrainedAdam) and optional resampling of dead latents as in the gated recipe.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionary import GatedAutoEncoder
from .families import AnnealedSparsity, AnnealedSparsityConfig, Features, GatedFamilyConfig, GatedFamilyTrainer


@dataclass
class GatedAnnealTrainerConfig(AnnealedSparsityConfig, GatedFamilyConfig):
    """The p-annealing fields (applied to the gate path) and the gated family's."""


class GatedAnnealTrainer(AnnealedSparsity, GatedFamilyTrainer):
    Config = GatedAnnealTrainerConfig
    dictionary_class = GatedAutoEncoder
    default_lr = 3e-4  # saprmarks/dictionary_learning's, scaled up for short runs as the gated recipe's

    def sparsity_penalty(self, gate: Features, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.anneal.penalty(gate, step, self.replicas)
