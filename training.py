"""trainSAE: train one or many sparse autoencoders on one stream of activations.

Two call forms:

    ae = trainSAE(buffer, activation_dim, dictionary_size, lr=3e-4, sparsity_penalty=1e-3)
    aes = trainSAE(buffer, trainer_configs=[{"trainer": "TopKTrainer", "activation_dim": 512,
                                              "dict_size": 8192, "k": 32}, ...], steps=10_000)

The first trains the standard recipe (`StandardTrainer`) and returns its `AutoEncoder`; the second
trains every config on each batch (one pass of the language model feeds them all) and returns the
list of dictionaries. With `save_dir`, each trainer gets a folder and the run a resumable state
(runs.py: `RunFolder`, `Checkpointer`); `trainSAE(..., resume_from=save_dir)` continues exactly.
"""
from __future__ import annotations

import copy
import json
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .files import json_default
from .normalization import activation_scale as unit_norm_scale
from .registry import recipe_class
from .runs import STATE_FILE, Checkpointer, RunFolder, current_field_names, exported_weights
from .sites import layer_of
from .trainers.base import ConstrainedAdam, SAETrainer, TrainerConfig, config_field_names

__all__ = ["trainSAE", "ConstrainedAdam", "build_trainer", "STATE_FILE"]


def build_trainer(
    config: TrainerConfig | Mapping[str, Any],
    steps: int | None = None,
    default_device: str | None = None,
    default_seed: int | None = None,
) -> SAETrainer:
    """A trainer from a config dataclass (e.g. `TopKTrainerConfig(...)`) or a dict with a
    "trainer" key (a recipe name or class; a saved config.json's "trainer" section also works, with
    its fields' old names). `steps` fills `config.steps` when unset; `default_device` and
    `default_seed` fill a missing "device" and an unset seed. The caller's config is not mutated."""
    if isinstance(config, TrainerConfig):
        trainer_class = getattr(type(config), "trainer_class", None)
        if trainer_class is None:
            raise TypeError(f"{type(config).__name__} is not the config of a known trainer")
        config = copy.deepcopy(config)
    elif isinstance(config, Mapping):
        config = current_field_names(copy.deepcopy(dict(config)))
        trainer = config.pop("trainer", None) or config.pop("trainer_class", None)
        config.pop("trainer_class", None)
        config.pop("dict_class", None)
        if trainer is None:
            raise ValueError("trainer config dict needs a 'trainer' key: a recipe name such as 'TopKTrainer'")
        trainer_class = recipe_class(trainer) if isinstance(trainer, str) else trainer
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
    if config.seed is None:
        config.seed = default_seed
    if config.steps is not None and config.warmup_steps > config.steps:
        raise ValueError(
            f"warmup_steps ({config.warmup_steps}) is longer than the run (steps={config.steps}); "
            "lower warmup_steps or train for more steps"
        )
    return trainer_class(config)


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------


@dataclass
class RunSettings:
    """trainSAE's arguments about the run itself (not about any one trainer), as config.json's
    "training" section records them."""

    steps: int | None
    save_steps: list[int]
    log_steps: int | None
    normalize_activations: bool
    autocast_dtype: str | None
    seed: int | None


def _seed_form_config(activation_dim, dictionary_size, lr, sparsity_penalty, **fields) -> dict[str, Any]:
    """The StandardTrainer config of trainSAE's seed form."""
    missing = [name for name, value in [("activation_dim", activation_dim), ("dictionary_size", dictionary_size),
                                        ("lr", lr), ("sparsity_penalty", sparsity_penalty)] if value is None]
    if missing:
        raise ValueError(f"trainSAE needs {', '.join(missing)} (or trainer_configs=[...] to train other recipes)")
    return {"trainer": "StandardTrainer", "activation_dim": activation_dim, "dict_size": dictionary_size, "lr": lr,
            "sparsity_penalty": sparsity_penalty, **fields}


def _check_sweep_form(trainer_configs, **seed_form_arguments) -> list:
    given = [name for name, value in seed_form_arguments.items() if value is not None]
    if given:
        raise ValueError(
            f"pass {', '.join(given)} inside each of trainer_configs, not to trainSAE, when trainer_configs is given"
        )
    if isinstance(trainer_configs, (Mapping, TrainerConfig)):
        trainer_configs = [trainer_configs]
    if len(trainer_configs) == 0:
        raise ValueError("trainer_configs is empty; pass at least one trainer config")
    return list(trainer_configs)


