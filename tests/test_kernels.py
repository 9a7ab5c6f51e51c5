"""Every fast kernel (kernels.py) against a dense formulation of the same math on random inputs,
values and gradients."""
import pytest
import torch

import dictionary_learning.kernels as kernels_module
from dictionary_learning import GatedAutoEncoder
from dictionary_learning.kernels import (
    SparseCodes,
    attach_encoder_gradient,
    auxk_loss,
    batch_top_k_codes,
    gather_preactivations,
    largest_entries,
    lp_sparsity,
    per_token_top_k_codes,
    sparse_decode,
    threshold_codes,
)

N, D, F_ = 24, 8, 40


@pytest.fixture(params=["sparse", "dense"])
def path(request, monkeypatch):
    """Each kernel on its sparse path, then on the dense fallback that takes over above
    DENSE_DECODE_DENSITY nonzero entries."""
    monkeypatch.setattr(kernels_module, "DENSE_DECODE_DENSITY", 1.0 if request.param == "sparse" else 0.0)
    return request.param


def random_codes(generator, n_rows=N, dict_size=F_, density=0.2, dtype=torch.float64):
    dense = torch.rand(n_rows, dict_size, generator=generator, dtype=dtype)
    dense = dense * (torch.rand(n_rows, dict_size, generator=generator) < density)
    dense[3] = 0  # a token with no entries
    rows, columns = dense.nonzero(as_tuple=True)
    return SparseCodes(dense[rows, columns], rows, columns, n_rows), dense


def test_sparse_codes_offsets_and_to_dense():
    codes, dense = random_codes(torch.Generator().manual_seed(0))
    assert torch.equal(codes.to_dense(F_), dense)
    counts = (dense != 0).sum(1)
    assert torch.equal(codes.offsets(), torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)[:-1]]))


def test_selections_match_their_dense_definitions():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(N, F_, generator=g, dtype=torch.float64)
    k = 5
    top = pre.topk(k, dim=-1)
    expected = torch.zeros_like(pre).scatter_(-1, top.indices, top.values.relu())
    assert torch.equal(per_token_top_k_codes(pre, k).to_dense(F_), expected)
    kth = pre.flatten().topk(k * N).values.min()
    assert torch.equal(batch_top_k_codes(pre, k).to_dense(F_), (pre * (pre >= kth)).relu())
    threshold = torch.rand(F_, generator=g, dtype=torch.float64)
    assert torch.equal(threshold_codes(pre, threshold).to_dense(F_), pre * (pre > threshold))


def test_sparse_decode_matches_the_dense_product(path):
    g = torch.Generator().manual_seed(2)
    codes, dense = random_codes(g)
    W_dec = torch.randn(F_, D, generator=g, dtype=torch.float64, requires_grad=True)
    values = codes.values.clone().requires_grad_()
    out = sparse_decode(codes._replace(values=values), W_dec)
    reference = dense.clone().requires_grad_()
    expected = reference @ W_dec
    torch.testing.assert_close(out, expected)
    grad = torch.randn(N, D, generator=g, dtype=torch.float64)
    g_values, g_dec = torch.autograd.grad(out, (values, W_dec), grad)
    g_dense, g_dec_expected = torch.autograd.grad(expected, (reference, W_dec), grad)
    torch.testing.assert_close(g_values, g_dense[codes.rows, codes.columns])
    torch.testing.assert_close(g_dec, g_dec_expected)


