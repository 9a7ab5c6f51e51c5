"""Folders written by dictionary_learning 0.2 (before the one weight layout) still load and resume.

tests/data/legacy_0.2 was written by the 0.2 code (commit 9758970): a sweep of every recipe on the
batches of `batches()` below, interrupted after 3 of 6 steps (sweep/: training_state.pt and
checkpoints/ae_3.pt per trainer, with the configs' old field names l1_penalty and
initial_sparsity_penalty), and the final weights of the same run uninterrupted
(uninterrupted_final.pt). The 0.2 code resumed it to exactly those weights.
"""
import json
import shutil
from pathlib import Path

import torch

from dictionary_learning import load_dictionary, trainSAE

LEGACY = Path(__file__).parent / "data" / "legacy_0.2"
D = 8


def batches(n=6):
    g = torch.Generator().manual_seed(0)
    features = torch.nn.functional.normalize(1 + 0.5 * torch.randn(24, D, generator=g), dim=-1)
    out = []
    for _ in range(n):
        codes = torch.rand(32, 24, generator=g) * (torch.rand(32, 24, generator=g) < 0.15)
        out.append(codes @ features * 3 + 0.05 * torch.randn(32, D, generator=g))
    return out


def legacy_sweep(tmp_path) -> tuple[Path, list[dict]]:
    folder = tmp_path / "sweep"
    shutil.copytree(LEGACY / "sweep", folder)
    return folder, json.loads((LEGACY / "configs.json").read_text())


def test_legacy_checkpoints_load(tmp_path):
    folder, configs = legacy_sweep(tmp_path)
    for i, config in enumerate(configs):
        dictionary, saved = load_dictionary(folder / f"trainer_{i}" / "checkpoints" / "ae_3.pt")
        assert type(dictionary).__name__ == saved["trainer"]["dict_class"]
        assert saved["trainer"]["trainer_class"] == config["trainer"]


def test_legacy_state_resumes_where_it_stopped(tmp_path):
    """Resumed with no batch left to train on, every trainer returns the weights of its step-3
    checkpoint: the state (weights, thresholds, the activation scale) maps onto today's layout exactly
    (JumpReLU's θ to a few ulps: 0.2 scaled it as exp(log θ + log(1/s)), today as θ · (1/s))."""
    folder, configs = legacy_sweep(tmp_path)
    dictionaries = trainSAE(batches(3), trainer_configs=configs, steps=6, save_dir=folder, resume_from=folder,
                            progress=False, normalize_activations=True)
    for i, dictionary in enumerate(dictionaries):
        checkpoint, _ = load_dictionary(folder / f"trainer_{i}" / "checkpoints" / "ae_3.pt", normalize_decoder=False)
        for key, value in checkpoint.state_dict().items():
            if configs[i]["trainer"] == "JumpReluTrainer" and key == "threshold":
                torch.testing.assert_close(dictionary.state_dict()[key], value, rtol=5e-7, atol=0)
            else:
                assert torch.equal(dictionary.state_dict()[key], value), (i, key)


def test_legacy_run_resumes_to_the_uninterrupted_result(tmp_path):
    """Resumed to the end, each recipe ends where the 0.2 code ended without interruption: the
    optimizer moments, schedules, dead-latent counters and thresholds were carried over (bit for bit
    for the TopK family; within float rounding where the new layout multiplies in another order).
    JumpReLU now trains θ itself instead of log θ, a change of method, so it only continues."""
    folder, configs = legacy_sweep(tmp_path)
    dictionaries = trainSAE(batches(), trainer_configs=configs, steps=6, save_dir=folder, resume_from=folder,
                            progress=False, normalize_activations=True, log_steps=1)
    expected = torch.load(LEGACY / "uninterrupted_final.pt", weights_only=True)
    for config, dictionary, final in zip(configs, dictionaries, expected):
        state = dictionary.state_dict()
        assert state.keys() == final.keys()
        if config["trainer"] == "JumpReluTrainer":
            assert all(torch.isfinite(value).all() for value in state.values())
            continue
        for key, value in final.items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=f"{config['trainer']} {key}")
    assert (folder / "trainer_0" / "ae.pt").exists()
    logged = [json.loads(line)["step"] for line in (folder / "trainer_0" / "log.jsonl").read_text().splitlines()]
    assert logged == [1, 2, 3, 4, 5, 6]


def test_resume_keeps_the_initialisation_the_run_started_with(tmp_path):
    """The gated and JumpReLU recipes now start from W_enc = 0.1 W_decᵀ; a 0.2 run started from the
    tied init (saved as init_encoder_scale 1.0, or, for JumpReLU, without the field) resumes under
    today's defaults, which only shape weights the state replaces, and records the init it ran with."""
    folder, configs = legacy_sweep(tmp_path)
    trainSAE(batches(3), trainer_configs=configs, steps=6, save_dir=folder, resume_from=folder, progress=False,
             normalize_activations=True)
    for i, config in enumerate(configs):
        if config["trainer"] in ("GatedSAETrainer", "GatedAnnealTrainer", "JumpReluTrainer"):
            recorded = json.loads((folder / f"trainer_{i}" / "config.json").read_text())["trainer"]
            assert "init_encoder_scale" not in config and recorded["init_encoder_scale"] == 1.0, (i, recorded)