def _save_steps(save_steps) -> list[int]:
    if save_steps is None:
        return []
    steps = [save_steps] if isinstance(save_steps, int) else list(save_steps)
    bad = [s for s in steps if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0]
    if bad:
        raise ValueError(f"save_steps must be positive step counts (batches trained); got {bad}")
    return sorted({int(s) for s in steps})


def _check_batch(x: Any, step: int, width: int, what: str = "activations") -> torch.Tensor:
    """Batch `step` as [N, width]; errors name what is wrong with it."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"{what} must be tensors of shape [batch, activation_dim]; batch {step} is a {type(x).__name__}"
        )
    if x.ndim < 2:
        raise ValueError(f"{what} batch {step} has shape {tuple(x.shape)}; expected [batch, activation_dim]")
    if x.shape[-1] != width:
        raise ValueError(
            f"{what} batch {step} has width {x.shape[-1]} but the trainer expects {width}: pass the width of "
            "the hooked submodule as activation_dim"
        )
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what} batch {step} contains NaN or inf; check the model/buffer (e.g. fp16 overflow)"
        )
    return x.reshape(-1, x.shape[-1])


def _stream(batch: Any, trainer: SAETrainer, index: int, step: int) -> Any:
    """The part of `batch` that trainer `index` trains on: the batch itself, or with a dict of
    sites (a multi-site buffer), the entry of the trainer's `site`; each tensor checked."""
    site = trainer.cfg.site
    where = f"trainer {index} ({type(trainer).__name__})"
    if isinstance(batch, Mapping):
        if site is None:
            if len(batch) != 1:
                raise ValueError(f"{where} has no site, but the data yields the sites {list(batch)}: set 'site' in "
                                 "its config")
            site = next(iter(batch))
        if site not in batch:
            raise ValueError(f"{where} reads site {site!r}, which the data does not collect; it collects {list(batch)}")
        batch, what = batch[site], f"site {site!r}"
    elif site is not None:
        raise ValueError(f"{where} reads site {site!r}, but the data yields one stream of tensors, not sites: build "
                         "the buffer with submodules=[...], or drop 'site'")
    else:
        what = "activations"
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"{what}: a batch of pairs must be (inputs, outputs); got {len(batch)} tensors")
        output_dim = getattr(trainer.cfg, "output_dim", None) or trainer.cfg.activation_dim
        return (_check_batch(batch[0], step, trainer.cfg.activation_dim, f"{what} inputs"),
                _check_batch(batch[1], step, output_dim, f"{what} outputs"))
    return _check_batch(batch, step, trainer.cfg.activation_dim, what)


def _check_sites(trainers: Sequence[SAETrainer], data: Any) -> None:
    """Before any forward pass: each trainer's site is one the data collects."""
    sites = getattr(data, "sites", None)
    if not isinstance(sites, Mapping):
        return
    for index, trainer in enumerate(trainers):
        site = trainer.cfg.site
        if site is not None and site not in sites:
            raise ValueError(f"trainer {index} ({type(trainer).__name__}) reads site {site!r}, which the buffer does "
                             f"not collect; it collects {list(sites)}")


def _buffer_config(data: Any, site: str | None = None) -> Any:
    """What the data source says about itself (an ActivationBuffer's config; with a multi-site
    buffer, the config of the trainer's site), as JSON allows."""
    site_config = getattr(data, "site_config", None)
    single = getattr(data, "single_site", True)
    if callable(site_config) and not single:
        config = site_config(site if site is not None else next(iter(data.sites)))
    else:
        config = getattr(data, "config", None)
        if callable(config):
            config = config()
    try:
        json.dumps(config, default=json_default)
    except (TypeError, ValueError):
        config = repr(config)  # record what it was, even if not as JSON
    return config


def _record_provenance(trainer: SAETrainer, buffer_config: Any) -> None:
    """Fill the trainer's unset lm_name, layer and submodule_name from its buffer's config, so that
    its folder says where its activations come from."""
    if not isinstance(buffer_config, Mapping):
        return
    submodule = buffer_config.get("submodule")
    found = {"lm_name": buffer_config.get("model"), "submodule_name": submodule,
             "layer": buffer_config.get("layer", layer_of(submodule) if isinstance(submodule, str) else None)}
    for name, value in found.items():
        if getattr(trainer.cfg, name) is None and value is not None:
            setattr(trainer.cfg, name, value)


