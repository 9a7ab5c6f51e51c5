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
