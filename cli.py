"""`python -m dictionary_learning COMMAND`: the whole workflow from the command line.

Every subcommand is one `Command` in the table `COMMANDS`: its name, the dataclass whose fields are
its flags (the same dataclass the Python API takes: `TrainRunConfig` for `train`, `EvalConfig` for
`eval`, ...), and one small function that runs it. `--help` is generated from the dataclass (field
docstrings and defaults, dataclass_args.py). Adding a subcommand = a config dataclass, a function
`(config, argv) -> exit status`, and one line in the table.

User errors (a typo in a flag, a recipe, a config key; a missing file; a hub that does not
answer) end the command with one line on stderr and exit status 2 (usage) or 1 (the run); nothing
prints a traceback unless `--traceback` is given. Warnings are printed as one line each.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .dataclass_args import ConfigError, add_arguments, build, closest, field_docs, flag_values
from .published import DownloadConfig, download_published
from .plots import PlotConfig, plot_runs
from .run_config import TrainRunConfig, recipe_hyperparameters, recipe_label, resolve_run_config
from .workflow import (RUN_CONFIG_FILE, CacheConfig, DashboardConfig, EvalConfig, ExportConfig, TrainResult,
                       evaluate_runs, export_dictionaries, read_run_config, train_from_config, write_cache,
                       write_dashboards)

__all__ = ["main", "Command", "COMMANDS", "RecipesConfig", "PushConfig", "PROG"]

PROG = "python -m dictionary_learning"


# --------------------------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    return f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


def _last_log_record(folder: Path) -> dict[str, Any]:
    lines = (folder / "log.jsonl").read_text().splitlines() if (folder / "log.jsonl").exists() else []
    for line in reversed(lines):
        with contextlib.suppress(json.JSONDecodeError):
            return json.loads(line)
    return {}


def train_summary(result: TrainResult) -> str:
    """The end-of-run screen: what was trained, each dictionary's metrics, where the files are."""
    config = result.config
    steps = max((_last_log_record(f).get("step", 0) for f in result.folders), default=0)
    evaluated = {row["folder"]: row for row in result.evaluation}
    rows = []
    for folder, trainer in zip(result.folders, result.trainer_configs):
        row = {"folder": folder.name, "site": trainer["site"], "recipe": recipe_label(trainer),
               "dict_size": trainer["dict_size"]}
        if folder.name in evaluated:
            found = evaluated[folder.name]
            row.update({key: found[key] for key in ("l0", "fvu", "dead_pct", "ce_recovered", "kl") if key in found})
        else:
            last = _last_log_record(folder)
            row.update({key: last[key] for key in ("loss", "l0", "fvu", "dead_pct") if key in last})
        rows.append(row)
    from .evaluation import format_table

    where = "evaluated on held-out text" if result.evaluation else "last logged training batch"
    lines = [
        f"\ntrained {len(result.folders)} dictionar{'y' if len(result.folders) == 1 else 'ies'} for {steps} steps "
        f"({steps * config.batch_size:,} activations) in {_duration(result.seconds)}; metrics: {where}",
        format_table(rows),
        f"run folder: {result.save_dir} (trainer_i/ae.pt, config.json, log.jsonl; {RUN_CONFIG_FILE} repeats the run)",
        f"next: {PROG} plot {result.save_dir}   |   {PROG} eval {result.save_dir}   |   "
        f"{PROG} export {result.save_dir} OUT_DIR",
    ]
    return "\n".join(lines)


def _model_loading_bar(progress: bool) -> None:
    """With --no-progress, no bar while the model loads either."""
    if not progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()


