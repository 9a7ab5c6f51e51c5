"""Tensor metrics of evaluation.py on small cases computed by hand."""
import math
import warnings

import pytest
import torch
import torch.nn as nn

from dictionary_learning.evaluation import MIN_TOKENS_FOR_FRAC_ALIVE, MetricAccumulator, tensor_metrics


KEYS = {"mse", "l2_loss", "l1", "l0", "frac_alive", "frac_variance_explained", "cossim", "l2_ratio",
        "relative_reconstruction_bias", "tokens"}


def metrics_of(*batches, dict_size=None):
    """Pooled metrics of (x, x_hat, f) batches, without the small-sample warning."""
    acc = MetricAccumulator(dict_size)
    for x, x_hat, f in batches:
        acc.update(x, x_hat, f)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return acc.compute()


def test_every_metric_on_two_tokens():
    x = torch.tensor([[3.0, 4.0], [0.0, 2.0]])
    x_hat = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    f = torch.tensor([[1.0, 0.0, 2.0], [0.0, 0.0, -1.0]])
    with pytest.warns(UserWarning, match="only 2 tokens"):
        m = MetricAccumulator(3).update(x, x_hat, f).compute()
    assert set(m) == KEYS
    assert m["tokens"] == 2
    # errors (0, 4) and (0, 1): squared norms 16 and 1, norms 4 and 1
    assert m["mse"] == pytest.approx((16 + 1) / (2 * 2))
    assert m["l2_loss"] == pytest.approx((4 + 1) / 2)
    # |f| sums 3 and 1; nonzero counts 2 and 1; latents 0 and 2 fire, latent 1 never does
    assert m["l1"] == pytest.approx(2.0)
    assert m["l0"] == pytest.approx(1.5)
    assert m["frac_alive"] == pytest.approx(2 / 3)
    # mean (1.5, 3); deviations (1.5, 1) and (-1.5, -1): total 2 * 3.25 = 6.5; FVE = 1 - 17 / 6.5
    assert m["frac_variance_explained"] == pytest.approx(1 - 17 / 6.5)
    # cos: 9 / (5 * 3) = 0.6 and 2 / (2 * 1) = 1; norm ratios 3/5 and 1/2
    assert m["cossim"] == pytest.approx(0.8)
    assert m["l2_ratio"] == pytest.approx(0.55)
    # Σ‖x̂‖² = 9 + 1 = 10, Σ<x̂, x> = 9 + 2 = 11
    assert m["relative_reconstruction_bias"] == pytest.approx(10 / 11)


def test_perfect_and_shrunk_reconstructions():
    x = torch.tensor([[1.0, 2.0], [3.0, -1.0], [0.0, 5.0]])
    f = torch.ones(3, 4)
    perfect = metrics_of((x, x.clone(), f))
    assert perfect["mse"] == 0 and perfect["l2_loss"] == 0
    assert perfect["frac_variance_explained"] == pytest.approx(1.0)
    assert perfect["cossim"] == pytest.approx(1.0) and perfect["l2_ratio"] == pytest.approx(1.0)
    assert perfect["relative_reconstruction_bias"] == pytest.approx(1.0)
    assert perfect["l0"] == 4 and perfect["frac_alive"] == 1
    # x̂ = x/2: γ = Σ‖x/2‖² / Σ<x/2, x> = (1/4) / (1/2) = 1/2; cos 1; norm ratio 1/2
    half = metrics_of((x, 0.5 * x, f))
    assert half["relative_reconstruction_bias"] == pytest.approx(0.5)
    assert half["cossim"] == pytest.approx(1.0) and half["l2_ratio"] == pytest.approx(0.5)
    # ‖x/2‖² summed: (5 + 10 + 25) / 4 = 10 over 3 tokens * 2 dims
    assert half["mse"] == pytest.approx(10 / 6)


