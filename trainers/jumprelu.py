"""JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders").

Each latent i has its own threshold θ_i ≥ 0 below which it is zeroed:

    π = x W_enc + b_enc,   f = JumpReLU_θ(π) = π ⊙ H(π − θ),   x̂ = f W_dec + b_dec

and the loss penalises the number of active latents directly (no L1 proxy, so no shrinkage):

    L = (1/N) Σ_n ‖x_n − x̂_n‖²  +  λ(t) · (1/N) Σ_n ‖f_n‖₀,     ‖f_n‖₀ = Σ_i H(π_ni − θ_i)

λ(t) warms up linearly from 0 over `sparsity_warmup_steps` (default: the paper's 10,000 steps, or a
tenth of the run when that is shorter). With `target_l0` = T the sparsity
term is instead λ(t) · m · (L0/T − 1)², L0 the batch mean of ‖f_n‖₀ (saprmarks/dictionary_learning's
option, times m). The quadratic pulls the L0 towards T from both sides, but its pull vanishes at T
while the reconstruction's does not, so alone it settles above T; m is the L0Controller's multiplier
(base.py), kept ≥ 1: it grows while the L0 is above T until the L0 is T, and falls back to 1 while
the L0 is below T, where the quadratic itself pulls it up (no wind-up there).

H has zero derivative almost everywhere, so θ is trained with straight-through estimators: the
pseudo-derivatives below, with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε
(default 0.001, like θ's initial value meant for inputs scaled to E‖x‖² = 1 as in Gemma Scope:
trainSAE's normalize_activations=True):

    ∂/∂θ JumpReLU_θ(z) := −(θ/ε) K((z − θ)/ε),     ∂/∂z JumpReLU_θ(z) = H(z − θ)
    ∂/∂θ H(z − θ)      := −(1/ε) K((z − θ)/ε),     ∂/∂z H(z − θ) = 0

(the L0 term pushes on the thresholds only, not on the encoder). A latent whose pre-activations
all fall below θ − ε gets no gradient from either term and stays dead, so, as in Anthropic's
January 2025 update, a pre-activation loss pulls the latents S that have not fired in
`pre_act_dead_tokens` tokens (default 10,000) back up:

    L_p = λ_p · (1/N) Σ_n Σ_{i∈S} ReLU(θ_i − π_ni) ‖W_dec,i‖,     λ_p = 0.003 by default

(it raises their π and lowers their θ; 0 turns it off; the JumpReLU transcoder's default is 0).
The optimiser updates θ itself, as saprmarks/dictionary_learning does (the paper's pseudo-code
trains log θ; with Adam, steps in θ are then of the LR's size rather than relative ones, and the
saved θ is exactly the trained one); θ is kept ≥ 0 after each step.

Initialisation: decoder rows unit-norm random directions, W_enc = 0.1 · W_decᵀ
(`init_encoder_scale`), b_enc = b_dec = 0, θ = 0.001. The small encoder is the standard and gated
recipes' (standard.py, gated.py say why; SAELens' JumpReLU starts from decoder rows of norm 0.1 and
W_enc = W_decᵀ, the same first encoder): with W_enc = W_decᵀ, half the latents fire at first and x̂
starts at several times x, and a short run ends little better than its random start.

Decoder rows stay at unit norm (gradient projection + renormalisation). Adam with β = (0, 0.999),
ε = 1e-8; LR 2e-3 by default, with the base warmup/decay schedule. Adam moves θ by about the LR per
step, while a latent's pre-activation, a sum over D encoder entries that each move by about the LR,
can move ~√D times faster: while the small initial encoder grows, the thresholds lag behind and the
L0 stays above its target, and they catch up only once the encoder has settled. At 1e-3 that is
late in a short run (the L0 ends well above the target; benchmarks/README.md, issue 19), at 2e-3 it
is not (pass lr=1e-3 for the former default). The paper's 7e-5 is meant for its long runs on wide
models: the thresholds must climb to the scale of a latent's pre-activation, ~1/√D at E‖x‖² = 1
(0.18 at D = 32, 0.02 at D = 2304), and at 7e-5 a run of a few thousand steps on a narrow model ends
with the L0 still far above its target (pass lr=7e-5 for the paper's setting).

The thresholds, the estimators, the L0 penalty and the sparse implementation are the JumpReLU
family's (families.JumpReluFamilyTrainer, kernels.JumpReLUFunction / StepFunction), shared with the
JumpReLU transcoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..dictionary import JumpReluAutoEncoder
from .base import LossOutput, check_positive
from .families import JumpReluFamilyConfig, JumpReluFamilyTrainer

@dataclass
class JumpReluTrainerConfig(JumpReluFamilyConfig):
    """The JumpReLU family's fields: λ (`sparsity_penalty`), `target_l0`, ε (`bandwidth`), θ's
    initial value and λ's warmup; and the encoder's initial scale."""

    init_encoder_scale: float = 0.1
    """W_enc = init_encoder_scale · W_decᵀ at initialisation."""
    pre_act_penalty: float = 0.003
    """λ_p of the pre-activation loss on dead latents (see the module docstring); 0: none."""


class JumpReluTrainer(JumpReluFamilyTrainer):
    """Trains a JumpReluAutoEncoder (see the module docstring for the method)."""

    Config = JumpReluTrainerConfig
    dictionary_class = JumpReluAutoEncoder
    default_lr = 2e-3  # the module docstring says why not the paper's 7e-5
    scales_lr_with_run = False  # 2e-3 is already a short run's rate

    def __init__(self, config: JumpReluTrainerConfig):
        super().__init__(config)
        with torch.no_grad():
            self.ae.W_enc.mul_(check_positive("init_encoder_scale", config.init_encoder_scale))

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x = x.reshape(-1, self.cfg.activation_dim)
        decoded, l0, features = self.jump_relu_decode(x)
        recon_loss = (x - (decoded + self.ae.b_dec)).pow(2).sum(dim=-1).mean()
        penalty, sparsity = self.sparsity_loss(l0, step, x.shape[0])
        pre_act_loss = self.pre_activation_loss(x)
        loss = recon_loss + penalty + pre_act_loss
        metrics = {"mse_loss": recon_loss.detach(), "sparsity_loss": sparsity.detach(), "l0": l0.detach(),
                   "pre_act_loss": pre_act_loss.detach(), "loss": loss.detach()}
        return LossOutput(loss, features, metrics)
