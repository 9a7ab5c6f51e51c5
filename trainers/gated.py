"""Gated SAE training (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", section 3).

The dictionary (GatedAutoEncoder) separates which latents fire from how strongly:

    π_gate(x) = (x − b_dec) W_gate + b_gate,    π_mag(x) = exp(r_mag) ⊙ (x − b_dec) W_gate + b_mag
    f(x) = 1[π_gate(x) > 0] ⊙ ReLU(π_mag(x)),   x̂(f) = f W_dec + b_dec

The Heaviside gate has no gradient, so the gate path is trained through ReLU(π_gate) instead. On a
batch x [B, D] (every term a batch mean of per-token sums over D or F):

    L = ‖x − x̂(f(x))‖²₂                                  reconstruction (trains the magnitudes)
      + λ ‖ReLU(π_gate(x))‖₁                             sparsity, on the gate path only
      + ‖x − x̂_frozen(ReLU(π_gate(x)))‖²₂                 auxiliary: the gate alone must reconstruct

x̂_frozen uses a frozen (stop-gradient) copy of W_dec and b_dec, so the auxiliary term trains the
gate path (W_gate, b_gate) and not the decoder; b_dec still receives its gradient through the
input centering x − b_dec, as in the paper's pseudo-code. The magnitude path (r_mag, b_mag) is
trained by the reconstruction term alone, and as the L1 penalty touches only the gate, the
magnitudes suffer no shrinkage.

Initialisation: decoder rows unit-norm random directions, W_gate = 0.1 · W_decᵀ (`init_encoder_scale`),
biases and r_mag 0, as the standard recipe (standard.py). With the tied W_gate = W_decᵀ each gate is
open on about half the inputs and x̂(f) starts at several times x (at F = 8D on inputs with E‖x‖² = 1
the first reconstruction error is ~15 E‖x‖²): the first stretch of training goes to undoing that
overshoot instead of pulling decoder rows towards the data, and in a short run the dictionary ends
little better than its random start (benchmarks/README.md, issue 19). At 0.1 the first reconstruction
is below x, and the decoder's gradient f_i (x − x̂) pulls each firing row towards the inputs it fires on.

Decoder directions are kept at unit norm (ConstrainedAdam), which
keeps the L1 penalty meaningful (with free norms it could be shrunk away by scaling W_gate down
and W_dec up). Adam runs with β1 = 0, β2 = 0.999 (`adam_betas`, DeepMind's setting and that of
saprmarks/dictionary_learning's original gated trainer) and by default an LR of 6e-4, twice the
paper's 3e-4, times base.run_length_lr_scale (at twice the rate the synthetic and bundled-model
benchmarks scored better than at the paper's, benchmarks/README.md). Adam moves each weight by about
the LR per step, so the LR bounds how far a run of a given length can move the dictionary from its
random start: 3e-4 (and the reference library's 5e-5) unscaled leave the decoder of a 2,000-step
run near its random initialisation (pass lr=3e-4 for the paper's setting). Dead latents can be
resampled as in Bricken et al. (2023), as the paper does (`resample_steps`; the LR warmup restarts
after each).

The losses, their dense and sparse computations and the resampling are the gated family's
(families.GatedFamilyTrainer); this recipe's own choice is the L1 penalty.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import kernels
from ..dictionary import GatedAutoEncoder
from .families import Features, GatedFamilyConfig, GatedFamilyTrainer


@dataclass
class GatedSAETrainerConfig(GatedFamilyConfig):
    sparsity_penalty: float = 1e-1
    """λ, the weight of the L1 penalty on the gate path."""


class GatedSAETrainer(GatedFamilyTrainer):
    Config = GatedSAETrainerConfig
    dictionary_class = GatedAutoEncoder
    default_lr = 6e-4  # twice the paper's, scaled up for short runs (module docstring)

    def sparsity_penalty(self, gate: Features, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ ‖ReLU(π_gate)‖₁ (batch mean) for gate = ReLU(π_gate) (non-negative), [N, F] or sparse."""
        l1 = kernels.lp_sparsity(gate, 1.0)
        return self.cfg.sparsity_penalty * l1, {"sparsity_loss": l1.detach()}
