"""Synthetic activations with known features: ground truth for testing dictionary learning.

Each sample is a sparse non-negative combination of `n_features` fixed unit-norm directions
d_i in R^D, plus optional isotropic noise and a constant offset:

    x = b + sum_i s_i a_i d_i + noise,   s_i ~ Bernoulli(p_i),  a_i >= 0,  noise ~ N(0, sigma^2 I)

Firing probabilities are Zipf-like, p_i ∝ 1/(i+1)^alpha (feature 0 fires most often), scaled so
that sum_i p_i = `mean_active`, the expected number of active features per sample. Probabilities
that would exceed 1 are capped at 1 and the rest rescaled, so the mean stays exact.

Sampling never builds the dense [B, n_features] Bernoulli mask. For each feature the positions of
its active samples in the batch are drawn directly as a Bernoulli process (geometric gaps between
successive active samples), which costs O(B * mean_active) random numbers instead of
O(B * n_features); the batch is then the sparse codes times the feature matrix (a weighted
embedding_bag; timings against the dense alternatives in benchmarks/README.md).

The module also holds the metrics that compare a learned dictionary with the true features:
`mean_max_cosine_similarity` (MMCS), `fraction_recovered`, and the chance level of MMCS for random
directions, `chance_max_cosine_similarity`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
import torch.nn as nn

MAGNITUDE_DISTRIBUTIONS = ("folded_normal", "exponential", "uniform", "constant")


@dataclass
class SyntheticConfig:
    """Parameters of a synthetic activation stream.

    activation_dim: D, dimension of each activation vector.
    n_features: number of true feature directions (unit-norm Gaussian directions in R^D).
    mean_active: expected number of active features per sample, sum_i p_i.
    zipf_exponent: alpha in p_i ∝ 1/(i+1)^alpha; 0 gives equal frequencies.
    magnitude_dist: law of the magnitude a_i of an active feature:
        "folded_normal": |N(magnitude_mean, magnitude_std^2)|
        "exponential":   Exponential with mean magnitude_mean (magnitude_std is ignored)
        "uniform":       U[mean - sqrt(3) std, mean + sqrt(3) std] (mean and std as given; needs
                         mean >= sqrt(3) std so magnitudes are non-negative)
        "constant":      always magnitude_mean
    noise_std: sigma of the isotropic Gaussian noise added to every sample.
    bias_norm: norm of the constant offset b (a random direction fixed by `seed`); tests b_dec.
    batch_size: batch size of `next(stream)` and of `sample()` when none is given.
    seed: seeds the feature directions and the offset.
    stream_seed: seeds the sample stream; None means `seed`. Two streams with the same `seed`
        and different `stream_seed` share their features (e.g. train and held-out data).
    device: where features live and batches are produced (the features themselves are drawn on
        CPU, so they are the same on every device).
    """

    activation_dim: int = 64
    n_features: int = 512
    mean_active: float = 5.0
    zipf_exponent: float = 1.0
    magnitude_dist: str = "folded_normal"
    magnitude_mean: float = 1.0
    magnitude_std: float = 0.25
    noise_std: float = 0.0
    bias_norm: float = 0.0
    batch_size: int = 4096
    seed: int = 0
    stream_seed: int | None = None
    device: str | torch.device = "cpu"

    def __post_init__(self):
        for name in ("activation_dim", "n_features", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"SyntheticConfig.{name} must be a positive int, got {value!r}.")
        if not 0 < self.mean_active <= self.n_features:
            raise ValueError(
                f"SyntheticConfig.mean_active must be in (0, n_features={self.n_features}], got "
                f"{self.mean_active!r}: it is the expected number of active features per sample."
            )
        if self.zipf_exponent < 0:
            raise ValueError(
                f"SyntheticConfig.zipf_exponent must be >= 0, got {self.zipf_exponent!r}."
            )
        if self.magnitude_dist not in MAGNITUDE_DISTRIBUTIONS:
            raise ValueError(
                f"SyntheticConfig.magnitude_dist={self.magnitude_dist!r} is unknown; choose one of "
                f"{', '.join(MAGNITUDE_DISTRIBUTIONS)}."
            )
        if self.magnitude_mean <= 0 or self.magnitude_std < 0:
            raise ValueError(
                "SyntheticConfig needs magnitude_mean > 0 and magnitude_std >= 0, got "
                f"magnitude_mean={self.magnitude_mean!r}, magnitude_std={self.magnitude_std!r}."
            )
        uniform_low = self.magnitude_mean - math.sqrt(3) * self.magnitude_std
        if self.magnitude_dist == "uniform" and uniform_low < 0:
            raise ValueError(
                f"uniform magnitudes with magnitude_mean={self.magnitude_mean} and magnitude_std="
                f"{self.magnitude_std} would go below 0 (lower end mean - sqrt(3) std); lower "
                "magnitude_std or raise magnitude_mean."
            )
        if self.noise_std < 0 or self.bias_norm < 0:
            raise ValueError(
                "SyntheticConfig.noise_std and bias_norm must be >= 0, got "
                f"noise_std={self.noise_std!r}, bias_norm={self.bias_norm!r}."
            )


def zipf_firing_probabilities(n_features: int, mean_active: float, exponent: float) -> torch.Tensor:
    """p_i = min(1, c / (i+1)^exponent) with c chosen so that sum_i p_i = mean_active. [n] float64.

    c is found by water-filling: cap the probabilities that exceed 1, rescale the others to the
    remaining budget, repeat until none exceeds 1 (weights decrease: the capped ones are a prefix).
    """
    if not 0 < mean_active <= n_features:
        raise ValueError(
            f"mean_active must be in (0, n_features={n_features}], got {mean_active!r}."
        )
    weights = (torch.arange(n_features, dtype=torch.float64) + 1) ** -exponent  # [n]
    capped = torch.zeros(n_features, dtype=torch.bool)
    while True:
        budget = mean_active - capped.sum().item()
        free_weight = weights.masked_fill(capped, 0).sum()
        probs = torch.where(capped, torch.ones_like(weights), weights * budget / free_weight)
        newly_capped = (probs > 1) & ~capped
        if not newly_capped.any():
            return probs.clamp(max=1.0)
        capped |= newly_capped


def _active_positions(
    probs: torch.Tensor,
    batch_size: int,
    generator: torch.Generator,
    draws_per_round: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample s[b, i] ~ Bernoulli(probs[i]) independently for b < batch_size, sparsely.

    Returns (rows, cols), both [nnz] int64: the entries (b, i) with s[b, i] = 1, grouped by
    feature i in increasing order and increasing in b within a feature.

    Within a feature the active samples form a Bernoulli process: the number of inactive samples
    before the next active one is Geometric(p), drawn as floor(log U / log(1 - p)). Each round
    draws `draws_per_round[i]` gaps per unfinished feature (default mean + 4 std + 4, so a second
    round is rarely needed) and continues from the last position, which keeps the law exact.
    """
    n_features, device = probs.numel(), probs.device
    if draws_per_round is None:
        expected = batch_size * probs
        draws_per_round = (expected + 4 * (expected * (1 - probs)).sqrt() + 4).ceil().long()
    draws_per_round = draws_per_round.clamp(1, batch_size)
    log_q = torch.log1p(-probs)  # [n], -inf where p = 1 (gap 0)

    features = torch.arange(n_features, device=device)  # unfinished features
    last = torch.full((n_features,), -1, dtype=torch.long, device=device)  # last position drawn
    round_rows, round_cols = [], []
    while features.numel() > 0:
        draws = draws_per_round[features]  # [m]
        n_draws = int(draws.sum())
        cols = torch.repeat_interleave(features, draws, output_size=n_draws)  # [k]
        uniform = 1 - torch.rand(n_draws, generator=generator, dtype=torch.float64, device=device)
        gaps = torch.floor(torch.log(uniform) / log_q[cols])  # [k] inactive samples before next
        # a step past the batch end is as good as any longer one: cap it so int64 sums stay exact
        gaps = gaps.nan_to_num(nan=batch_size, posinf=batch_size).clamp(max=batch_size)
        total = torch.cumsum(gaps.long() + 1, 0)  # [k]
        ends = torch.cumsum(draws, 0)  # [m] end of each feature's draws in the flat arrays
        earlier = torch.cat([total.new_zeros(1), total[ends[:-1] - 1]])  # [m] earlier features' sum
        start = torch.repeat_interleave(last[features] - earlier, draws, output_size=n_draws)
        positions = total + start  # [k] restarts from `last` at each feature
        keep = positions < batch_size
        round_rows.append(positions[keep])
        round_cols.append(cols[keep])
        last[features] = positions[ends - 1]
        features = features[last[features] < batch_size - 1]
    rows, cols = torch.cat(round_rows), torch.cat(round_cols)
    if len(round_rows) > 1:  # later rounds appended positions after all features: regroup
        order = torch.argsort(cols * batch_size + rows)
        rows, cols = rows[order], cols[order]
    return rows, cols


