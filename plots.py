"""Plots of training runs: the curves of each run, and the sparsity–fidelity frontier of a sweep.

    python -m dictionary_learning plot runs/sweep [runs/other ...] [--out plots]

For each run folder, `<name>_curves.png`: loss, L0, FVU and dead % against the training step, one
line per trainer (from each trainer's log.jsonl, so a run still training can be plotted). Across
all the runs given, `frontier.png`: L0 against FVU, and against CE loss recovered when the runs were
evaluated (their eval.json, written by `train` and `eval`), one marker per recipe, the points of a
recipe on one site joined in order of L0 (the trade-off every SAE paper plots). Without an
evaluation the frontier uses each trainer's last logged training batch, and says so.

matplotlib is an optional dependency (the `plot` extra); figures are drawn with its object API
(no pyplot, no global backend), and each PNG is written atomically.
"""
from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import atomic_write
from .run_config import recipe_label

__all__ = ["PlotConfig", "plot_runs", "CURVES", "trainer_logs"]

CURVES = (("loss", "loss", "log"), ("l0", "L0 (active latents per token)", "log"),
          ("fvu", "FVU (fraction of variance unexplained)", "linear"), ("dead_pct", "dead latents (%)", "linear"))
"""(log key, axis label, y scale) of each panel of a run's curves."""
MARKERS = "osD^v<>PX*hp"


@dataclass
class PlotConfig:
    """What `python -m dictionary_learning plot` takes."""

    runs: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "RUN_DIR"})
    """run folders (a sweep's save_dir, or one trainer's folder), or hf:// paths of pushed runs."""
    out: str | None = None
    """the folder for the PNGs (default: <the first run>/plots)."""
    dpi: int = 120
    """resolution of the PNGs."""


