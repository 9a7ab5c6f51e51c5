"""Saving and loading every dictionary class: our folders, their checkpoints, and folders written
by saprmarks/dictionary_learning (its config.json layout and state-dict key names)."""
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F

from dictionary_learning import dictionary as dictionary_module
from dictionary_learning.registry import dictionary_class
from dictionary_learning.trainers import get_trainer_class, trainer_names
from dictionary_learning.training import build_trainer, trainSAE
from dictionary_learning.utils import get_nested_folders, load_dictionary

from lm_fixtures import for_recipe

D, F_ = 8, 32
K = 3


GROUP_SIZES = [4, 12, 16]  # Matryoshka groups, sum F_

# constructor arguments beyond (activation_dim, dict_size), per class
CLASSES = {
    "AutoEncoder": {},
    "GatedAutoEncoder": {},
    "AutoEncoderTopK": {"k": K},
    "BatchTopKSAE": {"k": K},
    "JumpReluAutoEncoder": {},
    "MatryoshkaBatchTopKSAE": {"k": K, "group_sizes": GROUP_SIZES},
}


@torch.no_grad()
def make_dictionary(name, seed=0):
    """An instance of `name` with every float tensor randomised (biases and thresholds nonzero)."""
    cls = getattr(dictionary_module, name)
    torch.manual_seed(seed)
    dictionary = cls(D, F_, **CLASSES[name])
    for key, tensor in dictionary.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if "threshold" in key:
            tensor.copy_(torch.rand(tensor.shape) * 0.3 + 0.05)
        elif key in ("decoder.weight", "W_dec"):  # unit-norm decoder directions, as trained
            tensor.copy_(F.normalize(torch.randn(tensor.shape), dim=0 if key == "decoder.weight" else 1))
        else:
            tensor.copy_(torch.randn(tensor.shape) * 0.5)
    return dictionary


def assert_same_dictionary(a, b):
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key
    x = torch.randn(5, D, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a(x), b(x))


def write_folder(folder, weights, trainer_config, name="ae.pt"):
    """A trainer folder: `weights` (a dictionary or a state dict) as `name`, and config.json."""
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    torch.save(weights if isinstance(weights, dict) else weights.state_dict(), folder / name)
    (folder / "config.json").write_text(json.dumps({"trainer": trainer_config, "buffer": None}))


# --- our folders ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CLASSES))
def test_round_trip_every_class_folder_file_and_checkpoint(tmp_path, name):
    dictionary = make_dictionary(name)
    folder = tmp_path / "trainer_0"
    write_folder(folder, dictionary, {"dict_class": name, "k": K})
    (folder / "checkpoints").mkdir()
    torch.save(dictionary.state_dict(), folder / "checkpoints" / "ae_7.pt")
    for path in (folder, folder / "ae.pt", folder / "checkpoints" / "ae_7.pt", str(folder)):
        loaded, config = load_dictionary(path)
        assert_same_dictionary(dictionary, loaded)
        assert config["trainer"]["dict_class"] == name
    half, _ = load_dictionary(folder, dtype=torch.float64)
    assert all(t.dtype == torch.float64 for t in half.state_dict().values() if t.is_floating_point())


def _trainer_config(name):
    """A minimal dict config for the recipe `name` (its extra required fields filled in)."""
    cls = get_trainer_class(name)
    config = {"trainer": name, "activation_dim": D, "dict_size": F_, "warmup_steps": 2, "seed": 0}
    fields = {f.name for f in dataclasses.fields(cls.Config)}
    extras = {"k": K, "group_sizes": GROUP_SIZES, "threshold_start_step": 2, "sparsity_warmup_steps": 2,
              "anneal_start": 2, "n_sparsity_updates": 3, "sparsity_queue_length": 2}
    config.update({key: value for key, value in extras.items() if key in fields})
    return config


