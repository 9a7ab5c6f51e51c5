"""JumpReLU transcoders (Gemma Scope's transcoders; the JumpReLU method of Rajamanoharan et al. 2024
applied to a module's (input, output) pairs, as SAELens' jumprelu_transcoder):

    π = x W_enc + b_enc,   f = ReLU(π) ⊙ H(π − θ),   ŷ = f W_dec + b_dec  (+ x W_skipᵀ with skip=True)

    L = (1/N) Σ_n ‖y_n − ŷ_n‖²  +  λ(t) · (1/N) Σ_n ‖f_n‖₀        (or λ(t) · m · (L0/T − 1)² with target_l0,
                                                                     m ≥ 1 as in jumprelu.py)

The thresholds, their straight-through estimators, the L0 penalty, the optimiser and the sparse
implementation are the JumpReLU family's (families.JumpReluFamilyTrainer; the method is written out
in jumprelu.py); the batches of pairs, the output width, the skip connection and b_dec at the mean
output are the transcoder family's (families.TranscoderFamilyTrainer).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dictionary import JumpReluTranscoder
from .base import LossOutput
from .families import JumpReluFamilyConfig, JumpReluFamilyTrainer, TranscoderFamilyConfig, TranscoderFamilyTrainer


@dataclass
class JumpReluTranscoderTrainerConfig(TranscoderFamilyConfig, JumpReluFamilyConfig):
    """The JumpReLU family's fields and the transcoder's (`output_dim`, `skip`)."""


class JumpReluTranscoderTrainer(TranscoderFamilyTrainer, JumpReluFamilyTrainer):
    Config = JumpReluTranscoderTrainerConfig
    dictionary_class = JumpReluTranscoder

    def loss(self, batch, step: int) -> LossOutput:
        x, y = self.pair(batch)
        decoded, l0, features = self.jump_relu_decode(x)
        y_hat = decoded + self.ae.b_dec + self.ae.skip_term(x)
        recon_loss = (y - y_hat).pow(2).sum(dim=-1).mean()
        penalty, sparsity = self.sparsity_loss(l0, step, x.shape[0])
        pre_act_loss = self.pre_activation_loss(x)
        loss = recon_loss + penalty + pre_act_loss
        metrics = {**self.fit_metrics(y, y_hat), "sparsity_loss": sparsity.detach(), "l0": l0.detach(),
                   "pre_act_loss": pre_act_loss.detach(), "loss": loss.detach()}
        return LossOutput(loss, features, metrics)
