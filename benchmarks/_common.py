"""What every benchmark script shares: argument flags, thread pinning, timing, table printing,
JSON output, importing this repository as `dictionary_learning`, and the reference library
(saprmarks/dictionary_learning 0.1.0 from PyPI) in a virtualenv of its own, run in a subprocess.

Only the standard library and torch are imported at module level: `reference_worker.py` imports
this file inside the reference virtualenv too, so both columns use the same timing code.
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
CACHE_DIR = Path(os.environ.get("DL_BENCH_CACHE", "~/.cache/dictionary_learning_bench")).expanduser()
REFERENCE_VENV = CACHE_DIR / "venv"
REFERENCE_VERSION = "0.1.0"

# -------------------------------------------------------------------------------------------
# flags and threads
# -------------------------------------------------------------------------------------------


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small smoke run (seconds, numbers meaningless)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads for both columns (default 2)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    parser.add_argument("--reference", action="store_true",
                        help="also measure saprmarks/dictionary_learning 0.1.0 (own virtualenv, subprocess)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                        help="wall: elapsed time (default; use on a quiet machine); cpu: this process's CPU "
                             "time, steadier on a shared machine (best with --threads 1)")
    return parser


def set_threads(n: int) -> None:
    """Pin torch (and the BLAS/OpenMP pools it uses) to `n` threads."""
    if n < 1:
        raise SystemExit(f"--threads must be >= 1, got {n}")
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the tokenizer's own thread pool would not count
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # only settable before any inter-op work ran
        torch.set_num_interop_threads(1)


def machine_info(threads: int, clock: str = "wall") -> dict[str, Any]:
    return {
        "clock": clock,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": threads,
        "cpu": _cpu_name(),
        "cores": os.cpu_count(),
        "load_average_1min": os.getloadavg()[0],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def _cpu_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


# -------------------------------------------------------------------------------------------
# timing
# -------------------------------------------------------------------------------------------


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter
_clock_name = "wall"


def set_clock(name: str) -> None:
    """Which clock every timing of this process uses: "wall" or "cpu" (process CPU time, all
    threads: on a loaded machine it leaves out the time the process waited for a core)."""
    global _clock, _clock_name
    _clock, _clock_name = CLOCKS[name], name


def time_calls(fn: Callable[[], Any], warmup: int, repeats: int) -> list[float]:
    """Seconds (on the clock chosen by `set_clock`) of `repeats` calls of fn after `warmup`
    untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = _clock()
        fn()
        times.append(_clock() - start)
    return times


