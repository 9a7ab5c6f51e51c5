"""The sparsity–fidelity frontier of every recipe on hierarchical synthetic ground truth, scored with the
field's metrics (MCC, per-latent F1, uniqueness, explained variance).

    python benchmarks/frontier.py [--quick] [--threads 1] [--clock cpu] [--seeds 2] [--steps 2000]
                                  [--levels 4 8 16] [--data synthetic|narrow|narrow-own] [--out results/frontier.json]
                                  [--png results/frontier.png]

Data: `HierarchicalActivations` with D = 64, 32 trees of branching 3 and depth 2 plus 64 independent
features (480 features in all, 5.6 active per sample on average), correlated top-level firing (rank 4,
strength 0.3), magnitudes log-uniform in [0.5, 2] with cv 0.25, no noise. Each recipe trains F = 512
latents for `--steps` batches of 1024 from its own stream (seeded per run), with only activation_dim,
dict_size and its sparsity target given (k for the TopK family, target_l0 for the others:
trainers/base.py L0Controller; JumpReLU's target_l0 is its own penalty), `normalize_activations=True`
and, for the L1 and Lp recipes whose default has none, a λ warmup of steps/10; everything else is the
recipe's default (the LR warmup, JumpReLU's λ warmup and p-annealing's start scale with the run). Scores: `ground_truth_scores` on
32,768 held-out samples of another stream of the same features; `generation_share` is the fraction of
the training time spent drawing the training batches. Reported per recipe and level: the
mean over seeds and the spread (max − min). With --saelens, SAELens' trainers for the recipes both
libraries have (benchmarks/saelens_worker.py, in SAELens' own virtualenv) train on the same samples in
the same order (the worker regenerates the stream with this repository's synthetic.py) at the same
sparsity target, with SAELens' defaults (LR 3e-4 constant after the same warmup, as its toy-SAE
trainer), and are scored by the same function; SAELens' BatchTopK and Matryoshka SAEs as it saves
them for inference (a JumpReLU at the learned threshold), as ours use their learned threshold.
SAELens trains on the raw samples (E‖x‖² ≈ 15.5), ours on them scaled to E‖x‖² = 1.

--data narrow: SynthSAEBench-16k's regime at CPU size, a dictionary 4× narrower than the true features
(its SAEs: 4,096 latents for 16,384 features). D = 64, 16 trees of branching 4 and depth 3 (1,360
features, 85 per tree) plus 16 independent features: 1,376 in all (21.5 per dimension, as 16,384 / 768);
Zipfian top-level firing (exponent 0.5, probabilities clipped to [5e-4, 0.4], 3 top-level features
active on average), an active node activating one of its 4 mutually exclusive children with
probability 0.8; 6.1 features active per sample on average; correlated top-level firing (rank 4,
strength 0.1); magnitudes with means log-uniform in [4, 5], cv 0.25, a child's not scaled by its
parent's; no noise (E‖x‖² ≈ 131). F = 344. Matryoshka's nested groups are 1/8, 1/4 and the rest of the
dictionary at any width ([64, 128, 320] at F = 512, [43, 86, 215] at F = 344), in both libraries.

--data narrow-own: the narrow preset's trees with SynthSAEBench-16k's firing rule
(`child_firing="own_probability"`, compensated): one Zipf law (exponent 0.5, clipped to [5e-4, 0.4])
over all features in index order, the roots first and the independent features last, scaled so that
1.5 top-level features fire per sample; each child fires given its parent with the probability that
makes it fire overall at its own Zipf probability where its parent fires often enough, and where
several siblings fire one of them is kept. The roots fire at 0.05–0.21, the independent features at
0.006; below a root nearly every child's probability stops at 1 (an active node passes to one child),
except under the most frequent root; 5.7 features active per sample on average.

    python benchmarks/frontier.py --data bundled [--quick] [--threads 1] [--clock cpu] [--seeds 1]
                                  [--steps 1000] [--levels 8 16 32] [--lr X] [--out ...] [--png ...]

With --data bundled, the frontier on the bundled model (bundled.py: a 4-layer GPT-NeoX, d = 128) at
the demo's site, the output of layer 0's MLP (the MLP that carries most of the model's loss). The
activations are collected once into activation caches (cache.py; bfloat16, 128-token contexts) under
the benchmark cache folder: `--steps` × 1024 tokens of the stdlib train split, 32,768 of the held-out
split. Each recipe trains F = 8 × 128 = 1024 latents with the same `recipe_config` as above (dimensions
aside) on the train cache, read by `CachedActivations` with the run's seed (every recipe of a seed
reads the same rows in the same order). Scores: L0, FVU = 1 − explained variance and dead latents
(never firing) on the held-out rows (`tensor_metrics`), and CE recovered (against zero ablation) and
the CE increase with the dictionary spliced into the model on 32 held-out texts
(`loss_recovered`). The PNG plots FVU, CE recovered and the CE increase (nats) against L0.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import _common

SAELENS_PYTHON = Path(os.environ.get("DL_SAELENS_VENV", "~/.cache/saelens_bench/venv")).expanduser() / "bin" / "python"

SAELENS_RECIPES = ("StandardTrainer", "TopKTrainer", "BatchTopKTrainer", "MatryoshkaBatchTopKTrainer", "JumpReluTrainer")
RECIPES = {
    "StandardTrainer": "target_l0",
    "StandardTrainerAprilUpdate": "target_l0",
    "GatedSAETrainer": "target_l0",
    "PAnnealTrainer": "target_l0",
    "GatedAnnealTrainer": "target_l0",
    "TopKTrainer": "k",
    "BatchTopKTrainer": "k",
    "MatryoshkaBatchTopKTrainer": "k",
    "JumpReluTrainer": "target_l0",
}
DATA = dict(activation_dim=64, n_roots=32, branching=3, depth=2, n_independent=64, mean_active_top=4.0,
            correlation_rank=4, correlation_strength=0.3, batch_size=1024)
DICT_SIZE = 512
NARROW_DATA = dict(activation_dim=64, n_roots=16, branching=4, depth=3, n_independent=16, mean_active_top=3.0,
                   zipf_exponent=0.5, min_firing_probability=5e-4, max_firing_probability=0.4, correlation_rank=4,
                   correlation_strength=0.1, magnitude_mean_min=4.0, magnitude_mean_max=5.0,
                   child_magnitude_relative=False, batch_size=1024)
NARROW_DICT_SIZE = 344
NARROW_OWN_DATA = {**NARROW_DATA, "child_firing": "own_probability", "mean_active_top": 1.5}
SYNTHETIC_PRESETS = {"synthetic": (DATA, DICT_SIZE), "narrow": (NARROW_DATA, NARROW_DICT_SIZE),
                     "narrow-own": (NARROW_OWN_DATA, NARROW_DICT_SIZE)}  # --data: (stream, F)
METRICS = ("l0", "explained_variance", "mcc", "f1", "matched_f1", "precision", "recall", "uniqueness", "dead_latents")


def matryoshka_group_sizes(dict_size: int) -> list[int]:
    """Nested groups of 1/8, 1/4 and the rest of the dictionary ([64, 128, 320] at F = 512)."""
    return [dict_size // 8, dict_size // 4, dict_size - dict_size // 8 - dict_size // 4]


def recipe_config(name: str, level: int, steps: int, seed: int, activation_dim: int = DATA["activation_dim"],
                  dict_size: int = DICT_SIZE) -> dict:
    config = {"trainer": name, "activation_dim": activation_dim, "dict_size": dict_size, "seed": seed}
    config[RECIPES[name]] = level
    if name == "MatryoshkaBatchTopKTrainer":
        config["group_sizes"] = matryoshka_group_sizes(dict_size)
    if name in ("TopKTrainer", "BatchTopKTrainer", "MatryoshkaBatchTopKTrainer"):
        config["threshold_start_step"] = steps // 2
    if name in ("StandardTrainer", "GatedSAETrainer", "PAnnealTrainer", "GatedAnnealTrainer"):
        config["sparsity_warmup_steps"] = steps // 10  # their default is none; JumpReLU's is already steps/10
    return config


def train_and_score(name: str, level: int, steps: int, seed: int, n_eval: int, overrides: dict | None = None,
                    data: dict = DATA, dict_size: int = DICT_SIZE) -> dict:
    """Trains recipe `name` at `level` on the stream `data` (its config from `recipe_config`, with
    `overrides` on top) and scores it on held-out samples."""
    from dictionary_learning import HierarchicalActivations, ground_truth_scores, trainSAE

    clock = _common.CLOCKS[_common._clock_name]
    train = HierarchicalActivations(seed=0, stream_seed=1000 + seed, **data)
    generation_seconds = 0.0

    def batches():
        nonlocal generation_seconds
        for _ in range(steps):
            start = clock()
            x = train.sample()
            generation_seconds += clock() - start
            yield x

    start = clock()
    config = {**recipe_config(name, level, steps, seed, data["activation_dim"], dict_size), **(overrides or {})}
    (dictionary,) = trainSAE(batches(), trainer_configs=[config], steps=steps, normalize_activations=True,
                             progress=False)
    seconds = clock() - start
    held_out = HierarchicalActivations(seed=0, stream_seed=99, **data)
    return {**ground_truth_scores(dictionary, held_out, n_samples=n_eval), "seconds": seconds,
            "generation_share": generation_seconds / seconds}


def saelens_run(name: str, level: int, steps: int, seed: int, n_eval: int, threads: int, clock: str, data: dict = DATA,
                dict_size: int = DICT_SIZE, sae_config: dict | None = None) -> dict:
    """SAELens' trainer for recipe `name` on the same samples, in its own virtualenv (saelens_worker.py);
    `sae_config` overrides fields of SAELens' SAE config (e.g. {"l1_coefficient": 5.0})."""
    if not SAELENS_PYTHON.exists():
        raise SystemExit(f"--saelens needs a virtualenv with sae-lens at {SAELENS_PYTHON.parent.parent} (python -m venv; "
                         "pip install -c <(echo torch==2.13.0) torch==2.13.0 sae-lens), or DL_SAELENS_VENV")
    config = {"recipe": name, "level": level, "seed": seed, "steps": steps, "n_eval": n_eval, "threads": threads,
              "clock": clock, "dict_size": dict_size, "data": data, "sae_config": sae_config or {}}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as file:
        json.dump(config, file)
    try:
        proc = subprocess.run([str(SAELENS_PYTHON), str(Path(__file__).with_name("saelens_worker.py")), file.name],
                              capture_output=True, text=True)
    finally:
        os.unlink(file.name)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


