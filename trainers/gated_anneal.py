"""Gated SAE with p-annealing (Karvonen et al. 2024, "Measuring Progress in Dictionary Learning
for Language Model Interpretability with Board Game Models").

The gated recipe of gated.py (Rajamanoharan et al. 2024) with its L1 gate penalty replaced by the
annealed Lp penalty of p_anneal.py, applied to the gate path g = ReLU(π_gate(x)):

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
from .gated import Features, GatedSAETrainer
from .p_anneal import AnnealedSparsity, PAnnealSchedule, PAnnealTrainerConfig, check_anneal_config


@dataclass
class GatedAnnealTrainerConfig(PAnnealTrainerConfig):
    """The p-annealing fields (applied to the gate path), plus the gated recipe's Adam betas."""

    adam_betas: tuple[float, float] = (0.0, 0.999)
    init_encoder_scale: float = 1.0  # the gated recipe's tied init (p-annealing's standard SAE uses 0.1)


class GatedAnnealTrainer(AnnealedSparsity, GatedSAETrainer):
    Config = GatedAnnealTrainerConfig
    dictionary_class = GatedAutoEncoder
    default_lr = 3e-4  # saprmarks/dictionary_learning's default for this recipe

    def __init__(self, config: GatedAnnealTrainerConfig):
        anneal_end = check_anneal_config(config, type(self).__name__)
        super().__init__(config)
        self.anneal = PAnnealSchedule.from_config(config, anneal_end)

    def sparsity_penalty(self, gate: Features, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.anneal.penalty(gate, step)
