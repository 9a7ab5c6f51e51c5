"""trainSAE: train one or many sparse autoencoders on one stream of activations.

Two call forms:

    ae = trainSAE(buffer, activation_dim, dictionary_size, lr=3e-4, sparsity_penalty=1e-3)
    aes = trainSAE(buffer, trainer_configs=[{"trainer": "TopKTrainer", "activation_dim": 512,
                                              "dict_size": 8192, "k": 32}, ...], steps=10_000)

The first trains the standard recipe (`StandardTrainer`) and returns its `AutoEncoder`; the second
trains every config on each batch (one pass of the language model feeds them all) and returns the
list of dictionaries. With `save_dir`, each trainer writes `ae.pt` + `config.json` (and
`checkpoints/ae_STEP.pt` at `save_steps`, and `log.jsonl`) into its own folder — `save_dir` itself
for the first form, `save_dir/trainer_i` for the second — and `resume_from=save_dir` continues an
interrupted run exactly.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .trainers import get_trainer_class
from .trainers.base import ConstrainedAdam, SAETrainer, TrainerConfig, config_field_names
from .utils import atomic_torch_save, atomic_write_json

__all__ = ["trainSAE", "ConstrainedAdam", "build_trainer"]

STATE_FILE = "training_state.pt"


def build_trainer(config: TrainerConfig | Mapping[str, Any], steps: int | None = None) -> SAETrainer:
    """A trainer from a config dataclass (e.g. `TopKTrainerConfig(...)`) or a dict with a
    "trainer" key (a recipe name or class). The caller's config is not mutated."""
    if isinstance(config, TrainerConfig):
        trainer_class = getattr(type(config), "trainer_class", None)
        if trainer_class is None:
            raise TypeError(f"{type(config).__name__} is not the config of a known trainer")
        config = dataclasses.replace(config)
    elif isinstance(config, Mapping):
        config = dict(config)
        trainer = config.pop("trainer", None) or config.pop("trainer_class", None)
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
    if isinstance(save_steps, int):
        return {save_steps}
    return {int(s) for s in save_steps}


