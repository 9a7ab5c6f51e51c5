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
        ({"architecture": "matching_pursuit"}, "supported: standard, gated, topk, batchtopk, matryoshka_batchtopk"),
        ({"normalize_activations": "covariance_whitening"}, "covariance_whitening"),
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


# ---------------------------------------------------------------------------------------------
# SAELens' other architectures: transcoders, abstopk, rescaled top-k, training checkpoints,
# run-time normalisation. Each is checked against SAELens' equations (sae_lens/saes/*.py) below.
# ---------------------------------------------------------------------------------------------

D_OUT = 5


def saelens_reference(tensors, cfg, x):
    """(features, output) of SAELens' inference SAE for `cfg["architecture"]`, from its code:
    process_sae_in (run-time normalisation, then − b_dec if apply_b_dec_to_input), the activation,
    decode (÷ ‖W_dec‖ with rescale_acts_by_decoder_norm; de-normalisation except for transcoders),
    and the skip connection on the raw input."""
    architecture = cfg["architecture"]
    transcoder = "transcoder" in architecture
    normalization, stats = cfg.get("normalize_activations", "none"), None
    sae_in = x
    if normalization == "layer_norm":
        mu = x.mean(-1, keepdim=True)
        std = (x - mu).std(-1, keepdim=True)
        sae_in, stats = (x - mu) / (std + 1e-5), (mu, std)
    elif normalization == "constant_norm_rescale":
        coeff = x.shape[-1] ** 0.5 / x.norm(dim=-1, keepdim=True)
        sae_in, stats = x * coeff, (0.0, 1 / coeff)
    if cfg.get("apply_b_dec_to_input", True) and not transcoder:
        sae_in = sae_in - tensors["b_dec"]
    hidden_pre = sae_in @ tensors["W_enc"] + tensors["b_enc"]
    norms = tensors["W_dec"].norm(dim=-1)
    rescale = cfg.get("rescale_acts_by_decoder_norm", False)
    if rescale:
        hidden_pre = hidden_pre * norms
    if architecture == "topk":
        top = hidden_pre.topk(cfg["k"], dim=-1)
        f = torch.zeros_like(hidden_pre).scatter_(-1, top.indices, top.values.relu())
    elif architecture == "abstopk":
        index = hidden_pre.abs().topk(cfg["k"], dim=-1).indices
        f = torch.zeros_like(hidden_pre).scatter_(-1, index, hidden_pre.gather(-1, index))
    elif "jumprelu" in architecture or architecture in ("batchtopk", "matryoshka_batchtopk"):
        threshold = tensors["threshold"] if "threshold" in tensors else tensors["topk_threshold"].float()
        f = hidden_pre.relu() * (hidden_pre > threshold)
    else:
        f = hidden_pre.relu()
    out = (f / norms if rescale else f) @ tensors["W_dec"] + tensors["b_dec"]
    if stats is not None and not transcoder:
        out = out * stats[1] + stats[0]
    if "W_skip" in tensors:
        out = out + x @ tensors["W_skip"].T
    return f, out


def random_tensors(architecture, g, d_out=D):
    r = lambda *shape: torch.randn(*shape, generator=g) * 0.5  # noqa: E731
    tensors = {"W_enc": r(D, F_), "b_enc": r(F_), "W_dec": r(F_, d_out), "b_dec": r(d_out)}
    if "jumprelu" in architecture:
        tensors["threshold"] = torch.rand(F_, generator=g) * 0.3
    if "skip" in architecture:
        tensors["W_skip"] = r(d_out, D)
    return tensors


TRANSCODERS = {"transcoder": ("Transcoder", False), "skip_transcoder": ("Transcoder", True),
               "jumprelu_transcoder": ("JumpReluTranscoder", False),
               "jumprelu_skip_transcoder": ("JumpReluTranscoder", True)}


