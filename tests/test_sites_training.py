"""Training and evaluating per site: trainers bound to the sites of one buffer, transcoders."""
import json
from collections import Counter

import pytest
import torch

from dictionary_learning import ActivationBuffer, trainSAE
from dictionary_learning.dictionary import JumpReluTranscoder, TopKTranscoder, Transcoder
from dictionary_learning.evaluation import evaluate, evaluate_sweep, format_table, fvu, loss_recovered

from lm_fixtures import documents, tiny_gpt_neox, wrap

MLP0, MLP1 = "gpt_neox.layers.0.mlp", "gpt_neox.layers.1.mlp"
DOWN0 = "gpt_neox.layers.0.mlp.dense_4h_to_h"  # a Linear: y = x Wᵀ + b


@pytest.fixture(scope="module")
def hf():
    model = tiny_gpt_neox(init_std=0.2)
    model.config._name_or_path = "tiny-neox"  # as from_pretrained records it
    return model


@pytest.fixture(scope="module")
def lm(hf):
    return wrap(hf)


def buffer_kwargs(**overrides):
    return {"n_ctxs": 16, "ctx_len": 16, "refresh_batch_size": 8, "out_batch_size": 32, "seed": 0, **overrides}


def standard(site=None, **extra):
    config = {"trainer": "StandardTrainer", "activation_dim": 32, "dict_size": 64, "lr": 1e-3,
              "sparsity_penalty": 1e-3, "warmup_steps": 2, "seed": 0, **extra}
    return {**config, "site": site} if site is not None else config


def test_one_pass_trains_every_site_and_recipe_and_folders_say_where(hf, lm, tmp_path):
    calls = Counter()
    hf.get_submodule(MLP1).register_forward_hook(lambda *_: calls.update(["deepest"]))
    texts = documents(60)
    buffer = ActivationBuffer(iter(texts), lm, submodules=[MLP0, MLP1], **buffer_kwargs())
    configs = [standard(MLP0), standard(MLP1),
               {"trainer": "TopKTrainer", "activation_dim": 32, "dict_size": 64, "k": 4, "warmup_steps": 2,
                "threshold_start_step": 2, "seed": 0, "site": MLP1}]
    trained = trainSAE(buffer, trainer_configs=configs, steps=8, save_dir=tmp_path, progress=False)
    passes = calls["deepest"]
    calls.clear()
    single = ActivationBuffer(iter(texts), lm, MLP1, **buffer_kwargs())
    trainSAE(single, trainer_configs=[standard()], steps=8, progress=False)
    assert passes == calls["deepest"]  # three trainers at two sites cost what one trainer at one site costs
    for index, site in enumerate([MLP0, MLP1, MLP1]):
        config = json.loads((tmp_path / f"trainer_{index}" / "config.json").read_text())
        assert config["trainer"]["site"] == site and config["trainer"]["layer"] == int(site.split(".")[2])
        assert config["trainer"]["submodule_name"] == site and config["buffer"]["submodule"] == site
        assert config["trainer"]["lm_name"] == config["buffer"]["model"] == hf.config._name_or_path
    assert len(trained) == 3


def test_a_site_trains_as_a_single_site_buffer_of_it_would(lm):
    """Same tokens, same shuffle: bound to MLP1 in a two-site buffer, a trainer ends bit-identical
    to the same trainer on a buffer of MLP1 alone."""
    texts = documents(40)
    multi = ActivationBuffer(iter(texts), lm, submodules=[MLP0, MLP1], **buffer_kwargs())
    (from_multi,) = trainSAE(multi, trainer_configs=[standard(MLP1)], steps=6, progress=False,
                             normalize_activations=True)
    single = ActivationBuffer(iter(texts), lm, MLP1, **buffer_kwargs())
    (from_single,) = trainSAE(single, trainer_configs=[standard()], steps=6, progress=False,
                              normalize_activations=True)
    for key, value in from_single.state_dict().items():
        assert torch.equal(value, from_multi.state_dict()[key]), key


def test_sites_that_are_not_collected_get_clear_errors(lm):
    buffer = ActivationBuffer(iter(documents(10)), lm, submodules=[MLP0, MLP1], **buffer_kwargs())
    with pytest.raises(ValueError, match=r"reads site 'gpt_neox.layers.5.mlp', which the buffer does not collect"):
        trainSAE(buffer, trainer_configs=[standard("gpt_neox.layers.5.mlp")], steps=2, progress=False)
    with pytest.raises(ValueError, match=r"has no site, but the data yields the sites"):
        trainSAE(buffer, trainer_configs=[standard()], steps=2, progress=False)
    tensors = [torch.randn(8, 32)] * 2
    with pytest.raises(ValueError, match="yields one stream of tensors, not sites"):
        trainSAE(tensors, trainer_configs=[standard(MLP0)], steps=2, progress=False)
    with pytest.raises(TypeError, match="trains on \\(input, output\\) pairs"):
        trainSAE(tensors, trainer_configs=[{"trainer": "TranscoderTrainer", "activation_dim": 32, "dict_size": 16,
                                            "warmup_steps": 1}], steps=2, progress=False)


def sparse_map(n_batches, batch=256, d_in=16, d_out=12, n_features=24, seed=0):
    """(x, y) pairs where a sparse set of features writes to the input and, through other
    directions, to the output: the structure a transcoder recovers."""
    g = torch.Generator().manual_seed(seed)
    into = torch.nn.functional.normalize(torch.randn(n_features, d_in, generator=g), dim=-1)
    out_of = torch.nn.functional.normalize(torch.randn(n_features, d_out, generator=g), dim=-1)
    pairs = []
    for _ in range(n_batches):
        codes = torch.rand(batch, n_features, generator=g) * (torch.rand(batch, n_features, generator=g) < 0.08)
        pairs.append((codes @ into, codes @ out_of))
    return pairs