def _codes_times_features(
    rows: torch.Tensor,
    cols: torch.Tensor,
    magnitudes: torch.Tensor,
    features: torch.Tensor,
    batch_size: int,
) -> torch.Tensor:
    """x[b] = sum over active (b, i) of a_bi * features[i], without a dense [B, n] matrix. [B, D].

    A weighted `embedding_bag` over the active entries regrouped by sample (on CPU faster than a CSC
    sparse matmul or index_add_: benchmarks/README.md); its forward is deterministic.
    """
    by_sample = torch.sort(rows, stable=True).indices  # [nnz]
    per_sample = torch.bincount(rows, minlength=batch_size)  # [B]
    offsets = torch.cumsum(per_sample, 0) - per_sample  # [B] start of each sample's entries
    return nn.functional.embedding_bag(
        cols[by_sample], features, offsets, mode="sum", per_sample_weights=magnitudes[by_sample]
    )


def _dense_codes(
    rows: torch.Tensor,
    cols: torch.Tensor,
    magnitudes: torch.Tensor,
    batch_size: int,
    n_features: int,
) -> torch.Tensor:
    """The sparse codes as a dense [B, n] matrix (a_bi where active, else 0)."""
    codes = torch.zeros(batch_size, n_features, dtype=magnitudes.dtype, device=rows.device)
    codes[rows, cols] = magnitudes
    return codes