def _export_dictionary(trainer: SAETrainer, activation_scale: float | None) -> torch.nn.Module:
    """The trainer's dictionary in raw activation space (normalisation folded into the biases)."""
    if activation_scale is None:
        return trainer.ae
    ae = copy.deepcopy(trainer.ae)
    ae.scale_biases(1.0 / activation_scale)
    return ae


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
    """Train sparse autoencoders on `data`, an iterator of activation batches [B, D] (an
    ActivationBuffer, a list, a DataLoader).

    Seed form: `activation_dim`, `dictionary_size`, `lr`, `sparsity_penalty` (λ), `entropy`,
    `warmup_steps`, `resample_steps`, `ghost_threshold` configure a StandardTrainer:

        L = (1/B) Σ_b ‖x_b − x̂_b‖²₂ + λ (1/B) Σ_b ‖f_b‖₁    (or the entropy of f_b/Σf_b)

    and its AutoEncoder is returned. Sweep form: `trainer_configs` (dataclass configs or dicts
    with a "trainer" key); the list of dictionaries is returned.

    steps: stop after this many batches (None: until `data` runs out).
    save_steps: step counts after which to write `checkpoints/ae_STEP.pt` (and a resumable state).
    log_steps: every this many steps, losses go to the progress bar, `log.jsonl` and wandb.
    normalize_activations: scale inputs by s so that E‖s·x‖² = 1 (s from the first batch); the
        saved and returned dictionaries take raw activations (s folded into their biases).
    autocast_dtype: e.g. torch.bfloat16 to run the forward passes under autocast.
    resume_from: a `save_dir` of an interrupted run: continue from its last saved state (pass the
        same `data` source from its beginning; the batches already used are skipped).
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
    save_at = _save_steps_set(save_steps)
    if save_at and save_dir is None:
        raise ValueError("save_steps needs save_dir (where to write the checkpoints)")
    if resume_from is not None and save_dir is None:
        save_dir = resume_from

    if seed is not None:
        torch.manual_seed(seed)
    trainers = [build_trainer(cfg, steps) for cfg in trainer_configs]
    activation_dims = {t.cfg.activation_dim for t in trainers}

    save_root = Path(save_dir) if save_dir is not None else None
    trainer_dirs: list[Path | None] = [
        (save_root if seed_form else save_root / f"trainer_{i}") if save_root is not None else None
        for i in range(len(trainers))
    ]

    start_step, activation_scale = 0, None
    if resume_from is not None:
        start_step, activation_scale = _load_training_state(Path(resume_from), trainers, trainer_dirs)

    run_info = {
        "steps": steps,
        "save_steps": sorted(save_at),
        "log_steps": log_steps,
        "normalize_activations": normalize_activations,
        "autocast_dtype": str(autocast_dtype) if autocast_dtype is not None else None,
        "seed": seed,
    }
    buffer_config = getattr(data, "config", None)
    log_files = []
    for trainer_dir in trainer_dirs:
        log_files.append(None)
        if trainer_dir is not None:
            trainer_dir.mkdir(parents=True, exist_ok=True)
            log_files[-1] = open(trainer_dir / "log.jsonl", "a" if resume_from else "w")

    wandb_run = None
    if use_wandb:
        try:
            import wandb
        except ImportError:
            raise ImportError("use_wandb=True needs wandb: pip install wandb") from None
        wandb_run = wandb.init(project=wandb_project, config={"trainers": [t.config for t in trainers], **run_info})

    def write_outputs(trainer_index: int, steps_done: int | None) -> None:
        trainer, trainer_dir = trainers[trainer_index], trainer_dirs[trainer_index]
        ae = _export_dictionary(trainer, activation_scale)
        config = {
            "trainer": trainer.config,
            "buffer": buffer_config,
            "training": {**run_info, "activation_scale": activation_scale},
        }
        if steps_done is None:
            atomic_torch_save(ae.state_dict(), trainer_dir / "ae.pt")
            atomic_write_json(config, trainer_dir / "config.json")
        else:
            atomic_torch_save(ae.state_dict(), trainer_dir / "checkpoints" / f"ae_{steps_done}.pt")
            if not (trainer_dir / "config.json").exists():
                atomic_write_json(config, trainer_dir / "config.json")

    autocast = (
        torch.autocast(device_type=torch.device(device).type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else nullcontext()
    )
    step = start_step
    data_iter = iter(data)
    try:
        for _ in range(start_step):  # fast-forward over the batches a resumed run already used
            next(data_iter)
    except StopIteration:
        raise ValueError(f"resume_from: data ran out while skipping the {start_step} batches already trained on") from None

    bar = tqdm(total=steps, initial=start_step, desc="trainSAE", disable=not progress, dynamic_ncols=True)
    try:
        for raw in data_iter:
            if steps is not None and step >= steps:
                break
            x = _check_batch(raw, step, activation_dims)
            if normalize_activations and activation_scale is None:
                activation_scale = float(1.0 / x.float().pow(2).sum(dim=-1).mean().sqrt().clamp_min(1e-12))
            if activation_scale is not None:
                x = x * activation_scale
            all_metrics = []
            for trainer in trainers:
                x_t = x.to(trainer.device, torch.float32, non_blocking=True)
                with autocast:
                    all_metrics.append(trainer.update(step, x_t))
            step += 1
            bar.update(1)

            if log_steps is not None and (step % log_steps == 0 or step == 1):
                logged = [{k: float(v) for k, v in m.items()} for m in all_metrics]
                for i, (metrics, log_file) in enumerate(zip(logged, log_files)):
                    if log_file is not None:
                        log_file.write(json.dumps({"step": step, "lr": trainers[i].optimizer.param_groups[0]["lr"], **metrics}) + "\n")
                        log_file.flush()
                if wandb_run is not None:
                    wandb_run.log({f"trainer_{i}/{k}": v for i, m in enumerate(logged) for k, v in m.items()}, step=step)
                bar.set_postfix(loss=f"{logged[0].get('loss', float('nan')):.4g}")

            if step in save_at:
                for i in range(len(trainers)):
                    write_outputs(i, step)
                _save_training_state(save_root, trainers, step, activation_scale)
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
        for i in range(len(trainers)):
            write_outputs(i, None)
    dictionaries = [_export_dictionary(t, activation_scale) for t in trainers]
    return dictionaries[0] if seed_form else dictionaries


def _save_training_state(save_root: Path, trainers: list[SAETrainer], steps_done: int, activation_scale) -> None:
    """Everything needed to continue exactly: every trainer's weights, optimizer, counters and
    recipe state, the RNG states and the step count. One file, replaced atomically."""
    state = {
        "steps_done": steps_done,
        "activation_scale": activation_scale,
        "trainers": [t.state_dict() for t in trainers],
        "rng": {
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        },
    }
    atomic_torch_save(state, save_root / STATE_FILE)


def _load_training_state(resume_dir: Path, trainers: list[SAETrainer], trainer_dirs) -> tuple[int, float | None]:
    path = resume_dir / STATE_FILE
    if not path.exists():
        raise FileNotFoundError(
            f"resume_from: {str(path)!r} not found; a run writes it at each of its save_steps"
        )
    state = torch.load(path, map_location="cpu", weights_only=False)
    if len(state["trainers"]) != len(trainers):
        raise ValueError(
            f"resume_from: {str(resume_dir)!r} holds {len(state['trainers'])} trainers but "
            f"{len(trainers)} configs were given; pass the same trainer_configs as the interrupted run"
        )
    for trainer, trainer_state in zip(trainers, state["trainers"]):
        trainer.load_state_dict(trainer_state)
    torch.set_rng_state(state["rng"]["torch"])
    if state["rng"]["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["steps_done"], state["activation_scale"]
