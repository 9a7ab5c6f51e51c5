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
import hashlib
import itertools
import json
import os
import time
import warnings
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .checks import as_dtype
from .distributed import SINGLE_PROCESS, RankLost, Replicas, SitePlan, init_process_group, world_replicas
from .files import json_default
from .normalization import scale_from_sums, squared_norm_sum
from .registry import dictionary_class, recipe_class
from .runs import (STATE_FILE, Checkpointer, RunFolder, RunLock, clear_previous_run, current_field_names,
                   exported_weights, previous_run)
from .saebench import config_from_run
from .sites import layer_of
from .trainers.base import ConstrainedAdam, NonFiniteLoss, SAETrainer, TrainerConfig, config_field_names

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
        dict_class = config.pop("dict_class", None)
        if trainer is None:
            raise ValueError("trainer config dict needs a 'trainer' key: a recipe name such as 'TopKTrainer'")
        trainer_class = recipe_class(trainer) if isinstance(trainer, str) else trainer
        _check_dict_class(dict_class, trainer_class)
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
    if config.steps is not None and config.warmup_steps is not None and config.warmup_steps > config.steps:
        raise ValueError(
            f"warmup_steps ({config.warmup_steps}) is longer than the run (steps={config.steps}); "
            "lower warmup_steps or train for more steps"
        )
    return trainer_class(config)


def _check_dict_class(dict_class: Any, trainer_class: type[SAETrainer]) -> None:
    """A config's `dict_class` (the reference's key: a class or its name) must be what the recipe
    trains; here it only confirms the choice, since a recipe trains one class."""
    if dict_class is None:
        return
    expected = trainer_class.dictionary_class
    name = getattr(dict_class, "__name__", dict_class)
    try:
        matches = dictionary_class(name) is expected
    except ValueError:
        matches = False
    if not matches:
        raise ValueError(f"dict_class {name!r} does not match {trainer_class.__name__}, which trains "
                         f"{expected.__name__}: drop dict_class, or pick a recipe that trains {name}")


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
    on_nonfinite: str = "raise"
    backup_steps: int | None = None


def _seed_form_config(activation_dim, dictionary_size, lr, sparsity_penalty, **fields) -> dict[str, Any]:
    """The StandardTrainer config of trainSAE's seed form."""
    missing = [name for name, value in [("activation_dim", activation_dim), ("dictionary_size", dictionary_size),
                                        ("lr", lr), ("sparsity_penalty", sparsity_penalty)] if value is None]
    if missing:
        raise ValueError(f"trainSAE needs {', '.join(missing)} (or trainer_configs=[...] to train other recipes)")
    return {"trainer": "StandardTrainer", "activation_dim": activation_dim, "dict_size": dictionary_size, "lr": lr,
            "sparsity_penalty": sparsity_penalty, **fields}


def _is_config_list(value: Any) -> bool:
    """Whether `value` is a list of trainer configs (passed where the seed form has activation_dim)."""
    return isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(config, (Mapping, TrainerConfig)) for config in value)


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
    if x.ndim < 2 or x.shape[:-1].numel() == 0:
        raise ValueError(f"{what} batch {step} has shape {tuple(x.shape)}; expected [batch, activation_dim] with "
                         "at least one row")
    _check_width(x, step, width, what)
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"{what} batch {step} contains NaN or inf; check the model/buffer (e.g. fp16 overflow)"
        )
    return x.reshape(-1, x.shape[-1])


def _check_width(x: torch.Tensor, step: int, width: int, what: str) -> None:
    if x.shape[-1] != width:
        raise ValueError(
            f"{what} batch {step} has width {x.shape[-1]} but the trainer expects {width}: pass the width of "
            "the hooked submodule as activation_dim"
        )


def _stream(batch: Any, trainer: SAETrainer, index: int, step: int, checked: bool = False) -> Any:
    """The part of `batch` that trainer `index` trains on: the batch itself, or with a dict of
    sites (a multi-site buffer), the entry of the trainer's `site`; each tensor checked (only its
    width when `checked`: another trainer checked the rest)."""
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
        batch, what = batch[site], f"{where}: site {site!r}"
    elif site is not None:
        raise ValueError(f"{where} reads site {site!r}, but the data yields one stream of tensors, not sites: build "
                         "the buffer with submodules=[...], or drop 'site'")
    else:
        what = f"{where}: activations"
    check = _check_width if checked else _check_batch
    if isinstance(batch, (tuple, list)):
        if len(batch) != 2:
            raise ValueError(f"{what}: a batch of pairs must be (inputs, outputs); got {len(batch)} tensors")
        output_dim = getattr(trainer.cfg, "output_dim", None) or trainer.cfg.activation_dim
        return (check(batch[0], step, trainer.cfg.activation_dim, f"{what} inputs"),
                check(batch[1], step, output_dim, f"{what} outputs"))
    return check(batch, step, trainer.cfg.activation_dim, what)


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


def _skipped(batches: Iterator[Any], steps_done: int) -> Iterator[Any]:
    """`batches` after the first `steps_done` (read and skipped: a resumed run's)."""
    for skipped in range(steps_done):
        try:
            next(batches)
        except StopIteration:
            raise ValueError(
                f"resume_from: data ran out after {skipped} batches while skipping the {steps_done} "
                "batches already trained on; pass the same data source, from its beginning"
            ) from None
    return batches


