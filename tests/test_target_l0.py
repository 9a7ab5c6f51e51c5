"""target_l0: the L1-family recipes adapt λ (trainers/base.py L0Controller) so that the L0 reaches the
target from a λ far too small or far too large; its state resumes exactly."""
import pytest
import torch

from dictionary_learning import SyntheticActivations, trainSAE
from dictionary_learning.trainers.base import L0Controller
from dictionary_learning.training import build_trainer

TARGET = 8


def run(name, penalty, steps=1000):
    data = SyntheticActivations(activation_dim=32, n_features=128, mean_active=5, batch_size=512, seed=0)
    trainer = build_trainer({"trainer": name, "activation_dim": 32, "dict_size": 128, "sparsity_penalty": penalty,
                             "target_l0": TARGET, "warmup_steps": 20, "sparsity_warmup_steps": 20, "seed": 0,
                             "lr": 1e-3}, steps=steps)
    for step in range(steps):
        metrics = trainer.update(step, data.sample())
    return trainer, metrics


@pytest.mark.slow
@pytest.mark.parametrize("name, penalty", [("StandardTrainer", 1e-4), ("StandardTrainer", 10.0),
                                           ("StandardTrainerAprilUpdate", 30.0), ("GatedSAETrainer", 1e-3)])
def test_the_l0_reaches_the_target_from_a_penalty_far_off(name, penalty):
    trainer, metrics = run(name, penalty)
    assert abs(trainer.l0_controller.mean_l0 - TARGET) < 0.2 * TARGET
    moved = float(metrics["penalty_scale"])
    assert moved > 10 if penalty < 0.01 else moved < 0.5  # λ_eff = λ · m moved far from the λ given


def test_recipes_whose_l0_is_set_otherwise_reject_or_keep_their_meaning():
    with pytest.raises(ValueError, match="fixes the L0 with k: pass k=8"):
        build_trainer({"trainer": "TopKTrainer", "activation_dim": 8, "dict_size": 16, "k": 4, "target_l0": 8})
    jumprelu = build_trainer({"trainer": "JumpReluTrainer", "activation_dim": 8, "dict_size": 16, "target_l0": 8})
    assert jumprelu.l0_controller.min_log_scale == 0.0  # its (L0/T − 1)², scaled by an m that stays >= 1
    assert build_trainer({"trainer": "JumpReluTrainer", "activation_dim": 8, "dict_size": 16}).l0_controller is None
    with pytest.raises(ValueError, match=r"target_l0 must be a number in \(0, dict_size=16\]"):
        build_trainer({"trainer": "StandardTrainer", "activation_dim": 8, "dict_size": 16, "target_l0": 0})


def test_the_controller_state_resumes_exactly(tmp_path):
    data = SyntheticActivations(activation_dim=16, n_features=48, mean_active=3, batch_size=128, seed=1)
    batches = list(data.batches(n_batches=40))
    config = {"trainer": "StandardTrainer", "activation_dim": 16, "dict_size": 32, "sparsity_penalty": 1.0,
              "target_l0": 4, "warmup_steps": 2, "seed": 0}
    full = trainSAE(batches, trainer_configs=[config], steps=40, save_dir=tmp_path / "full", save_steps=[20],
                    progress=False)[0]
    trainSAE(batches[:20], trainer_configs=[config], steps=40, save_dir=tmp_path / "run", save_steps=[20],
             progress=False)
    resumed = trainSAE(batches, trainer_configs=[config], steps=40, resume_from=tmp_path / "run", save_steps=[20],
                       progress=False)[0]
    for key, value in full.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_controller_with_a_floor_integrates_only_above_it():
    def l0_of(value):  # a batch of 4 rows whose L0 is `value`
        features = torch.zeros(4, 64)
        features[:, :value] = 1.0
        return features

    free, floored = L0Controller(8), L0Controller(8, min_scale=1.0)
    for _ in range(200):  # L0 4 < T: m falls, or stays at its floor
        free.update(l0_of(4), adapt=True)
        floored.update(l0_of(4), adapt=True)
    assert free.scale < 0.1 and floored.scale == 1.0
    for _ in range(100):  # L0 16 > T: the floored one grows from 1 at once, with nothing wound up to undo
        free.update(l0_of(16), adapt=True)
        floored.update(l0_of(16), adapt=True)
    assert floored.scale > 2.0 and free.scale < floored.scale / 2
    with pytest.raises(ValueError, match="min_scale must be a finite number >= 0"):
        L0Controller(8, min_scale=-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["JumpReluTrainer", "JumpReluTranscoderTrainer"])
def test_jumprelu_reaches_a_target_its_soft_penalty_alone_misses(name):
    if name == "JumpReluTrainer":
        trainer, metrics = run(name, 0.01)  # m held at 1 instead: L0 31 for T = 8
    else:  # a transcoder of the linear map y = x W_out
        data = SyntheticActivations(activation_dim=32, n_features=128, mean_active=5, batch_size=512, seed=0)
        w_out = torch.randn(32, 24, generator=torch.Generator().manual_seed(0)) / 32 ** 0.5
        trainer = build_trainer({"trainer": name, "activation_dim": 32, "output_dim": 24, "dict_size": 128,
                                 "sparsity_penalty": 0.01, "target_l0": TARGET, "warmup_steps": 20,
                                 "sparsity_warmup_steps": 20, "seed": 0, "lr": 1e-3}, steps=1000)
        for step in range(1000):
            x = data.sample()
            metrics = trainer.update(step, (x, x @ w_out))
    assert abs(trainer.l0_controller.mean_l0 - TARGET) < 0.2 * TARGET
    assert float(metrics["penalty_scale"]) > 10  # m grew: λ (L0/T − 1)² alone settles far above T
