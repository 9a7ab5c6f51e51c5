"""Language-model metrics (`loss_recovered`, `evaluate`) against plain HF forwards with torch hooks."""
import math

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import ActivationBuffer, AutoEncoder, IdentityDict
from dictionary_learning.evaluation import evaluate, loss_recovered

from lm_fixtures import ENDOFTEXT, documents, tiny_gpt_neox, wrap

pytestmark = pytest.mark.filterwarnings("ignore:frac_alive was measured over only")

MLP = "gpt_neox.layers.1.mlp"
# Real EOS tokens mid-text and at the end must count as targets (pad id == EOS id here).
TEXTS = [t + ENDOFTEXT if i % 2 else t.replace(".", "." + ENDOFTEXT, 1) for i, t in enumerate(documents(6, seed=5))]


class ZeroDecoder(IdentityDict):
    """A dictionary whose reconstruction is always zero."""

    def decode(self, f):
        return torch.zeros_like(f)


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt_neox(init_std=0.2)  # large enough weights that the MLP matters to the loss


@pytest.fixture(scope="module")
def model(hf):
    return wrap(hf)


def hf_losses(hf, tokenizer, texts, module_name=MLP, replace=None, io="out"):
    """Mean next-token CE and the per-token next-token log-probs, one unpadded forward per text;
    `replace(x) -> x'` swaps the module's output (first element of a tuple) or first input."""
    module = hf.get_submodule(module_name)
    if replace is None:
        handle = None
    elif io == "out":
        def hook(_m, _args, out):
            return (replace(out[0]), *out[1:]) if isinstance(out, tuple) else replace(out)
        handle = module.register_forward_hook(hook)
    else:
        handle = module.register_forward_pre_hook(lambda _m, args: (replace(args[0]), *args[1:]))
    total, count, logps = 0.0, 0, []
    try:
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt")["input_ids"]
                logits = hf(input_ids=ids).logits[0, :-1].float()
                total += F.cross_entropy(logits, ids[0, 1:], reduction="sum").item()
                count += ids.shape[1] - 1
                logps.append(logits.log_softmax(-1))
    finally:
        if handle is not None:
            handle.remove()
    return total / count, count, torch.cat(logps)


def test_identity_recovers_everything_and_zero_nothing(model):
    full = loss_recovered(TEXTS, model, MLP, IdentityDict(32))
    assert full["ce_reconstructed"] == pytest.approx(full["ce_clean"], abs=1e-6)
    assert full["frac_recovered"] == pytest.approx(1.0, abs=1e-5)
    assert full["kl_reconstructed"] == pytest.approx(0.0, abs=1e-6) and full["ce_diff"] == pytest.approx(0, abs=1e-6)
    assert abs(full["ce_zero"] - full["ce_clean"]) > 0.05  # the test model's MLP matters
    none = loss_recovered(TEXTS, model, MLP, ZeroDecoder(32))
    assert none["ce_reconstructed"] == pytest.approx(none["ce_zero"], abs=1e-6)
    assert none["frac_recovered"] == pytest.approx(0.0, abs=1e-5)
    assert none["kl_reconstructed"] == pytest.approx(none["kl_zero"], rel=1e-5) and none["kl_zero"] > 0.01


def test_matches_independent_hf_computation(hf, model):
    """Clean, spliced and zero-ablated CE and the KL equal per-text unpadded HF forwards (left
    padding in the batch; EOS targets counted, padding not)."""
    torch.manual_seed(0)
    ae = AutoEncoder(32, 64)
    got = loss_recovered(TEXTS, model, MLP, ae)
    ce_clean, n_targets, logp_clean = hf_losses(hf, model.tokenizer, TEXTS)
    with torch.no_grad():
        ce_rec, _, logp_rec = hf_losses(hf, model.tokenizer, TEXTS, replace=ae)
    ce_zero, _, _ = hf_losses(hf, model.tokenizer, TEXTS, replace=torch.zeros_like)
    kl_rec = (logp_clean.exp() * (logp_clean - logp_rec)).sum(-1).mean().item()
    assert got["n_tokens"] == n_targets
    assert got["ce_clean"] == pytest.approx(ce_clean, rel=1e-5)
    assert got["ce_reconstructed"] == pytest.approx(ce_rec, rel=1e-5)
    assert got["ce_zero"] == pytest.approx(ce_zero, rel=1e-5)
    assert got["kl_reconstructed"] == pytest.approx(kl_rec, rel=1e-4)
    assert got["frac_recovered"] == pytest.approx((ce_zero - ce_rec) / (ce_zero - ce_clean), rel=1e-4)


def test_input_splice_and_tuple_output(hf, model):
    ce_zero_in, _, _ = hf_losses(hf, model.tokenizer, TEXTS, replace=torch.zeros_like, io="in")
    assert loss_recovered(TEXTS, model, MLP, IdentityDict(32), io="in")["ce_zero"] == pytest.approx(ce_zero_in, rel=1e-5)
    attention = "gpt_neox.layers.0.attention"  # returns (attn_output, attn_weights)
    ce_zero_attn, _, _ = hf_losses(hf, model.tokenizer, TEXTS, attention, replace=torch.zeros_like)
    got = loss_recovered(TEXTS, model, model.gpt_neox.layers[0].attention, IdentityDict(32))
    assert got["ce_zero"] == pytest.approx(ce_zero_attn, rel=1e-5)
    assert got["frac_recovered"] == pytest.approx(1.0, abs=1e-5)