@pytest.mark.parametrize("recipe", ["TranscoderTrainer", "TopKTranscoderTrainer", "JumpReluTranscoderTrainer"])
def test_transcoders_learn_a_sparse_map_from_inputs_to_outputs(recipe):
    pairs = sparse_map(400)
    config = {"trainer": recipe, "activation_dim": 16, "output_dim": 12, "dict_size": 48, "warmup_steps": 20,
              "seed": 0}
    config.update({"TopKTranscoderTrainer": {"k": 4, "lr": 1e-2},
                   "TranscoderTrainer": {"sparsity_penalty": 0.1, "lr": 3e-3},
                   "JumpReluTranscoderTrainer": {"sparsity_penalty": 1e-2, "lr": 3e-3, "sparsity_warmup_steps": 50,
                                                 "bandwidth": 0.01, "initial_threshold": 0.01}}[recipe])
    (transcoder,) = trainSAE(pairs[:350], trainer_configs=[config], progress=False)
    x, y = (torch.cat(part) for part in zip(*pairs[350:]))
    with torch.no_grad():
        y_hat, f = transcoder(x, output_features=True)
    assert y_hat.shape == y.shape and f.shape == (len(x), 48)
    assert fvu(y, y_hat) < (0.15 if recipe == "TopKTranscoderTrainer" else 0.25)  # a penalty trades fit away
    metrics = evaluate(transcoder, iter(pairs[350:]), n_batches=50)
    assert abs((1 - metrics["frac_variance_explained"]) - fvu(y, y_hat)) < 1e-4  # scored against y, not x
    if recipe == "TopKTranscoderTrainer":
        assert isinstance(transcoder, TopKTranscoder)
        assert bool(((f > 0).sum(-1) <= 4).all()) and float((f > 0).sum(-1).float().mean()) > 3
    elif recipe == "TranscoderTrainer":
        assert type(transcoder) is Transcoder and float((f > 0).sum(-1).float().mean()) < 10
    else:  # the L0 penalty: few latents above their thresholds, and the thresholds were trained
        assert isinstance(transcoder, JumpReluTranscoder) and float((f > 0).sum(-1).float().mean()) < 10
        assert float(transcoder.threshold.min()) >= 0 and float(transcoder.threshold.std()) > 0


def test_the_skip_connection_learns_the_linear_part():
    """y = A x + (sparse part): with k = 4 latents a transcoder cannot also carry the dense linear
    part; its skip connection can, and the fit is far better."""
    g = torch.Generator().manual_seed(1)
    linear = torch.randn(12, 16, generator=g) / 4
    pairs = [(x, y + x @ linear.T) for x, y in sparse_map(300, seed=1)]
    results = {}
    for skip in (False, True):
        config = {"trainer": "TopKTranscoderTrainer", "activation_dim": 16, "output_dim": 12, "dict_size": 48,
                  "k": 4, "warmup_steps": 20, "seed": 0, "lr": 1e-2, "skip": skip}
        (transcoder,) = trainSAE(pairs[:260], trainer_configs=[config], progress=False)
        x, y = (torch.cat(part) for part in zip(*pairs[260:]))
        with torch.no_grad():
            results[skip] = fvu(y, transcoder(x))
        assert (transcoder.W_skip is not None) == skip
    assert results[True] < 0.5 * results[False], results


def test_in_to_out_training_and_spliced_loss_of_a_transcoder(hf, lm, tmp_path):
    """A transcoder trained on an MLP's (input, output) pairs from the buffer; the loss with it
    spliced in; an exact transcoder of a linear module recovers all of the loss."""
    buffer = ActivationBuffer(iter(documents(80)), lm, submodules=[MLP0, DOWN0], io="in_to_out", **buffer_kwargs())
    configs = [{"trainer": "TopKTranscoderTrainer", "activation_dim": 32, "dict_size": 64, "k": 8, "warmup_steps": 2,
                "seed": 0, "site": MLP0, "lr": 3e-3}]
    trainSAE(buffer, trainer_configs=configs, steps=20, save_dir=tmp_path / "sweep", progress=False)
    rows = evaluate_sweep(tmp_path / "sweep", buffer, n_batches=2)
    assert [(row["site"], row["trainer"]) for row in rows] == [(MLP0, "TopKTranscoderTrainer")]
    assert 0 <= rows[0]["fvu"] and 0 <= rows[0]["dead_pct"] <= 100 and "ce_recovered" in rows[0]
    assert "| site |" in format_table(rows).replace("| folder | site |", "| site |")

    down = hf.get_submodule(DOWN0)
    exact = Transcoder(down.in_features, 4, output_dim=down.out_features, skip=True)
    with torch.no_grad():
        exact.W_skip.copy_(down.weight)
        exact.b_dec.copy_(down.bias)
        exact.W_dec.zero_()
    texts = documents(6, seed=5)
    result = loss_recovered(texts, lm, DOWN0, exact, io="in_to_out")
    assert abs(result["ce_reconstructed"] - result["ce_clean"]) < 1e-4 and result["kl_reconstructed"] < 1e-6
    assert abs(result["ce_zero"] - result["ce_clean"]) > 1e-3  # the splice site matters to the loss
    fresh = ActivationBuffer(iter(documents(80, seed=7)), lm, submodules=[MLP0, DOWN0], io="in_to_out",
                             **buffer_kwargs())
    metrics = evaluate(exact, fresh, n_batches=1, site=DOWN0)
    assert metrics["frac_variance_explained"] > 1 - 1e-5 and abs(metrics["frac_recovered"] - 1) < 1e-3
    with pytest.raises(ValueError, match="pass site="):
        evaluate(exact, fresh, n_batches=1)
