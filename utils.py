"""Small helpers: atomic file writes, state-dict loading, and text data streams."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

# ---------------------------------------------------------------------------------------------
# Atomic writes: write to a temp file in the target folder, fsync, then rename over the target.
# A crash mid-write leaves the previous file (or nothing), never a truncated one.
# ---------------------------------------------------------------------------------------------


def _atomic_write(path: str | os.PathLike, write_fn) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)`, atomically."""
    return _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, default=_json_default).encode()
    return _atomic_write(path, lambda f: f.write(data))


def _json_default(obj):
    if isinstance(obj, (torch.dtype, torch.device)):
        return str(obj)
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, type):
        return obj.__name__
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from a `.pt`/`.pth` (torch.save, weights only) or `.safetensors` file.

    Errors name the file and say what was expected.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"dictionary file not found: {str(path)!r}. Pass the path to an 'ae.pt' or "
            "'.safetensors' file (see pretrained_dictionary_downloader.sh for the published ones)."
        )
    if path.is_dir():
        raise IsADirectoryError(
            f"{str(path)!r} is a folder; pass the weights file inside it (e.g. {str(path / 'ae.pt')!r}),"
            " or use dictionary_learning.load_dictionary(folder) to load a folder with its config.json."
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises several error types
            raise ValueError(f"could not read {str(path)!r} as a safetensors file: {e}") from e
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(
                f"could not read {str(path)!r} as a torch state_dict (torch.load with "
                f"weights_only=True failed: {type(e).__name__}: {e}). The file may be truncated "
                "or not a dictionary checkpoint; re-download or re-save it."
            ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(
            f"{str(path)!r} does not hold a state_dict (a mapping of names to tensors); "
            f"found {type(state).__name__}."
        )
    return state


# ---------------------------------------------------------------------------------------------
# Loading saved dictionaries: our training folders, saprmarks/dictionary_learning folders (same
# layout: ae.pt + config.json with trainer.dict_class, checkpoints/ae_STEP.pt) and SAELens folders.
# ---------------------------------------------------------------------------------------------


def _read_config(path: Path) -> dict:
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); the folder's config.json is damaged") from None
    if not isinstance(config, dict):
        raise ValueError(f"{str(path)!r} holds a {type(config).__name__}; expected a JSON object")
    return config


def _dictionary_files(path: Path) -> tuple[Path, Path]:
    """(weights file, config.json) for a trainer folder, its ae.pt, or one of its checkpoints."""
    if path.is_dir():
        config_path, weights = path / "config.json", path / "ae.pt"
        if not config_path.exists():
            raise FileNotFoundError(
                f"{str(path)!r} has no config.json: pass a trainer folder (one holding ae.pt and "
                "config.json; a sweep's save_dir holds trainer_0, trainer_1, ...)"
                + (f"; found {', '.join(sorted(p.name for p in path.iterdir()))}" if any(path.iterdir()) else "")
            )
        if not weights.exists():
            checkpoints = sorted((path / "checkpoints").glob("ae_*.pt")) if (path / "checkpoints").is_dir() else []
            hint = (
                f"; the run may be unfinished: pass one of its checkpoints, e.g. {str(checkpoints[-1])!r}"
                if checkpoints else ""
            )
            raise FileNotFoundError(f"{str(path)!r} has no ae.pt{hint}")
        return weights, config_path
    if not path.exists():
        raise FileNotFoundError(f"{str(path)!r} does not exist; pass a trainer folder or its ae.pt")
    folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    config_path = folder / "config.json"
    if not config_path.exists():
        raise FileNotFoundError(
            f"no config.json next to {str(path)!r} (looked in {str(folder)!r}); load the bare "
            "weights with <DictionaryClass>.from_pretrained(path) instead"
        )
    return path, config_path


def load_dictionary(
    path: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    normalize_decoder: bool = True,
):
    """Load a saved dictionary and its config: returns (dictionary, config).

    `path`: a trainer folder (`ae.pt` + `config.json`, as written by trainSAE or by
    saprmarks/dictionary_learning), its `ae.pt`, a checkpoint `checkpoints/ae_STEP.pt` (read with
    the folder's config.json), or a SAELens folder (`cfg.json` + `sae_weights.safetensors`).
    The class is `config["trainer"]["dict_class"]` (guessed from the weights when absent).
    `normalize_decoder`: an AutoEncoder whose decoder columns are not unit-norm has the norms
    moved into its encoder (same x̂, comparable feature magnitudes), as the reference loader does.
    """
    from .interop import SAELENS_CONFIG_FILE, dictionary_from_reference, infer_dict_class, load_saelens

    path = Path(path)
    if path.is_dir() and (path / SAELENS_CONFIG_FILE).exists() and not (path / "config.json").exists():
        return load_saelens(path, device=device, dtype=dtype)
    weights, config_path = _dictionary_files(path)
    config = _read_config(config_path)
    trainer_config = config.get("trainer")
    if not isinstance(trainer_config, dict):
        trainer_config = {}
    state_dict = load_state_dict(weights)
    dict_class = trainer_config.get("dict_class") or infer_dict_class(state_dict, trainer_config.get("trainer_class"))
    try:
        dictionary = dictionary_from_reference(dict_class, state_dict, trainer_config, normalize_decoder)
    except ValueError as e:
        raise ValueError(f"cannot load {str(weights)!r} as {dict_class} (from {str(config_path)!r}): {e}") from None
    if device is not None or dtype is not None:
        dictionary = dictionary.to(device=device, dtype=dtype)
    return dictionary, config


def get_nested_folders(path: str | os.PathLike) -> list[str]:
    """Every folder under `path` (itself included) that holds an `ae.pt`, sorted."""
    return sorted(root for root, _, files in os.walk(path) if "ae.pt" in files)


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
