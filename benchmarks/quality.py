"""Dictionary quality of every trainer on synthetic data with known features, at a fixed budget.

    python benchmarks/quality.py [--reference] [--quick] [--threads 2] [--out results.json]

Each recipe trains for `--steps` batches of `--batch-size` samples from the seeded generator of
synthetic.py (x = Σ_i s_i a_i d_i + noise, unit-norm true features d_i, Zipf firing rates), then is
scored on held-out samples of the same features: L0 (mean active latents per sample), FVU
(Σ‖x − x̂‖² / Σ‖x − x̄‖²), dead fraction (latents that never fire on the held-out set), MMCS (mean
over true features of the best cosine with a decoder direction), the fraction of true features
recovered at cos > 0.9, and the time spent in the training steps. The TopK family gets k = the
generator's mean number of active features; the L1 recipes get each of `--penalties`, so that with
--reference both libraries' results can be compared at equal L0: "ref FVU@L0" and "ref MMCS@L0" are
the reference's values interpolated (linearly in log L0) at our L0, when ours lies within its range.
The reference regenerates the identical stream from the same seed (same generator file, same
torch; checked on the first rows) and sends its trained weights back: both libraries' dictionaries
are scored by `dictionary_quality` below (the reference's loaded into our classes, whose outputs on
its weights equal its own: tests/test_save_load.py).
"""
from __future__ import annotations

import math

import torch

import _common

# the sparsity knob of each recipe, swept with --penalties (TopK family: k; JumpReLU: target L0), as
# the reference names it (our side reads these names as `sparsity_penalty`)
PENALTY_KEY = {
    "StandardTrainer": "l1_penalty",
    "StandardTrainerAprilUpdate": "l1_penalty",
    "GatedSAETrainer": "l1_penalty",
    "PAnnealTrainer": "initial_sparsity_penalty",
    "GatedAnnealTrainer": "initial_sparsity_penalty",
}


def interpolate_at(points: list[tuple[float, float]], l0: float) -> float | None:
    """Value at `l0` of the curve through `points` [(L0, value)], linear in log L0; None outside
    the range of the points (no extrapolation) or with fewer than two distinct L0s."""
    points = sorted((a, b) for a, b in points if a > 0 and math.isfinite(b))
    if not points or l0 <= 0:
        return None
    if len(points) == 1 or not points[0][0] <= l0 <= points[-1][0]:
        return points[0][1] if len(points) == 1 and math.isclose(points[0][0], l0, rel_tol=0.05) else None
    for (l0_a, v_a), (l0_b, v_b) in zip(points, points[1:]):
        if l0_a <= l0 <= l0_b:
            if l0_b == l0_a:
                return (v_a + v_b) / 2
            w = (math.log(l0) - math.log(l0_a)) / (math.log(l0_b) - math.log(l0_a))
            return v_a + w * (v_b - v_a)
    return None


@torch.no_grad()
def dictionary_quality(dictionary, heldout: torch.Tensor, true_features: torch.Tensor,
                       cos_threshold: float = 0.9) -> dict[str, float]:
    """L0, FVU and dead fraction of `dictionary` on the held-out samples [N, D] (forward in
    inference mode), and how well its decoder directions match the true features (MMCS; fraction
    with max cos > cos_threshold). A latent is dead if it is zero on every held-out sample."""
    from dictionary_learning import dictionary_directions, fvu
    from dictionary_learning.synthetic import max_cosine_similarities

    x_hat, f = dictionary(heldout, output_features=True)
    active = f != 0
    max_cos = max_cosine_similarities(dictionary_directions(dictionary), true_features)
    return {
        "l0": active.sum(dim=1).float().mean().item(),
        "fvu": fvu(heldout, x_hat),
        "dead_fraction": 1.0 - active.any(dim=0).float().mean().item(),
        "mmcs": max_cos.mean().item(),
        "recovered": (max_cos > cos_threshold).float().mean().item(),
    }


REFERENCE_AUTOENCODER_RECIPES = {"StandardTrainer", "StandardTrainerAprilUpdate"}