@pytest.mark.parametrize("name", trainer_names())
def test_trained_folder_round_trips_weights_and_config(tmp_path, name):
    g = torch.Generator().manual_seed(0)
    batches = for_recipe(get_trainer_class(name), [torch.randn(32, D, generator=g) for _ in range(6)])
    (dictionary,) = trainSAE(batches, trainer_configs=[_trainer_config(name)], steps=6, save_dir=tmp_path,
                             save_steps=[3], log_steps=2, progress=False)
    folder = tmp_path / "trainer_0"
    loaded, config = load_dictionary(folder, normalize_decoder=False)
    assert_same_dictionary(dictionary, loaded)
    # the config rebuilds the same trainer: every field, the recipe and the dictionary class
    trainer_config = config["trainer"]
    assert trainer_config["trainer_class"] == name
    assert trainer_config["dict_class"] == type(dictionary).__name__
    rebuilt = json.loads(json.dumps(build_trainer(trainer_config).config))
    assert rebuilt == trainer_config
    assert config["training"]["steps"] == 6 and config["training"]["activation_scale"] is None
    checkpoint, _ = load_dictionary(folder / "checkpoints" / "ae_3.pt", normalize_decoder=False)
    assert type(checkpoint) is type(dictionary)
    final = dictionary.state_dict()
    assert any(not torch.equal(value, final[key]) for key, value in checkpoint.state_dict().items())


def test_jumprelu_thresholds_survive_save_and_load_bit_for_bit(tmp_path):
    """θ is the trained parameter itself and is saved as it is: even the values whose logarithm does
    not round-trip through exp (a 1-ulp drift when θ was stored as log θ) come back bit for bit."""
    dictionary = make_dictionary("JumpReluAutoEncoder")
    values = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)) * 2 - 5
    lossy = values[values.exp().log().exp() != values.exp()][:F_]
    assert len(lossy) > 0
    with torch.no_grad():
        dictionary.threshold[: len(lossy)] = lossy.exp()
    write_folder(tmp_path, dictionary, {"dict_class": "JumpReluAutoEncoder"})
    loaded, _ = load_dictionary(tmp_path)
    assert torch.equal(loaded.threshold, dictionary.threshold)


def test_get_nested_folders_finds_every_trainer(tmp_path):
    ae = make_dictionary("AutoEncoder")
    for sub in ("sweep/trainer_0", "sweep/trainer_1", "other/x"):
        write_folder(tmp_path / sub, ae, {"dict_class": "AutoEncoder"})
    (tmp_path / "empty").mkdir()
    assert get_nested_folders(tmp_path) == sorted(str(tmp_path / s) for s in ("other/x", "sweep/trainer_0", "sweep/trainer_1"))


# --- folders written by saprmarks/dictionary_learning ----------------------------------------
# Key names and config layout as in the reference library's dictionary.py, trainers/*.py and
# training.py (config.json = {"trainer": trainer.config, "buffer": buffer.config}).

REFERENCE_BUFFER = {"d_submodule": D, "io": "out", "n_ctxs": 3000, "ctx_len": 128,
                    "refresh_batch_size": 32, "out_batch_size": 8192, "device": "cuda:0"}


def reference_trainer_config(trainer_class, dict_class, **extra):
    return {"trainer_class": trainer_class, "dict_class": dict_class, "lr": 3e-4, "steps": 1000,
            "seed": 0, "activation_dim": D, "dict_size": F_, "device": "cuda:0", "layer": 3,
            "lm_name": "EleutherAI/pythia-70m-deduped", "wandb_name": "run", "submodule_name": "resid_post_layer_3",
            **extra}


