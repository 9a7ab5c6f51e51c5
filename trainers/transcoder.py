"""Transcoders with an L1 penalty (Dunefsky et al. 2024, "Transcoders find interpretable LLM
feature circuits").

A transcoder reads a module's input x and reconstructs the module's output y (an MLP's, typically),
so that its features replace the module in a circuit:

    f = ReLU(x W_enc + b_enc),   ŷ = f W_dec + b_dec  (+ x W_skipᵀ with skip=True)

    L = (1/N) Σ_n ‖y_n − ŷ_n‖²₂  +  λ_t · (1/N) Σ_n Σ_i f_ni ‖W_dec[i]‖₂

The paper's loss is the reconstruction error plus λ‖f‖₁; the penalty here weights each feature by
its decoder norm, as in Anthropic's April 2024 update, so that shrinking the encoder and growing the
decoder cannot lower it and the decoder needs no norm constraint. λ_t warms up linearly over the
first 5% of training; the LR (1e-3 times base.run_length_lr_scale by default) decays linearly to 0
over the last 20%; plain Adam with the gradient's global norm clipped to 1. b_dec starts at the
mean output (families.TranscoderFamilyTrainer).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..dictionary import Transcoder
from .base import LossOutput, adam
from .families import TranscoderFamilyConfig, TranscoderFamilyTrainer

SPARSITY_WARMUP_FRACTION = 0.05
DECAY_FRACTION = 0.2


@dataclass
class TranscoderTrainerConfig(TranscoderFamilyConfig):
    sparsity_penalty: float = 1e-1
    """λ, the weight of the decoder-norm-weighted L1 penalty."""
    max_grad_norm: float = 1.0
    """clip the gradient's global L2 norm to this."""


class TranscoderTrainer(TranscoderFamilyTrainer):
    Config = TranscoderTrainerConfig
    dictionary_class = Transcoder
    default_lr = 1e-3

    def __init__(self, config: TranscoderTrainerConfig):
        super().__init__(config)
        if config.sparsity_penalty < 0 or not config.max_grad_norm > 0:
            raise ValueError(f"sparsity_penalty must be >= 0 and max_grad_norm > 0, got {config.sparsity_penalty} "
                             f"and {config.max_grad_norm}")
        if config.steps is not None:
            resolved = {}
            if config.sparsity_warmup_steps is None:
                resolved["sparsity_warmup_steps"] = round(SPARSITY_WARMUP_FRACTION * config.steps)
            if config.decay_start is None:
                resolved["decay_start"] = config.steps - round(DECAY_FRACTION * config.steps)
            self.cfg = dataclasses.replace(self.cfg, **resolved)
        self.ae = self.build_dictionary(**self.dictionary_arguments())
        self.optimizer = adam(self.ae.parameters(), lr=self.lr, betas=(0.9, 0.999))

    def loss(self, batch, step: int) -> LossOutput:
        x, y = self.pair(batch)
        y_hat, f = self.ae(x, output_features=True)
        recon_loss = (y - y_hat).pow(2).sum(dim=-1).mean()
        sparsity = (f @ self.ae.W_dec.norm(dim=1)).mean()  # Σ_i f_i ‖W_dec[i]‖, batch mean
        penalty = self.cfg.sparsity_penalty * self.penalty_scale(step)
        loss = recon_loss + penalty * sparsity
        metrics = {**self.fit_metrics(y, y_hat), "sparsity_loss": sparsity.detach(), "loss": loss.detach(),
                   "l0": (f > 0).sum(dim=-1).float().mean()}
        return LossOutput(loss, f, metrics)

    def before_optimizer_step(self, step: int) -> None:
        torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.cfg.max_grad_norm)
