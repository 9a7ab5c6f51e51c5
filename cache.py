"""An on-disk activation cache: a language model's activations at one or many sites, computed once,
stored compressed, and read back as shuffled batches that `trainSAE` takes like a buffer.

    cache_activations(stdlib_text_stream(), model, "gpt_neox.layers.*.mlp", "cache/", n_tokens=10**6)
    cache = CachedActivations("cache/", site="gpt_neox.layers.1.mlp", batch_size=4096, seed=0)
    aes = trainSAE(cache, trainer_configs=[...])      # as many sweeps as you like, no forward pass

Writing collects exactly as `ActivationBuffer` does (one forward pass per `refresh_batch_size` texts
reads every site and stops after the deepest; real tokens only) and stores the rows in collection
order, with each token's id and position, in shards of `shard_tokens` rows (the file format:
shards.py). Compression runs on background threads; the forward pass waits only when they are
`max_pending` frames behind. A shard gets its name when it is complete, and the manifest lists it
right after, so a killed writer leaves only complete shards; `resume=True` continues after the last
one (its end is recorded as a position in the data: texts consumed, rows of the next forward batch
already stored) and never rewrites a shard. Resuming with a larger `n_tokens` appends.

Reading (`CachedActivations`) mixes the whole cache with bounded memory: each epoch visits the
frames (blocks of `frame_rows` rows) of every shard in a random order, decoded ahead on a background
thread, and rows are served from a window of `shuffle_window` rows as an ActivationBuffer serves
them (one random order over the held rows; once half are read, their slots take new rows and a new
order is drawn). Every row is served exactly once per epoch. Randomness comes from a
`torch.Generator` seeded by `seed`.
"""
from __future__ import annotations

import errno
import hashlib
import itertools
import json
import math
import os
import queue
import secrets
import threading
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .buffer import ActivationBuffer
from .files import atomic_write, atomic_write_json
from .shards import (FORMAT, LOCK, MANIFEST, Column, ShardFile, ShardWriter, as_tensor, encode_part, file_sha256,
                     read_manifest, shard_index, shard_name, tensor_bytes)
from .sites import layer_of

__all__ = ["cache_activations", "CachedActivations"]

_STORED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
_STATISTICS_CHUNK = 1024  # rows per float64 block when summing a frame's statistics


# ============================================================================================
# Writing
# ============================================================================================


