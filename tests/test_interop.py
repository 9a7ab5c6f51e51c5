"""SAELens format: export every architecture SAELens has, import it back with identical outputs, and
check the exported files against SAELens' own equations (written out here from its encode/decode)."""
import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from dictionary_learning import dictionary as dictionary_module
from dictionary_learning.interop import dictionary_from_saelens, load_saelens, save_saelens
from dictionary_learning.utils import load_dictionary

D, F_ = 8, 32
K = 3


CLASSES = {
    "AutoEncoder": ({}, "standard"),
    "GatedAutoEncoder": ({}, "gated"),
    "AutoEncoderTopK": ({"k": K}, "topk"),
    "JumpReluAutoEncoder": ({}, "jumprelu"),
    "BatchTopKSAE": ({"k": K}, "jumprelu"),
    "MatryoshkaBatchTopKSAE": ({"k": K, "group_sizes": [4, 12, 16]}, "jumprelu"),
}


@torch.no_grad()
def make_dictionary(name, seed=0):
    cls = getattr(dictionary_module, name)
    torch.manual_seed(seed)
    dictionary = cls(D, F_, **CLASSES[name][0])
    for key, tensor in dictionary.state_dict().items():
        if not tensor.is_floating_point():
            continue
        if "threshold" in key:
            tensor.copy_(torch.rand(tensor.shape) * 0.3 + 0.05)
        elif key in ("decoder.weight", "W_dec"):
            tensor.copy_(F.normalize(torch.randn(tensor.shape), dim=0 if key == "decoder.weight" else 1))
        else:
            tensor.copy_(torch.randn(tensor.shape) * 0.5)
    return dictionary


def saelens_forward(tensors, cfg, x):
    """SAELens' inference SAE (sae_lens/saes/*_sae.py): encode then decode."""
    sae_in = x - tensors["b_dec"] if cfg["apply_b_dec_to_input"] else x
    architecture = cfg["architecture"]
    if architecture == "gated":
        active = (sae_in @ tensors["W_enc"] + tensors["b_gate"] > 0).float()
        magnitudes = torch.relu(sae_in @ (tensors["W_enc"] * tensors["r_mag"].exp()) + tensors["b_mag"])
        f = active * magnitudes
    else:
        hidden_pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
        if architecture == "standard":
            f = torch.relu(hidden_pre)
        elif architecture == "topk":
            top = hidden_pre.topk(cfg["k"], dim=-1)
            f = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, torch.relu(top.values))
        elif architecture == "jumprelu":
            f = torch.relu(hidden_pre) * (hidden_pre > tensors["threshold"]).float()
        else:
            raise AssertionError(architecture)
    return f @ tensors["W_dec"] + tensors["b_dec"]


@pytest.mark.parametrize("name", list(CLASSES))
def test_saelens_round_trip_is_exact_and_matches_saelens_equations(tmp_path, name):
    dictionary = make_dictionary(name)
    folder = save_saelens(dictionary, tmp_path / "sae", metadata={"model_name": "tiny", "hook_name": "blocks.1.hook_resid_post"})
    cfg = json.loads((folder / "cfg.json").read_text())
    tensors = load_file(str(folder / "sae_weights.safetensors"))
    assert cfg["architecture"] == CLASSES[name][1]
    assert (cfg["d_in"], cfg["d_sae"]) == (D, F_)
    assert cfg["normalize_activations"] == "none" and cfg["model_name"] == "tiny"
    assert tensors["W_enc"].shape == (D, F_) and tensors["W_dec"].shape == (F_, D) and tensors["b_dec"].shape == (D,)
    if cfg["architecture"] == "topk":
        assert cfg["k"] == K and cfg["activation_fn_kwargs"] == {"k": K}
    assert cfg["apply_b_dec_to_input"] == (name != "JumpReluAutoEncoder" or bool(getattr(dictionary, "apply_b_dec_to_input", False)))

    x = torch.randn(64, D, generator=torch.Generator().manual_seed(1)) * 2
    torch.testing.assert_close(saelens_forward(tensors, cfg, x), dictionary(x), rtol=1e-5, atol=1e-5)

    loaded, loaded_cfg = load_saelens(folder)
    assert loaded_cfg == cfg
    assert type(loaded).__name__ == name
    original, back = dictionary.state_dict(), loaded.state_dict()
    assert original.keys() == back.keys()
    for key in original:
        assert torch.equal(back[key], original[key]), key
    assert torch.equal(loaded(x), dictionary(x))
    assert torch.equal(loaded.encode(x), dictionary.encode(x))
    again, _ = load_dictionary(folder)  # load_dictionary recognises SAELens folders
    assert torch.equal(again(x), dictionary(x))


