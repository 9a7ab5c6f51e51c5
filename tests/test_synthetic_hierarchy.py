"""Hierarchical synthetic ground truth (HierarchicalActivations) and the field's metrics
(mean_correlation_coefficient, ground_truth_scores) on hand-checkable cases."""
import itertools

import pytest
import torch

from dictionary_learning.dictionary import AutoEncoder
from dictionary_learning.synthetic import (
    HierarchicalActivations,
    HierarchicalConfig,
    SyntheticActivations,
    ground_truth_scores,
    mean_correlation_coefficient,
)
from dictionary_learning.synthetic import _kept_probabilities


@pytest.mark.parametrize("child_firing", ["pick_one", "own_probability"])
def test_children_fire_only_with_their_parent_and_exclusively(child_firing):
    stream = HierarchicalActivations(n_roots=8, branching=3, depth=2, n_independent=4, mean_active_top=3,
                                     zipf_exponent=0.3, child_firing=child_firing, batch_size=40_000, seed=1)
    _, codes = stream.sample(return_codes=True)
    active = codes > 0
    parents = stream.parents
    children = (parents >= 0).nonzero().squeeze(1)
    assert active[:, children].any(0).all()  # every child fires at some point
    assert bool((~active[:, children] | active[:, parents[children]]).all())  # never without the parent
    for node in parents[children].unique():  # at most one child per active node
        assert int(active[:, (parents == node).nonzero().squeeze(1)].sum(1).max()) <= 1
    # each child fires, given its parent, with probability c/b (pick_one) or q_i E[1/(1 + K_i)]
    given_parent = active[:, children].sum(0) / active[:, parents[children]].sum(0)
    if child_firing == "pick_one":
        expected = torch.full_like(given_parent, 0.8 / 3)
    else:
        expected = _kept_probabilities(stream._child_probs.view(-1, 3)).flatten().float()
        assert (expected < 0.95 * stream._child_probs).all()  # siblings compete: below q_i
    assert torch.allclose(given_parent, expected, atol=0.03)


@pytest.mark.parametrize("compensate", [True, False])
def test_own_probability_children_fire_at_their_zipf_probability(compensate):
    """One Zipf law over all features in index order; compensated, a child fires overall with its
    p_i wherever its parent fires often enough (q_i < 1), and less where q_i stops at 1;
    uncompensated, q_i = p_i."""
    stream = HierarchicalActivations(n_roots=6, branching=3, depth=2, n_independent=30, mean_active_top=2,
                                     zipf_exponent=0.9, min_firing_probability=1e-3, correlation_rank=0,
                                     child_firing="own_probability", compensate_child_probabilities=compensate,
                                     batch_size=200_000, seed=4)
    n = stream.config.n_features
    zipf = torch.arange(1, n + 1, dtype=torch.float64) ** -0.9
    top = torch.cat([torch.arange(6), n - 30 + torch.arange(30)])
    zipf = (zipf * 2 / zipf[top].sum()).clamp(1e-3, 0.4)
    assert torch.allclose(stream._top_probs, zipf[top])
    _, codes = stream.sample(return_codes=True)
    assert torch.allclose((codes > 0).double().mean(0), stream.firing_probabilities, rtol=0.1, atol=5e-4)
    children, q = slice(6, n - 30), stream._child_probs.double()
    if compensate:
        free = q < 1
        assert free.sum() >= 6 and (~free).sum() >= 6  # both cases occur in this tree
        assert torch.allclose(stream.firing_probabilities[children][free], zipf[children][free], rtol=1e-6)
        assert bool((stream.firing_probabilities[children][~free] < zipf[children][~free] * (1 + 1e-6)).all())
    else:
        assert torch.equal(q, zipf[children].float().double())


