"""The bundled tiny Pythia loads offline, has Pythia's module paths, and learned real structure."""
import itertools
import json
import math
import socket
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning.bundled import (
    BUNDLED_MODEL_DIR,
    load_bundled_model,
    read_source,
    stdlib_root,
    stdlib_source_files,
    stdlib_text_stream,
)


@pytest.fixture(scope="module")
def tbm(load_script):
    """scripts/train_bundled_model.py, which trained the bundled model."""
    return load_script("train_bundled_model")


@pytest.fixture(scope="module")
def offline_model():
    """The bundled model loaded through nnsight with the network unreachable."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")

        def refuse(*args, **kwargs):
            raise AssertionError(f"loading the bundled model tried to open a connection: {args}")

        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket, "create_connection", refuse)
        yield load_bundled_model()


def test_folder_loads_offline_with_auto_classes(monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPTNeoXForCausalLM

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL_DIR)
    assert isinstance(model, GPTNeoXForCausalLM)
    assert tokenizer.is_fast
    assert tokenizer.padding_side == "left"
    assert tokenizer.eos_token is not None and tokenizer.bos_token is not None
    assert tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == model.config.vocab_size
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model.config.eos_token_id == tokenizer.eos_token_id
    text = "def add(a, b):\n    return a + b\n"
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_nnsight_model_has_pythia_module_paths(offline_model):
    from transformers import GPTNeoXForCausalLM

    hf_model = offline_model._module
    assert isinstance(hf_model, GPTNeoXForCausalLM)
    n_layers, hidden = hf_model.config.num_hidden_layers, hf_model.config.hidden_size
    text = next(stdlib_text_stream("heldout", chunk_chars=300))
    mlp_outs = []
    with offline_model.trace(text):
        for i in range(n_layers):
            mlp_outs.append(offline_model.gpt_neox.layers[i].mlp.output.save())
        logits = offline_model.output.logits.save()
    n_tokens = len(offline_model.tokenizer(text)["input_ids"])
    assert [tuple(m.shape) for m in mlp_outs] == [(1, n_tokens, hidden)] * n_layers
    ids = offline_model.tokenizer(text, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        direct_logits = hf_model(input_ids=ids).logits
    torch.testing.assert_close(logits, direct_logits)


def test_nnsight_loads_the_folder_by_path(monkeypatch):
    """The folder is also a valid repo id for nnsight's own loaders, offline."""
    from nnsight import LanguageModel, TransformersModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    text = "import os\n"
    for model in (
        TransformersModel(str(BUNDLED_MODEL_DIR), task="text-generation", dispatch=True),
        pytest.deprecated_call(LanguageModel, str(BUNDLED_MODEL_DIR), dispatch=True),
    ):
        with model.trace(text):
            mlp_out = model.gpt_neox.layers[0].mlp.output.save()
        assert mlp_out.shape == (1, len(model.tokenizer(text)["input_ids"]), model._module.config.hidden_size)


def test_heldout_ce_is_far_below_unigram_entropy(offline_model):
    """CE on held-out chunks vs the plug-in unigram entropy of a train-split sample.

    The unigram entropy is the CE of the best context-free predictor; being 1.5 nats below it means
    the model gives the true next token e^1.5 = 4.5x the unigram's probability (geometric mean).
    """
    tokenizer, hf_model = offline_model.tokenizer, offline_model._module
    context = hf_model.config.max_position_embeddings

    train_sample = list(itertools.islice(stdlib_text_stream("train"), 300))
    counts = Counter(t for ids in tokenizer(train_sample, truncation=True)["input_ids"] for t in ids)
    total = sum(counts.values())
    unigram_entropy = -sum(n / total * math.log(n / total) for n in counts.values())

    heldout_chunks = list(itertools.islice(stdlib_text_stream("heldout"), 0, 120, 10))  # 12 chunks
    batch = tokenizer(heldout_chunks, return_tensors="pt", padding=True, truncation=True, max_length=context)
    with torch.no_grad():
        logits = hf_model(**batch).logits  # [batch, seq, vocab]
    targets = batch["input_ids"][:, 1:].masked_fill(batch["attention_mask"][:, 1:] == 0, -100)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100).item()

    assert unigram_entropy > 4.0, f"unigram entropy {unigram_entropy:.2f} nats is implausibly low"
    assert ce < unigram_entropy - 1.5, f"held-out CE {ce:.3f} vs unigram entropy {unigram_entropy:.3f} nats"


