"""The training run of tests/test_distributed.py, on any number of ranks.

    python -m torch.distributed.run --nproc_per_node 2 tests/distributed_worker.py OUT [--steps N] ...
    python tests/distributed_worker.py OUT            (one process: the same global batches whole)

Every recipe of the registry trains on one stream of global batches of GLOBAL_BATCH rows; rank r
of R takes rows [r·B/R, (r+1)·B/R) of each, so the R-rank run and the one-process run see the same
rows in the same order. SAE recipes read the site "sae", transcoders
the pairs of the site "tc". Each rank saves what trainSAE returned to OUT/returned_<rank>.pt and
counts the files it wrote in OUT/writes_<rank>.json; `--kill-rank r --kill-at s` makes rank r
kill itself with SIGKILL when it asks for batch s; `--empty-rank r` gives rank r no data.

`--sites DIR`: then also the distribute_sites run into DIR (trainSAE reuses the ranks' group): five
trainers on four sites of different widths (one of them (input, output) pairs), each site
trained by one rank.
"""
import argparse
import dataclasses
import faulthandler
import json
import os
import runpy
import signal
import sys
import time
from datetime import timedelta
from pathlib import Path

runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "_checkout.py"))["import_checkout"]()

import torch  # noqa: E402

from dictionary_learning import runs  # noqa: E402
from dictionary_learning.trainers import get_trainer_class, trainer_names  # noqa: E402
from dictionary_learning.training import trainSAE  # noqa: E402

D, F_, GLOBAL_BATCH = 8, 32, 64


def recipe_configs() -> list[dict]:
    """Every recipe, small, with the state that must be reduced across ranks at work: dead latents
    (AuxK, resampling, ghost grads), thresholds from step 3, p-annealing's λ rescaling, target_l0
    (the L0 controller, JumpReLU's (L0/T − 1)² penalty), LR and sparsity warmups and decays.

    p-annealing stops at p = 0.8: towards p = 0.2 the penalty's gradient p·f^(p−1) at features near 0
    amplifies rounding so much that two one-process runs on inputs differing by 1e-7 (relative)
    already end 1e-4 (PAnneal) to 3e-2 (GatedAnneal) apart, and no float tolerance separates a
    bug from rounding there. For the same reason GatedAnneal keeps the tied init W_gate = W_decᵀ
    (init_encoder_scale 1): from its default 0.1 · W_decᵀ, whose gate weights are 10× smaller at
    this LR, its β1 = 0 Adam leaves the two runs' gate biases 2e-4 apart."""
    configs = []
    variants = [(name, {}) for name in trainer_names()]
    variants += [("StandardTrainer", {"ghost_threshold": 4, "resample_steps": None, "target_l0": 4.0}),
                 ("JumpReluTrainer", {"target_l0": 4.0})]
    for name, overrides in variants:
        fields = {f.name for f in dataclasses.fields(get_trainer_class(name).Config)}
        extras = {"k": 3, "group_sizes": [4, 12, 16], "threshold_start_step": 3, "dead_tokens_threshold": 192,
                  "anneal_start": 4, "n_sparsity_updates": 4, "p_end": 0.8, "sparsity_queue_length": 2, "resample_steps": 7,
                  "sparsity_penalty": 0.05 if "JumpRelu" in name else 0.3, "skip": True}
        config = {"trainer": name, "activation_dim": D, "dict_size": F_, "lr": 1e-2, "warmup_steps": 3,
                  "decay_start": 15, "sparsity_warmup_steps": 5, "seed": 1,
                  "site": "tc" if "Transcoder" in name else "sae"}
        config.update({key: value for key, value in extras.items() if key in fields})
        if name == "GatedAnnealTrainer":
            config["init_encoder_scale"] = 1.0
        config.update(overrides)
        configs.append(config)
    return configs


