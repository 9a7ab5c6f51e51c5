"""Compatibility with the libraries users come from, checked against their documented behaviour:

- saprmarks/dictionary_learning (the reference): the calls of its README and of its tests
  (tests/unit/test_dictionary.py, tests/test_end_to_end.py, tests/test_pytorch_end_to_end.py),
  written here against what the reference computes;
- SAEBench: the attributes it reads off an SAE object, on every architecture of the registry.
"""
import json

import pytest
import torch
import torch as t
from lm_fixtures import documents, tiny_gpt_neox, tiny_language_model, tiny_tokenizer

from dictionary_learning import ActivationBuffer, load_bundled_model, stdlib_text_stream, utils
from dictionary_learning.dictionary import (
    AutoEncoder,
    AutoEncoderNew,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
)
from dictionary_learning.evaluation import evaluate
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.trainers.top_k import AutoEncoderTopK, TopKTrainer
from dictionary_learning.training import build_trainer, trainSAE
from dictionary_learning.utils import get_nested_folders, load_dictionary

# =============================================================================================
# The reference's tests/unit/test_dictionary.py, call for call
# =============================================================================================


@pytest.mark.parametrize("sae_cls", [AutoEncoder, GatedAutoEncoder, JumpReluAutoEncoder])
def test_reference_forward_equals_decode_encode(sae_cls):
    x = t.randn(4, 8, generator=t.Generator().manual_seed(0))
    sae = sae_cls(activation_dim=8, dict_size=6)
    assert t.allclose(sae(x), sae.decode(sae.encode(x)))
    forward_out, features = sae(x, output_features=True)
    assert t.allclose(features, sae.encode(x))


def test_reference_simple_autoencoder_set_through_data():
    sae = AutoEncoder(activation_dim=2, dict_size=2)
    with t.no_grad():
        sae.encoder.weight.data = t.tensor([[1.0, 0.0], [0.0, 1.0]])
        sae.decoder.weight.data = t.tensor([[1.0, 0.0], [0.0, 1.0]])
        sae.encoder.bias.data = t.zeros(2)
        sae.bias.data = t.zeros(2)
    x = t.tensor([[2.0, -1.0]])
    encoded = sae.encode(x)
    assert t.allclose(encoded, t.tensor([[2.0, 0.0]]))
    assert t.allclose(sae.decode(encoded), t.tensor([[2.0, 0.0]]))


def test_reference_simple_gated_autoencoder():
    sae = GatedAutoEncoder(activation_dim=2, dict_size=2)
    with t.no_grad():
        sae.encoder.weight.data = t.tensor([[1.0, 0.0], [0.0, 1.0]])
        sae.decoder.weight.data = t.tensor([[1.0, 0.0], [0.0, 1.0]])
        sae.gate_bias.data = t.zeros(2)
        sae.mag_bias.data = t.zeros(2)
        sae.r_mag.data = t.zeros(2)
        sae.decoder_bias.data = t.zeros(2)
    assert t.allclose(sae.encode(t.tensor([[2.0, -1.0]])), t.tensor([[2.0, 0.0]]))


def test_reference_normalize_decoder_and_scale_biases(tmp_path):
    sae = AutoEncoder(activation_dim=4, dict_size=3)
    with t.no_grad():  # free decoder norms, as the April update trains them
        sae.decoder.weight.data *= t.tensor([0.5, 2.0, 3.0])
    x = t.randn(2, 4, generator=t.Generator().manual_seed(1))
    initial_output = sae(x)
    t.save(sae.state_dict(), tmp_path / "ae.pt")
    sae.normalize_decoder()
    norms = t.norm(sae.decoder.weight, dim=0)
    assert t.allclose(norms, t.ones_like(norms))
    assert t.allclose(initial_output, sae(x), atol=1e-4)
    loaded = AutoEncoder.from_pretrained(tmp_path / "ae.pt", dtype=t.float, device=None, normalize_decoder=True)
    assert t.equal(loaded.decoder.weight, sae.decoder.weight)

    initial_encoder_bias, initial_bias = sae.encoder.bias.data.clone(), sae.bias.data.clone()
    sae.scale_biases(2.0)
    assert t.allclose(sae.encoder.bias.data, initial_encoder_bias * 2.0)
    assert t.allclose(sae.bias.data, initial_bias * 2.0)


