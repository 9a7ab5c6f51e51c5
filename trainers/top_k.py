"""TopK SAEs (Gao et al. 2024, "Scaling and evaluating sparse autoencoders").

The dictionary (AutoEncoderTopK) keeps exactly k latents per token:

    π = (x − b_dec) W_enc + b_enc,   f = ReLU(TopK_k(π)),   x̂ = f W_dec + b_dec

and is trained on the reconstruction error alone, plus the AuxK auxiliary loss (appendix A.2)
that revives dead latents:

    L = (1/N) Σ_n ‖x_n − x̂_n‖²  +  α · L_aux,        α = 1/32
    e = x − x̂ (held fixed),   ê = Σ_{i ∈ TopK_{k_aux}(π[dead])} ReLU(π_i) W_dec[i]   (no bias)
    L_aux = ‖e − ê‖² / ‖e − ē‖²        (sums over the batch; ē the batch mean of e)

where "dead" latents have not fired in `dead_tokens_threshold` tokens (the paper's 10M, or 1%
of a shorter run's tokens, so that AuxK acts at all in a run of a few million tokens) and
k_aux = D/2 (a heuristic of saprmarks/dictionary_learning; the paper used 512). Only dead latents' encoder
columns, encoder biases and decoder rows receive L_aux's gradient.

Initialisation (appendix A.1): unit-norm decoder directions, W_enc = c · W_decᵀ, b_enc = 0, and
b_dec at the geometric median of the first batch (Weiszfeld's algorithm). The paper ties the
encoder with c = 1; the default c = `init_encoder_scale` = 0.1 (Anthropic's April 2024 update, as
SAELens's decoder_init_norm and our standard recipe) lets each latent choose its feature from the
gradient rather than from its random starting direction, and recovers markedly more of the ground
truth on benchmarks/frontier.py (benchmarks/README.md). The decoder directions stay at
unit norm: the gradient component along each is removed before the Adam step and it is
renormalised after it. Adam uses β = (0.9, 0.999) and ε = 6.25e-10 (the paper's code); the LR
defaults to 2e-4 / √(F / 2¹⁴) (the paper's 1/√F scaling law, Figure 3) times the short-run factor
base.run_length_lr_scale (1 for runs with steps · D ≥ 2²²), warms up linearly over
`warmup_steps` and decays linearly to 0 over the last 20% of training unless `decay_start` says
otherwise.

Inference threshold: from `threshold_start_step` on, θ tracks the mean over tokens of the smallest
kept activation, as a bias-corrected exponential moving average (families.RunningThreshold); it is
stored in the dictionary's `threshold` buffer and used by `encode(x, use_threshold=True)`.

Speed: π is one dense matmul (done without autograd); everything after the top-k is sparse.
The decoder is an embedding-bag sum over the k kept latents (kernels.sparse_decode), and the
encoder's backward is a sparse-transpose-times-dense product over the kept entries
(kernels.gather_preactivations), so a step costs about two [N, D] × [D, F] matmuls plus the top-k.
The method around the selection is the TopK family's (families.TopKFamilyTrainer).
"""
from __future__ import annotations

from dataclasses import dataclass

from ..dictionary import AutoEncoderTopK
from .families import TopKFamilyConfig, TopKFamilyTrainer, mean_smallest_kept_per_token


@dataclass
class TopKTrainerConfig(TopKFamilyConfig):
    """The TopK family's fields; k is the number of active latents of every token."""


class TopKTrainer(TopKFamilyTrainer):
    """Trains an AutoEncoderTopK (see the module docstring for the method)."""

    Config = TopKTrainerConfig
    dictionary_class = AutoEncoderTopK
    threshold_statistic = staticmethod(mean_smallest_kept_per_token)
