"""BatchTopK SAEs (Bussmann, Leask & Nanda 2024, "BatchTopK Sparse Autoencoders").

A TopK SAE whose top-k is taken over the whole batch instead of per token. For a batch of N
tokens with pre-activations π = (x − b_dec) W_enc + b_enc [N, F], training keeps the k·N largest
entries of ReLU(π) anywhere in the batch:

    f = BatchTopK_{k·N}(ReLU(π)),   x̂ = f W_dec + b_dec,   L = (1/N) Σ_n ‖x_n − x̂_n‖² + α L_aux

so the number of active latents varies from token to token while its batch average is exactly
k. Everything else (AuxK with α = 1/32 and k_aux = D/2, geometric-median b_dec, W_enc = 0.1 W_decᵀ,
unit-norm decoder with the gradient projection, Adam, the 1/√F learning rate and its schedule)
is the TopK recipe of top_k.py (families.TopKFamilyTrainer).

Inference must not depend on the batch, so BatchTopK is replaced there by one global threshold
(section 3 of the paper): θ is the average, over training batches, of the smallest activation
BatchTopK kept, θ = E_batch[min{f_ni : f_ni > 0}], and inference uses

    f = ReLU(π) ⊙ 1[ReLU(π) > θ].

θ is estimated from `threshold_start_step` on with a bias-corrected moving average (β = 0.999,
see families.RunningThreshold): the plain mean over the first ~1/(1 − β) batches, then a moving average
that follows the encoder. Until θ exists (threshold = −1), BatchTopKSAE.encode keeps the top k
latents of each token, never a dense ReLU.
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dictionary import BatchTopKSAE
from .families import TopKFamilyConfig, TopKFamilyTrainer, smallest_kept


@dataclass
class BatchTopKTrainerConfig(TopKFamilyConfig):
    """The TopK family's fields; k is the average number of active latents per token."""


class BatchTopKTrainer(TopKFamilyTrainer):
    """Trains a BatchTopKSAE (see the module docstring for the method)."""

    Config = BatchTopKTrainerConfig
    dictionary_class = BatchTopKSAE
    threshold_statistic = staticmethod(smallest_kept)