def test_training_info_matches_the_weights_and_a_live_measurement(offline_model, tbm):
    info = json.loads((BUNDLED_MODEL_DIR / "training_info.json").read_text())
    from safetensors import safe_open

    with safe_open(str(BUNDLED_MODEL_DIR / "model.safetensors"), "pt") as f:
        n_params = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert info["param_count"] == n_params
    assert (BUNDLED_MODEL_DIR / "model.safetensors").stat().st_size <= 8.5e6
    # the recorded held-out CE is what the script's own evaluation measures on these weights
    cfg = tbm.TinyPythiaConfig(**info["train_config"])
    texts = [read_source(p) for p in stdlib_source_files("heldout")]
    heldout_ids = tbm.tokenize_split(offline_model.tokenizer, texts)
    ce = tbm.heldout_ce(offline_model._module, heldout_ids, cfg)
    assert ce == pytest.approx(info["heldout_ce_nats"], abs=0.05)
    assert info["heldout_ce_nats"] < info["heldout_unigram_ce_nats"] - 1.5


def test_text_stream_is_deterministic_and_line_aligned():
    first = [c for _, c in zip(range(40), stdlib_text_stream("train", chunk_chars=500))]
    again = [c for _, c in zip(range(40), stdlib_text_stream("train", chunk_chars=500))]
    assert first == again
    assert all(isinstance(c, str) and c.strip() and len(c) <= 500 for c in first)
    assert sum(c.endswith("\n") for c in first) >= 30

    one_pass = list(stdlib_text_stream("heldout", chunk_chars=2000))
    unshuffled = list(stdlib_text_stream("heldout", chunk_chars=2000, shuffle_seed=None))
    assert one_pass != unshuffled and sorted(one_pass) == sorted(unshuffled)
    cycling = stdlib_text_stream("heldout", chunk_chars=2000, repeat=True)
    assert len([c for _, c in zip(range(len(one_pass) + 5), cycling)]) == len(one_pass) + 5


def test_splits_are_disjoint_and_exclude_tests():
    train, heldout = stdlib_source_files("train"), stdlib_source_files("heldout")
    assert heldout and len(train) > 10 * len(heldout)
    assert not set(train) & set(heldout)
    excluded = {"test", "tests", "site-packages", "encodings"}
    assert not any(excluded & set(p.relative_to(stdlib_root()).parts) for p in train + heldout)


def test_bad_arguments_name_the_argument(tbm):
    with pytest.raises(ValueError, match="split='validation'"):
        stdlib_text_stream("validation")
    with pytest.raises(ValueError, match="chunk_chars"):
        stdlib_text_stream("train", chunk_chars=0)
    with pytest.raises(ValueError, match="hidden_size=130"):
        tbm.TinyPythiaConfig(hidden_size=130, num_heads=4)


def test_lr_schedule_warms_up_then_decays(tbm):
    cfg = tbm.TinyPythiaConfig(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1)
    lrs = [tbm.lr_at(s, cfg) for s in range(cfg.steps)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_script_writes_a_loadable_folder_atomically(tmp_path, tbm):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = tbm.TinyPythiaConfig(vocab_size=300, hidden_size=16, num_layers=1, num_heads=2, context_length=32)
    texts = [read_source(p) for p in stdlib_source_files("heldout")[:3]]
    tokenizer = tbm.train_tokenizer(texts, cfg)
    assert tbm.train_tokenizer(texts, cfg).get_vocab() == tokenizer.get_vocab()
    ids = tbm.tokenize_split(tokenizer, texts)
    assert (ids == tokenizer.eos_token_id).sum() == len(texts)
    out = tmp_path / "tiny"
    out.mkdir()
    (out / "stale.txt").write_text("replaced")
    model = tbm.build_model(cfg, tokenizer)
    tbm.save_folder_atomically(model, tokenizer, {"steps": 0}, out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    torch.testing.assert_close(reloaded.state_dict(), model.state_dict())
    assert AutoTokenizer.from_pretrained(out).padding_side == "left"
