"""Reading and writing files safely: atomic writes with the user's umask, and loads that never
execute code (state dicts through `torch.load(weights_only=True)` or safetensors).

Every file the library writes goes through `atomic_write`: the content goes to a temporary file in
the target folder, is flushed to disk, and the temporary file is renamed over the target, so a crash
leaves the previous file (or none), never a truncated one. The file gets the permissions the user's
umask gives a new file (the temporary file is created with mode 0o666, which the kernel masks).
"""
from __future__ import annotations

import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

__all__ = ["atomic_write", "atomic_torch_save", "atomic_write_json", "json_default", "read_json_object",
           "load_state_dict", "remove_temporary_files"]


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> Path:
    """Create or replace `path` atomically: `write(file)` fills a temporary file in the same folder,
    which is flushed to disk and renamed over `path`. Bytes: `atomic_write(path, lambda f: f.write(data))`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            with os.fdopen(fd, "wb") as file:
                recording = _WriteErrorRecorder(file)
                try:
                    write(recording)
                except BaseException as error:
                    raise recording.error or error
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
    except OSError as error:
        if _disk_full(error):
            raise OSError(errno.ENOSPC, f"no space left on the device writing {str(path)!r}; the previous version "
                          "of the file (if any) is intact. Free some space (or pass another save_dir) and "
                          "resume") from None
        raise
    return path


TEMPORARY_FILE = re.compile(r"^\..+\.[0-9a-f]{12}\.tmp$")
"""The names `atomic_write` gives its temporary files (left behind only by a killed process)."""


def remove_temporary_files(folder: str | os.PathLike) -> int:
    """Delete the temporary files a killed `atomic_write` left in `folder`; returns how many. Call it
    only while no other process writes there (trainSAE holds the run folder's lock)."""
    removed = 0
    for entry in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if entry.is_file() and TEMPORARY_FILE.match(entry.name):
            entry.unlink(missing_ok=True)
            removed += 1
    return removed


class _WriteErrorRecorder:
    """A file that remembers the OSError of a failed write: torch.save's zip writer reports one only
    as 'unexpected pos', which would hide a full disk."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def _disk_full(error: BaseException) -> bool:
    return isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT)


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """`torch.save(obj, path)`, atomically."""
    return atomic_write(path, lambda file: torch.save(obj, file))


def json_default(obj: Any) -> Any:
    """JSON encoding of the values configs hold besides plain JSON: dtypes, devices, paths, classes
    and 0-d tensors or numpy scalars."""
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    if isinstance(obj, type):
        return obj.__name__
    if hasattr(obj, "item") and callable(obj.item):
        return obj.item()
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def atomic_write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write `obj` as indented JSON, atomically."""
    data = json.dumps(obj, indent=2, default=json_default).encode()
    return atomic_write(path, lambda file: file.write(data))


def read_json_object(path: str | os.PathLike, what: str = "file") -> dict:
    """The JSON object in `path`; ValueError naming the file when it is not valid JSON or not an object."""
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(path)!r} is not valid JSON ({e}); the {what} is damaged") from None
    if not isinstance(value, dict):
        raise ValueError(f"{str(path)!r} holds a {type(value).__name__}; expected a JSON object")
    return value


def load_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a `.pt`/`.pth` file (torch.save; read with weights_only=True, so no code in
    the file runs) or a `.safetensors` file. Errors name the file and say what was expected."""
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
