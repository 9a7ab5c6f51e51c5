"""Synthetic activations with known features, and the metrics against the true features."""
import math

import pytest
import torch
import torch.nn as nn

from dictionary_learning.synthetic import (
    SyntheticActivations,
    SyntheticConfig,
    _active_positions,
    _codes_times_features,
    _dense_codes,
    chance_max_cosine_similarity,
    dictionary_directions,
    fraction_recovered,
    max_cosine_similarities,
    mean_max_cosine_similarity,
    zipf_firing_probabilities,
)



def small(**overrides):
    return SyntheticActivations(SyntheticConfig(**{"activation_dim": 16, "n_features": 64, "batch_size": 512,
                                                   **overrides}))


def test_same_seed_same_stream_whatever_the_global_rng():
    a, b = small(seed=3, noise_std=0.1, bias_norm=2.0), small(seed=3, noise_std=0.1, bias_norm=2.0)
    first = [a.sample() for _ in range(3)]
    torch.manual_seed(123)
    torch.rand(1000)  # disturbing the global RNG changes nothing
    second = [next(b) for _ in range(3)]
    for x, y in zip(first, second):
        assert x.dtype == torch.float32 and x.shape == (512, 16)
        assert torch.equal(x, y)
    assert not torch.equal(first[0], first[1])  # the stream moves on
    other_stream = small(seed=3, stream_seed=4, noise_std=0.1, bias_norm=2.0)
    assert torch.equal(other_stream.true_features, a.true_features)  # same features ...
    assert torch.equal(other_stream.bias, a.bias)
    assert not torch.equal(other_stream.sample(), first[0])  # ... different samples
    assert not torch.equal(small(seed=4).true_features, a.true_features)


def test_features_are_unit_norm_and_bias_has_its_norm():
    s = small(bias_norm=2.5)
    assert s.true_features.shape == (64, 16)
    assert torch.allclose(s.true_features.norm(dim=1), torch.ones(64), atol=1e-6)
    assert s.bias.norm().item() == pytest.approx(2.5, rel=1e-6)


def test_zipf_probabilities():
    p = zipf_firing_probabilities(100, 5.0, 1.0)
    assert p.sum().item() == pytest.approx(5.0, abs=1e-9)
    assert torch.all(p[1:] < p[:-1])  # strictly decreasing: heavy-tailed, feature 0 most frequent
    assert (p[0] / p[-1]).item() == pytest.approx(100.0)  # p_i ∝ 1/(i+1)
    assert p[0].item() < 1
    # a large mean caps the head at 1 and rescales the tail, keeping Σp exact
    p = zipf_firing_probabilities(50, 20.0, 1.5)
    assert p.sum().item() == pytest.approx(20.0, abs=1e-9)
    capped = p == 1
    assert capped[0] and capped.sum() > 1 and torch.all(p <= 1)
    tail = p[~capped]
    weights = (torch.arange(50, dtype=torch.float64)[~capped] + 1) ** -1.5
    assert torch.allclose(tail / weights, (tail / weights)[0].expand_as(tail))  # still Zipf
    assert torch.equal(zipf_firing_probabilities(10, 10, 2.0), torch.ones(10, dtype=torch.float64))
    assert torch.allclose(zipf_firing_probabilities(8, 2.0, 0.0), torch.full((8,), 0.25, dtype=torch.float64))


@pytest.mark.parametrize("several_rounds", [False, True])
def test_bernoulli_positions_are_exact(several_rounds):
    """Per-feature firing counts match Binomial(B, p_i), also when the sampler needs several rounds
    of draws (forced by drawing a quarter of the expected count per round)."""
    p = zipf_firing_probabilities(40, 6.0, 1.0)  # feature 0 fires always, the last ones rarely
    g = torch.Generator().manual_seed(0)
    batch, reps = 1000, 20
    per_round = (batch * p / 4).ceil().long() if several_rounds else None
    counts = torch.zeros(40, dtype=torch.float64)
    for _ in range(reps):
        rows, cols = _active_positions(p, batch, g, per_round)
        assert torch.all(cols[1:] >= cols[:-1])  # grouped by feature ...
        same = cols[1:] == cols[:-1]
        assert torch.all(rows[1:][same] > rows[:-1][same])  # ... rows increasing, no duplicates
        assert rows.min() >= 0 and rows.max() < batch
        counts += torch.bincount(cols, minlength=40)
    n = batch * reps
    assert counts[0] == n  # p = 1
    z = (counts / n - p) / (p * (1 - p) / n).sqrt().clamp_min(1e-12)
    assert z.abs().max() < 4.5  # 40 features: a false alarm has probability ~3e-4


