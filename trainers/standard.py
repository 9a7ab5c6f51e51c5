"""The standard SAE recipe of "Towards Monosemanticity" (Bricken et al. 2023), with the
February 2024 ghost grads of Anthropic's circuits updates.

Loss on a batch x [B, D], f = ReLU((x − b_dec) W_enc + b_enc), x̂ = f W_dec + b_dec:

    L = (1/B) Σ_b ‖x_b − x̂_b‖²₂  +  λ · (1/B) Σ_b ‖f_b‖₁
    (entropy=True: the sparsity term is (1/B) Σ_b H(p_b), p_b = f_b / Σ_i f_bi, H(p) = −Σ p log p)

Initialisation: decoder rows unit-norm random directions, W_enc = 0.1 · W_decᵀ, biases 0. The
small encoder keeps most latents below threshold at first; with W_enc = W_decᵀ each latent fires on
about half the inputs and the L1 term spends the first thousands of steps shrinking them (measured
in benchmarks/README.md). 0.1 is the scale of Anthropic's April 2024 update and of
saprmarks/dictionary_learning's AutoEncoder.

Decoder directions are kept at unit norm by ConstrainedAdam. The LR is 1e-3 for a long run, scaled
up for a short one on narrow inputs (base.run_length_lr_scale), and warms up linearly over
`warmup_steps`, restarting after each resample; λ warms up linearly over `sparsity_warmup_steps`.

Dead-neuron resampling (appendix "Neuron Resampling"), every `resample_steps` steps: latents that
did not fire in the window are re-initialised from inputs of the current batch sampled with
probability ∝ ‖x − x̂‖² (their squared reconstruction error): decoder direction = x/‖x‖, encoder
column = x/‖x‖ · 0.2 · mean alive encoder-column norm, encoder bias 0; their Adam moments are zeroed.

Ghost grads (February 2024 update), with `ghost_threshold`: latents that have not fired for more
than `ghost_threshold` steps are "dead". With e = x − x̂ (held fixed), the ghost reconstruction
ĝ = exp((x − b_dec) W_enc[:, dead] + b_enc[dead]) W_dec[dead] is rescaled per sample to half of
‖e‖ (scale held fixed), and L_ghost = (1/B) Σ_b ‖ĝ_b − e_b‖², rescaled to equal the reconstruction
loss (factor held fixed), is added to L. Only dead latents' parameters receive its gradient.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionary import AutoEncoder
from .base import (
    ConstrainedAdam,
    LossOutput,
    SAETrainer,
    TrainerConfig,
    check_positive,
    resample_dead_latents_,
    rows_of,
)

EPS = 1e-8


@dataclass
class StandardTrainerConfig(TrainerConfig):
    sparsity_penalty: float = 1e-1
    """λ, the weight of the L1 (or entropy) penalty."""
    entropy: bool = False
    """use the entropy of the normalised features instead of their L1 norm."""
    resample_steps: int | None = None
    """resample dead latents every this many steps (None: never)."""
    ghost_threshold: int | None = None
    """ghost grads for latents dead more than this many steps (None: off)."""
    resample_encoder_scale: float = 0.2
    """a resampled encoder column's norm, as a multiple of the mean alive column norm (Anthropic)."""
    init_encoder_scale: float = 0.1
    """W_enc = init_encoder_scale · W_decᵀ at initialisation."""


class StandardTrainer(SAETrainer):
    Config = StandardTrainerConfig
    dictionary_class = AutoEncoder
    default_lr = 1e-3

    def __init__(self, config: StandardTrainerConfig):
        super().__init__(config)
        if config.resample_steps is not None and config.resample_steps <= 0:
            raise ValueError(f"resample_steps must be a positive number of steps or None, got {config.resample_steps}")
        if config.ghost_threshold is not None and config.ghost_threshold <= 0:
            raise ValueError(f"ghost_threshold must be a positive number of steps or None, got {config.ghost_threshold}")
        self.ae = self.build_dictionary()
        with torch.no_grad():
            self.ae.W_enc.mul_(check_positive("init_encoder_scale", config.init_encoder_scale))
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr)

    def sparsity_loss(self, f: torch.Tensor) -> torch.Tensor:
        if self.cfg.entropy:
            p = f / f.sum(dim=-1, keepdim=True).clamp_min(EPS)
            return -(p * torch.log(p.clamp_min(EPS))).sum(dim=-1).mean()
        return f.sum(dim=-1).mean()  # f = ReLU(π) >= 0, so this is ‖f‖₁

    def ghost_mask(self) -> torch.Tensor | None:
        if self.cfg.ghost_threshold is None:
            return None
        dead = self.dead_tracker.dead_after_steps(self.cfg.ghost_threshold)
        return dead if bool(dead.any()) else None

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        ghost_mask = self.ghost_mask()
        if ghost_mask is None:
            x_hat, f = self.ae(x, output_features=True)
        else:
            x_hat, x_ghost, f = self.ae(x, output_features=True, ghost_mask=ghost_mask)
        residual = x - x_hat
        recon_loss = residual.pow(2).sum(dim=-1).mean()
        sparsity = self.sparsity_loss(f)
        penalty = self.cfg.sparsity_penalty * self.penalty_scale(step)
        loss = recon_loss + penalty * sparsity
        metrics = {"mse_loss": recon_loss.detach(), "sparsity_loss": sparsity.detach()}
        if ghost_mask is not None:
            target = residual.detach()
            scale = target.norm(dim=-1, keepdim=True) / (2 * x_ghost.norm(dim=-1, keepdim=True).clamp_min(EPS))
            ghost_loss = (x_ghost * scale.detach() - target).pow(2).sum(dim=-1).mean()
            # rescaled by a ratio of batch means: over the global batch in data-parallel training
            recon_mean, ghost_mean = self.replicas.means([recon_loss, ghost_loss], rows_of(f))
            ghost_loss = ghost_loss * (recon_mean / ghost_mean.clamp_min(EPS))
            loss = loss + ghost_loss
            metrics["ghost_loss"] = ghost_loss.detach()
            metrics["n_ghost_latents"] = ghost_mask.sum()
        metrics["loss"] = loss.detach()
        return LossOutput(loss, f, metrics)

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Re-initialise the latents in `dead_mask` [F] from inputs x [B, D]; returns the indices
        of the latents that were resampled (at most B of them)."""
        return resample_dead_latents_(self.ae, self.optimizer, self.dead_tracker, dead_mask, x, [self.ae.b_enc],
                                      self.cfg.resample_encoder_scale, self.generator)