def summarize(times: Sequence[float]) -> dict[str, float]:
    """Median and spread of a list of durations (seconds), reported in ms."""
    ms = sorted(t * 1e3 for t in times)
    q1, q3 = ms[len(ms) // 4], ms[(3 * len(ms)) // 4]
    return {"median_ms": statistics.median(ms), "min_ms": ms[0], "iqr_ms": q3 - q1, "n": len(ms)}


@torch.no_grad()
def settle_jumprelu_thresholds(trainer, x: torch.Tensor, l0: float) -> float:
    """JumpReLU's steady state for timing, in either library: every θ_i set to the one value above
    which the pre-activations π = x W_enc + b_enc of batch x have `l0` active latents per token on
    average (θ ≥ 0.001, the initialisation). Without it the first steps run with θ = 0.001 and about
    half of all latents active, a regime training leaves within its first few hundred steps."""
    ae = trainer.ae
    pre = (x @ ae.W_enc + ae.b_enc).flatten()
    theta = pre.kthvalue(pre.numel() - int(l0 * x.shape[0])).values.clamp_min(1e-3)
    ae.threshold.fill_(float(theta))
    return float(theta)


def settle_gates(trainer, x: torch.Tensor, l0: float) -> float:
    """A gated SAE's steady state for timing, in either library: one constant c subtracted from
    every b_gate so that π_gate = (x − b_dec) W_gate + b_gate − c > 0 for `l0` latents per token on
    average over batch x, as in a trained gated SAE (at init about half of all gates are open).
    Returns c."""
    ae = trainer.ae
    if hasattr(ae, "W_enc"):  # ours: W_enc [D, F], b_gate, b_dec
        W_gate, gate_bias, decoder_bias = ae.W_enc, ae.b_gate, ae.b_dec
    else:  # the reference's: encoder.weight [F, D], gate_bias, decoder_bias
        W_gate, gate_bias, decoder_bias = ae.encoder.weight.T, ae.gate_bias, ae.decoder_bias
    with torch.no_grad():
        pre = ((x - decoder_bias) @ W_gate + gate_bias).flatten()
        shift = float(pre.kthvalue(pre.numel() - int(l0 * x.shape[0])).values)
        gate_bias.sub_(shift)
    return shift


def settle(trainer, run: dict, x: torch.Tensor) -> dict:
    """Put a freshly built trainer (ours or the reference's) into the steady state `run` asks
    for (`train_step` runs): JumpReLU's θ at L0 = target_l0; gated runs with "gate_l0" at that L0."""
    if run["trainer"] == "JumpReluTrainer":
        return {"theta": settle_jumprelu_thresholds(trainer, x, run["kwargs"]["target_l0"])}
    if run.get("gate_l0") is not None:
        return {"gate_shift": settle_gates(trainer, x, run["gate_l0"])}
    return {}


def dense_floor(activation_dim: int, dict_size: int, batch_size: int, seed: int = 0) -> Callable[[], None]:
    """A callable doing the six dense matmuls of one SAE step at its own shapes:

        forward   pre = x W_encᵀ      [B, D] @ [D, F]     x̂ = f W_decᵀ      [B, F] @ [F, D]
        backward  ∂W_dec = ∂x̂ᵀ f      [D, B] @ [B, F]     ∂f = ∂x̂ W_dec     [B, D] @ [D, F]
                  ∂W_enc = ∂preᵀ x    [F, B] @ [B, D]     ∂x = ∂pre W_enc   [B, F] @ [F, D]

    (∂x is not needed for training, so a step can skip it: six is a conservative floor.)
    Outputs go to preallocated buffers, so this is matmul time only, in nn.Linear's layouts.
    """
    g = torch.Generator().manual_seed(seed)
    B, D, F = batch_size, activation_dim, dict_size
    x = torch.randn(B, D, generator=g)
    w_enc = torch.randn(F, D, generator=g)  # nn.Linear(D, F).weight
    w_dec = torch.randn(D, F, generator=g)  # nn.Linear(F, D).weight
    f = torch.randn(B, F, generator=g).relu_()
    grad_x_hat = torch.randn(B, D, generator=g)
    grad_pre = torch.randn(B, F, generator=g)
    out_bf, out_bd = torch.empty(B, F), torch.empty(B, D)
    out_df, out_fd = torch.empty(D, F), torch.empty(F, D)

    def six_matmuls() -> None:
        torch.mm(x, w_enc.t(), out=out_bf)  # encoder forward
        torch.mm(f, w_dec.t(), out=out_bd)  # decoder forward
        torch.mm(grad_x_hat.t(), f, out=out_df)  # decoder weight grad
        torch.mm(grad_x_hat, w_dec, out=out_bf)  # grad into f
        torch.mm(grad_pre.t(), x, out=out_fd)  # encoder weight grad
        torch.mm(grad_pre, w_enc, out=out_bd)  # grad into x

    return six_matmuls


def time_interleaved(step: Callable[[], Any], floor: Callable[[], Any], warmup: int, rounds: int,
                     per_round: int) -> dict[str, Any]:
    """Time `step` against the dense `floor` in alternating blocks of `per_round` calls each, so
    that load from other processes hits both alike. Returns both summaries and the ratio
    median(step)/median(floor), with the spread of the per-round ratios as a noise measure."""
    for _ in range(warmup):
        step()
    floor()
    step_times, floor_times, round_ratios = [], [], []
    for _ in range(rounds):
        f = time_calls(floor, 0, per_round)
        s = time_calls(step, 0, per_round)
        floor_times += f
        step_times += s
        round_ratios.append(statistics.median(s) / statistics.median(f))
    step_summary, floor_summary = summarize(step_times), summarize(floor_times)
    round_ratios.sort()
    return {
        "step": step_summary,
        "floor": floor_summary,
        "x_floor": step_summary["median_ms"] / floor_summary["median_ms"],
        "x_floor_rounds_min": round_ratios[0],
        "x_floor_rounds_max": round_ratios[-1],
    }


# -------------------------------------------------------------------------------------------
# output
# -------------------------------------------------------------------------------------------


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) >= 1e5:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}" if abs(value) < 1 else f"{value:,.{max(0, digits - 1)}f}"
    return str(value)