@pytest.mark.parametrize("sae_cls", [AutoEncoder, GatedAutoEncoder, AutoEncoderNew, JumpReluAutoEncoder])
def test_reference_output_shapes(sae_cls):
    x = t.randn(3, 4)
    sae = sae_cls(activation_dim=4, dict_size=5)
    encoded = sae.encode(x)
    assert encoded.shape == (3, 5) and sae.decode(encoded).shape == (3, 4) and sae(x).shape == (3, 4)
    output, features = sae(x, output_features=True)
    assert output.shape == (3, 4) and features.shape == (3, 5)


# =============================================================================================
# The reference's attribute names: views of the same parameters
# =============================================================================================


def test_reference_names_are_views_of_our_parameters():
    sae = AutoEncoder(6, 10)
    assert sae.encoder.weight.shape == (10, 6) and sae.decoder.weight.shape == (6, 10)
    assert sae.encoder.weight.data_ptr() == sae.W_enc.data_ptr() and sae.bias is sae.b_dec
    assert sae.encoder.bias is sae.b_enc and sae.decoder.bias is None
    assert (sae.encoder.in_features, sae.encoder.out_features) == (6, 10)
    assert sorted(sae.state_dict()) == ["bias", "decoder.weight", "encoder.bias", "encoder.weight"]
    assert len(list(sae.parameters())) == 4  # nothing stored twice

    x = t.randn(5, 6)
    assert t.allclose(sae.encoder(x - sae.bias).relu(), sae.encode(x), atol=1e-6)  # the reference's encode
    sae.encoder.weight.sum().backward()  # gradients flow through the view into W_enc
    assert t.equal(sae.W_enc.grad, t.ones(6, 10))

    new = t.randn(10, 6)
    sae.encoder.weight = new  # nn.Linear-style assignment copies in
    assert t.equal(sae.W_enc, new.T)
    with t.no_grad():
        sae.decoder.weight.data /= 2  # the reference's normalize_decoder writes this way
    assert t.equal(sae.decoder.weight, sae.W_dec.T)
    sae.bias = t.full((6,), 3.0)
    assert t.equal(sae.b_dec, t.full((6,), 3.0)) and isinstance(sae.b_dec, t.nn.Parameter)
    with pytest.raises(ValueError, match=r"encoder.weight must have shape \(10, 6\)"):
        sae.encoder.weight.data = t.zeros(6, 10)
    with pytest.raises(AttributeError, match="set encoder.weight or encoder.bias"):
        sae.encoder = t.nn.Linear(6, 10)

    topk = AutoEncoderTopK(6, 10, k=2)
    assert topk.encoder.weight.data_ptr() == topk.W_enc.data_ptr() and topk.encoder.bias is topk.b_enc
    gated = GatedAutoEncoder(6, 10)
    assert gated.encoder.bias is None and gated.gate_bias is gated.b_gate and gated.mag_bias is gated.b_mag
    assert gated.decoder_bias is gated.b_dec


# =============================================================================================
# AutoEncoderNew: the reference's equations and folders
# =============================================================================================


def reference_autoencoder_new_state(D=6, F_=9, seed=0):
    g = t.Generator().manual_seed(seed)
    return {"encoder.weight": t.randn(F_, D, generator=g), "encoder.bias": t.randn(F_, generator=g),
            "decoder.weight": t.randn(D, F_, generator=g), "decoder.bias": t.randn(D, generator=g)}


