"""Median ms per training step of every trainer, as a multiple of the dense-matmul floor.

    python benchmarks/train_step.py [--reference] [--quick] [--threads 2] [--out results.json]

For each recipe in `dictionary_learning.trainers.trainer_names()`, at
(D=512, F=8192, B=4096) and (D=128, F=2048, B=1024) (k=32 for the TopK family), on in-memory
float32 activations: steady-state step time (after `--warmup` steps, thresholds running; JumpReLU's
θ settled so that L0 = its target_l0 = 32, `_common.settle_jumprelu_thresholds`; the gated recipes
both from init, where half the gates are open, and with b_gate settled so that L0 = 32), timed
in blocks alternating with the six dense matmuls of one SAE step at the same shapes (the floor
for a dense step, see `_common.dense_floor`), and the step time ÷ that floor. With --reference,
the same on saprmarks/dictionary_learning 0.1.0 in its own virtualenv (same batches, seed,
hyperparameters and threads), and the ratio of the two.
"""
from __future__ import annotations


import torch

import _common

SIZES = [
    {"name": "large", "activation_dim": 512, "dict_size": 8192, "batch_size": 4096},
    {"name": "small", "activation_dim": 128, "dict_size": 2048, "batch_size": 1024},
]
QUICK_SIZES = [
    {"name": "quick", "activation_dim": 64, "dict_size": 512, "batch_size": 256},
]
GATED = ("GatedSAETrainer", "GatedAnnealTrainer")
GATE_L0 = 32  # the gated recipes are timed twice: 5 steps from init (half the gates open) and settled here
N_BATCHES = 4  # distinct batches cycled through (a step never sees the same batch twice in a row)


def make_batches(size: dict, seed: int) -> torch.Tensor:
    """[N_BATCHES, B, D] float32: synthetic sparse activations (synthetic.py), so that features fire
    as they do on real data."""
    D, B = size["activation_dim"], size["batch_size"]
    from dictionary_learning.synthetic import SyntheticActivations

    stream = SyntheticActivations(activation_dim=D, n_features=4 * D, mean_active=20.0, noise_std=0.05,
                                  bias_norm=1.0, batch_size=B, seed=seed)
    return torch.stack([stream.sample() for _ in range(N_BATCHES)])


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="*", default=None, help="subset of recipe names (default: all)")
    parser.add_argument("--sizes", nargs="*", default=None, help="subset of size names: large small")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 5; quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="alternating timing blocks (default 5)")
    parser.add_argument("--per-round", type=int, default=None, help="calls per block (default 2 large, 6 small)")
    args = parser.parse_args()
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)
    _common.import_library().keep_freed_cpu_memory()  # a training process (utils.keep_freed_cpu_memory)

    sizes = QUICK_SIZES if args.quick else [s for s in SIZES if not args.sizes or s["name"] in args.sizes]
    names = _common.our_trainer_names(args.trainers)
    warmup = args.warmup if args.warmup is not None else (3 if args.quick else 5)
    rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)

    def per_round(size):
        if args.per_round is not None:
            return args.per_round
        return {"large": 2, "small": 6}.get(size["name"], 2)

    runs = []
    for size in sizes:
        D, F = size["activation_dim"], size["dict_size"]
        for name in names:
            kwargs = _common.trainer_kwargs(name, D, F, steps=100_000, seed=args.seed,
                                            overrides={"warmup_steps": 2, "sparsity_warmup_steps": 2,
                                                       "threshold_start_step": 0})
            runs.append({"trainer": name, "label": name, "activation_dim": D, "dict_size": F, "kwargs": kwargs})
            if name in GATED:  # also in a trained gated SAE's sparse regime
                runs.append({**runs[-1], "label": f"{name} L0={GATE_L0}", "gate_l0": GATE_L0})

    batches = {f"batches_{s['activation_dim']}_{s['batch_size']}": make_batches(s, args.seed) for s in sizes}
    ours = []
    for size in sizes:
        D, F, B = size["activation_dim"], size["dict_size"], size["batch_size"]
        data = batches[f"batches_{D}_{B}"]
        floor = _common.dense_floor(D, F, B, seed=args.seed)
        for run in (r for r in runs if (r["activation_dim"], r["dict_size"]) == (D, F)):
            row = {"trainer": run["label"], "size": size["name"]}
            trainer, dropped = _common.build_our_trainer(run["trainer"], run["kwargs"])
            row.update(_common.settle(trainer, run, data[0]))
            counter = iter(range(10**9))

            def one_step():
                i = next(counter)
                trainer.update(i, data[i % len(data)])

            row.update(_common.time_interleaved(one_step, floor, warmup, rounds, per_round(size)))
            row["dropped_kwargs"] = dropped
            ours.append(row)
            print(f"  ours {row['trainer']} {row['size']}: "
                  f"{row.get('step', {}).get('median_ms', row.get('error'))}", flush=True)

    reference = None
    if args.reference:
        config = {"sizes": sizes, "runs": runs, "warmup": warmup, "rounds": rounds, "seed": args.seed,
                  "per_round": args.per_round if args.per_round is not None else per_round(sizes[0])}
        reference = {}
        for size in sizes:  # one subprocess per size so per_round can differ
            sized = dict(config, sizes=[size], per_round=per_round(size))
            key = f"batches_{size['activation_dim']}_{size['batch_size']}"
            result = _common.run_reference("train_step", sized, {key: batches[key]}, threads=args.threads)
            reference.setdefault("rows", []).extend(result["rows"])
            reference["versions"] = result["versions"]

    table = []
    ref_rows = {(r["trainer"], r["size"]): r for r in (reference or {}).get("rows", [])}
    for row in ours:
        size = next(s for s in sizes if s["name"] == row["size"])
        ref = ref_rows.get((row["trainer"], row["size"]), {})
        ours_ms = row.get("step", {}).get("median_ms")
        ref_ms = ref.get("step", {}).get("median_ms")
        table.append({
            "trainer": row["trainer"], "size": row["size"],
            "floor ms": row.get("floor", {}).get("median_ms"),
            "ms/step": ours_ms,
            "act/s": size["batch_size"] / (ours_ms / 1e3) if ours_ms else None,
            "x floor": row.get("x_floor"),
            "ref ms/step": ref_ms,
            "ref x floor": ref.get("x_floor"),
            "ref/ours": _common.ratio(ref_ms, ours_ms),
            "note": row.get("error") or ref.get("error") or "",
        })
    columns = ["trainer", "size", "floor ms", "ms/step", "act/s", "x floor"]
    if args.reference:
        columns += ["ref ms/step", "ref x floor", "ref/ours"]
    title = f"train_step ({args.threads} threads, {args.clock} clock; ref/ours > 1: ours is faster)"
    text = _common.print_table(table, columns + ["note"], title=title)
    _common.write_json(args.out, {
        "benchmark": "train_step", "machine": _common.machine_info(args.threads, args.clock), "sizes": sizes,
        "warmup": warmup, "rounds": rounds, "ours": ours, "reference": reference,
        "table": table, "table_text": text,
    })


if __name__ == "__main__":
    main()
