"""The on-disk format of an activation cache: its folder, its manifest and its shard files.

A cache folder holds

    manifest.json           what the cache holds and how it was made, one entry per complete shard
                            (rows, bytes, sha256, the data position it starts and ends at) and the
                            statistics of every read (mean, E‖x‖²)
    shard-000000.dlshard    the shards, in data order; a shard has its name only when it is complete
    writer.lock             held (flock) by the one process writing to the cache

A shard holds consecutive rows of the collection (one row per token), cut into frames of at most
`frame_rows` rows. Each frame stores every column on its own, so a reader decompresses only the
columns it needs. The columns are `token_ids` and `positions` (int32, [rows]: the token, and its
index among the real tokens of its context, so contexts can be rebuilt), then one column per read
of each site ([rows, width] in the cache dtype; with 8-bit storage, each row's int8 values followed
by its float32 scale). Layout, every integer little-endian, no pickle:

    b"DLSHARD1"
    the parts of every frame, back to back: one zstd frame per column (with zstd's content
    checksum, so a damaged byte is detected when it is read)
    footer: UTF-8 JSON {"format", "index", "config_sha256", "rows", "start", "end",
                        "frames": [{"rows", "parts": [[offset, length], ...]}], "statistics"}
    uint64 footer length, b"DLSHEND1"

With byte shuffling (optional), a column's bytes are stored plane by plane (every value's first
byte, then every second byte, ...): the sign and exponent bytes of activations are alike and
compress well once they are side by side.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch

from .files import read_json_object

__all__ = ["Column", "ShardFile", "MANIFEST", "LOCK", "FORMAT", "DTYPES", "shard_name", "shard_index",
           "byte_planes", "from_byte_planes", "tensor_bytes", "as_tensor", "encode_part", "decode_part",
           "read_manifest", "file_sha256", "ShardWriter", "positive_int", "INT8", "quantize", "dequantize"]

MANIFEST = "manifest.json"
LOCK = "writer.lock"
FORMAT = "dictionary_learning activation cache 1"
MAGIC, END_MAGIC = b"DLSHARD1", b"DLSHEND1"
_TRAILER = struct.Struct("<Q8s")
_SHARD_NAME = re.compile(r"shard-(\d{6,})\.dlshard")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int32": torch.int32}
INT8 = "int8_row_scale"  # 8-bit values with one float32 scale per row: x ≈ q · s, s = max|x| / 127
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def positive_int(name: str, value: Any) -> int:
    """`value` as a positive int (an integral float such as 1e6 too); else a ValueError naming `name`."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int; got {value!r}")
    return value


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.dlshard"


def shard_index(name: str) -> int | None:
    """The index in a shard's file name, None for any other name."""
    match = _SHARD_NAME.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True)
class Column:
    """One column of the shards: `name` ("token_ids", "positions" or "<site>/<io>"), its dtype's
    name, and its width (1 for the per-token integers)."""

    name: str
    dtype: str
    width: int
    site: str | None = None
    io: str | None = None

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the column's tensors (float32 for 8-bit rows, which are dequantised)."""
        return torch.float32 if self.dtype == INT8 else DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        """Bytes per stored value (byte planes are this many)."""
        return 1 if self.dtype == INT8 else DTYPES[self.dtype].itemsize

    @property
    def row_bytes(self) -> int:
        """Bytes per stored row: the values, then (8-bit rows) the float32 scale."""
        return self.width * self.itemsize + (4 if self.dtype == INT8 else 0)

    def as_json(self) -> dict[str, Any]:
        return {"name": self.name, "dtype": self.dtype, "width": self.width, "site": self.site, "io": self.io}

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> "Column":
        return cls(entry["name"], entry["dtype"], int(entry["width"]), entry.get("site"), entry.get("io"))


# --------------------------------------------------------------------------------------------
# Bytes of a column
# --------------------------------------------------------------------------------------------


def byte_planes(raw: np.ndarray) -> np.ndarray:
    """Bytes [n, itemsize] (one row per value) as planes [itemsize, n]: plane k holds byte k of
    every value."""
    return np.ascontiguousarray(raw.T)