def _fingerprint(batch: Any) -> str:
    """sha256 of a batch's values (every site, inputs and outputs), as float32."""
    digest = hashlib.sha256()

    def add(x):
        if isinstance(x, Mapping):
            for key in sorted(x):
                digest.update(str(key).encode())
                add(x[key])
        elif isinstance(x, (tuple, list)):
            for part in x:
                add(part)
        elif isinstance(x, torch.Tensor):
            digest.update(str(tuple(x.shape)).encode())
            digest.update(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())

    add(batch)
    return digest.hexdigest()


def _data_source(data: Any, skipping: bool) -> dict[str, Any] | None:
    """What the data stream says it is: for a source that skips by itself, its `fingerprint`;
    otherwise its config without the device (an ActivationBuffer: model, sites, seed, ...), else
    its fingerprint, else None (a list, a generator)."""
    fingerprint, config = getattr(data, "fingerprint", None), getattr(data, "config", None)
    if not skipping and isinstance(config, Mapping):
        fingerprint = {k: v for k, v in config.items() if k != "device"}
    return json.loads(json.dumps(fingerprint, default=json_default)) if isinstance(fingerprint, Mapping) else None


def _data_batches(data: Any, steps_done: int, saved: dict[str, Any] | None,
                  replicas: Replicas = SINGLE_PROCESS) -> tuple[Iterator[Any], dict[str, Any]]:
    """`data`'s batches after the first `steps_done` (a resumed run's), and the record that
    identifies the stream (saved with the state, checked against `saved` on resume). A source that
    can skip by itself (`skip(n)` with a `fingerprint`: CachedActivations decodes nothing, an
    ActivationBuffer runs the model only for the rows it still holds) does; any other is identified
    also by its first batch's hash, and read and skipped (as are states saved before a source could
    skip, which recorded that hash)."""
    saved_by_replay = bool(saved and saved.get("first_batch_sha256"))
    if callable(getattr(data, "skip", None)) and not saved_by_replay \
            and isinstance(getattr(data, "fingerprint", None), Mapping):
        record = {"source": _data_source(data, skipping=True)}
        _check_same_data(saved, record, replicas)
        if steps_done:
            data.skip(steps_done)
        return iter(data), record
    batches = iter(data)
    first = next(batches, None)
    if first is None:
        raise ValueError("activations yielded no batches: the data iterator is empty")
    record = {"source": _data_source(data, skipping=False), "first_batch_sha256": _fingerprint(first)}
    _check_same_data(saved, record, replicas)
    return _skipped(itertools.chain([first], batches), steps_done), record


def _check_same_data(saved: dict[str, Any] | None, now: dict[str, Any], replicas: Replicas = SINGLE_PROCESS) -> None:
    """A run resumes on the data it was interrupted on (when the saved state says what that was); in
    data-parallel training, each rank on the data it had. Resumed on another number of ranks, only
    the source is checked: each rank's batches then differ from the interrupted run's (a warning
    says so)."""
    if saved is None:  # a state written before data records
        return
    saved_ranks = saved.get("ranks") or [saved]
    if len(saved_ranks) == replicas.size:
        saved = saved_ranks[replicas.rank]
    else:
        now = {**now, "first_batch_sha256": None}
        if replicas.rank == 0:
            warnings.warn(f"trainSAE: resuming on {replicas.size} rank(s) a run saved by {len(saved_ranks)}: each rank "
                          "skips the batches already trained and continues on its own data, so the global batches "
                          "differ from those of an uninterrupted run (the training state itself carries over)",
                          stacklevel=4)
    source, saved_source = now.get("source"), saved.get("source")
    if len(saved_ranks) != replicas.size:  # each rank's share of a source that deals itself out differs: not the source
        source, saved_source = (_without_rank(s) for s in (source, saved_source))
    if source != saved_source:
        if isinstance(source, Mapping) and isinstance(saved_source, Mapping):
            differing = sorted(k for k in set(source) | set(saved_source) if source.get(k) != saved_source.get(k))
            details = ", ".join(f"{k}: saved {saved_source.get(k)!r}, now {source.get(k)!r}" for k in differing)
        else:
            details = f"saved {saved_source!r}, now {source!r}"
        raise ValueError(f"resume_from: the data source differs from the interrupted run's ({details}); pass the same "
                         "data source (for an ActivationBuffer, the same seed; for a CachedActivations, the same "
                         "cache and reader settings)")
    hashes = saved.get("first_batch_sha256"), now.get("first_batch_sha256")
    if None not in hashes and hashes[0] != hashes[1]:
        raise ValueError("resume_from: the data's first batch differs from the interrupted run's: other texts, "
                         "another order or another buffer seed. Pass the same data from its beginning (an "
                         "ActivationBuffer with seed=None draws a new order each time: pass seed=)")


def _without_rank(source: Any) -> Any:
    return {k: v for k, v in source.items() if k not in ("rank", "world_size")} if isinstance(source, Mapping) else source


NORMALIZATION_BATCHES = 8
"""normalize_activations estimates E‖x‖² from this many first batches (fewer if the run is shorter)."""