def test_zero_input_tokens_are_left_out_of_cossim_and_l2_ratio():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    x_hat = torch.tensor([[1.0, 1.0], [0.0, 3.0]])  # the second token: orthogonal, 1.5x as long
    m = metrics_of((x, x_hat, torch.ones(2, 1)))
    assert m["cossim"] == pytest.approx(0.0)
    assert m["l2_ratio"] == pytest.approx(1.5)
    # a zero reconstruction of a nonzero input has cosine 0 and ratio 0 (not nan)
    m = metrics_of((torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.zeros(1, 3)))
    assert m["cossim"] == 0 and m["l2_ratio"] == 0 and m["frac_alive"] == 0 and m["l0"] == 0
    assert math.isnan(m["frac_variance_explained"])  # a single token has no variance


def test_fve_pools_over_batches_not_per_batch_ratios():
    # Two batches with different means, each reconstructed with errors ±1 in the first coordinate.
    a = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    b = torch.tensor([[10.0, 0.0], [12.0, 0.0]])
    error = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    f = torch.ones(2, 1)
    per_batch = [metrics_of((x, x + error, f))["frac_variance_explained"] for x in (a, b)]
    # each batch alone: squared error 2, variance about its own mean 1 + 1 = 2, so FVE = 0
    assert per_batch == [pytest.approx(0.0), pytest.approx(0.0)]
    pooled = metrics_of((a, a + error, f), (b, b + error, f))["frac_variance_explained"]
    # pooled mean 6: deviations -6, -4, 4, 6 give 104; squared error 4; FVE = 1 - 4/104
    assert pooled == pytest.approx(1 - 4 / 104)
    cat = torch.cat([a, b])
    single = metrics_of((cat, cat + torch.cat([error, error]), torch.ones(4, 1)))
    assert pooled == pytest.approx(single["frac_variance_explained"], abs=1e-12)
    assert pooled != pytest.approx(sum(per_batch) / 2, abs=0.5)


def test_pooling_many_uneven_batches_equals_one_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 6, generator=g) * 3 + 1
    x_hat = x + 0.5 * torch.randn(50, 6, generator=g)
    f = torch.relu(torch.randn(50, 10, generator=g) - 1.5)
    f[0] = 1.0  # every latent fires on token 0 ...
    f[:, 3] = 0  # ... except latent 3, which never fires
    f[:49, 7] = 0
    f[49, 7] = 2.0  # latent 7 fires only in the last batch
    whole = metrics_of((x, x_hat, f))
    splits = [0, 7, 8, 30, 50]
    pooled = metrics_of(*[(x[i:j], x_hat[i:j], f[i:j]) for i, j in zip(splits, splits[1:])])
    assert pooled.keys() == whole.keys()
    for key in whole:
        assert pooled[key] == pytest.approx(whole[key], rel=1e-6), key
    assert whole["frac_alive"] == pytest.approx(9 / 10)


