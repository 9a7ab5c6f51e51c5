"""Data-parallel training steps: time per step, tokens/s, and the share of a step spent in
communication, one process against several ranks (distributed.py, torch.distributed).

    python benchmarks/distributed.py [--quick] [--trainers NAME...] [--out results.json]       # CPU, gloo
    python benchmarks/distributed.py --device cuda --ranks 8 [--out results.json]             # GPUs, NCCL

CPU (the default): the same global batch of B rows per step in three layouts, each in a fresh
process (group):

  1 rank x 1 thread    one process, torch on 1 thread, the whole batch;
  1 rank x 2 threads   one process, torch on 2 threads, the whole batch;
  2 ranks x 1 thread   torchrun --nproc_per_node 2 (gloo), each rank 1 thread and B/2 rows; the ranks'
                       gradients and batch statistics are reduced every step (Replicas).

On 2 cores the last two use the same hardware, so no speed-up is possible: the comparison shows
what data parallelism costs (communication through gloo's loopback TCP, and ranks waiting for
each other) against intra-op threads. `comm ms` is the time a rank spends inside torch.distributed
collectives per step (timed by wrapping them; asynchronous ones are made synchronous for timing),
which includes waiting for the slower rank; `comm %` is its share of the step.

GPU (`--device cuda`): 1 rank against `--ranks` N ranks (NCCL), each with B rows per step (the global
batch grows with N, as data-parallel training is used), and the scaling efficiency
tokens/s(N ranks) / (N × tokens/s(1 rank)).

Every step is `trainer.update` on in-memory synthetic activations (sparse non-negative mixtures),
after `--warmup` untimed steps; medians over `--steps` timed steps of rank 0 (the ranks step in
lockstep).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import _common


def synthetic_batches(n: int, rows: int, activation_dim: int, seed: int) -> list[torch.Tensor]:
    """`n` batches of sparse non-negative mixtures of 4·D unit directions (about 8 active per row)."""
    g = torch.Generator().manual_seed(seed)
    features = torch.nn.functional.normalize(torch.randn(4 * activation_dim, activation_dim, generator=g), dim=-1)
    batches = []
    for _ in range(n):
        active = torch.rand(rows, 4 * activation_dim, generator=g) < 8 / (4 * activation_dim)
        batches.append((torch.rand(rows, 4 * activation_dim, generator=g) * active) @ features)
    return batches


class CollectiveClock:
    """Seconds spent inside torch.distributed collectives (each made synchronous while timed)."""

    NAMES = ("all_reduce", "all_gather", "all_gather_object", "all_to_all_single", "gather_object")

    def __init__(self, dist):
        self.seconds = 0.0
        for name in self.NAMES:
            setattr(dist, name, self._timed(getattr(dist, name)))

    def _timed(self, collective):
        def timed(*args, **kwargs):
            synchronous = kwargs.pop("async_op", False)
            start = time.perf_counter()
            collective(*args, **kwargs)
            if torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.synchronize()
            self.seconds += time.perf_counter() - start
            return _Done() if synchronous else None

        return timed


class _Done:
    def wait(self):
        return True


def worker(args) -> dict:
    """One layout's measurement in this process (a rank of torchrun's, or the only process)."""
    _common.set_threads(args.threads)
    _common.import_library()
    import torch.distributed as dist

    from dictionary_learning.distributed import init_process_group, world_replicas
    from dictionary_learning.training import build_trainer

    init_process_group()
    replicas = world_replicas()
    clock = CollectiveClock(dist) if replicas.distributed else None
    rows = args.batch_size // replicas.size if args.device == "cpu" else args.batch_size
    device = "cuda" if args.device == "cuda" else "cpu"
    results = {}
    for name in args.trainers:
        config = {"trainer": name, "activation_dim": args.activation_dim, "dict_size": args.dict_size,
                  "warmup_steps": 1, "seed": args.seed, "device": device}
        if "TopK" in name:
            config.update(k=args.k, threshold_start_step=0)
        trainer = build_trainer(config, steps=10_000)
        trainer.replicas = replicas
        batches = [x.to(device) for x in synthetic_batches(4, rows, args.activation_dim, args.seed + 1 + replicas.rank)]
        times, comm = [], []
        for step in range(args.warmup + args.steps):
            if clock is not None:
                clock.seconds = 0.0
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainer.update(step, batches[step % len(batches)])
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
                comm.append(clock.seconds if clock is not None else 0.0)
        step_ms = sorted(times)[len(times) // 2] * 1e3
        results[name] = {"step_ms": step_ms, "comm_ms": sorted(comm)[len(comm) // 2] * 1e3,
                         "tokens_per_s": rows * replicas.size / (step_ms / 1e3), "rows_per_rank": rows,
                         "step_samples_ms": [t * 1e3 for t in times]}
    if replicas.distributed:
        dist.destroy_process_group()
    return results


def run_layout(args, ranks: int, threads: int) -> dict:
    """The worker in a fresh process (ranks = 1) or under torchrun (ranks > 1); rank 0's results."""
    with tempfile.TemporaryDirectory(prefix="dl_bench_distributed_") as tmp:
        out = Path(tmp) / "result.json"
        command = [str(Path(__file__).resolve()), "--worker", str(out), "--threads", str(threads), "--device", args.device,
                   "--batch-size", str(args.batch_size), "--activation-dim", str(args.activation_dim),
                   "--dict-size", str(args.dict_size), "--k", str(args.k), "--warmup", str(args.warmup),
                   "--steps", str(args.steps), "--seed", str(args.seed), "--trainers", *args.trainers]
        if ranks > 1:
            command = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *command]
        env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        env["OMP_NUM_THREADS"] = str(threads)
        done = subprocess.run([sys.executable, *command], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"the {ranks}-rank layout failed:\n{done.stderr[-4000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="+", default=["TopKTrainer", "BatchTopKTrainer", "StandardTrainer"])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--ranks", type=int, default=2, help="ranks of the multi-rank layout (default 2)")
    parser.add_argument("--batch-size", type=int, default=None, help="global rows per step on CPU, per rank on GPUs")
    parser.add_argument("--activation-dim", type=int, default=None)
    parser.add_argument("--dict-size", type=int, default=None)
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--worker", type=Path, default=None, help="(internal) measure here, write JSON there")
    args = parser.parse_args()
    large = not args.quick
    args.batch_size = args.batch_size or (4096 if large else 512)
    args.activation_dim = args.activation_dim or (512 if large else 64)
    args.dict_size = args.dict_size or (8192 if large else 1024)
    args.steps = args.steps or (15 if large else 5)
    if args.worker is not None:
        results = worker(args)
        if int(os.environ.get("RANK", "0")) == 0:
            args.worker.write_text(json.dumps(results))
        return
    _common.import_library()
    args.trainers = _common.our_trainer_names(args.trainers)
    if args.device == "cpu":
        layouts = [("1 rank x 1 thread", 1, 1), ("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1)]
    else:
        if not torch.cuda.is_available() or torch.cuda.device_count() < args.ranks:
            raise SystemExit(f"--device cuda --ranks {args.ranks} needs {args.ranks} GPUs; "
                             f"{torch.cuda.device_count() if torch.cuda.is_available() else 0} found")
        layouts = [("1 GPU", 1, args.threads), (f"{args.ranks} GPUs", args.ranks, args.threads)]
    measured = {label: run_layout(args, ranks, threads) for label, ranks, threads in layouts}
    rows = []
    for name in args.trainers:
        single = measured[layouts[0][0]][name]
        for label, ranks, _threads in layouts:
            result = measured[label][name]
            row = {"trainer": name, "layout": label, "rows/rank": result["rows_per_rank"],
                   "step ms": result["step_ms"], "tokens/s": result["tokens_per_s"],
                   "comm ms": result["comm_ms"] if ranks > 1 else None,
                   "comm %": 100 * result["comm_ms"] / result["step_ms"] if ranks > 1 else None}
            if args.device == "cuda" and ranks > 1:
                row["efficiency"] = result["tokens_per_s"] / (ranks * single["tokens_per_s"])
            rows.append(row)
    columns = ["trainer", "layout", "rows/rank", "step ms", "tokens/s", "comm ms", "comm %"]
    if args.device == "cuda":
        columns.append("efficiency")
    title = (f"D={args.activation_dim} F={args.dict_size} k={args.k}, "
             f"{'global' if args.device == 'cpu' else 'per-rank'} batch {args.batch_size}, {args.device}")
    table = _common.print_table(rows, columns, title=title)
    _common.write_json(args.out, {"machine": _common.machine_info(args.threads), "config": vars(args) | {
        "out": str(args.out), "worker": None}, "rows": rows, "raw": measured, "table": table})


if __name__ == "__main__":
    main()