def test_autoencoder_new_is_the_reference_architecture(tmp_path):
    state = reference_autoencoder_new_state()
    x = t.randn(7, 6, generator=t.Generator().manual_seed(1))
    f = t.relu(x @ state["encoder.weight"].T + state["encoder.bias"])  # the reference: ReLU(encoder(x))
    x_hat = f @ state["decoder.weight"].T + state["decoder.bias"]  # decoder(f), with its bias
    for name in ("AutoEncoderNew", None):  # named by the folder's config, or recognised by its keys
        folder = tmp_path / str(name)
        folder.mkdir()
        t.save(state, folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": name} if name else {}}))
        ae, _ = load_dictionary(folder, "cpu")
        assert type(ae) is AutoEncoderNew
        assert t.allclose(ae.encode(x), f, atol=1e-5) and t.allclose(ae(x), x_hat, atol=1e-5)
        # the reference's forward returns the features times the decoder column norms
        assert t.allclose(ae(x, output_features=True)[1], f * state["decoder.weight"].norm(dim=0), atol=1e-5)
        assert t.equal(ae.decoder.bias, state["decoder.bias"]) and t.equal(ae.encoder.weight, state["encoder.weight"])
    fresh = AutoEncoderNew(6, 9)  # the reference's initialisation: directions of norm 0.1, tied
    assert t.allclose(fresh.decoder.weight.norm(dim=0), t.full((9,), 0.1))
    assert t.equal(fresh.encoder.weight, fresh.decoder.weight.T) and not fresh.decoder.bias.any()


# =============================================================================================
# Trainers: the reference's keyword arguments
# =============================================================================================

# Every keyword each reference trainer takes (its __init__), with its default where it has one; but
# p_end, whose default 0 we refuse (at p = 0 the penalty Σ f_i^0 has no gradient).
REFERENCE_TRAINER_KWARGS = {
    "StandardTrainer": dict(dict_class=AutoEncoder, lr=1e-3, l1_penalty=1e-1, warmup_steps=1000,
                            sparsity_warmup_steps=2000, decay_start=None, resample_steps=None),
    "StandardTrainerAprilUpdate": dict(dict_class=AutoEncoder, lr=1e-3, l1_penalty=1e-1, warmup_steps=1000,
                                       sparsity_warmup_steps=2000, decay_start=None),
    "TopKTrainer": dict(k=8, dict_class=AutoEncoderTopK, lr=None, auxk_alpha=1 / 32, warmup_steps=1000,
                        decay_start=None, threshold_beta=0.999, threshold_start_step=1000, k_anneal_steps=None),
    "BatchTopKTrainer": dict(k=8, dict_class="BatchTopKSAE", lr=None, auxk_alpha=1 / 32, warmup_steps=1000,
                             decay_start=None, threshold_beta=0.999, threshold_start_step=1000, k_anneal_steps=None),
    "MatryoshkaBatchTopKTrainer": dict(k=8, group_fractions=[0.25, 0.75], group_weights=None,
                                       dict_class="MatryoshkaBatchTopKSAE", lr=None, auxk_alpha=1 / 32,
                                       warmup_steps=1000, decay_start=None, threshold_beta=0.999,
                                       threshold_start_step=1000, k_anneal_steps=None),
    "GatedSAETrainer": dict(dict_class=GatedAutoEncoder, lr=5e-5, l1_penalty=1e-1, warmup_steps=1000,
                            sparsity_warmup_steps=2000, decay_start=None),
    "GatedAnnealTrainer": dict(dict_class=GatedAutoEncoder, lr=3e-4, warmup_steps=1000, sparsity_warmup_steps=2000,
                               decay_start=None, sparsity_function="Lp^p", initial_sparsity_penalty=1e-1,
                               anneal_start=15000, anneal_end=None, p_start=1, p_end=0.2, n_sparsity_updates=10,
                               sparsity_queue_length=10, resample_steps=None),
    "PAnnealTrainer": dict(dict_class=AutoEncoder, lr=1e-3, warmup_steps=1000, decay_start=None,
                           sparsity_warmup_steps=2000, sparsity_function="Lp", initial_sparsity_penalty=1e-1,
                           anneal_start=15000, anneal_end=None, p_start=1, p_end=0.2, n_sparsity_updates=10,
                           sparsity_queue_length=10, resample_steps=None),
    "JumpReluTrainer": dict(dict_class=JumpReluAutoEncoder, lr=7e-5, bandwidth=0.001, sparsity_penalty=1.0,
                            warmup_steps=1000, sparsity_warmup_steps=2000, decay_start=None, target_l0=20.0),
}


@pytest.mark.parametrize("name", list(REFERENCE_TRAINER_KWARGS))
def test_trainers_take_every_reference_keyword(name):
    config = {"trainer": name, "steps": 30_000, "activation_dim": 16, "dict_size": 64, "layer": 3,
              "lm_name": "EleutherAI/pythia-70m-deduped", "seed": 0, "device": "cpu",
              "wandb_name": f"{name}-run", "submodule_name": "resid_post_layer_3", **REFERENCE_TRAINER_KWARGS[name]}
    trainer = build_trainer(config)
    assert trainer.cfg.name == f"{name}-run" and trainer.cfg.layer == 3  # wandb_name is our `name`
    assert trainer.config["lm_name"] == "EleutherAI/pythia-70m-deduped"


def test_dict_class_must_be_what_the_recipe_trains():
    with pytest.raises(ValueError, match="dict_class 'GatedAutoEncoder' does not match TopKTrainer"):
        build_trainer({"trainer": TopKTrainer, "dict_class": GatedAutoEncoder, "activation_dim": 8, "dict_size": 16,
                       "k": 2})


def test_k_annealing_follows_the_reference_schedule():
    D, K, steps, k = 16, 10, 14, 4
    trainer = build_trainer({"trainer": "TopKTrainer", "activation_dim": D, "dict_size": 64, "k": k,
                             "k_anneal_steps": K, "steps": steps, "warmup_steps": 0, "threshold_start_step": 5,
                             "seed": 0})
    batches = torch.randn(steps, 32, D, generator=torch.Generator().manual_seed(0))
    for step, x in enumerate(batches):
        trainer.update(step, x)
        ratio = min(step, K) / K
        assert int(trainer.ae.k) == int(D * (1 - ratio) + k * ratio)
    assert int(trainer.ae.k) == k
    with pytest.raises(ValueError, match="k_anneal_steps must be in"):
        build_trainer({"trainer": "TopKTrainer", "activation_dim": D, "dict_size": 64, "k": k, "k_anneal_steps": 20,
                       "steps": 20, "warmup_steps": 0, "threshold_start_step": 5})


# =============================================================================================
# evaluate: the reference's argument order and keys
# =============================================================================================

MLP = "gpt_neox.layers.0.mlp"


@pytest.mark.filterwarnings("ignore:frac_alive was measured")
def test_evaluate_takes_the_reference_order_and_returns_its_keys():
    model = tiny_language_model()
    buffer = ActivationBuffer(iter(documents(200, min_sentences=3)), model, MLP, n_ctxs=16, ctx_len=32,
                              refresh_batch_size=8, out_batch_size=64)
    ae = AutoEncoder(32, 128)
    # the reference's tests/test_end_to_end.py: (dictionary, buffer, context_length, llm_batch_size, io=, device=, n_batches=)
    out = evaluate(ae, buffer, 16, 4, io="out", device="cpu", n_batches=2)
    assert out["n_batches"] == 2 and out["n_tokens"] == 2 * 4 * 15  # max_len 16, 4 texts per batch
    reference_keys = {"l2_loss", "l1_loss", "l0", "frac_variance_explained", "cossim", "l2_ratio",
                      "relative_reconstruction_bias", "loss_original", "loss_reconstructed", "loss_zero",
                      "frac_recovered", "frac_alive"}
    assert reference_keys <= set(out)
    assert (out["l1_loss"], out["loss_original"], out["loss_reconstructed"], out["loss_zero"]) == \
           (out["l1"], out["ce_clean"], out["ce_reconstructed"], out["ce_zero"])
    assert out["frac_recovered"] == pytest.approx(
        (out["loss_reconstructed"] - out["loss_zero"]) / (out["loss_original"] - out["loss_zero"]))
    # every argument positionally, tracer_args as the reference passes them
    batches = [torch.randn(64, 32, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    out = evaluate(ae, iter(batches), 128, 128, None, False, {"use_cache": False}, "cpu", 3)
    assert out["n_batches"] == 3
    f = torch.cat([ae.encode(x) for x in batches[:3]]).detach()
    assert out["l1_loss"] == pytest.approx(f.abs().sum(-1).mean().item(), rel=1e-5)
    traced = evaluate(ae, buffer, 16, 4, tracer_args={"use_cache": False, "output_attentions": False})
    assert traced["loss_original"] > 0


# =============================================================================================
# The reference's README and end-to-end tests, on the bundled model
# =============================================================================================


@pytest.mark.filterwarnings("ignore:TopKTrainer. threshold_start_step")
def test_reference_readme_training_and_loading(tmp_path):
    model = load_bundled_model()
    layer = 1
    submodule = model.gpt_neox.layers[1].mlp  # layer 1 MLP
    activation_dim = 128
    buffer = ActivationBuffer(data=stdlib_text_stream(), model=model, submodule=submodule,
                              d_submodule=activation_dim, n_ctxs=int(64), device="cpu", refresh_batch_size=16,
                              out_batch_size=128)
    trainer_cfg = {"trainer": TopKTrainer, "dict_class": AutoEncoderTopK, "activation_dim": activation_dim,
                   "dict_size": 4 * activation_dim, "lr": 1e-3, "device": "cpu", "steps": 20, "layer": layer,
                   "lm_name": "tiny-pythia", "warmup_steps": 1, "k": 16}
    standard_cfg = {"trainer": StandardTrainer, "dict_class": AutoEncoder, "activation_dim": activation_dim,
                    "dict_size": 4 * activation_dim, "lr": 3e-4, "l1_penalty": 2.0, "warmup_steps": 1,
                    "sparsity_warmup_steps": None, "decay_start": None, "steps": 20, "resample_steps": None,
                    "seed": 42, "wandb_name": "StandardTrainer-tiny", "layer": layer, "lm_name": "tiny-pythia",
                    "device": "cpu", "submodule_name": "mlp_out_layer_1"}
    trainSAE(data=buffer, trainer_configs=[trainer_cfg, standard_cfg], steps=20, save_steps=None,
             save_dir=str(tmp_path))
    folders = get_nested_folders(tmp_path)
    assert len(folders) == 2
    for folder in folders:
        ae, config = utils.load_dictionary(folder, device="cpu")  # the README's `utils.load_dictionary`
        assert config["trainer"]["dict_class"] in ("AutoEncoderTopK", "AutoEncoder")
        assert config["buffer"]["ctx_len"] == 128 and config["trainer"]["activation_dim"] == 128
        activations = torch.randn(64, activation_dim)
        features = ae.encode(activations)
        assert t.allclose(ae.decode(features), ae(activations), atol=1e-5)
        reconstructed, features_too = ae(activations, output_features=True)
        assert t.allclose(features_too, features)
    assert json.loads((tmp_path / "trainer_1" / "config.json").read_text())["trainer"]["name"] == "StandardTrainer-tiny"


def test_reference_pytorch_buffer_import_path():
    from dictionary_learning.pytorch_buffer import ActivationBuffer as PytorchBuffer

    hf = tiny_gpt_neox()
    buffer = PytorchBuffer(iter(documents(60)), hf, hf.gpt_neox.layers[1], d_submodule=32, io="out", n_ctxs=8,
                           ctx_len=16, refresh_batch_size=4, out_batch_size=32, device="cpu",
                           tokenizer=tiny_tokenizer())
    assert next(buffer).shape == (32, 32) and buffer.config["submodule"] == "gpt_neox.layers.1"


# =============================================================================================
# SAEBench: what it reads off an SAE object, on every architecture of the registry
# =============================================================================================

# the fields of SAEBench's CustomSAEConfig (sae_bench/custom_saes/custom_sae_config.py)
SAEBENCH_CFG_FIELDS = ("model_name", "d_in", "d_sae", "hook_layer", "hook_name", "context_size", "hook_head_index",
                       "architecture", "apply_b_dec_to_input", "finetuning_scaling_factor", "activation_fn_str",
                       "activation_fn_kwargs", "prepend_bos", "normalize_activations", "dtype", "device",
                       "model_from_pretrained_kwargs", "dataset_path", "dataset_trust_remote_code", "seqpos_slice",
                       "training_tokens", "sae_lens_training_version", "neuronpedia_id")
D, F_, D_OUT = 8, 32, 6


def any_dictionary(entry, seed=0):
    """An instance of the entry's class with random weights (a transcoder reads D and writes D_OUT)."""
    import inspect

    parameters = inspect.signature(entry.dictionary).parameters
    extra = {"k": 3, "group_sizes": [8, 24], "output_dim": D_OUT}
    generator = torch.Generator().manual_seed(seed)
    ae = entry.dictionary(D, F_, **{name: extra[name] for name in extra if name in parameters}, generator=generator)
    with torch.no_grad():
        for name, tensor in ae.named_parameters():
            tensor.add_(torch.rand(tensor.shape, generator=generator) * 0.1 if name == "threshold" else
                        torch.randn(tensor.shape, generator=generator) * 0.1)
    return ae


def _registry():
    from dictionary_learning.registry import ARCHITECTURES

    return ARCHITECTURES


@pytest.mark.parametrize("entry", _registry(), ids=lambda entry: entry.name)
def test_saebench_attribute_contract(entry):
    ae = any_dictionary(entry)
    d_out = getattr(ae, "output_dim", D) if "Transcoder" in entry.name else D
    parameters = {id(p) for p in ae.parameters()}
    assert ae.W_enc.shape == (D, F_) and ae.W_dec.shape == (F_, d_out) and ae.b_dec.shape == (d_out,)
    assert {id(ae.W_enc), id(ae.W_dec), id(ae.b_dec)} <= parameters  # the parameters themselves, not copies
    if entry.name == "GatedAutoEncoder":  # as SAELens' and SAEBench's gated SAEs: b_gate and b_mag, no b_enc
        assert ae.b_mag.shape == ae.b_gate.shape == (F_,) and ae.cfg.architecture == "gated"
    else:
        assert ae.b_enc.shape == (F_,) and id(ae.b_enc) in parameters
    cfg = ae.cfg
    assert all(hasattr(cfg, name) for name in SAEBENCH_CFG_FIELDS)
    assert set(SAEBENCH_CFG_FIELDS) <= set(cfg.to_dict())
    assert (cfg.d_in, cfg.d_sae) == (D, F_) and cfg.architecture == (entry.saelens_name(ae) or entry.name)
    assert cfg.d_out == (d_out if "Transcoder" in entry.name else None)
    assert (ae.device, ae.dtype, cfg.dtype, cfg.device) == (torch.device("cpu"), torch.float32, "float32", "cpu")

    x = torch.randn(2, 5, D, generator=torch.Generator().manual_seed(3))  # [batch, seq, d]: what SAEBench passes
    f = ae.encode(x)
    assert f.shape == (2, 5, F_)
    skip = ae.skip_term(x) if hasattr(ae, "skip_term") else 0.0
    assert torch.allclose(ae(x), ae.decode(f) + skip, atol=1e-6)  # SAEBench's test_sae

    weight = ae.W_dec
    ae.to(dtype=torch.float64)
    assert ae.dtype == torch.float64 and cfg.dtype == "float64" and ae.W_dec is weight  # moved in place
    assert ae.encode(x.double()).dtype == torch.float64
    cfg.architecture_str = cfg.architecture  # what SAEBench's _standardize_sae_cfg adds
    cfg.metadata = {"hook_layer": cfg.hook_layer}
    assert cfg.to_dict()["d_sae"] == F_


@pytest.mark.parametrize("entry", _registry(), ids=lambda entry: entry.name)
def test_load_dictionary_fills_cfg_from_the_run_folder(tmp_path, entry):
    ae = any_dictionary(entry)
    transcoder = "Transcoder" in entry.name
    torch.save(ae.state_dict(), tmp_path / "ae.pt")
    config = {"trainer": {"dict_class": entry.name, "lm_name": "EleutherAI/pythia-70m-deduped", "layer": 1},
              "buffer": {"model": "EleutherAI/pythia-70m-deduped", "submodule": "gpt_neox.layers.1.mlp",
                         "io": "in_to_out" if transcoder else "out", "ctx_len": 128, "out_batch_size": 4096},
              "training": {"steps": 1000}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_dictionary(tmp_path, dtype=torch.bfloat16)
    cfg = loaded.cfg
    assert (cfg.model_name, cfg.hook_layer, cfg.context_size) == ("EleutherAI/pythia-70m-deduped", 1, 128)
    assert cfg.training_tokens == 4096 * 1000 and cfg.dtype == "bfloat16" and loaded.dtype == torch.bfloat16
    if transcoder:  # reads the MLP's input (no TransformerLens hook reads it as it is), writes its output
        assert (cfg.hook_name, cfg.hook_name_out) == ("gpt_neox.layers.1.mlp", "blocks.1.hook_mlp_out")
    else:
        assert cfg.hook_name == "blocks.1.hook_mlp_out" and cfg.hook_name_out is None


def test_transformer_lens_hook_names():
    from dictionary_learning.saebench import transformer_lens_hook

    assert transformer_lens_hook("gpt_neox.layers.3") == ("blocks.3.hook_resid_post", 3)
    assert transformer_lens_hook("gpt_neox.layers.3", "in") == ("blocks.3.hook_resid_pre", 3)
    assert transformer_lens_hook("transformer.h.11") == ("blocks.11.hook_resid_post", 11)
    assert transformer_lens_hook("model.layers.20") == ("blocks.20.hook_resid_post", 20)
    assert transformer_lens_hook("gpt_neox.layers.0.mlp") == ("blocks.0.hook_mlp_out", 0)
    assert transformer_lens_hook("transformer.h.2.mlp") == ("blocks.2.hook_mlp_out", 2)
    assert transformer_lens_hook("gpt_neox.layers.4.attention") == ("blocks.4.hook_attn_out", 4)
    assert transformer_lens_hook("transformer.h.4.attn") == ("blocks.4.hook_attn_out", 4)
    assert transformer_lens_hook("gpt_neox.embed_in") == ("hook_embed", 0)
    for unmapped, io in [("gpt_neox.layers.1.mlp", "in"), ("model.layers.3.mlp", "out"),
                         ("model.layers.3.self_attn", "out"), ("gpt_neox.layers.1.mlp.dense_4h_to_h", "out")]:
        assert transformer_lens_hook(unmapped, io) is None


@pytest.mark.filterwarnings("ignore:TopKTrainer. threshold_start_step")
def test_folders_trained_from_a_buffer_are_what_saebench_loaders_read(tmp_path):
    model = load_bundled_model()
    buffer = ActivationBuffer(stdlib_text_stream(), model, "gpt_neox.layers.2", n_ctxs=32, ctx_len=64,
                              refresh_batch_size=16, out_batch_size=128)
    (ae,) = trainSAE(buffer, trainer_configs=[{"trainer": "TopKTrainer", "activation_dim": 128, "dict_size": 512,
                                               "k": 8, "warmup_steps": 1}], steps=3, save_dir=tmp_path)
    trainer = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["trainer"]
    # SAEBench's dictionary_learning loaders read these four (and assert model_name in lm_name)
    assert trainer["trainer_class"] == "TopKTrainer" and trainer["layer"] == 2 and trainer["k"] == 8
    assert trainer["lm_name"] and trainer["lm_name"] == model._module.config._name_or_path
    for dictionary in (ae, load_dictionary(tmp_path / "trainer_0")[0]):  # returned, and loaded
        cfg = dictionary.cfg
        assert (cfg.hook_name, cfg.hook_layer, cfg.context_size) == ("blocks.2.hook_resid_post", 2, 64)
        assert cfg.model_name == trainer["lm_name"] and cfg.training_tokens == 3 * 128


def test_train_sae_takes_the_reference_run_arguments(tmp_path, capsys):
    batches = [torch.randn(64, 16, generator=torch.Generator().manual_seed(i)) for i in range(6)]
    config = {"trainer": "TopKTrainer", "activation_dim": 16, "dict_size": 64, "k": 4, "warmup_steps": 0,
              "threshold_start_step": 1, "seed": 0}
    arguments = dict(trainer_configs=[config], steps=6, log_steps=2, verbose=True, backup_steps=2, run_cfg={"run": 1},
                     wandb_entity="team", activations_split_by_head=False, transcoder=False, progress=False)

    def interrupted():  # the run dies after 5 batches: its last backup is the state after 4 steps
        yield from batches[:5]
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        trainSAE(interrupted(), save_dir=tmp_path / "run", **arguments)
    assert torch.load(tmp_path / "run" / "training_state.pt", weights_only=True)["steps_done"] == 4
    assert not (tmp_path / "run" / "trainer_0" / "checkpoints").exists()  # backups are not checkpoints
    (resumed,) = trainSAE(batches, save_dir=tmp_path / "run", resume_from=tmp_path / "run", **arguments)
    (whole,) = trainSAE(batches, save_dir=tmp_path / "whole", **arguments)
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), whole.state_dict().values()))
    printed = capsys.readouterr().out
    assert "step 2 trainer 0: " in printed and "mse_loss" in printed  # verbose: the logged metrics
    with pytest.raises(ValueError, match="need save_dir"):
        trainSAE(batches, trainer_configs=[config], steps=2, backup_steps=1)
    (positional,) = trainSAE(batches, [config], 6, progress=False)  # the reference's order: data, configs, steps
    assert all(torch.equal(a, b) for a, b in zip(positional.state_dict().values(), whole.state_dict().values()))