def reference_state(name, g):
    """State dicts with the reference's key names, shapes and dtypes, and the reference's forward."""
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    if name == "AutoEncoder":
        decoder = F.normalize(r(D, F_), dim=0)
        sd = {"bias": r(D), "encoder.weight": r(F_, D), "encoder.bias": r(F_), "decoder.weight": decoder}

        def forward(x):
            f = torch.relu((x - sd["bias"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
            return f @ sd["decoder.weight"].T + sd["bias"]

        return sd, forward, reference_trainer_config("StandardTrainer", name, l1_penalty=0.1)
    if name == "GatedAutoEncoder":
        sd = {"decoder_bias": r(D), "encoder.weight": r(F_, D), "r_mag": r(F_), "gate_bias": r(F_),
              "mag_bias": r(F_), "decoder.weight": r(D, F_)}

        def forward(x):
            x_enc = (x - sd["decoder_bias"]) @ sd["encoder.weight"].T
            gate = (x_enc + sd["gate_bias"] > 0).float()
            mag = torch.relu(sd["r_mag"].exp() * x_enc + sd["mag_bias"])
            return (gate * mag) @ sd["decoder.weight"].T + sd["decoder_bias"]

        return sd, forward, reference_trainer_config("GatedSAETrainer", name, l1_penalty=0.1)
    if name in ("AutoEncoderTopK", "BatchTopKSAE"):
        sd = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.2, dtype=torch.float32),
              "decoder.weight": F.normalize(r(D, F_), dim=0), "encoder.weight": r(F_, D), "encoder.bias": r(F_),
              "b_dec": r(D)}

        def forward(x):
            post_relu = torch.relu((x - sd["b_dec"]) @ sd["encoder.weight"].T + sd["encoder.bias"])
            if name == "AutoEncoderTopK":  # per-token top-k (use_threshold=False by default)
                top = post_relu.topk(K, dim=-1)
                f = torch.zeros_like(post_relu).scatter_(-1, top.indices, top.values)
            else:  # inference uses the threshold
                f = post_relu * (post_relu > sd["threshold"])
            return f @ sd["decoder.weight"].T + sd["b_dec"]

        trainer = "TopKTrainer" if name == "AutoEncoderTopK" else "BatchTopKTrainer"
        return sd, forward, reference_trainer_config(trainer, name, k=K, auxk_alpha=1 / 32)
    if name == "JumpReluAutoEncoder":
        sd = {"W_enc": r(D, F_), "b_enc": r(F_), "W_dec": F.normalize(r(F_, D), dim=1), "b_dec": r(D),
              "threshold": torch.rand(F_, generator=g) * 0.3}

        def forward(x):  # apply_b_dec_to_input = False
            pre = x @ sd["W_enc"] + sd["b_enc"]
            f = torch.relu(pre * (pre > sd["threshold"]))
            return f @ sd["W_dec"] + sd["b_dec"]

        return sd, forward, reference_trainer_config("JumpReluTrainer", name, target_l0=20)
    if name == "MatryoshkaBatchTopKSAE":
        sd = {"k": torch.tensor(K, dtype=torch.int), "threshold": torch.tensor(0.2, dtype=torch.float32),
              "group_sizes": torch.tensor(GROUP_SIZES), "W_enc": r(D, F_), "b_enc": r(F_),
              "W_dec": F.normalize(r(F_, D), dim=1), "b_dec": r(D)}

        def forward(x):
            post_relu = torch.relu((x - sd["b_dec"]) @ sd["W_enc"] + sd["b_enc"])
            f = post_relu * (post_relu > sd["threshold"])
            return f @ sd["W_dec"] + sd["b_dec"]

        config = reference_trainer_config("MatryoshkaBatchTopKTrainer", name, k=K,
                                          group_fractions=[g_ / F_ for g_ in GROUP_SIZES], group_sizes=GROUP_SIZES)
        return sd, forward, config
    raise AssertionError(name)


@pytest.mark.parametrize("name", list(CLASSES))
def test_loads_reference_folder(tmp_path, name):
    sd, reference_forward, trainer_config = reference_state(name, torch.Generator().manual_seed(3))
    folder = tmp_path / "resid_post_layer_3" / "trainer_0"
    folder.mkdir(parents=True)
    torch.save(sd, folder / "ae.pt")
    (folder / "config.json").write_text(json.dumps({"trainer": trainer_config, "buffer": REFERENCE_BUFFER}, indent=4))
    dictionary, config = load_dictionary(folder)
    assert type(dictionary).__name__ == name
    assert config["buffer"] == REFERENCE_BUFFER
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(4)) * 2
    torch.testing.assert_close(dictionary(x), reference_forward(x), rtol=1e-5, atol=1e-5)
    # every reference tensor arrives unchanged (under our key names)
    ours = dictionary.state_dict()
    for key, value in sd.items():
        assert key in ours, f"reference key {key!r} has no counterpart"
        assert torch.equal(ours[key].to(value.dtype), value), key


