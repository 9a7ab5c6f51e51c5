"""Reading an activation cache: `CachedActivations`, shuffled batches that `trainSAE` takes like an
ActivationBuffer, with bounded memory whatever the cache's size.

Each epoch visits the frames (blocks of `frame_rows` rows, shards.py) of every shard in a random
order; a background thread decodes them ahead. Rows are served from a window of `shuffle_window`
rows as an ActivationBuffer serves them: one random order over the held rows, and once fewer than
half are unread, a new order over the unread rows and the new ones. The slots of each served batch
take new rows at once, so decoding overlaps serving. Every row is served exactly once per epoch.
Slot bookkeeping is NumPy (no torch thread pool on the data path); the random orders come from
torch generators seeded by `seed`.

`skip(n)` starts the iteration n batches in without decoding them: the window's bookkeeping runs on
row indices instead of rows, and only the rows the window then holds are decoded (trainSAE's
`resume_from` uses it).
"""
from __future__ import annotations

import hashlib
import itertools
import math
import os
import queue
import secrets
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from .distributed import this_rank
from .shards import MANIFEST, Column, ShardFile, as_tensor, file_sha256, positive_int, read_manifest

__all__ = ["CachedActivations"]


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
        rank, world_size: read only this rank's share: of the frames in reading order (drawn from
            `seed`, the same on every rank), frames rank, rank + R, ..., each rank shuffling its own
            in its own window. Default: torch.distributed's ranks, or torchrun's RANK and WORLD_SIZE
            (so that under torchrun, trainSAE's ranks train on disjoint rows); one process reads all.

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
        rank: int | None = None,
        world_size: int | None = None,
    ):
        self.batch_size = positive_int("batch_size", batch_size)
        self.shuffle_window = positive_int("shuffle_window", shuffle_window)
        self.workers = positive_int("workers", workers)
        if shuffle and self.batch_size > self.shuffle_window // 2:
            raise ValueError(f"batch_size={batch_size} is more than half of shuffle_window={shuffle_window}; raise "
                             "shuffle_window or lower batch_size")
        self.epochs = None if epochs is None else positive_int("epochs", epochs)
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
        self.prefetch = positive_int("prefetch", prefetch) if prefetch is not None else \
            max(2, math.ceil(2 * self.batch_size / frame_rows))
        if verify:
            self.verify()
        self.seed = int(seed) if seed is not None else secrets.randbits(62)
        self.rank, self.world_size = this_rank(rank, world_size, caller="CachedActivations")
        self._generator = torch.Generator().manual_seed(self.seed)
        self._batches: Iterator[Any] | None = None
        self._prefetcher: _FramePrefetcher | None = None
        self._window_rows = 0
        self._skip = 0

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
            config.update(self._site_fields(next(iter(self.sites))))
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

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What determines the batches, wherever the cache lies: the cache's contents (its settings
        and every shard's sha256) and this reader's settings. trainSAE saves it with a run's state
        and refuses to resume it with a reader whose fingerprint differs."""
        shards = hashlib.sha256("".join(entry["sha256"] for entry in self.manifest["shards"]).encode()).hexdigest()
        return {"source": "CachedActivations", "config_sha256": self.manifest["config_sha256"], "rows": self.rows,
                "shards_sha256": shards, "sites": list(self.sites), "batch_size": self.batch_size,
                "shuffle": self.shuffle, "seed": self.seed, "shuffle_window": self.shuffle_window,
                "epochs": self.epochs, "dtype": None if self.dtype is None else str(self.dtype),
                **({"rank": self.rank, "world_size": self.world_size} if self.world_size > 1 else {})}

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
        parts = [0, 1, *self._parts]
        frames = [shard.decode(f, parts, self._all_columns, self._byte_shuffle) for f in range(len(shard.frames))]
        ids, positions, *reads = [as_tensor(np.concatenate(blocks), self._all_columns[i])
                                  for i, blocks in zip(parts, zip(*frames))]
        return {"token_ids": ids[:, 0], "positions": positions[:, 0], **self._batch(reads, convert=False)}

    @property
    def _byte_shuffle(self) -> bool:
        return self.manifest["compression"]["byte_shuffle"]

    # ------------------------------------------------------------------ iteration

    def __iter__(self) -> "CachedActivations":
        return self

    def __next__(self) -> Any:
        if self._batches is None:
            self._batches = self._serve()
        return next(self._batches)

    def skip(self, n_batches: int) -> None:
        """Start the iteration `n_batches` batches in, exactly where reading them would have left it,
        without decoding them. Call it before the first batch."""
        if self._batches is not None:
            raise RuntimeError("skip() must come before the first batch is read")
        if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 0:
            raise ValueError(f"n_batches must be an int >= 0; got {n_batches!r}")
        self._skip = n_batches

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
        window = blocks = None
        start, used = 0, 0
        if self._skip:
            window, blocks, start, used = self._skipped(order_seed)
        decode = _FrameDecoder(self._shards, self._frames, self._parts, self._all_columns, self._byte_shuffle)
        order = itertools.islice(self._frame_order(order_seed), start, None)
        self._prefetcher = prefetcher = _FramePrefetcher(decode, order, self.prefetch, self.workers)
        rows = _RowStream(prefetcher, used)
        try:
            if not self.shuffle:
                while blocks := rows.take(self.batch_size):
                    columns = [np.concatenate(column) if len(column) > 1 else column[0] for column in zip(*blocks)]
                    yield self._batch([as_tensor(part, column) for part, column in zip(columns, self._columns)])
                return
            if window is None:
                window = _Window(self._window_size(), self.batch_size, self._window_generator())
                blocks = [_RowBlock(window.size, column) for column in self._columns]
                window.start(rows, blocks)
            self._window_rows = window.size
            while (slots := window.next_slots()) is not None:
                batch = self._batch([block.take(slots) for block in blocks])
                window.refill(rows, blocks, slots)
                yield batch
        finally:
            prefetcher.close()

    def _frame_order(self, order_seed: int) -> Iterator[int]:
        """This rank's frames in reading order."""
        order = _frame_order(len(self._frames), order_seed, self.shuffle, self.epochs)
        return itertools.islice(order, self.rank, None, self.world_size)

    def _window_generator(self) -> torch.Generator:
        """The window's shuffles: the reader's generator in one process; one of this rank's own
        (seeded from the seed and the rank) when several share the frame order."""
        if self.world_size == 1:
            return self._generator
        return torch.Generator().manual_seed(int.from_bytes(hashlib.sha256(f"{self.seed}/{self.rank}".encode())
                                                            .digest()[:8], "little") >> 1)

    def _window_size(self) -> int:
        stream_rows = -(-self.rows * self.epochs // self.world_size) if self.epochs is not None else self.shuffle_window
        return min(self.shuffle_window, stream_rows)

    def _skipped(self, order_seed: int) -> tuple["_Window | None", list | None, int, int]:
        """Run `self._skip` batches on row indices instead of rows (same generator draws, nothing
        decoded); then decode the rows the window holds. Returns the window, its blocks, and where
        the frame stream continues (frames already started, rows of the last one used)."""
        ids = _RowIds(self._frame_order(order_seed), [rows for _, _, rows in self._frames])
        stream = _RowStream(ids)
        window = blocks = None
        if not self.shuffle:
            for done in range(self._skip):
                if not stream.take(self.batch_size):
                    raise _ran_out(self._skip, done)
        else:
            window = _Window(self._window_size(), self.batch_size, self._window_generator())
            held = [_RowIdBlock(window.size)]
            window.start(stream, held)
            for done in range(self._skip):
                slots = window.next_slots()
                if slots is None:
                    raise _ran_out(self._skip, done)
                window.refill(stream, held, slots)
            blocks = [_RowBlock(window.size, column) for column in self._columns]
            self._decode_into(blocks, window.held_slots(), held[0].ids, ids)
        if stream.current is not None and stream.used < len(stream.current[0]):
            return window, blocks, len(ids.starts) - 1, stream.used
        return window, blocks, len(ids.starts), 0

    def _decode_into(self, blocks: list["_RowBlock"], slots: np.ndarray, row_ids: np.ndarray, ids: "_RowIds") -> None:
        """Fill `slots` of `blocks` with the rows whose stream indices `row_ids[slots]` give, decoding
        each frame they come from once."""
        wanted = row_ids[slots]
        starts = np.asarray(ids.starts)
        sequence = np.searchsorted(starts, wanted, side="right") - 1  # the frame each row comes from
        decode = _FrameDecoder(self._shards, self._frames, self._parts, self._all_columns, self._byte_shuffle)
        for position in np.unique(sequence):
            mine = sequence == position
            frame = decode(ids.frame_ids[position])
            within = wanted[mine] - starts[position]
            for block, rows in zip(blocks, frame):
                block.put(slots[mine], rows[within])

    def _batch(self, columns: list[torch.Tensor], convert: bool = True) -> Any:
        """Columns of the selected reads as a tensor, a pair, or a dict of them."""
        if convert and self.dtype is not None:
            columns = [column.to(self.dtype) for column in columns]
        reads = iter(columns)
        batch = {}
        for name, width in self.sites.items():
            batch[name] = (next(reads), next(reads)) if isinstance(width, tuple) else next(reads)
        return next(iter(batch.values())) if self.single_site and convert else batch


def _frame_order(n_frames: int, seed: int, shuffle: bool, epochs: int | None) -> Iterator[int]:
    """The frames in reading order, epoch after epoch (each epoch's order drawn from a generator
    seeded by `seed`). A function of its arguments only: the prefetch thread holds no reader."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs) if epochs is not None else itertools.count():
        yield from (torch.randperm(n_frames, generator=generator) if shuffle else torch.arange(n_frames)).tolist()


def _ran_out(wanted: int, done: int) -> ValueError:
    return ValueError(f"skip: the reader serves only {done} batches, fewer than the {wanted} to skip; a resumed run "
                      "must read the same cache with the same settings")


class _Window:
    """The slots of a shuffle window: the unread ones in their random serving order, and the ones
    that took new rows since that order was drawn. Once fewer than half the slots are unread, a new
    order is drawn over the unread and the new slots. The rows themselves live in blocks."""

    def __init__(self, size: int, batch_size: int, generator: torch.Generator):
        self.size, self.batch_size, self.generator = size, batch_size, generator
        self.order = np.empty(0, dtype=np.int64)
        self.served = 0
        self.fresh: list[np.ndarray] = []
        self.exhausted = False

    def start(self, rows: "_RowStream", blocks: list) -> None:
        filled = rows.fill(blocks, np.arange(self.size))
        self.exhausted = filled < self.size
        self.fresh = [np.arange(filled)]

    def next_slots(self) -> np.ndarray | None:
        """The slots of the next batch; None when every row was served."""
        if len(self.order) - self.served < self.size // 2 and any(len(slots) for slots in self.fresh):
            held = self.held_slots()
            self.order = held[torch.randperm(len(held), generator=self.generator).numpy()]
            self.served, self.fresh = 0, []
        if self.served == len(self.order):
            return None
        slots = self.order[self.served : self.served + self.batch_size]
        self.served += len(slots)
        return slots

    def held_slots(self) -> np.ndarray:
        """Every slot whose row is still to be served."""
        return np.concatenate([self.order[self.served :], *self.fresh])

    def refill(self, rows: "_RowStream", blocks: list, slots: np.ndarray) -> None:
        """Give the slots just served new rows, while the stream has any."""
        if self.exhausted:
            return
        slots = np.sort(slots)  # ascending slots make the copies faster; which row goes where is irrelevant
        filled = rows.fill(blocks, slots)
        self.fresh.append(slots[:filled])
        self.exhausted = filled < len(slots)


class _RowBlock:
    """Rows of one column held by the reader: `size` rows of row bytes, copied in and out by slot
    (NumPy, on whole rows at once)."""

    def __init__(self, size: int, column: Column):
        self.column = column
        self.row_bytes = column.row_bytes
        self.rows = np.empty((size, self.row_bytes), dtype=np.uint8)
        self._records = self.rows.view(np.dtype((np.void, self.row_bytes))).reshape(size)

    def put(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self._records[slots] = rows.view(self._records.dtype).reshape(len(rows))

    def take(self, slots: np.ndarray) -> torch.Tensor:
        rows = np.take(self._records, slots).view(np.uint8).reshape(len(slots), self.row_bytes)
        return as_tensor(rows, self.column)


class _RowIdBlock:
    """What skip() holds instead of rows: each slot's row index in the stream."""

    def __init__(self, size: int):
        self.ids = np.full(size, -1, dtype=np.int64)

    def put(self, slots: np.ndarray, rows: np.ndarray) -> None:
        self.ids[slots] = rows


class _RowIds:
    """The frame stream as row indices (frame after frame, in reading order), without decoding;
    records where each frame started and which frame it was."""

    def __init__(self, order: Iterator[int], frame_rows: list[int]):
        self.order, self.frame_rows = order, frame_rows
        self.starts: list[int] = []
        self.frame_ids: list[int] = []
        self.next_start = 0

    def get(self) -> list[np.ndarray] | None:
        frame = next(self.order, None)
        if frame is None:
            return None
        rows = self.frame_rows[frame]
        self.starts.append(self.next_start)
        self.frame_ids.append(frame)
        self.next_start += rows
        return [np.arange(self.next_start - rows, self.next_start)]

    def release(self, rows: int) -> None:
        pass


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
    """Decodes the frames of `order` on a background thread (and `workers` - 1 helpers) into a
    queue of `depth` frames. Counts the decoded rows the reader has not released yet."""

    def __init__(self, decode: _FrameDecoder, order: Iterator[int], depth: int, workers: int):
        self.decode = decode
        self.queue: queue.Queue = queue.Queue(depth)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.rows_held = self.peak_rows = 0
        self.thread = threading.Thread(target=self._run, args=(order, workers), name="dl-cache-prefetch",
                                       daemon=True)
        self.thread.start()

    def _decode(self, frame_id: int) -> list[np.ndarray]:
        columns = self.decode(frame_id)
        with self.lock:
            self.rows_held += self.decode.rows(frame_id)
            self.peak_rows = max(self.peak_rows, self.rows_held)
        return columns

    def _run(self, order: Iterator[int], workers: int) -> None:
        pool = ThreadPoolExecutor(workers - 1, thread_name_prefix="dl-cache-decode") if workers > 1 else None
        try:
            pending: deque = deque()
            for frame_id in order:
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
    """Frames (from a prefetcher, or row indices from _RowIds) as one stream of rows, taken any
    number at a time. `used`: rows of the first frame already taken (a skipped start)."""

    def __init__(self, frames: "_FramePrefetcher | _RowIds", used: int = 0):
        self.frames = frames
        self.current: list[np.ndarray] | None = None
        self.used = 0
        self._first_used = used

    def _frame(self) -> list[np.ndarray] | None:
        if self.current is not None and self.used == len(self.current[0]):
            self.frames.release(len(self.current[0]))
            self.current = None
        if self.current is None:
            self.current, self.used, self._first_used = self.frames.get(), self._first_used, 0
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

    def fill(self, blocks: list, slots: np.ndarray) -> int:
        """Copy the next rows into `slots` of the blocks (one per column); the number copied."""
        filled = 0
        for block in self.take(len(slots)):
            k = len(block[0])
            for column, rows in zip(blocks, block):
                column.put(slots[filled : filled + k], rows)
            filled += k
        return filled
