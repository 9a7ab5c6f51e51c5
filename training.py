"""trainSAE: train one or many sparse autoencoders on one stream of activations.

Two call forms:

    ae = trainSAE(buffer, activation_dim, dictionary_size, lr=3e-4, sparsity_penalty=1e-3)
    aes = trainSAE(buffer, trainer_configs=[{"trainer": "TopKTrainer", "activation_dim": 512,
                                              "dict_size": 8192, "k": 32}, ...], steps=10_000)

The first trains the standard recipe (`StandardTrainer`) and returns its `AutoEncoder`; the second
trains every config on each batch (one pass of the language model feeds them all) and returns the
list of dictionaries.

With `save_dir`, each trainer has its own folder — `save_dir` itself for the first form,
`save_dir/trainer_i` for the second — holding

    ae.pt                   the final weights (state dict, in raw activation space)
    config.json             {"trainer": {...}, "buffer": {...}, "training": {...}}
    checkpoints/ae_N.pt     the weights after N steps, for each N in `save_steps`
    log.jsonl               one JSON line of losses per logged step

and at each of `save_steps` `save_dir/training_state.pt` records everything needed to continue
exactly (weights, optimizer moments, schedules, dead-latent counters, recipe state, RNG states,
steps done): `trainSAE(..., resume_from=save_dir)` picks up from there. Every file is written
atomically (a crash leaves the previous version, never a truncated one).
"""
from __future__ import annotations

import copy
import json
import os
import random
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .trainers import get_trainer_class
from .trainers.base import ConstrainedAdam, SAETrainer, TrainerConfig, config_field_names
from .utils import _atomic_write, _json_default, atomic_torch_save, atomic_write_json

__all__ = ["trainSAE", "ConstrainedAdam", "build_trainer"]

STATE_FILE = "training_state.pt"
LOG_FILE = "log.jsonl"
RAW_TENSORS = "ae_tensors"  # key of the exact dictionary tensors in a saved trainer state


def build_trainer(
    config: TrainerConfig | Mapping[str, Any],
    steps: int | None = None,
    default_device: str | None = None,
) -> SAETrainer:
    """A trainer from a config dataclass (e.g. `TopKTrainerConfig(...)`) or a dict with a
    "trainer" key (a recipe name or class; a saved config.json's "trainer" section also works).
    `steps` fills `config.steps` when unset; `default_device` fills a dict's missing "device".
    The caller's config is not mutated."""
    if isinstance(config, TrainerConfig):
        trainer_class = getattr(type(config), "trainer_class", None)
        if trainer_class is None:
            raise TypeError(f"{type(config).__name__} is not the config of a known trainer")
        config = copy.deepcopy(config)
    elif isinstance(config, Mapping):
        config = copy.deepcopy(dict(config))
        trainer = config.pop("trainer", None)
        trainer_class_name = config.pop("trainer_class", None)
        trainer = trainer or trainer_class_name
        config.pop("dict_class", None)
        if trainer is None:
            raise ValueError("trainer config dict needs a 'trainer' key: a recipe name such as 'TopKTrainer'")
        trainer_class = get_trainer_class(trainer) if isinstance(trainer, str) else trainer
        valid = config_field_names(trainer_class.Config)
        unknown = sorted(set(config) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown key(s) {unknown} in the config of {trainer_class.__name__}; valid keys: {', '.join(valid)}"
            )
        if default_device is not None:
            config.setdefault("device", default_device)
        try:
            config = trainer_class.Config(**config)
        except TypeError as e:
            raise ValueError(f"bad config for {trainer_class.__name__}: {e}") from None
    else:
        raise TypeError(f"a trainer config must be a dataclass config or a dict, got {type(config).__name__}")
    if config.steps is None:
        config.steps = steps
    if config.steps is not None and config.warmup_steps > config.steps:
        raise ValueError(
            f"warmup_steps ({config.warmup_steps}) is longer than the run (steps={config.steps}); "
            "lower warmup_steps or train for more steps"
        )
    return trainer_class(config)