def train_command(config: TrainRunConfig, argv: list[str]) -> int:
    import torch

    from .utils import keep_freed_cpu_memory

    config = resolve_run_config(config)
    _model_loading_bar(config.progress)
    if torch.device(config.device).type == "cpu":
        keep_freed_cpu_memory()  # a training process: reuse freed memory (utils.keep_freed_cpu_memory)
    recipes = ", ".join(recipe_label(recipe) for recipe in config.recipes)
    print(f"run folder: {config.save_dir}\n{config.model} on {config.device}, sites {' '.join(config.sites)} "
          f"({config.io}), data {config.dataset}; {config.steps or 'all the data'} steps of {config.batch_size}; "
          f"recipes: {recipes}", flush=True)
    result = train_from_config(config, argv)
    print(train_summary(result))
    return 0


def eval_command(config: EvalConfig, argv: list[str]) -> int:
    from .evaluation import format_table

    rows = evaluate_runs(config)
    print(json.dumps(rows, indent=2) if config.json else format_table(rows))
    return 0


def export_command(config: ExportConfig, argv: list[str]) -> int:
    written = export_dictionaries(config)
    for folder in written:
        print(folder)
    print(f"exported {len(written)} dictionar{'y' if len(written) == 1 else 'ies'} as {config.format} to {config.out}")
    return 0


def plot_command(config: PlotConfig, argv: list[str]) -> int:
    for path in plot_runs(config):
        print(path)
    return 0


def download_command(config: DownloadConfig, argv: list[str]) -> int:
    return download_published(config)


def cache_command(config: CacheConfig, argv: list[str]) -> int:
    started = time.perf_counter()
    _model_loading_bar(config.progress)
    manifest = write_cache(config)
    size = sum(entry["bytes"] for entry in manifest["shards"])
    print(f"{config.path}: {manifest['rows']:,} tokens of {', '.join(manifest['sites'])} ({manifest['io']}, "
          f"{manifest['dtype']}) in {len(manifest['shards'])} shards, {size / 2**20:.1f} MiB; "
          f"{_duration(time.perf_counter() - started)}")
    print(f"next: {PROG} train --dataset {config.path} --sites {' '.join(manifest['sites'])}")
    return 0


def dashboard_command(config: DashboardConfig, argv: list[str]) -> int:
    _model_loading_bar(config.progress)
    for index in write_dashboards(config):
        print(index)
    return 0


@dataclass
class PushConfig:
    """What `python -m dictionary_learning push` takes (hub.push_to_hub's arguments)."""

    path: str = field(metadata={"positional": True, "metavar": "RUN_DIR"})
    """a dictionary folder or a run folder (every dictionary below it, with logs and eval.json)."""
    repo_id: str = field(metadata={"positional": True, "metavar": "REPO_ID"})
    """the Hub model repository, OWNER/NAME (created if missing)."""
    path_in_repo: str = ""
    """the folder in the repository to upload into (default: its root)."""
    private: bool | None = None
    """create the repository private (default: the Hub's default)."""
    revision: str | None = None
    """the branch to commit to (default: main)."""
    commit_message: str | None = None
    """the commit message (default: names the folder and the number of files)."""
    include_checkpoints: bool = False
    """also upload each dictionary's checkpoints/ae_N.pt."""


def push_command(config: PushConfig, argv: list[str]) -> int:
    from .hub import push_to_hub

    url = push_to_hub(config.path, config.repo_id, path_in_repo=config.path_in_repo, private=config.private,
                      revision=config.revision, commit_message=config.commit_message,
                      include_checkpoints=config.include_checkpoints)
    print(f"pushed {config.path} to {url}")
    return 0


def _first_sentence(doc: str | None, limit: int = 100) -> str:
    paragraph = " ".join((doc or "").strip().split("\n\n")[0].split())
    return paragraph if len(paragraph) <= limit else paragraph[: limit - 1].rsplit(" ", 1)[0] + " …"


@dataclass
class RecipesConfig:
    """What `python -m dictionary_learning recipes` takes."""

    name: str | None = field(default=None, metadata={"positional": True, "metavar": "RECIPE"})
    """a recipe whose hyperparameters to list (default: list the recipes)."""


