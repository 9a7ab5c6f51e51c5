"""Where a training run keeps its files: one folder per trainer, and the sweep's exact state.

    save_dir/trainer_i/          (in trainSAE's seed form, save_dir itself is trainer 0's folder)
        ae.pt                    final weights (state dict, raw activation space)
        config.json              {"trainer": {...}, "buffer": {...}, "training": {...}}
        log.jsonl                one JSON line of metrics per logged step
        checkpoints/ae_N.pt      the weights after N steps
    save_dir/training_state.pt   everything needed to continue exactly (Checkpointer)

Every file is written atomically (files.atomic_write). `RunFolder` writes the trainer folders;
`Checkpointer` saves and loads the exact state of every trainer (weights, optimizer moments,
schedules, dead-latent counters, recipe state, random generators, steps done). The state file is
read with torch.load(weights_only=True): loading it runs no code from the file.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, NamedTuple, Sequence

import torch

from .files import atomic_torch_save, atomic_write, atomic_write_json, json_default, remove_temporary_files
from .trainers.base import SAETrainer

STATE_FILE = "training_state.pt"
LOG_FILE = "log.jsonl"
STATE_FORMAT = 2  # 1 (no "format" key): dictionary_learning 0.2, before the one weight layout

# trainer-config fields renamed since they were written (the reference library's names among them)
RENAMED_CONFIG_FIELDS = {"l1_penalty": "sparsity_penalty", "initial_sparsity_penalty": "sparsity_penalty",
                         "wandb_name": "name"}


def current_field_names(config: dict[str, Any]) -> dict[str, Any]:
    """A saved trainer config with renamed fields under their current names. Raises ValueError if a
    config gives a field under two names with different values."""
    config = dict(config)
    for old, new in RENAMED_CONFIG_FIELDS.items():
        if old in config:
            value = config.pop(old)
            if new in config and config[new] != value:
                raise ValueError(f"the config gives both {old}={value!r} and {new}={config[new]!r}; "
                                 f"{old} is the old name of {new}: pass {new} only")
            config[new] = value
    return config


def exported_weights(trainer: SAETrainer, activation_scale: float | None) -> dict[str, torch.Tensor]:
    """The trainer's dictionary weights, copied to the CPU, in raw activation space: trained on s·x,
    the biases (and thresholds) are scaled by 1/s so that the dictionary takes x and returns x̂."""
    state = {key: value.detach().clone(memory_format=torch.contiguous_format).cpu()
             for key, value in trainer.ae.state_dict().items()}
    if activation_scale is None:
        return state
    dictionary = type(trainer.ae).from_state_dict(state)
    dictionary.scale_biases(1.0 / activation_scale)
    return {key: value.contiguous() for key, value in dictionary.state_dict().items()}


LOCK_FILE = ".lock"


class RunLock:
    """An exclusive lock on a run folder, held for the whole run: `save_dir/.lock`, locked with
    flock. A second run into the same folder fails at once, naming the process that holds it; the
    kernel releases the lock when the holder ends, however it ends (kill -9 included)."""

    def __init__(self, folder: str | Path):
        self.path = Path(folder) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> "RunLock":
        import fcntl

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RuntimeError(f"save_dir {str(self.path.parent)!r} is in use by another run ({holder}); wait for "
                               "it to end or pass another save_dir") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None


def previous_run(folder: str | Path) -> str | None:
    """What of an earlier run `folder` holds (a sentence), or None if it holds none."""
    folder = Path(folder)
    if (folder / STATE_FILE).exists():
        return "the resumable state of an earlier run"
    finished = [p for p in [folder / "ae.pt", *folder.glob("trainer_*/ae.pt")] if p.exists()]
    if finished:
        return f"the dictionaries of an earlier run ({str(finished[0])!r})"
    started = [p for p in [folder / "config.json", *folder.glob("trainer_*/config.json")] if p.exists()]
    if started:
        return f"an earlier run that saved no state ({str(started[0])!r})"
    return None


def clear_previous_run(folder: str | Path) -> None:
    """Remove the files an earlier run wrote into `folder` (trainSAE's overwrite=True): its state,
    and in each trainer folder its weights, checkpoints, config and log. Other files stay."""
    folder = Path(folder)
    (folder / STATE_FILE).unlink(missing_ok=True)
    for trainer_dir in [folder, *sorted(folder.glob("trainer_*"))]:
        for name in ("ae.pt", "config.json", LOG_FILE):
            (trainer_dir / name).unlink(missing_ok=True)
        for checkpoint in trainer_dir.glob("checkpoints/ae_*.pt"):
            checkpoint.unlink()


class RunFolder:
    """The trainer folders of one run: config.json, log.jsonl, checkpoints and ae.pt of each."""

    def __init__(self, save_dir: str | Path, n_trainers: int, single: bool):
        root = Path(save_dir)
        self.root, self.single = root, single
        self.trainer_dirs = [root] if single else [root / f"trainer_{i}" for i in range(n_trainers)]
        self.logs: list[Any] = []

    def start(self, configs: Sequence[dict], resumed_from: Path | None, steps_done: int) -> None:
        """Write every config.json and open the logs; a resumed run keeps the log lines of the
        steps it does not redo."""
        n_trainers = len(self.trainer_dirs)
        previous = RunFolder(resumed_from, n_trainers, self.single) if resumed_from is not None else None
        for folder in {self.root, *self.trainer_dirs}:  # what a killed write left behind
            remove_temporary_files(folder)
            remove_temporary_files(folder / "checkpoints")
        for i, (folder, config) in enumerate(zip(self.trainer_dirs, configs)):
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(config, folder / "config.json")
            if previous is not None:
                _keep_log_lines(previous.trainer_dirs[i] / LOG_FILE, folder / LOG_FILE, steps_done)
            self.logs.append(open(folder / LOG_FILE, "a" if previous is not None else "w"))

    def log(self, step: int, records: Sequence[dict[str, float]]) -> None:
        for log, record in zip(self.logs, records):
            log.write(json.dumps({"step": step, **record}) + "\n")
            log.flush()

    def save(self, weights: Sequence[dict[str, torch.Tensor]], configs: Sequence[dict], steps_done: int | None) -> None:
        """Each trainer's weights as checkpoints/ae_<steps_done>.pt, or as ae.pt (steps_done None),
        with its config.json brought up to date."""
        for folder, state, config in zip(self.trainer_dirs, weights, configs):
            name = "ae.pt" if steps_done is None else f"checkpoints/ae_{steps_done}.pt"
            atomic_torch_save(state, folder / name)
            atomic_write_json(config, folder / "config.json")

    def close(self) -> None:
        for log in self.logs:
            log.close()
        self.logs = []


def _keep_log_lines(source: Path, target: Path, steps_done: int) -> None:
    """Copy the log lines of steps ≤ `steps_done` (the ones the resumed run will not redo); lines
    that do not parse (a write cut short) are dropped."""
    kept = []
    for line in source.read_text().splitlines() if source.exists() else []:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= steps_done:
            kept.append(line + "\n")
    data = "".join(kept).encode()
    atomic_write(target, lambda file: file.write(data))


class SavedState(NamedTuple):
    steps_done: int
    activation_scale: Any  # {stream: s}, or one float / None in states written before sites
    data: dict[str, Any] | None  # the data's fingerprint (`trainSAE`), None in older states


class Checkpointer:
    """The exact state of every trainer of a run, in one file replaced atomically."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def save(self, trainers: Sequence[SAETrainer], steps_done: int, activation_scale: Any,
             data: dict[str, Any] | None = None) -> None:
        """`data`: what identifies the data stream (JSON-like), checked when the run resumes."""
        atomic_torch_save({
            "format": STATE_FORMAT,
            "steps_done": steps_done,
            "activation_scale": activation_scale,
            "data": json.dumps(data, default=json_default) if data is not None else None,
            "configs": [trainer.config for trainer in trainers],
            "trainers": [trainer.state_dict() for trainer in trainers],
        }, self.path)

    def load(self, trainers: Sequence[SAETrainer], restore: Sequence[bool] | None = None) -> SavedState:
        """Restore every trainer (with `restore`, those marked True: a rank trains only its sites');
        returns (steps done, activation scale, data fingerprint). The trainers must have been built
        from the configs of the saved run (checked, naming what differs)."""
        state = self._read()
        if len(state["trainers"]) != len(trainers):
            raise ValueError(
                f"resume_from: {str(self.path.parent)!r} holds {len(state['trainers'])} trainers but "
                f"{len(trainers)} configs were given; pass the same trainer_configs as the interrupted run"
            )
        for i, (trainer, saved) in enumerate(zip(trainers, state["configs"])):
            _check_same_config(i, trainer, current_field_names(saved))
        if state.get("format", 1) < STATE_FORMAT:
            _upgrade_format_1(state, trainers)
        for index, (trainer, trainer_state) in enumerate(zip(trainers, state["trainers"])):
            if restore is not None and not restore[index]:
                continue
            # the optimizer places its own state (Adam keeps `step` on the CPU); generators live on the CPU
            trainer.load_state_dict({
                key: value if key in ("optimizer", "generator") else _to_device(value, trainer.device)
                for key, value in trainer_state.items()
            })
        data = state.get("data")
        return SavedState(state["steps_done"], state["activation_scale"], json.loads(data) if data else None)

    def _read(self) -> dict[str, Any]:
        try:
            return torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as error:
            if _written_by_format_1(error):
                return _read_format_1(self.path)
            raise ValueError(
                f"resume_from: could not read {str(self.path)!r} ({type(error).__name__}: {error}); it is not "
                "a training state written by trainSAE, or it is damaged"
            ) from None


