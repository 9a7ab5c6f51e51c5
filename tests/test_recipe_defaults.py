"""Every recipe learns at its defaults: with only activation_dim, dict_size and its sparsity target
given (and inputs normalised to E‖x‖² = 1, the scale the defaults are stated for), a short CPU run on
hierarchical synthetic ground truth reaches the target L0 and explains most of the variance, and its
decoder matches the true features better than the random dictionary it started from. Defaults that
depend on the run's length (LR warmup, JumpReLU's λ warmup, p-annealing's start) are resolved into
the recorded config; values the user gives are kept exactly."""
import pytest

from dictionary_learning import HierarchicalActivations, ground_truth_scores, trainSAE
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
    # JumpReLU's target is the soft penalty λ (L0/T − 1)², which settles above T; the others' λ is steered to T
    assert 0.5 * TARGET <= trained["l0"] <= (1.6 if name == "JumpReluTrainer" else 1.25) * TARGET, trained
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
