"""p-annealing of the sparsity penalty (Karvonen et al. 2024, "Measuring Progress in Dictionary
Learning for Language Model Interpretability with Board Game Models").

The standard SAE (f = ReLU(W_enc (x − b_dec) + b_enc), x̂ = W_dec f + b_dec, unit-norm decoder
columns via ConstrainedAdam) with an Lp sparsity penalty whose exponent p shrinks during training:

    L = (1/B) Σ_b ‖x_b − x̂_b‖²₂  +  λ_k · (1/B) Σ_b S_p(f_b)
    S_p(f) = Σ_i f_i^p                  ("Lp^p", the default)
    S_p(f) = (Σ_i f_i^p)^(1/p)          ("Lp")

At p = 1 this is the L1 recipe (a convex start); as p → 0, Σ_i f_i^p tends to the L0 norm, the
sparsity we actually want. p starts at `p_start` and moves linearly to `p_end` in
N = `n_sparsity_updates` equal jumps between steps `anneal_start` and `anneal_end` (default: the
end of the run): the k-th jump (k = 0 … N−1) happens after step

    t_k = anneal_start + ⌊k (anneal_end − anneal_start) / N⌋,   p ← p_start + (k+1)/N · (p_end − p_start).

Because S_p changes scale with p, λ is rescaled at every jump so that the penalty is continuous:

    λ_new = λ_old · mean S_p_old(f) / mean S_p_new(f),

both means over the features of the last `sparsity_queue_length` training batches before the
jump (1: just the batch of step t_k). S at the next p is only computed inside that window.

Optional dead-latent resampling every `resample_steps` steps as in the standard recipe (Bricken
et al. 2023): latents that did not fire during the window get encoder row 0.2 · (mean alive
encoder-row norm) · x/‖x‖ and decoder column x/‖x‖ for inputs x sampled ∝ ‖x − x̂‖², zero
biases, and zeroed Adam moments. The LR warmup restarts after each resample.

Unlike saprmarks/dictionary_learning's PAnnealTrainer: p does reach p_end (there the last change
falls on the final step and never happens), every change rescales λ (there the first does not),
and resampling writes the new weights (there it assigned into a copy, leaving them unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from ..dictionary import AutoEncoder, SparseCodes
from .base import (
    ConstrainedAdam,
    LossOutput,
    SAETrainer,
    TrainerConfig,
    resample_dead_latents_,
    scale_encoder_init_,
    sparsity_multiplier,
)

SPARSITY_FUNCTIONS = ("Lp^p", "Lp")


def lp_sparsity(f: torch.Tensor | SparseCodes, p: float, kind: str = "Lp^p") -> torch.Tensor:
    """(1/N) Σ_n S_p(f_n) for non-negative features f, dense [..., F] or SparseCodes of N tokens:
    S_p = Σ_i f_i^p ("Lp^p") or (Σ_i f_i^p)^(1/p) ("Lp").

    Where f_i = 0 the derivative p·f_i^(p−1) is infinite, but the ReLU in front of f passes no
    gradient there (its backward masks rather than multiplies), so the gradient stays finite.
    """
    values = f.values if isinstance(f, SparseCodes) else f
    powered = values if p == 1.0 else values.pow(p)
    per_entry_sum = kind != "Lp" or p == 1.0  # S_p is a plain sum over the entries
    if isinstance(f, SparseCodes):
        if per_entry_sum:
            return powered.sum() / f.n_rows
        per_token = powered.new_zeros(f.n_rows).index_add(0, f.rows, powered)
    else:
        per_token = powered.sum(dim=-1)
    if not per_entry_sum:
        per_token = per_token.pow(1.0 / p)
    return per_token.mean()


class PAnnealSchedule:
    """The p schedule and the λ rescaling of p-annealing (see the module docstring).

    State: `n_changes_done` (how many of the N jumps happened), `sparsity_coeff` (λ now) and the
    queue of (S_p(f), S_p_next(f)) measured on the batches before the coming jump.
    """

    @classmethod
    def from_config(cls, config, anneal_end: int) -> "PAnnealSchedule":
        """The schedule of a PAnnealTrainerConfig / GatedAnnealTrainerConfig."""
        return cls(
            config.initial_sparsity_penalty, config.p_start, config.p_end, config.anneal_start, anneal_end,
            config.n_sparsity_updates, config.sparsity_queue_length, config.sparsity_function,
        )

    def __init__(
        self,
        initial_sparsity_penalty: float,
        p_start: float,
        p_end: float,
        anneal_start: int,
        anneal_end: int,
        n_sparsity_updates: int,
        sparsity_queue_length: int,
        sparsity_function: str,
    ):
        self.p_start, self.p_end = p_start, p_end
        self.n_updates = n_sparsity_updates
        self.queue_length = sparsity_queue_length
        self.sparsity_function = sparsity_function
        span = anneal_end - anneal_start
        self.change_steps = [anneal_start + (k * span) // n_sparsity_updates for k in range(n_sparsity_updates)]
        self.n_changes_done = 0
        self.sparsity_coeff = float(initial_sparsity_penalty)
        self.queue: list[tuple[torch.Tensor, torch.Tensor]] = []

    def p_after(self, n_changes: int) -> float:
        return self.p_start + n_changes / self.n_updates * (self.p_end - self.p_start)

    @property
    def p(self) -> float:
        return self.p_after(self.n_changes_done)

    @property
    def next_p(self) -> float | None:
        return self.p_after(self.n_changes_done + 1) if self.n_changes_done < self.n_updates else None

    def measures_next(self, step: int) -> bool:
        """Whether `step` is in the window whose batches set λ at the coming jump."""
        if self.n_changes_done == self.n_updates:
            return False
        return step > self.change_steps[self.n_changes_done] - self.queue_length

    def penalty(self, f: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """λ · mean S_p(f) for features f [..., F], and detached metrics (with S at the next p
        inside the measuring window)."""
        sparsity = lp_sparsity(f, self.p, self.sparsity_function)
        metrics = {
            "sparsity_loss": sparsity.detach(),
            "p": torch.tensor(self.p),
            "sparsity_coeff": torch.tensor(self.sparsity_coeff),
        }
        if self.measures_next(step):
            with torch.no_grad():
                metrics["sparsity_loss_next_p"] = lp_sparsity(f, self.next_p, self.sparsity_function)
        return self.sparsity_coeff * sparsity, metrics

    def observe(self, step: int, metrics: dict[str, torch.Tensor]) -> None:
        """After the optimizer step of `step`: queue this batch's measurements and, at a jump,
        rescale λ and advance p."""
        if "sparsity_loss_next_p" in metrics:
            self.queue.append((metrics["sparsity_loss"], metrics["sparsity_loss_next_p"]))
            self.queue = self.queue[-self.queue_length :]
        if self.n_changes_done < self.n_updates and step >= self.change_steps[self.n_changes_done]:
            if self.queue:
                current = torch.stack([c for c, _ in self.queue]).mean()
                upcoming = torch.stack([n for _, n in self.queue]).mean()
                if bool(upcoming > 0):  # no firing latents at all: nothing to match, keep λ
                    self.sparsity_coeff *= (current / upcoming).item()
            self.n_changes_done += 1
            self.queue = []

    def state_dict(self) -> dict:
        return {"n_changes_done": self.n_changes_done, "sparsity_coeff": self.sparsity_coeff, "queue": list(self.queue)}

    def load_state_dict(self, state: dict) -> None:
        self.n_changes_done = state["n_changes_done"]
        self.sparsity_coeff = state["sparsity_coeff"]
        self.queue = [tuple(pair) for pair in state["queue"]]


def check_anneal_config(cfg, trainer_name: str) -> int:
    """Validate the p-annealing fields of a config; returns anneal_end (resolved from steps)."""
    if cfg.sparsity_function not in SPARSITY_FUNCTIONS:
        raise ValueError(f"sparsity_function must be one of {SPARSITY_FUNCTIONS}, got {cfg.sparsity_function!r}")
    if not (cfg.p_start > 0 and cfg.p_end > 0):
        raise ValueError(
            f"p_start and p_end must be > 0, got p_start={cfg.p_start}, p_end={cfg.p_end}: at p = 0 the "
            "penalty Σ f_i^0 counts every latent, firing or not, and has no gradient"
        )
    anneal_end = cfg.anneal_end if cfg.anneal_end is not None else cfg.steps
    if anneal_end is None:
        raise ValueError(
            f"{trainer_name} needs to know when annealing ends: pass steps=... (to trainSAE or the config) "
            "or set anneal_end"
        )
    if not 0 <= cfg.anneal_start < anneal_end:
        raise ValueError(
            f"anneal_start ({cfg.anneal_start}) must be >= 0 and before anneal_end ({anneal_end}, the end of "
            "the run unless set); lower anneal_start for a short run"
        )
    if not isinstance(cfg.n_sparsity_updates, int) or isinstance(cfg.n_sparsity_updates, bool):
        raise ValueError(
            f"n_sparsity_updates must be a number of changes of p, got {cfg.n_sparsity_updates!r} (for a change "
            "after every step pass anneal_end − anneal_start)"
        )
    if not 1 <= cfg.n_sparsity_updates <= anneal_end - cfg.anneal_start:
        raise ValueError(
            f"n_sparsity_updates must be between 1 and anneal_end − anneal_start = {anneal_end - cfg.anneal_start} "
            f"(one change of p per step at most), got {cfg.n_sparsity_updates}"
        )
    if cfg.sparsity_queue_length < 1:
        raise ValueError(f"sparsity_queue_length must be >= 1 batch, got {cfg.sparsity_queue_length}")
    if cfg.resample_steps is not None and cfg.resample_steps <= 0:
        raise ValueError(f"resample_steps must be a positive number of steps or None, got {cfg.resample_steps}")
    return anneal_end


@dataclass
class PAnnealTrainerConfig(TrainerConfig):
    initial_sparsity_penalty: float = 1e-1  # λ at p = p_start (the L1 penalty of the standard recipe)
    sparsity_function: str = "Lp^p"  # "Lp^p": Σ f_i^p (paper); "Lp": (Σ f_i^p)^(1/p)
    p_start: float = 1.0
    p_end: float = 0.2
    anneal_start: int = 15000  # first change of p (after this step)
    anneal_end: int | None = None  # None: the end of the run (`steps`)
    n_sparsity_updates: int = 10  # N: number of changes of p
    sparsity_queue_length: int = 10  # batches averaged when rescaling λ at a change
    resample_steps: int | None = None  # resample dead latents every this many steps
    resample_encoder_scale: float = 0.2
    init_encoder_scale: float = 0.1  # W_enc = init_encoder_scale · W_decᵀ at initialisation


class AnnealedSparsity:
    """What the p-annealing recipes (PAnnealTrainer, GatedAnnealTrainer) add to a trainer that sets
    `self.anneal` (a PAnnealSchedule): p and λ as properties, the schedule's step after each
    update, and its state in checkpoints. Listed before the trainer base class."""

    anneal: PAnnealSchedule

    @property
    def p(self) -> float:
        return self.anneal.p

    @property
    def sparsity_coeff(self) -> float:
        return self.anneal.sparsity_coeff

    def update(self, step: int, x: torch.Tensor) -> dict[str, torch.Tensor]:
        metrics = super().update(step, x)
        self.anneal.observe(step, metrics)
        return metrics

    def extra_state(self) -> dict:
        return {"anneal": self.anneal.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.anneal.load_state_dict(state["anneal"])


class PAnnealTrainer(AnnealedSparsity, SAETrainer):
    Config = PAnnealTrainerConfig
    dictionary_class = AutoEncoder
    default_lr = 1e-3

    def __init__(self, config: PAnnealTrainerConfig):
        super().__init__(config)
        anneal_end = check_anneal_config(config, type(self).__name__)
        self.anneal = PAnnealSchedule.from_config(config, anneal_end)
        self.ae = AutoEncoder(config.activation_dim, config.dict_size).to(self.device)
        scale_encoder_init_(self.ae.encoder.weight, config.init_encoder_scale)
        self.optimizer = ConstrainedAdam(self.ae.parameters(), [self.ae.decoder.weight], lr=self.lr)

    def loss(self, x: torch.Tensor, step: int) -> LossOutput:
        x_hat, f = self.ae(x, output_features=True)
        recon_loss = (x - x_hat).pow(2).sum(dim=-1).mean()
        penalty, metrics = self.anneal.penalty(f, step)
        loss = recon_loss + sparsity_multiplier(step, self.cfg.sparsity_warmup_steps) * penalty
        metrics.update(mse_loss=recon_loss.detach(), loss=loss.detach())
        return LossOutput(loss, f, metrics)

    def resample_neurons(self, dead_mask: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Re-initialise the latents in `dead_mask` [F] from inputs x; returns their indices."""
        return resample_dead_latents_(
            self.ae, self.optimizer, self.dead_tracker, dead_mask, x, [self.ae.encoder.bias],
            self.cfg.resample_encoder_scale,
        )
