"""Training under torchrun (distributed.py), 2 ranks (gloo, CPU): with half the rows each, every
recipe trains as one process does on the whole batches; only rank 0 writes; a killed rank stops the
other with a clear error within a bounded time; the run resumes under torchrun; with
distribute_sites, each site's trainers train on one rank exactly as in one process.

One module fixture makes the runs of tests/distributed_worker.py (20 steps of 64 rows, a
checkpoint at step 10):
  1. one process, whole batches, here: every recipe of the registry, then the four-site sweep;
  2. two ranks started by hand (RANK, WORLD_SIZE, MASTER_ADDR as torchrun sets them, no agent)
     on every recipe: rank 1 kills itself (SIGKILL) when asking for batch 15;
  3. `python -m torch.distributed.run --nproc_per_node 2` resuming run 2 from its step-10 state,
     then (trainSAE reusing the group the first call created) the four-site sweep with
     distribute_sites=True.
"""
import functools
import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dictionary_learning import distributed
from dictionary_learning.training import STATE_FILE

WORKER_PATH = Path(__file__).with_name("distributed_worker.py")
KILL_TIMEOUT_S = 20
TOLERANCE = 1e-5
"""max |a − b| ≤ TOLERANCE · max(1, max |a|) for every float tensor of the two runs' states. The
runs add the same gradient contributions in another order (each rank's partial sum over its rows,
then the all-reduce, against one BLAS reduction over all rows), so they differ by float32 rounding,
~1e-7 relative per step; 20 to 30 Adam steps leave them up to ~5e-7 apart."""
ANNEALED_TOLERANCE = 1e-4
"""The same for the p-annealing recipes, whose penalty's gradient p·f^(p−1) (p down to 0.8 here)
amplifies rounding for features near 0: their last gradients (GatedAnneal's Adam has β1 = 0, so
its exp_avg is the last gradient) differ by up to ~6e-5 relative; one-process runs on inputs 1e-7
apart differ as much."""