def test_mean_number_active_and_codes():
    s = small(n_features=256, mean_active=5.0, batch_size=4096)
    x, codes = s.sample(return_codes=True)
    active = (codes != 0).sum(dim=1).double()
    # Var(#active) = Σ p(1-p) <= 5; the batch mean has std <= sqrt(5/4096) = 0.035
    assert active.mean().item() == pytest.approx(5.0, abs=0.15)
    assert torch.all(codes >= 0)
    assert torch.allclose(x, codes @ s.true_features, atol=1e-5)
    freq = (codes != 0).double().mean(0)  # [n]
    head, tail = freq[:16].mean(), freq[-128:].mean()
    assert head > 10 * tail  # heavy-tailed frequencies in the order of the index


def test_bias_noise_and_dense_codes_path():
    s = small(noise_std=0.5, bias_norm=3.0, batch_size=4096)
    x, codes = s.sample(return_codes=True)
    residual = x - codes @ s.true_features - s.bias
    assert residual.mean().abs().item() < 0.01
    assert residual.std().item() == pytest.approx(0.5, rel=0.02)
    # the embedding-bag product equals the dense codes times the features
    g = torch.Generator().manual_seed(1)
    rows, cols = _active_positions(s.firing_probabilities, 300, g)
    mags = torch.rand(rows.numel(), generator=g)
    dense = _dense_codes(rows, cols, mags, 300, 64)
    assert torch.allclose(_codes_times_features(rows, cols, mags, s.true_features, 300),
                          dense @ s.true_features, atol=1e-6)


@pytest.mark.parametrize("dist, std, mean_magnitude", [
    ("folded_normal", 0.1, 2.0),  # |N(2, 0.1)| is N(2, 0.1) in practice
    ("exponential", 0.0, 2.0),
    ("uniform", 0.5, 2.0),
    ("constant", 0.0, 2.0),
])
def test_magnitude_distributions(dist, std, mean_magnitude):
    s = small(magnitude_dist=dist, magnitude_mean=2.0, magnitude_std=std, batch_size=4096)
    _, codes = s.sample(return_codes=True)
    mags = codes[codes != 0]
    assert mags.numel() > 10_000 and torch.all(mags > 0)
    assert mags.mean().item() == pytest.approx(mean_magnitude, rel=0.03)
    if dist == "uniform":
        half_width = math.sqrt(3) * 0.5
        assert mags.min() >= 2 - half_width and mags.max() <= 2 + half_width
        assert mags.std().item() == pytest.approx(0.5, rel=0.03)
    if dist == "constant":
        assert torch.all(mags == 2.0)
    if dist == "exponential":
        assert mags.std().item() == pytest.approx(2.0, rel=0.05)  # std = mean


def test_batches_iterator():
    s = small(batch_size=32)
    assert [b.shape for b in s.batches(8, n_batches=3)] == [(8, 16)] * 3
    endless = s.batches()
    assert all(next(endless).shape == (32, 16) for _ in range(5))
    assert iter(s) is s and next(s).shape == (32, 16)