def _known_scales(data: Any, trainers: Sequence[SAETrainer]) -> dict[str, float]:
    """The activation scale s = 1/√E‖x‖² of every stream the trainers read, when the data knows
    E‖x‖² in advance (a `mean_squared_norm(site)` method, e.g. CachedActivations' whole-cache
    statistic); {} otherwise."""
    known = getattr(data, "mean_squared_norm", None)
    if not callable(known):
        return {}
    sites = getattr(data, "sites", None)
    scales = {}
    for key in dict.fromkeys(_stream_key(trainer) for trainer in trainers):
        if not key and isinstance(sites, Mapping) and len(sites) != 1:
            continue  # a trainer without a site on several sites: _stream names the problem
        mean_square = float(known(key or None))
        if not mean_square > 0:
            raise ValueError(f"normalize_activations: the data's E‖x‖² of {'site ' + repr(key) if key else 'its stream'} "
                             f"is {mean_square}, so it gives no scale; check the data")
        scales[key] = mean_square ** -0.5
    return scales


def _squared_norms(batches: list[Any], trainers: Sequence[SAETrainer]) -> dict[str, tuple[float, int]]:
    """(Σ‖x‖², tokens) of each stream over `batches` (a pair's: of its inputs), each batch checked."""
    sums = {}
    for index, trainer in enumerate(trainers):
        key = _stream_key(trainer)
        if key not in sums:
            streams = [_stream(batch, trainer, index, step) for step, batch in enumerate(batches)]
            sums[key] = squared_norm_sum([s[0] if isinstance(s, tuple) else s for s in streams])
    return sums