def test_text_forms_and_max_len(model):
    by_text = loss_recovered(TEXTS[0], model, MLP, IdentityDict(32))
    ids = model.tokenizer(TEXTS[0], return_tensors="pt")["input_ids"]
    assert loss_recovered(ids[0], model, MLP, IdentityDict(32)) == by_text
    assert loss_recovered({"input_ids": ids}, model, MLP, IdentityDict(32)) == by_text
    short = loss_recovered(TEXTS, model, MLP, IdentityDict(32), max_len=8)
    assert short["n_tokens"] == 7 * len(TEXTS)  # every text is longer than 8 tokens


def test_normalize_batch_scales_real_tokens_to_sqrt_d(model):
    norms = []

    class Recorder(IdentityDict):
        def encode(self, x):
            norms.append(x.norm(dim=-1))
            return x

    texts = ["a dog", TEXTS[0]]  # very different lengths: most of row 0 is padding
    got = loss_recovered(texts, model, MLP, Recorder(32), normalize_batch=True)
    assert got["frac_recovered"] == pytest.approx(1.0, abs=1e-5)  # scaled back exactly
    mask = model.tokenizer(texts, return_tensors="pt", padding=True)["attention_mask"].bool()
    assert norms[0][mask].mean().item() == pytest.approx(math.sqrt(32), rel=1e-4)


def test_evaluate_keys_pooling_and_readme_names(model):
    buffer = ActivationBuffer(iter(documents(200, min_sentences=3)), model, MLP, n_ctxs=16, ctx_len=32,
                              refresh_batch_size=8, out_batch_size=64)
    torch.manual_seed(0)
    out = evaluate(AutoEncoder(32, 128), buffer, n_batches=2, max_len=16, batch_size=4)
    expected = {"mse", "l2_loss", "l1", "l0", "frac_alive", "frac_variance_explained", "cossim", "l2_ratio",
                "relative_reconstruction_bias", "ce_clean", "ce_reconstructed", "ce_zero", "ce_diff",
                "frac_recovered", "kl_reconstructed", "kl_zero", "n_tokens", "MSE", "L1", "L0", "% alive",
                "variance explained", "CE diff", "% CE recovered"}
    assert expected <= set(out)
    assert out["n_tokens"] == 2 * 4 * 15  # two batches of four texts, each cut to 16 tokens
    assert out["CE diff"] == pytest.approx(out["ce_reconstructed"] - out["ce_clean"])
    assert out["% CE recovered"] == pytest.approx(100 * out["frac_recovered"])
    assert out["% alive"] == pytest.approx(100 * out["frac_alive"])
    assert out["variance explained"] == pytest.approx(100 * out["frac_variance_explained"])
    assert out["MSE"] == out["mse"] and out["L0"] == out["l0"] and out["L1"] == out["l1"]

    ideal = evaluate(IdentityDict(32), buffer, n_batches=1, max_len=16, batch_size=4)
    assert ideal["% CE recovered"] == pytest.approx(100, abs=1e-3)
    assert ideal["variance explained"] == pytest.approx(100, abs=1e-3) and ideal["MSE"] == pytest.approx(0, abs=1e-9)


def test_evaluate_on_plain_tensors_and_errors(model):
    torch.manual_seed(0)
    batches = [torch.randn(32, 16) for _ in range(3)]
    out = evaluate(IdentityDict(16), iter(batches), n_batches=5)
    assert out["n_batches"] == 3 and "ce_clean" not in out and "% CE recovered" not in out
    assert out["variance explained"] == pytest.approx(100, abs=1e-3)
    buffer = ActivationBuffer(iter(documents(20)), model, MLP, n_ctxs=4, ctx_len=16,
                              refresh_batch_size=4, out_batch_size=16)
    with pytest.raises(ValueError, match="io='in' but the buffer collects 'out'"):
        evaluate(IdentityDict(32), buffer, io="in")
    with pytest.raises(ValueError, match="no next-token targets"):
        loss_recovered(["a"], model, MLP, IdentityDict(32))
    with pytest.raises(TypeError, match="text must be"):
        loss_recovered(3.5, model, MLP, IdentityDict(32))
    with pytest.raises(ValueError, match="n_batches"):
        evaluate(IdentityDict(16), iter(batches), n_batches=0)


def test_demo_end_to_end_smoke(tmp_path, capsys):
    """`python -m dictionary_learning.demo` on the bundled model with tiny sizes: writes the
    dictionary, its config and the metrics, and prints the README table row."""
    import json

    from dictionary_learning import demo

    metrics = demo.main(["--steps", "3", "--batch-size", "64", "--n-ctxs", "4", "--ctx-len", "32",
                         "--refresh-batch-size", "4", "--eval-batches", "1", "--eval-texts", "2",
                         "--warmup-steps", "1", "--dashboard-tokens", "300", "--out", str(tmp_path), "--no-progress"])
    printed = capsys.readouterr().out
    assert "| Layer | Variance Explained (%) | L1" in printed and "% CE Recovered" in printed
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["buffer"]["submodule"] == "gpt_neox.layers.0.mlp" and config["buffer"]["ctx_len"] == 32
    assert config["demo"]["steps"] == 3 and config["eval"]["% CE recovered"] == metrics["% CE recovered"]
    assert config["trainer"]["dict_size"] == 8 * config["buffer"]["d_submodule"]
    state = torch.load(tmp_path / "ae.pt", weights_only=True)
    assert state["encoder.weight"].shape == (config["trainer"]["dict_size"], config["buffer"]["d_submodule"])
    assert json.loads((tmp_path / "eval.json").read_text())["eval_text"] == "heldout split"
    assert "dashboard" in printed and (tmp_path / "dashboard" / "index.html").is_file()
    assert torch.load(tmp_path / "dashboard" / "features.pt", weights_only=True)["n_tokens"] == 300