@pytest.mark.parametrize("overrides, message", [
    ({"mean_active": 100.0}, "mean_active must be in"),
    ({"magnitude_dist": "gamma"}, "magnitude_dist='gamma' is unknown"),
    ({"magnitude_dist": "uniform", "magnitude_mean": 1.0, "magnitude_std": 1.0}, "would go below 0"),
    ({"noise_std": -1.0}, "noise_std and bias_norm must be >= 0"),
    ({"activation_dim": 0}, "activation_dim must be a positive int"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        SyntheticConfig(**{"n_features": 64, **overrides})


# ---------------------------------------------------------------------------------------------
# Metrics against the true features
# ---------------------------------------------------------------------------------------------


def test_mmcs_of_permuted_scaled_true_features_is_one():
    true = small().true_features  # [64, 16]
    g = torch.Generator().manual_seed(0)
    scales = torch.rand(64, 1, generator=g) * 5 + 0.1
    learned = torch.cat([true[torch.randperm(64, generator=g)] * scales, torch.randn(30, 16, generator=g)])
    assert mean_max_cosine_similarity(learned, true) == pytest.approx(1.0, abs=1e-6)
    assert fraction_recovered(learned, true) == 1.0
    # opposite directions do not count: the cosine is signed
    assert mean_max_cosine_similarity(-true, true) < 0.9


def test_fraction_recovered_counts_matched_features():
    g = torch.Generator().manual_seed(0)
    true = torch.randn(40, 64, generator=g)
    learned = torch.cat([true[:10], torch.randn(50, 64, generator=g)])  # 10 of 40 learned
    assert fraction_recovered(learned, true) == pytest.approx(0.25)
    # a slightly rotated copy (cos ≈ 0.95) passes 0.9 but not 0.99
    noise = torch.randn(40, 64, generator=g)
    noise = noise - (noise * true).sum(1, keepdim=True) / true.pow(2).sum(1, keepdim=True) * true
    tilted = true / true.norm(dim=1, keepdim=True) + 0.33 * noise / noise.norm(dim=1, keepdim=True)
    best = max_cosine_similarities(tilted, true)
    assert torch.allclose(best, torch.full((40,), 1 / math.sqrt(1 + 0.33 ** 2)), atol=1e-5)
    assert fraction_recovered(tilted, true, threshold=0.9) == 1.0
    assert fraction_recovered(tilted, true, threshold=0.99) == 0.0


def test_mmcs_of_random_directions_is_at_chance_level():
    # D=3: the cosine to a random direction is uniform on [-1, 1], so E[max of F] = 1 - 2/(F+1)
    assert chance_max_cosine_similarity(3, 10) == pytest.approx(1 - 2 / 11, abs=1e-8)
    assert chance_max_cosine_similarity(16, 1) == pytest.approx(0.0, abs=1e-8)
    g = torch.Generator().manual_seed(0)
    true = torch.randn(512, 64, generator=g)
    for dict_size in (512, 1024):
        learned = torch.randn(dict_size, 64, generator=g)
        expected = chance_max_cosine_similarity(64, dict_size)  # 0.371 and 0.394
        assert mean_max_cosine_similarity(learned, true) == pytest.approx(expected, abs=0.015)
        assert fraction_recovered(learned, true) == 0.0


def test_chunked_similarities_match_one_shot():
    g = torch.Generator().manual_seed(0)
    true, learned = torch.randn(100, 8, generator=g), torch.randn(37, 8, generator=g)
    one_shot = (nn.functional.normalize(true, dim=1) @ nn.functional.normalize(learned, dim=1).T).max(1).values
    assert torch.allclose(max_cosine_similarities(learned, true, max_chunk_elements=37 * 3), one_shot, atol=1e-6)


class LinearDecoder(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.decoder = nn.Linear(f, d, bias=False)  # weight [D, F]


class MatrixDecoder(nn.Module):
    def __init__(self, d, f):
        super().__init__()
        self.W_dec = nn.Parameter(torch.randn(f, d))  # [F, D]


def test_dictionary_directions_of_both_layouts():
    linear, matrix = LinearDecoder(16, 40), MatrixDecoder(16, 40)
    rows = dictionary_directions(linear)
    assert rows.shape == (40, 16) and not rows.requires_grad
    assert torch.allclose(rows, linear.decoder.weight.T / linear.decoder.weight.T.norm(dim=1, keepdim=True))
    rows = dictionary_directions(matrix)
    assert torch.allclose(rows, matrix.W_dec / matrix.W_dec.norm(dim=1, keepdim=True))
    # the metrics take a dictionary directly
    true = matrix.W_dec.detach()[:10] * 3
    assert mean_max_cosine_similarity(matrix, true) == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(TypeError, match="cannot find decoder directions"):
        dictionary_directions(nn.Linear(3, 4))
    with pytest.raises(ValueError, match="decoder.weight is \\[D, F\\]"):
        mean_max_cosine_similarity(linear.decoder.weight, true)  # [D, F] passed as rows


def test_library_dictionaries_are_supported():
    from dictionary_learning.dictionary import AutoEncoder, JumpReluAutoEncoder

    torch.manual_seed(0)
    for ae in (AutoEncoder(16, 40), JumpReluAutoEncoder(16, 40)):
        rows = dictionary_directions(ae)
        assert rows.shape == (40, 16)
        assert torch.allclose(rows.norm(dim=1), torch.ones(40), atol=1e-5)
        x = torch.zeros(1, 40)
        x[0, 7] = 1.0  # decode(e_7) - decode(0) is decoder direction 7
        direction = ae.decode(x) - ae.decode(torch.zeros(1, 40))
        assert torch.allclose(rows[7], (direction / direction.norm())[0], atol=1e-5)