def _activation_scales(sums: dict[str, tuple[float, int]], n_batches: int,
                       replicas: Replicas = SINGLE_PROCESS) -> dict[str, float]:
    """The scale s of each stream with E‖s·x‖² = 1 over the tokens of its first `n_batches` batches
    together (of every rank). An all-zero stream is an error: it has no scale."""
    keys = list(sums)
    if replicas.distributed:
        totals = replicas.sum_(torch.tensor([sums[key] for key in keys], dtype=torch.float64,
                                            device=replicas.control_device)).tolist()
        sums = {key: (total[0], int(total[1])) for key, total in zip(keys, totals)}
    scales = {}
    for key in keys:
        try:
            scales[key] = scale_from_sums(*sums[key])
        except ValueError as error:
            raise ValueError(f"normalize_activations: the first {n_batches} batches of "
                             f"{'site ' + repr(key) if key else 'the data'}: {error}") from None
    return scales


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
    overwrite: bool = False,
    on_nonfinite: str = "raise",
    backup_steps: int | None = None,
    verbose: bool = False,
    wandb_entity: str | None = None,
    run_cfg: Mapping[str, Any] | None = None,
    activations_split_by_head: bool = False,
    transcoder: bool = False,
    distribute_sites: bool = False,
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
        else from the first NORMALIZATION_BATCHES batches); the saved and returned dictionaries
        take raw activations (normalization.py).
    autocast_dtype: e.g. torch.bfloat16 to run the training steps under torch.autocast.
    resume_from: the `save_dir` of an interrupted run: continue from its last saved state. Pass
        the same configs and the same `data` from its beginning (the batches already trained
        on are skipped: by the source itself when it has `skip(n)`, as CachedActivations does
        without decoding them, else read), and the run ends exactly as an uninterrupted one
        would. Another data source (its config or fingerprint, or its first batch) is an error.
    seed: the seed of every trainer whose config sets none (a sweep's trainers then start from the
        same random draws); None: each trainer draws a random seed, recorded in its config.json.
    overwrite: replace the files of an earlier run in `save_dir` (without it, and without
        resume_from, a save_dir holding a run is an error). A run holds save_dir's lock throughout.
    on_nonfinite: what to do when a trainer's loss is NaN or ±inf: "raise" (stop with an error
        naming the trainer, the step and the likely cause; the last checkpoint stays as it was) or
        "skip" (that trainer skips the batch; after MAX_SKIPPED_IN_A_ROW in a row it raises).

    The reference library's order `trainSAE(data, trainer_configs, steps)` works too (a list of
    configs in second place is taken as `trainer_configs`, and a third argument as `steps`).
    The reference library's other arguments: `backup_steps` writes the resumable state (without a
    checkpoint of the weights) every this many steps; `verbose` prints the logged metrics;
    `wandb_entity` and `run_cfg` (extra config) go to wandb; `activations_split_by_head` and
    `transcoder` only shaped the reference's logging and change nothing here (batches of
    (input, output) pairs train transcoders by themselves).

    Under `torchrun --nproc_per_node R` (distributed.py), each rank passes its own data and the run
    trains as one process on the global batches (every rank's rows, rank 0's first): gradients and
    every batch-wide statistic are reduced across ranks, only rank 0 writes files, and every rank
    returns the same dictionaries. `distribute_sites=True` (with multi-site data and a `site` in
    every config) instead trains each site's trainers on one rank only (SitePlan): each rank sends
    each site's rows to the rank training it, which steps on the site's global batch; rank 0
    returns every dictionary, the other ranks only those they trained (None for the rest).
    """
    if trainer_configs is None and _is_config_list(activation_dim):  # the reference's order (data, configs, steps)
        trainer_configs, activation_dim = activation_dim, None
        if dictionary_size is not None and steps is None:
            steps, dictionary_size = dictionary_size, None
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
    if on_nonfinite not in ("raise", "skip"):
        raise ValueError(f"on_nonfinite must be 'raise' or 'skip', got {on_nonfinite!r}")
    checkpoint_steps = _save_steps(save_steps)
    if backup_steps is not None and (isinstance(backup_steps, bool) or not isinstance(backup_steps, int)
                                     or backup_steps <= 0):
        raise ValueError(f"backup_steps must be a positive number of steps or None, got {backup_steps!r}")
    if resume_from is not None:
        resume_from = Path(resume_from)
        if not (resume_from / STATE_FILE).exists():
            raise FileNotFoundError(
                f"resume_from: {str(resume_from / STATE_FILE)!r} not found; a run writes it at each of its "
                "save_steps (pass the save_dir of a run that had save_steps)"
            )
        save_dir = resume_from if save_dir is None else save_dir
    if (checkpoint_steps or backup_steps) and save_dir is None:
        raise ValueError("save_steps and backup_steps need save_dir (where to write the checkpoints)")
    autocast_dtype = as_dtype(autocast_dtype, "autocast_dtype")
    settings = RunSettings(steps, checkpoint_steps, log_steps, normalize_activations,
                           str(autocast_dtype) if autocast_dtype is not None else None, seed, on_nonfinite,
                           backup_steps)

    init_process_group()  # under torchrun: join the other ranks (kept for later calls, ended at exit)
    replicas = world_replicas()
    trainers = [build_trainer(config, steps, default_device=device, default_seed=seed) for config in configs]
    plan = _site_plan(trainers, replicas) if distribute_sites and replicas.distributed else None
    for trainer in trainers:
        trainer.replicas = SINGLE_PROCESS if plan is not None else replicas
    owned = [plan is None or plan.owns(_stream_key(trainer)) for trainer in trainers]
    for trainer, is_owned in zip(trainers, owned):
        if not is_owned:  # another rank trains it: no memory here for its weights (nor optimizer state)
            trainer.ae.to("meta")
    _check_sites(trainers, data)
    buffer_configs = [_buffer_config(data, trainer.cfg.site) for trainer in trainers]
    for trainer, buffer_config in zip(trainers, buffer_configs):
        _record_provenance(trainer, buffer_config)
    lock = None
    try:
        with _all_ranks_start(replicas):
            lock = _claim(save_dir, resume_from, overwrite) if replicas.rank == 0 else None
            steps_done, scales, saved_data = 0, {}, None
            if resume_from is not None:
                steps_done, saved_scales, saved_data = Checkpointer(resume_from / STATE_FILE).load(trainers, owned)
                scales = _scales(saved_scales)
                if steps is not None and steps < steps_done:
                    raise ValueError(f"resume_from: the run already trained {steps_done} steps, more than "
                                     f"steps={steps}; pass steps >= the steps done (or use its checkpoints/ae_N.pt)")
            batches, data_record = _data_batches(data, steps_done, saved_data, replicas)
            if normalize_activations and not scales:
                scales = _known_scales(data, trainers)
            normalizing = normalize_activations and not scales
            if normalizing:
                peeked = list(itertools.islice(batches, min(NORMALIZATION_BATCHES, steps or NORMALIZATION_BATCHES)))
                if not peeked:
                    raise ValueError("activations yielded no batches: the data iterator is empty")
                squared_norms = _squared_norms(peeked, trainers)
                batches = itertools.chain(peeked, batches)
        if normalizing:
            scales = _activation_scales(squared_norms, len(peeked), replicas)
        if replicas.distributed:  # the state records every rank's data
            records = replicas.exchange(data_record)
            data_record = {**records[0], "ranks": records}
        wandb_settings = ({"project": wandb_project, "entity": wandb_entity, "config": dict(run_cfg or {})}
                          if use_wandb else None)
        run = _Run(trainers, settings, buffer_configs, save_dir, seed_form, wandb_settings, data_record,
                   writer=replicas.rank == 0)
        if plan is not None:
            run.collect = lambda: _collected_trainers(trainers, owned, replicas)
        try:
            run.start(resume_from, steps_done, scales)
            steps_done = _train(trainers, batches, run, steps_done, scales, settings, autocast_dtype,
                                progress and replicas.rank == 0, verbose, replicas, plan)
            if steps is not None and steps_done < steps and replicas.rank == 0:
                warnings.warn(f"trainSAE: the data ran out after {steps_done} of steps={steps} batches; the "
                              f"dictionaries trained {steps_done} steps (recorded as steps_done in config.json), "
                              "with LR and sparsity schedules planned for steps", stacklevel=2)
            if replicas.rank == 0:
                _warn_if_inside_warmup(trainers, steps_done)
            trained = run.finish(steps_done, scales)
            replicas.all_true(True)  # every rank returns once rank 0 has written the final files
        finally:
            run.close()
    finally:
        if lock is not None:
            lock.release()
    dictionaries = []
    for index, (trainer, final, config) in enumerate(zip(trainers, trained, run.configs())):
        if final is not trainer:  # trained on another rank (distribute_sites): its final dictionary
            trainer.ae = final.ae.to(trainer.device)
        elif not owned[index]:  # trained on another rank, which returns it
            dictionaries.append(None)
            continue
        scale = scales.get(_stream_key(trainer))
        if scale is not None:
            trainer.ae.scale_biases(1.0 / scale)
        trainer.ae.cfg = config_from_run(config, trainer.ae.default_cfg())
        dictionaries.append(trainer.ae)
    return dictionaries[0] if seed_form else dictionaries


def _site_plan(trainers: Sequence[SAETrainer], replicas: Replicas) -> SitePlan:
    """distribute_sites' plan: each site to one rank, balancing Σ dict_size of the trainers."""
    unnamed = [index for index, trainer in enumerate(trainers) if trainer.cfg.site is None]
    if unnamed:
        raise ValueError(f"distribute_sites=True needs the 'site' of every trainer config; trainer {unnamed[0]} has "
                         "none (the multi-site buffer's sites are listed by buffer.sites)")
    costs: dict[str, float] = {}
    for trainer in trainers:
        costs[trainer.cfg.site] = costs.get(trainer.cfg.site, 0.0) + trainer.cfg.dict_size
    return SitePlan(costs, replicas)