def cache_activations(
    data: Iterable[str],
    model: Any,
    sites: Any,
    path: str | os.PathLike,
    n_tokens: int,
    *,
    io: str = "out",
    ctx_len: int = 128,
    refresh_batch_size: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    shard_tokens: int = 2**18,
    frame_rows: int = 4096,
    compression_level: int = 1,
    byte_shuffle: bool = False,
    resume: bool = False,
    remove_bos: bool = False,
    tokenizer: Any = None,
    add_special_tokens: bool = True,
    data_source: str | None = None,
    workers: int = 1,
    max_pending: int | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run `model` over `data` once and store the activations of every site in the cache folder
    `path` until it holds `n_tokens` rows (one per real token). Returns the manifest.

    Args:
        data: iterator of strings, as for ActivationBuffer. With `resume=True`, pass the same data
            from its beginning: the texts already cached are read and skipped, not run.
        model, sites, io, ctx_len, refresh_batch_size, remove_bos, tokenizer, add_special_tokens:
            as ActivationBuffer's `model`, `submodules`, ... (`sites`: a module, path, glob pattern,
            list or dict; every site is read in the same forward pass).
        path: the cache folder (created; must be new or empty unless `resume`).
        n_tokens: rows the cache holds when done (with `resume`, including those already there).
        dtype: storage dtype of the activations (float32, float16 or bfloat16).
        shard_tokens: rows per shard file; frame_rows: rows per independently readable frame.
        compression_level: zstd level (1 is fast; negative levels are faster and compress less).
        byte_shuffle: store each column's bytes plane by plane: smaller for float activations
            (bf16 ~0.65 of raw instead of ~0.8), slower to read back.
        resume: continue (or extend, with a larger n_tokens) the cache at `path`. The cache must have
            been written with the same model, sites and settings (checked; differences are named).
        data_source: a description of `data` recorded in the manifest (default: its type or
            generator name); resuming with another description is an error.
        workers: compression threads; max_pending: frames that may wait for them (default 2 per
            worker + 2) before the forward pass waits.
        progress: show a tqdm bar.
    """
    n_tokens = _positive_int("n_tokens", n_tokens)
    for name, value in [("shard_tokens", shard_tokens), ("frame_rows", frame_rows), ("workers", workers)]:
        _positive_int(name, value)
    if dtype not in _STORED_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _STORED_DTYPES]}; got {dtype!r}")
    if isinstance(compression_level, bool) or not isinstance(compression_level, int) or \
            not -7 <= compression_level <= 22:
        raise ValueError(f"compression_level must be a zstd level, an int from -7 to 22; got {compression_level!r}")
    max_pending = 2 * workers + 2 if max_pending is None else _positive_int("max_pending", max_pending)
    collector = ActivationBuffer(data, model, submodules=sites, io=io, n_ctxs=2, ctx_len=ctx_len,
                                 refresh_batch_size=refresh_batch_size, out_batch_size=1, device="cpu", dtype=dtype,
                                 remove_bos=remove_bos, seed=0, tokenizer=tokenizer,
                                 add_special_tokens=add_special_tokens)
    identity = _identity(collector, dtype, _describe(data, data_source), shard_tokens, frame_rows,
                         compression_level, byte_shuffle)
    folder = _CacheFolder(Path(path), identity, resume)
    try:
        if folder.rows < n_tokens:
            _write(collector, folder, n_tokens, _FramePipeline(folder, workers, max_pending), progress)
        return folder.manifest
    finally:
        folder.release()


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def _describe(data: Any, data_source: str | None) -> str:
    if data_source is not None:
        return str(data_source)
    return getattr(data, "__name__", None) or type(data).__name__


def _identity(collector: ActivationBuffer, dtype: torch.dtype, data_source: str, shard_tokens: int,
              frame_rows: int, level: int, byte_shuffle: bool) -> dict[str, Any]:
    """Everything that makes a cache what it is (compared when resuming), as JSON."""
    tokenizer = collector.tokenizer
    module_config = getattr(collector.reader.torch_module, "config", None)
    columns = [Column("token_ids", "int32", 1), Column("positions", "int32", 1)]
    widths = iter(collector.reader.widths)
    sites = {}
    for name, site in collector.sites.items():
        for read in site.reads:
            columns.append(Column(f"{name}/{read}", _STORED_DTYPES[dtype], next(widths), name, read))
        sites[name] = {"path": site.path or "model", "io": site.io, "width": collector.d_sites[name],
                       "layer": layer_of(site.path)}
    identity = {
        "model": {"name": collector.config["model"], "backend": collector.reader.backend,
                  "revision": getattr(module_config, "_commit_hash", None)},
        "tokenizer": {"name": getattr(tokenizer, "name_or_path", None) or None, "vocab_size": len(tokenizer),
                      "bos_token_id": tokenizer.bos_token_id, "pad_token_id": tokenizer.pad_token_id},
        "sites": sites, "io": collector.io, "ctx_len": collector.ctx_len,
        "refresh_batch_size": collector.refresh_batch_size, "remove_bos": collector.remove_bos,
        "add_special_tokens": collector.add_special_tokens, "dtype": _STORED_DTYPES[dtype],
        "data_source": data_source, "shard_tokens": shard_tokens, "frame_rows": frame_rows,
        "compression": {"codec": "zstd", "level": level, "byte_shuffle": byte_shuffle},
        "columns": [column.as_json() for column in columns],
    }
    return json.loads(json.dumps(identity))  # tuples as lists, as read back


class _CacheFolder:
    """The folder of a cache being written: its lock, its manifest and its complete shards. Shards
    are added by `write_shard` (on the writer thread), one after the other."""

    def __init__(self, path: Path, identity: dict[str, Any], resume: bool):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self._lock = _take_lock(path)
        try:
            self._open(identity, resume)
        except BaseException:
            self.release()
            raise

    def _open(self, identity: dict[str, Any], resume: bool) -> None:
        if (self.path / MANIFEST).exists():
            if not resume:
                raise FileExistsError(f"{str(self.path)!r} holds an activation cache already; pass resume=True to "
                                      "continue or extend it, or write to another path")
            self.manifest = read_manifest(self.path)
            _check_same_identity(self.path, self.manifest, identity)
        else:
            others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK and not _is_temporary(p.name))
            if others:
                raise FileExistsError(f"{str(self.path)!r} is not empty and holds no activation cache ({others[:5]}); "
                                      "pass a new or empty folder")
            self.manifest = {"format": FORMAT, **identity, "config_sha256": _config_sha256(identity), "rows": 0,
                             "shards": [], "statistics": {}}
        for leftover in self.path.iterdir():  # shards a killed writer left unfinished
            if _is_temporary(leftover.name):
                leftover.unlink()
        self.columns = [Column.from_json(entry) for entry in self.manifest["columns"]]
        self._sums = {column.name: (torch.zeros(column.width, dtype=torch.float64), 0.0)
                      for column in self.columns if column.site is not None}
        for entry in self.manifest["shards"]:
            self._add_statistics(ShardFile(self.path / entry["file"], entry["bytes"]).footer["statistics"])
        self._adopt_orphan()
        self._write_manifest()

    def _adopt_orphan(self) -> None:
        """A shard written completely by a writer killed before it listed it: checked and listed."""
        index = len(self.manifest["shards"])
        names = {shard_index(p.name): p for p in self.path.iterdir() if shard_index(p.name) is not None}
        unexpected = sorted(str(p.name) for i, p in names.items() if i > index)
        if unexpected:
            raise ValueError(f"{str(self.path)!r} holds shards that {MANIFEST} does not list and that cannot be the "
                             f"next one ({unexpected}); the cache is inconsistent: delete them or write a new cache")
        if index not in names:
            return
        file = names[index]
        shard = ShardFile(file)
        footer = shard.footer
        if footer.get("config_sha256") != self.manifest["config_sha256"] or footer.get("index") != index \
                or footer.get("start") != self.position:
            raise ValueError(f"{str(file)!r} was not written by this cache's writer (settings, index or start "
                             "differ); delete it and resume")
        columns = range(len(self.columns))
        for frame in range(len(shard.frames)):  # every checksum
            shard.decode(frame, columns, self.columns, self.manifest["compression"]["byte_shuffle"])
        self._list_shard(file, footer, file_sha256(file))

    @property
    def rows(self) -> int:
        return self.manifest["rows"]

    @property
    def position(self) -> list[int]:
        """Where the data continues after the last complete shard: [texts consumed before the next
        forward batch, rows of that batch already stored]."""
        shards = self.manifest["shards"]
        return list(shards[-1]["end"]) if shards else [0, 0]

    def write_shard(self, frames: Iterator[tuple[int, list[bytes], list, list[int] | None]]) -> None:
        """Write the next shard from `frames` (rows, encoded parts, statistics, end position of the
        shard on its last frame), atomically, then list it in the manifest."""
        index = len(self.manifest["shards"])
        file = self.path / shard_name(index)
        written: dict[str, Any] = {}

        def write(handle) -> None:
            shard = ShardWriter(handle)
            sums = {name: (torch.zeros_like(total), 0.0) for name, (total, _) in self._sums.items()}
            rows, end = 0, None
            for frame_rows, parts, statistics, end in frames:
                if frame_rows:
                    shard.add_frame(frame_rows, parts)
                    rows += frame_rows
                    for (name, (total, squares)), (frame_sum, frame_squares) in zip(sums.items(), statistics):
                        sums[name] = (total + frame_sum, squares + frame_squares)
            footer = {"format": FORMAT, "index": index, "config_sha256": self.manifest["config_sha256"], "rows": rows,
                      "start": self.position, "end": end,
                      "statistics": {name: {"sum": total.tolist(), "squared_norm_sum": squares}
                                     for name, (total, squares) in sums.items()}}
            shard.finish(footer)
            written.update(footer=footer, sha256=shard.sha256.hexdigest())

        atomic_write(file, write)
        self._list_shard(file, written["footer"], written["sha256"])

    def _list_shard(self, file: Path, footer: dict[str, Any], sha256: str) -> None:
        self.manifest["shards"].append({"file": file.name, "rows": footer["rows"], "bytes": file.stat().st_size,
                                        "sha256": sha256, "start": footer["start"], "end": footer["end"]})
        self.manifest["rows"] += footer["rows"]
        self._add_statistics(footer["statistics"])
        self._write_manifest()

    def _add_statistics(self, statistics: dict[str, Any]) -> None:
        for name, (total, squares) in self._sums.items():
            entry = statistics[name]
            self._sums[name] = (total + torch.tensor(entry["sum"], dtype=torch.float64),
                                squares + entry["squared_norm_sum"])

    def _write_manifest(self) -> None:
        rows = max(self.manifest["rows"], 1)
        statistics: dict[str, dict[str, Any]] = {}
        for column in self.columns:
            if column.site is not None:
                total, squares = self._sums[column.name]
                statistics.setdefault(column.site, {})[column.io] = {
                    "mean": (total / rows).tolist(), "mean_squared_norm": squares / rows}
        self.manifest["statistics"] = statistics
        atomic_write_json(self.manifest, self.path / MANIFEST)

    def release(self) -> None:
        if self._lock is not None:
            os.close(self._lock)  # closing the descriptor releases the flock
            self._lock = None


def _is_temporary(name: str) -> bool:
    """A temporary file of files.atomic_write (a shard or the manifest being written)."""
    return name.startswith(".") and name.endswith(".tmp")


def _config_sha256(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _check_same_identity(path: Path, manifest: dict[str, Any], identity: dict[str, Any]) -> None:
    differing = [key for key in identity if manifest.get(key) != identity[key]]
    if differing:
        details = "; ".join(f"{key}: cache has {manifest.get(key)!r}, now {identity[key]!r}" for key in differing)
        raise ValueError(f"resume: the cache at {str(path)!r} was written with other settings ({details}); pass the "
                         "same model, sites and settings to continue it, or write to another path")


def _take_lock(path: Path) -> int | None:
    """An exclusive flock on the folder's writer.lock, held until its descriptor is closed (also when
    the process dies). A second writer gets a clear error."""
    descriptor = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        import fcntl
    except ImportError:  # no flock on this platform: no protection against a second writer
        return descriptor
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise RuntimeError(f"another process is writing to the activation cache {str(path)!r} (it holds "
                           f"{LOCK}); wait for it to finish, or write to another path") from None
    return descriptor


def _write(collector: ActivationBuffer, folder: _CacheFolder, n_tokens: int, pipeline: "_FramePipeline",
           progress: bool) -> None:
    """The collection loop: forward passes in the main thread, frames handed to `pipeline`."""
    manifest = folder.manifest
    shard_tokens, frame_rows = manifest["shard_tokens"], manifest["frame_rows"]
    texts_done, offset = folder.position
    rows_total, rows_in_shard = folder.rows, 0
    frame: list[list[torch.Tensor]] = []
    frame_filled = 0
    bar = tqdm(total=n_tokens, initial=rows_total, desc="cache_activations", unit="tok", disable=not progress,
               dynamic_ncols=True)
    try:
        _skip_texts(collector, texts_done)
        exhausted = False
        while rows_total < n_tokens and not exhausted:
            texts = collector.text_batch()
            exhausted = len(texts) < collector.refresh_batch_size
            if not texts:
                break
            columns, n = _collect(collector, texts)
            if offset > n:
                raise ValueError(f"resume: the forward batch after the cached texts has {n} tokens, but the cache "
                                 f"stored {offset} of them; the data differs from the one cached: pass the same data, "
                                 "from its beginning")
            while offset < n and rows_total < n_tokens:
                take = min(n - offset, frame_rows - frame_filled, shard_tokens - rows_in_shard, n_tokens - rows_total)
                frame.append([column[offset : offset + take] for column in columns])
                offset, frame_filled = offset + take, frame_filled + take
                rows_total, rows_in_shard = rows_total + take, rows_in_shard + take
                bar.update(take)
                shard_done = rows_in_shard == shard_tokens or rows_total == n_tokens
                if frame_filled == frame_rows or shard_done:
                    end = [texts_done + len(texts), 0] if offset == n else [texts_done, offset]
                    pipeline.submit(frame, end if shard_done else None)
                    frame, frame_filled = [], 0
                    rows_in_shard = 0 if shard_done else rows_in_shard
            if offset == n:
                texts_done, offset = texts_done + len(texts), 0
        if rows_in_shard:  # the data ran out inside a shard: close it
            pipeline.submit(frame, [texts_done, offset])
        if rows_total < n_tokens:
            warnings.warn(f"cache_activations: the data ran out after {rows_total} tokens, before n_tokens={n_tokens}; "
                          "the cache holds what there was", stacklevel=3)
    except BaseException:
        pipeline.abort()
        raise
    finally:
        bar.close()
    pipeline.close()


def _skip_texts(collector: ActivationBuffer, n: int) -> None:
    """Read and drop the first `n` texts (those a resumed cache already holds)."""
    skipped = 0
    while skipped < n:
        got = len(collector.text_batch(min(collector.refresh_batch_size, n - skipped)))
        skipped += got
        if got == 0:
            raise ValueError(f"resume: the data ran out after {skipped} texts while skipping the {n} texts the cache "
                             "already holds; pass the same data, from its beginning")


def _collect(collector: ActivationBuffer, texts: list[str]) -> tuple[list[torch.Tensor], int]:
    """The columns of one forward batch (token ids, positions, each read), one row per real token."""
    encoding = collector.tokenize(texts)
    collected = collector.token_activations(encoding)
    if collected is None:
        return [], 0
    reads, keep = collected
    token_ids = encoding["input_ids"][keep].to(torch.int32)
    positions = (encoding["attention_mask"].cumsum(1) - 1)[keep].to(torch.int32)  # among the real tokens
    return [token_ids[:, None], positions[:, None], *reads], len(token_ids)


class _Interrupted(Exception):
    """The writer stopped inside a shard (the main thread failed)."""


class _FramePipeline:
    """Compresses frames on `workers` threads and writes them, in order, into shards on one writer
    thread. `submit` blocks only when `max_pending` frames are waiting."""

    def __init__(self, folder: _CacheFolder, workers: int, max_pending: int):
        self.folder = folder
        compression = folder.manifest["compression"]
        self.level, self.byte_shuffle = compression["level"], compression["byte_shuffle"]
        self.statistics_columns = [i for i, column in enumerate(folder.columns) if column.site is not None]
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="dl-cache-compress")
        self.items: queue.Queue = queue.Queue(max_pending)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="dl-cache-writer", daemon=True)
        self.thread.start()

    def submit(self, pieces: list[list[torch.Tensor]], end: list[int] | None) -> None:
        """A frame given as row blocks of every column; `end` (its data position) closes the shard."""
        self._raise_error()
        rows = sum(len(block[0]) for block in pieces)
        future = self.pool.submit(self._encode, pieces) if rows else None
        self.items.put((future, rows, end))
        self._raise_error()

    def _encode(self, pieces: list[list[torch.Tensor]]) -> tuple[list[bytes], list[tuple[torch.Tensor, float]]]:
        """The frame's parts and statistics, with NumPy and zstd only (no torch thread pool: this
        runs beside the forward pass)."""
        columns = []
        for column, blocks in zip(self.folder.columns, zip(*pieces)):
            data = [tensor_bytes(block) for block in blocks]
            columns.append((column, np.concatenate(data) if len(data) > 1 else data[0]))
        parts = [encode_part(rows, self.level, self.byte_shuffle, column.torch_dtype.itemsize)
                 for column, rows in columns]
        return parts, [_sums(*columns[i]) for i in self.statistics_columns]

    def _frames(self, item) -> Iterator[tuple[int, list[bytes], list, list[int] | None]]:
        while True:
            future, rows, end = item
            parts, statistics = future.result() if future is not None else ([], [])
            yield rows, parts, statistics, end
            if end is not None:
                return
            item = self.items.get()
            if item is None:
                raise _Interrupted

    def _run(self) -> None:
        try:
            while (item := self.items.get()) is not None:
                self.folder.write_shard(self._frames(item))
        except _Interrupted:
            return
        except BaseException as error:
            self.error = error
            while self.items.get() is not None:  # keep the main thread's puts from blocking
                pass

    def _raise_error(self) -> None:
        if self.error is None:
            return
        error = self.error
        if isinstance(error, OSError) and error.errno == errno.ENOSPC:
            raise OSError(errno.ENOSPC, f"no space left on the device while writing the cache {str(self.folder.path)!r}: "
                          f"its {len(self.folder.manifest['shards'])} complete shards ({self.folder.rows} rows) are "
                          f"valid and listed in {MANIFEST}; free some space and run cache_activations(..., "
                          "resume=True) to continue") from error
        raise error

    def close(self) -> None:
        """Wait until every frame is written; raise what went wrong on a background thread."""
        self.items.put(None)
        self.thread.join()
        self.pool.shutdown()
        self._raise_error()

    def abort(self) -> None:
        """Stop without finishing the shard being written (its temporary file is removed)."""
        self.items.put(None)
        self.thread.join()
        self.pool.shutdown(cancel_futures=True)


def _sums(column: Column, rows: np.ndarray) -> tuple[torch.Tensor, float]:
    """Σ_rows x [width] and Σ_rows ‖x‖², in float64, of a column given as row bytes."""
    total = np.zeros(column.width, dtype=np.float64)
    squares = 0.0
    for start in range(0, len(rows), _STATISTICS_CHUNK):
        block = _as_float64(rows[start : start + _STATISTICS_CHUNK], column.dtype)
        total += block.sum(0)
        squares += float(np.einsum("ij,ij->", block, block))
    return torch.from_numpy(total), squares


def _as_float64(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Row bytes of float32, float16 or bfloat16 values as float64 [n, width] (bfloat16 is the top
    half of a float32)."""
    if dtype == "bfloat16":
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return rows.view(np.float16 if dtype == "float16" else np.float32).astype(np.float64)


