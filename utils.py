"""Small helpers: text data streams for ActivationBuffer, the CPU allocator setting for training
processes, and the reference library's loading names (`load_dictionary`, `get_nested_folders`, which
live in interop.py).
"""
from __future__ import annotations

import ctypes
import json
import os
import sys
from pathlib import Path
from typing import Any

from .interop import get_nested_folders, load_dictionary

__all__ = ["hf_dataset_to_generator", "zst_to_generator", "keep_freed_cpu_memory", "load_dictionary",
           "get_nested_folders"]


# ---------------------------------------------------------------------------------------------
# The CPU allocator of a training process
# ---------------------------------------------------------------------------------------------

_freed_memory_kept = False


def keep_freed_cpu_memory() -> bool:
    """Make glibc keep freed blocks for reuse instead of returning them to the OS; returns whether
    that is in effect for this process. Process-wide and irreversible, so the library never calls
    it by itself: training scripts may (the demo does, and the benchmarks).

    PyTorch has no caching allocator on CPU, and glibc serves every block above its mmap threshold
    (at most 32 MiB) with a fresh `mmap`: each [B, F] temporary of a training step then costs one
    page fault per 4 KiB touched. `mallopt(M_MMAP_MAX, 0)` and a maximal `M_TRIM_THRESHOLD` make
    those blocks come from the heap and stay there, so the next step reuses the same pages; the
    heap keeps its peak size, which a training process reaches every step anyway (measured effect:
    benchmarks/README.md). Skipped (False) off glibc, when the user tunes malloc through MALLOC_*
    or GLIBC_TUNABLES, preloads another allocator, or sets DICTIONARY_LEARNING_KEEP_FREED_MEMORY=0.
    """
    global _freed_memory_kept
    if _freed_memory_kept:
        return True
    if (not sys.platform.startswith("linux") or os.environ.get("DICTIONARY_LEARNING_KEEP_FREED_MEMORY") == "0"
            or "GLIBC_TUNABLES" in os.environ or "LD_PRELOAD" in os.environ
            or any(name.startswith("MALLOC_") for name in os.environ)):
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # glibc only: musl's mallopt is a no-op
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # <malloc.h>
    _freed_memory_kept = mallopt(m_mmap_max, 0) == 1 and mallopt(m_trim_threshold, 2**31 - 1) == 1
    return _freed_memory_kept


# ---------------------------------------------------------------------------------------------
# Text data streams: iterators of strings for ActivationBuffer.
# ---------------------------------------------------------------------------------------------

ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"  # first four bytes of every zstd frame


def hf_dataset_to_generator(
    name: str,
    split: str = "train",
    streaming: bool = True,
    text_field: str = "text",
    config_name: str | None = None,
    **load_kwargs: Any,
):
    """Yield the `text_field` string of every record of a Hugging Face dataset, in order.

    `datasets.load_dataset(name, config_name, split=split, streaming=streaming, **load_kwargs)`
    (streamed by default, so nothing is downloaded up front). Local files work too:
    `hf_dataset_to_generator("json", data_files="shard.jsonl")`.
    """
    import datasets

    dataset = datasets.load_dataset(name, config_name, split=split, streaming=streaming, **load_kwargs)
    return _texts_of_records(dataset, text_field, source=f"dataset {name!r}")


def _texts_of_records(records, text_field: str, source: str):
    for index, record in enumerate(records):
        if text_field not in record:
            raise KeyError(
                f"{source}: record {index} has no field {text_field!r}; its fields are "
                f"{sorted(record)}. Pass text_field=<one of them>."
            )
        text = record[text_field]
        if not isinstance(text, str):
            raise TypeError(
                f"{source}: field {text_field!r} of record {index} is a {type(text).__name__}, not a "
                "string; pass the text_field that holds the text."
            )
        yield text


def zst_to_generator(path: str | os.PathLike, text_field: str = "text", chunk_bytes: int = 1 << 20):
    """Yield the `text_field` of each JSON line of a `.jsonl.zst` file (e.g. a Pile shard).

    Decompresses as it goes (`chunk_bytes` of compressed input at a time; concatenated zstd
    frames are fine) and closes the file when the generator finishes or is closed. Lines that
    are not JSON objects with a string `text_field` are skipped and counted; one warning reports
    the count at the end. A file that is not zstd fails at once; a truncated or corrupt one
    raises ValueError once the lines before the damage have been yielded.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {str(path)!r} (expected a .jsonl.zst file).")
    with open(path, "rb") as file:
        magic = file.read(4)
    if magic != ZSTD_MAGIC:
        raise ValueError(
            f"{str(path)!r} is not a zstd-compressed file (it starts with {magic!r}); expected a "
            ".jsonl.zst file such as a Pile shard. For plain JSON lines use "
            "hf_dataset_to_generator('json', data_files=path)."
        )
    return _zst_texts(path, text_field, chunk_bytes)


def _zst_texts(path: Path, text_field: str, chunk_bytes: int):
    import warnings

    import zstandard

    skipped, first_skipped, line_number = 0, None, 0
    try:
        for line_number, line in enumerate(_zst_lines(path, chunk_bytes, zstandard), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                text = record[text_field] if isinstance(record, dict) else None
            except (ValueError, KeyError):  # bad JSON (or UTF-8), or no such field
                text = None
            if not isinstance(text, str):
                skipped += 1
                first_skipped = first_skipped or line_number
                continue
            yield text
    except zstandard.ZstdError as error:
        raise ValueError(f"{str(path)!r} is corrupt after line {line_number}: {error}") from error
    finally:
        if skipped:
            warnings.warn(
                f"zst_to_generator skipped {skipped} malformed line(s) of {str(path)!r} (not a JSON "
                f"object with a string {text_field!r} field; first at line {first_skipped})."
            )


def _zst_lines(path: Path, chunk_bytes: int, zstandard):
    """The lines (bytes, newline stripped) of a zstd file; ValueError if it ends mid-frame."""
    with open(path, "rb") as file:
        decompressor = zstandard.ZstdDecompressor().decompressobj()
        pending = b""  # the start of a line whose end is not decompressed yet
        frame_done = False
        while chunk := file.read(chunk_bytes):
            data = b""
            while chunk:
                if frame_done:  # another frame follows
                    decompressor = zstandard.ZstdDecompressor().decompressobj()
                data += decompressor.decompress(chunk)
                frame_done = decompressor.eof
                chunk = decompressor.unused_data if frame_done else b""
            *lines, pending = (pending + data).split(b"\n")
            yield from lines
        if not frame_done:
            raise ValueError(
                f"{str(path)!r} is truncated (the compressed data ends mid-frame, after "
                f"{file.tell()} bytes); re-download or re-copy the file."
            )
        if pending:
            yield pending