BUNDLED = dict(site="gpt_neox.layers.0.mlp", io="out", ctx_len=128, activation_dim=128, batch_size=1024,
               eval_tokens=32_768, eval_texts=32)
BUNDLED_DICT_SIZE = 8 * BUNDLED["activation_dim"]
BUNDLED_STEPS = 1000
BUNDLED_LEVELS = [8, 16, 32]
BUNDLED_METRICS = ("l0", "fvu", "explained_variance", "ce_recovered", "ce_diff", "dead_latents")


def bundled_cache(model, split: str, n_tokens: int) -> Path:
    """The activation cache of the bundled model's `BUNDLED["site"]` over the first `n_tokens` tokens of the
    stdlib `split`, written once under the benchmark cache folder and reused by every later run."""
    from dictionary_learning.bundled import stdlib_text_stream
    from dictionary_learning.cache import cache_activations

    checkout = hashlib.sha256(str(_common.REPO_ROOT).encode()).hexdigest()[:8]  # a cache records its model's path
    path = (_common.CACHE_DIR / "frontier_bundled" / checkout
            / f"{split}_{BUNDLED['site']}_{BUNDLED['ctx_len']}_{n_tokens}")
    cache_activations(stdlib_text_stream(split=split, repeat=split == "train"), model, BUNDLED["site"], path,
                      n_tokens, io=BUNDLED["io"], ctx_len=BUNDLED["ctx_len"], resume=path.exists(),
                      data_source=f"stdlib {split} split", progress=False)
    return path


