"""ActivationBuffer: a shuffled stream of a language model's activations at one submodule.

Text goes in (any iterator of strings), batches of per-token activations come out:

    buffer = ActivationBuffer(data, model, model.gpt_neox.layers[1].mlp, n_ctxs=3e4)
    for acts in buffer:  # [out_batch_size, d_submodule]
        ...

The buffer holds `capacity = n_ctxs * ctx_len` activations in one pre-allocated tensor. At each
(re)fill it draws one random order over the rows it holds and serves batches by walking that
order, so a batch is a uniform sample of the unread rows and no row is served twice. When half
the rows have been read, their slots are overwritten with fresh activations and a new order is
drawn over old-unread and new rows together, so consecutive texts end up spread over many batches.

Collection is one nnsight trace per `refresh_batch_size` texts: tokenize the batch (one call),
read the submodule's input/output and `tracer.stop()` so no later layer runs, then keep real
tokens only (attention mask; with `remove_bos`, also drop each row's leading BOS).
"""
from __future__ import annotations

import itertools
from typing import Any, Iterable, Iterator, Sequence

import torch

__all__ = ["ActivationBuffer", "token_mask", "check_language_model", "resolve_submodule", "submodule_path"]


class ActivationBuffer:
    """Shuffled batches of a submodule's per-token activations, computed on the fly from text.

    Args:
        data: iterator (or iterable) of strings. Iteration ends once it runs out and every
            buffered activation has been served (the last batch may be smaller).
        model: an nnsight `TransformersModel` / `LanguageModel` with a tokenizer.
        submodule: the module to read: an envoy of `model` (`model.gpt_neox.layers[1].mlp`),
            the matching `torch.nn.Module`, or its dotted path (`"gpt_neox.layers.1.mlp"`).
        d_submodule: activation width; probed with a one-token forward pass when None, and
            checked against the model when given.
        io: "out" reads the submodule's output (the first element of a tuple output, e.g. a
            residual-stream layer in older transformers); "in" reads its first input.
        n_ctxs: number of contexts the buffer holds (int or float such as 3e4).
        ctx_len: tokens per context; longer texts are truncated.
        refresh_batch_size: texts per forward pass when filling.
        out_batch_size: rows per yielded batch; at most half the buffer.
        device: where the buffer lives; default the model's device.
        dtype: storage dtype; default the model's (bf16/fp16 halve memory vs fp32).
        remove_bos: drop each context's first real token when it is the tokenizer's BOS token.
        seed: seed of the buffer's shuffling generator; default drawn from torch's global RNG,
            so `torch.manual_seed` makes runs reproducible.
    """

    def __init__(
        self,
        data: Iterable[str],
        model: Any,
        submodule: Any,
        d_submodule: int | None = None,
        io: str = "out",
        n_ctxs: int | float = 3e4,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        remove_bos: bool = False,
        seed: int | None = None,
    ):
        _check_arguments(data, io, n_ctxs, ctx_len, refresh_batch_size, out_batch_size, dtype)
        self.model = check_language_model(model)
        self.tokenizer = model.tokenizer
        self._check_tokenizer_and_context(remove_bos, ctx_len)
        self.submodule = resolve_submodule(model, submodule)
        self.data: Iterator[str] = iter(data)
        self.io = io
        self.n_ctxs = int(n_ctxs)
        self.ctx_len = ctx_len
        self.capacity = self.n_ctxs * ctx_len
        self.refresh_batch_size = refresh_batch_size
        self.out_batch_size = out_batch_size
        self.remove_bos = remove_bos
        if out_batch_size > self.capacity // 2:
            raise ValueError(
                f"out_batch_size={out_batch_size} is more than half the buffer "
                f"(n_ctxs * ctx_len = {self.n_ctxs} * {ctx_len} = {self.capacity} rows); "
                "raise n_ctxs or lower out_batch_size."
            )
        probe = self._probe()
        if d_submodule is not None and d_submodule != probe.shape[-1]:
            raise ValueError(
                f"d_submodule={d_submodule} does not match the model: {self._where} has width "
                f"{probe.shape[-1]}. Pass d_submodule={probe.shape[-1]} or leave it None."
            )
        self.d_submodule = int(probe.shape[-1])
        self.device = torch.device(device) if device is not None else probe.device
        self.dtype = dtype if dtype is not None else _parameter_dtype(model, probe.dtype)
        self._storage = self._allocate_storage()
        # Row bookkeeping (indices into _storage): _order lists the filled rows in serving order,
        # _next counts how many of them were served, _free lists slots that hold nothing.
        self._order = torch.empty(0, dtype=torch.long, device=self.device)
        self._next = 0
        self._free = torch.arange(self.capacity, device=self.device)
        self._overflow: torch.Tensor | None = None  # rows computed beyond the free slots
        self._data_exhausted = False
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = seed
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def _check_tokenizer_and_context(self, remove_bos: bool, ctx_len: int) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the model's tokenizer has no pad token (and no EOS to pad with); "
                             "set model.tokenizer.pad_token before building the buffer.")
        if remove_bos and self.tokenizer.bos_token_id is None:
            raise ValueError("remove_bos=True but the tokenizer has no bos_token; pass remove_bos=False.")
        max_positions = getattr(getattr(self.model._module, "config", None), "max_position_embeddings", None)
        if isinstance(max_positions, int) and ctx_len > max_positions:
            raise ValueError(f"ctx_len={ctx_len} is longer than the model's {max_positions} positions; "
                             f"pass ctx_len <= {max_positions}.")

    def _probe(self) -> torch.Tensor:
        """One token through the model: dispatches a lazily loaded model, checks that the submodule
        runs and yields per-token activations, and gives their width, device and dtype."""
        probe_id = next(i for i in (self.tokenizer.bos_token_id, self.tokenizer.eos_token_id,
                                    self.tokenizer.pad_token_id, 0) if i is not None)
        ids = torch.tensor([[probe_id]])
        (probe,) = self._collect({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, [self.submodule])
        return probe

    def _allocate_storage(self) -> torch.Tensor:
        try:
            return torch.empty(self.capacity, self.d_submodule, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            gib = self.capacity * self.d_submodule * self.dtype.itemsize / 2**30
            raise MemoryError(
                f"the buffer needs {gib:.2f} GiB on {self.device} ({self.capacity} rows x {self.d_submodule} "
                f"x {self.dtype}) and could not get it; lower n_ctxs, store in dtype=torch.bfloat16, or "
                "put it on another device."
            ) from error

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> "ActivationBuffer":
        return self

    def __next__(self) -> torch.Tensor:
        """A batch of `out_batch_size` unread activations, [out_batch_size, d_submodule]."""
        if self.n_unread < self.capacity // 2 and not (self._data_exhausted and self._overflow is None):
            self.refresh()
        if self.n_unread == 0:
            raise StopIteration
        rows = self._order[self._next : self._next + self.out_batch_size]
        self._next += len(rows)
        return self._storage.index_select(0, rows)

    @property
    def n_unread(self) -> int:
        """Activations in the buffer that have not been served yet."""
        return len(self._order) - self._next

    def refresh(self) -> None:
        """Overwrite every read (or empty) slot with new activations, then reshuffle all rows."""
        free = torch.cat([self._free, self._order[: self._next]])
        filled = 0
        while filled < len(free):
            rows = self._next_rows()
            if rows is None:
                break
            n = min(len(rows), len(free) - filled)
            self._storage.index_copy_(0, free[filled : filled + n], rows[:n])
            self._overflow = rows[n:] if n < len(rows) else None
            filled += n
        held = torch.cat([self._order[self._next :], free[:filled]])
        self._free = free[filled:]
        self._order = held[torch.randperm(len(held), generator=self._generator, device=self.device)]
        self._next = 0

    def _next_rows(self) -> torch.Tensor | None:
        """Leftover rows of the last forward pass, else the next batch's; None when data ran out."""
        if self._overflow is not None:
            rows, self._overflow = self._overflow, None
            return rows
        while not self._data_exhausted:
            rows = self._activations(self.tokenized_batch())
            if len(rows):
                return rows
        return None

    # ------------------------------------------------------------------ text and tokens

    def text_batch(self, batch_size: int | None = None) -> list[str]:
        """The next `batch_size` (default `refresh_batch_size`) texts; fewer at the end, [] after."""
        batch_size = self.refresh_batch_size if batch_size is None else batch_size
        texts = list(itertools.islice(self.data, batch_size))
        if len(texts) < batch_size:
            self._data_exhausted = True
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(
                    f"data must yield strings, but it yielded a {type(text).__name__}: "
                    f"{repr(text)[:80]}. For a dataset of records, pass e.g. (row['text'] for row in ds)."
                )
        return texts

    def tokenized_batch(self, batch_size: int | None = None) -> dict[str, torch.Tensor]:
        """The next texts tokenized: `input_ids` and `attention_mask`, [B, <= ctx_len] each, padded."""
        return self.tokenize(self.text_batch(batch_size))

    def tokenize(self, texts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenize `texts` in one call, truncated to `ctx_len` and padded (on the tokenizer's side)."""
        if not texts:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty}
        encoding = self.tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True,
                                  max_length=self.ctx_len)
        return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}

    # ------------------------------------------------------------------ collection

    def _activations(self, encoding: dict[str, torch.Tensor]) -> torch.Tensor:
        """Activations of the real tokens of one tokenized batch, [n_tokens, d_submodule]."""
        keep = token_mask(encoding["input_ids"], encoding["attention_mask"],
                          self.tokenizer.bos_token_id if self.remove_bos else None)  # [B, T]
        if not keep.any():
            return torch.empty(0, self.d_submodule, dtype=self.dtype, device=self.device)
        (acts,) = self._collect(encoding, [self.submodule])  # [B, T, D]
        rows = acts[keep.to(acts.device, non_blocking=True)]  # [n_tokens, D]
        return rows.to(device=self.device, dtype=self.dtype)

    def _collect(self, encoding: dict[str, torch.Tensor], submodules: Sequence[Any]) -> list[torch.Tensor]:
        """One forward pass, stopped right after the last of `submodules` (listed in execution
        order); each one's input or output (per `self.io`), [B, T, D]."""
        from nnsight.intervention.interleaver import OutOfOrderError

        batch, length = encoding["input_ids"].shape
        outputs: list[Any] = []
        try:
            with torch.inference_mode():
                with self.model.trace(encoding) as tracer:
                    for submodule in submodules:
                        outputs.append(submodule.input if self.io == "in" else submodule.output)
                    tracer.stop()
        except OutOfOrderError as error:
            raise ValueError(
                f"the model never reached {', '.join(submodule_path(s) for s in submodules)} ({self.io}put) in that "
                "order: list submodules in the order the forward pass runs them, and only modules the "
                "forward pass calls."
            ) from error
        if len(outputs) != len(submodules):
            raise RuntimeError(f"nnsight returned {len(outputs)} activations for {len(submodules)} submodules.")
        acts = [out[0] if isinstance(out, (tuple, list)) else out for out in outputs]
        for submodule, act in zip(submodules, acts):
            if not isinstance(act, torch.Tensor) or act.dim() != 3 or tuple(act.shape[:2]) != (batch, length):
                shape = tuple(act.shape) if isinstance(act, torch.Tensor) else type(act).__name__
                raise ValueError(
                    f"{submodule_path(submodule)}.{self.io}put is {shape}, but the buffer needs per-token "
                    f"activations of shape [batch, seq, d] = [{batch}, {length}, d]. Pick a submodule "
                    "whose output (or input, io='in') has one vector per token."
                )
        return acts

    @property
    def _where(self) -> str:
        return f"{submodule_path(self.submodule)} ({self.io}put)"

    # ------------------------------------------------------------------ saving

    @property
    def config(self) -> dict[str, Any]:
        """What built this buffer, JSON-serialisable (save it next to the trained dictionary)."""
        module = getattr(self.model, "_module", None)
        return {
            "model": getattr(getattr(module, "config", None), "_name_or_path", None)
            or getattr(self.model, "repo_id", None) or None,
            "submodule": submodule_path(self.submodule),
            "io": self.io,
            "d_submodule": self.d_submodule,
            "n_ctxs": self.n_ctxs,
            "ctx_len": self.ctx_len,
            "refresh_batch_size": self.refresh_batch_size,
            "out_batch_size": self.out_batch_size,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "remove_bos": self.remove_bos,
            "seed": self.seed,
        }


def _check_arguments(data, io, n_ctxs, ctx_len, refresh_batch_size, out_batch_size, dtype) -> None:
    if io not in ("in", "out"):
        raise ValueError(f"io must be 'in' or 'out' (submodule input or output); got {io!r}.")
    for name, value in [("ctx_len", ctx_len), ("refresh_batch_size", refresh_batch_size),
                        ("out_batch_size", out_batch_size)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if isinstance(n_ctxs, bool) or not isinstance(n_ctxs, (int, float)) or not n_ctxs >= 1:
        raise ValueError(f"n_ctxs must be a number >= 1 (e.g. 3e4); got {n_ctxs!r}.")
    if isinstance(data, (str, bytes)):
        raise TypeError("data must be an iterator of strings, not a single string; wrap it: iter([text]).")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise ValueError(f"dtype must be a floating torch.dtype (e.g. torch.bfloat16); got {dtype!r}.")


def token_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor, bos_token_id: int | None = None) -> torch.Tensor:
    """Which positions hold real tokens, [B, T] bool.

    Padding is read off the attention mask, never off token ids (Pythia and GPT-2 pad with their
    BOS/EOS id). With `bos_token_id`, a row's first real token is dropped too when it is that id;
    later occurrences (document separators) stay. Works for left and right padding.
    """
    keep = attention_mask.bool().clone()
    if bos_token_id is not None and keep.numel():
        first = keep.int().argmax(dim=1)  # first real position of each row
        rows = torch.arange(len(keep), device=keep.device)
        is_bos = keep[rows, first] & (input_ids[rows, first] == bos_token_id)
        keep[rows[is_bos], first[is_bos]] = False
    return keep


def check_language_model(model: Any) -> Any:
    """`model` itself if it is an nnsight TransformersModel / LanguageModel with a tokenizer; else a
    TypeError saying how to wrap one."""
    from nnsight import Envoy

    if not isinstance(model, Envoy) or getattr(model, "tokenizer", None) is None:
        raise TypeError(
            f"model must be an nnsight TransformersModel (or LanguageModel) with a tokenizer; got "
            f"{type(model).__name__}. Wrap a transformers model: "
            "nnsight.TransformersModel(hf_model, tokenizer=tokenizer)."
        )
    return model


def resolve_submodule(model: Any, submodule: Any) -> Any:
    """The envoy of `model` for `submodule` (an envoy, a torch module, or a dotted path)."""
    from nnsight import Envoy

    if isinstance(submodule, str):
        try:
            return model.get(submodule.removeprefix("model.")) if submodule not in ("", "model") else model
        except AttributeError as error:
            raise ValueError(f"the model has no submodule {submodule!r} ({error}).") from error
    if isinstance(submodule, Envoy):
        if submodule.root is not model:
            raise ValueError(
                f"submodule {submodule_path(submodule)} belongs to a different model object than `model`; "
                "take it from the same one, e.g. model.gpt_neox.layers[1].mlp."
            )
        return submodule
    if isinstance(submodule, torch.nn.Module):
        for name, module in model._module.named_modules():
            if module is submodule:
                return model.get(name) if name else model
        raise ValueError(
            f"submodule {type(submodule).__name__} is not part of the model; take it from the same "
            "model object, e.g. model.gpt_neox.layers[1].mlp."
        )
    raise TypeError(
        f"submodule must be a module of the model (e.g. model.gpt_neox.layers[1].mlp) or its dotted "
        f"path; got {type(submodule).__name__}."
    )


def submodule_path(submodule: Any) -> str:
    """The dotted path of an envoy ("gpt_neox.layers.1.mlp"; the root is "model")."""
    return str(getattr(submodule, "path", submodule)).removeprefix("model.") or "model"


def _parameter_dtype(model: Any, default: torch.dtype) -> torch.dtype:
    parameter = next(model._module.parameters(), None)
    if parameter is None or not parameter.dtype.is_floating_point:
        return default
    return parameter.dtype

