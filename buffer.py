"""ActivationBuffer: a shuffled stream of a language model's activations at one or many sites.

Text goes in (any iterator of strings), batches of per-token activations come out:

    buffer = ActivationBuffer(data, model, model.gpt_neox.layers[1].mlp, n_ctxs=3e4)
    for acts in buffer:  # [out_batch_size, d_submodule]
        ...
    buffer = ActivationBuffer(data, model, submodules="gpt_neox.layers.*.mlp")
    for batch in buffer:  # {"gpt_neox.layers.0.mlp": [out_batch_size, d], ...}, the same tokens at every site
        ...

The buffer holds `capacity = n_ctxs * ctx_len` rows in one pre-allocated block, each row the
activations of one token at every site side by side. At each (re)fill it draws one random order
over the rows it holds and serves batches by walking that order, so a batch is a uniform sample of
the unread rows and no row is served twice. When half the rows have been read, their slots are
overwritten with fresh activations and a new order is drawn over old-unread and new rows together,
so consecutive texts end up spread over many batches.

Collection is one forward pass per `refresh_batch_size` texts (sites.py): tokenize the batch (one
call), read every site and stop after the last one, so no later layer runs; then keep real tokens
only (attention mask; with `remove_bos`, also drop each row's leading BOS).
"""
from __future__ import annotations

import hashlib
import itertools
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from .checks import as_dtype
from .sites import Site, layer_of, site_reader

__all__ = ["ActivationBuffer", "token_mask", "check_language_model", "resolve_submodule", "submodule_path"]


