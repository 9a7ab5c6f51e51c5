"""ActivationBuffer on tiny offline GPT-NeoX / GPT-2 models (nnsight 0.8, transformers 5)."""
import json
from collections import Counter

import pytest
import torch

from dictionary_learning import ActivationBuffer
from dictionary_learning.buffer import token_mask

from lm_fixtures import (
    ENDOFTEXT,
    documents,
    match_rows,
    reference_activations,
    tiny_gpt2,
    tiny_gpt_neox,
    tiny_language_model,
    unique_start_documents,
    wrap,
)


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model()


class CountingTexts:
    """An iterator over texts that counts how many were taken."""

    def __init__(self, texts):
        self.texts = list(texts)
        self.taken = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.taken == len(self.texts):
            raise StopIteration
        self.taken += 1
        return self.texts[self.taken - 1]


def assert_same_rows(got, reference):
    """`got` and `reference` hold the same rows, as multisets (up to float noise)."""
    assert got.shape == reference.shape
    assert Counter(match_rows(got, reference).tolist()) == Counter(match_rows(reference, reference).tolist())


def drain(buffer):
    batches = list(buffer)
    return torch.cat(batches), batches


def test_shapes_dtype_and_config(lm):
    buffer = ActivationBuffer(iter(documents(40)), lm, lm.gpt_neox.layers[1].mlp, n_ctxs=8.0,
                              ctx_len=16, refresh_batch_size=4, out_batch_size=32)
    assert buffer.d_submodule == 32 and buffer.capacity == 128
    batch = next(buffer)
    assert batch.shape == (32, 32) and batch.dtype == torch.float32 and batch.device.type == "cpu"
    config = json.loads(json.dumps(buffer.config))
    assert config["submodule"] == "gpt_neox.layers.1.mlp" and config["n_ctxs"] == 8
    assert config["d_submodule"] == 32 and config["io"] == "out" and config["dtype"] == "float32"


def test_accepts_transformers_model_module_and_path():
    model = tiny_language_model(deprecated_alias=False)
    texts = documents(10)
    by_envoy = ActivationBuffer(iter(texts), model, model.gpt_neox.layers[0], n_ctxs=4, ctx_len=16,
                                refresh_batch_size=4, out_batch_size=16, seed=3)
    by_module = ActivationBuffer(iter(texts), model, model._module.gpt_neox.layers[0], n_ctxs=4,
                                 ctx_len=16, refresh_batch_size=4, out_batch_size=16, seed=3)
    by_path = ActivationBuffer(iter(texts), model, "gpt_neox.layers.0", n_ctxs=4, ctx_len=16,
                               refresh_batch_size=4, out_batch_size=16, seed=3)
    a, b, c = next(by_envoy), next(by_module), next(by_path)
    assert torch.equal(a, b) and torch.equal(a, c)


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt2"])
@pytest.mark.parametrize("remove_bos", [False, True])
def test_serves_exactly_the_real_tokens_under_left_padding(arch, remove_bos):
    """Drained buffer == per-text unpadded HF forward (torch hook), as multisets. Some texts start
    with a real BOS token and some contain EOS mid-text; BOS == EOS == pad id, as in Pythia."""
    hf = tiny_gpt_neox() if arch == "gpt_neox" else tiny_gpt2()
    model = wrap(hf)
    assert model.tokenizer.padding_side == "left"
    name = "gpt_neox.layers.1.mlp" if arch == "gpt_neox" else "transformer.h.1.mlp"
    texts = unique_start_documents(24)
    texts = [ENDOFTEXT + t if i % 3 == 0 else t for i, t in enumerate(texts)]
    texts = [t.replace(".", "." + ENDOFTEXT, 1) if i % 4 == 1 else t for i, t in enumerate(texts)]
    buffer = ActivationBuffer(iter(texts), model, name, n_ctxs=32, ctx_len=24,
                              refresh_batch_size=5, out_batch_size=64, remove_bos=remove_bos)
    got, _ = drain(buffer)

    reference = reference_activations(hf, model.tokenizer, texts, name, max_length=24)
    if remove_bos:  # only the texts that really start with BOS lose their first row
        reference = [r[1:] if t.startswith(ENDOFTEXT) else r for r, t in zip(reference, texts)]
    assert_same_rows(got, torch.cat(reference))


def test_right_padding_is_masked_too(lm):
    hf = tiny_gpt_neox()
    model = wrap(hf)
    model.tokenizer.padding_side = "right"
    texts = unique_start_documents(12)
    buffer = ActivationBuffer(iter(texts), model, "gpt_neox.layers.1.mlp", n_ctxs=16, ctx_len=20,
                              refresh_batch_size=6, out_batch_size=32)
    got, _ = drain(buffer)
    assert_same_rows(got, torch.cat(reference_activations(hf, model.tokenizer, texts, "gpt_neox.layers.1.mlp",
                                                          max_length=20)))


