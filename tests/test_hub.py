"""The Hugging Face Hub at huggingface_hub's API boundary, offline: `HfApi` and `hf_hub_download`
are replaced by an in-memory hub, so the paths asked for and the files uploaded are checked while
the library's code keeps its real calls. A hub that does not answer is a closed local port, reached
through the real huggingface_hub functions."""
import json
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch

from dictionary_learning import AutoEncoder, AutoEncoderTopK, load_dictionary, push_to_hub, trainSAE
from dictionary_learning.cli import main
from dictionary_learning.hub import HubPath, HubUnreachable, parse_hub_path
from hub_fixtures import FakeHub


@pytest.fixture
def hub(tmp_path, monkeypatch):
    fake = FakeHub(tmp_path / "hub_cache")
    monkeypatch.setattr(huggingface_hub, "HfApi", fake.Api)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return fake


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A trainSAE sweep folder of two dictionaries, with checkpoints and the resumable state."""
    folder = tmp_path_factory.mktemp("sweep") / "run"
    generator = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 8, generator=generator) for _ in range(6)]
    configs = [{"trainer": "StandardTrainer", "activation_dim": 8, "dict_size": 32, "warmup_steps": 2, "seed": 0},
               {"trainer": "TopKTrainer", "activation_dim": 8, "dict_size": 32, "k": 4, "warmup_steps": 2,
                "threshold_start_step": 2, "seed": 0}]
    trainSAE(data, trainer_configs=configs, steps=6, save_dir=folder, save_steps=[3], log_steps=2, progress=False)
    (folder / "eval.json").write_text(json.dumps({"rows": []}))
    return folder


def test_hub_paths_parse_to_repository_revision_and_path():
    assert parse_hub_path("hf://me/saes/pythia/mlp0") == HubPath("me/saes", "pythia/mlp0", None)
    assert parse_hub_path("hf://me/saes@v1/a/ae.pt") == HubPath("me/saes", "a/ae.pt", "v1")
    assert parse_hub_path("hf://me/saes/") == HubPath("me/saes", "", None)
    assert parse_hub_path("hf://me/saes@v1/a").url == "hf://me/saes@v1/a"
    for bad in ("hf://me", "hf://me/../x", "me/saes/a", "hf:///saes"):
        with pytest.raises(ValueError, match="Hub path"):
            parse_hub_path(bad)


def test_push_uploads_the_layout_the_reference_and_saebench_read_in_one_commit(hub, sweep):
    url = push_to_hub(sweep, "me/saes", path_in_repo="pythia/mlp0", private=True)
    assert url == "hf://me/saes/pythia/mlp0"
    ((repo, message, paths),) = hub.commits
    trainer_files = ["ae.pt", "config.json", "log.jsonl"]
    assert repo == "me/saes" and sorted(paths) == sorted(
        ["pythia/mlp0/eval.json"] + [f"pythia/mlp0/trainer_{i}/{name}" for i in range(2) for name in trainer_files])
    assert ("create_repo", "me/saes", True) in hub.calls
    for path in paths:  # the bytes of the local files; never the state, the lock or checkpoints
        assert hub.repos["me/saes"][path] == (sweep / path.removeprefix("pythia/mlp0/")).read_bytes()
    push_to_hub(sweep / "trainer_1", "me/saes", path_in_repo="single", include_checkpoints=True)
    assert sorted(hub.commits[-1][2]) == ["single/ae.pt", "single/checkpoints/ae_3.pt", "single/config.json",
                                          "single/log.jsonl"]


def test_load_dictionary_and_from_pretrained_read_hub_paths(hub, sweep):
    push_to_hub(sweep, "me/saes", path_in_repo="pythia/mlp0")
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    local, local_config = load_dictionary(sweep / "trainer_1")
    remote, remote_config = load_dictionary("hf://me/saes/pythia/mlp0/trainer_1")
    assert isinstance(remote, AutoEncoderTopK) and torch.equal(remote(x), local(x)) and remote_config == local_config
    downloads = [call[2] for call in hub.calls if call[0] == "hf_hub_download"]
    assert downloads == ["pythia/mlp0/trainer_1/config.json", "pythia/mlp0/trainer_1/ae.pt"]  # no logs, no checkpoints
    assert ("model_info", "me/saes", None, 10.0) in hub.calls  # one listing with a short timeout
    standard = AutoEncoder.from_pretrained("hf://me/saes/pythia/mlp0/trainer_0/ae.pt")
    assert torch.equal(standard(x), load_dictionary(sweep / "trainer_0")[0](x))
    assert isinstance(AutoEncoder.from_pretrained("hf://me/saes/pythia/mlp0/trainer_0"), AutoEncoder)


@pytest.mark.parametrize("url, message", [
    ("hf://me/saes/pythia/mlp0", "holds no dictionary itself but 2 below it (trainer_0, trainer_1): pass one of them, "
                                 "e.g. hf://me/saes/pythia/mlp0/trainer_0"),
    ("hf://me/saes/pythia/mlp9", "no dictionary there (ae.pt + config.json, or SAELens' cfg.json + "
                                 "sae_weights.safetensors); it holds nothing there"),
    ("hf://me/saes/pythia/mlp0/trainer_0/ae_9.pt", "no such file in me/saes; it holds ae.pt, config.json, log.jsonl"),
    ("hf://me/nothing/x", "no such repository on the Hub"),
])
def test_hub_paths_that_hold_no_dictionary_say_what_is_there(hub, sweep, url, message):
    push_to_hub(sweep, "me/saes", path_in_repo="pythia/mlp0")
    with pytest.raises(FileNotFoundError) as error:
        load_dictionary(url)
    assert message in str(error.value)


def test_eval_and_export_read_a_pushed_sweep(hub, sweep, tmp_path, capsys):
    push_to_hub(sweep, "me/saes", path_in_repo="pythia/mlp0")
    assert main(["export", "hf://me/saes/pythia/mlp0", str(tmp_path / "out"), "--format", "safetensors"]) == 0
    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    for name in ("trainer_0", "trainer_1"):
        assert torch.equal(load_dictionary(tmp_path / "out" / name)[0](x), load_dictionary(sweep / name)[0](x))


@pytest.fixture
def closed_hub(monkeypatch):
    """The real huggingface_hub pointed at a local port nothing listens on."""
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)


@pytest.mark.parametrize("argv", [["train", "--model", "EleutherAI/pythia-70m-deduped"],
                                  ["train", "--dataset", "monology/pile-uncopyrighted"],
                                  ["eval", "hf://me/saes/pythia/mlp0"]])
def test_an_unreachable_hub_fails_in_seconds_with_one_line(closed_hub, argv, capsys):
    start = time.perf_counter()
    status = main([*argv, "--no-progress"] if argv[0] == "train" else argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert status == 1 and len(lines) == 1 and "Traceback" not in err, err
    assert "cannot reach the Hugging Face Hub (http://127.0.0.1:" in lines[0]
    assert "Set HF_HUB_OFFLINE=1 to use the local cache only, or pass a local path" in lines[0]
    assert elapsed < 15, elapsed


def test_offline_mode_reads_the_cache_only(closed_hub, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="not in the local Hub cache, and HF_HUB_OFFLINE is set"):
        load_dictionary("hf://me/never-downloaded/trainer_0")
    assert time.perf_counter() - start < 5
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE is set: unset it to push"):
        push_to_hub(Path(__file__).parent, "me/saes")