class ActivationBuffer:
    """Shuffled batches of per-token activations at one or several sites, computed on the fly from text.

    Args:
        data: iterator (or iterable) of strings. Iteration ends once it runs out and every
            buffered activation has been served (the last batch may be smaller).
        model: an nnsight `TransformersModel` / `LanguageModel` with a tokenizer, or a plain torch
            model such as a `transformers` model (then pass `tokenizer=`): read with forward hooks.
        submodule: the one module to read: an envoy of `model` (`model.gpt_neox.layers[1].mlp`),
            the matching `torch.nn.Module`, or its dotted path (`"gpt_neox.layers.1.mlp"`).
            Batches are then tensors [out_batch_size, d_submodule].
        d_submodule: activation width; probed with a one-token forward pass when None, and
            checked against the model when given (with `submodules`: a dict site -> width).
        io: "out" reads the submodule's output (the first element of a tuple output, e.g. a
            residual-stream layer in older transformers); "in" reads its first input; "in_to_out"
            reads both, and a batch is the pair (inputs, outputs) a transcoder learns.
        n_ctxs: number of contexts the buffer holds (int or float such as 3e4).
        ctx_len: tokens per context; longer texts are truncated.
        refresh_batch_size: texts per forward pass when filling.
        out_batch_size: rows per yielded batch; at most half the buffer.
        device: where the buffer lives; default the model's device.
        dtype: storage dtype; default the model's (bf16/fp16 halve memory vs fp32).
        remove_bos: drop each context's first real token when it is the tokenizer's BOS token.
        seed: seed of the buffer's shuffling generator; default drawn from torch's global RNG,
            so `torch.manual_seed` makes runs reproducible.
        submodules: instead of `submodule`, several sites read in the same forward pass: a list of
            modules, paths and glob patterns (`"gpt_neox.layers.*.mlp"`), or a dict {name: module}.
            Batches are then dicts {site name: tensor} (or (inputs, outputs) pairs with io="in_to_out")
            whose rows come from the same tokens at every site.
        tokenizer: the tokenizer of a plain torch model (an nnsight model brings its own).
        add_special_tokens: let the tokenizer add its special tokens (e.g. a BOS), as by default.
        progress: show a progress bar while the first fill takes longer than FILL_BAR_DELAY seconds.
    """

    def __init__(
        self,
        data: Iterable[str],
        model: Any,
        submodule: Any = None,
        d_submodule: int | Mapping[str, int] | None = None,
        io: str = "out",
        n_ctxs: int | float = 3e4,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        remove_bos: bool = False,
        seed: int | None = None,
        *,
        submodules: Any = None,
        tokenizer: Any = None,
        add_special_tokens: bool = True,
        progress: bool = True,
    ):
        _check_arguments(data, n_ctxs, ctx_len, refresh_batch_size, out_batch_size)
        dtype = as_dtype(dtype)
        if (submodule is None) == (submodules is None):
            raise ValueError("pass exactly one of submodule= (one site; batches are tensors) and submodules= "
                             "(several sites read in one pass; batches are dicts)")
        self.reader = site_reader(model, submodule if submodules is None else submodules, io, tokenizer)
        self.model = self.reader.model
        self.tokenizer = self.reader.tokenizer
        self.sites: dict[str, Site] = {site.name: site for site in self.reader.sites}
        self.single_site = submodules is None
        self.submodule = self.model.get(self.reader.sites[0].path) if (
            self.single_site and self.reader.backend == "nnsight" and self.reader.sites[0].path
        ) else (self.reader.torch_module.get_submodule(self.reader.sites[0].path) if self.single_site else None)
        self._check_tokenizer_and_context(remove_bos, ctx_len)
        self.data: Iterator[str] = iter(data)
        self.io = io
        self.n_ctxs = int(n_ctxs)
        self.ctx_len = ctx_len
        self.capacity = self.n_ctxs * ctx_len
        self.refresh_batch_size = refresh_batch_size
        self.out_batch_size = out_batch_size
        self.remove_bos = remove_bos
        self.add_special_tokens = bool(add_special_tokens)
        self.progress = bool(progress)
        if out_batch_size > self.capacity // 2:
            raise ValueError(
                f"out_batch_size={out_batch_size} is more than half the buffer "
                f"(n_ctxs * ctx_len = {self.n_ctxs} * {ctx_len} = {self.capacity} rows); "
                "raise n_ctxs or lower out_batch_size."
            )
        self.d_sites = self._site_widths(d_submodule)
        self.d_submodule = next(iter(self.d_sites.values())) if self.single_site else None
        self.device = torch.device(device) if device is not None else self.reader.device
        self.dtype = dtype if dtype is not None else _parameter_dtype(self.reader.torch_module, self.reader.dtype)
        # One block holds every read of every row: read i is the column range _columns[i].
        bounds = [0, *itertools.accumulate(self.reader.widths)]
        self._columns = list(zip(bounds[:-1], bounds[1:]))
        self._storage = self._allocate_storage(bounds[-1])
        # Row bookkeeping (indices into _storage): _order lists the filled rows in serving order,
        # _next counts how many of them were served, _free lists slots that hold nothing.
        self._order = torch.empty(0, dtype=torch.long, device=self.device)
        self._next = 0
        self._free = torch.arange(self.capacity, device=self.device)
        self._overflow: list[torch.Tensor] | None = None  # rows computed beyond the free slots, per read
        self._data_exhausted = False
        self._texts_read = 0
        self._first_texts_sha256: str | None = None  # set by `fingerprint`, which peeks before any read
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,)).item())
        self.seed = seed
        self._generator = torch.Generator(device=self.device).manual_seed(seed)

    def _site_widths(self, d_submodule) -> dict[str, int | tuple[int, int]]:
        """Each site's width as probed (a pair (d_in, d_out) for io="in_to_out"), checked against
        `d_submodule` when given."""
        widths = iter(self.reader.widths)
        probed = {name: tuple(next(widths) for _ in site.reads) for name, site in self.sites.items()}
        probed = {name: w if len(w) == 2 else w[0] for name, w in probed.items()}
        if d_submodule is not None:
            given = {self.reader.sites[0].name: d_submodule} if self.single_site else dict(d_submodule)
            for name, width in given.items():
                if name not in probed:
                    raise ValueError(f"d_submodule names site {name!r}, which is not read; sites: {list(probed)}")
                if (tuple(width) if isinstance(width, (list, tuple)) else width) != probed[name]:
                    raise ValueError(
                        f"d_submodule={width} does not match the model: {self._where(name)} has width "
                        f"{probed[name]}. Pass d_submodule={probed[name]} or leave it None."
                    )
        return probed

    def _where(self, name: str) -> str:
        site = self.sites[name]
        return f"{site.path} ({site.io}put)" if site.io != "in_to_out" else f"{site.path} (input and output)"

    def _check_tokenizer_and_context(self, remove_bos: bool, ctx_len: int) -> None:
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the model's tokenizer has no pad token (and no EOS to pad with); "
                             "set tokenizer.pad_token before building the buffer.")
        if remove_bos and self.tokenizer.bos_token_id is None:
            raise ValueError("remove_bos=True but the tokenizer has no bos_token; pass remove_bos=False.")
        config = getattr(self.reader.torch_module, "config", None)
        max_positions = getattr(config, "max_position_embeddings", None)
        if isinstance(max_positions, int) and ctx_len > max_positions:
            raise ValueError(f"ctx_len={ctx_len} is longer than the model's {max_positions} positions; "
                             f"pass ctx_len <= {max_positions}.")

    def _allocate_storage(self, width: int) -> torch.Tensor:
        try:
            return torch.empty(self.capacity, width, dtype=self.dtype, device=self.device)
        except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
            gib = self.capacity * width * self.dtype.itemsize / 2**30
            raise MemoryError(
                f"the buffer needs {gib:.2f} GiB on {self.device} ({self.capacity} rows x {width} "
                f"x {self.dtype}) and could not get it; lower n_ctxs, store in dtype=torch.bfloat16, read fewer "
                "sites, or put it on another device."
            ) from error

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> "ActivationBuffer":
        return self

    def __next__(self) -> Any:
        """A batch of `out_batch_size` unread rows: a tensor [out_batch_size, d_submodule] for one
        site, an (inputs, outputs) pair for io="in_to_out", a dict {site: batch} with `submodules`."""
        rows = self._next_slots()
        if rows is None:
            raise StopIteration
        reads = iter(self._storage[:, start:end].index_select(0, rows) for start, end in self._columns)
        batch = {name: tuple(next(reads) for _ in site.reads) for name, site in self.sites.items()}
        batch = {name: pair if len(pair) == 2 else pair[0] for name, pair in batch.items()}
        return next(iter(batch.values())) if self.single_site else batch

    def _next_slots(self) -> torch.Tensor | None:
        """The storage slots of the next batch, refilling first once half the rows were read; None
        when every row was served and the data ran out."""
        if self.n_unread < self.capacity // 2 and not (self._data_exhausted and self._overflow is None):
            self.refresh()
        if self.n_unread == 0:
            return None
        slots = self._order[self._next : self._next + self.out_batch_size]
        self._next += len(slots)
        return slots

    def skip(self, n_batches: int) -> None:
        """Move past the next `n_batches` batches exactly as serving them would, but run the model
        only on the texts whose activations are still held afterwards. Call it on a fresh buffer.

        Which rows fill which slots, and the shuffles, depend only on each forward pass's token
        count, so the texts are tokenized and the bookkeeping replayed on (forward pass, row) labels
        instead of activations. Each forward pass with a row left unserved at the end is then run
        again on the same tokens (same batch, so the same numbers) and its rows put back in their
        slots. That recomputes a bounded number of passes — those whose rows survived the random
        serving order, about log2(rows per pass) refills' worth — whatever `n_batches` is."""
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0:
            raise ValueError(f"n_batches must be an int >= 0; got {n_batches!r}")
        if n_batches == 0:
            return
        if self._texts_read or len(self._order) or self._overflow is not None:
            raise RuntimeError("skip() must come before the buffer reads any text: build a fresh ActivationBuffer")
        storage, columns, rows_of = self._storage, self._columns, self._activations
        labels = torch.empty(self.capacity, 2, dtype=torch.long, device=self.device)  # (pass, row) of each slot
        encodings: dict[int, dict[str, torch.Tensor]] = {}  # the passes with rows not yet served
        unserved: list[int] = []  # rows not yet served, per pass

        def label_rows(encoding: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
            n_tokens = int(token_mask(encoding["input_ids"], encoding["attention_mask"],
                                      self.tokenizer.bos_token_id if self.remove_bos else None).sum())
            if n_tokens == 0:
                return None
            encodings[len(unserved)] = encoding
            rows = torch.arange(n_tokens, device=self.device)
            unserved.append(n_tokens)
            return [torch.stack([torch.full_like(rows, len(unserved) - 1), rows], dim=1)]

        self._storage, self._columns, self._activations = labels, [(0, 2)], label_rows
        try:
            for _ in tqdm(range(n_batches), desc="skipping trained batches (tokenizing only)", unit="batch",
                          leave=False, delay=FILL_BAR_DELAY, disable=not self.progress, dynamic_ncols=True):
                slots = self._next_slots()
                if slots is None:
                    break
                for forward_pass, count in zip(*labels[slots, 0].unique(return_counts=True)):
                    unserved[forward_pass] -= int(count)
                    if unserved[forward_pass] == 0:
                        del encodings[int(forward_pass)]
            overflow = self._overflow
        finally:
            self._storage, self._columns, self._activations = storage, columns, rows_of
        held = self._order[self._next :]  # the unserved slots: the model refills these
        held_labels = labels[held]
        for forward_pass in sorted(encodings):
            reads = self._activations(encodings.pop(forward_pass))
            mine = held_labels[:, 0] == forward_pass
            for (start, end), rows in zip(self._columns, reads):
                self._storage[:, start:end].index_copy_(0, held[mine], rows.index_select(0, held_labels[mine, 1]))
            if overflow is not None and int(overflow[0][0, 0]) == forward_pass:
                self._overflow = [rows.index_select(0, overflow[0][:, 1]) for rows in reads]

    @property
    def n_unread(self) -> int:
        """Activations in the buffer that have not been served yet."""
        return len(self._order) - self._next

    def refresh(self) -> None:
        """Overwrite every read (or empty) slot with new activations, then reshuffle all rows."""
        free = torch.cat([self._free, self._order[: self._next]])
        filled = 0
        first_fill = len(self._order) == 0
        with tqdm(total=len(free), desc="filling the activation buffer", unit="act", leave=False, delay=FILL_BAR_DELAY,
                  disable=not (self.progress and first_fill), dynamic_ncols=True) as bar:
            while filled < len(free):
                reads = self._next_rows()
                if reads is None:
                    break
                n = min(len(reads[0]), len(free) - filled)
                slots = free[filled : filled + n]
                for (start, end), rows in zip(self._columns, reads):  # each read into its columns of the block
                    self._storage[:, start:end].index_copy_(0, slots, rows[:n])
                self._overflow = [rows[n:] for rows in reads] if n < len(reads[0]) else None
                filled += n
                bar.update(n)
        held = torch.cat([self._order[self._next :], free[:filled]])
        self._free = free[filled:]
        self._order = held[torch.randperm(len(held), generator=self._generator, device=self.device)]
        self._next = 0

    def _next_rows(self) -> list[torch.Tensor] | None:
        """Leftover rows of the last forward pass, else the next batch's (one tensor [n, d_i] per
        read); None when data ran out."""
        if self._overflow is not None:
            reads, self._overflow = self._overflow, None
            return reads
        texts_without_tokens = 0
        while not self._data_exhausted:
            encoding = self.tokenized_batch()
            reads = self._activations(encoding)
            if reads is not None:
                return reads
            texts_without_tokens += len(encoding["input_ids"])
            if texts_without_tokens >= MAX_TEXTS_WITHOUT_TOKENS:
                raise ValueError(f"data yielded {texts_without_tokens} texts in a row that hold no token (empty strings, "
                                 "or only a BOS that remove_bos drops); check the text stream")
        return None

    # ------------------------------------------------------------------ text and tokens

    def text_batch(self, batch_size: int | None = None) -> list[str]:
        """The next `batch_size` (default `refresh_batch_size`) texts; fewer at the end, [] after."""
        batch_size = self.refresh_batch_size if batch_size is None else batch_size
        texts = list(itertools.islice(self.data, batch_size))
        self._texts_read += len(texts)
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
        """Tokenize `texts` in one call, truncated to `ctx_len` and padded (on the tokenizer's side).

        A long text is cut to CHARS_PER_TOKEN · ctx_len characters before tokenizing (so a huge
        document costs no more than a context); one that then gives fewer than ctx_len tokens is
        tokenized again from a cut 8× longer, until it gives ctx_len tokens or is whole."""
        if not texts:
            empty = torch.zeros(0, 0, dtype=torch.long)
            return {"input_ids": empty, "attention_mask": empty}
        texts = list(texts)
        limits = [CHARS_PER_TOKEN * self.ctx_len] * len(texts)
        while True:
            encoding = self.tokenizer([text[:limit] for text, limit in zip(texts, limits)], return_tensors="pt",
                                      padding=True, truncation=True, max_length=self.ctx_len,
                                      add_special_tokens=self.add_special_tokens)
            lengths = encoding["attention_mask"].sum(dim=1).tolist()
            cut_short = [i for i, (text, limit) in enumerate(zip(texts, limits))
                         if len(text) > limit and lengths[i] < self.ctx_len]
            if not cut_short:
                return {"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"]}
            for i in cut_short:
                limits[i] *= 8

    # ------------------------------------------------------------------ collection

    def _activations(self, encoding: dict[str, torch.Tensor]) -> list[torch.Tensor] | None:
        """Each read's activations at the real tokens of one tokenized batch, [n_tokens, d_i] each
        (None when the batch has no real token)."""
        collected = self.token_activations(encoding)
        return None if collected is None else collected[0]

    def token_activations(self, encoding: dict[str, torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor] | None:
        """(reads, keep) for one tokenized batch: each read's activations at the real tokens,
        [n_tokens, d_i] each on `device` in `dtype`, in the row-major order of the [B, T] batch, and
        `keep` [B, T], the mask of those tokens. None when the batch has no real token."""
        keep = token_mask(encoding["input_ids"], encoding["attention_mask"],
                          self.tokenizer.bos_token_id if self.remove_bos else None)  # [B, T]
        if not keep.any():
            return None
        reads = self.reader(encoding)  # one [B, T, d_i] per read
        positions = keep.reshape(-1).nonzero().squeeze(1).to(reads[0].device, non_blocking=True)  # [n_tokens]
        return [act.reshape(-1, act.shape[-1]).index_select(0, positions).to(device=self.device, dtype=self.dtype)
                for act in reads], keep

    # ------------------------------------------------------------------ saving

    @property
    def fingerprint(self) -> dict[str, Any] | None:
        """What identifies this buffer's batches, for trainSAE to record with a run's state and check
        on resume: the config without the device, and the SHA-256 of the first `refresh_batch_size`
        texts (peeked without consuming them). None once the buffer has read texts it did not peek."""
        if self._first_texts_sha256 is None:
            if self._texts_read:
                return None
            texts = list(itertools.islice(self.data, self.refresh_batch_size))
            self.data = itertools.chain(texts, self.data)
            digest = hashlib.sha256()
            for text in texts:
                encoded = str(text).encode("utf-8", "surrogatepass")
                digest.update(len(encoded).to_bytes(8, "little") + encoded)
            self._first_texts_sha256 = digest.hexdigest()
        return {**{k: v for k, v in self.config.items() if k != "device"}, "first_texts_sha256": self._first_texts_sha256}

    @property
    def config(self) -> dict[str, Any]:
        """What built this buffer, JSON-serialisable (save it next to the trained dictionary)."""
        module = self.reader.torch_module
        config = {
            "model": getattr(getattr(module, "config", None), "_name_or_path", None)
            or getattr(self.model, "repo_id", None) or None,
        }
        if self.single_site:
            config.update(submodule=self.reader.sites[0].path or "model", io=self.io, d_submodule=self.d_submodule)
        else:
            config.update(submodules={name: site.path or "model" for name, site in self.sites.items()}, io=self.io,
                          d_submodule={name: width for name, width in self.d_sites.items()})
        config.update(
            n_ctxs=self.n_ctxs,
            ctx_len=self.ctx_len,
            refresh_batch_size=self.refresh_batch_size,
            out_batch_size=self.out_batch_size,
            device=str(self.device),
            dtype=str(self.dtype).removeprefix("torch."),
            remove_bos=self.remove_bos,
            add_special_tokens=self.add_special_tokens,
            seed=self.seed,
            backend=self.reader.backend,
        )
        return config

    def site_config(self, name: str) -> dict[str, Any]:
        """The config of one site's stream, as a one-site buffer would record it (for the folder of a
        dictionary trained on that site): model, submodule, io, d_submodule, layer and the rest."""
        if name not in self.sites:
            raise KeyError(f"no site {name!r}; the buffer reads {list(self.sites)}")
        config = {k: v for k, v in self.config.items() if k not in ("submodules", "d_submodule")}
        site = self.sites[name]
        config.update(site=name, submodule=site.path or "model", d_submodule=self.d_sites[name],
                      layer=layer_of(site.path))
        return config


FILL_BAR_DELAY = 2.0
"""Seconds the first fill of a buffer runs before its progress bar appears (quick fills show none)."""
CHARS_PER_TOKEN = 32
"""Texts are cut to this many characters per token of ctx_len before tokenizing (and cut longer
when that gives fewer than ctx_len tokens)."""
MAX_TEXTS_WITHOUT_TOKENS = 10_000
"""A data stream that yields this many texts in a row without a token is an error, not a hang."""


def _check_arguments(data, n_ctxs, ctx_len, refresh_batch_size, out_batch_size) -> None:
    for name, value in [("ctx_len", ctx_len), ("refresh_batch_size", refresh_batch_size),
                        ("out_batch_size", out_batch_size)]:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int; got {value!r}.")
    if isinstance(n_ctxs, bool) or not isinstance(n_ctxs, (int, float)) or not n_ctxs >= 1:
        raise ValueError(f"n_ctxs must be a number >= 1 (e.g. 3e4); got {n_ctxs!r}.")
    if isinstance(data, (str, bytes)):
        raise TypeError("data must be an iterator of strings, not a single string; wrap it: iter([text]).")


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


def _parameter_dtype(module: torch.nn.Module, default: torch.dtype) -> torch.dtype:
    parameter = next(module.parameters(), None)
    if parameter is None or not parameter.dtype.is_floating_point:
        return default
    return parameter.dtype