def global_batches(n: int, seed: int = 0) -> list[dict]:
    """Sparse non-negative combinations of 24 features around one direction (so that some latents
    never fire), and for the transcoders (x, x M + noise) pairs."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(1 + 0.5 * torch.randn(24, D, generator=g), dim=-1)
    mix = torch.randn(D, D, generator=g) / D**0.5
    batches = []
    for _ in range(n):
        codes = torch.rand(GLOBAL_BATCH, 24, generator=g) * (torch.rand(GLOBAL_BATCH, 24, generator=g) < 0.15)
        x = codes @ features * 3 + 0.05 * torch.randn(GLOBAL_BATCH, D, generator=g)
        x_in = torch.randn(GLOBAL_BATCH, D, generator=g)
        batches.append({"sae": x, "tc": (x_in, x_in @ mix + 0.05 * torch.randn(GLOBAL_BATCH, D, generator=g))})
    return batches


SITE_WIDTHS = {"s0": 8, "s1": 12, "s2": 6, "s3": (8, 5)}


def site_configs() -> list[dict]:
    """Five trainers on four sites: two on s0 (so that s0 costs most), a transcoder on the pairs of s3."""
    common = {"dict_size": 32, "lr": 1e-2, "warmup_steps": 3, "seed": 2}
    return [{"trainer": "TopKTrainer", "site": "s0", "activation_dim": 8, "k": 3, "threshold_start_step": 3,
             "dead_tokens_threshold": 192, **common},
            {"trainer": "StandardTrainer", "site": "s0", "activation_dim": 8, "resample_steps": 7, **common},
            {"trainer": "BatchTopKTrainer", "site": "s1", "activation_dim": 12, "k": 3, "threshold_start_step": 3,
             **common},
            {"trainer": "GatedSAETrainer", "site": "s2", "activation_dim": 6, **common},
            {"trainer": "JumpReluTranscoderTrainer", "site": "s3", "activation_dim": 8, "output_dim": 5,
             "sparsity_warmup_steps": 5, **common}]


def site_batches(n: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        batch = {}
        for site, width in SITE_WIDTHS.items():
            if isinstance(width, tuple):
                batch[site] = tuple(torch.randn(GLOBAL_BATCH, w, generator=g) for w in width)
            else:
                batch[site] = torch.relu(torch.randn(GLOBAL_BATCH, width, generator=g)) + 0.1
        batches.append(batch)
    return batches


def rows_of_rank(batch: dict, rank: int, world_size: int) -> dict:
    share = GLOBAL_BATCH // world_size
    part = slice(rank * share, (rank + 1) * share)
    return {site: tuple(t[part] for t in value) if isinstance(value, tuple) else value[part]
            for site, value in batch.items()}


def train(out: Path, data, steps: int, resume: bool = False):
    """The run of every test: all recipes, a checkpoint at step 10, normalised activations."""
    save_dir = out / "run"
    return trainSAE(data, trainer_configs=recipe_configs(), steps=steps, save_dir=save_dir, save_steps=[10],
                    log_steps=5, normalize_activations=True, progress=False,
                    resume_from=save_dir if resume else None)


def train_sites(out: Path, data, steps: int):
    """The distribute_sites run (in one process, distribute_sites changes nothing)."""
    return trainSAE(data, trainer_configs=site_configs(), steps=steps, save_dir=out / "run", save_steps=[10],
                    log_steps=5, progress=False, distribute_sites=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--sites", type=Path, default=None)
    parser.add_argument("--kill-rank", type=int, default=None)
    parser.add_argument("--kill-at", type=int, default=None)
    parser.add_argument("--empty-rank", type=int, default=None, help="this rank's data yields no batch")
    parser.add_argument("--deadline", type=float, default=240.0,
                        help="print every thread's stack and exit after this many seconds (a hang)")
    parser.add_argument("--timeout", type=float, default=None,
                        help="join the ranks here with this timeout (s); without, trainSAE joins them")
    args = parser.parse_args()
    faulthandler.dump_traceback_later(args.deadline, exit=True)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rank, world_size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if args.timeout is not None:
        torch.distributed.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))

    writes = []
    for name in ("atomic_torch_save", "atomic_write_json", "atomic_write"):
        def counted(*a, _original=getattr(runs, name), **k):
            writes.append(str(a[1]))
            return _original(*a, **k)

        setattr(runs, name, counted)

    def data(batches):
        if rank == args.empty_rank:
            return
        for step, batch in enumerate(batches):
            if rank == args.kill_rank and step == args.kill_at:
                (out / "killed_at").write_text(str(time.time()))
                (out / f"writes_{rank}.json").write_text(json.dumps(writes))
                os.kill(os.getpid(), signal.SIGKILL)
            yield rows_of_rank(batch, rank, world_size)

    dictionaries = train(out, data(global_batches(args.steps)), args.steps, args.resume)
    torch.save([d.state_dict() for d in dictionaries], out / f"returned_{rank}.pt")
    (out / f"writes_{rank}.json").write_text(json.dumps(writes))
    if args.sites is not None:
        before = len(writes)
        dictionaries = train_sites(args.sites, data(site_batches(args.steps)), args.steps)
        torch.save([d.state_dict() if d is not None else None for d in dictionaries],
                   args.sites / f"returned_{rank}.pt")
        (args.sites / f"writes_{rank}.json").write_text(json.dumps(writes[before:]))
    if args.timeout is not None:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
