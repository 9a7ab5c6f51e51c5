"""The whole workflow from a config: load a model and a text stream, train a sweep, evaluate it,
export it. What `python -m dictionary_learning` runs, as Python functions of the same dataclasses.

    from dictionary_learning.workflow import TrainRunConfig, train_from_config
    result = train_from_config(TrainRunConfig(recipes=["TopKTrainer:k=32"], steps=2000))
    result.save_dir, result.dictionaries, result.evaluation

`train_from_config` reads its sites with one multi-site ActivationBuffer and trains every
(site × recipe) pair with trainSAE into `save_dir/trainer_i`; `save_dir/run_config.json` records
the resolved config and the command, and `save_dir/eval.json` the evaluation at the end. Nothing
is printed (progress bars aside); the command line prints the summary.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from .dataclass_args import ConfigError, check_keys, read_config_file
from .files import atomic_write_json, read_json_object
from .run_config import TrainRunConfig, resolve_run_config

__all__ = ["TrainRunConfig", "train_from_config", "TrainResult", "load_language_model", "text_stream",
           "RUN_CONFIG_FILE", "EVAL_FILE", "read_run_config", "EvalConfig", "evaluate_runs", "ExportConfig",
           "export_dictionaries", "BUNDLED", "local_run_folder", "is_activation_cache", "text_dataset",
           "CacheConfig", "write_cache", "DashboardConfig", "write_dashboards"]

BUNDLED = "bundled"
STDLIB = "stdlib"
RUN_CONFIG_FILE = "run_config.json"
EVAL_FILE = "eval.json"
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
"""The files a folder of text contributes."""
CHARS_PER_TOKEN = 5
"""Text files are cut into pieces of this many characters per token of a context (about one context each)."""


# --------------------------------------------------------------------------------------------
# Models and text
# --------------------------------------------------------------------------------------------


def _is_bundled(name: str) -> bool:
    from .bundled import BUNDLED_MODEL_DIR

    if name == BUNDLED:
        return True
    try:
        return Path(name).resolve() == BUNDLED_MODEL_DIR.resolve()
    except OSError:
        return False


def load_language_model(name: str, device: str = "cpu", dtype: Any = None):
    """An nnsight TransformersModel: the bundled model ("bundled"), a local folder holding a causal
    LM and its tokenizer, or a Hugging Face model id (checked on the Hub in seconds first, unless
    HF_HUB_OFFLINE is set). The tokenizer pads on the left, with EOS when it has no pad token."""
    import torch

    from .checks import as_dtype

    dtype = as_dtype(dtype, "dtype") or torch.float32
    if _is_bundled(name):
        from .bundled import load_bundled_model

        return load_bundled_model(device=device, dtype=dtype)
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise FileNotFoundError(f"model folder {str(local)!r} has no config.json; pass a folder written by "
                                    "save_pretrained, a Hugging Face model id, or 'bundled'")
        if not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json",
                                                     "tokenizer.model")):
            raise FileNotFoundError(f"model folder {str(local)!r} has no tokenizer files (tokenizer.json, "
                                    "tokenizer_config.json); save the tokenizer there too (tokenizer.save_pretrained"
                                    f"({str(local)!r}))")
        source = str(local)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"model {name!r}: no such folder; pass a local model folder, a Hugging Face model "
                                "id (OWNER/NAME), or 'bundled'")
    else:
        from .hub import check_model_on_hub

        check_model_on_hub(name)
        source = name
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name!r} has neither a pad token nor an EOS token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype).to(device).eval()
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise ValueError(f"{str(path)!r} line {number} is not JSON; a .jsonl file holds one JSON object per "
                                 "line") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ValueError(f"{str(path)!r} line {number} has no string field {text_field!r} (it has {fields}); "
                                 "pass --text-field")
            yield record[text_field]


def _file_texts(files: list[Path], chunk_chars: int) -> Iterator[str]:
    from .bundled import line_aligned_chunks

    for path in files:
        yield from line_aligned_chunks(path.read_bytes().decode("utf-8", errors="replace"), chunk_chars)


def _text_files(dataset: str) -> list[Path] | None:
    """The text files `dataset` names (a file, a folder of text files, a glob), or None if it names
    no local path."""
    if any(ch in dataset for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(dataset, recursive=True) if Path(p).is_file())
        if not matches:
            raise FileNotFoundError(f"dataset {dataset!r}: the pattern matches no file")
        return matches
    path = Path(dataset).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"dataset folder {dataset!r} holds no text files ({', '.join(TEXT_SUFFIXES)})")
        return files
    return None


def text_stream(dataset: str, split: str = "train", text_field: str = "text", dataset_split: str = "train",
                chunk_chars: int = 1024) -> Iterator[str] | None:
    """The texts of `dataset` (see TrainRunConfig.dataset). `split` "train" gives the training
    stream; "heldout" gives texts the training stream never yields, where the dataset has them
    (the stdlib text's held-out files), else None. Text files are cut into line-aligned pieces of
    at most `chunk_chars` characters."""
    if dataset == STDLIB:
        from .bundled import stdlib_text_stream

        return stdlib_text_stream(split=split, repeat=split == "train")
    if split != "train":
        return None
    if dataset.endswith(".zst"):
        from .utils import zst_to_generator

        return zst_to_generator(dataset, text_field=text_field)
    files = _text_files(dataset)
    if files is not None:
        if len(files) == 1 and files[0].name.endswith((".jsonl", ".json")):
            return _jsonl_texts(files[0], text_field)
        return _file_texts(files, chunk_chars)
    if dataset.startswith((".", "/", "~")) or dataset.count("/") > 1:
        raise FileNotFoundError(f"dataset {dataset!r}: no such file or folder")
    from .hub import check_dataset_on_hub
    from .utils import hf_dataset_to_generator

    check_dataset_on_hub(dataset)
    return hf_dataset_to_generator(dataset, split=dataset_split, streaming=True, text_field=text_field)


def is_activation_cache(dataset: str) -> bool:
    """Whether `dataset` names an activation cache folder (written by cache_activations)."""
    from .shards import MANIFEST

    return (Path(dataset).expanduser() / MANIFEST).is_file()


def text_dataset(dataset: str) -> str:
    """The text `dataset` stands for: itself, or for an activation cache the dataset it was written
    from (the `data_source` that `python -m dictionary_learning cache` records). ConfigError when a
    cache does not name text that can be read again."""
    if not is_activation_cache(dataset):
        return dataset
    from .shards import read_manifest

    source = str(read_manifest(Path(dataset).expanduser()).get("data_source"))
    if source == STDLIB or Path(source).expanduser().exists():
        return source
    raise ConfigError(f"the activation cache {dataset!r} was written from {source!r}, which is not text this command "
                      "can read again; pass --dataset TEXT (e.g. the dataset the cache was written from)")


def _cached_sites(config: TrainRunConfig, manifest: dict[str, Any]) -> list[str]:
    """The sites of a cache that `config.sites` (names or globs) select, in the cache's order."""
    from .sites import site_matches

    names = list(manifest["sites"])
    chosen: list[str] = []
    for pattern in config.sites:
        if any(ch in pattern for ch in "*?["):
            matches = [name for name in names if site_matches(name, pattern)]
        else:
            matches = [name for name in names if name == pattern]
        if not matches:
            raise ConfigError(f"--sites {pattern!r} matches no site of the activation cache {config.dataset!r} (it "
                              f"holds {', '.join(names)})")
        chosen += [name for name in matches if name not in chosen]
    return chosen


def _open_cache(config: TrainRunConfig, seed: int, epochs: int | None):
    """A CachedActivations over the sites `config` selects of the cache `config.dataset`."""
    from .cache_reader import CachedActivations
    from .shards import read_manifest

    path = Path(config.dataset).expanduser()
    manifest = read_manifest(path)
    if manifest["io"] != config.io:
        raise ConfigError(f"the activation cache {config.dataset!r} holds io={manifest['io']!r} activations; pass "
                          f"--io {manifest['io']}")
    sites = _cached_sites(config, manifest)
    return CachedActivations(path, site=sites[0] if len(sites) == 1 else sites, batch_size=config.batch_size,
                             seed=seed, epochs=epochs, shuffle_window=max(2**17, 2 * config.batch_size))


def _with_cache_model(config: TrainRunConfig) -> TrainRunConfig:
    """`config` with the model and ctx_len of its activation cache (the cache decides both)."""
    from .shards import read_manifest

    manifest = read_manifest(Path(config.dataset).expanduser())
    cached = manifest["model"]["name"]
    same = config.model == cached or (_is_bundled(config.model) and _is_bundled(str(cached)))
    if not same and config.model != BUNDLED:
        raise ConfigError(f"--model {config.model!r}: the activation cache {config.dataset!r} holds activations of "
                          f"{cached!r}; leave --model out (the cache decides)")
    return dataclasses.replace(config, model=str(cached), ctx_len=int(manifest["ctx_len"]))


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


@dataclass
class TrainResult:
    """What train_from_config produced."""

    config: TrainRunConfig
    """the resolved config (what run_config.json records)."""
    save_dir: Path
    dictionaries: list
    """the trained dictionaries, in the order of the trainer folders."""
    folders: list[Path]
    """each dictionary's folder (save_dir/trainer_i)."""
    trainer_configs: list[dict[str, Any]]
    """the trainSAE configs: recipe × site."""
    evaluation: list[dict[str, Any]] = field(default_factory=list)
    """evaluate_sweep's rows (empty without evaluation)."""
    seconds: float = 0.0


def read_run_config(path: str | Path) -> dict[str, Any]:
    """The config values of a config file: a mapping of TrainRunConfig keys, or a run folder's
    run_config.json (whose "config" holds them)."""
    values = read_config_file(path)
    if isinstance(values.get("config"), dict) and "command" in values:
        values = values["config"]
    check_keys(TrainRunConfig, values, str(path))
    return values


def _check_save_dir(config: TrainRunConfig) -> None:
    """Refuse a run folder that holds another run unless told to resume or overwrite it."""
    from .runs import STATE_FILE, previous_run

    save_dir = Path(config.save_dir)
    if config.resume:
        if not (save_dir / STATE_FILE).exists():
            raise FileNotFoundError(f"--resume: {str(save_dir / STATE_FILE)!r} not found; a run writes it at its "
                                    "--save-steps (and at the end when it has save steps)")
        return
    found = previous_run(save_dir)
    if found is not None and not config.overwrite:
        raise FileExistsError(f"save_dir {str(save_dir)!r} holds {found}; pass --resume to continue it, --overwrite "
                              "to replace it, or another --save-dir")


def _trainer_configs(config: TrainRunConfig, widths: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (recipe × site) pair as a trainSAE config: each recipe on each site it trains on, with
    the site's widths (`widths`: {site: width, or (d_in, d_out)}) and the run's dict size, steps and
    device."""
    from .registry import recipe_class

    configs = []
    for recipe in config.recipes:
        fields = {f.name for f in dataclasses.fields(recipe_class(recipe["trainer"]).Config)}
        sites = [recipe["site"]] if recipe.get("site") else list(widths)
        for site in sites:
            if site not in widths:
                raise ConfigError(f"recipe {recipe['trainer']}: site {site!r} is not one the run reads "
                                  f"({', '.join(widths)})")
            width = widths[site]
            width = tuple(width) if isinstance(width, list) else width
            d_in, d_out = width if isinstance(width, tuple) else (width, width)
            trainer = {**recipe, "site": site, "activation_dim": d_in, "device": recipe.get("device", config.device)}
            trainer.setdefault("dict_size", config.expansion_factor * d_in)
            if "output_dim" in fields and d_out != d_in:
                trainer["output_dim"] = d_out
            configs.append(trainer)
    return configs


def _command_line(argv: list[str] | None) -> str | None:
    import shlex

    return None if argv is None else "python -m dictionary_learning " + shlex.join(argv)


def write_run_config(config: TrainRunConfig, command: str | None) -> Path:
    """save_dir/run_config.json: the resolved config ("config") and the command that ran it; `train
    --config` reads it back, so it repeats the run (overwrite and resume are recorded off)."""
    recorded = dataclasses.replace(config, overwrite=False, resume=False)
    path = Path(config.save_dir) / RUN_CONFIG_FILE
    atomic_write_json({"command": command, "cwd": str(Path.cwd()), "python": sys.executable,
                       "dictionary_learning": sys.modules[__package__].__version__,
                       "started": time.strftime("%Y-%m-%d %H:%M:%S"), "config": dataclasses.asdict(recorded)}, path)
    return path


def train_from_config(config: TrainRunConfig, argv: list[str] | None = None) -> TrainResult:
    """Train the run `config` describes (resolved first: see resolve_run_config) and evaluate it.
    `argv`: the command line's arguments, recorded in run_config.json."""
    from .buffer import ActivationBuffer
    from .training import trainSAE

    start = time.perf_counter()
    config = resolve_run_config(config)
    cached = is_activation_cache(config.dataset)
    if cached:
        config = _with_cache_model(config)
    _check_save_dir(config)
    if config.threads is not None:
        import torch

        torch.set_num_threads(config.threads)
    model = None
    if cached:  # the activations are on disk: no model, no text
        buffer = _open_cache(config, config.seed, epochs=None)
        widths = buffer.sites
    else:
        # the text first: a dataset that does not exist fails before the model loads
        data = text_stream(config.dataset, "train", config.text_field, config.dataset_split,
                           chunk_chars=CHARS_PER_TOKEN * config.ctx_len)
        model = load_language_model(config.model, config.device, config.dtype)
        buffer = ActivationBuffer(data, model, submodules=config.sites, io=config.io, n_ctxs=config.n_ctxs,
                                  ctx_len=config.ctx_len, refresh_batch_size=config.refresh_batch_size,
                                  out_batch_size=config.batch_size, device=config.device, seed=config.seed,
                                  progress=config.progress)
        widths = buffer.d_sites
    trainer_configs = _trainer_configs(config, widths)
    save_dir = Path(config.save_dir)
    write_run_config(config, _command_line(argv))
    dictionaries = trainSAE(
        buffer, trainer_configs=trainer_configs, steps=config.steps, save_dir=save_dir,
        save_steps=config.save_steps or None, log_steps=config.log_steps, device=config.device, seed=config.seed,
        normalize_activations=config.normalize_activations, use_wandb=config.wandb,
        wandb_project=config.wandb_project, resume_from=save_dir if config.resume else None,
        overwrite=config.overwrite, progress=config.progress,
    )
    folders = [save_dir / f"trainer_{i}" for i in range(len(dictionaries))]
    result = TrainResult(config, save_dir, dictionaries, folders, trainer_configs)
    if config.eval_batches:
        if cached:  # tensor metrics on the cache's rows, in another order (no text: no CE/KL recovered)
            eval_buffer = _open_cache(config, config.seed + 1, epochs=1)
        else:
            heldout = text_stream(config.dataset, "heldout")
            eval_buffer = buffer
            if heldout is not None:
                eval_buffer = ActivationBuffer(
                    heldout, model, submodules=config.sites, io=config.io,
                    n_ctxs=max(config.n_ctxs, 2 * config.eval_batches * config.batch_size // config.ctx_len + 1),
                    ctx_len=config.ctx_len, refresh_batch_size=config.refresh_batch_size,
                    out_batch_size=config.batch_size, device=config.device, seed=config.seed, progress=False)
        result.evaluation = _evaluate_into(save_dir, eval_buffer, config.eval_batches, config.eval_texts,
                                           config.ctx_len)
    result.seconds = time.perf_counter() - start
    return result


def _evaluate_into(folder: Path, buffer, n_batches: int, texts: int, max_len: int) -> list[dict[str, Any]]:
    """evaluate_sweep's rows for `folder`, also written to folder/eval.json; [] with a warning when
    the data has no batch left to evaluate on."""
    from .evaluation import evaluate_sweep

    try:
        rows = evaluate_sweep(folder, buffer, n_batches=n_batches, batch_size=texts, max_len=max_len)
    except ValueError as error:
        if "no batch" not in str(error):
            raise
        warnings.warn(f"no data left to evaluate {str(folder)!r} on: the training used all of it; evaluate with "
                      "`python -m dictionary_learning eval` and another --dataset", stacklevel=3)
        return []
    atomic_write_json({"n_batches": n_batches, "texts_per_batch": texts, "rows": rows}, folder / EVAL_FILE)
    return rows


# --------------------------------------------------------------------------------------------
# Evaluation of saved runs
# --------------------------------------------------------------------------------------------


@dataclass
class EvalConfig:
    """What `python -m dictionary_learning eval` takes."""

    paths: list[str] = field(metadata={"positional": True, "nargs": "+", "metavar": "RUN_DIR"})
    """dictionary folders, run folders or sweeps (every folder below holding ae.pt), or hf:// paths."""
    model: str | None = None
    """the language model (default: the one the run recorded)."""
    dataset: str | None = None
    """the text to evaluate on (default: the run's; the held-out split of 'stdlib')."""
    text_field: str = "text"
    """the field of each record that holds its text."""
    n_batches: int = 8
    """batches of activations each dictionary is scored on (the same batches for all)."""
    batch_size: int = 1024
    """activations per batch."""
    texts: int = 16
    """texts per batch for CE/KL recovered (0: tensor metrics only)."""
    ctx_len: int | None = None
    """tokens per context (default: the run's)."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda:0', ..."""
    seed: int = 0
    """seeds the order of the activations."""
    json: bool = False
    """print the rows as JSON instead of a table."""
    save: bool = True
    """write the rows to <run folder>/eval.json (which `plot` reads)."""


def _run_record(folder: Path) -> dict[str, Any]:
    """The TrainRunConfig values recorded by the run that wrote `folder` (its run_config.json, or
    its parent's), or {}."""
    for candidate in (folder, *folder.parents[:2]):
        path = candidate / RUN_CONFIG_FILE
        if path.is_file():
            try:
                return read_run_config(path)
            except ValueError:
                return {}
    return {}


def local_run_folder(path: str) -> Path:
    """A local folder for `path`: itself, or the local copy of an hf:// run (hub.fetch_run)."""
    from .hub import fetch_run, is_hub_path

    if is_hub_path(path):
        return fetch_run(path)
    folder = Path(path)
    if not folder.exists():
        raise FileNotFoundError(f"{path!r} does not exist; pass a run folder, a dictionary folder or an hf:// path")
    return folder


def evaluate_runs(config: EvalConfig) -> list[dict[str, Any]]:
    """Every dictionary under `config.paths`, scored on the same batches of its model's activations:
    evaluate_sweep's rows (site, recipe, L0, FVU, dead %, CE/KL recovered), with "run" naming the
    path each came from."""
    import torch

    from .buffer import ActivationBuffer
    from .checks import check_device
    from .hub import is_hub_path
    from .interop import get_nested_folders

    device = "cuda:0" if config.device == "auto" and torch.cuda.is_available() else (
        "cpu" if config.device == "auto" else config.device)
    device = str(check_device(device, "device"))
    rows: list[dict[str, Any]] = []
    for path in config.paths:
        root = local_run_folder(path)
        folders = [Path(f) for f in get_nested_folders(root)]
        if not folders:
            raise FileNotFoundError(f"no dictionary under {path!r} (no folder holding ae.pt and config.json)")
        configs = [read_json_object(f / "config.json", "folder's config.json") for f in folders]
        buffers = [c.get("buffer") if isinstance(c.get("buffer"), dict) else {} for c in configs]
        record = _run_record(root)
        recorded = {key: next((b[key] for b in buffers if b.get(key)), None) for key in ("model", "ctx_len")}
        model_name = config.model or record.get("model") or recorded["model"]
        if model_name is None:
            raise ConfigError(f"{path!r} does not record its language model; pass --model")
        ios = sorted({b.get("io", "out") for b in buffers})
        if len(ios) > 1:
            raise ConfigError(f"{path!r} mixes dictionaries of io {ios}; evaluate them one folder at a time")
        sites = {}
        for folder, cfg, buffer in zip(folders, configs, buffers):
            site = (cfg.get("trainer") or {}).get("site") or buffer.get("submodule")
            if not isinstance(site, str):
                raise ConfigError(f"{str(folder)!r} does not record the module it was trained on; it cannot be "
                                  "evaluated on a model")
            sites[site] = buffer.get("submodule") or site
        ctx_len = config.ctx_len or record.get("ctx_len") or recorded["ctx_len"] or 128
        dataset = text_dataset(config.dataset or record.get("dataset") or STDLIB)
        model = load_language_model(model_name, device, record.get("dtype"))
        texts = text_stream(dataset, "heldout", config.text_field) or text_stream(dataset, "train", config.text_field,
                                                                                 chunk_chars=CHARS_PER_TOKEN * ctx_len)
        n_ctxs = max(2, 2 * config.n_batches * config.batch_size // ctx_len + 1)
        buffer = ActivationBuffer(texts, model, submodules=sites, io=ios[0], n_ctxs=n_ctxs, ctx_len=ctx_len,
                                  refresh_batch_size=32, out_batch_size=config.batch_size, device=device,
                                  seed=config.seed, progress=False)
        from .evaluation import evaluate_sweep

        found = evaluate_sweep(root, buffer, n_batches=config.n_batches, batch_size=config.texts, max_len=ctx_len)
        if config.save and not is_hub_path(path):
            atomic_write_json({"n_batches": config.n_batches, "texts_per_batch": config.texts, "dataset": dataset,
                               "rows": found}, root / EVAL_FILE)
        rows += [{"run": path, **row} for row in found]
    return rows


# --------------------------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------------------------


@dataclass
class ExportConfig:
    """What `python -m dictionary_learning export` takes."""

    path: str = field(metadata={"positional": True, "metavar": "RUN_DIR"})
    """a dictionary folder, a run folder or sweep (every dictionary below it), or an hf:// path."""
    out: str = field(metadata={"positional": True, "metavar": "OUT_DIR"})
    """where to write; a sweep keeps its layout below it (OUT_DIR/trainer_0, ...)."""
    format: str = field(default="saelens", metadata={"choices": ["saelens", "safetensors"]})
    """'saelens': SAELens' cfg.json + sae_weights.safetensors (with the model and hook point); 'safetensors':
    ae.safetensors + config.json, our layout with safetensors weights."""


def export_dictionaries(config: ExportConfig) -> list[Path]:
    """Write every dictionary under `config.path` in `config.format`; returns the folders written."""
    from .interop import get_nested_folders, load_dictionary, save_saelens

    root = local_run_folder(config.path)
    folders = [Path(f) for f in get_nested_folders(root)]
    if not folders:
        raise FileNotFoundError(f"no dictionary under {config.path!r} (no folder holding ae.pt and config.json)")
    out = Path(config.out)
    written = []
    for folder in folders:
        target = out / folder.relative_to(root)
        dictionary, run_config = load_dictionary(folder)
        if config.format == "saelens":
            cfg = dictionary.cfg.to_dict()
            metadata = {key: cfg[key] for key in ("model_name", "hook_name", "hook_layer", "context_size",
                                                  "hook_name_out", "training_tokens") if cfg.get(key) is not None}
            save_saelens(dictionary, target, metadata=metadata)
        else:
            from safetensors.torch import save as safetensors_bytes

            from .files import atomic_write

            data = safetensors_bytes({k: v.contiguous() for k, v in dictionary.state_dict().items()})
            atomic_write(target / "ae.safetensors", lambda file: file.write(data))
            atomic_write_json(run_config, target / "config.json")
        written.append(target)
    return written


# --------------------------------------------------------------------------------------------
# Activation caches
# --------------------------------------------------------------------------------------------


@dataclass
class CacheConfig:
    """What `python -m dictionary_learning cache` takes."""

    path: str = field(metadata={"positional": True, "metavar": "CACHE_DIR"})
    """the cache folder to write (new or empty; with --resume, the cache to continue or extend)."""
    model: str = BUNDLED
    """'bundled' (the offline tiny Pythia of assets/), a Hugging Face model id, or a local folder holding a model and
    its tokenizer."""
    dataset: str = STDLIB
    """the text: 'stdlib' (offline), a .jsonl.zst or .jsonl file, a text file, a folder or glob of text files, or a
    Hugging Face dataset name (streamed)."""
    text_field: str = "text"
    """the field of each record that holds its text (.jsonl, .jsonl.zst, Hugging Face datasets)."""
    dataset_split: str = "train"
    """the split of a Hugging Face dataset."""
    sites: list[str] = field(default_factory=lambda: ["gpt_neox.layers.0.mlp"], metadata={"metavar": "PATH"})
    """the modules to read, as dotted paths or globs ('*' is one path component); one forward pass reads them all."""
    io: str = field(default="out", metadata={"choices": ["out", "in", "in_to_out"]})
    """store each site's output, its input, or (input, output) pairs for transcoders."""
    n_tokens: int = 1_000_000
    """rows (tokens) the cache holds when done; with --resume, a larger value appends."""
    ctx_len: int = 128
    """tokens per context."""
    refresh_batch_size: int = 32
    """texts per forward pass of the model."""
    dtype: str = field(default="bfloat16", metadata={"choices": ["float32", "float16", "bfloat16", "int8"]})
    """storage dtype of the activations; int8: 8-bit values with a float32 scale per row (read back as float32)."""
    model_dtype: str = "float32"
    """the language model's dtype (float32, bfloat16, float16)."""
    shard_tokens: int = 2**18
    """rows per shard file."""
    compression_level: int = 1
    """zstd level (1 is fast; negative levels are faster and compress less)."""
    workers: int = 1
    """compression threads."""
    resume: bool = False
    """continue (or extend, with a larger --n-tokens) the cache at CACHE_DIR, with the same model, data and
    settings."""
    device: str = "auto"
    """'auto' (cuda:0 when available, else cpu), 'cpu', 'cuda:1', ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's)."""
    progress: bool = True
    """show a progress bar."""


def _device(name: str) -> str:
    import torch

    from .checks import check_device

    if name == "auto":
        name = "cuda:0" if torch.cuda.is_available() else "cpu"
    return str(check_device(name, "device"))


def _check_counts_and_threads(config: Any, counts: Sequence[str]) -> None:
    """The `counts` fields of a command's config are positive; its `threads`, when set, is positive
    and becomes torch's thread count (a command's process-wide switch, made by the command)."""
    import torch

    for name in counts:
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be a positive int; got {getattr(config, name)}")
    if config.threads is not None:
        if config.threads < 1:
            raise ConfigError(f"threads must be a positive int or none; got {config.threads}")
        torch.set_num_threads(config.threads)


def write_cache(config: CacheConfig) -> dict[str, Any]:
    """Write the activation cache `config` describes (cache_activations over the model and text that
    `train` would read); returns its manifest. The dataset's name is recorded as the cache's
    `data_source`, so a resumed cache must read the same text, and `eval`/`dashboard` of a run
    trained on the cache find the text again."""
    import torch

    from .cache import cache_activations
    from .checks import as_dtype

    _check_counts_and_threads(config, ("n_tokens", "ctx_len", "refresh_batch_size", "shard_tokens", "workers"))
    if not config.sites:
        raise ConfigError("sites is empty; name at least one module, e.g. 'gpt_neox.layers.0.mlp'")
    if is_activation_cache(config.path) and not config.resume:
        raise ConfigError(f"{config.path!r} holds an activation cache already; pass --resume to continue or extend it "
                          "(same model, data and settings), or another CACHE_DIR")
    device = _device(config.device)
    as_dtype(config.model_dtype, "model_dtype")
    data = text_stream(config.dataset, "train", config.text_field, config.dataset_split,
                       chunk_chars=CHARS_PER_TOKEN * config.ctx_len)
    model = load_language_model(config.model, device, config.model_dtype)
    return cache_activations(data, model, config.sites, config.path, config.n_tokens, io=config.io,
                             ctx_len=config.ctx_len, refresh_batch_size=config.refresh_batch_size,
                             dtype=getattr(torch, config.dtype), shard_tokens=config.shard_tokens,
                             compression_level=config.compression_level, resume=config.resume,
                             data_source=config.dataset, workers=config.workers, progress=config.progress)


# --------------------------------------------------------------------------------------------
# Feature dashboards
# --------------------------------------------------------------------------------------------


@dataclass
class DashboardConfig:
    """What `python -m dictionary_learning dashboard` takes."""

    path: str = field(metadata={"positional": True, "metavar": "RUN_DIR"})
    """a dictionary folder or a run folder (a dashboard for every dictionary below it), or an hf:// path."""
    out: str | None = None
    """where to write: OUT/<dictionary folder relative to RUN_DIR> (default: a 'dashboard' folder in each
    dictionary's folder)."""
    n_tokens: int = 100_000
    """tokens read for the statistics."""
    model: str | None = None
    """the language model (default: the one the run recorded)."""
    dataset: str | None = None
    """the text (default: the run's; the held-out split of 'stdlib')."""
    text_field: str = "text"
    """the field of each record that holds its text."""
    ctx_len: int | None = None
    """tokens per context (default: the run's)."""
    batch_size: int = 32
    """texts per forward pass."""
    top_k: int = 10
    """top-activating contexts kept per latent."""
    device: str = "auto"
    """'auto', 'cpu', 'cuda:0', ..."""
    threads: int | None = None
    """torch CPU threads (default: torch's)."""
    progress: bool = True
    """show a progress bar."""


def write_dashboards(config: DashboardConfig) -> list[Path]:
    """A feature dashboard (dashboards.dashboard) of every dictionary under `config.path`, each read
    on the model and site its folder's config.json records; returns the index.html paths."""
    from .dashboards import dashboard
    from .interop import get_nested_folders, load_dictionary

    _check_counts_and_threads(config, ("n_tokens", "batch_size", "top_k"))
    device = _device(config.device)
    from .hub import is_hub_path

    if is_hub_path(config.path) and config.out is None:
        raise ConfigError(f"{config.path!r} is on the Hub: pass --out DIR for the dashboards")
    root = local_run_folder(config.path)
    folders = [Path(f) for f in get_nested_folders(root)]
    if not folders:
        raise FileNotFoundError(f"no dictionary under {config.path!r} (no folder holding ae.pt and config.json)")
    record = _run_record(root)
    models: dict[str, Any] = {}
    written = []
    for folder in folders:
        dictionary, folder_config = load_dictionary(folder, device=device)
        buffer = folder_config.get("buffer") if isinstance(folder_config.get("buffer"), dict) else {}
        site = buffer.get("submodule") or (folder_config.get("trainer") or {}).get("site")
        if not isinstance(site, str):
            raise ConfigError(f"{str(folder)!r} does not record the module it was trained on (config.json has no "
                              "buffer.submodule); a dashboard needs it")
        model_name = config.model or record.get("model") or buffer.get("model")
        if model_name is None:
            raise ConfigError(f"{str(folder)!r} does not record its language model; pass --model")
        if model_name not in models:
            models[model_name] = load_language_model(model_name, device, record.get("dtype"))
        ctx_len = config.ctx_len or record.get("ctx_len") or buffer.get("ctx_len") or 128
        dataset = text_dataset(config.dataset or record.get("dataset") or STDLIB)
        texts = text_stream(dataset, "heldout", config.text_field) or text_stream(
            dataset, "train", config.text_field, chunk_chars=CHARS_PER_TOKEN * ctx_len)
        relative = folder.relative_to(root)
        out = Path(config.out) / relative if config.out else folder / "dashboard"
        io = buffer.get("io", "out")
        title = " ".join(part for part in (Path(config.path).name, str(relative)) if part != ".")
        written.append(dashboard(dictionary, texts, models[model_name], site, out, n_tokens=config.n_tokens,
                                 io=None if io == "in_to_out" else io, ctx_len=ctx_len, batch_size=config.batch_size,
                                 top_k=config.top_k, title=f"{title} ({site})", progress=config.progress))
    return written