def _check_batch(x: Any, step: int, activation_dims: set[int]) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"activations must yield tensors of shape [batch, activation_dim]; batch {step} is a {type(x).__name__}"
        )
    if x.ndim < 2:
        raise ValueError(f"activations batch {step} has shape {tuple(x.shape)}; expected [batch, activation_dim]")
    if x.shape[-1] not in activation_dims:
        raise ValueError(
            f"activations batch {step} has width {x.shape[-1]} but activation_dim is "
            f"{sorted(activation_dims)}: pass the width of the hooked submodule as activation_dim"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"activations batch {step} contains NaN or inf; check the model/buffer (e.g. fp16 overflow)"
        )
    return x.reshape(-1, x.shape[-1])


def _save_steps_set(save_steps) -> set[int]:
    if save_steps is None:
        return set()
    steps = [save_steps] if isinstance(save_steps, int) else list(save_steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0]
    if bad:
        raise ValueError(f"save_steps must be positive step counts (batches trained); got {bad}")
    return {int(s) for s in steps}


def _exported_state_dict(trainer: SAETrainer, activation_scale: float | None) -> dict[str, torch.Tensor]:
    """The trainer's dictionary weights on the CPU, in raw activation space: trained on s·x, the
    biases (and thresholds) are scaled by 1/s so that the dictionary takes x and returns x̂."""
    if activation_scale is None:
        return {key: value.detach().cpu() for key, value in trainer.ae.state_dict().items()}
    cpu_copy = {key: value.detach().to("cpu", copy=True) for key, value in trainer.ae.state_dict().items()}
    dictionary = type(trainer.ae).from_state_dict(cpu_copy)
    dictionary.scale_biases(1.0 / activation_scale)
    return dictionary.state_dict()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if state.get("numpy") is not None:
        np.random.set_state(state["numpy"])
    if state.get("python") is not None:
        random.setstate(state["python"])


