"""The standard SAE as trained in Anthropic's April 2024 circuits update ("Update on how we train
SAEs", Conerly et al., transformer-circuits.pub/2024/april-update).

Same dictionary as the standard recipe (AutoEncoder: f = ReLU((x − b_dec) W_enc + b_enc),
x̂ = f W_dec + b_dec), but the decoder norms are free and enter the sparsity penalty instead:

    L = (1/B) Σ_b ‖x_b − x̂_b‖²₂  +  λ_t · (1/B) Σ_b Σ_i f_bi ‖W_dec[i]‖₂

Scaling a decoder column up and its encoder row down no longer lowers the penalty, so no
unit-norm constraint (and no ConstrainedAdam) is needed; the penalty is the L1 norm of the
features' contributions f_i W_dec[i]. The rest of the update's recipe:

- init: decoder directions random with L2 norm `init_decoder_norm` (the update uses a
  fixed norm between 0.05 and 1; 0.1 as in SAELens' replication), W_enc = W_decᵀ, b_enc = b_dec = 0;
- plain Adam, β = (0.9, 0.999), no weight decay; the gradient's global norm is clipped to 1;
- λ_t grows linearly from 0 to λ over the first 5% of training (`sparsity_warmup_steps`, default
  `sparsity_warmup_fraction` · steps); the learning rate decays linearly to 0 over the last 20%
  (`decay_start`, default (1 − `decay_fraction`) · steps).

The update also scales inputs so that E‖x‖₂ = √D (trainSAE's `normalize_activations` scales to
E‖x‖² = 1 instead; λ and the LR depend on that choice). No resampling: the norm-weighted penalty
leaves few dead latents. The decoder directions of the trained dictionary are not unit norm.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..dictionary import AutoEncoder
from .base import LossOutput, SAETrainer, TrainerConfig, adam


@dataclass
class StandardTrainerAprilUpdateConfig(TrainerConfig):
    sparsity_penalty: float = 1e-1
    """λ, the weight of the decoder-norm-weighted L1 penalty."""
    init_decoder_norm: float = 0.1
    """L2 norm of each decoder direction at initialisation."""
    sparsity_warmup_fraction: float = 0.05
    """λ warms up over this first fraction of the steps when sparsity_warmup_steps is None."""
    decay_fraction: float = 0.2
    """the LR decays over this last fraction of the steps when decay_start is None."""
    max_grad_norm: float = 1.0
    """clip the gradient's global L2 norm to this."""


class StandardTrainerAprilUpdate(SAETrainer):
    Config = StandardTrainerAprilUpdateConfig
    dictionary_class = AutoEncoder
    default_lr = 1e-3  # saprmarks/dictionary_learning's default

    def __init__(self, config: StandardTrainerAprilUpdateConfig):
        super().__init__(config)
        for name in ("sparsity_warmup_fraction", "decay_fraction"):
            if not 0.0 <= getattr(config, name) <= 1.0:
                raise ValueError(f"{name} must be a fraction of the run in [0, 1], got {getattr(config, name)}")
        if config.init_decoder_norm <= 0 or config.max_grad_norm <= 0:
            raise ValueError(
                f"init_decoder_norm and max_grad_norm must be > 0, got {config.init_decoder_norm} and "
                f"{config.max_grad_norm}"
            )
        # resolve the fractional schedules once the run length is known (and record them in cfg)
        steps = config.steps
        if steps is not None:
            resolved = {}
            if config.sparsity_warmup_steps is None:
                resolved["sparsity_warmup_steps"] = round(config.sparsity_warmup_fraction * steps)
            if config.decay_start is None and config.decay_fraction > 0:
                resolved["decay_start"] = steps - round(config.decay_fraction * steps)
            self.cfg = dataclasses.replace(self.cfg, **resolved)

        self.ae = self.build_dictionary()
        with torch.no_grad():  # decoder directions of norm init_decoder_norm, W_enc = W_decᵀ
            self.ae.W_dec.mul_(config.init_decoder_norm)
            self.ae.W_enc.copy_(self.ae.W_dec.T)
        self.optimizer = adam(self.ae.parameters(), lr=self.lr, betas=(0.9, 0.999))

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x_hat, f = self.ae(x, output_features=True)
        recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        decoder_norms = self.ae.W_dec.norm(dim=1)  # [F], gradient flows into W_dec
        sparsity = (f @ decoder_norms).mean()  # Σ_i f_i ‖W_dec[i]‖, batch mean
        penalty = self.cfg.sparsity_penalty * self.penalty_scale(step)
        loss = recon_loss + penalty * sparsity
        metrics = {"mse_loss": recon_loss.detach(), "sparsity_loss": sparsity.detach(), "loss": loss.detach()}
        return LossOutput(loss, f, metrics)

    def before_optimizer_step(self, step: int) -> None:
        torch.nn.utils.clip_grad_norm_(self.ae.parameters(), self.cfg.max_grad_norm)
