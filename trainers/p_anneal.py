"""p-annealing of the sparsity penalty (Karvonen et al. 2024, "Measuring Progress in Dictionary
Learning for Language Model Interpretability with Board Game Models").

The standard SAE (f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec, unit-norm decoder
directions via ConstrainedAdam) with an Lp sparsity penalty whose exponent p shrinks during training:

    L = (1/B) Σ_b ‖x_b − x̂_b‖²₂  +  λ_k · (1/B) Σ_b S_p(f_b)
    S_p(f) = Σ_i f_i^p                  ("Lp^p", the default)
    S_p(f) = (Σ_i f_i^p)^(1/p)          ("Lp")

At p = 1 this is the L1 recipe (a convex start); as p → 0, Σ_i f_i^p tends to the L0 norm, the
sparsity we actually want. p starts at `p_start` and moves linearly to `p_end` in
N = `n_sparsity_updates` equal jumps between steps `anneal_start` (default: the reference's 15,000,
or a fifth of the run when that is shorter) and `anneal_end` (default: the end of the run): the
k-th jump (k = 0 … N−1) happens after step

    t_k = anneal_start + ⌊k (anneal_end − anneal_start) / N⌋,   p ← p_start + (k+1)/N · (p_end − p_start).

Because S_p changes scale with p, λ (`sparsity_penalty` at p_start) is rescaled at every jump so
that the penalty is continuous:

    λ_new = λ_old · mean S_p_old(f) / mean S_p_new(f),

both means over the features of the last `sparsity_queue_length` training batches before the
jump (1: just the batch of step t_k). S at the next p is only computed inside that window
(families.PAnnealSchedule).

Optional dead-latent resampling every `resample_steps` steps as in the standard recipe (Bricken
et al. 2023): latents that did not fire during the window get encoder column 0.2 · (mean alive
encoder-column norm) · x/‖x‖ and decoder direction x/‖x‖ for inputs x sampled ∝ ‖x − x̂‖², zero
biases, and zeroed Adam moments. The LR warmup restarts after each resample.

Unlike saprmarks/dictionary_learning's PAnnealTrainer: p does reach p_end (there the last change
falls on the final step and never happens), every change rescales λ (there the first does not),
and resampling writes the new weights (there it assigned into a copy, leaving them unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionary import AutoEncoder
from .base import ConstrainedAdam, LossOutput, SAETrainer, check_positive, resample_dead_latents_
from .families import AnnealedSparsity, AnnealedSparsityConfig


@dataclass
class PAnnealTrainerConfig(AnnealedSparsityConfig):
    resample_steps: int | None = None
    """resample dead latents every this many steps (None: never)."""
    resample_encoder_scale: float = 0.2
    """a resampled encoder column's norm, as a multiple of the mean alive column norm."""
    init_encoder_scale: float = 0.1
    """W_enc = init_encoder_scale · W_decᵀ at initialisation."""


class PAnnealTrainer(AnnealedSparsity, SAETrainer):
    Config = PAnnealTrainerConfig
    dictionary_class = AutoEncoder
    default_lr = 1e-3

    def __init__(self, config: PAnnealTrainerConfig):
        super().__init__(config)
        self.ae = self.build_dictionary()
        with torch.no_grad():
            self.ae.W_enc.mul_(check_positive("init_encoder_scale", config.init_encoder_scale))
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr)

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x_hat, f = self.ae(x, output_features=True)
        recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        penalty, metrics = self.anneal.penalty(f, step, self.replicas)
        loss = recon_loss + self.penalty_scale(step) * penalty
        metrics.update(mse_loss=recon_loss.detach(), loss=loss.detach())
        return LossOutput(loss, f, metrics)

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Re-initialise the latents in `dead_mask` [F] from inputs x; returns their indices."""
        return resample_dead_latents_(self.ae, self.optimizer, self.dead_tracker, dead_mask, x, [self.ae.b_enc],
                                      self.cfg.resample_encoder_scale, self.generator)