def random_saelens(architecture, g, apply_b_dec_to_input):
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    tensors = {"W_enc": r(D, F_), "W_dec": F.normalize(r(F_, D), dim=1), "b_dec": r(D)}
    if architecture == "gated":
        tensors.update(b_gate=r(F_), b_mag=r(F_), r_mag=r(F_))
    else:
        tensors["b_enc"] = r(F_)
    if architecture == "jumprelu":
        tensors["threshold"] = torch.rand(F_, generator=g) * 0.3
    cfg = {"architecture": architecture, "d_in": D, "d_sae": F_, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": apply_b_dec_to_input, "normalize_activations": "none",
           "model_name": "gpt2", "hook_name": "blocks.8.hook_resid_pre"}
    if architecture == "topk":
        cfg["k"] = K
    return tensors, cfg


@pytest.mark.parametrize("architecture", ["standard", "gated", "topk", "jumprelu"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_imports_saelens_files_of_either_input_convention(tmp_path, architecture, apply_b_dec_to_input):
    name = {"standard": "AutoEncoder", "gated": "GatedAutoEncoder", "topk": "AutoEncoderTopK",
            "jumprelu": "JumpReluAutoEncoder"}[architecture]
    tensors, cfg = random_saelens(architecture, torch.Generator().manual_seed(2), apply_b_dec_to_input)
    tmp_path.joinpath("cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(tmp_path / "sae_weights.safetensors"))
    dictionary, _ = load_saelens(tmp_path)
    assert type(dictionary).__name__ == name
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(3)) * 2
    # with the other convention b_dec is folded into the encoder bias: equal up to rounding
    torch.testing.assert_close(dictionary(x), saelens_forward(tensors, cfg, x), rtol=1e-5, atol=1e-5)


def test_legacy_saelens_topk_config_and_activation_scale(tmp_path):
    tensors, cfg = random_saelens("topk", torch.Generator().manual_seed(4), True)
    legacy = {**cfg, "architecture": "standard", "activation_fn_str": "topk", "activation_fn_kwargs": {"k": K}}
    del legacy["k"]
    dictionary = dictionary_from_saelens(tensors, legacy)
    assert type(dictionary).__name__ == "AutoEncoderTopK" and int(dictionary.k) == K
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(dictionary(x), saelens_forward(tensors, cfg, x), rtol=1e-5, atol=1e-5)


def test_expected_average_normalisation_is_folded_with_the_given_scale():
    tensors, cfg = random_saelens("standard", torch.Generator().manual_seed(6), True)
    cfg["normalize_activations"] = "expected_average_only_in"
    with pytest.raises(ValueError, match="activation_scale"):
        dictionary_from_saelens(tensors, cfg)
    s = 0.37  # SAELens feeds the SAE s·x and gets back the reconstruction of s·x
    dictionary = dictionary_from_saelens(tensors, cfg, activation_scale=s)
    x = torch.randn(16, D, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(dictionary(x), saelens_forward(tensors, cfg, s * x) / s, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"architecture": "matryoshka_batchtopk"}, "standard, gated, topk, jumprelu"),
        ({"normalize_activations": "layer_norm"}, "layer_norm"),
        ({"finetuning_scaling_factor": True}, "finetuning scaling factor"),
    ],
)
def test_unsupported_saelens_files_are_refused_clearly(change, match):
    tensors, cfg = random_saelens("standard", torch.Generator().manual_seed(8), True)
    with pytest.raises(ValueError, match=match):
        dictionary_from_saelens(tensors, {**cfg, **change})


def test_saelens_errors_name_the_missing_pieces(tmp_path):
    with pytest.raises(FileNotFoundError, match="cfg.json"):
        load_saelens(tmp_path)
    tensors, cfg = random_saelens("standard", torch.Generator().manual_seed(9), True)
    del tensors["b_enc"]
    with pytest.raises(ValueError, match="b_enc"):
        dictionary_from_saelens(tensors, cfg)
    with pytest.raises(ValueError, match="SAELens has no architecture for IdentityDict"):
        save_saelens(dictionary_module.IdentityDict(D), tmp_path / "identity")