def recipes_command(config: RecipesConfig, argv: list[str]) -> int:
    from .registry import ARCHITECTURES, recipe_class
    from .run_config import recipe_by_name

    if config.name is None:
        for entry in ARCHITECTURES:
            for name in entry.recipes:
                summary = _first_sentence(sys.modules[recipe_class(name).__module__].__doc__)
                print(f"{name:<27} {entry.name:<23} {summary}")
        print(f"\n{PROG} recipes NAME lists a recipe's hyperparameters; write them --recipe NAME:key=value,...")
        return 0
    name = recipe_by_name(config.name)
    config_class = recipe_class(name).Config
    docs = field_docs(config_class)
    defaults = {f.name: f.default for f in dataclasses.fields(config_class)}
    print(f"{name} ({config_class.__name__}); --recipe {name}:key=value,...\n")
    for key in recipe_hyperparameters(name):
        default = defaults.get(key)
        shown = f"default {default}" if key != "dict_size" else "default: expansion_factor × the site's width"
        print(f"  {key} ({shown}): {docs.get(key, '')}")
    return 0


# --------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Command:
    """One subcommand: its flags are the fields of `config`; `run(config, argv)` returns the exit status."""

    name: str
    config: type
    run: Callable[[Any, list[str]], int]
    summary: str
    config_file: bool = False
    """whether it takes --config FILE (JSON, or YAML with PyYAML) under its flags."""
    implied_config_file: Callable[[dict[str, Any]], Path | None] | None = None
    """the config file the given flags imply when no --config is given (train --resume: the run's)."""


def _resumed_run_config(flags: dict[str, Any]) -> Path | None:
    if flags.get("resume") and flags.get("save_dir"):
        path = Path(flags["save_dir"]) / RUN_CONFIG_FILE
        return path if path.is_file() else None
    return None


COMMANDS: dict[str, Command] = {command.name: command for command in (
    Command("train", TrainRunConfig, train_command,
            "train dictionaries: a model, a text stream, sites and recipes (no arguments: the bundled offline model, "
            "like the demo)", config_file=True, implied_config_file=_resumed_run_config),
    Command("cache", CacheConfig, cache_command,
            "write an activation cache: run the model once, store the sites' activations (train --dataset CACHE_DIR "
            "reads them)"),
    Command("eval", EvalConfig, eval_command,
            "score the dictionaries of run folders: site, recipe, L0, FVU, dead %, CE/KL recovered"),
    Command("export", ExportConfig, export_command, "write dictionaries in SAELens' format or as safetensors"),
    Command("plot", PlotConfig, plot_command,
            "PNGs of runs: loss, L0, FVU and dead % curves per trainer; the L0-FVU (and CE recovered) frontier"),
    Command("dashboard", DashboardConfig, dashboard_command,
            "feature dashboards (static HTML) of the dictionaries of a run folder: top contexts, densities, logit "
            "effects"),
    Command("push", PushConfig, push_command, "upload a dictionary or run folder to a Hugging Face Hub repository"),
    Command("download", DownloadConfig, download_command,
            "download the published Pythia-70m-deduped dictionaries (pretrained_dictionary_downloader.sh)"),
    Command("recipes", RecipesConfig, recipes_command, "list the training recipes and their hyperparameters"),
)}


# --------------------------------------------------------------------------------------------
# Parsing and errors
# --------------------------------------------------------------------------------------------


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors that suggest the closest valid name."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {_with_suggestion(message, self)} (see {self.prog} --help)\n")