def test_reference_topk_checkpoint_without_k_buffer_takes_k_from_config(tmp_path):
    sd, reference_forward, trainer_config = reference_state("AutoEncoderTopK", torch.Generator().manual_seed(5))
    del sd["k"], sd["threshold"]  # written before k and threshold became buffers
    write_folder(tmp_path, sd, trainer_config)
    dictionary, _ = load_dictionary(tmp_path)
    assert int(dictionary.k) == K
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(dictionary(x), reference_forward(x), rtol=1e-5, atol=1e-5)


def test_reference_folder_without_dict_class_is_recognised_by_its_keys(tmp_path):
    sd, reference_forward, trainer_config = reference_state("GatedAutoEncoder", torch.Generator().manual_seed(7))
    del trainer_config["dict_class"]
    write_folder(tmp_path, sd, trainer_config)
    dictionary, _ = load_dictionary(tmp_path / "ae.pt")
    assert type(dictionary).__name__ == "GatedAutoEncoder"
    x = torch.randn(6, D, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(dictionary(x), reference_forward(x), rtol=1e-5, atol=1e-5)


def test_autoencoder_with_free_decoder_norms_is_normalised_like_the_reference(tmp_path):
    ae = make_dictionary("AutoEncoder")
    with torch.no_grad():
        ae.W_dec.mul_((torch.rand(F_) * 2 + 0.1)[:, None])  # April-update style: direction norms vary
    write_folder(tmp_path, ae, {"dict_class": "AutoEncoder", "trainer_class": "StandardTrainerAprilUpdate"})
    normalised, _ = load_dictionary(tmp_path)
    raw, _ = load_dictionary(tmp_path, normalize_decoder=False)
    assert_same_dictionary(ae, raw)
    torch.testing.assert_close(normalised.W_dec.norm(dim=1), torch.ones(F_))
    x = torch.randn(10, D, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(normalised(x), ae(x), rtol=1e-5, atol=1e-5)
    # features carry the decoder norms: f_i · ‖W_dec[:, i]‖
    torch.testing.assert_close(normalised.encode(x), ae.encode(x) * ae.W_dec.norm(dim=1), rtol=1e-5, atol=1e-5)


# --- errors ---------------------------------------------------------------------------------


def test_load_errors_say_what_to_pass(tmp_path):
    ae = make_dictionary("AutoEncoder")
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_dictionary(tmp_path)
    write_folder(tmp_path / "run", ae, {"dict_class": "NoSuchSAE"})
    with pytest.raises(ValueError, match="NoSuchSAE.*AutoEncoder"):
        load_dictionary(tmp_path / "run")
    unfinished = tmp_path / "unfinished"
    write_folder(unfinished, ae, {"dict_class": "AutoEncoder"}, name="checkpoints/ae_100.pt")
    with pytest.raises(FileNotFoundError, match="ae_100.pt"):
        load_dictionary(unfinished)
    bare = tmp_path / "bare"
    bare.mkdir()
    torch.save(ae.state_dict(), bare / "ae.pt")
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        load_dictionary(bare / "ae.pt")
    wrong = tmp_path / "wrong"
    write_folder(wrong, ae, {"dict_class": "GatedAutoEncoder"})
    with pytest.raises(ValueError, match="GatedAutoEncoder"):
        load_dictionary(wrong)
    assert dictionary_class("AutoEncoder") is dictionary_module.AutoEncoder