def _data_source(data: Any) -> dict[str, Any] | None:
    """What identifies the data stream, saved with a run's state and compared when resuming: the
    source's `fingerprint` (CachedActivations), else its config without the device (an
    ActivationBuffer: model, sites, seed, ...), else None (a list, a generator: not checked)."""
    fingerprint = getattr(data, "fingerprint", None)
    if isinstance(fingerprint, Mapping):
        return json.loads(json.dumps(fingerprint, default=json_default))
    config = getattr(data, "config", None)
    if isinstance(config, Mapping):
        return json.loads(json.dumps({k: v for k, v in config.items() if k != "device"}, default=json_default))
    return None


def _check_same_data_source(saved: Any, current: Any, resume_from: Path) -> None:
    """A run resumes on the data source it was interrupted on (when the saved state names one)."""
    if saved is None or saved == current:
        return
    if current is None or not isinstance(saved, Mapping) or not isinstance(current, Mapping):
        raise ValueError(f"resume_from: the run in {str(resume_from)!r} was trained on {saved!r}, but the data now is "
                         "another kind of source; pass the same data source")
    differing = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
    details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {current.get(k)!r}" for k in differing)
    raise ValueError(f"resume_from: the data source differs from the interrupted run's ({details}); pass the same "
                     "data source (for an ActivationBuffer, the same seed; for a CachedActivations, the same cache "
                     "and reader settings)")


def _batches_after(data: Iterable[torch.Tensor], steps_done: int) -> Iterator[torch.Tensor]:
    """`data`'s batches after the first `steps_done` (a resumed run's): skipped by the source itself
    when it can (`data.skip(n)`, e.g. CachedActivations: nothing decoded), else read and skipped."""
    skip = getattr(data, "skip", None)
    if steps_done and callable(skip):
        skip(steps_done)
        return iter(data)
    batches = iter(data)
    for skipped in range(steps_done):
        try:
            next(batches)
        except StopIteration:
            raise ValueError(
                f"resume_from: data ran out after {skipped} batches while skipping the {steps_done} "
                "batches already trained on; pass the same data source, from its beginning"
            ) from None
    return batches


