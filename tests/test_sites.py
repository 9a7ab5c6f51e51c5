"""Several sites in one forward pass (sites.py, ActivationBuffer(submodules=...)), both backends."""
from collections import Counter

import pytest
import torch

from dictionary_learning import ActivationBuffer
from dictionary_learning.sites import layer_of, site_reader

from lm_fixtures import documents, fresh_tokenizer, match_rows, reference_activations, tiny_gpt_neox, \
    unique_start_documents, wrap

MLP0, MLP1 = "gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"
LAYER1 = "gpt_neox.layers.1"
UP0 = "gpt_neox.layers.0.mlp.dense_h_to_4h"  # width 64 where the residual stream is 32


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt_neox(init_std=0.5)  # activations far enough apart that a row identifies its token


@pytest.fixture(scope="module")
def lm(hf):
    return wrap(hf)


def buffer_kwargs(**overrides):
    return {"n_ctxs": 8, "ctx_len": 16, "refresh_batch_size": 4, "out_batch_size": 16, "seed": 0, **overrides}


def drain(buffer):
    return list(buffer)


def stacked(batches, site):
    return torch.cat([batch[site] for batch in batches])


def test_every_site_serves_the_same_tokens(hf, lm):
    """Each row of a batch holds, at every site, the activations of one and the same token: match
    the layer-1 row to a plain forward's (document, position) (after attention, unique document
    starts make every row distinct), then the other sites' rows must be that token's activations
    there. Widths differ per site."""
    texts = unique_start_documents(12)
    buffer = ActivationBuffer(iter(texts), lm, submodules=[LAYER1, UP0, MLP0], **buffer_kwargs())
    assert list(buffer.sites) == [LAYER1, UP0, MLP0]  # the caller's order, whatever the execution order
    assert buffer.d_sites == {LAYER1: 32, UP0: 64, MLP0: 32}
    batches = drain(buffer)
    assert all(set(batch) == {LAYER1, UP0, MLP0} for batch in batches)
    tokenizer = lm.tokenizer
    reference = {site: torch.cat(reference_activations(hf, tokenizer, texts, site, max_length=16))
                 for site in (LAYER1, UP0, MLP0)}
    n_tokens = sum(len(tokenizer(t, truncation=True, max_length=16)["input_ids"]) for t in texts)
    assert len(stacked(batches, LAYER1)) == n_tokens
    token_ids = match_rows(stacked(batches, LAYER1), reference[LAYER1])
    assert sorted(token_ids.tolist()) == list(range(n_tokens))  # every token once
    for site in (UP0, MLP0):
        torch.testing.assert_close(stacked(batches, site), reference[site][token_ids], atol=1e-5, rtol=1e-5)


def test_globs_dicts_and_the_order_of_sites(lm):
    texts = documents(10)
    by_glob = ActivationBuffer(iter(texts), lm, submodules="gpt_neox.layers.*.mlp", **buffer_kwargs())
    assert list(by_glob.sites) == [MLP0, MLP1]
    reversed_list = ActivationBuffer(iter(texts), lm, submodules=[MLP1, MLP0], **buffer_kwargs())
    named = ActivationBuffer(iter(texts), lm, submodules={"late": lm.gpt_neox.layers[1].mlp, "early": MLP0},
                             **buffer_kwargs())
    for a, b, c in zip(drain(by_glob), drain(reversed_list), drain(named), strict=True):
        assert torch.equal(a[MLP0], b[MLP0]) and torch.equal(a[MLP1], b[MLP1])
        assert torch.equal(a[MLP0], c["early"]) and torch.equal(a[MLP1], c["late"])


def test_one_site_form_is_unchanged_and_equals_the_multi_site_rows(lm):
    texts = documents(10)
    single = drain(ActivationBuffer(iter(texts), lm, lm.gpt_neox.layers[0].mlp, **buffer_kwargs()))
    multi = drain(ActivationBuffer(iter(texts), lm, submodules=[MLP0, MLP1], **buffer_kwargs()))
    assert all(isinstance(batch, torch.Tensor) for batch in single)
    assert len(single) == len(multi)
    assert all(torch.equal(a, b[MLP0]) for a, b in zip(single, multi))


