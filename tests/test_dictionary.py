import pytest
import torch
from safetensors.torch import save_file

from dictionary_learning import AutoEncoder, IdentityDict
from dictionary_learning.dictionary import Dictionary


def test_autoencoder_state_dict_keys_and_shapes():
    ae = AutoEncoder(16, 64)
    shapes = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    assert shapes == {"bias": (16,), "encoder.weight": (64, 16), "encoder.bias": (64,), "decoder.weight": (16, 64)}


def test_autoencoder_init_unit_norm_decoder_and_tied_encoder():
    torch.manual_seed(0)
    ae = AutoEncoder(16, 64)
    torch.testing.assert_close(ae.W_dec.T.norm(dim=0), torch.ones(64))
    torch.testing.assert_close(ae.W_enc.T, ae.W_dec)


def test_autoencoder_math_matches_definition():
    torch.manual_seed(0)
    ae = AutoEncoder(8, 32)
    with torch.no_grad():
        ae.b_dec.normal_()
        ae.b_enc.normal_()
    x = torch.randn(5, 8)
    f_expected = torch.relu((x - ae.b_dec) @ ae.W_enc + ae.b_enc)
    x_hat_expected = f_expected @ ae.W_dec + ae.b_dec
    torch.testing.assert_close(ae.encode(x), f_expected)
    torch.testing.assert_close(ae.decode(f_expected), x_hat_expected)
    torch.testing.assert_close(ae(x), x_hat_expected)
    x_hat, f = ae(x, output_features=True)
    torch.testing.assert_close(f, f_expected)
    torch.testing.assert_close(x_hat, x_hat_expected)


def test_autoencoder_3d_input_matches_flattened():
    torch.manual_seed(0)
    ae = AutoEncoder(8, 32)
    x = torch.randn(3, 4, 8)
    x_hat, f = ae(x, output_features=True)
    assert x_hat.shape == (3, 4, 8) and f.shape == (3, 4, 32)
    torch.testing.assert_close(x_hat.reshape(12, 8), ae(x.reshape(12, 8)))


def test_ghost_reconstruction_uses_only_masked_latents():
    torch.manual_seed(0)
    ae = AutoEncoder(8, 32)
    x = torch.randn(5, 8)
    mask = torch.zeros(32, dtype=torch.bool)
    mask[[3, 7, 20]] = True
    x_hat, x_ghost, f = ae(x, output_features=True, ghost_mask=mask)
    pre = (x - ae.b_dec) @ ae.W_enc + ae.b_enc
    expected = (torch.exp(pre) * mask) @ ae.W_dec
    torch.testing.assert_close(x_ghost, expected)
    torch.testing.assert_close(x_hat, ae(x))
    x_ghost.sum().backward()
    live = ~mask
    assert ae.W_enc.grad.T[live].abs().sum() == 0
    assert ae.W_dec.grad.T[:, live].abs().sum() == 0
    assert ae.W_enc.grad.T[mask].abs().sum() > 0
    assert ae.b_dec.grad is None or ae.b_dec.grad.abs().sum() == 0


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_from_pretrained_round_trip(tmp_path, suffix):
    torch.manual_seed(0)
    ae = AutoEncoder(16, 48)
    with torch.no_grad():
        ae.b_dec.normal_()
        ae.b_enc.normal_()
    path = tmp_path / f"ae{suffix}"
    if suffix == ".pt":
        torch.save(ae.state_dict(), path)
    else:
        save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(path))
    loaded = AutoEncoder.from_pretrained(path)
    assert (loaded.activation_dim, loaded.dict_size) == (16, 48)
    x = torch.randn(7, 16)
    assert torch.equal(loaded(x), ae(x))


def test_from_pretrained_dtype_and_device_each_alone(tmp_path):
    path = tmp_path / "ae.pt"
    torch.save(AutoEncoder(8, 16).state_dict(), path)
    half = AutoEncoder.from_pretrained(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    on_cpu = AutoEncoder.from_pretrained(path, device="cpu")
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in on_cpu.parameters())


def test_from_pretrained_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        AutoEncoder.from_pretrained(tmp_path / "nope.pt")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"this is not a checkpoint")
    with pytest.raises(ValueError, match="corrupt.pt"):
        AutoEncoder.from_pretrained(corrupt)
    wrong_keys = tmp_path / "wrong.pt"
    torch.save({"W_enc": torch.zeros(4, 8)}, wrong_keys)
    with pytest.raises(ValueError, match=r"wrong\.pt.*encoder\.weight"):
        AutoEncoder.from_pretrained(wrong_keys)
    wrong_shape = tmp_path / "shape.pt"
    state = AutoEncoder(8, 16).state_dict()
    state["decoder.weight"] = torch.zeros(8, 15)
    torch.save(state, wrong_shape)
    with pytest.raises(ValueError, match="decoder.weight"):
        AutoEncoder.from_pretrained(wrong_shape)
    with pytest.raises(IsADirectoryError, match="ae.pt"):
        AutoEncoder.from_pretrained(tmp_path)


def test_identity_dict():
    d = IdentityDict(8)
    x = torch.randn(3, 8)
    assert isinstance(d, Dictionary)
    assert torch.equal(d(x), x)
    x_hat, f = d(x, output_features=True)
    assert torch.equal(f, x) and d.dict_size == 8


def test_scale_biases_folds_input_scaling():
    torch.manual_seed(0)
    ae = AutoEncoder(8, 32)
    with torch.no_grad():
        ae.b_dec.normal_()
        ae.b_enc.normal_()
    x, s = torch.randn(4, 8), 3.0
    trained_on_scaled = ae(s * x) / s
    ae.scale_biases(1 / s)
    torch.testing.assert_close(ae(x), trained_on_scaled)
