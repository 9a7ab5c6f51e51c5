"""Argument checks shared across the library: each turns a value the user passed into what the
library needs, or raises an error naming the argument and the fix."""
from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_device", "as_dtype"]


def check_device(device: Any, what: str = "device") -> torch.device:
    """`device` as a torch.device that this machine has; ValueError naming `what` otherwise."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{what}={device!r} is not a device; pass e.g. 'cpu' or 'cuda:0'") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what}={device!r} but CUDA is not available (this torch has no CUDA, or no GPU is "
                             "visible); pass device='cpu'")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ValueError(f"{what}={device!r} but only {torch.cuda.device_count()} GPU(s) are visible")
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{what}={device!r} but MPS is not available; pass device='cpu'")
    return parsed


def as_dtype(value: Any, what: str = "dtype") -> torch.dtype | None:
    """A floating torch.dtype from a torch.dtype or its name ("float16", "torch.bfloat16", "bf16",
    "fp32"); None stays None. ValueError naming `what` otherwise."""
    if value is None or isinstance(value, torch.dtype) and value.is_floating_point:
        return value
    if isinstance(value, str):
        name = value.removeprefix("torch.")
        name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
                "float": "float32", "fp64": "float64", "double": "float64"}.get(name, name)
        dtype = getattr(torch, name, None)
        if isinstance(dtype, torch.dtype) and dtype.is_floating_point:
            return dtype
    raise ValueError(f"{what}={value!r} is not a floating dtype; pass e.g. torch.bfloat16 or 'float32'")