def test_variance_of_large_mean_activations_is_accurate():
    # float32 activations with mean 3000 and unit spread (like outlier residual dimensions)
    g = torch.Generator().manual_seed(1)
    batches = [3000 + torch.randn(256, 8, generator=g) for _ in range(4)]
    x64 = torch.cat(batches).double()
    variance = (x64 - x64.mean(0)).pow(2).sum().item()
    acc = MetricAccumulator(1)
    for x in batches:
        acc.update(x, torch.full_like(x, 3000.0), torch.ones(256, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fve = acc.compute()["frac_variance_explained"]
    error = (x64 - 3000).pow(2).sum().item()
    assert fve == pytest.approx(1 - error / variance, abs=1e-6)


def test_token_dimensions_are_flattened():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 3, 4, generator=g)  # [B, L, D]
    x_hat = x + 0.1 * torch.randn(2, 3, 4, generator=g)
    f = torch.relu(torch.randn(2, 3, 5, generator=g))
    flat = metrics_of((x.reshape(6, 4), x_hat.reshape(6, 4), f.reshape(6, 5)))
    nested = metrics_of((x, x_hat, f))
    assert nested == pytest.approx(flat)
    assert nested["tokens"] == 6


def test_small_sample_warning_and_bad_inputs():
    acc = MetricAccumulator(2)
    acc.update(torch.ones(MIN_TOKENS_FOR_FRAC_ALIVE, 3), torch.ones(MIN_TOKENS_FOR_FRAC_ALIVE, 3),
               torch.ones(MIN_TOKENS_FOR_FRAC_ALIVE, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert acc.compute()["tokens"] == MIN_TOKENS_FOR_FRAC_ALIVE  # enough tokens: no warning
    with pytest.raises(ValueError, match="no tokens"):
        MetricAccumulator().compute()
    with pytest.raises(ValueError, match="x_hat .* must have the shape of x"):
        MetricAccumulator().update(torch.ones(2, 3), torch.ones(2, 4), torch.ones(2, 5))
    with pytest.raises(ValueError, match="token dims of x"):
        MetricAccumulator().update(torch.ones(2, 3), torch.ones(2, 3), torch.ones(3, 5))
    with pytest.raises(ValueError, match="dict_size is 4"):
        MetricAccumulator(4).update(torch.ones(2, 3), torch.ones(2, 3), torch.ones(2, 5))
    with pytest.raises(TypeError, match="f must be a tensor"):
        MetricAccumulator().update(torch.ones(2, 3), torch.ones(2, 3), [1, 2])


class Halving(nn.Module):
    """A toy dictionary: f = ReLU(W x) with W = [I; -I] (so ‖f‖₁ = ‖x‖₁), x̂ = (f₊ − f₋) / 2 = x / 2."""

    def __init__(self, dim, dtype=torch.float32):
        super().__init__()
        self.activation_dim, self.dict_size = dim, 2 * dim
        self.weight = nn.Parameter(torch.cat([torch.eye(dim), -torch.eye(dim)]).to(dtype))

    def encode(self, x):
        return torch.relu(x @ self.weight.T)

    def decode(self, f):
        return 0.5 * (f @ self.weight)


def test_tensor_metrics_runs_encode_then_decode_over_batches():
    g = torch.Generator().manual_seed(3)
    batches = [torch.randn(4, 5, 3, generator=g) for _ in range(3)]  # [B, L, D]
    stream = iter(batches)
    with pytest.warns(UserWarning, match="only 40 tokens"):
        m = tensor_metrics(Halving(3), stream, n_batches=2)
    assert next(stream) is batches[2]  # the third batch was not consumed
    x = torch.cat(batches[:2]).reshape(-1, 3)
    assert m["tokens"] == 40
    assert m["mse"] == pytest.approx((0.25 * x.pow(2)).mean().item(), rel=1e-6)
    assert m["l1"] == pytest.approx(x.abs().sum(-1).mean().item(), rel=1e-6)
    assert m["l0"] == pytest.approx((x != 0).sum(-1).float().mean().item())
    assert m["relative_reconstruction_bias"] == pytest.approx(0.5, rel=1e-6)
    assert m["l2_ratio"] == pytest.approx(0.5, rel=1e-6) and m["cossim"] == pytest.approx(1, rel=1e-6)
    assert m["frac_alive"] == 1.0
    # a float64 dictionary gets float64 inputs and gives the same numbers
    with pytest.warns(UserWarning, match="only 40 tokens"):
        m64 = tensor_metrics(Halving(3, torch.float64), iter(batches[:2]))
    assert m64 == pytest.approx(m)


def test_tensor_metrics_errors():
    with pytest.raises(ValueError, match="activation_dim=3"):
        tensor_metrics(Halving(3), [torch.ones(2, 4)])
    with pytest.raises(TypeError, match="must be a tensor"):
        tensor_metrics(Halving(3), [(torch.ones(2, 3),)])
    with pytest.raises(ValueError, match="yielded no activations"):
        tensor_metrics(Halving(3), [])
    with pytest.raises(ValueError, match="n_batches"):
        tensor_metrics(Halving(3), [torch.ones(2, 3)], n_batches=0)