def trainSAE(
    data: Iterable[torch.Tensor],
    activation_dim: int | None = None,
    dictionary_size: int | None = None,
    lr: float | None = None,
    sparsity_penalty: float | None = None,
    entropy: bool = False,
    steps: int | None = None,
    warmup_steps: int = 1000,
    resample_steps: int | None = None,
    ghost_threshold: int | None = None,
    save_steps: int | Sequence[int] | None = None,
    save_dir: str | os.PathLike | None = None,
    log_steps: int | None = 1000,
    device: str = "cpu",
    *,
    trainer_configs: Sequence[TrainerConfig | Mapping[str, Any]] | None = None,
    use_wandb: bool = False,
    wandb_project: str = "dictionary_learning",
    normalize_activations: bool = False,
    autocast_dtype: torch.dtype | None = None,
    resume_from: str | os.PathLike | None = None,
    seed: int | None = None,
    progress: bool = True,
):
    """Train sparse autoencoders on `data`, an iterator of activation batches [B, D] or
    [B, L, D] (an ActivationBuffer, a list, a DataLoader).

    Seed form: `activation_dim`, `dictionary_size`, `lr`, `sparsity_penalty` (λ), `entropy`,
    `warmup_steps`, `resample_steps`, `ghost_threshold` configure a StandardTrainer:

        L = (1/B) Σ_b ‖x_b − x̂_b‖²₂ + λ (1/B) Σ_b ‖f_b‖₁    (or the entropy of f_b/Σf_b)

    and its AutoEncoder is returned. Sweep form: `trainer_configs` (dataclass configs or dicts
    with a "trainer" key; not mutated); every trainer sees every batch; the list of
    dictionaries is returned, in order.

    steps: stop after this many batches (None: until `data` runs out).
    save_steps: step counts N after which to write `checkpoints/ae_N.pt` and the resumable state.
    log_steps: every this many steps (and after the first), losses go to the progress bar,
        each trainer's `log.jsonl` and, with `use_wandb`, to wandb (imported only then).
    device: where dict configs without a "device" (and the seed form) train.
    normalize_activations: scale inputs by s so that E‖s·x‖² = 1 (s from the first batch); the
        saved and returned dictionaries take raw activations (s folded into their biases and
        thresholds); s is recorded as config["training"]["activation_scale"] (its inverse,
        the reference library's `norm_factor`, as "norm_factor").
    autocast_dtype: e.g. torch.bfloat16 to run the training steps under torch.autocast.
    resume_from: the `save_dir` of an interrupted run: continue from its last saved state. Pass
        the same configs and the same `data` from its beginning (the batches already trained
        on are read and skipped), and the run ends exactly as an uninterrupted one would.
    seed: seeds torch before the trainers are built (configs may carry their own seed).
    """
    seed_form = trainer_configs is None
    if seed_form:
        missing = [
            n
            for n, v in [("activation_dim", activation_dim), ("dictionary_size", dictionary_size), ("lr", lr),
                         ("sparsity_penalty", sparsity_penalty)]
            if v is None
        ]
        if missing:
            raise ValueError(
                f"trainSAE needs {', '.join(missing)} (or trainer_configs=[...] to train other recipes)"
            )
        trainer_configs = [
            {
                "trainer": "StandardTrainer",
                "activation_dim": activation_dim,
                "dict_size": dictionary_size,
                "lr": lr,
                "l1_penalty": sparsity_penalty,
                "entropy": entropy,
                "warmup_steps": warmup_steps,
                "resample_steps": resample_steps,
                "ghost_threshold": ghost_threshold,
                "device": device,
                "seed": seed,
            }
        ]
    else:
        given = [n for n, v in [("activation_dim", activation_dim), ("dictionary_size", dictionary_size),
                                ("lr", lr), ("sparsity_penalty", sparsity_penalty)] if v is not None]
        if given:
            raise ValueError(
                f"pass {', '.join(given)} inside each of trainer_configs, not to trainSAE, when trainer_configs is given"
            )
        if isinstance(trainer_configs, (Mapping, TrainerConfig)):
            trainer_configs = [trainer_configs]
        if len(trainer_configs) == 0:
            raise ValueError("trainer_configs is empty; pass at least one trainer config")
    if steps is not None and steps <= 0:
        raise ValueError(f"steps must be a positive number of batches or None, got {steps}")
    if log_steps is not None and log_steps <= 0:
        raise ValueError(f"log_steps must be positive or None, got {log_steps}")
    if resume_from is not None:
        resume_from = Path(resume_from)
        if not (resume_from / STATE_FILE).exists():
            raise FileNotFoundError(
                f"resume_from: {str(resume_from / STATE_FILE)!r} not found; a run writes it at each of its "
                "save_steps (pass the save_dir of a run that had save_steps)"
            )
        if save_dir is None:
            save_dir = resume_from
    save_at = _save_steps_set(save_steps)
    if save_at and save_dir is None:
        raise ValueError("save_steps needs save_dir (where to write the checkpoints)")

    if seed is not None:
        torch.manual_seed(seed)
    trainers = [build_trainer(cfg, steps, default_device=device) for cfg in trainer_configs]
    activation_dims = {t.cfg.activation_dim for t in trainers}

    save_root = Path(save_dir) if save_dir is not None else None
    trainer_dirs: list[Path | None] = [
        (save_root if seed_form else save_root / f"trainer_{i}") if save_root is not None else None
        for i in range(len(trainers))
    ]

    start_step, activation_scale, saved_rng = 0, None, None
    if resume_from is not None:
        start_step, activation_scale, saved_rng = _load_training_state(resume_from, trainers)

    run_info = {
        "steps": steps,
        "save_steps": sorted(save_at),
        "log_steps": log_steps,
        "normalize_activations": normalize_activations,
        "autocast_dtype": str(autocast_dtype) if autocast_dtype is not None else None,
        "seed": seed,
    }
    buffer_config = getattr(data, "config", None)
    if callable(buffer_config):
        buffer_config = buffer_config()
    try:
        json.dumps(buffer_config, default=_json_default)
    except (TypeError, ValueError):
        buffer_config = repr(buffer_config)  # record what it was, even if not as JSON

    def full_config(trainer: SAETrainer) -> dict[str, Any]:
        scale = {"activation_scale": activation_scale, "norm_factor": None if activation_scale is None else 1.0 / activation_scale}
        return {"trainer": trainer.config, "buffer": buffer_config, "training": {**run_info, **scale}}

    log_files = []
    for i, trainer_dir in enumerate(trainer_dirs):
        log_files.append(None)
        if trainer_dir is None:
            continue
        trainer_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(full_config(trainers[i]), trainer_dir / "config.json")
        if resume_from is not None:
            previous = resume_from if seed_form else resume_from / f"trainer_{i}"
            _truncate_log(previous / LOG_FILE, trainer_dir / LOG_FILE, start_step)
        log_files[-1] = open(trainer_dir / LOG_FILE, "a" if resume_from is not None else "w")

    wandb_run = None
    if use_wandb:
        try:
            import wandb
        except ImportError:
            raise ImportError("use_wandb=True needs wandb: pip install wandb") from None
        wandb_run = wandb.init(project=wandb_project, config={"trainers": [t.config for t in trainers], **run_info})

    def save_checkpoint(steps_done: int) -> None:
        for trainer, trainer_dir in zip(trainers, trainer_dirs):
            atomic_torch_save(
                _exported_state_dict(trainer, activation_scale), trainer_dir / "checkpoints" / f"ae_{steps_done}.pt"
            )
            atomic_write_json(full_config(trainer), trainer_dir / "config.json")
        _save_training_state(save_root, trainers, steps_done, activation_scale)

    autocasts = [_autocast(trainer.device, autocast_dtype) for trainer in trainers]
    step = start_step
    data_iter = iter(data)
    for skipped in range(start_step):  # fast-forward over the batches the interrupted run used
        try:
            next(data_iter)
        except StopIteration:
            raise ValueError(
                f"resume_from: data ran out after {skipped} batches while skipping the {start_step} "
                "batches already trained on; pass the same data source, from its beginning"
            ) from None
    if saved_rng is not None:
        _set_rng_state(saved_rng)  # after the fast-forward, which may itself draw random numbers

    bar = tqdm(total=steps, initial=start_step, desc="trainSAE", disable=not progress, dynamic_ncols=True)
    try:
        while steps is None or step < steps:
            try:
                raw = next(data_iter)
            except StopIteration:
                break
            x = _check_batch(raw, step, activation_dims)
            if normalize_activations and activation_scale is None:
                activation_scale = float(1.0 / x.float().pow(2).sum(dim=-1).mean().sqrt().clamp_min(1e-12))
            all_metrics, inputs = [], {}  # one converted copy of the batch per device
            for trainer, autocast in zip(trainers, autocasts):
                if trainer.device not in inputs:
                    x_t = x.to(trainer.device, torch.float32, non_blocking=True)
                    inputs[trainer.device] = x_t * activation_scale if activation_scale is not None else x_t
                with autocast:
                    all_metrics.append(trainer.update(step, inputs[trainer.device]))
            step += 1
            bar.update(1)

            if log_steps is not None and (step % log_steps == 0 or step == 1):
                logged = [{k: float(v) for k, v in m.items()} for m in all_metrics]
                for trainer, metrics, log_file in zip(trainers, logged, log_files):
                    if log_file is not None:
                        lr_now = trainer.optimizer.param_groups[0]["lr"]
                        log_file.write(json.dumps({"step": step, "lr": lr_now, **metrics}) + "\n")
                        log_file.flush()
                if wandb_run is not None:
                    wandb_run.log({f"trainer_{i}/{k}": v for i, m in enumerate(logged) for k, v in m.items()}, step=step)
                bar.set_postfix(loss=f"{logged[0].get('loss', float('nan')):.4g}")

            if step in save_at:
                save_checkpoint(step)
    finally:
        bar.close()
        for log_file in log_files:
            if log_file is not None:
                log_file.close()
        if wandb_run is not None:
            wandb_run.finish()

    if step == 0:
        raise ValueError("activations yielded no batches: the data iterator is empty")
    if save_root is not None:
        if save_at and step not in save_at:
            _save_training_state(save_root, trainers, step, activation_scale)  # so the run can be extended
        for trainer, trainer_dir in zip(trainers, trainer_dirs):
            atomic_torch_save(_exported_state_dict(trainer, activation_scale), trainer_dir / "ae.pt")
            atomic_write_json(full_config(trainer), trainer_dir / "config.json")
    dictionaries = [trainer.ae for trainer in trainers]
    if activation_scale is not None:
        for dictionary in dictionaries:
            dictionary.scale_biases(1.0 / activation_scale)
    return dictionaries[0] if seed_form else dictionaries


