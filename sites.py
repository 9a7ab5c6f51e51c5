"""Sites: the places of a language model whose activations a buffer reads, and one forward pass
that reads all of them.

A site is a submodule and what to read there: its output ("out": the first element of a tuple
output), its first input ("in"), or both ("in_to_out": the (input, output) pairs a transcoder
learns). Sites are named by an envoy or torch module of the model, by a dotted path
("gpt_neox.layers.3.mlp") or by a glob pattern whose `*` stands for one path component
("gpt_neox.layers.*.mlp").

Two backends run the forward pass, and both stop it right after the last site read:
- nnsight (`TransformersModel` / `LanguageModel`): one trace that reads each site in execution
  order and calls `tracer.stop()`;
- plain PyTorch (any `transformers` model, or other `nn.Module` called with input_ids and
  attention_mask): forward hooks copy the tensors out, and the last one raises to end the pass.

Execution order is measured once, by torch hooks during a one-token probe pass (stopped once every
site has run), so sites may be listed in any order.
"""
from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

__all__ = ["Site", "SiteReader", "site_reader", "site_matches", "layer_of", "IO_MODES"]

IO_MODES = ("out", "in", "in_to_out")


@dataclass(frozen=True)
class Site:
    """One place to read: `name` (the key of its batches), the module's dotted `path`, and `io`."""

    name: str
    path: str
    io: str

    @property
    def reads(self) -> tuple[str, ...]:
        """What is read there, in execution order: ("in",), ("out",) or ("in", "out")."""
        return ("in", "out") if self.io == "in_to_out" else (self.io,)


def layer_of(path: str) -> int | None:
    """The layer index in a module path ("gpt_neox.layers.3.mlp" -> 3; the last index after a
    `layers`/`h`/`blocks`-like container), or None when the path has no numeric component."""
    numbers = [int(part) for part in path.split(".") if part.isdigit()]
    return numbers[-1] if numbers else None


class _StopForward(Exception):
    """Raised by the last hook: every site has been read, the rest of the model need not run."""