def test_the_pass_stops_after_the_deepest_site():
    hf = tiny_gpt_neox(layers=3)
    model = wrap(hf)
    calls = Counter()
    for name in ["gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp", "gpt_neox.layers.2", "lm_head"]:
        hf.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.update([name]))
    buffer = ActivationBuffer(iter(documents(20)), model, submodules=["gpt_neox.layers.1.mlp", "gpt_neox.layers.0.mlp"],
                              **buffer_kwargs())
    drain(buffer)
    assert calls["gpt_neox.layers.0.mlp"] >= 3  # probe and fills ran what precedes the deepest site
    assert calls["gpt_neox.layers.2"] == calls["lm_head"] == 0


def test_pad_and_bos_are_dropped_at_every_site(lm):
    """Documents of different lengths (padding) that start with BOS: every site serves the real
    non-BOS tokens only, the same count at each."""
    bos = lm.tokenizer.bos_token
    texts = [bos + t for t in documents(9)]
    buffer = ActivationBuffer(iter(texts), lm, submodules=[MLP0, LAYER1], remove_bos=True, **buffer_kwargs())
    batches = drain(buffer)
    expected = sum(len(lm.tokenizer(t, truncation=True, max_length=16)["input_ids"]) - 1 for t in texts)
    assert len(stacked(batches, MLP0)) == len(stacked(batches, LAYER1)) == expected


def test_in_to_out_pairs_are_a_modules_input_and_output(hf, lm):
    texts = unique_start_documents(8)
    buffer = ActivationBuffer(iter(texts), lm, MLP1, io="in_to_out", **buffer_kwargs())
    assert buffer.d_submodule == (32, 32)
    batches = drain(buffer)
    assert all(isinstance(batch, tuple) and len(batch) == 2 for batch in batches)
    inputs, outputs = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    reference_in = torch.cat(reference_activations(hf, lm.tokenizer, texts, MLP1, io="in", max_length=16))
    reference_out = torch.cat(reference_activations(hf, lm.tokenizer, texts, MLP1, max_length=16))
    token_ids = match_rows(inputs, reference_in)
    assert sorted(token_ids.tolist()) == list(range(len(reference_in)))
    torch.testing.assert_close(outputs, reference_out[token_ids], atol=1e-5, rtol=1e-5)
    multi = ActivationBuffer(iter(texts), lm, submodules=[MLP0, MLP1], io="in_to_out", **buffer_kwargs())
    batch = next(multi)
    assert {site: tuple(t.shape[1] for t in pair) for site, pair in batch.items()} == {MLP0: (32, 32), MLP1: (32, 32)}


def test_plain_torch_backend_serves_what_nnsight_serves(hf, lm):
    """A transformers model without nnsight (forward hooks) gives bit-identical batches."""
    texts = documents(12)
    for kwargs in ({"submodule": MLP0}, {"submodules": [LAYER1, UP0, MLP0]}, {"submodule": MLP1, "io": "in_to_out"}):
        via_nnsight = drain(ActivationBuffer(iter(texts), lm, **kwargs, **buffer_kwargs()))
        via_hooks_buffer = ActivationBuffer(iter(texts), hf, tokenizer=fresh_tokenizer(), **kwargs, **buffer_kwargs())
        assert via_hooks_buffer.reader.backend == "torch" and via_hooks_buffer.config["backend"] == "torch"
        via_hooks = drain(via_hooks_buffer)
        assert len(via_nnsight) == len(via_hooks) > 1
        flat = lambda batch: list(batch.values()) if isinstance(batch, dict) else list(batch) if isinstance(batch, tuple) else [batch]
        for a, b in zip(via_nnsight, via_hooks):
            assert all(torch.equal(x, y) for x, y in zip(flat(a), flat(b), strict=True))


def test_plain_backend_stops_early_and_removes_its_hooks(hf):
    module = hf.get_submodule(MLP0)
    buffer = ActivationBuffer(iter(documents(6)), hf, MLP0, tokenizer=fresh_tokenizer(), **buffer_kwargs())
    drain(buffer)
    assert not module._forward_hooks and not module._forward_pre_hooks