def test_token_mask_uses_attention_mask_not_ids():
    ids = torch.tensor([[0, 0, 0, 5, 0],    # two pads, a real BOS, a token, a real EOS
                        [0, 0, 6, 7, 8],    # two pads, no BOS
                        [3, 0, 4, 0, 0]])   # right padded, EOS (same id) mid-text
    mask = torch.tensor([[0, 0, 1, 1, 1],
                         [0, 0, 1, 1, 1],
                         [1, 1, 1, 0, 0]])
    assert torch.equal(token_mask(ids, mask), mask.bool())
    expected = mask.bool().clone()
    expected[0, 2] = False  # only the leading real BOS leaves
    assert torch.equal(token_mask(ids, mask, bos_token_id=0), expected)


@pytest.mark.parametrize("submodule_name,io,tuple_output", [
    ("gpt_neox.layers.1.mlp", "in", False),
    ("gpt_neox.layers.0.attention", "out", True),  # returns (attn_output, attn_weights)
    ("gpt_neox.layers.0", "out", False),  # a decoder layer returns a tensor in transformers 5
])
def test_io_and_tuple_outputs(submodule_name, io, tuple_output):
    hf = tiny_gpt_neox()
    model = wrap(hf)
    probe = []
    handle = hf.get_submodule(submodule_name).register_forward_hook(lambda m, a, o: probe.append(o))
    with torch.no_grad():
        hf(input_ids=torch.tensor([[5, 6, 7]]))
    handle.remove()
    assert isinstance(probe[0], tuple) == tuple_output
    texts = unique_start_documents(8)
    buffer = ActivationBuffer(iter(texts), model, submodule_name, io=io, n_ctxs=16, ctx_len=16,
                              refresh_batch_size=4, out_batch_size=16)
    got, _ = drain(buffer)
    assert_same_rows(got, torch.cat(reference_activations(hf, model.tokenizer, texts, submodule_name, io, 16)))
    if io == "in":  # and they really are inputs, not outputs
        outputs = torch.cat(reference_activations(hf, model.tokenizer, texts, submodule_name, "out", 16))
        assert (got[:, None] - outputs[None]).abs().amax(-1).min() > 1e-3


def test_forward_stops_after_the_submodule():
    hf = tiny_gpt_neox(layers=3)
    model = wrap(hf)
    calls = Counter()
    for name in ["gpt_neox.layers.0.attention", "gpt_neox.layers.1", "gpt_neox.layers.2", "lm_head"]:
        hf.get_submodule(name).register_forward_hook(lambda *_, name=name: calls.update([name]))
    buffer = ActivationBuffer(iter(documents(30)), model, model.gpt_neox.layers[0].mlp, n_ctxs=8,
                              ctx_len=16, refresh_batch_size=4, out_batch_size=16)
    for _ in range(6):
        next(buffer)
    assert calls["gpt_neox.layers.0.attention"] >= 3  # probe + fills ran what precedes the MLP
    assert calls["gpt_neox.layers.1"] == calls["gpt_neox.layers.2"] == calls["lm_head"] == 0


def test_refills_at_half_and_mixes_old_with_new():
    hf = tiny_gpt_neox()
    model = wrap(hf)
    texts = unique_start_documents(36)
    data = CountingTexts(texts)
    buffer = ActivationBuffer(data, model, "gpt_neox.layers.1.mlp", n_ctxs=4, ctx_len=16,
                              refresh_batch_size=2, out_batch_size=8, seed=0)
    reference = reference_activations(hf, model.tokenizer, texts, "gpt_neox.layers.1.mlp", max_length=16)
    doc_of_row = torch.cat([torch.full((len(r),), i) for i, r in enumerate(reference)])
    reference = torch.cat(reference)

    first = next(buffer)
    assert buffer.n_unread == buffer.capacity - 8  # filled completely, then one batch served
    taken_by_first_fill = data.taken
    fill_of_batch, docs_of_batch, refills = [], [], 0
    taken = data.taken
    for _ in range(12):
        unread_before = buffer.n_unread
        batch = next(buffer)
        if unread_before >= buffer.capacity // 2:
            assert data.taken == taken  # no new text until half the buffer is read
        else:
            refills += 1
            assert buffer.n_unread == buffer.capacity - 8  # refilled to full, then served 8
        taken = data.taken
        docs_of_batch.append(doc_of_row[match_rows(batch, reference)])
        fill_of_batch.append(refills)
    assert refills >= 2 and data.taken > taken_by_first_fill

    # The first fill is shuffled: one batch spans several documents.
    first_docs = doc_of_row[match_rows(first, reference)]
    assert len(set(first_docs.tolist())) >= 3
    # After the first refill, batches mix rows left from the first fill with new ones.
    after_refill = torch.cat([d for d, f in zip(docs_of_batch, fill_of_batch) if f == 1])
    assert (after_refill < taken_by_first_fill).any() and (after_refill >= taken_by_first_fill).any()
    mixed = [d for d, f in zip(docs_of_batch, fill_of_batch) if f == 1
             and (d < taken_by_first_fill).any() and (d >= taken_by_first_fill).any()]
    assert mixed, "no batch after the refill holds both old and new rows"


