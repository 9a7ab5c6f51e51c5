"""JumpReLU SAEs (Rajamanoharan et al. 2024, "Jumping Ahead: Improving Reconstruction Fidelity with
JumpReLU Sparse Autoencoders").

Each latent i has its own threshold θ_i ≥ 0 below which it is zeroed:

    π = x W_enc + b_enc,   f = JumpReLU_θ(π) = π ⊙ H(π − θ),   x̂ = f W_dec + b_dec

and the loss penalises the number of active latents directly (no L1 proxy, so no shrinkage):

    L = (1/N) Σ_n ‖x_n − x̂_n‖²  +  λ(t) · (1/N) Σ_n ‖f_n‖₀,     ‖f_n‖₀ = Σ_i H(π_ni − θ_i)

λ(t) warms up linearly from 0 over `sparsity_warmup_steps`. With `target_l0` = T the sparsity
term is instead λ(t) · (L0/T − 1)², L0 the batch mean of ‖f_n‖₀ (saprmarks/dictionary_learning's
option), which steers L0 towards T.

H has zero derivative almost everywhere, so θ is trained with straight-through estimators: the
pseudo-derivatives below, with the rectangle kernel K(u) = 1[|u| < 1/2] and bandwidth ε
(default 0.001, like θ's initial value meant for inputs scaled to E‖x‖² = 1 as in Gemma Scope:
trainSAE's normalize_activations=True):

    ∂/∂θ JumpReLU_θ(z) := −(θ/ε) K((z − θ)/ε),     ∂/∂z JumpReLU_θ(z) = H(z − θ)
    ∂/∂θ H(z − θ)      := −(1/ε) K((z − θ)/ε),     ∂/∂z H(z − θ) = 0

(the L0 term pushes on the thresholds only, not on the encoder). The optimiser updates θ itself,
as saprmarks/dictionary_learning does (the paper's pseudo-code trains log θ; with Adam, steps in
θ are then of the LR's size rather than relative ones, and the saved θ is exactly the trained
one); θ is kept ≥ 0 after each step.

Initialisation: decoder rows unit-norm random directions, W_enc = W_decᵀ, b_enc = b_dec = 0,
θ = 0.001. Decoder rows stay at unit norm (gradient projection + renormalisation). Adam with
β = (0, 0.999), ε = 1e-8; LR 7e-5 by default (the paper's), with the base warmup/decay schedule.

Implementation: π is one dense matmul without autograd; only entries with π > θ − ε can have a
nonzero value or gradient (active, or inside the kernel's window), so they are gathered once
(kernels.gather_preactivations, sparse encoder backward) and decoded sparsely
(kernels.sparse_decode). While they are a large share of the N·F entries (early in training, when
θ is small), dense matmuls are cheaper and are used instead (kernels.attach_encoder_gradient).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from .. import kernels
from ..dictionary import JumpReluAutoEncoder
from ..kernels import SparseCodes
from .base import ConstrainedAdam, LossOutput, SAETrainer, TrainerConfig, sparsity_multiplier

ADAM_BETAS = (0.0, 0.999)
ADAM_EPS = 1e-8


def rectangle(u: torch.Tensor) -> torch.Tensor:
    """K(u) = 1[−1/2 < u < 1/2]."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class JumpReLUFunction(torch.autograd.Function):
    """JumpReLU_θ(z) = z ⊙ H(z − θ) with the pseudo-derivative −(θ/ε) K((z − θ)/ε) in θ
    (θ broadcasts against z; its gradient is summed back to θ's shape)."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return z * (z > threshold)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_z = grad * (z > threshold)
        grad_threshold = -(threshold / bandwidth) * rectangle((z - threshold) / bandwidth) * grad
        return grad_z, grad_threshold.sum_to_size(threshold.shape), None


class StepFunction(torch.autograd.Function):
    """H(z − θ) with the pseudo-derivative −(1/ε) K((z − θ)/ε) in θ and none in z."""

    @staticmethod
    def forward(ctx, z, threshold, bandwidth: float):
        ctx.save_for_backward(z, threshold)
        ctx.bandwidth = bandwidth
        return (z > threshold).to(z.dtype)

    @staticmethod
    def backward(ctx, grad):
        z, threshold = ctx.saved_tensors
        bandwidth = ctx.bandwidth
        grad_threshold = -(1.0 / bandwidth) * rectangle((z - threshold) / bandwidth) * grad
        return None, grad_threshold.sum_to_size(threshold.shape), None


@dataclass
class JumpReluTrainerConfig(TrainerConfig):
    sparsity_penalty: float = 1.0
    """λ, the weight of the L0 penalty."""
    target_l0: float | None = None
    """None: the penalty is λ · L0 (the paper's); T: λ · (L0/T − 1)²."""
    bandwidth: float = 0.001
    """ε, the width of the straight-through estimators' kernel."""
    initial_threshold: float = 0.001
    """θ at initialisation."""
    sparsity_warmup_steps: int | None = 10_000
    """λ warms up linearly from 0 over these steps."""


class JumpReluTrainer(SAETrainer):
    """Trains a JumpReluAutoEncoder (see the module docstring for the method)."""

    Config = JumpReluTrainerConfig
    dictionary_class = JumpReluAutoEncoder
    default_lr = 7e-5

    def __init__(self, config: JumpReluTrainerConfig):
        super().__init__(config)
        if config.sparsity_penalty < 0:
            raise ValueError(f"JumpReluTrainer: sparsity_penalty (λ) must be >= 0, got {config.sparsity_penalty}")
        if config.target_l0 is not None and not config.target_l0 > 0:
            raise ValueError(f"JumpReluTrainer: target_l0 must be positive or None, got {config.target_l0}")
        if not config.bandwidth > 0:
            raise ValueError(f"JumpReluTrainer: bandwidth (ε) must be positive, got {config.bandwidth}")
        warmup = config.sparsity_warmup_steps
        if warmup is not None and config.steps is not None and warmup > config.steps:
            warnings.warn(
                f"JumpReluTrainer: sparsity_warmup_steps={warmup} > steps={config.steps}, so λ never "
                "reaches its full value; lower sparsity_warmup_steps",
                stacklevel=2,
            )
        self.ae = self.build_dictionary(initial_threshold=config.initial_threshold)
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.W_dec], lr=self.lr, betas=ADAM_BETAS,
                                         eps=ADAM_EPS)

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        ae, bandwidth = self.ae, self.cfg.bandwidth
        x = x.reshape(-1, self.cfg.activation_dim)
        n_tokens = x.shape[0]
        threshold = ae.threshold  # [F]
        with torch.no_grad():
            pre = torch.addmm(ae.b_enc, x, ae.W_enc)  # π [N, F]
            in_window = pre > threshold - bandwidth  # active, or with a nonzero θ-gradient
            n_entries = int(in_window.sum())
        if kernels.prefers_dense(n_entries, n_tokens, self.cfg.dict_size):  # e.g. early in training
            z = kernels.attach_encoder_gradient(pre, x, ae.W_enc, ae.b_enc, None)  # [N, F]
            f = JumpReLUFunction.apply(z, threshold, bandwidth)
            x_hat = f @ ae.W_dec + ae.b_dec
            l0 = StepFunction.apply(z, threshold, bandwidth).sum() / n_tokens
            features = f.detach()
        else:
            rows, columns = in_window.nonzero(as_tuple=True)
            z = kernels.gather_preactivations(pre, x, ae.W_enc, ae.b_enc, None, rows, columns)  # [M]
            entry_threshold = threshold.index_select(0, columns)  # [M]
            codes = SparseCodes(JumpReLUFunction.apply(z, entry_threshold, bandwidth), rows, columns, n_tokens)
            x_hat = kernels.sparse_decode(codes, ae.W_dec) + ae.b_dec
            l0 = StepFunction.apply(z, entry_threshold, bandwidth).sum() / n_tokens
            features = codes.detached()
        recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        if self.cfg.target_l0 is None:
            sparsity = l0
        else:
            sparsity = (l0 / self.cfg.target_l0 - 1).pow(2)
        penalty = self.cfg.sparsity_penalty * sparsity_multiplier(step, self.cfg.sparsity_warmup_steps)
        loss = recon_loss + penalty * sparsity
        metrics = {
            "mse_loss": recon_loss.detach(),
            "sparsity_loss": sparsity.detach(),
            "l0": l0.detach(),
            "loss": loss.detach(),
        }
        return LossOutput(loss, features, metrics)

    def after_optimizer_step(self, step: int, x: torch.Tensor) -> None:
        with torch.no_grad():
            self.ae.threshold.clamp_(min=0.0)
