"""The configuration of a whole training run: model, data, sites, recipes, schedule, folder.

`TrainRunConfig` is what `python -m dictionary_learning train` takes as flags and as a config file
(JSON, or YAML with PyYAML), and what `workflow.train_from_config` takes in Python: each field is
a flag (`--field-name`), a config-file key and a keyword argument, documented once, below.

Recipes are written `NAME:key=value,key=value` (a trainer name of registry.py, case-insensitive,
"Trainer" optional: `topk:k=32` is `TopKTrainer` with k=32) or, in a config file, as trainSAE's
dicts (`{"trainer": "TopKTrainer", "k": 32}`). A list value is written `key=1,2,3` or
`key=[1,2,3]`. `parse_recipe` checks names and values against the recipe's config dataclass, so a
typo fails before any model is loaded. `resolve_run_config` fills what the run decides (device,
folder, steps from tokens, log interval, recipe schedules sized to the run) and gives the config a
run folder records in `run_config.json`, from which `train --config` repeats the run exactly.
"""
from __future__ import annotations

import dataclasses
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .dataclass_args import ConfigError, closest, convert
from .registry import recipe_class, recipe_names
from .runs import current_field_names
from .trainers.base import WARMUP_STEPS, config_field_names, default_warmup_steps

__all__ = ["TrainRunConfig", "parse_recipe", "expand_grid", "recipe_by_name", "recipe_label", "resolve_run_config", "recipe_hyperparameters",
           "RUN_FILLED_FIELDS", "SCHEDULE_CAPS", "DEFAULT_RECIPE"]

DEFAULT_RECIPE = "StandardTrainer:sparsity_penalty=3.0,lr=0.001"
"""The demo's recipe: λ tuned for the bundled model's layer-0 MLP (retune it for other sites, or
use --target-l0)."""

RUN_FILLED_FIELDS = {
    "activation_dim": "the width of the site, probed from the model",
    "output_dim": "the width of the site's output, probed from the model",
    "steps": "the run's --steps",
    "lm_name": "the model",
    "layer": "the site",
    "submodule_name": "the site",
}
"""Recipe fields the run fills in itself (a recipe may not set them)."""

SCHEDULE_CAPS = {"warmup_steps": 0.1, "sparsity_warmup_steps": 0.2, "threshold_start_step": 0.5,
                 "anneal_start": 0.5}
"""Schedule lengths a recipe leaves at its default are capped at this fraction of the run, so a
short run does not end inside a warmup sized for long ones (a recipe that sets one keeps it)."""


@dataclass
class TrainRunConfig:
    """Everything a training run needs; see the module docstring."""

    model: str = "bundled"
    """'bundled' (the offline tiny Pythia of assets/), a Hugging Face model id, or a local folder holding a model and
    its tokenizer."""
    dataset: str = "stdlib"
    """'stdlib' (the bundled model's text: the Python standard library's sources, offline), a .jsonl.zst or .jsonl
    file, a text file, a folder or glob of .txt files, a Hugging Face dataset name (streamed), or an activation cache
    folder (written by the cache command: the model does not run; the cache decides the model and ctx_len)."""
    text_field: str = "text"
    """the field of each record that holds its text (.jsonl, .jsonl.zst, Hugging Face datasets)."""
    dataset_split: str = "train"
    """the split of a Hugging Face dataset."""
    sites: list[str] = field(default_factory=lambda: ["gpt_neox.layers.0.mlp"],
                             metadata={"metavar": "PATH"})
    """the modules to read, as dotted paths or globs ('*' is one path component, e.g. 'gpt_neox.layers.*.mlp'); one
    pass of the model reads them all and every recipe trains on every site."""
    io: str = field(default="out", metadata={"choices": ["out", "in", "in_to_out"]})
    """read each site's output, its input, or (input, output) pairs for transcoders."""
    recipes: list[str | dict] = field(default_factory=lambda: [DEFAULT_RECIPE],
                                      metadata={"flag": "--recipe", "append": True, "metavar": "NAME:KEY=VALUE,..."})
    """a recipe and its hyperparameters, e.g. 'TopKTrainer:k=32,dict_size=4096'; repeat the flag, or write values
    a|b|c (a grid: one recipe per value), for a sweep ('python
    -m dictionary_learning recipes' lists recipes and hyperparameters)."""
    expansion_factor: int = 8
    """dict_size of every recipe that sets none: this times the site's width."""
    target_l0: float | None = None
    """the L0 to aim for, for recipes that set neither: k of the TopK recipes, target_l0 (an adaptive λ) of the recipes
    with a sparsity penalty."""
    steps: int | None = 1500
    """training steps (batches); none: until the data runs out."""
    tokens: int | None = None
    """train on this many tokens instead (steps = tokens / batch_size)."""
    batch_size: int = 1024
    """activations per training batch."""
    n_ctxs: int = 96
    """contexts the activation buffer holds (its shuffling pool; e.g. 30000 on a GPU)."""
    ctx_len: int = 128
    """tokens per context."""
    refresh_batch_size: int = 32
    """texts per forward pass of the model."""
    normalize_activations: bool = False
    """scale activations so that E||x||^2 = 1 (folded into the saved weights)."""
    dtype: str = "float32"
    """the language model's dtype (float32, bfloat16, float16)."""
    device: str = "auto"
    """'auto' (cuda:0 when available, else cpu), 'cpu', 'cuda:1', ..."""
    seed: int = 0
    """seeds the buffer's shuffling and every trainer."""
    save_dir: str | None = None
    """the run folder (default: runs/<date>-<time>)."""
    log_steps: int | None = None
    """log loss, L0, FVU and dead % every this many steps (default: a hundredth of the run)."""
    save_steps: list[int] = field(default_factory=list, metadata={"metavar": "STEP"})
    """steps after which to save checkpoints and the resumable state."""
    eval_batches: int = 8
    """batches each dictionary is evaluated on at the end, with CE/KL recovered (0: no evaluation)."""
    eval_texts: int = 16
    """texts per evaluation batch for CE/KL recovered."""
    wandb: bool = False
    """log to Weights & Biases (needs wandb)."""
    wandb_project: str = "dictionary_learning"
    """the wandb project."""
    threads: int | None = None
    """torch CPU threads (default: torch's)."""
    overwrite: bool = False
    """replace the files of an earlier run in save_dir."""
    resume: bool = False
    """continue the interrupted run in save_dir from its last saved state (its run_config.json is read when no --config
    is given)."""
    progress: bool = True
    """show progress bars."""