# trainer-config fields that only shape the initial weights, which a resumed run loads from its state
# instead, and the value a saved config without the field ran with (the tied init W_enc = W_decᵀ)
INITIALISATION_FIELDS = {"init_encoder_scale": 1.0}
# trainer-config fields added since, and the value a saved config without the field ran with (which
# the resumed run keeps)
ADDED_FIELDS = {"pre_act_penalty": 0.0, "pre_act_dead_tokens": 10_000}


def _check_same_config(index: int, trainer: SAETrainer, saved: dict[str, Any]) -> None:
    """Raises unless the trainer's config is the saved one, up to the fields that cannot change a
    resumed run (steps, device, a drawn seed, the initialisation, a default LR); those are recorded as saved."""
    current = trainer.config
    initialisation = {name: saved.get(name, old) for name, old in INITIALISATION_FIELDS.items() if name in current}
    added = {name: old for name, old in ADDED_FIELDS.items() if name in current and name not in saved}
    default_lr_kept = trainer.cfg.lr is None and "lr" in saved  # a default LR depends on steps, which may change
    ignored = ({"steps", "device"} | set(initialisation) | set(added) | ({"seed"} if trainer.seed_was_drawn else set())
               | ({"lr"} if default_lr_kept else set()))
    differing = sorted(k for k in set(saved) | set(current) if k not in ignored and saved.get(k) != current.get(k))
    if differing:
        details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
        raise ValueError(
            f"resume_from: trainer {index}'s config differs from the interrupted run's ({details}); "
            "pass the same trainer_configs"
        )
    if trainer.seed_was_drawn and saved.get("seed") is not None:
        trainer.cfg.seed = saved["seed"]  # record the seed the run was started with
    for name, value in {**initialisation, **added}.items():
        setattr(trainer.cfg, name, value)  # and the initialisation, and what the run started with
    if default_lr_kept:
        trainer.lr = saved["lr"]  # and the LR it was started with