def bundled_train_and_score(name: str, level: int, steps: int, seed: int, train_path: Path,
                            heldout: list, texts: list[str], model, overrides: dict | None = None) -> dict:
    """Train recipe `name` on the cached train-split rows (seed s: every recipe reads the same rows in the same
    order), then score it on the held-out rows (L0, FVU, dead latents) and, spliced into the model, on the
    held-out texts (CE recovered against zero ablation). `overrides` go on top of `recipe_config`."""
    import torch
    from dictionary_learning import trainSAE
    from dictionary_learning.cache_reader import CachedActivations
    from dictionary_learning.evaluation import loss_recovered, tensor_metrics

    data = CachedActivations(train_path, batch_size=BUNDLED["batch_size"], seed=seed, epochs=None, dtype=torch.float32)
    config = {**recipe_config(name, level, steps, seed, BUNDLED["activation_dim"], BUNDLED_DICT_SIZE),
              **(overrides or {})}
    start = _common.CLOCKS[_common._clock_name]()
    (dictionary,) = trainSAE(data, trainer_configs=[config], steps=steps, normalize_activations=True, progress=False)
    seconds = _common.CLOCKS[_common._clock_name]() - start
    data.close()
    metrics = tensor_metrics(dictionary, heldout)
    lm = loss_recovered(texts, model, BUNDLED["site"], dictionary, max_len=BUNDLED["ctx_len"], io=BUNDLED["io"])
    return {"l0": metrics["l0"], "fvu": 1 - metrics["frac_variance_explained"],
            "explained_variance": metrics["frac_variance_explained"], "ce_recovered": lm["frac_recovered"],
            "ce_diff": lm["ce_diff"], "kl": lm["kl_reconstructed"], "ce_clean": lm["ce_clean"], "ce_zero": lm["ce_zero"],
            "n_targets": lm["n_tokens"],
            "dead_latents": round(BUNDLED_DICT_SIZE * (1 - metrics["frac_alive"])), "seconds": seconds}