def recipe_by_name(name: str) -> str:
    """The trainer name `name` stands for: exact, else case-insensitive, "Trainer" optional."""
    names = recipe_names()
    if name in names:
        return name
    wanted = name.strip().lower()
    for candidate in names:
        if wanted in (candidate.lower(), candidate.lower().removesuffix("trainer")):
            return candidate
    aliases = {alias: candidate for candidate in names
               for alias in (candidate.lower(), candidate.lower().removesuffix("trainer"))}
    suggestion = closest(wanted, aliases)
    if suggestion:
        suggestion = f"; did you mean {aliases[suggestion.split(chr(39))[1]]!r}?"
    raise ConfigError(f"unknown recipe {name!r}{suggestion} (recipes: {', '.join(names)})")


def recipe_hyperparameters(trainer: str) -> dict[str, Any]:
    """{field: annotation} of a recipe's config dataclass (the fields a recipe spec may set)."""
    import typing

    config_class = recipe_class(recipe_by_name(trainer)).Config
    hints = typing.get_type_hints(config_class)
    return {name: hints[name] for name in config_field_names(config_class) if name not in RUN_FILLED_FIELDS}


def _split_spec(spec: str) -> tuple[str, dict[str, str]]:
    """("Name", {key: raw value}) of "Name:key=value,key=value" (a value may hold commas: a list)."""
    name, _, rest = spec.partition(":")
    values: dict[str, str] = {}
    if rest.strip():
        for part in re.split(r",(?=\s*[A-Za-z_][\w-]*\s*=)", rest):
            key, equals, value = part.partition("=")
            if not equals:
                raise ConfigError(f"recipe {spec!r}: {part!r} is not key=value; write e.g. "
                                  "'TopKTrainer:k=32,dict_size=4096'")
            values[key.strip().replace("-", "_")] = value.strip()
    return name.strip(), values


def expand_grid(spec: str | Mapping[str, Any]) -> list[str | Mapping[str, Any]]:
    """The recipes a spec stands for: values written `a|b|c` give one recipe per value, and several
    such keys their product, e.g. "TopKTrainer:k=16|32,dict_size=2048|4096" is four recipes. A dict
    (or a spec without '|') is one recipe."""
    if not isinstance(spec, str) or "|" not in spec:
        return [spec]
    name, values = _split_spec(spec)
    recipes = [""]
    for key, value in values.items():
        recipes = [f"{done},{key}={option}" if done else f"{key}={option}" for done in recipes
                   for option in value.split("|")]
    return [f"{name}:{recipe}" for recipe in recipes]


def parse_recipe(spec: str | Mapping[str, Any]) -> dict[str, Any]:
    """A recipe as trainSAE's config dict {"trainer": name, hyperparameter: value, ...}, from a spec
    string "NAME:key=value,..." or a dict with a "trainer" key. Names and values are checked
    against the recipe's config dataclass (ConfigError naming the recipe and the key)."""
    if isinstance(spec, str):
        name, raw = _split_spec(spec)
    elif isinstance(spec, Mapping):
        raw = current_field_names({k: v for k, v in spec.items() if k not in ("trainer", "trainer_class")})
        name = spec.get("trainer") or spec.get("trainer_class")
        if not isinstance(name, str):
            raise ConfigError(f"recipe {dict(spec)!r} needs a 'trainer' key naming a recipe, e.g. 'TopKTrainer'")
        raw.pop("dict_class", None)
    else:
        raise ConfigError(f"a recipe is a string 'NAME:key=value,...' or a mapping with a 'trainer' key; got {spec!r}")
    trainer = recipe_by_name(name)
    fields = recipe_hyperparameters(trainer)
    recipe: dict[str, Any] = {"trainer": trainer}
    for key, value in current_field_names(raw).items():
        if key in RUN_FILLED_FIELDS:
            raise ConfigError(f"recipe {trainer}: {key} is set by the run ({RUN_FILLED_FIELDS[key]}); leave it out")
        if key not in fields:
            raise ConfigError(f"recipe {trainer} has no hyperparameter {key!r}{closest(key, fields)} (its "
                              f"hyperparameters: {', '.join(fields)})")
        recipe[key] = convert(value, fields[key], f"recipe {trainer}: {key}")
    return recipe