def from_byte_planes(planes: np.ndarray) -> np.ndarray:
    """The inverse of `byte_planes`: planes [itemsize, n] back to bytes [n, itemsize]."""
    size, n = planes.shape
    if size not in _WORDS:
        return np.ascontiguousarray(planes.T)
    words = np.empty(n, dtype=_WORDS[size])  # little-endian: byte k is bits 8k..8k+7
    np.left_shift(planes[size - 1], 8 * (size - 1), out=words, dtype=words.dtype)
    for k in range(size - 2, -1, -1):
        np.bitwise_or(words, np.left_shift(planes[k], 8 * k, dtype=words.dtype) if k else planes[k], out=words)
    return words.view(np.uint8).reshape(n, size)


def tensor_bytes(values: torch.Tensor) -> np.ndarray:
    """The bytes of a tensor [n, ...], as row bytes [n, row size] uint8 (a view when `values` is
    contiguous)."""
    return values.contiguous().view(torch.uint8).numpy().reshape(len(values), -1)


def as_tensor(rows: np.ndarray, column: Column) -> torch.Tensor:
    """Row bytes [n, row_bytes] uint8 as the column's tensor [n, width] (no copy; 8-bit rows are
    dequantised to float32)."""
    if column.dtype == INT8:
        return torch.from_numpy(dequantize(rows, column.width))
    return torch.from_numpy(rows).view(column.torch_dtype)


def quantize(x: np.ndarray) -> np.ndarray:
    """float32 rows [n, w] as 8-bit row bytes [n, w + 4]: q = round(x / s) in int8, then s =
    max|x| / 127 of the row as float32 (a row of zeros gets s = 0)."""
    scale = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)
    q = np.rint(x / np.where(scale > 0, scale, np.float32(1))).astype(np.int8)
    return np.concatenate([q.view(np.uint8), scale.astype(np.float32).view(np.uint8)], axis=1)


def dequantize(rows: np.ndarray, width: int) -> np.ndarray:
    """8-bit row bytes [n, width + 4] back to float32 [n, width]: q · s."""
    scale = np.ascontiguousarray(rows[:, width:]).view(np.float32)
    return rows[:, :width].view(np.int8).astype(np.float32) * scale


_local = threading.local()


def _compressor(level: int):
    """A zstd compressor for this thread (they are not thread-safe), writing content checksums."""
    import zstandard

    cached = getattr(_local, "compressors", None)
    if cached is None:
        cached = _local.compressors = {}
    if level not in cached:
        cached[level] = zstandard.ZstdCompressor(level=level, write_checksum=True)
    return cached[level]


def encode_part(rows: np.ndarray, level: int, shuffle: bool, itemsize: int) -> bytes:
    """One column of one frame as stored: its row bytes (`tensor_bytes`), byte-shuffled if asked,
    zstd-compressed. NumPy and zstd only: no torch thread pool (this runs beside the forward pass)."""
    raw = rows.reshape(-1, itemsize)
    return _compressor(level).compress(byte_planes(raw) if shuffle and itemsize > 1 else raw)


def decode_part(data: bytes, column: Column, rows: int, shuffle: bool) -> np.ndarray:
    """A stored part back as row bytes [rows, row_bytes] uint8 (`as_tensor` makes it the
    column's tensor); raises zstandard.ZstdError when it is damaged."""
    import zstandard

    size = column.itemsize
    raw = np.empty(rows * column.row_bytes, dtype=np.uint8)
    if raw.size:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=False)
        view, filled = memoryview(raw), 0
        while filled < len(view):
            n = reader.readinto(view[filled:])
            if n == 0:
                raise zstandard.ZstdError(f"the part holds {filled} bytes, {len(view)} expected")
            filled += n
        if reader.read(1):
            raise zstandard.ZstdError(f"the part holds more than the {len(view)} bytes expected")
    if shuffle and size > 1:
        raw = from_byte_planes(raw.reshape(size, -1))
    return raw.reshape(rows, column.row_bytes)


# --------------------------------------------------------------------------------------------
# Writing a shard
# --------------------------------------------------------------------------------------------