class _TrainedElsewhere:
    """A trainer of another rank as rank 0 saves it (distribute_sites): its state, gathered to the
    CPU, and its dictionary rebuilt there."""

    def __init__(self, local: SAETrainer, state: dict[str, Any]):
        self.config, self.cfg, self.state = local.config, local.cfg, state
        self.ae = type(local.ae).from_state_dict(state["ae"])

    def state_dict(self) -> dict[str, Any]:
        return self.state


def _on_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {key: _on_cpu(value) for key, value in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_on_cpu(value) for value in obj)
    return obj


def _collected_trainers(trainers: Sequence[SAETrainer], owned: Sequence[bool], replicas: Replicas) -> list:
    """On rank 0, every trainer as it is now: its own, and the others' states gathered from the ranks
    that train them (_TrainedElsewhere); on the other ranks, `trainers` (they write nothing)."""
    mine = {index: _on_cpu(trainer.state_dict()) for index, trainer in enumerate(trainers)
            if owned[index] and replicas.rank != 0}
    gathered = replicas.gather_to_first(mine)
    if gathered is None:
        return list(trainers)
    collected = list(trainers)
    for states in gathered:
        for index, state in states.items():
            collected[index] = _TrainedElsewhere(trainers[index], state)
    return collected


@contextmanager
def _all_ranks_start(replicas: Replicas):
    """Run the start of a run (claiming the folder, loading the state, reading the first batches) on
    every rank, then agree: if any rank failed, every rank stops (the failed one with its own error,
    the others naming it) instead of waiting for it in the first collective."""
    if not replicas.distributed:
        yield
        return
    try:
        yield
    except Exception as error:
        replicas.exchange(f"{type(error).__name__}: {error}")
        raise
    failed = [(rank, message) for rank, message in enumerate(replicas.exchange(None)) if message is not None]
    if failed:
        rank, message = failed[0]
        raise RuntimeError(f"trainSAE: rank {rank} of {replicas.size} could not start the run ({message}); every "
                           "rank stops")


def _warn_if_inside_warmup(trainers: Sequence[SAETrainer], steps_done: int) -> None:
    """A run that ended before a trainer's LR warmup did never trained at its learning rate: say so."""
    inside = [(index, trainer) for index, trainer in enumerate(trainers) if steps_done < trainer.cfg.warmup_steps]
    if inside:
        which = ", ".join(f"{index} ({type(trainer).__name__}, warmup_steps={trainer.cfg.warmup_steps})"
                          for index, trainer in inside)
        warnings.warn(f"trainSAE: the run ended after {steps_done} steps, inside the learning-rate warmup of trainer "
                      f"{which}: the LR never reached its full value. Train for more steps (more data, or steps=) or "
                      "lower warmup_steps", stacklevel=3)


def _claim(save_dir, resume_from: Path | None, overwrite: bool) -> RunLock | None:
    """Lock `save_dir` for this run; refuse a folder that holds another run unless resuming it or
    told to overwrite it (then clear it)."""
    if save_dir is None:
        return None
    lock = RunLock(save_dir).acquire()
    try:
        found = previous_run(save_dir)
        resuming_here = resume_from is not None and Path(save_dir).resolve() == resume_from.resolve()
        if found is not None and not resuming_here:
            if not overwrite:
                raise FileExistsError(f"save_dir {str(save_dir)!r} holds {found}; pass resume_from={str(save_dir)!r} to "
                                      "continue it, overwrite=True to replace it, or another save_dir")
            clear_previous_run(save_dir)
    except BaseException:
        lock.release()
        raise
    return lock


MAX_SKIPPED_IN_A_ROW = 100
"""on_nonfinite="skip" gives up on a trainer after this many consecutive batches with a non-finite loss."""


def _divergence_error(index: int, trainer: SAETrainer, what: str, stream: Any, settings: RunSettings,
                      run: "_Run") -> FloatingPointError:
    """The error that stops a run whose trainer diverged: where, when, the likely causes, what was kept."""
    site = f", site {trainer.cfg.site!r}" if trainer.cfg.site else ""
    x = stream[0] if isinstance(stream, tuple) else stream
    mean_norm = float(x.double().norm(dim=-1).mean()) if x is not None else 0.0
    causes = []
    if not settings.normalize_activations and mean_norm > 100:
        causes.append(f"activations with large norms (mean ‖x‖ = {mean_norm:.3g} in this batch): pass "
                      "normalize_activations=True")
    if settings.autocast_dtype == str(torch.float16):
        causes.append("float16 autocast, which overflows above 65504: use torch.bfloat16")
    causes.append(f"a learning rate too high for this recipe (lr={trainer.lr:g})")
    kept = (f"the last checkpoint (step {run.last_saved}) in {str(run.save_dir)!r} is intact: fix the cause and "
            f"resume_from it" if run.last_saved else "nothing was saved (save_steps saves checkpoints)")
    return FloatingPointError(
        f"trainer {index} ({type(trainer).__name__}{site}): {what}; the run stopped. Likely causes: "
        f"{'; '.join(causes)}. {kept[0].upper() + kept[1:]}. on_nonfinite='skip' skips batches whose loss is not "
        "finite instead.")


