"""trainSAE sweeps (many recipes on one activation stream), input normalisation, and exact resume
of interrupted runs for every recipe."""
import copy
import dataclasses
import json
import os
import sys

import pytest
import torch

from dictionary_learning.trainers import get_trainer_class, trainer_names
from dictionary_learning.trainers.standard import StandardTrainer
from dictionary_learning.training import STATE_FILE, trainSAE
from dictionary_learning.utils import load_dictionary

from lm_fixtures import for_recipe

D, F_ = 8, 32




class Stream:
    """A deterministic, re-iterable activation source (batch i is the same on every pass, so a
    resumed run can fast-forward it). Counts the batches handed out; with `crash_after`, raises
    when asked for more (a simulated crash)."""

    def __init__(self, batches, crash_after=None):
        self.batches, self.crash_after, self.advanced = batches, crash_after, 0

    def __iter__(self):
        for i, batch in enumerate(self.batches):
            if self.crash_after is not None and i >= self.crash_after:
                raise RuntimeError("simulated crash")
            self.advanced += 1
            yield batch


def make_batches(n, batch=32, seed=0):
    """Sparse non-negative combinations of 24 features clustered around one direction: latents
    whose encoder row points away from it never fire, so dead-latent machinery has work to do."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(1 + 0.5 * torch.randn(24, D, generator=g), dim=-1)
    batches = []
    for _ in range(n):
        codes = torch.rand(batch, 24, generator=g) * (torch.rand(batch, 24, generator=g) < 0.15)
        batches.append(codes @ features * 3 + 0.05 * torch.randn(batch, D, generator=g))
    return batches


def recipe_config(name, **overrides):
    """A small dict config for recipe `name` whose run exercises its state: LR warmup and decay,
    sparsity warmup, dead latents (AuxK, resampling), thresholds and p-annealing."""
    fields = {f.name for f in dataclasses.fields(get_trainer_class(name).Config)}
    extras = {"k": 3, "group_sizes": [4, 12, 16], "threshold_start_step": 3, "dead_tokens_threshold": 96,
              "anneal_start": 4, "n_sparsity_updates": 4, "sparsity_queue_length": 2, "resample_steps": 7,
              "sparsity_penalty": 0.05 if name == "JumpReluTrainer" else 0.3}
    config = {"trainer": name, "activation_dim": D, "dict_size": F_, "lr": 1e-2, "warmup_steps": 3,
              "decay_start": 15, "sparsity_warmup_steps": 5, "seed": 1}
    config.update({key: value for key, value in extras.items() if key in fields})
    config.update(overrides)
    return config


def assert_identical(a, b):
    assert type(a) is type(b)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key
    raw_a = dict([*a.named_parameters(), *a.named_buffers()])
    raw_b = dict([*b.named_parameters(), *b.named_buffers()])
    for key in raw_a:
        assert torch.equal(raw_a[key], raw_b[key]), key


# --- sweeps ---------------------------------------------------------------------------------


def test_sweep_trains_three_recipes_on_one_pass_as_if_alone(tmp_path):
    configs = [recipe_config("StandardTrainer", resample_steps=None), recipe_config("TopKTrainer"),
               recipe_config("GatedSAETrainer", resample_steps=None)]
    originals = copy.deepcopy(configs)
    batches = make_batches(10)
    stream = Stream(batches)
    dictionaries = trainSAE(stream, trainer_configs=configs, steps=10, save_dir=tmp_path, log_steps=5,
                            progress=False)
    assert stream.advanced == 10  # one pass over the data feeds every trainer
    assert configs == originals  # the caller's dicts are untouched
    assert [type(d).__name__ for d in dictionaries] == ["AutoEncoder", "AutoEncoderTopK", "GatedAutoEncoder"]
    for i, (config, dictionary) in enumerate(zip(configs, dictionaries)):
        (alone,) = trainSAE(Stream(batches), trainer_configs=[config], steps=10, progress=False)
        assert_identical(dictionary, alone)
        folder = tmp_path / f"trainer_{i}"
        saved = json.loads((folder / "config.json").read_text())
        assert saved["trainer"]["trainer_class"] == config["trainer"]
        assert saved["trainer"]["dict_class"] == type(dictionary).__name__
        logs = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
        assert [entry["step"] for entry in logs] == [1, 5, 10] and all("loss" in entry for entry in logs)
        loaded, _ = load_dictionary(folder, normalize_decoder=False)
        assert_identical(loaded, dictionary)


def test_dataclass_configs_are_not_mutated_and_unknown_keys_list_the_valid_ones():
    config_class = get_trainer_class("TopKTrainer").Config
    config = config_class(activation_dim=D, dict_size=F_, k=3, warmup_steps=2, threshold_start_step=1)
    before = copy.deepcopy(config)
    trainSAE(Stream(make_batches(3)), trainer_configs=[config], steps=3, progress=False)
    assert config == before and config.steps is None

    bad = {**recipe_config("StandardTrainer"), "sparsity_penaltyy": 0.1}
    with pytest.raises(ValueError, match=r"sparsity_penaltyy.*valid keys: .*sparsity_penalty.*resample_steps"):
        trainSAE(Stream(make_batches(1)), trainer_configs=[bad], steps=1, progress=False)
    with pytest.raises(ValueError, match="'trainer' key"):
        trainSAE(Stream(make_batches(1)), trainer_configs=[{"activation_dim": D, "dict_size": F_}], progress=False)
    with pytest.raises(ValueError, match="inside each of trainer_configs"):
        trainSAE(Stream(make_batches(1)), D, trainer_configs=[recipe_config("StandardTrainer")], progress=False)


def test_old_field_names_are_read_as_todays():
    """Saved configs (and the reference library's) call λ l1_penalty or initial_sparsity_penalty."""
    from dictionary_learning.training import build_trainer

    standard = build_trainer({"trainer": "StandardTrainer", "activation_dim": D, "dict_size": F_, "warmup_steps": 1,
                              "l1_penalty": 0.25})
    assert standard.cfg.sparsity_penalty == 0.25 and "l1_penalty" not in standard.config
    annealed = build_trainer({"trainer": "PAnnealTrainer", "activation_dim": D, "dict_size": F_, "warmup_steps": 1,
                              "steps": 20, "anneal_start": 5, "initial_sparsity_penalty": 0.4})
    assert annealed.sparsity_coeff == 0.4
    with pytest.raises(ValueError, match="l1_penalty is the old name of sparsity_penalty"):
        build_trainer({"trainer": "StandardTrainer", "activation_dim": D, "dict_size": F_, "l1_penalty": 0.25,
                       "sparsity_penalty": 0.5})


def test_normalize_activations_folds_the_scale_into_the_saved_weights(tmp_path):
    configs = [recipe_config(name, decay_start=None) for name in ("StandardTrainer", "BatchTopKTrainer", "JumpReluTrainer")]
    batches = [x * 7.0 for x in make_batches(8)]  # far from unit norm
    normalized = trainSAE(Stream(batches), trainer_configs=configs, steps=8, normalize_activations=True,
                          save_dir=tmp_path, progress=False)
    training = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["training"]
    s = training["activation_scale"]
    assert training["norm_factor"] == pytest.approx(1 / s)
    # s from the first NORMALIZATION_BATCHES batches (here all 8) together
    assert (torch.cat(batches) * s).pow(2).sum(-1).mean().item() == pytest.approx(1.0, rel=1e-5)
    # the same recipes trained on s·x without normalisation are the dictionaries before folding
    on_scaled = trainSAE(Stream([x * s for x in batches]), trainer_configs=configs, steps=8, progress=False)
    x = make_batches(1, seed=5)[0] * 7.0
    for i, (folded, trained) in enumerate(zip(normalized, on_scaled)):
        torch.testing.assert_close(folded(x), trained(x * s) / s, rtol=1e-5, atol=1e-5)
        loaded, _ = load_dictionary(tmp_path / f"trainer_{i}", normalize_decoder=False)
        torch.testing.assert_close(loaded(x), folded(x), rtol=0, atol=0)
    assert normalized[1].has_threshold  # the BatchTopK threshold was learned, and scaled with the biases


# --- exact resume ----------------------------------------------------------------------------


def test_resume_standard_with_resampling_and_ghost_grads_is_exact(tmp_path, monkeypatch):
    resampled = []
    original_resample = StandardTrainer.resample_neurons

    def counting_resample(self, dead_mask, x):
        indices = original_resample(self, dead_mask, x)
        resampled.append(len(indices))
        return indices

    monkeypatch.setattr(StandardTrainer, "resample_neurons", counting_resample)
    n1, n2 = 13, 30
    batches = make_batches(n2)
    kwargs = dict(activation_dim=D, dictionary_size=F_, lr=3e-2, sparsity_penalty=0.5, warmup_steps=3,
                  resample_steps=6, ghost_threshold=2, seed=0, log_steps=1, progress=False)
    full = trainSAE(Stream(batches), steps=n2, save_dir=tmp_path / "full", save_steps=[n1], **kwargs)
    assert sum(resampled) > 0  # dead latents were resampled in this run
    full_log = (tmp_path / "full" / "log.jsonl").read_text()
    assert any(json.loads(line).get("n_ghost_latents", 0) > 0 for line in full_log.splitlines())

    trainSAE(Stream(batches), steps=n1, save_dir=tmp_path / "run", save_steps=[n1], **kwargs)  # "interrupted"
    stream = Stream(batches)
    resumed = trainSAE(stream, steps=n2, resume_from=tmp_path / "run", save_steps=[n1], **kwargs)
    assert stream.advanced == n2  # n1 skipped, n2 - n1 trained on
    assert_identical(resumed, full)
    assert_identical(saved_dictionary(tmp_path / "run"), saved_dictionary(tmp_path / "full"))
    assert (tmp_path / "run" / "log.jsonl").read_text() == full_log  # the log continues seamlessly
    assert not list(tmp_path.glob("**/*.tmp"))


def saved_dictionary(folder):
    return load_dictionary(folder, normalize_decoder=False)[0]


@pytest.mark.parametrize("name", trainer_names())
def test_crashed_run_resumes_exactly(tmp_path, name):
    n1, n2 = 11, 24
    batches = for_recipe(get_trainer_class(name), make_batches(n2, seed=2))
    configs = [recipe_config(name)]
    kwargs = dict(trainer_configs=configs, steps=n2, save_steps=[n1], log_steps=2, progress=False)
    full = trainSAE(Stream(batches), save_dir=tmp_path / "full", **kwargs)
    with pytest.raises(RuntimeError, match="simulated crash"):
        trainSAE(Stream(batches, crash_after=n1 + 3), save_dir=tmp_path / "run", **kwargs)
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=False)
    assert state["steps_done"] == n1
    resumed = trainSAE(Stream(batches), resume_from=tmp_path / "run", **kwargs)
    for a, b in zip(resumed, full):
        assert_identical(a, b)
    # the crashed run logged past n1; the resumed log drops those lines and continues
    assert (tmp_path / "run/trainer_0/log.jsonl").read_text() == (tmp_path / "full/trainer_0/log.jsonl").read_text()
    for sub in ("trainer_0/ae.pt", f"trainer_0/checkpoints/ae_{n1}.pt"):
        a = torch.load(tmp_path / "run" / sub)
        b = torch.load(tmp_path / "full" / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads file names from /proc/self/fd")
def test_state_and_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    batches = make_batches(12, seed=3)
    kwargs = dict(trainer_configs=[recipe_config("StandardTrainer")], steps=12, log_steps=1, progress=False)
    full = trainSAE(Stream(batches), **kwargs)

    real_save = torch.save
    written = []

    def failing_save(obj, f, *args, **kwargs):
        """torch.save that records where it writes and dies half-way through the state at step 8."""
        written.append(os.readlink(f"/proc/self/fd/{f.fileno()}") if hasattr(f, "fileno") else str(f))
        if isinstance(obj, dict) and obj.get("steps_done") == 8:
            f.write(b"half a checkpoint")
            raise OSError("disk full")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        trainSAE(Stream(batches), save_dir=tmp_path, save_steps=[4, 8], **kwargs)
    monkeypatch.setattr(torch, "save", real_save)
    # every write went to a temporary file next to its target, never to the target itself
    assert len(written) >= 4 and all(w.endswith(".tmp") for w in written), written
    assert not list(tmp_path.glob("**/*.tmp"))
    assert torch.load(tmp_path / STATE_FILE, weights_only=False)["steps_done"] == 4  # the previous state survives
    assert (tmp_path / "trainer_0" / "checkpoints" / "ae_4.pt").exists()
    (resumed,) = trainSAE(Stream(batches), resume_from=tmp_path, save_steps=[4, 8], **kwargs)
    assert_identical(resumed, full[0])
    logged = [json.loads(line)["step"] for line in (tmp_path / "trainer_0" / "log.jsonl").read_text().splitlines()]
    assert logged == list(range(1, 13))


def test_resume_refuses_other_configs_and_missing_state(tmp_path):
    batches = make_batches(6)
    trainSAE(Stream(batches), trainer_configs=[recipe_config("StandardTrainer")], steps=4, save_dir=tmp_path,
             save_steps=[4], progress=False)
    with pytest.raises(ValueError, match=r"sparsity_penalty: saved 0.3, now 0.2"):
        trainSAE(Stream(batches), trainer_configs=[recipe_config("StandardTrainer", sparsity_penalty=0.2)], steps=6,
                 resume_from=tmp_path, progress=False)
    with pytest.raises(ValueError, match="holds 1 trainers but 2"):
        trainSAE(Stream(batches), trainer_configs=[recipe_config("StandardTrainer")] * 2, steps=6,
                 resume_from=tmp_path, progress=False)
    with pytest.raises(ValueError, match="data ran out"):
        trainSAE(Stream(batches[:2]), trainer_configs=[recipe_config("StandardTrainer")], steps=6,
                 resume_from=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="save_steps"):
        trainSAE(Stream(batches), trainer_configs=[recipe_config("StandardTrainer")], steps=6,
                 resume_from=tmp_path / "trainer_0", progress=False)


def test_resume_restores_dictionary_tensors_bit_for_bit(tmp_path):
    """The training state holds every trained tensor as it is: JumpReLU's θ even where log θ would
    not round-trip through exp (as it did not when θ was stored as log θ)."""
    name = "JumpReluTrainer"
    from dictionary_learning.runs import Checkpointer
    from dictionary_learning.training import build_trainer

    trainer = build_trainer(recipe_config(name), steps=10)
    candidates = torch.randn(20000, generator=torch.Generator().manual_seed(0)) * 2 - 5
    lossy = candidates[candidates.exp().log() != candidates][:F_].exp()
    assert len(lossy) == F_
    with torch.no_grad():
        trainer.ae.threshold.copy_(lossy)
    Checkpointer(tmp_path / STATE_FILE).save([trainer], 5, None)
    fresh = build_trainer(recipe_config(name), steps=10)
    assert Checkpointer(tmp_path / STATE_FILE).load([fresh])[0] == 5
    assert torch.equal(fresh.ae.threshold, lossy)
    assert_identical(fresh.ae, trainer.ae)


def test_resume_never_runs_code_from_the_state_file(tmp_path):
    """training_state.pt is read with weights_only=True: a shared run folder whose state file
    carries a pickled call does not get it executed."""
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    torch.save({"format": 2, "steps_done": 1, "trainers": [Payload()]}, tmp_path / STATE_FILE)
    with pytest.raises(ValueError, match="could not read"):
        trainSAE(Stream(make_batches(4)), trainer_configs=[recipe_config("StandardTrainer")], steps=4,
                 resume_from=tmp_path, progress=False)
    assert not marker.exists()