def test_kept_probabilities_match_enumerating_the_sibling_outcomes():
    """P(sibling i kept) when siblings fire independently with q and one of those fired is kept
    uniformly, against the sum over all 2^b firing patterns."""
    q = torch.rand(6, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exact = torch.zeros_like(q)
    for pattern in itertools.product([False, True], repeat=5):
        fired = torch.tensor(pattern)
        if fired.any():
            chance = torch.where(fired, q, 1 - q).prod(1, keepdim=True)  # [6, 1]
            exact += chance * fired / fired.sum()
    assert torch.allclose(_kept_probabilities(q), exact, atol=1e-12)


def test_child_magnitudes_are_relative_to_the_parents():
    """With cv = 0 every magnitude is its feature's mean μ_i; a child's code is then μ_child times
    its parent's code, exactly."""
    stream = HierarchicalActivations(n_roots=6, branching=2, depth=2, n_independent=0, mean_active_top=3,
                                     magnitude_cv=0.0, batch_size=4096, seed=2)
    _, codes = stream.sample(return_codes=True)
    parents = stream.parents
    children = (parents >= 0).nonzero().squeeze(1)
    fired = codes[:, children] > 0
    expected = stream._magnitude_means[children] * codes[:, parents[children]]
    assert fired.any() and torch.allclose(codes[:, children][fired], expected[fired])


def test_top_level_features_fire_at_their_probabilities_and_correlate_through_the_factors():
    common = dict(n_roots=4, branching=2, depth=1, n_independent=12, mean_active_top=3, zipf_exponent=0.5,
                  batch_size=50_000, seed=3)
    independent = HierarchicalActivations(correlation_rank=0, **common)
    correlated = HierarchicalActivations(correlation_rank=2, correlation_strength=0.8, **common)
    for stream in (independent, correlated):
        _, codes = stream.sample(return_codes=True)
        rates = (codes[:, stream._top_index] > 0).double().mean(0)
        assert torch.allclose(rates, stream._top_probs, atol=0.01)  # the copula keeps each p_i
    def off_diagonal_correlation(stream):
        _, codes = stream.sample(return_codes=True)
        fired = (codes[:, stream._top_index] > 0).double()
        corr = torch.corrcoef(fired.T)
        return corr[~torch.eye(len(corr), dtype=torch.bool)].abs().mean().item()
    assert off_diagonal_correlation(correlated) > 3 * off_diagonal_correlation(independent)


@pytest.mark.parametrize("child_firing", ["pick_one", "own_probability"])
def test_expected_active_matches_the_samples_and_the_stream_is_deterministic(child_firing):
    stream = HierarchicalActivations(batch_size=40_000, correlation_rank=0, child_firing=child_firing)
    _, codes = stream.sample(return_codes=True)
    assert abs((codes > 0).sum(1).double().mean().item() - stream.expected_active) < 0.05
    torch.manual_seed(0)
    a = HierarchicalActivations(batch_size=64, seed=5).sample()
    torch.manual_seed(1)
    b = HierarchicalActivations(batch_size=64, seed=5).sample()
    assert torch.equal(a, b)
    assert not torch.equal(a, HierarchicalActivations(batch_size=64, seed=5, stream_seed=6).sample())


@pytest.mark.parametrize("overrides, message", [
    ({"n_roots": 0}, "n_roots must be a positive int"),
    ({"child_probability": 1.5}, "child_probability must be in"),
    ({"child_firing": "zipf"}, "child_firing must be one of"),
    ({"compensate_child_probabilities": "yes"}, "compensate_child_probabilities must be True or False"),
    ({"min_firing_probability": 0.5, "max_firing_probability": 0.1}, "min_firing_probability"),
    ({"mean_active_top": 1000}, "mean_active_top must be in"),
])
def test_config_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        HierarchicalConfig(**overrides)


def exact_dictionary(features):
    """An AutoEncoder whose latents are the features (orthonormal features; an encoder bias of −1e-4
    zeroes the float noise, ~1e-8, of inactive features)."""
    n, d = features.shape
    ae = AutoEncoder(d, n)
    with torch.no_grad():
        ae.W_enc.copy_(features.T)
        ae.W_dec.copy_(features)
        ae.b_enc.fill_(-1e-4)
        ae.b_dec.zero_()
    return ae


def orthonormal_stream(n_features=24, dim=32):
    stream = SyntheticActivations(activation_dim=dim, n_features=n_features, mean_active=3, batch_size=4096, seed=0)
    q, _ = torch.linalg.qr(torch.randn(dim, n_features, generator=torch.Generator().manual_seed(0)))
    stream._features = q.T.contiguous()  # orthonormal rows: the exact dictionary recovers the codes
    return stream


def test_the_true_features_score_perfectly_in_any_order_and_random_ones_do_not():
    stream = orthonormal_stream()
    perfect = exact_dictionary(stream.true_features)
    scores = ground_truth_scores(perfect, stream, n_samples=8192)
    assert scores["mcc"] == pytest.approx(1.0, abs=1e-6) and scores["f1"] == pytest.approx(1.0)
    assert scores["matched_f1"] == pytest.approx(1.0)
    assert scores["precision"] == scores["recall"] == pytest.approx(1.0)
    assert scores["uniqueness"] == 1.0 and scores["explained_variance"] == pytest.approx(1.0, abs=1e-4)
    assert scores["shrinkage"] == pytest.approx(1.0, abs=1e-3) and scores["l0"] == pytest.approx(scores["true_l0"])
    permutation = torch.randperm(24, generator=torch.Generator().manual_seed(1))
    shuffled = exact_dictionary(stream.true_features[permutation])
    assert ground_truth_scores(shuffled, stream, n_samples=8192)["f1"] == pytest.approx(1.0)
    random = AutoEncoder(32, 24, generator=torch.Generator().manual_seed(2))
    chance = ground_truth_scores(random, stream, n_samples=8192)
    assert chance["mcc"] < 0.5 and chance["f1"] < 0.5


def test_duplicate_latents_raise_f1_but_not_matched_f1():
    """A dictionary of 24 latents holding 12 true features twice each: every latent detects its
    best-matching feature perfectly (f1 = 1), but the one-to-one matching gives each feature one
    latent and the other 12 latents features they do not detect (F1 only from chance co-firing)."""
    stream = orthonormal_stream()
    duplicated = exact_dictionary(stream.true_features[torch.arange(24) % 12])
    scores = ground_truth_scores(duplicated, stream, n_samples=8192)
    assert scores["f1"] == pytest.approx(1.0) and scores["uniqueness"] == 0.5
    assert 0.5 <= scores["matched_f1"] < 0.6


def test_mcc_is_an_optimal_one_to_one_matching():
    """Two learned directions near the same true feature: the greedy best match would use it twice;
    the one-to-one matching must give the second its next-best partner."""
    true = torch.eye(3)
    learned = torch.tensor([[1.0, 0.1, 0.0], [0.9, 0.0, 0.4], [0.0, 0.0, 1.0]])
    unit = learned / learned.norm(dim=1, keepdim=True)
    brute = max(sum(unit[i, p[i]].abs().item() for i in range(3)) / 3
                for p in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)])
    assert mean_correlation_coefficient(learned, true) == pytest.approx(brute)