class ShardWriter:
    """Writes one shard into an open file: frames (their columns already encoded), then the footer.
    Keeps the sha256 of everything written."""

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.offset = 0
        self.frames: list[dict[str, Any]] = []
        self._write(MAGIC)

    def _write(self, data: bytes) -> None:
        self.file.write(data)
        self.sha256.update(data)
        self.offset += len(data)

    def add_frame(self, rows: int, parts: Sequence[bytes]) -> None:
        spans = []
        for part in parts:
            spans.append([self.offset, len(part)])
            self._write(part)
        self.frames.append({"rows": rows, "parts": spans})

    def finish(self, footer: dict[str, Any]) -> None:
        """Write the footer (`footer` plus the frame table) and the trailer."""
        data = json.dumps({**footer, "frames": self.frames}, separators=(",", ":")).encode()
        self._write(data)
        self._write(_TRAILER.pack(len(data), END_MAGIC))


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


class ShardFile:
    """A shard opened for reading: its footer (read once), and its frames' columns, read with a
    file descriptor opened per frame (so a reader of thousands of shards holds no descriptors)."""

    def __init__(self, path: Path, expected_bytes: int | None = None):
        self.path = path
        with open(path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if expected_bytes is not None and size != expected_bytes:
                raise ValueError(
                    f"{str(path)!r} is {size} bytes but {MANIFEST} lists {expected_bytes}: the shard is truncated "
                    "or was replaced (checksum check failed). Restore the file, or write the cache again."
                )
            self.footer = self._read_footer(file.fileno(), size)
        self.frames: list[dict[str, Any]] = self.footer["frames"]
        self.rows = int(self.footer["rows"])

    def _read_footer(self, fd: int, size: int) -> dict[str, Any]:
        damaged = f"{str(self.path)!r} is not a complete shard of an activation cache"
        if size < len(MAGIC) + _TRAILER.size or os.pread(fd, len(MAGIC), 0) != MAGIC:
            raise ValueError(f"{damaged} (no shard header); it is truncated or damaged")
        length, end = _TRAILER.unpack(os.pread(fd, _TRAILER.size, size - _TRAILER.size))
        if end != END_MAGIC or length > size - _TRAILER.size - len(MAGIC):
            raise ValueError(f"{damaged} (no footer); it is truncated or damaged")
        try:
            footer = json.loads(os.pread(fd, length, size - _TRAILER.size - length))
            frames = footer["frames"]
            if sum(frame["rows"] for frame in frames) != footer["rows"]:
                raise ValueError("the frames' rows do not add up")
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as error:
            raise ValueError(f"{damaged} (its footer does not parse: {error}); it is damaged") from None
        return footer

    def decode(self, frame: int, parts: Sequence[int], columns: Sequence[Column], shuffle: bool) -> list[np.ndarray]:
        """The columns `parts` (indices into the shard's columns) of one frame, as row bytes
        [rows, row_bytes] each (`as_tensor`); a damaged part raises ValueError naming the
        file. Thread-safe."""
        import zstandard

        rows = self.frames[frame]["rows"]
        out = []
        with open(self.path, "rb") as file:
            for index in parts:
                offset, length = self.frames[frame]["parts"][index]
                data = os.pread(file.fileno(), length, offset)
                try:
                    if len(data) != length:
                        raise zstandard.ZstdError("the file ends inside the part (truncated)")
                    out.append(decode_part(data, columns[index], rows, shuffle))
                except zstandard.ZstdError as error:
                    raise ValueError(
                        f"{str(self.path)!r}, frame {frame}, column {columns[index].name!r} is damaged ({error}): "
                        "its checksum does not match what was written. Restore the file, or write the cache again."
                    ) from None
        return out


def read_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """The manifest of the cache in folder `path`; clear errors when there is none or it is not one."""
    path = Path(path)
    file = path / MANIFEST
    if not file.exists():
        hint = "it is a file" if path.is_file() else ("it does not exist" if not path.exists() else
                                                      f"it has no {MANIFEST}")
        raise FileNotFoundError(f"{str(path)!r} is not an activation cache ({hint}); write one with "
                                "cache_activations(data, model, sites, path, n_tokens)")
    manifest = read_json_object(file, "cache manifest")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{str(file)!r} is not the manifest of an activation cache of this version "
                         f"(format {manifest.get('format')!r}, expected {FORMAT!r})")
    return manifest


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