def test_site_config_is_self_describing(lm):
    buffer = ActivationBuffer(iter(documents(4)), lm, submodules="gpt_neox.layers.*", **buffer_kwargs())
    config = buffer.site_config("gpt_neox.layers.1")
    assert config["submodule"] == "gpt_neox.layers.1" and config["layer"] == 1 and config["d_submodule"] == 32
    assert buffer.config["submodules"] == {"gpt_neox.layers.0": "gpt_neox.layers.0", "gpt_neox.layers.1": "gpt_neox.layers.1"}
    assert layer_of("transformer.h.11.mlp") == 11 and layer_of("lm_head") is None


def test_bad_sites_get_clear_errors(hf, lm):
    with pytest.raises(ValueError, match=r"matches no submodule.*gpt_neox\.layers"):
        ActivationBuffer(iter([]), lm, submodules="gpt_neox.blocks.*.mlp", **buffer_kwargs())
    with pytest.raises(ValueError, match="no submodule 'gpt_neox.layers.7'"):
        ActivationBuffer(iter([]), lm, submodules=["gpt_neox.layers.7"], **buffer_kwargs())
    with pytest.raises(ValueError, match="exactly one of submodule= .* and submodules="):
        ActivationBuffer(iter([]), lm, MLP0, submodules=[MLP1], **buffer_kwargs())
    with pytest.raises(ValueError, match="listed twice"):
        ActivationBuffer(iter([]), lm, submodules=[MLP0, lm.gpt_neox.layers[0].mlp], **buffer_kwargs())
    with pytest.raises(ValueError, match="io must be one of"):
        ActivationBuffer(iter([]), lm, submodules=[MLP0], io="both", **buffer_kwargs())
    with pytest.raises(TypeError, match="needs tokenizer="):
        ActivationBuffer(iter([]), hf, MLP0, **buffer_kwargs())
    with pytest.raises(ValueError, match=r"d_submodule=\{'x': 3\}|names site 'x'"):
        ActivationBuffer(iter([]), lm, submodules=[MLP0], d_submodule={"x": 3}, **buffer_kwargs())
    with pytest.raises(ValueError, match="d_submodule=16 does not match"):
        ActivationBuffer(iter([]), lm, submodules=[MLP0], d_submodule={MLP0: 16}, **buffer_kwargs())
    reader = site_reader(lm, [MLP0], "out")
    assert [site.path for site in reader.sites] == [MLP0]


def test_the_reference_pytorch_buffer_name_builds_the_same_buffer(hf, lm, tmp_path):
    """`dictionary_learning.pytorch_buffer.ActivationBuffer` takes the reference's arguments (and a
    tokenizer from model.name_or_path) and serves what the nnsight buffer serves."""
    from dictionary_learning.pytorch_buffer import ActivationBuffer as TorchBuffer

    fresh_tokenizer().save_pretrained(tmp_path)
    hf.name_or_path = str(tmp_path)  # where the reference's buffer loads the tokenizer from
    texts = documents(12)
    kwargs = buffer_kwargs()
    seed = kwargs.pop("seed")
    ours = TorchBuffer(iter(texts), hf, hf.get_submodule(MLP0), None, "out", kwargs["n_ctxs"], kwargs["ctx_len"],
                       kwargs["refresh_batch_size"], kwargs["out_batch_size"], "cpu", False, True, seed=seed)
    assert ours.reader.backend == "torch" and ours.d_submodule == 32
    reference = ActivationBuffer(iter(texts), lm, MLP0, **buffer_kwargs())
    assert all(torch.equal(a, b) for a, b in zip(drain(ours), drain(reference), strict=True))
    with pytest.raises(ValueError, match="max_activation_norm_multiple"):
        TorchBuffer(iter(texts), hf, MLP0, max_activation_norm_multiple=10, tokenizer=fresh_tokenizer())
    unspecial = ActivationBuffer(iter([]), lm, MLP0, add_special_tokens=False, **buffer_kwargs())
    assert unspecial.config["add_special_tokens"] is False