def _to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in a nested state, moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


# --------------------------------------------------------------------------------------------
# Format 1: training states of dictionary_learning 0.2 (two weight layouts, JumpReLU trained in
# log θ, the global RNG states saved as numpy arrays)
# --------------------------------------------------------------------------------------------


def _written_by_format_1(error: Exception) -> bool:
    return "numpy" in str(error)


def _read_format_1(path: Path) -> dict[str, Any]:
    """Read a format-1 state: its numpy RNG states are rebuilt from numpy's array constructors
    only (an allow-list, still no arbitrary code)."""
    import numpy as np

    reconstruct = np._core.multiarray._reconstruct
    allowed = [np.dtype, np.ndarray, reconstruct, (reconstruct, "numpy.core.multiarray._reconstruct"),
               type(np.dtype("uint32"))]
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _upgrade_format_1(state: dict[str, Any], trainers: Sequence[SAETrainer]) -> None:
    """Map a format-1 state onto today's trainers, in place. The dictionary state dicts already
    use today's saved names; the optimizer state is indexed by parameter position, and positions
    and layouts changed: each moment goes to its parameter's new position, transposed where the
    parameter now is (W_enc [D, F], W_dec [F, D]). JumpReLU trained log θ: its moments are
    converted to θ's (∂L/∂θ = ∂L/∂log θ / θ). The global RNG states are dropped; each trainer's
    generator starts from its seed."""
    for trainer, saved in zip(trainers, state["trainers"]):
        raw = saved.pop("ae_tensors", {})
        dictionary = trainer.ae
        saved_names = dictionary.to_saved_names(dict(dictionary.named_parameters()))
        new_order = list(saved_names)  # saved keys of the parameters, in today's order
        old_order = [key for key in saved["ae"] if key in saved_names]  # in the order they were saved then
        transposed = {entry.key for entry in dictionary.saved_as.values() if entry.transposed}
        old_moments = saved["optimizer"]["state"]
        new_moments = {}
        for old_index, key in enumerate(old_order):
            if old_index not in old_moments:
                continue
            moments = dict(old_moments[old_index])
            for name in ("exp_avg", "exp_avg_sq"):
                if key in transposed:
                    moments[name] = moments[name].T.contiguous()
            if key == "threshold" and "log_threshold" in raw:
                theta = saved["ae"]["threshold"].clamp_min(1e-12)
                moments["exp_avg"] = moments["exp_avg"] / theta
                moments["exp_avg_sq"] = moments["exp_avg_sq"] / theta.pow(2)
            new_moments[new_order.index(key)] = moments
        saved["optimizer"]["state"] = new_moments
        saved["optimizer"]["param_groups"][0]["params"] = list(range(len(new_order)))
        saved.setdefault("extra", {}).pop("log_threshold", None)