def _truncate_log(source: Path, target: Path, steps_done: int) -> None:
    """Copy the log lines of steps ≤ `steps_done` (the ones the resumed run will not redo)."""
    lines = source.read_text().splitlines() if source.exists() else []
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= steps_done]
    data = "".join(line + "\n" for line in kept).encode()
    _atomic_write(target, lambda f: f.write(data))


def _save_training_state(save_root: Path, trainers: list[SAETrainer], steps_done: int, activation_scale) -> None:
    """Everything needed to continue exactly: every trainer's weights, optimizer, counters and
    recipe state, the RNG states and the step count. One file, replaced atomically."""
    state = {
        "steps_done": steps_done,
        "activation_scale": activation_scale,
        "configs": [t.config for t in trainers],
        "trainers": [{**t.state_dict(), RAW_TENSORS: _raw_tensors(t.ae)} for t in trainers],
        "rng": _rng_state(),
    }
    atomic_torch_save(state, save_root / STATE_FILE)


def _load_training_state(resume_dir: Path, trainers: list[SAETrainer]) -> tuple[int, float | None, dict]:
    path = resume_dir / STATE_FILE
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError(f"resume_from: could not read {str(path)!r} ({type(e).__name__}: {e})") from None
    if len(state["trainers"]) != len(trainers):
        raise ValueError(
            f"resume_from: {str(resume_dir)!r} holds {len(state['trainers'])} trainers but "
            f"{len(trainers)} configs were given; pass the same trainer_configs as the interrupted run"
        )
    for i, (trainer, saved) in enumerate(zip(trainers, state.get("configs", [None] * len(trainers)))):
        if saved is None:
            continue
        current = trainer.config
        differing = sorted(
            k for k in set(saved) | set(current) if k not in ("steps", "device") and saved.get(k) != current.get(k)
        )
        if differing:
            details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
            raise ValueError(
                f"resume_from: trainer {i}'s config differs from the interrupted run's ({details}); "
                "pass the same trainer_configs"
            )
    for trainer, trainer_state in zip(trainers, state["trainers"]):
        raw = trainer_state.pop(RAW_TENSORS, None)
        # the optimizer places its own state (Adam keeps `step` on the CPU)
        trainer.load_state_dict({
            key: value if key == "optimizer" else _to_device(value, trainer.device)
            for key, value in trainer_state.items()
        })
        if raw is not None:
            _restore_raw_tensors(trainer.ae, raw)
    return state["steps_done"], state["activation_scale"], state["rng"]


def _raw_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter and buffer as stored, bypassing state-dict hooks (a dictionary may save a
    transformed tensor, e.g. θ = exp(log θ), which does not round-trip bit for bit)."""
    return {name: t.detach() for name, t in [*module.named_parameters(), *module.named_buffers()]}


@torch.no_grad()
def _restore_raw_tensors(module: torch.nn.Module, raw: dict[str, torch.Tensor]) -> None:
    tensors = dict([*module.named_parameters(), *module.named_buffers()])
    if set(tensors) != set(raw):
        raise ValueError(
            f"resume_from: the saved {type(module).__name__} has tensors {sorted(raw)} but this one has "
            f"{sorted(tensors)}; was it saved by another version of dictionary_learning?"
        )
    for name, value in raw.items():
        tensors[name].copy_(value)


def _to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in a nested state, moved to `device`."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_device(v, device) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_device(v, device) for v in obj)
    return obj