def test_exhaustion_serves_everything_once_then_stops(lm):
    texts = unique_start_documents(20)
    buffer = ActivationBuffer(iter(texts), lm, lm.gpt_neox.layers[1].mlp, n_ctxs=6, ctx_len=16,
                              refresh_batch_size=3, out_batch_size=20)
    got, batches = drain(buffer)
    n_tokens = sum(len(lm.tokenizer(t, truncation=True, max_length=16)["input_ids"]) for t in texts)
    assert len(got) == n_tokens
    assert all(len(b) == 20 for b in batches[:-1]) and 0 < len(batches[-1]) <= 20
    assert len(set(match_rows(got, got).tolist())) == n_tokens  # no row twice
    with pytest.raises(StopIteration):
        next(buffer)


def test_storage_dtype_and_determinism(lm):
    def make(dtype=None, seed=7):
        return ActivationBuffer(iter(documents(30)), lm, lm.gpt_neox.layers[1].mlp, n_ctxs=8,
                                ctx_len=16, refresh_batch_size=4, out_batch_size=16, dtype=dtype, seed=seed)

    full, again, half = make(), make(), make(torch.bfloat16)
    assert half._storage.dtype == torch.bfloat16 and half._storage.element_size() == 2
    for _ in range(10):  # crosses refills
        a, b, h = next(full), next(again), next(half)
        assert torch.equal(a, b)
        assert h.dtype == torch.bfloat16
        torch.testing.assert_close(h.float(), a, rtol=1e-2, atol=1e-2)
    assert not torch.equal(next(make(seed=8)), next(make(seed=7)))


def test_errors(lm):
    sub = lm.gpt_neox.layers[1].mlp
    kwargs = dict(n_ctxs=4, ctx_len=16, refresh_batch_size=2, out_batch_size=8)
    with pytest.raises(TypeError, match="strings"):
        next(ActivationBuffer(iter(["fine", {"text": "a record"}]), lm, sub, **kwargs))
    with pytest.raises(TypeError, match="single string"):
        ActivationBuffer("just one text", lm, sub, **kwargs)
    other = tiny_language_model()
    with pytest.raises(ValueError, match="different model"):
        ActivationBuffer(iter([]), lm, other.gpt_neox.layers[1].mlp, **kwargs)
    with pytest.raises(ValueError, match="not part of the model"):
        ActivationBuffer(iter([]), lm, torch.nn.Linear(2, 2), **kwargs)
    with pytest.raises(ValueError, match="no submodule"):
        ActivationBuffer(iter([]), lm, "gpt_neox.layers.7.mlp", **kwargs)
    with pytest.raises(ValueError, match="d_submodule=512 does not match.*width 32"):
        ActivationBuffer(iter([]), lm, sub, d_submodule=512, **kwargs)
    with pytest.raises(ValueError, match="io must be"):
        ActivationBuffer(iter([]), lm, sub, io="both", **kwargs)
    with pytest.raises(ValueError, match="more than half the buffer"):
        ActivationBuffer(iter([]), lm, sub, n_ctxs=1, ctx_len=16, out_batch_size=9)
    with pytest.raises(ValueError, match="ctx_len=1000 is longer than the model's 256 positions"):
        ActivationBuffer(iter([]), lm, sub, n_ctxs=4, ctx_len=1000, out_batch_size=8)
    with pytest.raises(TypeError, match="nnsight"):
        ActivationBuffer(iter([]), lm._module, sub, **kwargs)
    with pytest.raises(ValueError, match="per-token"):  # a ModelOutput, not a [batch, seq, d] tensor
        ActivationBuffer(iter([]), lm, lm.gpt_neox, **kwargs)
    with pytest.raises(ValueError, match="never reached"):  # not part of the forward pass
        ActivationBuffer(iter([]), lm, lm.generator.streamer, **kwargs)


def test_empty_texts_and_empty_stream(lm):
    buffer = ActivationBuffer(iter(["", "", "the cat sees the river."]), lm, lm.gpt_neox.layers[0].mlp,
                              n_ctxs=2, ctx_len=16, refresh_batch_size=2, out_batch_size=4)
    got, _ = drain(buffer)
    assert len(got) == len(lm.tokenizer("the cat sees the river.")["input_ids"])
    assert list(ActivationBuffer(iter([]), lm, lm.gpt_neox.layers[0].mlp, n_ctxs=2, ctx_len=16,
                                 out_batch_size=4)) == []
