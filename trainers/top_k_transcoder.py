"""TopK transcoders (sparsify; Paulo et al. 2025, "Transcoders beat sparse autoencoders for
interpretability", whose skip transcoders add a linear skip connection).

    f = ReLU(TopK_k(x W_enc + b_enc)),   ŷ = f W_dec + b_dec  (+ x W_skipᵀ with skip=True)

    L = (1/N) Σ_n ‖y_n − ŷ_n‖²₂

k fixes the sparsity, so the loss is the reconstruction error of the module's output y alone. As
for TopK SAEs (Gao et al. 2024): unit-norm decoder rows kept by ConstrainedAdam, Adam β = (0.9,
0.999), ε = 6.25e-10, LR 2e-4 / √(F / 2¹⁴) (times base.run_length_lr_scale) warming up over
`warmup_steps` and decaying linearly to 0 over the last 20% of the steps. b_dec starts at the mean
output (families.TranscoderFamilyTrainer).
The decode is an embedding-bag sum over the k kept latents of each token (kernels.sparse_decode).
"""
from __future__ import annotations

from dataclasses import dataclass

from .. import kernels
from ..dictionary import TopKTranscoder
from .base import ConstrainedAdam, LossOutput
from .families import TOPK_ADAM_BETAS, TOPK_ADAM_EPS, TopKSchedule, TranscoderFamilyConfig, TranscoderFamilyTrainer


@dataclass
class TopKTranscoderTrainerConfig(TranscoderFamilyConfig):
    k: int | None = None
    """active latents per token."""


class TopKTranscoderTrainer(TopKSchedule, TranscoderFamilyTrainer):
    Config = TopKTranscoderTrainerConfig
    dictionary_class = TopKTranscoder

    def __init__(self, config: TopKTranscoderTrainerConfig):
        super().__init__(config)
        if config.k is None:
            raise ValueError("TopKTranscoderTrainer needs k, the number of active latents per token (e.g. k=32)")
        self.ae = self.build_dictionary(config.k, **self.dictionary_arguments())
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr, betas=TOPK_ADAM_BETAS,
                                         eps=TOPK_ADAM_EPS)

    def loss(self, batch, step: int) -> LossOutput:
        x, y = self.pair(batch)
        codes = self.ae.codes(x)
        y_hat = kernels.sparse_decode(codes, self.ae.W_dec) + self.ae.b_dec + self.ae.skip_term(x)
        loss = (y - y_hat).pow(2).sum(dim=-1).mean()
        metrics = {**self.fit_metrics(y, y_hat), "loss": loss.detach(),
                   "l0": (codes.values.detach() > 0).sum() / codes.n_rows}
        return LossOutput(loss, codes.detached(), metrics)