def plain_log_ticks(axis) -> None:
    """Tick labels of a log axis as plain numbers (20, 50, 100), not powers of ten."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(FuncFormatter(lambda value, _: f"{value:g}" if f"{value:g}".lstrip("0.")[:1] in "25"
                                           else ""))  # 20, 50, 200, ...: the others would overlap


def _figure_class():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("plot needs matplotlib: pip install matplotlib (or the 'plot' extra, pip install "
                          "'dictionary_learning[plot]')") from None
    return Figure


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a run still writing it
        if isinstance(record, dict):
            records.append(record)
    return records


def trainer_logs(run: Path) -> list[tuple[Path, dict[str, Any], list[dict[str, Any]]]]:
    """(folder, trainer config, log records) of every trainer folder under `run` (itself included),
    in order of their paths."""
    found = []
    for log in sorted(run.rglob("log.jsonl")):
        folder = log.parent
        config_path = folder / "config.json"
        config = json.loads(config_path.read_text()) if config_path.exists() else {}
        trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
        found.append((folder, trainer, _read_jsonl(log)))
    return found


def _label(run: Path, folder: Path, trainer: dict[str, Any]) -> str:
    name = folder.relative_to(run).as_posix() if folder != run else folder.name
    recipe = dict(trainer, trainer=trainer.get("trainer_class") or trainer.get("trainer") or "?")
    return f"{name}: {recipe_label(recipe)}"


def _save(figure, path: Path, dpi: int) -> Path:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
    data = buffer.getvalue()
    return atomic_write(path, lambda file: file.write(data))


def plot_curves(run: Path, path: Path, dpi: int = 120) -> Path:
    """`path`: the 2×2 panels of CURVES against the step, one line per trainer of `run`."""
    trainers = trainer_logs(run)
    if not trainers:
        raise FileNotFoundError(f"{str(run)!r} holds no log.jsonl: pass a run folder written by train / trainSAE "
                                "(with log_steps)")
    figure = _figure_class()(figsize=(12, 8), layout="constrained")
    axes = figure.subplots(2, 2).ravel()
    for ax, (key, label, scale) in zip(axes, CURVES):
        drawn = False
        for folder, trainer, records in trainers:
            points = [(r["step"], r[key]) for r in records if key in r and "step" in r and _finite(r[key])]
            if scale == "log":
                points = [(s, v) for s, v in points if v > 0]
            if points:
                ax.plot(*zip(*points), label=_label(run, folder, trainer), linewidth=1.4)
                drawn = True
        ax.set_xlabel("step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if drawn:
            ax.set_yscale(scale)
            if scale == "log":
                plain_log_ticks(ax.yaxis)
        else:
            ax.text(0.5, 0.5, f"no {key} logged", ha="center", va="center", transform=ax.transAxes)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        figure.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize="small")
    figure.suptitle(f"{run.name}: training curves ({len(trainers)} trainer{'s' if len(trainers) > 1 else ''})")
    return _save(figure, path, dpi)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _frontier_points(runs: list[Path]) -> tuple[list[dict[str, Any]], bool]:
    """One point per trainer of `runs`: recipe, site, l0, fvu (and ce_recovered) from the run's
    eval.json where it has the trainer, else from its last log record; and whether all were evaluated."""
    points, all_evaluated = [], True
    for run in runs:
        evaluated = {}
        if (run / "eval.json").is_file():
            rows = json.loads((run / "eval.json").read_text()).get("rows", [])
            evaluated = {(run / row["folder"]).resolve(): row for row in rows if "folder" in row}
        for folder, trainer, records in trainer_logs(run):
            row = evaluated.get(folder.resolve())
            if row is None:
                all_evaluated = False
                row = next((r for r in reversed(records) if "l0" in r and "fvu" in r), None)
                if row is None:
                    continue
            recipe = trainer.get("trainer_class") or "?"
            points.append({"recipe": recipe, "site": trainer.get("site") or "", "l0": row["l0"], "fvu": row["fvu"],
                           "ce_recovered": row.get("ce_recovered"),
                           "label": recipe_label(dict(trainer, trainer=recipe))})
    return points, all_evaluated


def plot_frontier(runs: list[Path], path: Path, dpi: int = 120) -> Path:
    """`path`: L0 against FVU (and against CE recovered, where evaluated) for every trainer of
    `runs`, one marker per recipe, a recipe's points on one site joined in order of L0."""
    points, all_evaluated = _frontier_points(runs)
    if not points:
        raise FileNotFoundError("no trainer with L0 and FVU logged or evaluated in " + ", ".join(map(str, runs)))
    with_ce = [p for p in points if _finite(p["ce_recovered"])]
    figure = _figure_class()(figsize=(13 if with_ce else 7, 5.5), layout="constrained")
    axes = list(figure.subplots(1, 2 if with_ce else 1, squeeze=False, sharex=True).ravel())
    recipes = sorted({p["recipe"] for p in points})
    sites = sorted({p["site"] for p in points})
    styles = ["-", "--", ":", "-."]
    for ax, (key, label, shown) in zip(axes, [("fvu", "FVU (lower is better)", points),
                                              ("ce_recovered", "CE loss recovered (higher is better)", with_ce)]):
        for index, recipe in enumerate(recipes):
            colour = f"C{index % 10}"
            for site_index, site in enumerate(sites):
                series = sorted((p for p in shown if p["recipe"] == recipe and p["site"] == site), key=lambda p: p["l0"])
                if not series:
                    continue
                name = recipe + (f" @ {site}" if len(sites) > 1 else "")
                ax.plot([p["l0"] for p in series], [p[key] for p in series], marker=MARKERS[index % len(MARKERS)],
                        linestyle=styles[site_index % len(styles)], color=colour, label=name, markersize=7)
                for p in series:  # each point's sparsity setting (k, λ or target_l0)
                    ax.annotate(p["label"].partition(" ")[2], (p["l0"], p[key]), textcoords="offset points",
                                xytext=(5, 4), fontsize="x-small", color=colour)
        ax.set_xscale("log")
        plain_log_ticks(ax.xaxis)
        ax.set_xlabel("L0 (active latents per token, log scale)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize="small")
    source = "evaluated on held-out text" if all_evaluated else "last logged training batch where not evaluated"
    figure.suptitle(f"sparsity–fidelity frontier: {len(points)} dictionaries ({source})")
    return _save(figure, path, dpi)


def plot_runs(config: PlotConfig) -> list[Path]:
    """The curves of each run and the frontier across them (see the module docstring); returns the
    PNGs written."""
    from .workflow import local_run_folder

    _figure_class()  # fail before any download when matplotlib is missing
    runs = [local_run_folder(path) for path in config.runs]
    out = Path(config.out) if config.out else runs[0] / "plots"
    written = []
    names = [run.name for run in runs]
    for index, run in enumerate(runs):
        name = run.name if names.count(run.name) == 1 else f"{run.name}_{index}"
        written.append(plot_curves(run, out / f"{name}_curves.png", config.dpi))
    written.append(plot_frontier(runs, out / "frontier.png", config.dpi))
    return written