def main_bundled(args, overrides: dict | None) -> None:
    """The frontier on the bundled model (`--data bundled`): see the module docstring."""
    import itertools

    import torch
    from dictionary_learning.bundled import load_bundled_model, stdlib_text_stream
    from dictionary_learning.cache_reader import CachedActivations

    if args.saelens:
        raise SystemExit("--saelens runs on the synthetic data only")
    steps = 50 if args.quick else args.steps or BUNDLED_STEPS
    levels = args.levels or BUNDLED_LEVELS
    eval_tokens = 8192 if args.quick else BUNDLED["eval_tokens"]
    eval_texts = 8 if args.quick else BUNDLED["eval_texts"]
    seeds = list(range(1 if args.quick else args.seeds))
    model = load_bundled_model()
    train_path = bundled_cache(model, "train", steps * BUNDLED["batch_size"])
    heldout_path = bundled_cache(model, "heldout", eval_tokens)
    with CachedActivations(heldout_path, batch_size=4096, shuffle=False, epochs=1, dtype=torch.float32) as reader:
        heldout = list(itertools.islice(reader, eval_tokens // 4096))
    texts = list(itertools.islice(stdlib_text_stream(split="heldout"), eval_texts))
    runs, table = [], []
    for name in args.recipes:
        for level in levels:
            results = []
            for seed in seeds:
                result = bundled_train_and_score(name, level, steps, seed, train_path, heldout, texts, model, overrides)
                results.append(result)
                runs.append({"recipe": name, "level": level, "seed": seed, **result})
                print(f"  {name} {RECIPES[name]}={level} seed {seed}: "
                      + ", ".join(f"{m} {_common.fmt(result[m])}" for m in (*BUNDLED_METRICS, "seconds")), flush=True)
            row = {"recipe": name, "target": f"{RECIPES[name]}={level}"}
            for metric in BUNDLED_METRICS:
                values = [r[metric] for r in results]
                row[metric] = statistics.mean(values)
                if metric in ("fvu", "ce_recovered"):
                    row[f"{metric} spread"] = max(values) - min(values)
            row["seconds"] = statistics.mean(r["seconds"] for r in results)
            table.append(row)
    columns = ["recipe", "target", "l0", "fvu", "fvu spread", "explained_variance", "ce_recovered",
               "ce_recovered spread", "ce_diff", "dead_latents", "seconds"]
    text = _common.print_table(table, columns, title=(
        f"frontier on the bundled model's {BUNDLED['site']} output (F={BUNDLED_DICT_SIZE}, {steps} steps x "
        f"{BUNDLED['batch_size']}, {len(seeds)} seeds, {args.threads} threads, {args.clock} clock"
        + ("" if args.lr is None else f", lr {args.lr:g}") + ")"))
    if args.png:
        plot(table, args.png, metrics=("fvu", "ce_recovered", "ce_diff"), log_y=("fvu", "ce_diff"))
    _common.write_json(args.out, {"benchmark": "frontier", "data": "bundled",
                                  "machine": _common.machine_info(args.threads, args.clock),
                                  "setup": {**BUNDLED, "eval_tokens": eval_tokens, "eval_texts": eval_texts,
                                            "eval_targets": runs[0]["n_targets"] if runs else None},
                                  "dict_size": BUNDLED_DICT_SIZE, "steps": steps, "seeds": seeds,
                                  **({} if args.lr is None else {"lr": args.lr}),
                                  "runs": runs, "table": table, "table_text": text, "finished": time.time()})


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--data", choices=(*SYNTHETIC_PRESETS, "bundled"), default="synthetic",
                        help="hierarchical synthetic ground truth (default: 480 features, F = 512; narrow: 1,376 "
                             "features, F = 344; narrow-own: the same with SynthSAEBench's child firing), or the "
                             "bundled model's activations")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=None,
                        help=f"training batches (default 2000 synthetic, {BUNDLED_STEPS} bundled)")
    parser.add_argument("--levels", type=int, nargs="+", default=None,
                        help=f"sparsity targets (default 4 8 16 synthetic, {' '.join(map(str, BUNDLED_LEVELS))} bundled)")
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES))
    parser.add_argument("--lr", type=float, default=None,
                        help="train every recipe at this learning rate instead of its default (for probes)")
    parser.add_argument("--png", default=None, help="plot the frontier here (needs matplotlib)")
    parser.add_argument("--saelens", action="store_true",
                        help="also train SAELens' trainers (TopK, BatchTopK, Matryoshka, JumpReLU, standard) on the "
                             "same samples in its own virtualenv, scored by the same function")
    args = parser.parse_args()
    if args.lr is not None and not args.lr > 0:
        parser.error(f"--lr must be positive, got {args.lr}")
    if args.seeds < 1 or (args.steps is not None and args.steps < 1) or min(args.levels or [1]) < 1:
        parser.error(f"--seeds, --steps and --levels must be positive, got {args.seeds}, {args.steps}, {args.levels}")
    unknown = sorted(set(args.recipes) - set(RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(RECIPES)}")
    overrides = None if args.lr is None else {"lr": args.lr}
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)
    _common.import_library()
    if args.data == "bundled":
        return main_bundled(args, overrides)
    steps = 200 if args.quick else args.steps or 2000
    args.levels = args.levels or [4, 8, 16]
    n_eval = 4096 if args.quick else 32_768
    seeds = list(range(1 if args.quick else args.seeds))
    data, dict_size = SYNTHETIC_PRESETS[args.data]
    runs, table = [], []
    for name in args.recipes:
        for level in args.levels:
            results = []
            for seed in seeds:
                result = train_and_score(name, level, steps, seed, n_eval, overrides, data, dict_size)
                results.append(result)
                runs.append({"recipe": name, "level": level, "seed": seed, **result})
                print(f"  {name} {RECIPES[name]}={level} seed {seed}: "
                      + ", ".join(f"{m} {_common.fmt(result[m])}" for m in METRICS), flush=True)
            row = {"recipe": name, "target": f"{RECIPES[name]}={level}"}
            for metric in (*METRICS, "generation_share"):
                values = [r[metric] for r in results]
                row[metric] = statistics.mean(values)
                if metric in ("mcc", "f1", "matched_f1", "explained_variance"):
                    row[f"{metric} spread"] = max(values) - min(values)
            if args.saelens and name in SAELENS_RECIPES:
                theirs = [saelens_run(name, level, steps, seed, n_eval, args.threads, args.clock, data, dict_size)
                          for seed in seeds]
                runs.extend({"recipe": name, "level": level, "seed": seed, "library": "saelens", **result}
                            for seed, result in zip(seeds, theirs))
                ok = [result for result in theirs if "error" not in result]
                for metric in ("l0", "explained_variance", "mcc", "f1", "matched_f1"):
                    row[f"SAELens {metric}"] = statistics.mean(r[metric] for r in ok) if ok else None
                if len(ok) < len(theirs):
                    row["note"] = next(result["error"] for result in theirs if "error" in result)[:80]
                print(f"  SAELens {name}: " + ", ".join(f"{k} {_common.fmt(v)}" for k, v in row.items()
                                                       if k.startswith("SAELens")), flush=True)
            table.append(row)
    columns = ["recipe", "target", "l0", "explained_variance", "explained_variance spread", "mcc", "mcc spread", "f1",
               "f1 spread", "matched_f1", "matched_f1 spread", "precision", "recall", "uniqueness", "dead_latents",
               "generation_share"]
    if args.saelens:
        columns += ["SAELens l0", "SAELens explained_variance", "SAELens mcc", "SAELens f1", "SAELens matched_f1", "note"]
    text = _common.print_table(table, columns, title=(
        f"frontier on hierarchical synthetic data ({args.data}, F={dict_size}, {steps} steps x {data['batch_size']}, "
        f"{len(seeds)} seeds, {args.threads} threads, {args.clock} clock)"))
    if args.png:
        plot(table, args.png)
    _common.write_json(args.out, {"benchmark": "frontier", "machine": _common.machine_info(args.threads, args.clock),
                                  "data_preset": args.data, "data": data, "dict_size": dict_size, "steps": steps,
                                  "seeds": seeds,
                                  **({} if args.lr is None else {"lr": args.lr}),
                                  "runs": runs, "table": table, "table_text": text, "finished": time.time()})


def plot(table: list[dict], path: str, metrics: tuple[str, ...] = ("explained_variance", "mcc", "f1"),
         log_y: tuple[str, ...] = ()) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--png needs matplotlib: pip install matplotlib") from None
    _common.import_library()
    from dictionary_learning.plots import plain_log_ticks

    figure, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 4.5))
    for name in dict.fromkeys(row["recipe"] for row in table):
        rows = sorted((row for row in table if row["recipe"] == name), key=lambda row: row["l0"])
        for axis, metric in zip(axes, metrics):
            axis.plot([row["l0"] for row in rows], [row[metric] for row in rows], marker="o", label=name)
            axis.set_xscale("log")
            plain_log_ticks(axis.xaxis)
            if metric in log_y:
                axis.set_yscale("log")
            axis.set_xlabel("L0")
            axis.set_ylabel(metric)
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
