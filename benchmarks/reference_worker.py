"""Runs INSIDE the reference virtualenv (saprmarks/dictionary_learning 0.1.0, nnsight 0.3.7,
transformers 4.x): one measurement task for the benchmark scripts of this folder.

    python reference_worker.py task.pt result.json

task.pt holds {"task": name, "config": {...}, "threads": n, "tensors": {...}} written by
`_common.run_reference`; the JSON result is read back by the calling script. The timing and
metric code is `_common.py`'s, the same the calling script uses for our library.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import torch

import _common

REFERENCE_TRAINERS = "dictionary_learning.trainers"


def reference_trainer(name: str, kwargs: dict):
    """The reference's trainer for our recipe `name`, given the keys its __init__ accepts."""
    module_name, class_name = _common.TRAINER_SPECS[name][0].split(":")
    cls = getattr(importlib.import_module(f"{REFERENCE_TRAINERS}.{module_name}"), class_name)
    accepted = set(inspect.signature(cls.__init__).parameters)
    kwargs = {**kwargs, "layer": 0, "lm_name": "benchmark"}
    dropped = sorted(set(kwargs) - accepted)
    return cls(**{k: v for k, v in kwargs.items() if k in accepted}), dropped


def train_step(config: dict, tensors: dict) -> dict:
    results = []
    for size in config["sizes"]:
        D, F, B = size["activation_dim"], size["dict_size"], size["batch_size"]
        batches = tensors[f"batches_{D}_{B}"]
        floor = _common.dense_floor(D, F, B, seed=config["seed"])
        for run in config["runs"]:
            if (run["activation_dim"], run["dict_size"]) != (D, F):
                continue
            row = {"trainer": run["label"], "size": size["name"]}
            try:
                trainer, dropped = reference_trainer(run["trainer"], run["kwargs"])
                row.update(_common.settle(trainer, run, batches[0]))
                step = iter(range(10**9))

                def one_step():
                    i = next(step)
                    trainer.update(i, batches[i % len(batches)])

                row.update(_common.time_interleaved(one_step, floor, config["warmup"], config["rounds"],
                                                    config["per_round"]))
                row["dropped_kwargs"] = dropped
            except Exception as e:  # a recipe the reference lacks or cannot run at this size
                row["error"] = _common.describe_error(e)
            results.append(row)
            print(f"  reference {row['trainer']} {row['size']}: "
                  f"{row.get('step', {}).get('median_ms', row.get('error'))}", file=sys.stderr, flush=True)
    return {"rows": results}


def _synthetic_module():
    """This repository's synthetic.py (torch-only), loaded by path: the reference trains on the
    very same stream, regenerated from the same seed with the same torch."""
    path = _common.REPO_ROOT / "synthetic.py"
    spec = importlib.util.spec_from_file_location("_bench_synthetic", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


def quality(config: dict, tensors: dict) -> dict:
    """Train each run on the same synthetic stream; the caller scores the weights sent back."""
    synthetic = _synthetic_module()
    data_cfg = config["synthetic"]
    results, weights = [], {}
    for run in config["runs"]:
        row = {"trainer": run["trainer"], "label": run["label"]}
        try:
            stream = synthetic.SyntheticActivations(**data_cfg)
            first = stream.sample()
            if not torch.equal(first[:4], tensors["first_rows"]):
                raise RuntimeError("the regenerated synthetic stream differs from the caller's")
            trainer, dropped = reference_trainer(run["trainer"], run["kwargs"])
            row["train_s"] = _common.timed_training(trainer.update, first, stream.sample, config["steps"])
            row["dict_class"] = type(trainer.ae).__name__
            weights[run["label"]] = {key: value.detach().cpu() for key, value in trainer.ae.state_dict().items()}
            row["lr"] = float(getattr(trainer, "lr", float("nan")))
            row["dropped_kwargs"] = dropped
        except Exception as e:  # a recipe the reference lacks or cannot run
            row["error"] = _common.describe_error(e)
        results.append(row)
        print(f"  reference {row['label']}: {row.get('train_s', row.get('error'))}", file=sys.stderr, flush=True)
    return {"rows": results, "tensors": weights}


def buffer(config: dict, tensors: dict) -> dict:
    import buffer as buffer_benchmark  # benchmarks/buffer.py: its reference side imports no library of ours

    return buffer_benchmark.reference_side(config, tensors)


TASKS = {"train_step": train_step, "quality": quality, "buffer": buffer}


def main() -> None:
    task_file, result_file = sys.argv[1], sys.argv[2]
    task = torch.load(task_file, weights_only=False)
    _common.set_threads(task["threads"])
    _common.set_clock(task.get("clock", "wall"))
    result = TASKS[task["task"]](task["config"], task["tensors"])
    import dictionary_learning
    import nnsight
    import transformers

    tensors = result.pop("tensors", None)
    if tensors is not None:  # read back by _common.run_reference with weights_only=True
        torch.save(tensors, Path(result_file).with_suffix(".pt"))
    result["versions"] = {
        "dictionary_learning": getattr(dictionary_learning, "__version__", "?"),
        "dictionary_learning_path": str(Path(dictionary_learning.__file__).parent),
        "nnsight": nnsight.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    Path(result_file).write_text(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