def _option_strings(parser: argparse.ArgumentParser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _with_suggestion(message: str, parser: argparse.ArgumentParser) -> str:
    choice = re.search(r"invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice:
        choices = re.findall(r"'([^']*)'", choice.group(2))
        return message + closest(choice.group(1), choices).replace(";", ",", 1)
    unknown = re.match(r"unrecognized arguments?: (.*)", message)
    if unknown:
        flags = [token.split("=")[0] for token in unknown.group(1).split() if token.startswith("-")]
        hints = [f"{flag}{closest(flag, _option_strings(parser))}" for flag in flags]
        if hints:
            return f"unknown option {'; '.join(hints)}"
    return message


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser of every command (from COMMANDS) and each command's subparser."""
    parser = _Parser(prog=PROG, allow_abbrev=False,
                     description="Train, evaluate, export and plot sparse autoencoders (dictionaries) on language-"
                                 "model activations. Each command's --help lists its options and their defaults.")
    version = sys.modules[__package__].__version__
    parser.add_argument("--version", action="version", version=f"dictionary_learning {version}")
    parser.add_argument("--traceback", action="store_true", help="show the full traceback of an error")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers = {}
    for command in COMMANDS.values():
        positional = [f.metadata.get("metavar", f.name.upper()) + ("..." if f.metadata.get("nargs") == "+" else "")
                      for f in dataclasses.fields(command.config) if f.metadata.get("positional")]
        sub = commands.add_parser(command.name, help=command.summary.replace("%", "%%"),
                                  description=command.summary, allow_abbrev=False,
                                  usage=" ".join([f"{PROG} {command.name} [OPTIONS]", *positional]))
        if command.config_file:
            sub.add_argument("--config", metavar="FILE", help="a config file (JSON, or YAML with PyYAML) of the "
                             "options below, by their field names (e.g. a run folder's run_config.json); flags given "
                             "override it")
            sub.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and "
                             "exit (a starting point for a config file)")
        add_arguments(sub, command.config)
        sub.add_argument("--traceback", action="store_true", default=argparse.SUPPRESS,
                         help="show the full traceback of an error")
        subparsers[command.name] = sub
    return parser, subparsers


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, KeyError) and len(error.args) == 1:
        text = str(error.args[0])
    if isinstance(error, (ValueError, OSError, ConnectionError, ImportError, FloatingPointError, KeyError, TypeError)):
        return text  # the library's errors for bad input say what is wrong and the fix
    return f"{type(error).__name__}: {text} (run with --traceback for details)"


@contextlib.contextmanager
def _one_line_warnings() -> Iterator[None]:
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {' '.join(str(message).split())}", file=sys.stderr, flush=True)

    with warnings.catch_warnings():
        warnings.simplefilter("default")
        warnings.showwarning = show
        yield


def _config(command: Command, args: argparse.Namespace) -> Any:
    flags = flag_values(command.config, args)
    file_values, where = {}, "config"
    config_file = getattr(args, "config", None)
    if config_file is None and command.implied_config_file is not None:
        config_file = command.implied_config_file(flags)
    if config_file is not None:
        file_values = read_run_config(config_file) if command.config is TrainRunConfig else _file(config_file)
        where = str(config_file)
    return build(command.config, file_values, flags, where=[where, "flags"])


def _file(path: str) -> dict[str, Any]:
    from .dataclass_args import read_config_file

    return read_config_file(path)


def main(argv: list[str] | None = None) -> int:
    """Run the command line `argv` (default sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = build_parser()
    if not argv:
        parser.print_help()
        return 0
    args, extras = parser.parse_known_args(argv)
    if args.command is None:
        parser.error("name a command: " + ", ".join(COMMANDS))
    if extras:
        subparsers[args.command].error(f"unrecognized arguments: {' '.join(extras)}")
    command = COMMANDS[args.command]
    prog = subparsers[args.command].prog
    started = time.perf_counter()
    try:
        with _one_line_warnings():
            config = _config(command, args)
            if getattr(args, "print_config", False):
                if command.config is TrainRunConfig:
                    config = resolve_run_config(config)
                print(json.dumps(dataclasses.asdict(config), indent=2))
                return 0
            return command.run(config, argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted after {_duration(time.perf_counter() - started)}", file=sys.stderr)
        return 130
    except Exception as error:
        if getattr(args, "traceback", False):
            raise
        status = 2 if isinstance(error, ConfigError) else 1
        print(f"{prog}: error: {_one_line(error)}", file=sys.stderr)
        return status