@pytest.mark.parametrize("architecture", list(TRANSCODERS))
def test_saelens_transcoders_import_and_export_exactly(tmp_path, architecture):
    name, skip = TRANSCODERS[architecture]
    tensors = random_tensors(architecture, torch.Generator().manual_seed(20), d_out=D_OUT)
    cfg = {"architecture": architecture, "d_in": D, "d_sae": F_, "d_out": D_OUT, "apply_b_dec_to_input": False,
           "normalize_activations": "none", "metadata": {"model_name": "gemma-2-2b", "hook_name": "blocks.3.ln2.hook_normalized",
                                                         "hook_name_out": "blocks.3.hook_mlp_out", "hook_layer": 3}}
    tmp_path.joinpath("in").mkdir()
    save_file(tensors, str(tmp_path / "in" / "sae_weights.safetensors"))
    (tmp_path / "in" / "cfg.json").write_text(json.dumps(cfg))
    transcoder, _ = load_saelens(tmp_path / "in")
    assert type(transcoder).__name__ == name and transcoder.skip == skip and transcoder.output_dim == D_OUT
    x = torch.randn(32, D, generator=torch.Generator().manual_seed(21))
    f, y = saelens_reference(tensors, cfg, x)
    torch.testing.assert_close(transcoder.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(transcoder(x), y, rtol=1e-5, atol=1e-5)
    assert transcoder.cfg.hook_name_out == "blocks.3.hook_mlp_out" and transcoder.cfg.hook_layer == 3
    assert transcoder.cfg.d_out == D_OUT and transcoder.cfg.model_name == "gemma-2-2b"

    save_saelens(transcoder, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert (written["architecture"], written["d_out"], written["apply_b_dec_to_input"]) == (architecture, D_OUT, False)
    back = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    assert back.keys() == tensors.keys() and all(torch.equal(back[k], tensors[k]) for k in tensors)
    again, _ = load_saelens(tmp_path / "out")
    assert torch.equal(again(x), transcoder(x))


def test_topk_transcoders_have_no_saelens_architecture(tmp_path):
    with pytest.raises(ValueError, match="SAELens has no architecture for TopKTranscoder"):
        save_saelens(dictionary_module.TopKTranscoder(D, F_, k=K), tmp_path)
    tensors = random_tensors("transcoder", torch.Generator().manual_seed(22))
    with pytest.raises(ValueError, match="apply_b_dec_to_input=True"):
        dictionary_from_saelens(tensors, {"architecture": "transcoder", "apply_b_dec_to_input": True})


@pytest.mark.parametrize("architecture", ["topk", "abstopk"])
@pytest.mark.parametrize("apply_b_dec_to_input", [True, False])
def test_rescale_acts_by_decoder_norm_is_folded_exactly(architecture, apply_b_dec_to_input):
    tensors = random_tensors(architecture, torch.Generator().manual_seed(23))
    tensors["W_dec"] *= torch.rand(F_, 1, generator=torch.Generator().manual_seed(24)) * 3 + 0.2  # free norms
    cfg = {"architecture": architecture, "k": K, "rescale_acts_by_decoder_norm": True,
           "apply_b_dec_to_input": apply_b_dec_to_input, "d_in": D, "d_sae": F_}
    dictionary = dictionary_from_saelens(tensors, cfg)
    assert type(dictionary).__name__ == {"topk": "AutoEncoderTopK", "abstopk": "AbsTopKSAE"}[architecture]
    torch.testing.assert_close(dictionary.W_dec.norm(dim=1), torch.ones(F_))
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(25))
    f, x_hat = saelens_reference(tensors, cfg, x)
    torch.testing.assert_close(dictionary.encode(x), f, rtol=1e-5, atol=1e-5)  # SAELens' features, h ⊙ ‖W_dec‖
    torch.testing.assert_close(dictionary(x), x_hat, rtol=1e-5, atol=1e-5)
    assert torch.equal((dictionary.encode(x) != 0).sum(-1), torch.full((64,), K))


def test_abstopk_features_are_signed_and_round_trip(tmp_path):
    tensors = random_tensors("abstopk", torch.Generator().manual_seed(26))
    dictionary = dictionary_from_saelens(tensors, {"architecture": "abstopk", "k": K, "d_in": D, "d_sae": F_})
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(27))
    assert bool((dictionary.encode(x) < 0).any())  # features fire in either direction
    save_saelens(dictionary, tmp_path)
    written = json.loads((tmp_path / "cfg.json").read_text())
    assert (written["architecture"], written["k"], written["activation_fn"]) == ("abstopk", K, "relu")
    again, _ = load_saelens(tmp_path)
    assert type(again).__name__ == "AbsTopKSAE" and torch.equal(again(x), dictionary(x))


