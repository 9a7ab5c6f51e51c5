"""Gated SAE training (Rajamanoharan et al. 2024, "Improving Dictionary Learning with Gated Sparse
Autoencoders", section 3).

The dictionary (GatedAutoEncoder) separates which latents fire from how strongly:

    π_gate(x) = W_gate (x − b_dec) + b_gate,    π_mag(x) = exp(r_mag) ⊙ W_gate (x − b_dec) + b_mag
    f(x) = 1[π_gate(x) > 0] ⊙ ReLU(π_mag(x)),   x̂(f) = W_dec f + b_dec

The Heaviside gate has no gradient, so the gate path is trained through ReLU(π_gate) instead. On a
batch x [B, D] (every term a batch mean of per-token sums over D or F):

    L = ‖x − x̂(f(x))‖²₂                                  reconstruction (trains the magnitudes)
      + λ ‖ReLU(π_gate(x))‖₁                             sparsity, on the gate path only
      + ‖x − x̂_frozen(ReLU(π_gate(x)))‖²₂                 auxiliary: the gate alone must reconstruct

x̂_frozen uses a frozen (stop-gradient) copy of W_dec and b_dec, so the auxiliary term trains the
gate path (W_gate, b_gate) and not the decoder; b_dec still receives its gradient through the
input centering x − b_dec, as in the paper's pseudo-code. The magnitude path (r_mag, b_mag) is
trained by the reconstruction term alone, and as the L1 penalty touches only the gate, the
magnitudes suffer no shrinkage. Decoder columns are kept at unit norm (ConstrainedAdam), which
keeps the L1 penalty meaningful (with free norms it could be shrunk away by scaling W_gate down
and W_dec up). Adam runs with β1 = 0, β2 = 0.999 (`adam_betas`, DeepMind's setting and that of
saprmarks/dictionary_learning's original gated trainer). Dead latents can be resampled as in
Bricken et al. (2023), as the paper does (`resample_steps`; the LR warmup restarts after each).

Speed: W_gate x is one matmul without autograd. While many gates are open (early training) the
rest is dense, with one fused autograd Function for both paths (GatedEncode); once fewer than
DENSE_DECODE_DENSITY of them are open, as in a trained gated SAE, f and ReLU(π_gate) are held on
the open gates only (SparseCodes): sparse encoder backward, embedding-bag decodes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..dictionary import GatedAutoEncoder, GatedEncode, SparseCodes, sparse_decode
from .base import (
    ConstrainedAdam,
    LossOutput,
    SAETrainer,
    TrainerConfig,
    resample_dead_latents_,
    scale_encoder_init_,
    sparsity_multiplier,
)
from .p_anneal import lp_sparsity
from .top_k import gather_preactivations, prefers_dense

Features = torch.Tensor | SparseCodes  # [N, F] dense, or the open gates only
DENSITY_SAMPLE_STRIDE = 8  # dense or sparse path: decided on every 8th token (one [N/8, F] pass)


@dataclass
class GatedSAETrainerConfig(TrainerConfig):
    l1_penalty: float = 1e-1  # λ
    adam_betas: tuple[float, float] = (0.0, 0.999)
    resample_steps: int | None = None  # resample dead latents every this many steps
    resample_encoder_scale: float = 0.2
    init_encoder_scale: float = 1.0  # W_gate = init_encoder_scale · W_decᵀ at init (1: the paper's tied init)


class GatedSAETrainer(SAETrainer):
    Config = GatedSAETrainerConfig
    dictionary_class = GatedAutoEncoder
    default_lr = 5e-5  # saprmarks/dictionary_learning's default (the paper used 3e-4 at its input scale)

    def __init__(self, config: GatedSAETrainerConfig):
        super().__init__(config)
        if config.resample_steps is not None and config.resample_steps <= 0:
            raise ValueError(f"resample_steps must be a positive number of steps or None, got {config.resample_steps}")
        betas = tuple(config.adam_betas)
        if len(betas) != 2 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"adam_betas must be two numbers in [0, 1), got {config.adam_betas!r}")
        self.ae = GatedAutoEncoder(config.activation_dim, config.dict_size).to(self.device)
        scale_encoder_init_(self.ae.encoder.weight, config.init_encoder_scale)
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.decoder.weight], lr=self.lr, betas=betas)

    def sparsity_penalty(self, gate: Features, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ ‖ReLU(π_gate)‖₁ (batch mean) for gate = ReLU(π_gate) (non-negative), [N, F] or sparse."""
        l1 = lp_sparsity(gate, 1.0)
        return self.cfg.l1_penalty * l1, {"sparsity_loss": l1.detach()}

    def loss_terms(self, x: torch.Tensor) -> tuple[Features, Features, torch.Tensor, torch.Tensor]:
        """(f, ReLU(π_gate), reconstruction loss, auxiliary loss) on x [..., D].

        z = W_gate x [N, F] is one matmul without autograd. While more than DENSE_DECODE_DENSITY of
        the gates are open (early in training) the rest is dense (GatedEncode, then two decoder
        matmuls); once the gates are sparse, as in a trained gated SAE, f and ReLU(π_gate) live on
        the M open gates only: z is gathered there with a sparse encoder backward and both
        reconstructions are embedding-bag sums, O(M·D) instead of O(N·F·D).
        """
        ae = self.ae
        x = x.reshape(-1, self.cfg.activation_dim)
        n_tokens = x.shape[0]
        with torch.no_grad():
            z = x @ ae.encoder.weight.T  # [N, F]
        gate_bias, mag_bias = ae.folded_biases()  # π_gate = z + gate_bias, π_mag = exp(r_mag) ⊙ z + mag_bias
        with torch.no_grad():  # the share of open gates (π_gate > 0), from every 8th token
            sampled = z[::DENSITY_SAMPLE_STRIDE]
            n_open_sampled = int((sampled > -gate_bias).sum())
        frozen_decoder, frozen_bias = ae.decoder.weight.detach(), ae.decoder_bias.detach()
        if prefers_dense(n_open_sampled, sampled.shape[0], self.cfg.dict_size):
            f, gate = GatedEncode.apply(z, x, ae.encoder.weight, gate_bias, ae.r_mag, mag_bias)  # [N, F] each
            x_hat = ae.decode(f)
            # the gate path through a frozen decoder: gradients reach W_gate and b_gate only
            x_hat_gate = F.linear(gate, frozen_decoder, frozen_bias)
        else:
            rows, columns = (z > -gate_bias).nonzero(as_tuple=True)  # the M open gates
            z_open = gather_preactivations(z, x, ae.encoder.weight, None, None, rows, columns)  # [M]
            gate = SparseCodes(z_open + gate_bias.index_select(0, columns), rows, columns, n_tokens)
            magnitude = ae.r_mag.exp().index_select(0, columns) * z_open + mag_bias.index_select(0, columns)
            f = gate._replace(values=magnitude.relu())
            decoder_rows = ae.decoder.weight.T.contiguous()  # [F, D]
            x_hat = sparse_decode(f, decoder_rows) + ae.decoder_bias
            x_hat_gate = sparse_decode(gate, decoder_rows.detach()) + frozen_bias
        recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        aux_loss = (x - x_hat_gate).pow(2).sum(dim=-1).mean()
        return f, gate, recon_loss, aux_loss

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        f, gate, recon_loss, aux_loss = self.loss_terms(x)
        penalty, metrics = self.sparsity_penalty(gate, step)
        loss = recon_loss + sparsity_multiplier(step, self.cfg.sparsity_warmup_steps) * penalty + aux_loss
        metrics.update(mse_loss=recon_loss.detach(), aux_loss=aux_loss.detach(), loss=loss.detach())
        features = f._replace(values=f.values.detach()) if isinstance(f, SparseCodes) else f
        return LossOutput(loss, features, metrics)

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Re-initialise the latents in `dead_mask` [F] from inputs x (gate row, decoder column,
        b_gate, b_mag and r_mag); returns their indices."""
        ae = self.ae
        return resample_dead_latents_(
            ae, self.optimizer, self.dead_tracker, dead_mask, x, [ae.gate_bias, ae.mag_bias, ae.r_mag],
            self.cfg.resample_encoder_scale,
        )