class SyntheticActivations:
    """An endless, seeded stream of synthetic activations [B, D] (float32) with known features.

    `next(stream)` gives a batch of `config.batch_size`, so the object can stand in for an
    ActivationBuffer. The stream depends only on the config (its own torch.Generator; the global
    RNG is never used): same config, same batches.
    """

    def __init__(self, config: SyntheticConfig | None = None, **overrides):
        if config is None:
            config = SyntheticConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a SyntheticConfig or keyword overrides, not both.")
        self.config = config
        self.device = torch.device(config.device)

        feature_generator = torch.Generator().manual_seed(config.seed)
        shape = (config.n_features, config.activation_dim)
        features = torch.randn(shape, generator=feature_generator)
        self._features = (features / features.norm(dim=1, keepdim=True)).to(self.device)  # [n, D]
        bias_direction = torch.randn(config.activation_dim, generator=feature_generator)
        bias = config.bias_norm * bias_direction / bias_direction.norm()
        self._bias = bias.to(self.device)  # [D]
        self._probs = zipf_firing_probabilities(
            config.n_features, config.mean_active, config.zipf_exponent
        ).to(self.device)  # [n] float64

        stream_seed = config.seed if config.stream_seed is None else config.stream_seed
        self.generator = torch.Generator(device=self.device).manual_seed(stream_seed)

    @property
    def true_features(self) -> torch.Tensor:
        """The true feature directions, unit-norm rows [n_features, D]. Do not modify in place."""
        return self._features

    @property
    def firing_probabilities(self) -> torch.Tensor:
        """p_i, the probability that feature i is active in a sample. [n_features] float64."""
        return self._probs

    @property
    def bias(self) -> torch.Tensor:
        """The constant offset b added to every sample. [D]."""
        return self._bias

    def sample(self, batch_size: int | None = None, return_codes: bool = False):
        """One batch x [B, D] float32. With return_codes=True, (x, codes) where codes [B, n]
        holds a_i where feature i is active, else 0: x = codes @ true_features + bias + noise."""
        batch_size = self.config.batch_size if batch_size is None else batch_size
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        rows, cols = _active_positions(self._probs, batch_size, self.generator)
        magnitudes = self._magnitudes(rows.numel())
        x = _codes_times_features(rows, cols, magnitudes, self._features, batch_size)  # [B, D]
        if self.config.bias_norm > 0:
            x = x + self._bias
        if self.config.noise_std > 0:
            noise = torch.randn(x.shape, generator=self.generator, device=self.device)
            x = x + self.config.noise_std * noise
        if return_codes:
            return x, _dense_codes(rows, cols, magnitudes, batch_size, self.config.n_features)
        return x

    def _magnitudes(self, n: int) -> torch.Tensor:
        cfg, g, dev = self.config, self.generator, self.device
        if cfg.magnitude_dist == "folded_normal":
            normal = torch.randn(n, generator=g, device=dev)
            return (cfg.magnitude_mean + cfg.magnitude_std * normal).abs()
        if cfg.magnitude_dist == "exponential":
            return torch.empty(n, device=dev).exponential_(1 / cfg.magnitude_mean, generator=g)
        if cfg.magnitude_dist == "uniform":
            half_width = math.sqrt(3) * cfg.magnitude_std
            uniform = torch.rand(n, generator=g, device=dev)
            return cfg.magnitude_mean + half_width * (2 * uniform - 1)
        return torch.full((n,), float(cfg.magnitude_mean), device=dev)

    def batches(
        self, batch_size: int | None = None, n_batches: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Yield `n_batches` batches [batch_size, D] (forever when n_batches is None)."""
        produced = 0
        while n_batches is None or produced < n_batches:
            yield self.sample(batch_size)
            produced += 1

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.sample()


# ---------------------------------------------------------------------------------------------
# Comparing learned dictionaries with the true features
# ---------------------------------------------------------------------------------------------


def dictionary_directions(dictionary) -> torch.Tensor:
    """The dictionary's decoder directions as unit-norm rows [F, D] (float32, detached).

    Reads `dictionary.W_dec`, a [F, D] tensor (every dictionary of this library, and SAELens'), or
    `dictionary.decoder`, an nn.Linear whose weight is [D, F] (the reference library's AutoEncoder,
    Gated and TopK classes: weight.T is returned). Zero directions stay zero.
    """
    decoder = getattr(dictionary, "decoder", None)
    if isinstance(getattr(dictionary, "W_dec", None), torch.Tensor):
        directions = dictionary.W_dec  # [F, D]
    elif isinstance(decoder, nn.Linear):
        directions = decoder.weight.T  # [D, F] -> [F, D]
    else:
        raise TypeError(
            f"cannot find decoder directions on a {type(dictionary).__name__}: expected a "
            "`decoder` nn.Linear (weight [D, F]) or a `W_dec` tensor [F, D]. For other layouts "
            "pass the directions as a [F, D] tensor to mean_max_cosine_similarity directly."
        )
    if directions.ndim != 2:
        raise ValueError(
            f"{type(dictionary).__name__}.W_dec must be 2-D [F, D], got shape "
            f"{tuple(directions.shape)}."
        )
    directions = directions.detach().float()
    return directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)


def max_cosine_similarities(
    decoder_directions, true_features: torch.Tensor, max_chunk_elements: int = 2**24
) -> torch.Tensor:
    """For each true feature, max_j cos(true_i, learned_j) over the learned directions. [n_true].

    decoder_directions: learned directions as rows [F, D] (any norm), or a dictionary (see
    `dictionary_directions`). true_features: [n_true, D]. The cosine is signed: a learned direction
    pointing opposite to a (non-negative) feature does not recover it. The [n_true, F] similarity
    matrix is computed in chunks of at most `max_chunk_elements` entries.
    """
    if not isinstance(decoder_directions, torch.Tensor):
        decoder_directions = dictionary_directions(decoder_directions)
    if decoder_directions.ndim != 2 or true_features.ndim != 2:
        raise ValueError(
            "decoder_directions and true_features must be 2-D [rows, D], got shapes "
            f"{tuple(decoder_directions.shape)} and {tuple(true_features.shape)}."
        )
    if decoder_directions.shape[1] != true_features.shape[1]:
        raise ValueError(
            f"decoder_directions {tuple(decoder_directions.shape)} and true_features "
            f"{tuple(true_features.shape)} disagree on D (last dim). Learned directions must be "
            "rows [F, D]; a decoder.weight is [D, F]: pass decoder.weight.T or use "
            "dictionary_directions(dictionary)."
        )
    learned = decoder_directions.detach().float().to(true_features.device)
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [F, D]
    true = true_features.detach().float()
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)  # [n_true, D]
    chunk = max(1, max_chunk_elements // learned.shape[0])
    return torch.cat([(block @ learned.T).max(dim=1).values for block in true.split(chunk)])


def mean_max_cosine_similarity(decoder_directions, true_features: torch.Tensor) -> float:
    """MMCS = mean over true features i of max_j cos(true_i, learned_j); 1 means every true
    feature has a learned direction pointing exactly along it (extra learned directions are free).
    Arguments as in `max_cosine_similarities`."""
    return max_cosine_similarities(decoder_directions, true_features).mean().item()


def fraction_recovered(
    decoder_directions, true_features: torch.Tensor, threshold: float = 0.9
) -> float:
    """Fraction of true features whose best-matching learned direction has cosine > threshold."""
    best = max_cosine_similarities(decoder_directions, true_features)  # [n_true]
    return (best > threshold).float().mean().item()


def chance_max_cosine_similarity(
    activation_dim: int, n_directions: int, grid_size: int = 200_001
) -> float:
    """Expected MMCS of `n_directions` independent uniformly random unit directions in R^D.

    The angle θ between a fixed unit vector and a random one has density ∝ sin^(D-2)(θ); with H
    its CDF, P(max cos < cos θ) = (1 - H(θ))^F and
    E[max cos] = 1 - ∫_{-1}^{1} P(max cos < t) dt = 1 - ∫_0^pi (1 - H(θ))^F sin(θ) dθ.
    Computed by the trapezoid rule on `grid_size` angles (D=3 gives 1 - 2/(F+1) exactly).
    """
    if activation_dim < 2 or n_directions < 1:
        raise ValueError(
            "need activation_dim >= 2 and n_directions >= 1, got "
            f"activation_dim={activation_dim}, n_directions={n_directions}."
        )
    theta = torch.linspace(0, math.pi, grid_size, dtype=torch.float64)
    density = theta.sin().clamp_min(0) ** (activation_dim - 2)
    step = theta[1] - theta[0]
    cdf = torch.cat([theta.new_zeros(1), torch.cumsum((density[1:] + density[:-1]) / 2 * step, 0)])
    cdf = cdf / cdf[-1]
    return 1 - torch.trapezoid((1 - cdf) ** n_directions * theta.sin(), theta).item()


# ---------------------------------------------------------------------------------------------
# Realistic ground truth: feature hierarchies, correlated firing, per-feature magnitudes
# ---------------------------------------------------------------------------------------------


CHILD_FIRING_RULES = ("pick_one", "own_probability")


@dataclass
class HierarchicalConfig:
    """Parameters of a hierarchical synthetic stream (`HierarchicalActivations`).

    The features form `n_roots` trees of `depth` levels below each root, every node with
    `branching` children, plus `n_independent` features outside any tree. Feature indices go level
    by level: the roots [0, n_roots), then their children (child j of node i of a level follows its
    siblings), ..., then the independent features.
    """

    activation_dim: int = 64
    """D; with more features than D they are in superposition."""
    n_roots: int = 32
    """trees (top-level features)."""
    branching: int = 3
    """children of every node above the last level."""
    depth: int = 2
    """levels below each root (0: no children)."""
    n_independent: int = 64
    """top-level features without children."""
    mean_active_top: float = 4.0
    """expected number of active top-level features (roots and independent) per sample, before
    the firing probabilities are clipped to [min_firing_probability, max_firing_probability]."""
    zipf_exponent: float = 1.0
    """top-level firing probabilities p_i ∝ 1/(i+1)^exponent (over roots and independent features
    interleaved, so both kinds span the range; with child_firing="own_probability", over all
    features in index order)."""
    min_firing_probability: float = 1e-3
    max_firing_probability: float = 0.4
    child_firing: str = "pick_one"
    """how an active node's children fire (at most one of them: they are mutually exclusive).
    "pick_one": the node activates one child, chosen uniformly, with probability
    `child_probability`. "own_probability" (SynthSAEBench's rule, with its compensated
    probabilities): one Zipf law over all features in index order (the roots, then the levels
    below, the independent features last), p_i = c / (i + 1)^exponent clipped to the firing range,
    c set by `mean_active_top`; every child fires with probability q_i when its parent is active,
    independently of its siblings, and where several siblings fire one of them, chosen uniformly,
    keeps firing. The q_i are set so that each child fires, overall, with its p_i; where a parent
    fires too rarely for its children's p (they share at most its firings), q_i stops at 1 and
    the child fires less."""
    child_probability: float = 0.8
    """with child_firing="pick_one": probability that an active node activates one of its children."""
    compensate_child_probabilities: bool = True
    """with child_firing="own_probability": q_i such that each child fires overall with its p_i (as
    SynthSAEBench); False: q_i = p_i, so a child fires overall with P(parent) · p_i or less."""
    correlation_rank: int = 4
    """rank of the shared factors that correlate the top-level features' firing (0: independent)."""
    correlation_strength: float = 0.3
    """share of each top-level feature's latent Gaussian variance carried by the shared factors."""
    magnitude_mean_min: float = 0.5
    magnitude_mean_max: float = 2.0
    """each feature's mean magnitude is drawn log-uniformly from [min, max]."""
    magnitude_cv: float = 0.25
    """each feature's magnitude is |N(μ_i, (cv · μ_i)²)|."""
    child_magnitude_relative: bool = True
    """a child's magnitude is multiplied by its parent's (a child fires in proportion to it)."""
    noise_std: float = 0.0
    """isotropic Gaussian noise added to every sample."""
    batch_size: int = 4096
    seed: int = 0
    """seeds the directions, probabilities, magnitudes and correlation factors."""
    stream_seed: int | None = None
    """seeds the sample stream; None: `seed`."""
    device: str | torch.device = "cpu"

    def __post_init__(self):
        for name in ("activation_dim", "n_roots", "branching", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"HierarchicalConfig.{name} must be a positive int, got {value!r}.")
        for name in ("depth", "n_independent", "correlation_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"HierarchicalConfig.{name} must be an int >= 0, got {value!r}.")
        if not isinstance(self.compensate_child_probabilities, bool):
            raise ValueError("HierarchicalConfig.compensate_child_probabilities must be True or False, got "
                             f"{self.compensate_child_probabilities!r}.")
        if self.child_firing not in CHILD_FIRING_RULES:
            raise ValueError(f"HierarchicalConfig.child_firing must be one of {CHILD_FIRING_RULES}, got "
                             f"{self.child_firing!r}.")
        for name in ("child_probability", "correlation_strength"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"HierarchicalConfig.{name} must be in [0, 1], got {getattr(self, name)!r}.")
        if not 0 < self.min_firing_probability <= self.max_firing_probability <= 1:
            raise ValueError("HierarchicalConfig needs 0 < min_firing_probability <= max_firing_probability <= 1, "
                             f"got {self.min_firing_probability} and {self.max_firing_probability}.")
        if not 0 < self.magnitude_mean_min <= self.magnitude_mean_max or self.magnitude_cv < 0:
            raise ValueError("HierarchicalConfig needs 0 < magnitude_mean_min <= magnitude_mean_max and "
                             f"magnitude_cv >= 0, got {self.magnitude_mean_min}, {self.magnitude_mean_max}, "
                             f"{self.magnitude_cv}.")
        n_top = self.n_roots + self.n_independent
        if not 0 < self.mean_active_top <= n_top:
            raise ValueError(f"HierarchicalConfig.mean_active_top must be in (0, {n_top}], got {self.mean_active_top!r}.")
        if self.noise_std < 0:
            raise ValueError(f"HierarchicalConfig.noise_std must be >= 0, got {self.noise_std!r}.")

    @property
    def level_sizes(self) -> list[int]:
        """Features per tree level: n_roots · branching^level."""
        return [self.n_roots * self.branching**level for level in range(self.depth + 1)]

    @property
    def n_features(self) -> int:
        return sum(self.level_sizes) + self.n_independent


class HierarchicalActivations:
    """An endless, seeded stream of activations [B, D] built from hierarchical features:

        x = Σ_i a_i d_i + noise,

    where the top-level features (roots and independent ones) fire when a latent Gaussian
    z_i = √ρ (ε U)_i + √(1 − ρ) η_i falls below Φ⁻¹(p_i) (ε ~ N(0, I_r) shared by the sample,
    U [r, T] with unit-norm columns, η_i independent): each fires with probability p_i, and
    features loading on the same factors fire together. An active node activates at most one of
    its children (`child_firing`: one chosen uniformly, with probability `child_probability`; or
    each child by its own Zipfian probability, one of those that fired kept), so children are
    mutually exclusive and never fire without their parent. Magnitudes are |N(μ_i, (cv μ_i)²)|,
    a child's times its parent's. Directions d_i are unit-norm Gaussian in R^D.

    `next(stream)` gives a batch of `config.batch_size`; `sample(return_codes=True)` also returns the
    codes [B, n_features] (a_i where active). The stream depends only on the config.
    """

    def __init__(self, config: HierarchicalConfig | None = None, **overrides):
        if config is None:
            config = HierarchicalConfig(**overrides)
        elif overrides:
            raise TypeError("pass either a HierarchicalConfig or keyword overrides, not both.")
        self.config = cfg = config
        self.device = torch.device(cfg.device)
        g = torch.Generator().manual_seed(cfg.seed)
        n, n_top = cfg.n_features, cfg.n_roots + cfg.n_independent
        directions = torch.randn(n, cfg.activation_dim, generator=g)
        self._features = (directions / directions.norm(dim=1, keepdim=True)).to(self.device)  # [n, D]
        # top-level probabilities, interleaving roots and independent features in the Zipf order
        zipf = zipf_firing_probabilities(n_top, cfg.mean_active_top, cfg.zipf_exponent)
        order = torch.randperm(n_top, generator=g)
        self._top_probs = zipf[order].clamp(cfg.min_firing_probability, cfg.max_firing_probability)  # [T] float64
        if cfg.child_firing == "own_probability":  # one Zipf law over all features, in index order
            n_tree = sum(cfg.level_sizes)
            weights = (torch.arange(n, dtype=torch.float64) + 1) ** -cfg.zipf_exponent
            top_rank = torch.cat([torch.arange(cfg.n_roots), n_tree + torch.arange(cfg.n_independent)])
            zipf_all = (weights * cfg.mean_active_top / weights[top_rank].sum()).clamp(
                cfg.min_firing_probability, cfg.max_firing_probability)
            self._top_probs = zipf_all[top_rank]
        self._child_probs = (self._conditional_child_probabilities(zipf_all[cfg.n_roots : n_tree]).float().to(self.device)
                             if cfg.child_firing == "own_probability" else None)  # [features below the roots]
        self._top_index = torch.cat([torch.arange(cfg.n_roots), sum(cfg.level_sizes) + torch.arange(cfg.n_independent)])
        log_min, log_max = math.log(cfg.magnitude_mean_min), math.log(cfg.magnitude_mean_max)
        self._magnitude_means = torch.exp(log_min + (log_max - log_min) * torch.rand(n, generator=g)).to(self.device)
        factors = torch.randn(cfg.correlation_rank, n_top, generator=g)
        self._factors = (factors / factors.norm(dim=0, keepdim=True).clamp_min(1e-12)).to(self.device)  # [r, T]
        self._thresholds = torch.special.ndtri(self._top_probs).float().to(self.device)  # Φ⁻¹(p) [T]
        stream_seed = cfg.seed if cfg.stream_seed is None else cfg.stream_seed
        self.generator = torch.Generator(device=self.device).manual_seed(stream_seed)

    def _conditional_child_probabilities(self, marginal: torch.Tensor) -> torch.Tensor:
        """child_firing="own_probability": each child's probability of firing given its parent, q_i,
        such that its overall probability P(parent) · q_i E[1/(1 + K_i)] (K_i: its siblings that
        fired) equals its Zipfian p_i (`marginal`, the features below the roots in index order): the
        fixed point of q ← min(1, p / (P(parent) E[1/(1 + K)])) from q = p / P(parent), level by level
        (q only grows, so it converges or stops at 1). [features below the roots] float64."""
        cfg = self.config
        if not cfg.compensate_child_probabilities:
            return marginal.clone()
        parent_active = self._top_probs[: cfg.n_roots].double()  # the roots' probabilities, in index order
        conditional, start = [], 0
        for size in cfg.level_sizes[1:]:
            target = marginal[start : start + size].view(-1, cfg.branching) / parent_active[:, None]  # [P, b]
            q = target.clamp(max=1.0)
            for _ in range(200):
                q_next = (target / _share_if_fired(q)).clamp(max=1.0)
                converged = bool(((q_next - q).abs() < 1e-12).all())
                q = q_next
                if converged:
                    break
            conditional.append(q.flatten())
            parent_active = (parent_active[:, None] * q * _share_if_fired(q)).flatten()
            start += size
        return torch.cat(conditional) if conditional else torch.zeros(0, dtype=torch.float64)

    @property
    def true_features(self) -> torch.Tensor:
        """The true directions, unit-norm rows [n_features, D]. Do not modify in place."""
        return self._features

    @property
    def parents(self) -> torch.Tensor:
        """The parent of each feature (−1 for roots and independent features). [n_features] int64."""
        cfg = self.config
        parents = [torch.full((cfg.n_roots,), -1)]
        start = 0  # first index of the level above
        for size in cfg.level_sizes[1:]:
            parents.append(start + torch.arange(size) // cfg.branching)
            start += size // cfg.branching
        parents.append(torch.full((cfg.n_independent,), -1))
        return torch.cat(parents)

    @property
    def firing_probabilities(self) -> torch.Tensor:
        """P(feature i active) for every feature, [n_features] float64. A root or independent feature
        is active with probability p_i; a child with its parent's probability times r_i, the chance
        that it is the child kept: r_i = c/b with "pick_one" (b = branching, c = child_probability),
        r_i = q_i E[1/(1 + K_i)] with "own_probability" (K_i the number of its siblings that fired)."""
        cfg = self.config
        active = self._top_probs[self._top_index < cfg.n_roots].double()  # the roots, in index order
        levels, start = [active], 0  # start: first index below the roots of the current level
        for size in cfg.level_sizes[1:]:
            if cfg.child_firing == "pick_one":
                kept = torch.full((size,), cfg.child_probability / cfg.branching, dtype=torch.float64)
            else:
                kept = _kept_probabilities(self._child_probs[start : start + size].cpu().view(-1, cfg.branching)).flatten()
            active = active.repeat_interleave(cfg.branching) * kept
            levels.append(active)
            start += size
        return torch.cat([*levels, self._top_probs[self._top_index >= cfg.n_roots].double()])

    @property
    def expected_active(self) -> float:
        """E[number of active features per sample] = Σ_i P(i active) (`firing_probabilities`)."""
        return self.firing_probabilities.sum().item()

    def sample(self, batch_size: int | None = None, return_codes: bool = False):
        """One batch x [B, D] float32; with return_codes=True, (x, codes [B, n_features])."""
        cfg, g, dev = self.config, self.generator, self.device
        batch_size = cfg.batch_size if batch_size is None else batch_size
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")
        z = torch.randn(batch_size, len(self._top_probs), generator=g, device=dev)  # [B, T]
        if cfg.correlation_rank > 0 and cfg.correlation_strength > 0:
            shared = torch.randn(batch_size, cfg.correlation_rank, generator=g, device=dev) @ self._factors
            z = math.sqrt(1 - cfg.correlation_strength) * z + math.sqrt(cfg.correlation_strength) * shared
        rows, top = (z < self._thresholds).nonzero(as_tuple=True)  # the active top-level features, one entry each
        features = self._top_index.to(dev)[top]
        values = self._magnitudes(features)
        entries = [(rows, features, values)]  # (sample, feature, magnitude) of every active feature
        is_root = features < cfg.n_roots
        rows, nodes, codes = rows[is_root], features[is_root], values[is_root]  # the current level's active nodes
        level_start = 0
        for size in cfg.level_sizes[:-1]:  # each active node passes to at most one child
            first_child = level_start + size + (nodes - level_start) * cfg.branching  # [A]
            if cfg.child_firing == "pick_one":
                passes = torch.rand(len(nodes), generator=g, device=dev) < cfg.child_probability
                slot = torch.randint(cfg.branching, (len(nodes),), generator=g, device=dev)
            else:
                children = first_child[:, None] + torch.arange(cfg.branching, device=dev)  # [A, b]
                fired = torch.rand(children.shape, generator=g, device=dev) < self._child_probs[children - cfg.n_roots]
                score = torch.rand(children.shape, generator=g, device=dev).masked_fill(~fired, -1.0)
                passes, slot = fired.any(1), score.argmax(1)  # one of the siblings that fired, uniformly
            rows, parent_codes, nodes = rows[passes], codes[passes], (first_child + slot)[passes]
            codes = self._magnitudes(nodes)
            if cfg.child_magnitude_relative:
                codes = codes * parent_codes
            entries.append((rows, nodes, codes))
            level_start += size
        rows, features, values = (torch.cat(parts) for parts in zip(*entries))
        x = _codes_times_features(rows, features, values, self._features, batch_size)  # [B, D]
        if cfg.noise_std > 0:
            x = x + cfg.noise_std * torch.randn(x.shape, generator=g, device=dev)
        if return_codes:
            return x, _dense_codes(rows, features, values, batch_size, cfg.n_features)
        return x

    def _magnitudes(self, features: torch.Tensor) -> torch.Tensor:
        """|N(μ_i, (cv μ_i)²)| for each entry of `features` (active feature indices) [A]."""
        means = self._magnitude_means[features]
        noise = torch.randn(len(features), generator=self.generator, device=self.device)
        return (means * (1 + self.config.magnitude_cv * noise)).abs()

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        return self.sample()


def _share_if_fired(q: torch.Tensor) -> torch.Tensor:
    """For sibling groups whose members fire independently with probabilities q [P, b] and of which
    one of those that fired is kept uniformly: E[1/(1 + K_i)], K_i the number of member i's siblings
    that fired, so that P(i kept) = q_i E[1/(1 + K_i)]. With the generating function
    E[t^K_i] = Π_{j≠i}(1 − q_j + q_j t), E[1/(1 + K_i)] = ∫₀¹ E[t^K_i] dt, a polynomial of degree
    b − 1 in t, which Gauss–Legendre quadrature with ⌈b/2⌉ nodes integrates exactly. [P, b] float64."""
    q = q.double()
    nodes, weights = np.polynomial.legendre.leggauss(q.shape[1] // 2 + 1)
    t = torch.from_numpy((nodes + 1) / 2)  # nodes on [0, 1] (never 0: every factor > 0), weights halved below
    log_factors = (1 - q[:, :, None] + q[:, :, None] * t).log()  # [P, b, m]
    others = log_factors.sum(1, keepdim=True) - log_factors  # log Π_{j≠i}, [P, b, m]
    return (others.exp() * torch.from_numpy(weights / 2)).sum(2)


def _kept_probabilities(q: torch.Tensor) -> torch.Tensor:
    """P(member i kept) = q_i E[1/(1 + K_i)] for sibling groups firing with q [P, b] (`_share_if_fired`)."""
    return q.double() * _share_if_fired(q)


# ---------------------------------------------------------------------------------------------
# The field's ground-truth metrics
# ---------------------------------------------------------------------------------------------


def mean_correlation_coefficient(decoder_directions, true_features: torch.Tensor) -> float:
    """MCC: the mean |cos| over an optimal one-to-one matching of learned directions to true
    features (the Hungarian algorithm on 1 − |cos|; min(F, n_true) pairs). Needs scipy
    (`pip install dictionary_learning[metrics]`)."""
    similarity = _abs_cosines(decoder_directions, true_features)  # [F, n_true]
    latents, features = _optimal_matching(similarity)
    return similarity[latents, features].mean().item()


def _optimal_matching(similarity: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-to-one matching of latents to true features that maximises Σ |cos| (the Hungarian
    algorithm on 1 − |cos| [F, n_true]): (latent indices, feature indices), min(F, n_true) pairs."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise ImportError("mean_correlation_coefficient needs scipy: pip install 'dictionary_learning[metrics]' "
                          "(or pip install scipy)") from None
    rows, columns = linear_sum_assignment(1 - similarity.double().cpu().numpy())
    return torch.as_tensor(rows), torch.as_tensor(columns)


def _abs_cosines(decoder_directions, true_features: torch.Tensor) -> torch.Tensor:
    """|cos(learned_j, true_i)| [F, n_true]."""
    learned = decoder_directions if isinstance(decoder_directions, torch.Tensor) else dictionary_directions(decoder_directions)
    learned = learned.detach().float()
    learned = learned / learned.norm(dim=1, keepdim=True).clamp_min(1e-12)
    true = true_features.detach().float().to(learned.device)
    true = true / true.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (learned @ true.T).abs()


def _precision_recall_f1(true_positives: torch.Tensor, fired: torch.Tensor, active: torch.Tensor):
    """Per-detector precision P = TP / fired, recall R = TP / active and F1 = 2PR / (P + R) from
    counts (each 0 where undefined)."""
    precision = torch.where(fired > 0, true_positives / fired.clamp_min(1), 0.0)
    recall = torch.where(active > 0, true_positives / active.clamp_min(1), 0.0)
    f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp_min(1e-12), 0.0)
    return precision, recall, f1


@torch.no_grad()
def ground_truth_scores(dictionary, stream, n_samples: int = 65_536, batch_size: int = 4096) -> dict[str, float]:
    """Score `dictionary` against the features of a synthetic `stream` (`SyntheticActivations` or
    `HierarchicalActivations`) on `n_samples` fresh samples of it:

        mcc                 mean_correlation_coefficient of the decoder directions
        uniqueness          #{distinct best-matching true features} / F   (1: no two latents share one)
        precision, recall, f1   per latent, as a detector of its best-matching true feature (|cos|),
                            from the counts of samples where it fires and the feature is active;
                            averaged over latents (a latent that never fires scores 0), as
                            SynthSAEBench: several latents on one feature all count
        matched_f1          the F1 of each latent against the feature MCC's one-to-one matching
                            gives it, averaged over the min(F, n_true) pairs: duplicates score once
        explained_variance  1 − Σ‖x − x̂‖² / Σ‖x − x̄‖²
        shrinkage           mean over samples with x ≠ 0 of ‖x̂‖ / ‖x‖
        l0, true_l0         mean active latents / true features per sample
        dead_latents        latents that never fired
    """
    from .evaluation import MetricAccumulator

    decoder = dictionary_directions(dictionary)  # [F, D]
    similarity = _abs_cosines(decoder, stream.true_features)
    best = similarity.argmax(dim=1)  # [F] best-matching true feature of each latent
    matched_latents, matched_features = _optimal_matching(similarity)  # [P], [P]
    n_latents = decoder.shape[0]
    counts = torch.zeros(3, n_latents, dtype=torch.float64)  # true positives, fired, feature active
    matched_counts = torch.zeros(2, len(matched_latents), dtype=torch.float64)  # true positives, feature active
    shrinkage, nonzero, true_l0, done = 0.0, 0, 0.0, 0
    accumulator = MetricAccumulator(n_latents)
    parameter = next(dictionary.parameters(), None)
    while done < n_samples:
        size = min(batch_size, n_samples - done)
        x, codes = stream.sample(size, return_codes=True)
        x = x if parameter is None else x.to(parameter.device, parameter.dtype)
        f = dictionary.encode(x)
        x_hat = dictionary.decode(f)
        accumulator.update(x, x_hat, f)
        fires = (f > 0).cpu()
        active = (codes[:, best.to(codes.device)] > 0).cpu()
        counts += torch.stack([(fires & active).sum(0), fires.sum(0), active.sum(0)]).double()
        matched_active = (codes[:, matched_features.to(codes.device)] > 0).cpu()  # [B, P]
        matched_counts += torch.stack([(fires[:, matched_latents] & matched_active).sum(0), matched_active.sum(0)]).double()
        norms = x.norm(dim=-1)
        nonzero_rows = norms > 1e-6  # samples with no active feature have no shrinkage
        shrinkage += (x_hat.norm(dim=-1)[nonzero_rows] / norms[nonzero_rows]).sum().item()
        nonzero += int(nonzero_rows.sum())
        true_l0 += (codes > 0).sum().item()
        done += size
    true_positives, fired, active = counts
    precision, recall, f1 = _precision_recall_f1(true_positives, fired, active)
    *_, matched_f1 = _precision_recall_f1(matched_counts[0], fired[matched_latents], matched_counts[1])
    pooled = accumulator.compute()
    return {
        "mcc": similarity[matched_latents, matched_features].mean().item(),  # mean_correlation_coefficient
        "uniqueness": best.unique().numel() / n_latents,
        "precision": precision.mean().item(),
        "recall": recall.mean().item(),
        "f1": f1.mean().item(),
        "matched_f1": matched_f1.mean().item(),
        "explained_variance": pooled["frac_variance_explained"],
        "shrinkage": shrinkage / max(nonzero, 1),
        "l0": pooled["l0"],
        "true_l0": true_l0 / done,
        "dead_latents": int((fired == 0).sum()),
    }