def test_saelens_batchtopk_training_checkpoints_import_with_their_threshold():
    g = torch.Generator().manual_seed(28)
    tensors = random_tensors("batchtopk", g)
    tensors["W_dec"] *= torch.rand(F_, 1, generator=g) * 2 + 0.5
    tensors["topk_threshold"] = torch.tensor(0.4, dtype=torch.double)
    cfg = {"architecture": "batchtopk", "k": float(K), "rescale_acts_by_decoder_norm": True, "d_in": D, "d_sae": F_,
           "apply_b_dec_to_input": True, "topk_threshold_lr": 0.01}
    dictionary = dictionary_from_saelens(tensors, cfg)
    assert type(dictionary).__name__ == "BatchTopKSAE" and int(dictionary.k) == K
    assert float(dictionary.threshold) == pytest.approx(0.4)
    x = torch.randn(64, D, generator=torch.Generator().manual_seed(29))
    f, x_hat = saelens_reference(tensors, cfg, x)  # SAELens saves it for inference as this JumpReLU SAE
    torch.testing.assert_close(dictionary.encode(x), f, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dictionary(x), x_hat, rtol=1e-5, atol=1e-5)

    matryoshka = dictionary_from_saelens(tensors, {**cfg, "architecture": "matryoshka_batchtopk",
                                                   "matryoshka_widths": [4, 12, F_]})
    assert type(matryoshka).__name__ == "MatryoshkaBatchTopKSAE" and matryoshka.group_sizes.tolist() == [4, 8, 20]
    torch.testing.assert_close(matryoshka(x), x_hat, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="matryoshka_widths"):
        dictionary_from_saelens(tensors, {**cfg, "architecture": "matryoshka_batchtopk", "matryoshka_widths": [4, 9]})
    with pytest.raises(ValueError, match="not a whole number"):
        dictionary_from_saelens(tensors, {**cfg, "k": 2.5})


@pytest.mark.parametrize("normalization", ["layer_norm", "constant_norm_rescale"])
@pytest.mark.parametrize("architecture", ["standard", "topk", "jumprelu", "skip_transcoder"])
def test_run_time_normalisation_is_applied_at_encode_and_decode(tmp_path, normalization, architecture):
    from dictionary_learning.normalization import RunTimeNormalized

    tensors = random_tensors(architecture, torch.Generator().manual_seed(30), d_out=D_OUT if "transcoder" in
                             architecture else D)
    cfg = {"architecture": architecture, "k": K, "d_in": D, "d_sae": F_, "normalize_activations": normalization,
           "apply_b_dec_to_input": architecture in ("standard", "topk"), "d_out": D_OUT}
    dictionary = dictionary_from_saelens(tensors, cfg)
    assert isinstance(dictionary, RunTimeNormalized) and dictionary.cfg.normalize_activations == normalization
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(31)) * 4 + 1
    f, x_hat = saelens_reference(tensors, cfg, x)
    torch.testing.assert_close(dictionary(x), x_hat, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dictionary.encode(x), f, rtol=1e-5, atol=1e-5)
    skip = dictionary.skip_term(x) if dictionary.is_transcoder else 0.0
    torch.testing.assert_close(dictionary.decode(dictionary.encode(x)) + skip, x_hat, rtol=1e-5, atol=1e-5)
    assert dictionary.W_enc is dictionary.dictionary.W_enc and dictionary.cfg.d_in == D
    with pytest.raises(ValueError, match="call encode"):
        dictionary.decode(torch.zeros(2, F_))
    save_saelens(dictionary, tmp_path)
    assert json.loads((tmp_path / "cfg.json").read_text())["normalize_activations"] == normalization
    again, _ = load_saelens(tmp_path)
    assert isinstance(again, RunTimeNormalized) and torch.equal(again(x), dictionary(x))


def test_unknown_classes_are_named_without_private_ones(tmp_path):
    from dictionary_learning.registry import architecture, saelens_architecture

    class Custom(dictionary_module.AutoEncoder.__mro__[1]):  # a Dictionary of the user's
        def encode(self, x):
            return x

        def decode(self, f):
            return f

    messages = []
    for call in (lambda: architecture("NoSuch"), lambda: saelens_architecture("no_such"),
                 lambda: save_saelens(Custom(), tmp_path)):
        with pytest.raises(ValueError) as error:
            call()
        messages.append(str(error.value))
    for message in messages:
        listed = message.rsplit(": ", 1)[1].split(", ")
        assert len(listed) > 3 and not [name for name in listed if name.startswith("_")], message
