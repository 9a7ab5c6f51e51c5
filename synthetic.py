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