def _check_weights(trainers: Sequence[SAETrainer], step: int, settings: RunSettings, run: "_Run", batch,
                   active: Sequence[bool] | None = None) -> None:
    """Stop the run if a dictionary holds NaN or ±inf (before it is logged or saved); `active`: the
    trainers this process trains (all by default)."""
    for index, trainer in enumerate(trainers):
        if active is not None and not active[index]:
            continue
        bad = trainer.nonfinite_parameters()
        if bad:
            stream = _stream(batch, trainer, index, step) if batch is not None else None
            raise _divergence_error(index, trainer, f"{', '.join(bad)} hold NaN or inf after step {step}", stream,
                                    settings, run)


def _stream_key(trainer: SAETrainer) -> str:
    """The key of the stream a trainer reads in the run's activation scales: its site ("" for none)."""
    return trainer.cfg.site or ""


def _scales(saved: Any) -> dict[str, float]:
    """Activation scales per stream from a training state (runs before sites saved one float or None)."""
    if saved is None:
        return {}
    return dict(saved) if isinstance(saved, Mapping) else {"": float(saved)}


def _train(trainers, batches, run, step, scales: dict[str, float], settings: RunSettings, autocast_dtype,
           progress, verbose: bool = False, replicas: Replicas = SINGLE_PROCESS, plan: SitePlan | None = None) -> int:
    """The training loop: every trainer steps on every batch (on its site's part of it), its inputs
    scaled by its stream's entry in `scales`. Returns the steps done. With `replicas`, every rank
    steps on its own batches in lockstep, and a rank that stops (dies, fails) stops the others
    with an error naming the step; with a `plan`, each rank steps the trainers of its sites only,
    on the global batches the plan's exchange brings it."""
    if not replicas.distributed:
        return _train_steps(trainers, batches, run, step, scales, settings, autocast_dtype, progress, verbose)
    try:
        return _train_steps(trainers, _in_lockstep(batches, replicas), run, step, scales, settings, autocast_dtype,
                            progress, verbose, replicas, plan)
    except RankLost as error:
        saved = (f"the last state saved is that of step {run.last_saved}: resume with resume_from={str(run.save_dir)!r}"
                 if run.last_saved else "no state was saved (save_steps saves one)")
        raise RuntimeError(f"trainSAE (rank {replicas.rank} of {replicas.size}): lost contact with the other ranks "
                           f"after {run.steps_trained} steps: a rank died or stopped with an error (see its output). "
                           f"The run stopped; {saved}. [{error}]") from error


def _in_lockstep(batches: Iterator[Any], replicas: Replicas) -> Iterator[Any]:
    """`batches` while every rank still has one: the ranks take each step together, and all stop
    when the first runs out of data."""
    for batch in batches:
        if not replicas.all_true(True):
            return
        yield batch
    replicas.all_true(False)


def _rows(stream: Any) -> int:
    """The token rows of a stream's batch (of its inputs, for pairs)."""
    return (stream[0] if isinstance(stream, tuple) else stream).shape[0]