def recipe_label(config: Mapping[str, Any]) -> str:
    """A recipe with its sparsity setting, e.g. "TopKTrainer k=32" or "StandardTrainer λ=3"."""
    name = config["trainer"]
    for key, label in (("k", "k"), ("target_l0", "target_l0"), ("sparsity_penalty", "λ")):
        if isinstance(config.get(key), (int, float)):
            return f"{name} {label}={config[key]:g}"
    return name


def _default_save_dir() -> str:
    base = Path("runs") / time.strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return str(candidate)


def _sized_to_run(recipe: dict[str, Any], steps: int | None, target_l0: float | None) -> dict[str, Any]:
    """The recipe with `target_l0` filled in where it sets no k / target_l0, and its default
    schedule lengths capped to the run (SCHEDULE_CAPS)."""
    config_class = recipe_class(recipe["trainer"]).Config
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    recipe = dict(recipe)
    if target_l0 is not None and "k" not in recipe and "target_l0" not in recipe:
        if "k" in defaults:
            recipe["k"] = max(1, round(target_l0))
        else:
            recipe["target_l0"] = target_l0
    if steps is not None:
        for name, fraction in SCHEDULE_CAPS.items():
            default = defaults.get(name)
            if name in defaults and name not in recipe and isinstance(default, int):
                cap = int(fraction * steps)
                if default > cap:
                    recipe[name] = cap
        if "warmup_steps" not in recipe and default_warmup_steps(steps) < WARMUP_STEPS:
            recipe["warmup_steps"] = default_warmup_steps(steps)  # what the trainer resolves, recorded here too
    return recipe


def resolve_run_config(config: TrainRunConfig) -> TrainRunConfig:
    """`config` with what the run decides filled in (idempotent): the device, the run folder, steps
    from tokens, the log interval, and each recipe as a checked dict sized to the run. The result
    is what the run folder's run_config.json records. ConfigError for values that cannot work."""
    import torch

    from .checks import as_dtype, check_device

    for name in ("batch_size", "n_ctxs", "ctx_len", "refresh_batch_size", "expansion_factor"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive int; got {getattr(config, name)}")
    for name in ("steps", "tokens", "log_steps", "threads"):
        value = getattr(config, name)
        if value is not None and value < 1:
            raise ConfigError(f"{name} must be a positive int or none; got {value}")
    for name in ("eval_batches", "eval_texts"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be >= 0; got {getattr(config, name)}")
    if config.target_l0 is not None and not config.target_l0 > 0:
        raise ConfigError(f"target_l0 must be positive; got {config.target_l0}")
    if not config.sites:
        raise ConfigError("sites is empty; name at least one module, e.g. 'gpt_neox.layers.0.mlp'")
    if not config.recipes:
        raise ConfigError(f"no recipe; pass at least one, e.g. --recipe {DEFAULT_RECIPE}")
    if config.resume and config.overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume continues the run in save_dir, overwrite "
                          "replaces it")
    if config.resume and config.save_dir is None:
        raise ConfigError("resume needs the folder of the run to continue: pass --save-dir (or --config "
                          "RUN_FOLDER/run_config.json)")
    as_dtype(config.dtype, "dtype")
    device = config.device
    if device == "auto":
        device = "cuda:0" if torch.cuda.is_available() else "cpu"
    device = str(check_device(device, "device"))
    steps = config.steps
    if config.tokens is not None:
        steps = math.ceil(config.tokens / config.batch_size)
    if config.n_ctxs * config.ctx_len < 2 * config.batch_size:
        raise ConfigError(f"the buffer (n_ctxs * ctx_len = {config.n_ctxs * config.ctx_len} activations) must hold at "
                          f"least two batches of batch_size={config.batch_size}; raise n_ctxs or lower batch_size")
    log_steps = config.log_steps or (max(1, steps // 100) if steps else 100)
    recipes = [_sized_to_run(parse_recipe(recipe), steps, config.target_l0)
               for spec in config.recipes for recipe in expand_grid(spec)]
    bad_saves = [s for s in config.save_steps if s < 1 or (steps is not None and s > steps)]
    if bad_saves:
        raise ConfigError(f"save_steps {bad_saves} are outside the run (1..{steps})")
    return dataclasses.replace(config, device=device, steps=steps, tokens=None, log_steps=log_steps, recipes=recipes,
                               save_dir=config.save_dir or _default_save_dir())
