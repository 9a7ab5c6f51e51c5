"""Every recipe learns at its defaults: with only activation_dim, dict_size and its sparsity target
given (and inputs normalised to E‖x‖² = 1, the scale the defaults are stated for), a short CPU run on
hierarchical synthetic ground truth reaches the target L0 and explains most of the variance, and its
decoder matches the true features better than the random dictionary it started from. Defaults that
depend on the run's length (LR warmup, JumpReLU's λ warmup, p-annealing's start) are resolved into
the recorded config; values the user gives are kept exactly."""
import math

import pytest

from dictionary_learning import HierarchicalActivations, ground_truth_scores, trainSAE
from dictionary_learning.runs import _check_same_config
from dictionary_learning.trainers.base import run_length_lr_scale
from dictionary_learning.training import build_trainer

D, F, STEPS, TARGET = 32, 128, 1000, 4
DATA = dict(activation_dim=D, n_roots=16, branching=2, depth=2, n_independent=32, mean_active_top=3.0,
            correlation_rank=2, correlation_strength=0.3, batch_size=256, seed=0)
RECIPES = ["GatedSAETrainer", "GatedAnnealTrainer", "JumpReluTrainer", "PAnnealTrainer"]


def scores(dictionary):
    return ground_truth_scores(dictionary, HierarchicalActivations(stream_seed=99, **DATA), n_samples=8192)


@pytest.mark.slow
@pytest.mark.parametrize("name", RECIPES)
def test_learns_at_its_defaults(name):
    config = {"trainer": name, "activation_dim": D, "dict_size": F, "target_l0": TARGET, "seed": 0}
    untrained = scores(build_trainer(config, steps=STEPS).ae)
    train = HierarchicalActivations(stream_seed=1, **DATA)
    (dictionary,) = trainSAE((train.sample() for _ in range(STEPS)), trainer_configs=[config], steps=STEPS,
                             normalize_activations=True, progress=False)
    trained = scores(dictionary)
    assert 0.5 * TARGET <= trained["l0"] <= 1.25 * TARGET, trained  # λ is steered to T (JumpReLU's from above)
    assert trained["explained_variance"] > 0.5, trained
    assert trained["mcc"] > untrained["mcc"] + 0.025, (trained, untrained)
    assert trained["f1"] > 2 * untrained["f1"], (trained, untrained)


@pytest.mark.parametrize("steps, warmup, sparsity_warmup, anneal_start", [(2_000, 200, 200, 400),
                                                                          (200_000, 1_000, 10_000, 15_000)])
def test_run_length_defaults_are_resolved_and_recorded(steps, warmup, sparsity_warmup, anneal_start):
    base = {"activation_dim": 8, "dict_size": 16}
    jumprelu = build_trainer({"trainer": "JumpReluTrainer", **base}, steps=steps)
    assert jumprelu.cfg.warmup_steps == warmup and jumprelu.cfg.sparsity_warmup_steps == sparsity_warmup
    assert jumprelu.config["sparsity_warmup_steps"] == sparsity_warmup  # what config.json records
    for name in ("PAnnealTrainer", "GatedAnnealTrainer"):
        annealed = build_trainer({"trainer": name, **base}, steps=steps)
        assert annealed.config["anneal_start"] == anneal_start and annealed.config["warmup_steps"] == warmup
        assert annealed.anneal.change_steps[0] == anneal_start


def test_given_schedule_lengths_are_kept_exactly():
    given = {"activation_dim": 8, "dict_size": 16, "warmup_steps": 1000, "sparsity_warmup_steps": 10_000}
    with pytest.warns(UserWarning, match="sparsity_warmup_steps=10000 > steps=2000"):
        jumprelu = build_trainer({"trainer": "JumpReluTrainer", **given}, steps=2_000)
    assert jumprelu.cfg.warmup_steps == 1000 and jumprelu.cfg.sparsity_warmup_steps == 10_000
    no_warmup = build_trainer({"trainer": "JumpReluTrainer", "activation_dim": 8, "dict_size": 16,
                               "sparsity_warmup_steps": 0}, steps=2_000)
    assert no_warmup.penalty_scale(0) == 1.0 and no_warmup.cfg.sparsity_warmup_steps == 0
    annealed = build_trainer({"trainer": "PAnnealTrainer", "activation_dim": 8, "dict_size": 16, "anneal_start": 1500},
                             steps=2_000)
    assert annealed.cfg.anneal_start == 1500
    with pytest.raises(ValueError, match="warmup_steps \\(1000\\) is longer than the run"):
        build_trainer({"trainer": "GatedSAETrainer", "activation_dim": 8, "dict_size": 16, "warmup_steps": 1000},
                      steps=500)


def test_run_length_lr_scale_law():
    assert run_length_lr_scale(None, 64) == 1.0  # length unknown: the published rate
    assert run_length_lr_scale(2**16, 64) == 1.0  # steps · D = 2²²
    assert run_length_lr_scale(10**6, 4096) == 1.0  # longer runs are never slowed down
    assert run_length_lr_scale(2**14, 64) == pytest.approx(2.0)  # √(2²² / 2²⁰)
    assert run_length_lr_scale(10, 8) == 8.0  # capped


@pytest.mark.parametrize("name, long_run_lr, scaled", [
    ("StandardTrainer", 1e-3, True), ("StandardTrainerAprilUpdate", 1e-3, True), ("PAnnealTrainer", 1e-3, True),
    ("TopKTrainer", 2e-4 / math.sqrt(256 / 2**14), True), ("BatchTopKTrainer", 2e-4 / math.sqrt(256 / 2**14), True),
    ("GatedSAETrainer", 6e-4, True), ("GatedAnnealTrainer", 3e-4, True), ("JumpReluTrainer", 2e-3, False),
])
def test_default_lr_is_the_long_run_one_scaled_to_the_run(name, long_run_lr, scaled):
    config = {"trainer": name, "activation_dim": 64, "dict_size": 256, **({"k": 4} if "TopK" in name else {})}
    short = build_trainer(config, steps=2**14)
    assert short.lr == pytest.approx(long_run_lr * (2.0 if scaled else 1.0))
    assert short.config["lr"] == short.lr  # recorded resolved
    assert build_trainer(config, steps=2**20).lr == pytest.approx(long_run_lr)  # a long run: the published rate
    assert build_trainer({**config, "lr": 3e-4}, steps=2**14).lr == 3e-4  # a given LR is kept exactly


def test_resume_with_another_length_keeps_the_default_lr_it_started_with():
    config = {"trainer": "StandardTrainer", "activation_dim": 64, "dict_size": 256, "seed": 0}
    started = build_trainer(config, steps=2**14)
    extended = build_trainer(config, steps=2**16)
    assert extended.lr != started.lr
    _check_same_config(0, extended, started.config)
    assert extended.lr == started.lr
    given = build_trainer({**config, "lr": 5e-4}, steps=2**16)
    with pytest.raises(ValueError, match="lr: saved 0.002, now 0.0005"):
        _check_same_config(0, given, started.config)


def test_resumed_jumprelu_run_saved_before_the_pre_activation_loss_keeps_running_without_it():
    config = {"trainer": "JumpReluTrainer", "activation_dim": 8, "dict_size": 16, "seed": 0}
    saved = build_trainer(config, steps=100).config
    del saved["pre_act_penalty"], saved["pre_act_dead_tokens"]
    resumed = build_trainer(config, steps=100)
    assert resumed.cfg.pre_act_penalty == 0.003
    _check_same_config(0, resumed, saved)
    assert resumed.cfg.pre_act_penalty == 0.0 and resumed.cfg.pre_act_dead_tokens == 10_000