def _train_steps(trainers, batches, run, step, scales: dict[str, float], settings: RunSettings, autocast_dtype,
                 progress, verbose: bool = False, replicas: Replicas = SINGLE_PROCESS, plan: SitePlan | None = None
                 ) -> int:
    autocasts = [_autocast(trainer.device, autocast_dtype) for trainer in trainers]
    active = [plan is None or plan.owns(_stream_key(trainer)) for trainer in trainers]
    skipped_in_a_row = [0] * len(trainers)
    batch = None
    bar = tqdm(total=settings.steps, initial=step, desc="trainSAE", disable=not progress, dynamic_ncols=True)
    shown_at = time.monotonic()
    with bar:
        for batch in batches:
            if settings.steps is not None and step >= settings.steps:
                break
            if plan is not None:
                batch = plan.exchange(batch)  # the global batches of this rank's sites
            inputs = {}  # one converted copy of each stream per device
            metrics = []
            logs = settings.log_steps is not None and ((step + 1) % settings.log_steps == 0 or step == 0)
            shows = not bar.disable and plan is None and time.monotonic() - shown_at >= POSTFIX_SECONDS
            for trainer in trainers:
                trainer.full_metrics = logs or shows
            for index, (trainer, autocast) in enumerate(zip(trainers, autocasts)):
                if not active[index]:
                    metrics.append(None)
                    continue
                key = (_stream_key(trainer), trainer.device)
                if key not in inputs:
                    inputs[key] = _prepared(_stream(batch, trainer, index, step), scales.get(key[0]), trainer.device)
                else:
                    _stream(batch, trainer, index, step, checked=True)
                metrics.append(_step(index, trainer, step, inputs[key], autocast, skipped_in_a_row, settings, run))
            step += 1
            run.steps_trained = step
            bar.update(1)
            if settings.log_steps is not None and (step % settings.log_steps == 0 or step == 1):
                _check_weights(trainers, step, settings, run, batch, active)
                if plan is not None:  # this rank's trainers' dead % first: the others' trackers are elsewhere
                    metrics = _collected_metrics(_with_dead_pct(metrics, trainers, step), trainers, replicas)
                elif replicas.distributed:
                    rows = [_rows(inputs[(_stream_key(trainer), trainer.device)]) for trainer in trainers]
                    metrics = _global_metrics(metrics, rows, replicas)
                logged = run.log(step, metrics if plan is not None else _with_dead_pct(metrics, trainers, step))
                bar.set_postfix_str(_postfix(logged), refresh=False)
                shown_at = time.monotonic()
                if verbose:
                    for index, record in enumerate(logged):
                        bar.write(f"step {step} trainer {index}: " +
                                  ", ".join(f"{key} {value:.4g}" for key, value in record.items()))
            elif shows:
                current = [{key: float(value) for key, value in m.items()} for m in metrics]
                bar.set_postfix_str(_postfix(_with_dead_pct(current, trainers, step)), refresh=False)
                shown_at = time.monotonic()
            if step in settings.save_steps:
                _check_weights(trainers, step, settings, run, batch, active)
                run.checkpoint(step, scales)
            elif settings.backup_steps and step % settings.backup_steps == 0:
                _check_weights(trainers, step, settings, run, batch, active)
                run.backup(step, scales)
    _check_weights(trainers, step, settings, run, batch, active)
    return step


DEAD_WINDOW_TOKENS = 1_000_000
"""The progress bar's and log's dead %: latents that have not fired in this many training tokens (or
not at all yet, early in a run)."""
POSTFIX_SECONDS = 1.0
"""Between log steps, the progress bar shows the current batch's metrics at most this often."""


def _with_dead_pct(metrics: Sequence[dict[str, Any]], trainers: Sequence[SAETrainer], step: int) -> list[dict]:
    """Each trainer's metrics with `dead_pct`, the percentage of its latents that are dead (see
    DEAD_WINDOW_TOKENS) after `step` steps."""
    return [None if m is None else {**m, "dead_pct": 100.0 * trainer.dead_tracker.dead_fraction(step, DEAD_WINDOW_TOKENS)}
            for m, trainer in zip(metrics, trainers)]


def _postfix(records: Sequence[dict[str, float]]) -> str:
    """The progress bar's metrics: loss, L0, FVU and dead % of one trainer, or their ranges over a sweep."""
    shown = []
    for key, label, form in (("loss", "loss", ".4g"), ("l0", "L0", ".3g"), ("fvu", "FVU", ".3f"),
                             ("dead_pct", "dead", ".1f")):
        values = [record[key] for record in records if record is not None and key in record]
        if not values:
            continue
        low, high = min(values), max(values)
        text = f"{low:{form}}" if low == high else f"{low:{form}}–{high:{form}}"
        shown.append(f"{label} {text}{'%' if key == 'dead_pct' else ''}")
    return ", ".join(shown)


def _step(index: int, trainer: SAETrainer, step: int, stream: Any, autocast, skipped_in_a_row: list[int],
          settings: RunSettings, run: "_Run") -> dict[str, torch.Tensor]:
    """One optimisation step of one trainer; its metrics. A non-finite loss (the step then changed
    nothing) stops the run, or with on_nonfinite="skip" is counted and skipped."""
    try:
        with autocast:
            metrics = trainer.update(step, stream)
        skipped_in_a_row[index] = 0
        return metrics
    except NonFiniteLoss as error:
        skipped_in_a_row[index] += 1
        if settings.on_nonfinite == "raise" or skipped_in_a_row[index] >= MAX_SKIPPED_IN_A_ROW:
            what = f"the loss is {error.value} at step {step + 1}" + (
                f", the {MAX_SKIPPED_IN_A_ROW}th batch in a row" if settings.on_nonfinite == "skip" else "")
            raise _divergence_error(index, trainer, what, stream, settings, run) from None
        run.skipped_steps[index] += 1
        return {"loss": torch.tensor(error.value)}


def _global_metrics(metrics: Sequence[dict[str, torch.Tensor]], rows: Sequence[int],
                    replicas: Replicas) -> list[dict[str, torch.Tensor]]:
    """Each trainer's metrics as means over the global batch, Σ_r N_r m_r / Σ_r N_r (every rank
    logs the same keys: they depend on the step and on reduced state only)."""
    keys = [list(m) for m in metrics]
    values = [float(m[key]) * n for m, names, n in zip(metrics, keys, rows) for key in names]
    packed = replicas.sum_(torch.tensor([*values, *map(float, rows)], dtype=torch.float64,
                                        device=replicas.control_device)).tolist()
    totals, counts = iter(packed[: len(values)]), packed[len(values):]
    return [{key: torch.tensor(next(totals) / count) for key in names} for names, count in zip(keys, counts)]