class SiteReader:
    """Reads a fixed list of sites of one model in one forward pass.

    `reader(encoding)` -> one tensor [B, T, d] per (site, read), in the order of `site.reads` for
    each site of `sites`. `widths[i]` is the width of read i, `dtype` and `device` those of the
    activations (from the probe pass).
    """

    def __init__(self, model: Any, tokenizer: Any, sites: Sequence[Site], backend: str):
        self.model = model  # the nnsight envoy, or the torch module
        self.tokenizer = tokenizer
        self.backend = backend
        self.sites = list(sites)
        self.reads = [(site, io) for site in self.sites for io in site.reads]
        self.execution_order, probe = self._probe()
        self.widths = [int(probe[key].shape[-1]) for key in self._read_keys()]
        first = probe[self._read_keys()[0]]
        self.dtype, self.device = first.dtype, first.device

    @property
    def torch_module(self) -> torch.nn.Module:
        return self.model._module if self.backend == "nnsight" else self.model

    def _read_keys(self) -> list[tuple[str, str]]:
        return [(site.path, io) for site, io in self.reads]

    # -------------------------------------------------------------------- the probe pass
    def _probe(self) -> tuple[list[tuple[str, str]], dict[tuple[str, str], torch.Tensor]]:
        """One token through the model with hooks on every site: the order in which the reads
        happen and each read's activation. Errors name sites that never run or are not per token."""
        tok = self.tokenizer
        probe_id = next(i for i in (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, 0) if i is not None)
        ids = torch.tensor([[probe_id]])
        encoding = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if self.backend == "nnsight" and not getattr(self.model, "dispatched", True):
            self.model.dispatch()  # a lazily loaded model gets its weights
        order: list[tuple[str, str]] = []
        seen: dict[tuple[str, str], torch.Tensor] = {}
        wanted = set(self._read_keys())

        def record(key, value):
            if key not in seen:
                order.append(key)
                seen[key] = value
            if wanted <= seen.keys():
                raise _StopForward

        self._run_hooked(encoding, record, stop_after=None)
        missing = [f"{path} ({io}put)" for path, io in self._read_keys() if (path, io) not in seen]
        if missing:
            raise ValueError(
                f"the model never reached {', '.join(missing)} during a forward pass: pick modules the forward "
                "pass calls (print(model) lists them)."
            )
        for (path, io), value in seen.items():
            if not isinstance(value, torch.Tensor) or value.dim() != 3 or tuple(value.shape[:2]) != (1, 1):
                shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                raise ValueError(
                    f"{path}.{io}put is {shape} for one token, but a buffer needs per-token activations of shape "
                    "[batch, seq, d]. Pick a submodule whose output (or input, io='in') has one vector per token."
                )
        return order, seen

    def _run_hooked(self, encoding: Mapping[str, torch.Tensor], record, stop_after: tuple[str, str] | None) -> None:
        """One forward pass of the torch module with `_hooks(record, stop_after)` in place; a hook
        that raises _StopForward ends it early. The hooks are removed in every case."""
        module = self.torch_module
        device = _module_device(module)
        handles = self._hooks(record, stop_after)
        try:
            with torch.inference_mode():
                module(**{k: v.to(device) for k, v in encoding.items()})
        except _StopForward:
            pass
        finally:
            for handle in handles:
                handle.remove()

    def _hooks(self, record: Callable[[tuple[str, str], Any], None], stop_after: tuple[str, str] | None) -> list:
        """Torch hooks on every site's module that pass (path, io) and the activation to `record`;
        the one for `stop_after` then raises _StopForward."""
        handles = []
        wanted = {key for key in self._read_keys()}
        for path in dict.fromkeys(path for path, _ in wanted):
            module = self.torch_module.get_submodule(path)
            if (path, "in") in wanted:
                def pre_hook(_module, args, kwargs, key=(path, "in")):
                    record(key, _first_tensor(args, kwargs))
                    if key == stop_after:
                        raise _StopForward
                handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))
            if (path, "out") in wanted:
                def hook(_module, _args, output, key=(path, "out")):
                    record(key, output[0] if isinstance(output, (tuple, list)) else output)
                    if key == stop_after:
                        raise _StopForward
                handles.append(module.register_forward_hook(hook))
        return handles

    # -------------------------------------------------------------------- reading
    def __call__(self, encoding: Mapping[str, torch.Tensor]) -> list[torch.Tensor]:
        """Every read's activations [B, T, d_i] for one tokenized batch, in `self.reads` order."""
        keys = self._read_keys()
        in_order = sorted(set(keys), key=self.execution_order.index)
        if self.backend == "nnsight":
            got = dict(zip(in_order, self._read_nnsight(encoding, in_order)))
        else:
            got = {}
            self._run_hooked(encoding, lambda key, value: got.setdefault(key, value), stop_after=in_order[-1])
        batch, length = encoding["input_ids"].shape
        acts = [got[key] for key in keys]
        for (path, io), act in zip(keys, acts):
            if tuple(act.shape[:2]) != (batch, length):
                raise ValueError(f"{path}.{io}put is {tuple(act.shape)}, not per token of the [{batch}, {length}] batch")
        return acts

    def _read_nnsight(self, encoding, in_order: list[tuple[str, str]]) -> list[torch.Tensor]:
        from nnsight.intervention.interleaver import OutOfOrderError

        envoys = {path: self.model.get(path) if path else self.model for path, _ in in_order}
        outputs: list[Any] = []
        try:
            with torch.inference_mode(), self.model.trace(dict(encoding)) as tracer:
                for path, io in in_order:
                    outputs.append(envoys[path].input if io == "in" else envoys[path].output)
                tracer.stop()
        except OutOfOrderError as error:
            raise ValueError(
                f"nnsight could not read {', '.join(f'{p} ({io}put)' for p, io in in_order)} in that order "
                "in one forward pass; a site whose module runs more than once per pass cannot be read."
            ) from error
        return [out[0] if isinstance(out, (tuple, list)) else out for out in outputs]