@functools.cache
def load_worker():
    spec = importlib.util.spec_from_file_location("distributed_worker", WORKER_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_ranks(out: Path, *arguments: str, timeout: float = KILL_TIMEOUT_S) -> list[subprocess.Popen]:
    """The worker on 2 ranks started by hand, as torchrun would set them up but with no agent (so
    that nothing but our code stops a rank whose partner is gone)."""
    env = {**os.environ, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "OMP_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, str(WORKER_PATH), str(out), *arguments, "--timeout", str(timeout)],
                             env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in (0, 1)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    worker = load_worker()
    root = tmp_path_factory.mktemp("distributed")
    single = root / "single"
    single.mkdir()
    returned = worker.train(single, worker.global_batches(20), 20)
    single_sites = root / "single_sites"
    single_sites.mkdir()
    worker.train_sites(single_sites, worker.site_batches(20), 20)

    killed = root / "two_ranks"
    ranks = start_ranks(killed, "--kill-rank", "1", "--kill-at", "15")
    outputs = [rank.communicate(timeout=300) for rank in ranks]
    rank_0_ended = time.time()
    killed_run = {"codes": [rank.returncode for rank in ranks], "stderr": outputs[0][1],
                  "writes": json.loads((killed / "writes_1.json").read_text()),
                  "seconds_to_stop": rank_0_ended - float((killed / "killed_at").read_text()),
                  "log": (killed / "run" / "trainer_0" / "log.jsonl").read_text()}

    resumed = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                              str(WORKER_PATH), str(killed), "--resume", "--sites", str(root / "sites")],
                             capture_output=True, text=True, timeout=300,
                             env={k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE")})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-6000:]
    return {"single": single, "returned": returned, "two": killed, "killed": killed_run,
            "single_sites": single_sites, "sites": root / "sites"}


def flat_state(state, prefix=""):
    """{path: leaf} of a nested training state."""
    if isinstance(state, dict):
        return {k: v for key, value in state.items() for k, v in flat_state(value, f"{prefix}/{key}").items()}
    if isinstance(state, (list, tuple)):
        return {k: v for i, value in enumerate(state) for k, v in flat_state(value, f"{prefix}/{i}").items()}
    return {prefix: state}


def test_two_ranks_with_half_the_rows_train_every_recipe_as_one_process(runs):
    one = torch.load(runs["single"] / "run" / STATE_FILE, weights_only=True)
    two = torch.load(runs["two"] / "run" / STATE_FILE, weights_only=True)
    assert one["steps_done"] == two["steps_done"] == 20
    for stream, scale in one["activation_scale"].items():  # normalize_activations' E‖x‖² over both ranks' rows
        assert two["activation_scale"][stream] == pytest.approx(scale, rel=1e-12)
    recipes = [config["trainer_class"] for config in one["configs"]]
    assert set(recipes) == set(load_worker().trainer_names())
    for recipe, a, b in zip(recipes, one["trainers"], two["trainers"]):
        tolerance = ANNEALED_TOLERANCE if "Anneal" in recipe else TOLERANCE
        a, b = flat_state(a), flat_state(b)
        assert a.keys() == b.keys(), recipe
        for key, value in a.items():
            other = b[key]
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                bound = tolerance * max(1.0, float(value.abs().max())) if value.numel() else 0
                assert float((value - other).abs().max() if value.numel() else 0) <= bound, (recipe, key)
            elif isinstance(value, torch.Tensor):  # dead-latent counters, Adam's steps, generator states
                assert torch.equal(value, other), (recipe, key)
            elif isinstance(value, float):
                assert other == pytest.approx(value, rel=tolerance, abs=tolerance), (recipe, key)
            else:
                assert value == other, (recipe, key)
    # the recipes' own batch-wide state is really at work and equal
    for recipe, a, b in zip(recipes, one["trainers"], two["trainers"]):
        if recipe in ("BatchTopKTrainer", "MatryoshkaBatchTopKTrainer", "TopKTrainer"):
            assert float(a["ae"]["threshold"]) > 0
            assert float(b["ae"]["threshold"]) == pytest.approx(float(a["ae"]["threshold"]), rel=1e-5)
        assert torch.equal(a["dead_tracker"]["tokens_since_fired"], b["dead_tracker"]["tokens_since_fired"]), recipe
    # every rank returns the same dictionaries, those of the one-process run in raw activation space
    rank_0, rank_1 = (torch.load(runs["two"] / f"returned_{r}.pt", weights_only=True) for r in (0, 1))
    for single, a, b in zip(runs["returned"], rank_0, rank_1):
        for key, value in a.items():
            assert torch.equal(value, b[key]), key
            reference = single.state_dict()[key]
            if value.is_floating_point():
                assert float((value - reference).abs().max()) <= TOLERANCE * max(1.0, float(reference.abs().max()))


def test_only_rank_0_writes_and_writes_each_file_once(runs):
    assert runs["killed"]["writes"] == []  # rank 1 of the killed run
    assert json.loads((runs["two"] / "writes_1.json").read_text()) == []  # rank 1 of the resumed run
    writes = json.loads((runs["two"] / "writes_0.json").read_text())
    run = runs["two"] / "run"
    n_trainers = len(load_worker().recipe_configs())
    finals = [w for w in writes if w.endswith("ae.pt")]
    assert sorted(finals) == sorted(str(run / f"trainer_{i}" / "ae.pt") for i in range(n_trainers))
    assert writes.count(str(run / STATE_FILE)) == 1  # the final state (the step-10 one came from the killed run)
    assert not [w for w in writes if "checkpoints" in w]  # ae_10.pt was written by the killed run, not again
    for i in range(n_trainers):
        assert (run / f"trainer_{i}" / "checkpoints" / "ae_10.pt").exists()
        steps = [json.loads(line)["step"] for line in (run / f"trainer_{i}" / "log.jsonl").read_text().splitlines()]
        assert steps == [1, 5, 10, 15, 20]  # one line per logged step: no rank logs twice
    assert not list(run.glob("**/*.tmp*"))


def test_a_killed_rank_stops_the_other_with_a_clear_error_in_bounded_time(runs):
    killed = runs["killed"]
    assert killed["codes"][1] == -9
    assert killed["codes"][0] not in (0, -9)
    assert "lost contact with the other ranks after 15 steps" in killed["stderr"]
    assert f"the last state saved is that of step 10: resume with resume_from='{runs['two'] / 'run'}'" in killed[
        "stderr"]
    assert killed["seconds_to_stop"] < KILL_TIMEOUT_S
    assert [json.loads(line)["step"] for line in killed["log"].splitlines()] == [1, 5, 10, 15]


def test_one_process_never_touches_torch_distributed(monkeypatch):
    from dictionary_learning.training import trainSAE

    for name in ("init_process_group", "all_reduce", "all_gather", "all_gather_object"):
        monkeypatch.setattr(torch.distributed, name, lambda *a, **k: pytest.fail("a torch.distributed call"))
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert not distributed.launched() and not distributed.world_replicas().distributed
    batches = [torch.randn(16, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    trainSAE(batches, trainer_configs=[{"trainer": "BatchTopKTrainer", "activation_dim": 8, "dict_size": 16, "k": 2,
                                        "warmup_steps": 1, "threshold_start_step": 1, "seed": 0}], steps=3,
             progress=False)


def test_rank_shard_deals_items_round_robin():
    assert list(distributed.rank_shard(range(7), rank=1, world_size=3)) == [1, 4]
    assert list(distributed.rank_shard("abcd", rank=0, world_size=2)) == ["a", "c"]
    with pytest.raises(ValueError, match=r"rank must be in \[0, world_size=2\)"):
        list(distributed.rank_shard([], rank=2, world_size=2))


def test_sites_spread_over_ranks_train_each_trainer_exactly_as_one_process(runs):
    one = torch.load(runs["single_sites"] / "run" / STATE_FILE, weights_only=True)
    two = torch.load(runs["sites"] / "run" / STATE_FILE, weights_only=True)
    # the owner steps on its site's global batch, brought by the all-to-all: the same computation
    for index, (a, b) in enumerate(zip(one["trainers"], two["trainers"])):
        a, b = flat_state(a), flat_state(b)
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]) if isinstance(value, torch.Tensor) else value == b[key], (index, key)
    # sites by cost (Σ dict_size): s0 (two trainers) to rank 0, s1 and s2 to rank 1, s3 to rank 0
    rank_0, rank_1 = (torch.load(runs["sites"] / f"returned_{r}.pt", weights_only=True) for r in (0, 1))
    assert [d is None for d in rank_1] == [True, True, False, False, True]
    for index, trained in enumerate(one["trainers"]):
        for returned in (rank_0[index], rank_1[index]):
            if returned is not None:
                assert all(torch.equal(value, trained["ae"][key]) for key, value in returned.items()), index
    assert json.loads((runs["sites"] / "writes_1.json").read_text()) == []
    assert (runs["sites"] / "run" / "trainer_4" / "checkpoints" / "ae_10.pt").exists()
    logged = [json.loads(line) for line in (runs["sites"] / "run" / "trainer_2" / "log.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (runs["single_sites"] / "run" / "trainer_2" / "log.jsonl").read_text(
        ).splitlines()]
    assert logged == expected  # rank 0 logs the metrics of rank 1's trainers


def test_site_plan_balances_the_cost_of_the_sites():
    class TwoRanks:  # a Replicas stand-in: the plan only reads rank and size
        rank, size = 1, 2

    plan = distributed.SitePlan({"a": 64, "b": 32, "c": 32, "d": 96}, TwoRanks())
    assert plan.owner == {"d": 0, "a": 1, "b": 1, "c": 0}
    assert plan.sites_of == [["c", "d"], ["a", "b"]] and plan.owns("a") and not plan.owns("d")


def test_a_rank_that_cannot_start_stops_every_rank_before_training(tmp_path):
    ranks = start_ranks(tmp_path, "--empty-rank", "1")
    (_, rank_0), (_, rank_1) = (rank.communicate(timeout=300) for rank in ranks)
    assert [rank.returncode for rank in ranks] == [1, 1]
    assert "ValueError: activations yielded no batches: the data iterator is empty" in rank_1
    assert ("RuntimeError: trainSAE: rank 1 of 2 could not start the run (ValueError: activations yielded no "
            "batches: the data iterator is empty); every rank stops") in rank_0
    assert not (tmp_path / "run" / STATE_FILE).exists() and not (tmp_path / "run" / "trainer_0").exists()