def start_from_reference_init(ae, seed: int) -> None:
    """Set our AutoEncoder `ae` to the reference AutoEncoder's initial weights for `seed`, drawn as its
    trainer draws them from torch's global RNG (here in a fork of it): manual_seed(seed), an
    nn.Linear encoder (whose default-initialised bias it keeps), an nn.Linear decoder, then
    w = randn(D, F) with columns at norm 0.1 as W_enc and W_decᵀ; b_dec = 0. Isolates the training
    algorithm from the initial draw."""
    import torch.nn as nn

    D, F = ae.activation_dim, ae.dict_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = nn.Linear(D, F, bias=True)
        nn.Linear(F, D, bias=False)
        w = torch.randn(D, F)
    w = w / w.norm(dim=0, keepdim=True) * 0.1
    with torch.no_grad():
        ae.W_enc.copy_(w)
        ae.W_dec.copy_(w.T)
        ae.b_enc.copy_(encoder.bias)
        ae.b_dec.zero_()


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--trainers", nargs="*", default=None, help="subset of recipe names (default: all)")
    parser.add_argument("--steps", type=int, default=None, help="training batches (default 3000; quick 100)")
    parser.add_argument("--batch-size", type=int, default=None, help="samples per batch (default 1024; quick 256)")
    parser.add_argument("--activation-dim", type=int, default=64)
    parser.add_argument("--n-features", type=int, default=256, help="true features of the generator")
    parser.add_argument("--dict-size", type=int, default=512)
    parser.add_argument("--mean-active", type=float, default=5.0, help="expected active true features per sample")
    parser.add_argument("--noise-std", type=float, default=0.02)
    parser.add_argument("--penalties", type=float, nargs="*", default=None,
                        help="sparsity penalties for the L1 recipes (default: 0.03 0.1 0.3; quick: 0.1)")
    parser.add_argument("--heldout-batches", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None,
                        help="one learning rate for every recipe and both libraries (default: each recipe's)")
    parser.add_argument("--reference-init", action="store_true",
                        help="start ours from the reference's exact initial weights (Standard and April only)")
    args = parser.parse_args()
    if args.reference_init and not (args.trainers and set(args.trainers) <= REFERENCE_AUTOENCODER_RECIPES):
        parser.error("--reference-init draws the reference AutoEncoder's initialisation, which only "
                     f"{' and '.join(sorted(REFERENCE_AUTOENCODER_RECIPES))} share: pass --trainers with those")
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)
    _common.import_library().keep_freed_cpu_memory()  # a training process (utils.keep_freed_cpu_memory)
    from dictionary_learning.interop import dictionary_from_reference
    from dictionary_learning.synthetic import SyntheticActivations

    steps = args.steps or (100 if args.quick else 3000)
    args.batch_size = args.batch_size or (256 if args.quick else 1024)
    penalties = args.penalties or ([0.1] if args.quick else [0.03, 0.1, 0.3])
    k = max(1, round(args.mean_active))
    synthetic = {
        "activation_dim": args.activation_dim, "n_features": args.n_features, "mean_active": args.mean_active,
        "noise_std": args.noise_std, "batch_size": args.batch_size, "seed": args.seed,
    }
    heldout_stream = SyntheticActivations(**synthetic, stream_seed=args.seed + 10_000)
    heldout = torch.stack([heldout_stream.sample() for _ in range(args.heldout_batches)])
    true_features = heldout_stream.true_features

    names = _common.our_trainer_names(args.trainers)
    schedule = {
        **({"lr": args.lr} if args.lr is not None else {}),
        "warmup_steps": max(1, steps // 20), "sparsity_warmup_steps": max(1, steps // 10),
        "threshold_start_step": max(1, steps // 10), "anneal_start": steps // 2,
    }
    runs = []
    for name in names:
        if name in PENALTY_KEY:
            sweep = [(f"{name} {PENALTY_KEY[name]}={p:g}", {PENALTY_KEY[name]: p}) for p in penalties]
        elif name in _common.TOPK_FAMILY:
            sweep = [(f"{name} k={k}", {"k": k})]
        elif name == "JumpReluTrainer":
            sweep = [(f"{name} target_l0={k}", {"target_l0": float(k)})]
        else:
            sweep = [(name, {})]
        if name == "StandardTrainerAprilUpdate":  # the update's LR decay over the last 20 %: our default,
            schedule_of_run = {**schedule, "decay_start": steps - steps // 5}  # explicit so the reference runs it too
        else:
            schedule_of_run = schedule
        for label, knob in sweep:
            kwargs = _common.trainer_kwargs(name, args.activation_dim, args.dict_size, steps, args.seed,
                                            overrides={**schedule_of_run, **knob})
            runs.append({"trainer": name, "label": label, "kwargs": kwargs})

    ours = []
    for run in runs:
        row = {"trainer": run["trainer"], "label": run["label"]}
        stream = SyntheticActivations(**synthetic)
        trainer, dropped = _common.build_our_trainer(run["trainer"], run["kwargs"])
        if args.reference_init:
            start_from_reference_init(trainer.ae, args.seed)
        row["train_s"] = _common.timed_training(trainer.update, stream.sample(), stream.sample, steps)
        trainer.ae.eval()
        row.update(dictionary_quality(trainer.ae, heldout.flatten(0, 1), true_features))
        row["lr"] = float(trainer.lr)
        row["dropped_kwargs"] = dropped
        ours.append(row)
        print(f"  ours {row['label']}: L0 {row.get('l0')}, FVU {row.get('fvu')}, MMCS {row.get('mmcs')} "
              f"{row.get('error', '')}", flush=True)

    reference = None
    if args.reference:
        first_rows = SyntheticActivations(**synthetic).sample()[:4]
        config = {"synthetic": synthetic, "steps": steps, "runs": runs}
        reference = _common.run_reference("quality", config, {"first_rows": first_rows}, threads=args.threads)
        for row in reference["rows"]:  # scored here, like ours, from the weights the reference trained
            if "error" not in row:
                weights = reference["tensors"][row["label"]]
                dictionary = dictionary_from_reference(row["dict_class"], weights, {"k": k}, normalize_decoder=False)
                row.update(dictionary_quality(dictionary, heldout.flatten(0, 1), true_features))
        del reference["tensors"]

    ref_rows = {r["label"]: r for r in (reference or {}).get("rows", [])}
    table = []
    for row in ours:
        ref = ref_rows.get(row["label"], {})
        entry = {
            "run": row["label"], "L0": row.get("l0"), "FVU": row.get("fvu"), "dead": row.get("dead_fraction"),
            "MMCS": row.get("mmcs"), "recovered": row.get("recovered"), "train s": row.get("train_s"),
        }
        if args.reference:
            curve = [r for r in (reference or {}).get("rows", []) if r["trainer"] == row["trainer"] and "l0" in r]
            at = row.get("l0")
            entry.update({
                "ref L0": ref.get("l0"), "ref FVU": ref.get("fvu"), "ref dead": ref.get("dead_fraction"),
                "ref MMCS": ref.get("mmcs"), "ref recovered": ref.get("recovered"), "ref train s": ref.get("train_s"),
                "ref FVU@L0": interpolate_at([(r["l0"], r["fvu"]) for r in curve], at) if at else None,
                "ref MMCS@L0": interpolate_at([(r["l0"], r["mmcs"]) for r in curve], at) if at else None,
            })
        entry["note"] = row.get("error") or ref.get("error") or ""
        table.append(entry)
    columns = ["run", "L0", "FVU", "dead", "MMCS", "recovered", "train s"]
    if args.reference:
        columns += ["ref L0", "ref FVU", "ref dead", "ref MMCS", "ref recovered", "ref train s",
                    "ref FVU@L0", "ref MMCS@L0"]
    text = _common.print_table(table, columns + ["note"], title=(
        f"quality: {steps} steps x {args.batch_size} samples, D={args.activation_dim}, "
        f"{args.n_features} true features, F={args.dict_size} ({args.threads} threads, {args.clock} clock)"))
    _common.write_json(args.out, {
        "benchmark": "quality", "machine": _common.machine_info(args.threads, args.clock),
        "synthetic": synthetic, "steps": steps, "penalties": penalties, "k": k, "schedule": schedule,
        "ours": ours, "reference": reference, "table": table, "table_text": text,
    })


if __name__ == "__main__":
    main()