def print_table(rows: Iterable[dict[str, Any]], columns: Sequence[str], title: str | None = None) -> str:
    """A plain fixed-width table of `columns` of each row; printed and returned."""
    rows = list(rows)
    cells = [[fmt(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = []
    if title:
        lines.append(title)
    lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(columns, widths))))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths))))
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def write_json(path: Path | None, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically, with the user's umask (the library's `atomic_write`);
    no-op when path is None."""
    if path is None:
        return
    import_library()
    from dictionary_learning.files import atomic_write

    data = (json.dumps(payload, indent=2, default=str) + "\n").encode()
    atomic_write(path, lambda file: file.write(data))
    print(f"wrote {path}")


# -------------------------------------------------------------------------------------------
# this repository as `dictionary_learning`
# -------------------------------------------------------------------------------------------


def import_library():
    """`dictionary_learning` from this checkout, whatever its folder is called (scripts/_checkout.py)."""
    import runpy

    return runpy.run_path(str(REPO_ROOT / "scripts" / "_checkout.py"))["import_checkout"]()


def our_trainer_names(names: Iterable[str] | None = None) -> list[str]:
    """The recipes to run: `names`, or every recipe of the registry."""
    import_library()
    from dictionary_learning.trainers import trainer_names

    wanted = list(names) if names else trainer_names()
    unknown = sorted(set(wanted) - set(trainer_names()))
    if unknown:
        raise SystemExit(f"unknown trainer(s) {unknown}; known: {', '.join(trainer_names())}")
    return wanted


# -------------------------------------------------------------------------------------------
# the reference library in its own virtualenv
# -------------------------------------------------------------------------------------------
#
# saprmarks/dictionary_learning 0.1.0 needs nnsight 0.3.x (which needs transformers 4.x); ours
# needs nnsight 0.8 / transformers 5, so the reference lives in its own virtualenv. The torch of
# that venv is the version running here (same kernels in both columns); it is installed first
# from the CPU wheel, and everything that would pull a CUDA torch (nnsight's own pins) is
# installed with --no-deps.


def _reference_recipe() -> list[list[str]]:
    torch_version = torch.__version__.split("+")[0]
    torch_spec = os.environ.get("DL_BENCH_TORCH_SPEC", f"torch=={torch_version}")
    return [
        [torch_spec],
        # what nnsight 0.3.7 and dictionary_learning 0.1.0 import at run time (no torchvision,
        # diffusers, wandb, umap, plotly: only the modules we never import need those)
        ["transformers==4.46.3", "tokenizers", "accelerate", "pydantic>=2.9", "pyyaml", "typing_extensions",
         "einops", "tqdm", "numpy", "zstandard", "protobuf", "python-socketio[client]", "sentencepiece",
         "pillow"],
        ["--no-deps", "nnsight==0.3.7", f"dictionary-learning=={REFERENCE_VERSION}"],
    ]


def _recipe_key() -> str:
    return hashlib.sha256(json.dumps([_reference_recipe(), sys.version_info[:2]]).encode()).hexdigest()[:16]


def reference_python(verbose: bool = True) -> Path:
    """The interpreter of the reference virtualenv, creating it on first use (idempotent: a
    marker records the recipe it was built from; a concurrent caller waits on a file lock)."""
    python = REFERENCE_VENV / "bin" / "python"
    marker = CACHE_DIR / "venv_ready.json"
    key = _recipe_key()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    with open(CACHE_DIR / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with contextlib.suppress(OSError, ValueError):
            if python.exists() and json.loads(marker.read_text()).get("key") == key:
                return python
        if verbose:
            print(f"building the reference virtualenv in {REFERENCE_VENV} (once; a few minutes)", flush=True)
        marker.unlink(missing_ok=True)
        if not python.exists():  # a half-built venv is completed: pip skips what is installed
            base = getattr(sys, "_base_executable", sys.executable)
            _run([base, "-m", "venv", str(REFERENCE_VENV)], verbose)
        pip = [str(python), "-m", "pip", "install", "--disable-pip-version-check", "--progress-bar", "off"]
        for step in _reference_recipe():
            _run(pip + step, verbose)
        check = ("import torch, nnsight, transformers, dictionary_learning as d, dictionary_learning.trainers; "
                 "print(d.__file__, torch.__version__, nnsight.__version__, transformers.__version__)")
        out = _run([str(python), "-c", check], verbose, cwd=tempfile.gettempdir())
        marker.write_text(json.dumps({"key": key, "recipe": _reference_recipe(), "check": out.strip()}))
        return python


def _run(cmd: list[str], verbose: bool, cwd: str | None = None) -> str:
    if verbose:
        print("  $", " ".join(cmd), flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd)
    if proc.returncode != 0:
        raise SystemExit(
            f"reference virtualenv setup failed at: {' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}\n"
            f"Fix the step above (or delete {CACHE_DIR} and retry)."
        )
    return proc.stdout


def run_reference(task: str, config: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None,
                  threads: int = 2, timeout: float | None = None, extra_env: dict[str, str] | None = None
                  ) -> dict[str, Any]:
    """Run `reference_worker.py <task>` in the reference venv with `config` and `tensors`
    (passed through one temporary .pt file); returns the worker's JSON result."""
    python = reference_python()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OPENBLAS_NUM_THREADS=str(threads),
               TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONWARNINGS="ignore", **(extra_env or {}))
    with tempfile.TemporaryDirectory(prefix="dl_bench_") as tmp:
        payload, result = Path(tmp) / "task.pt", Path(tmp) / "result.json"
        torch.save({"task": task, "config": config, "threads": threads, "clock": _clock_name,
                    "tensors": tensors or {}}, payload)
        cmd = [str(python), str(BENCH_DIR / "reference_worker.py"), str(payload), str(result)]
        proc = subprocess.run(cmd, env=env, cwd=tmp, timeout=timeout, stdout=None, stderr=subprocess.PIPE,
                              text=True)
        if proc.returncode != 0 or not result.exists():
            raise RuntimeError(f"reference worker failed ({task}, exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        output = json.loads(result.read_text())
        if result.with_suffix(".pt").exists():  # tensors the worker sent back (trained weights)
            output["tensors"] = torch.load(result.with_suffix(".pt"), weights_only=True)
        return output


# -------------------------------------------------------------------------------------------
# the recipes, as each library spells them
# -------------------------------------------------------------------------------------------

MATRYOSHKA_GROUP_FRACTIONS = [1 / 32, 1 / 16, 1 / 8, 1 / 4, 1 - (1 / 32 + 1 / 16 + 1 / 8 + 1 / 4)]

# our recipe name -> (the reference's "module:Class" under dictionary_learning.trainers,
# hyperparameters given to both libraries). Each side keeps only the keys its recipe accepts
# (ours: the Config's fields; the reference: the __init__ arguments); the rest keep their defaults.
# Learning rates are the reference's defaults, passed explicitly to both; TopK-family rates are
# its 2e-4/sqrt(F/2^14) rule (trainer_kwargs).
TRAINER_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "StandardTrainer": ("standard:StandardTrainer", {"lr": 1e-3, "l1_penalty": 0.1}),
    "StandardTrainerAprilUpdate": ("standard:StandardTrainerAprilUpdate", {"lr": 1e-3, "l1_penalty": 0.1}),
    "GatedSAETrainer": ("gdm:GatedSAETrainer", {"lr": 5e-5, "l1_penalty": 0.1}),
    # the reference's PAnnealTrainer defaults (sparsity_function="Lp", p_end=0) divide by zero once p
    # reaches 0: both libraries get the paper's Lp^p and p_end=0.2 (our defaults)
    "PAnnealTrainer": ("p_anneal:PAnnealTrainer", {"lr": 1e-3, "initial_sparsity_penalty": 0.1,
                                                   "sparsity_function": "Lp^p", "p_end": 0.2}),
    "GatedAnnealTrainer": ("gated_anneal:GatedAnnealTrainer", {"lr": 3e-4, "initial_sparsity_penalty": 0.1,
                                                               "sparsity_function": "Lp^p", "p_end": 0.2}),
    "TopKTrainer": ("top_k:TopKTrainer", {"k": 32}),
    "BatchTopKTrainer": ("batch_top_k:BatchTopKTrainer", {"k": 32}),
    "JumpReluTrainer": ("jumprelu:JumpReluTrainer", {"lr": 7e-5, "target_l0": 32.0}),
    "MatryoshkaBatchTopKTrainer": (
        "matryoshka_batch_top_k:MatryoshkaBatchTopKTrainer",
        {"k": 32, "group_fractions": MATRYOSHKA_GROUP_FRACTIONS},
    ),
}
TOPK_FAMILY = ("TopKTrainer", "BatchTopKTrainer", "MatryoshkaBatchTopKTrainer")