# --------------------------------------------------------------------------------------------
# trainSAE
# --------------------------------------------------------------------------------------------


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
    normalize_activations: scale inputs by s so that E‖s·x‖² = 1 (s from the data's
        `mean_squared_norm(site)` when it has one, as a CachedActivations does from its manifest,
        else from the first batch); the saved and returned dictionaries take raw activations
        (normalization.py).
    autocast_dtype: e.g. torch.bfloat16 to run the training steps under torch.autocast.
    resume_from: the `save_dir` of an interrupted run: continue from its last saved state. Pass
        the same configs and the same `data` from its beginning (the batches already trained
        on are skipped: by the source itself when it has `skip(n)`, as CachedActivations does
        without decoding them, else read), and the run ends exactly as an uninterrupted one
        would. A data source that says what it is (an ActivationBuffer's config, a
        CachedActivations' fingerprint) is compared with the interrupted run's.
    seed: the seed of every trainer whose config sets none (a sweep's trainers then start from the
        same random draws); None: each trainer draws a random seed, recorded in its config.json.
    """
    seed_form = trainer_configs is None
    if seed_form:
        configs = [_seed_form_config(activation_dim, dictionary_size, lr, sparsity_penalty, entropy=entropy,
                                     warmup_steps=warmup_steps, resample_steps=resample_steps,
                                     ghost_threshold=ghost_threshold, device=device)]
    else:
        configs = _check_sweep_form(trainer_configs, activation_dim=activation_dim, dictionary_size=dictionary_size,
                                    lr=lr, sparsity_penalty=sparsity_penalty)
    if steps is not None and steps <= 0:
        raise ValueError(f"steps must be a positive number of batches or None, got {steps}")
    if log_steps is not None and log_steps <= 0:
        raise ValueError(f"log_steps must be positive or None, got {log_steps}")
    checkpoint_steps = _save_steps(save_steps)
    if resume_from is not None:
        resume_from = Path(resume_from)
        if not (resume_from / STATE_FILE).exists():
            raise FileNotFoundError(
                f"resume_from: {str(resume_from / STATE_FILE)!r} not found; a run writes it at each of its "
                "save_steps (pass the save_dir of a run that had save_steps)"
            )
        save_dir = resume_from if save_dir is None else save_dir
    if checkpoint_steps and save_dir is None:
        raise ValueError("save_steps needs save_dir (where to write the checkpoints)")
    settings = RunSettings(steps, checkpoint_steps, log_steps, normalize_activations,
                           str(autocast_dtype) if autocast_dtype is not None else None, seed)

    trainers = [build_trainer(config, steps, default_device=device, default_seed=seed) for config in configs]
    _check_sites(trainers, data)
    buffer_configs = [_buffer_config(data, trainer.cfg.site) for trainer in trainers]
    for trainer, buffer_config in zip(trainers, buffer_configs):
        _record_provenance(trainer, buffer_config)
    steps_done, scales = 0, {}
    data_source = _data_source(data)
    if resume_from is not None:
        checkpointer = Checkpointer(resume_from / STATE_FILE)
        steps_done, saved_scales = checkpointer.load(trainers)
        _check_same_data_source(checkpointer.data_source, data_source, resume_from)
        scales = _scales(saved_scales)
    elif normalize_activations:
        scales = _known_scales(data, trainers)
    run = _Run(trainers, settings, buffer_configs, save_dir, seed_form, use_wandb, wandb_project, data_source)
    try:
        run.start(resume_from, steps_done, scales)
        steps_done = _train(trainers, _batches_after(data, steps_done), run, steps_done, scales, settings,
                            autocast_dtype, progress)
    finally:
        run.close()
    if steps_done == 0:
        raise ValueError("activations yielded no batches: the data iterator is empty")
    run.finish(steps_done, scales)
    for trainer in trainers:
        scale = scales.get(_stream_key(trainer))
        if scale is not None:
            trainer.ae.scale_biases(1.0 / scale)
    dictionaries = [trainer.ae for trainer in trainers]
    return dictionaries[0] if seed_form else dictionaries


def _stream_key(trainer: SAETrainer) -> str:
    """The key of the stream a trainer reads in the run's activation scales: its site ("" for none)."""
    return trainer.cfg.site or ""


def _scales(saved: Any) -> dict[str, float]:
    """Activation scales per stream from a training state (runs before sites saved one float or None)."""
    if saved is None:
        return {}
    return dict(saved) if isinstance(saved, Mapping) else {"": float(saved)}


def _known_scales(data: Any, trainers: Sequence[SAETrainer]) -> dict[str, float]:
    """The activation scale s = 1/√E‖x‖² of every stream the trainers read, when the data knows
    E‖x‖² in advance (a `mean_squared_norm(site)` method, e.g. CachedActivations' whole-cache
    statistic); {} otherwise, and s then comes from each stream's first batch."""
    known = getattr(data, "mean_squared_norm", None)
    if not callable(known):
        return {}
    sites = getattr(data, "sites", None)
    scales = {}
    for key in dict.fromkeys(_stream_key(trainer) for trainer in trainers):
        if not key and isinstance(sites, Mapping) and len(sites) != 1:
            continue  # a trainer without a site on several sites: _stream names the problem
        scales[key] = 1.0 / max(float(known(key or None)), 1e-24) ** 0.5
    return scales


def _train(trainers, batches, run, step, scales: dict[str, float], settings: RunSettings, autocast_dtype,
           progress) -> int:
    """The training loop: every trainer steps on every batch (on its site's part of it). Fills
    `scales` (per stream, from its first batch) with normalize_activations. Returns the steps done."""
    autocasts = [_autocast(trainer.device, autocast_dtype) for trainer in trainers]
    bar = tqdm(total=settings.steps, initial=step, desc="trainSAE", disable=not progress, dynamic_ncols=True)
    with bar:
        for batch in batches:
            if settings.steps is not None and step >= settings.steps:
                break
            inputs = {}  # one converted copy of each stream per device
            metrics = []
            for index, (trainer, autocast) in enumerate(zip(trainers, autocasts)):
                key = (_stream_key(trainer), trainer.device)
                if key not in inputs:
                    inputs[key] = _prepared(_stream(batch, trainer, index, step), key[0], trainer.device, scales,
                                            settings.normalize_activations)
                with autocast:
                    metrics.append(trainer.update(step, inputs[key]))
            step += 1
            bar.update(1)
            if settings.log_steps is not None and (step % settings.log_steps == 0 or step == 1):
                logged = run.log(step, metrics)
                bar.set_postfix(loss=f"{logged[0].get('loss', float('nan')):.4g}")
            if step in settings.save_steps:
                run.checkpoint(step, scales)
    return step


def _prepared(stream, key: str, device: torch.device, scales: dict[str, float], normalize: bool):
    """A stream's tensors as float32 on `device`, times its activation scale s (from this batch, the
    stream's first, when normalising and s is not known yet; a pair is scaled by its inputs' s)."""
    first = stream[0] if isinstance(stream, tuple) else stream
    if normalize and key not in scales:
        scales[key] = unit_norm_scale(first)
    scale = scales.get(key)

    def convert(x):
        x = x.to(device, torch.float32, non_blocking=True)
        return x * scale if scale is not None else x

    return tuple(convert(x) for x in stream) if isinstance(stream, tuple) else convert(stream)


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _Run:
    """What a trainSAE run writes: its folders (RunFolder), its resumable state (Checkpointer) and,
    with use_wandb, a wandb run."""

    def __init__(self, trainers, settings: RunSettings, buffer_configs: list, save_dir, seed_form: bool,
                 use_wandb: bool, wandb_project: str, data_source: Any = None):
        self.trainers, self.settings, self.buffer_configs = trainers, settings, buffer_configs
        self.data_source = data_source
        self.folder = RunFolder(save_dir, len(trainers), single=seed_form) if save_dir is not None else None
        self.checkpointer = Checkpointer(Path(save_dir) / STATE_FILE) if save_dir is not None else None
        self.scales: dict[str, float] = {}
        self.wandb = None
        if use_wandb:
            try:
                import wandb
            except ImportError:
                raise ImportError("use_wandb=True needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_project, config={
                "trainers": [trainer.config for trainer in trainers], **vars(settings)})

    def scale_of(self, trainer) -> float | None:
        return self.scales.get(_stream_key(trainer))

    def configs(self) -> list[dict[str, Any]]:
        """Each trainer's config.json."""
        configs = []
        for trainer, buffer_config in zip(self.trainers, self.buffer_configs):
            scale = self.scale_of(trainer)
            training = {**vars(self.settings), "activation_scale": scale,
                        "norm_factor": None if scale is None else 1.0 / scale}
            configs.append({"trainer": trainer.config, "buffer": buffer_config, "training": training})
        return configs

    def start(self, resumed_from: Path | None, steps_done: int, scales: dict[str, float]) -> None:
        self.scales = scales
        if self.folder is not None:
            self.folder.start(self.configs(), resumed_from, steps_done)

    def log(self, step: int, metrics: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
        records = [{"lr": trainer.optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in m.items()}}
                   for trainer, m in zip(self.trainers, metrics)]
        if self.folder is not None:
            self.folder.log(step, records)
        if self.wandb is not None:
            self.wandb.log({f"trainer_{i}/{k}": v for i, r in enumerate(records) for k, v in r.items() if k != "lr"},
                           step=step)
        return records

    def checkpoint(self, step: int, scales: dict[str, float]) -> None:
        self.scales = scales
        self.folder.save([exported_weights(t, self.scale_of(t)) for t in self.trainers], self.configs(),
                         steps_done=step)
        self.checkpointer.save(self.trainers, step, dict(scales), self.data_source)

    def finish(self, steps_done: int, scales: dict[str, float]) -> None:
        """The final weights (ae.pt); with save_steps, also the state at the end, so the run can be extended."""
        self.scales = scales
        if self.folder is None:
            return
        if self.settings.save_steps and steps_done not in self.settings.save_steps:
            self.checkpointer.save(self.trainers, steps_done, dict(scales), self.data_source)
        self.folder.save([exported_weights(t, self.scale_of(t)) for t in self.trainers], self.configs(),
                         steps_done=None)

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
        if self.wandb is not None:
            self.wandb.finish()
