"""Writing an activation cache: `cache_activations` runs a language model once and stores the
activations of every site on disk, compressed, for any number of later runs to read
(`CachedActivations`, cache_reader.py):

    cache_activations(stdlib_text_stream(), model, "gpt_neox.layers.*.mlp", "cache/", n_tokens=10**6)
    cache = CachedActivations("cache/", site="gpt_neox.layers.1.mlp", batch_size=4096, seed=0)
    aes = trainSAE(cache, trainer_configs=[...])      # as many sweeps as you like, no forward pass

Writing collects exactly as `ActivationBuffer` does (one forward pass per `refresh_batch_size` texts
reads every site and stops after the deepest; real tokens only) and stores the rows in collection
order, with each token's id and position, in shards of `shard_tokens` rows (the file format:
shards.py). Compression runs on background threads (NumPy and zstd, no torch thread pool); the
forward pass waits only when they are `max_pending` frames behind. A shard gets its name when it
is complete, and the manifest lists it right after, so a killed writer leaves only complete
shards; `resume=True` continues after the last one (its end is recorded as a position in the data:
texts consumed, rows of the next forward batch already stored) and never rewrites a shard. Resuming
with a larger `n_tokens` appends.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import queue
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from .buffer import ActivationBuffer
from .files import atomic_write, atomic_write_json
from .shards import (FORMAT, INT8, LOCK, MANIFEST, Column, ShardFile, ShardWriter, dequantize, encode_part,
                     file_sha256, positive_int, quantize, read_manifest, shard_index, shard_name, tensor_bytes)
from .sites import layer_of

__all__ = ["cache_activations"]

_STORED_DTYPES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16", torch.int8: "int8"}
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
        dtype: storage dtype of the activations: float32, float16, bfloat16, or int8 for 8-bit
            values with a float32 scale per row (x ≈ q · s, s = max|x| / 127; read back as float32).
        shard_tokens: rows per shard file; frame_rows: rows per independently readable frame.
        compression_level: zstd level (1 is fast; negative levels are faster and compress less).
        byte_shuffle: store each column's bytes plane by plane: smaller for float activations
            (bf16 ~0.65 of raw instead of ~0.8), slower to read back.
        resume: continue (or extend, with a larger n_tokens) the cache at `path`. The cache must have
            been written with the same model, sites and settings (checked; differences are named).
            A cache that already holds `n_tokens` rows is only checked and its manifest returned,
            without taking the writer's lock (parallel jobs may all call this to get one cache).
        data_source: a description of `data` recorded in the manifest (default: its type or
            generator name); resuming with another description is an error.
        workers: compression threads; max_pending: frames that may wait for them (default 2 per
            worker + 2) before the forward pass waits.
        progress: show a tqdm bar.
    """
    n_tokens = positive_int("n_tokens", n_tokens)
    for name, value in [("shard_tokens", shard_tokens), ("frame_rows", frame_rows), ("workers", workers)]:
        positive_int(name, value)
    if dtype not in _STORED_DTYPES:
        raise ValueError(f"dtype must be one of {[str(d) for d in _STORED_DTYPES]}; got {dtype!r}")
    if isinstance(compression_level, bool) or not isinstance(compression_level, int) or \
            not -7 <= compression_level <= 22:
        raise ValueError(f"compression_level must be a zstd level, an int from -7 to 22; got {compression_level!r}")
    max_pending = 2 * workers + 2 if max_pending is None else positive_int("max_pending", max_pending)
    collector = ActivationBuffer(data, model, submodules=sites, io=io, n_ctxs=2, ctx_len=ctx_len,
                                 refresh_batch_size=refresh_batch_size, out_batch_size=1, device="cpu",
                                 dtype=torch.float32 if dtype == torch.int8 else dtype,
                                 remove_bos=remove_bos, seed=0, tokenizer=tokenizer,
                                 add_special_tokens=add_special_tokens)
    identity = _identity(collector, dtype, _describe(data, data_source), shard_tokens, frame_rows,
                         compression_level, byte_shuffle)
    if resume and (Path(path) / MANIFEST).exists():
        manifest = read_manifest(Path(path))  # written atomically: a consistent snapshot, lock or not
        if manifest["rows"] >= n_tokens:  # nothing to write: no lock, so parallel jobs may all ask for it
            _check_same_identity(Path(path), manifest, identity)
            return manifest
    folder = _CacheFolder(Path(path), identity, resume)
    try:
        if folder.rows < n_tokens:
            _write(collector, folder, n_tokens, _FramePipeline(folder, workers, max_pending), progress)
        return folder.manifest
    finally:
        folder.release()


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
            stored = INT8 if dtype == torch.int8 else _STORED_DTYPES[dtype]
            columns.append(Column(f"{name}/{read}", stored, next(widths), name, read))
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
            rows = np.concatenate(data) if len(data) > 1 else data[0]
            columns.append((column, quantize(rows.view(np.float32)) if column.dtype == INT8 else rows))
        parts = [encode_part(rows, self.level, self.byte_shuffle, column.itemsize) for column, rows in columns]
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
    """Σ_rows x [width] and Σ_rows ‖x‖², in float64, of a column given as (stored) row bytes."""
    total = np.zeros(column.width, dtype=np.float64)
    squares = 0.0
    for start in range(0, len(rows), _STATISTICS_CHUNK):
        block = _as_float64(rows[start : start + _STATISTICS_CHUNK], column)
        total += block.sum(0)
        squares += float(np.einsum("ij,ij->", block, block))
    return torch.from_numpy(total), squares


def _as_float64(rows: np.ndarray, column: Column) -> np.ndarray:
    """Stored row bytes as float64 values [n, width] (bfloat16 is the top half of a float32; 8-bit
    rows are dequantised: the statistics are those of what a reader serves)."""
    if column.dtype == INT8:
        return dequantize(rows, column.width).astype(np.float64)
    if column.dtype == "bfloat16":
        return (rows.view(np.uint16).astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return rows.view(np.float16 if column.dtype == "float16" else np.float32).astype(np.float64)