# ============================================================================================
# Reading
# ============================================================================================


class CachedActivations:
    """Shuffled batches from an activation cache, an iterator that trainSAE and evaluate take like an
    ActivationBuffer.

    Args:
        path: the cache folder (written by `cache_activations`).
        site: which site(s) to read: None (every site of the cache), a site name, or a list of names.
            Batches are tensors [batch_size, d] for one site (site=None and a one-site cache, or a
            name), dicts {site: tensor} for several, with (inputs, outputs) pairs for io="in_to_out".
        batch_size: rows per batch (the last batch may be smaller).
        shuffle: serve the rows in a random order (False: the cache's order, for dashboards).
        seed: seed of the reader's generators; None draws one at random (recorded in `config`).
        shuffle_window: rows held for shuffling (at least 2 × batch_size); the memory bound.
        epochs: passes over the cache (None: endless). Consecutive epochs mix in the window; with
            E epochs every row is served exactly E times.
        dtype: convert batches to this dtype (default: the cache's dtype).
        workers: threads decoding frames (one is enough while a step takes longer than a decode).
        prefetch: decoded frames kept ready (default: enough for two batches).
        verify: check every shard's sha256 against the manifest when opening (reads the whole cache).

    Memory: the window (`shuffle_window` rows of the selected sites) plus at most `prefetch` +
    `workers` + 1 decoded frames of `frame_rows` rows; `peak_rows_held` reports what was held.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        site: str | Sequence[str] | None = None,
        batch_size: int = 8192,
        shuffle: bool = True,
        seed: int | None = None,
        shuffle_window: int = 2**17,
        epochs: int | None = 1,
        dtype: torch.dtype | None = None,
        workers: int = 1,
        prefetch: int | None = None,
        verify: bool = False,
    ):
        self.batch_size = _positive_int("batch_size", batch_size)
        self.shuffle_window = _positive_int("shuffle_window", shuffle_window)
        self.workers = _positive_int("workers", workers)
        if shuffle and self.batch_size > self.shuffle_window // 2:
            raise ValueError(f"batch_size={batch_size} is more than half of shuffle_window={shuffle_window}; raise "
                             "shuffle_window or lower batch_size")
        self.epochs = None if epochs is None else _positive_int("epochs", epochs)
        if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch.dtype or None; got {dtype!r}")
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.shuffle, self.dtype = bool(shuffle), dtype
        self.rows = int(self.manifest["rows"])
        if self.rows == 0:
            raise ValueError(f"the activation cache {str(self.path)!r} holds no rows yet")
        self._all_columns = [Column.from_json(entry) for entry in self.manifest["columns"]]
        self.sites, self.single_site = self._select_sites(site)
        self._parts = [i for name in self.sites for i, column in enumerate(self._all_columns) if column.site == name]
        self._columns = [self._all_columns[i] for i in self._parts]
        self._shards = [ShardFile(self.path / entry["file"], entry["bytes"]) for entry in self.manifest["shards"]]
        for shard, entry in zip(self._shards, self.manifest["shards"]):
            if shard.rows != entry["rows"]:
                raise ValueError(f"{str(shard.path)!r} holds {shard.rows} rows but {MANIFEST} lists {entry['rows']}; "
                                 "the shard does not belong to this cache")
        self._frames = [(s, f, frame["rows"]) for s, shard in enumerate(self._shards)
                        for f, frame in enumerate(shard.frames)]
        frame_rows = max(rows for _, _, rows in self._frames)
        self.prefetch = _positive_int("prefetch", prefetch) if prefetch is not None else \
            max(2, math.ceil(2 * self.batch_size / frame_rows))
        if verify:
            self.verify()
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self._generator = torch.Generator().manual_seed(self.seed)
        self._batches: Iterator[Any] | None = None
        self._prefetcher: _FramePrefetcher | None = None
        self._window_rows = 0

    def _select_sites(self, site) -> tuple[dict[str, Any], bool]:
        available = self.manifest["sites"]
        names = list(available) if site is None else [site] if isinstance(site, str) else list(site)
        if not names:
            raise ValueError("site is an empty list; name at least one site of the cache")
        unknown = [name for name in names if name not in available]
        if unknown or len(set(names)) != len(names):
            problem = f"{unknown} not in the cache" if unknown else "a site listed twice"
            raise ValueError(f"site: {problem}; the cache at {str(self.path)!r} holds {list(available)}")
        widths = {name: tuple(available[name]["width"]) if isinstance(available[name]["width"], list)
                  else available[name]["width"] for name in names}
        return widths, isinstance(site, str) or (site is None and len(names) == 1)

    # ------------------------------------------------------------------ what the cache says

    def statistics(self, site: str | None = None) -> dict[str, Any]:
        """The manifest's statistics of `site` (the one selected site when None) over the whole
        cache: {read: {"mean": tensor [d], "mean_squared_norm": E‖x‖²}} with read "out", "in" or both."""
        site = self._one_site(site)
        return {read: {"mean": torch.tensor(entry["mean"]), "mean_squared_norm": float(entry["mean_squared_norm"])}
                for read, entry in self.manifest["statistics"][site].items()}

    def mean_squared_norm(self, site: str | None = None) -> float:
        """E‖x‖² over the whole cache of `site`'s activations (its inputs for io="in_to_out"): what
        trainSAE's normalize_activations scales by instead of estimating it from the first batch."""
        statistics = self.statistics(site)
        return statistics["in" if "in" in statistics else "out"]["mean_squared_norm"]

    def _one_site(self, site: str | None) -> str:
        if site is None:
            if len(self.sites) != 1:
                raise ValueError(f"this reader serves several sites {list(self.sites)}; pass site=")
            return next(iter(self.sites))
        if site not in self.sites:
            raise ValueError(f"site {site!r} is not served by this reader; it serves {list(self.sites)}")
        return site

    @property
    def config(self) -> dict[str, Any]:
        """Where the batches come from, JSON-serialisable (recorded in each trainer's config.json)."""
        manifest = self.manifest
        config = {"cache": str(self.path.resolve()), "model": manifest["model"]["name"], "io": manifest["io"]}
        if self.single_site:
            name = next(iter(self.sites))
            config.update(self._site_fields(name))
        else:
            config.update(submodules={name: manifest["sites"][name]["path"] for name in self.sites},
                          d_submodule=dict(self.sites))
        config.update(ctx_len=manifest["ctx_len"], dtype=manifest["dtype"], rows=self.rows,
                      batch_size=self.batch_size, shuffle=self.shuffle, shuffle_window=self.shuffle_window,
                      epochs=self.epochs, seed=self.seed)
        return config

    def site_config(self, name: str) -> dict[str, Any]:
        """The config of one site's stream, as a one-site reader would record it."""
        self._one_site(name)
        config = {k: v for k, v in self.config.items() if k not in ("submodules", "d_submodule")}
        config.update(self._site_fields(name))
        return config

    def _site_fields(self, name: str) -> dict[str, Any]:
        site = self.manifest["sites"][name]
        return {"site": name, "submodule": site["path"], "d_submodule": self.sites[name], "layer": site["layer"]}

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads the whole cache)."""
        for entry in tqdm(self.manifest["shards"], desc="verify", unit="shard", leave=False):
            file = self.path / entry["file"]
            if file_sha256(file) != entry["sha256"]:
                raise ValueError(f"{str(file)!r} does not match the sha256 in {MANIFEST}: the shard is damaged. "
                                 "Restore the file, or write the cache again.")

    def read_shard(self, index: int) -> dict[str, Any]:
        """Shard `index` in the cache's order: {"token_ids": [n], "positions": [n], site: activations}
        (the selected sites; pairs for io="in_to_out"). A context is a run of rows whose positions
        increase."""
        shard = self._shards[index]
        byte_shuffle = self.manifest["compression"]["byte_shuffle"]
        parts = [0, 1, *self._parts]
        frames = [shard.decode(f, parts, self._all_columns, byte_shuffle) for f in range(len(shard.frames))]
        ids, positions, *reads = [as_tensor(np.concatenate(blocks), self._all_columns[i])
                                  for i, blocks in zip(parts, zip(*frames))]
        return {"token_ids": ids[:, 0], "positions": positions[:, 0], **self._batch(reads, convert=False)}

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> "CachedActivations":
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._serve()
        return next(self._batches)

    @property
    def peak_rows_held(self) -> int:
        """The most rows this reader held at once so far: its window plus decoded frames."""
        decoded = self._prefetcher.peak_rows if self._prefetcher is not None else 0
        return self._window_rows + decoded

    def close(self) -> None:
        """Stop the background thread (iteration ends)."""
        if self._batches is not None:
            self._batches.close()
        if self._prefetcher is not None:
            self._prefetcher.close()

    def __enter__(self) -> "CachedActivations":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _serve(self) -> Iterator[Any]:
        order_seed = int(torch.randint(0, 2**62, (1,), generator=self._generator))
        decode = _FrameDecoder(self._shards, self._frames, self._parts, self._all_columns,
                               self.manifest["compression"]["byte_shuffle"])
        self._prefetcher = prefetcher = _FramePrefetcher(decode, len(self._frames), order_seed, self.shuffle,
                                                         self.epochs, self.prefetch, self.workers)
        rows = _RowStream(prefetcher)
        try:
            if self.shuffle:
                yield from self._shuffled(rows)
            else:
                while blocks := rows.take(self.batch_size):
                    columns = [np.concatenate(column) if len(column) > 1 else column[0] for column in zip(*blocks)]
                    yield self._batch([as_tensor(rows, column) for rows, column in zip(columns, self._columns)])
        finally:
            prefetcher.close()

    def _shuffled(self, rows: "_RowStream") -> Iterator[Any]:
        """The ActivationBuffer's serving scheme over a window of rows: one random order over the
        held rows; once fewer than half are unread, a new order over the unread and the new rows.
        Here the slots of each served batch take new rows at once, so decoding overlaps serving."""
        stream_rows = self.rows * self.epochs if self.epochs is not None else self.shuffle_window
        size = min(self.shuffle_window, stream_rows)
        window = [_RowBlock(size, column) for column in self._columns]
        self._window_rows = size
        # slot bookkeeping in NumPy (no torch thread pool on the data path); the random orders
        # come from the reader's torch generator
        filled = rows.fill(window, np.arange(size))
        exhausted = filled < size
        order, served, fresh = np.empty(0, dtype=np.int64), 0, [np.arange(filled)]
        while True:
            if len(order) - served < size // 2 and any(len(f) for f in fresh):
                held = np.concatenate([order[served:], *fresh])
                order, served, fresh = held[torch.randperm(len(held), generator=self._generator).numpy()], 0, []
            if served == len(order):
                return
            slots = order[served : served + self.batch_size]
            served += len(slots)
            batch = self._batch([block.take(slots) for block in window])
            if not exhausted:
                slots = np.sort(slots)  # ascending slots make the copies faster; the order is drawn later
                filled = rows.fill(window, slots)
                fresh.append(slots[:filled])
                exhausted = filled < len(slots)
            yield batch

    def _batch(self, columns: list[torch.Tensor], convert: bool = True) -> Any:
        """Columns of the selected reads as a tensor, a pair, or a dict of them."""
        if convert and self.dtype is not None:
            columns = [column.to(self.dtype) for column in columns]
        reads = iter(columns)
        batch = {}
        for name, width in self.sites.items():
            batch[name] = (next(reads), next(reads)) if isinstance(width, tuple) else next(reads)
        return next(iter(batch.values())) if self.single_site and convert else batch


class _RowBlock:
    """Rows of one column held by the reader: `size` rows of row bytes, copied in and out by slot
    (NumPy, on whole rows at once)."""

    def __init__(self, size: int, column: Column):
        self.column = column
        self.row_bytes = column.width * column.torch_dtype.itemsize
        self.rows = np.empty((size, self.row_bytes), dtype=np.uint8)
        self._records = self.rows.view(np.dtype((np.void, self.row_bytes))).reshape(size)

    def put(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self._records[slots] = rows.view(self._records.dtype).reshape(len(rows))

    def take(self, slots: np.ndarray) -> torch.Tensor:
        rows = np.take(self._records, slots).view(np.uint8).reshape(len(slots), self.row_bytes)
        return as_tensor(rows, self.column)


class _FrameDecoder:
    """decode(frame id) -> the selected columns of that frame as row bytes (ShardFile.decode)."""

    def __init__(self, shards: list[ShardFile], frames: list[tuple[int, int, int]], parts: list[int],
                 columns: list[Column], byte_shuffle: bool):
        self.shards, self.frames, self.parts, self.columns = shards, frames, parts, columns
        self.byte_shuffle = byte_shuffle

    def rows(self, frame_id: int) -> int:
        return self.frames[frame_id][2]

    def __call__(self, frame_id: int) -> list[np.ndarray]:
        shard, frame, _ = self.frames[frame_id]
        return self.shards[shard].decode(frame, self.parts, self.columns, self.byte_shuffle)


class _Failure:
    def __init__(self, error: BaseException):
        self.error = error


_END = object()


class _FramePrefetcher:
    """Decodes frames on a background thread, in each epoch's random order (drawn from its own
    generator, seeded by the reader), into a queue of `depth` frames. Counts the decoded rows not
    yet released by the reader."""

    def __init__(self, decode: _FrameDecoder, n_frames: int, seed: int, shuffle: bool, epochs: int | None,
                 depth: int, workers: int):
        self.decode = decode
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.rows_held = self.peak_rows = 0
        self.thread = threading.Thread(target=self._run, args=(n_frames, seed, shuffle, epochs, workers),
                                       name="dl-cache-prefetch", daemon=True)
        self.thread.start()

    def _order(self, n_frames: int, seed: int, shuffle: bool, epochs: int | None) -> Iterator[int]:
        generator = torch.Generator().manual_seed(seed)
        for _ in range(epochs) if epochs is not None else itertools.count():
            yield from (torch.randperm(n_frames, generator=generator) if shuffle else torch.arange(n_frames)).tolist()

    def _decode(self, frame_id: int) -> list[np.ndarray]:
        columns = self.decode(frame_id)
        with self.lock:
            self.rows_held += self.decode.rows(frame_id)
            self.peak_rows = max(self.peak_rows, self.rows_held)
        return columns

    def _run(self, n_frames: int, seed: int, shuffle: bool, epochs: int | None, workers: int) -> None:
        pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="dl-cache-decode") if workers > 1 else None
        try:
            pending: deque = deque()
            for frame_id in self._order(n_frames, seed, shuffle, epochs):
                if pool is None:
                    ready = self._decode(frame_id)
                else:
                    pending.append(pool.submit(self._decode, frame_id))
                    if len(pending) < workers - 1:
                        continue
                    ready = pending.popleft().result()
                if not self._put(ready):
                    return
            while pending:
                if not self._put(pending.popleft().result()):
                    return
            self._put(_END)
        except BaseException as error:
            self._put(_Failure(error))
        finally:
            if pool is not None:
                pool.shutdown(cancel_futures=True)

    def _put(self, item: Any) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def get(self) -> list[np.ndarray] | None:
        """The next decoded frame; None after the last one; a decoding error is raised here."""
        item = self.queue.get()
        if item is _END:
            self.queue.put(_END)
            return None
        if isinstance(item, _Failure):
            self.queue.put(item)
            raise item.error
        return item

    def release(self, rows: int) -> None:
        with self.lock:
            self.rows_held -= rows

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


class _RowStream:
    """The prefetched frames as one stream of rows, taken any number at a time."""

    def __init__(self, frames: _FramePrefetcher):
        self.frames = frames
        self.current: list[np.ndarray] | None = None
        self.used = 0

    def _frame(self) -> list[np.ndarray] | None:
        if self.current is not None and self.used == len(self.current[0]):
            self.frames.release(len(self.current[0]))
            self.current = None
        if self.current is None:
            self.current, self.used = self.frames.get(), 0
        return self.current

    def take(self, n: int) -> list[list[np.ndarray]]:
        """Up to `n` rows as blocks (one list of column row bytes per frame they come from)."""
        blocks, taken = [], 0
        while taken < n and (frame := self._frame()) is not None:
            k = min(n - taken, len(frame[0]) - self.used)
            blocks.append([column[self.used : self.used + k] for column in frame])
            self.used += k
            taken += k
        return blocks

    def fill(self, window: list[_RowBlock], slots: np.ndarray) -> int:
        """Copy the next rows into `slots` of the window's columns; the number copied."""
        filled = 0
        for block in self.take(len(slots)):
            k = len(block[0])
            for column, rows in zip(window, block):
                column.put(slots[filled : filled + k], rows)
            filled += k
        return filled