def _collected_metrics(metrics: Sequence[dict[str, torch.Tensor] | None], trainers: Sequence[SAETrainer],
                       replicas: Replicas) -> list[dict[str, float]]:
    """Every trainer's metrics (and LR) from the rank that trains it (distribute_sites; `metrics`
    holds None for the trainers of other ranks)."""
    mine = {index: {"lr": trainers[index].optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in m.items()}}
            for index, m in enumerate(metrics) if m is not None}
    collected = {}
    for part in replicas.exchange(mine):
        collected.update(part)
    return [collected[index] for index in range(len(trainers))]


def _prepared(stream, scale: float | None, device: torch.device):
    """A stream's tensors as float32 on `device`, times its activation scale s (if any)."""

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
                 wandb_settings: dict[str, Any] | None, data_record: dict[str, Any], writer: bool = True):
        """`writer`: whether this process writes the files (in data-parallel training, rank 0 only)."""
        self.trainers, self.settings, self.buffer_configs = trainers, settings, buffer_configs
        self.save_dir, self.data_record = save_dir, data_record
        writes = save_dir is not None and writer
        self.folder = RunFolder(save_dir, len(trainers), single=seed_form) if writes else None
        self.checkpointer = Checkpointer(Path(save_dir) / STATE_FILE) if writes else None
        self.scales: dict[str, float] = {}
        self.steps_done = 0
        self.steps_trained = 0  # steps done, as the loop goes
        self.last_saved: int | None = None  # steps done at the last state saved
        self.skipped_steps = [0] * len(trainers)  # batches each trainer skipped (on_nonfinite="skip")
        self.collect = None  # distribute_sites: gathers the trainers of other ranks to rank 0 (a collective)
        self.wandb = None
        if wandb_settings is not None and writer:
            try:
                import wandb
            except ImportError:
                raise ImportError("use_wandb=True needs wandb: pip install wandb") from None
            self.wandb = wandb.init(project=wandb_settings["project"], entity=wandb_settings["entity"], config={
                "trainers": [trainer.config for trainer in trainers], **vars(settings), **wandb_settings["config"]})

    def scale_of(self, trainer) -> float | None:
        return self.scales.get(_stream_key(trainer))

    def configs(self) -> list[dict[str, Any]]:
        """Each trainer's config.json."""
        configs = []
        for index, (trainer, buffer_config) in enumerate(zip(self.trainers, self.buffer_configs)):
            scale = self.scale_of(trainer)
            training = {**vars(self.settings), "steps_done": self.steps_done, "activation_scale": scale,
                        "norm_factor": None if scale is None else 1.0 / scale}
            if self.skipped_steps[index]:
                training["skipped_steps"] = self.skipped_steps[index]
            configs.append({"trainer": trainer.config, "buffer": buffer_config, "training": training})
        return configs

    def start(self, resumed_from: Path | None, steps_done: int, scales: dict[str, float]) -> None:
        self.scales, self.steps_done = scales, steps_done
        self.last_saved = steps_done if resumed_from is not None else None
        if self.folder is not None:
            self.folder.start(self.configs(), resumed_from, steps_done)

    def log(self, step: int, metrics: Sequence[dict[str, torch.Tensor]]) -> list[dict[str, float]]:
        records = [{"lr": trainer.optimizer.param_groups[0]["lr"], **{k: float(v) for k, v in m.items()}}
                   for trainer, m in zip(self.trainers, metrics)]
        for record, skipped in zip(records, self.skipped_steps):
            if skipped:
                record["skipped_steps"] = skipped
        if self.folder is not None:
            self.folder.log(step, records)
        if self.wandb is not None:
            self.wandb.log({f"trainer_{i}/{k}": v for i, r in enumerate(records) for k, v in r.items() if k != "lr"},
                           step=step)
        return records

    def current(self) -> list:
        """The trainers as they are now (with `collect`, gathered from the ranks that train them)."""
        return self.collect() if self.collect is not None else self.trainers

    def save_state(self, step: int, trainers: Sequence) -> None:
        if self.checkpointer is not None:
            self.checkpointer.save(trainers, step, dict(self.scales), self.data_record)
        self.last_saved = step

    def checkpoint(self, step: int, scales: dict[str, float]) -> None:
        self.scales, self.steps_done = scales, step
        trainers = self.current()
        if self.folder is not None:
            self.folder.save([exported_weights(t, self.scale_of(t)) for t in trainers], self.configs(),
                             steps_done=step)
        self.save_state(step, trainers)

    def backup(self, step: int, scales: dict[str, float]) -> None:
        """The resumable state only (no checkpoint of the weights): the reference's backup_steps."""
        self.scales, self.steps_done = scales, step
        self.save_state(step, self.current())

    def finish(self, steps_done: int, scales: dict[str, float]) -> list:
        """The final weights (ae.pt); with save_steps, also the state at the end, so the run can be
        extended. Returns the trainers as they ended (`current`)."""
        self.scales, self.steps_done = scales, steps_done
        trainers = self.current()
        if self.folder is None:
            return trainers
        if (self.settings.save_steps or self.settings.backup_steps) and steps_done not in self.settings.save_steps:
            self.save_state(steps_done, trainers)
        self.folder.save([exported_weights(t, self.scale_of(t)) for t in trainers], self.configs(),
                         steps_done=None)
        return trainers

    def close(self) -> None:
        if self.folder is not None:
            self.folder.close()
        if self.wandb is not None:
            self.wandb.finish()