def _first_tensor(args: tuple, kwargs: dict) -> Any:
    """A module's first input, as nnsight's `.input` gives it: the first positional argument, else
    the first keyword argument."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


def _module_device(module: torch.nn.Module) -> torch.device:
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def site_reader(model: Any, submodules: Any, io: str, tokenizer: Any = None) -> SiteReader:
    """A SiteReader for `submodules` of `model` (see the module docstring for both).

    `submodules`: one module (envoy, torch module or dotted path), a glob pattern, a list of these,
    or a dict {name: module or path} (the names become the batch keys; otherwise a site's key is
    its dotted path). `tokenizer`: needed for a plain torch model (an nnsight model has its own).
    """
    if io not in IO_MODES:
        raise ValueError(f"io must be one of {IO_MODES} (submodule output, input, or (input, output) pairs); "
                         f"got {io!r}.")
    backend, model, tokenizer = _backend(model, tokenizer)
    module = model._module if backend == "nnsight" else model
    names = [name for name, _ in module.named_modules()]
    if isinstance(submodules, Mapping):
        entries = [(str(key), _path_of(model, backend, value, names)) for key, value in submodules.items()]
    else:
        items = submodules if isinstance(submodules, (list, tuple)) else [submodules]
        if not items:
            raise ValueError("submodules is empty; name at least one module (e.g. 'gpt_neox.layers.*.mlp').")
        entries = []
        for item in items:
            for path in _expand(model, backend, item, names):
                entries.append((path or "model", path))
    seen: dict[str, str] = {}
    for name, path in entries:
        if name in seen:
            raise ValueError(f"site {name!r} is listed twice" + (f" ({seen[name]} and {path})" if seen[name] != path else ""))
        seen[name] = path
    return SiteReader(model, tokenizer, [Site(name, path, io) for name, path in entries], backend)


def _backend(model: Any, tokenizer: Any) -> tuple[str, Any, Any]:
    from nnsight import Envoy

    if isinstance(model, Envoy):
        tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise TypeError("the nnsight model has no tokenizer; build it with one, or pass tokenizer=.")
        return "nnsight", model, tokenizer
    if isinstance(model, torch.nn.Module):
        if tokenizer is None:
            raise TypeError(
                f"a plain torch model ({type(model).__name__}) needs tokenizer=: pass the model's tokenizer "
                "(transformers.AutoTokenizer.from_pretrained(name)), or wrap the model in nnsight."
            )
        return "torch", model, tokenizer
    raise TypeError(
        f"model must be an nnsight TransformersModel (or LanguageModel) with a tokenizer, or a torch.nn.Module "
        f"such as a transformers model (with tokenizer=); got {type(model).__name__}."
    )


def _path_of(model: Any, backend: str, submodule: Any, names: list[str]) -> str:
    """The dotted path of one submodule given as an envoy, a torch module or a path."""
    from nnsight import Envoy

    if isinstance(submodule, str):
        path = submodule.removeprefix("model.") if submodule != "model" else ""
        if path not in names:
            raise ValueError(f"the model has no submodule {submodule!r}; {_close_names(path, names)}")
        return path
    if isinstance(submodule, Envoy):
        if backend != "nnsight" or submodule.root is not model:
            raise ValueError(
                f"submodule {str(submodule.path)} belongs to a different model object than `model`; take it from "
                "the same one, e.g. model.gpt_neox.layers[1].mlp."
            )
        path = str(submodule.path).removeprefix("model").removeprefix(".")
        if path not in names:
            raise ValueError(f"the model never reached {path}: it is an nnsight module, not one the forward pass of "
                             f"the underlying torch model runs; {_close_names(path, names)}")
        return path
    if isinstance(submodule, torch.nn.Module):
        module = model._module if backend == "nnsight" else model
        for name, candidate in module.named_modules():
            if candidate is submodule:
                return name
        raise ValueError(f"submodule {type(submodule).__name__} is not part of the model; take it from the same "
                         "model object, e.g. model.gpt_neox.layers[1].mlp.")
    raise TypeError(f"a submodule must be a module of the model (e.g. model.gpt_neox.layers[1].mlp), its dotted path "
                    f"or a glob pattern; got {type(submodule).__name__}.")


def _expand(model: Any, backend: str, item: Any, names: list[str]) -> list[str]:
    """The paths an item names: a glob pattern's matches (in module order), else its one path."""
    if isinstance(item, str) and any(ch in item for ch in "*?["):
        matches = [name for name in names if name and site_matches(name, item)]
        if not matches:
            raise ValueError(f"the pattern {item!r} matches no submodule of the model; {_close_names(item, names)}")
        return matches
    return [_path_of(model, backend, item, names)]


def site_matches(path: str, pattern: str) -> bool:
    """Whether the dotted module path matches the glob `pattern` ('*' is one path component; a
    leading 'model.' is ignored)."""
    parts, wanted = path.split("."), pattern.removeprefix("model.").split(".")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(p, q) for p, q in zip(parts, wanted))


def _close_names(path: str, names: Iterable[str]) -> str:
    """A hint listing the model's module names, those sharing the most leading components first."""
    wanted = re.split(r"[.*]", path)
    names = [n for n in names if n]
    ranked = sorted(names, key=lambda n: -sum(a == b for a, b in zip(n.split("."), wanted)))
    shown = ranked[:12]
    return f"its modules include {', '.join(shown)}" + (f" (and {len(names) - len(shown)} more)" if len(names) > len(shown) else "")