@pytest.mark.parametrize("input_bias", [True, False])
def test_encoder_gradient_kernels_match_autograd_through_the_encoder(path, input_bias):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W_enc = torch.randn(D, F_, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(F_, generator=g, dtype=torch.float64, requires_grad=True)
    b_in = torch.randn(D, generator=g, dtype=torch.float64, requires_grad=True) if input_bias else None
    encoder_input = x - b_in if input_bias else x
    reference = encoder_input @ W_enc + b_enc  # what autograd differentiates
    with torch.no_grad():
        pre = reference.detach()
    codes, _ = random_codes(g)
    weights = torch.randn(codes.values.shape, generator=g, dtype=torch.float64)
    params = [W_enc, b_enc] + ([b_in] if input_bias else [])
    gathered = gather_preactivations(pre, encoder_input.detach(), W_enc, b_enc, b_in, codes.rows, codes.columns)
    torch.testing.assert_close(gathered, reference[codes.rows, codes.columns])
    for ours, theirs in zip(torch.autograd.grad((gathered * weights).sum(), params),
                            torch.autograd.grad((reference[codes.rows, codes.columns] * weights).sum(), params,
                                                retain_graph=True)):
        torch.testing.assert_close(ours, theirs)
    grad = torch.randn(N, F_, generator=g, dtype=torch.float64)
    attached = attach_encoder_gradient(pre, encoder_input.detach(), W_enc, b_enc, b_in)
    for ours, theirs in zip(torch.autograd.grad(attached, params, grad), torch.autograd.grad(reference, params, grad)):
        torch.testing.assert_close(ours, theirs)


def test_auxk_loss_matches_its_dense_formula(path):
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, D, generator=g, dtype=torch.float64)
    W_enc = torch.randn(D, F_, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc = torch.randn(F_, generator=g, dtype=torch.float64, requires_grad=True)
    W_dec = torch.randn(F_, D, generator=g, dtype=torch.float64, requires_grad=True)
    b_dec = torch.randn(D, generator=g, dtype=torch.float64)
    dead = torch.rand(F_, generator=g) < 0.4
    residual = torch.randn(N, D, generator=g, dtype=torch.float64)
    k_aux = 3
    pre = (x - b_dec) @ W_enc + b_enc
    loss = auxk_loss(pre.detach(), x - b_dec, W_enc, b_enc, W_dec, dead, residual, k_aux)
    masked = pre.masked_fill(~dead, float("-inf"))
    top = masked.topk(k_aux, dim=-1)
    f_aux = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
    reference = (f_aux @ W_dec - residual).pow(2).sum() / (residual - residual.mean(0)).pow(2).sum()
    torch.testing.assert_close(loss, reference)
    for ours, theirs in zip(torch.autograd.grad(loss, (W_enc, b_enc, W_dec)),
                            torch.autograd.grad(reference, (W_enc, b_enc, W_dec))):
        torch.testing.assert_close(ours, theirs)
    assert auxk_loss(pre.detach(), x - b_dec, W_enc, b_enc, W_dec, torch.zeros(F_, dtype=torch.bool), residual,
                     k_aux) == 0


def test_lp_sparsity_values_and_finite_gradient_at_zero():
    f = torch.tensor([[4.0, 0.0, 1.0], [0.0, 0.0, 9.0]])
    assert lp_sparsity(f, 0.5).item() == pytest.approx(((2 + 1) + 3) / 2)
    assert lp_sparsity(f, 0.5, "Lp").item() == pytest.approx((3**2 + 3**2) / 2)
    assert lp_sparsity(f, 1.0).item() == pytest.approx(14 / 2)
    rows, columns = f.nonzero(as_tuple=True)
    sparse = SparseCodes(f[rows, columns], rows, columns, n_rows=3)  # plus a token with no entries
    dense = torch.cat([f, torch.zeros(1, 3)])
    for p, kind in [(0.5, "Lp^p"), (0.5, "Lp"), (1.0, "Lp"), (1.0, "Lp^p")]:
        torch.testing.assert_close(lp_sparsity(sparse, p, kind), lp_sparsity(dense, p, kind))
    pre = torch.tensor([[1.0, -2.0, 0.0]], requires_grad=True)
    lp_sparsity(torch.relu(pre), 0.2).backward()
    assert torch.isfinite(pre.grad).all() and pre.grad[0, 1] == 0


@pytest.mark.parametrize("case", ["continuous", "ties", "unlucky_sample"])
def test_largest_entries_is_topk(case):
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(64 * 2048, generator=generator)
    if case == "ties":  # many equal values around the cutoff
        values = (values * 4).round()
    if case == "unlucky_sample":  # every sampled entry is among the largest: the cutoff is too high
        values[::16] += 100.0
    m = 32 * 64
    top, positions = largest_entries(values, m)
    expected = values.topk(m).values
    assert positions.unique().numel() == m
    assert torch.equal(values[positions], top)
    assert torch.equal(top.sort(descending=True).values, expected)  # the same multiset of values


def _gated_reference(ae, x):
    """The gated SAE's defining formula, differentiated by plain autograd."""
    x_enc = (x - ae.b_dec) @ ae.W_enc
    gate = torch.relu(x_enc + ae.b_gate)
    magnitude = torch.relu(ae.r_mag.exp() * x_enc + ae.b_mag)
    return torch.where(x_enc + ae.b_gate > 0, magnitude, torch.zeros_like(magnitude)), gate


@pytest.mark.parametrize("shape", [(33,), (3, 11)])
def test_gated_fused_encode_matches_formula_and_its_gradients(shape):
    torch.manual_seed(0)
    ae = GatedAutoEncoder(8, 40).double()
    with torch.no_grad():  # every parameter away from its zero init, so every gradient term counts
        for p in (ae.b_dec, ae.r_mag, ae.b_gate, ae.b_mag):
            p.normal_(0, 0.5)
    x = torch.randn(*shape, 8, dtype=torch.float64, requires_grad=True)
    grad_f, grad_gate = torch.randn(*shape, 40, dtype=torch.float64), torch.randn(*shape, 40, dtype=torch.float64)
    results = []
    for encode in (lambda: ae.encode(x, return_gate=True), lambda: _gated_reference(ae, x)):
        ae.zero_grad()
        x.grad = None
        f, gate = encode()
        ((f * grad_f).sum() + (gate * grad_gate).sum()).backward()
        results.append([f.detach(), gate.detach(), x.grad] + [p.grad for p in ae.parameters() if p is not ae.W_dec])
    fused, reference = results
    assert (fused[0] > 0).any() and (fused[0] == 0).any() and ((fused[1] > 0) & (fused[0] == 0)).any()
    for a, b in zip(fused, reference):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
