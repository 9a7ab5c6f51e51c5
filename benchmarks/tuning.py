"""How far each recipe's default learning rate is from its best: every recipe at one sparsity level on
frontier.py's hierarchical synthetic data, at its default LR times a grid of scales, scored by the
same ground-truth metrics.

    python benchmarks/tuning.py [--quick] [--threads 1] [--clock cpu] [--level 8] [--seeds 1]
                                [--lr-scales 0.5 1 2] [--recipes ...] [--out results/tuning.json]

Each recipe gets only its sparsity target and `lr` = default × scale (everything else as in
frontier.py: the same data, dictionary size, steps and scoring). The grid is bracketed: while the
best F1 or the best MCC sits at the grid's lowest or highest scale, the scale beyond it (÷2 or ×2) is
added, up to `--max-extend` times, so that the best found is an interior point of the grid, not an
edge of it. "Best tuned" is that best point, for each metric; the table gives, per recipe, every
scale's scores and the default's gap to the best F1 and MCC (to compare with the seed spread
frontier.py reports for the default).
"""
from __future__ import annotations

import statistics
import time

import _common
import frontier

METRICS = ("l0", "explained_variance", "mcc", "f1", "dead_latents")


def default_lr(name: str, level: int, steps: int) -> float:
    """The learning rate the recipe picks when none is given (some depend on the dictionary size)."""
    from dictionary_learning.training import build_trainer

    return build_trainer(frontier.recipe_config(name, level, steps, seed=0), steps=steps).lr


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--level", type=int, default=8, help="k for the TopK family, target_l0 for the others")
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--lr-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    parser.add_argument("--max-extend", type=int, default=2,
                        help="how many times the grid may grow past an edge that holds the best F1")
    parser.add_argument("--recipes", nargs="+", default=list(frontier.RECIPES))
    args = parser.parse_args()
    if 1.0 not in args.lr_scales or min(args.lr_scales) <= 0:
        parser.error(f"--lr-scales must be positive and include 1 (the default the others are compared with), "
                     f"got {args.lr_scales}")
    if args.max_extend < 0 or args.seeds < 1 or args.steps < 1 or args.level < 1:
        parser.error(f"--max-extend must be >= 0 and --seeds, --steps, --level >= 1, got {args.max_extend}, "
                     f"{args.seeds}, {args.steps}, {args.level}")
    unknown = sorted(set(args.recipes) - set(frontier.RECIPES))
    if unknown:
        parser.error(f"unknown recipe(s) {unknown}; choose from {', '.join(frontier.RECIPES)}")
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)
    _common.import_library()
    steps = 200 if args.quick else args.steps
    n_eval = 4096 if args.quick else 32_768
    seeds = list(range(args.seeds))
    runs, table = [], []
    for name in args.recipes:
        lr = default_lr(name, args.level, steps)
        scores: dict[float, dict] = {}

        def run(scale: float) -> None:
            results = [frontier.train_and_score(name, args.level, steps, seed, n_eval, {"lr": lr * scale})
                       for seed in seeds]
            runs.extend({"recipe": name, "lr_scale": scale, "lr": lr * scale, "seed": seed, **result}
                        for seed, result in zip(seeds, results))
            scores[scale] = {metric: statistics.mean(r[metric] for r in results) for metric in METRICS}
            print(f"  {name} lr {lr * scale:.3g} (x{scale:g}): "
                  + ", ".join(f"{m} {_common.fmt(v)}" for m, v in scores[scale].items()), flush=True)

        for scale in sorted(args.lr_scales):
            run(scale)
        for _ in range(args.max_extend):
            edges = {max(scores, key=lambda s: scores[s][metric]) for metric in ("f1", "mcc")}
            beyond = [scale / 2 for scale in edges if scale == min(scores)] + [scale * 2 for scale in edges
                                                                               if scale == max(scores)]
            if not beyond:
                break
            for scale in beyond:
                run(scale)
        best_f1 = max(scores, key=lambda s: scores[s]["f1"])
        best_mcc = max(scores, key=lambda s: scores[s]["mcc"])
        for scale in sorted(scores):
            table.append({"recipe": name, "lr": lr * scale, "lr scale": scale, **scores[scale],
                          "best": ("F1 " if scale == best_f1 else "") + ("MCC" if scale == best_mcc else "")})
        table.append({"recipe": name, "lr scale": "gap",
                      "f1": scores[1.0]["f1"] - scores[best_f1]["f1"],
                      "mcc": scores[1.0]["mcc"] - scores[best_mcc]["mcc"]})
        text = _common.print_table(table, ["recipe", "lr", "lr scale", *METRICS, "best"], title=(
            f"learning-rate grid around each recipe's default at level {args.level} (frontier.py's synthetic data, "
            f"F={frontier.DICT_SIZE}, {steps} steps, {len(seeds)} seeds, {args.threads} threads, {args.clock} clock)"))
        _common.write_json(args.out, {  # after every recipe, so that a stopped sweep keeps what it measured
            "benchmark": "tuning", "machine": _common.machine_info(args.threads, args.clock), "data": frontier.DATA,
            "dict_size": frontier.DICT_SIZE, "steps": steps, "level": args.level, "seeds": seeds, "runs": runs,
            "table": table, "table_text": text, "finished": time.time()})


if __name__ == "__main__":
    main()