def trainer_kwargs(name: str, activation_dim: int, dict_size: int, steps: int, seed: int,
                   overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hyperparameters of recipe `name` for one run, identical for both libraries."""
    _, extra = TRAINER_SPECS[name]
    kwargs = {"activation_dim": activation_dim, "dict_size": dict_size, "steps": steps, "seed": seed,
              "device": "cpu", **extra}
    if name in TOPK_FAMILY:  # Gao et al.'s rate, the reference's default (ours scales it up for short runs)
        kwargs["lr"] = 2e-4 / math.sqrt(dict_size / 2**14)
    kwargs.update(overrides or {})
    return kwargs


def build_our_trainer(name: str, kwargs: dict[str, Any]):
    """Our trainer for recipe `name`, given only the keys its Config has (the reference's names
    for λ read as ours); returns (trainer, keys that were dropped)."""
    import_library()
    from dictionary_learning.runs import current_field_names
    from dictionary_learning.trainers import get_trainer_class
    from dictionary_learning.trainers.base import config_field_names
    from dictionary_learning.training import build_trainer

    kwargs = current_field_names(kwargs)
    fields = set(config_field_names(get_trainer_class(name).Config))
    dropped = sorted(set(kwargs) - fields)
    config = {"trainer": name, **{k: v for k, v in kwargs.items() if k in fields}}
    return build_trainer(config), dropped


def describe_error(error: BaseException) -> str:
    """`Type: message (file:line)` of the innermost frame, for a table's note column."""
    import traceback

    frames = traceback.extract_tb(error.__traceback__)
    where = f" ({Path(frames[-1].filename).name}:{frames[-1].lineno})" if frames else ""
    return f"{type(error).__name__}: {error}{where}"


def timed_training(update: Callable[[int, torch.Tensor], Any], first_batch: torch.Tensor,
                   next_batch: Callable[[], torch.Tensor], steps: int) -> float:
    """Run update(step, batch) for `steps` steps (the first on `first_batch`, then on
    next_batch()); returns the seconds spent in update only (data generation excluded)."""
    seconds = 0.0
    batch = first_batch
    for step in range(steps):
        if step > 0:
            batch = next_batch()
        start = _clock()
        update(step, batch)
        seconds += _clock() - start
    return seconds
