"""The reference library's raw-PyTorch buffer under its own name:
`from dictionary_learning.pytorch_buffer import ActivationBuffer`.

It is this library's ActivationBuffer on a plain `transformers` model (forward hooks that stop the
pass after the submodule, no nnsight; sites.py), with the reference's constructor: positional
(data, model, submodule, d_submodule, io, n_ctxs, ctx_len, refresh_batch_size, out_batch_size,
device, remove_bos, add_special_tokens), and the tokenizer loaded from `model.name_or_path` unless
given. Batches, shuffling and storage are the main buffer's.
"""
from __future__ import annotations

from typing import Any, Iterable

import torch

from . import buffer

__all__ = ["ActivationBuffer"]


class ActivationBuffer(buffer.ActivationBuffer):
    """`buffer.ActivationBuffer` on a plain torch model, constructed as the reference's
    `pytorch_buffer.ActivationBuffer` is (see the module docstring)."""

    def __init__(
        self,
        data: Iterable[str],
        model: torch.nn.Module,
        submodule: Any,
        d_submodule: int | None = None,
        io: str = "out",
        n_ctxs: int | float = 3e4,
        ctx_len: int = 128,
        refresh_batch_size: int = 512,
        out_batch_size: int = 8192,
        device: str | torch.device = "cpu",
        remove_bos: bool = False,
        add_special_tokens: bool = True,
        max_activation_norm_multiple: float | None = None,
        *,
        tokenizer: Any = None,
        dtype: torch.dtype | None = None,
        seed: int | None = None,
    ):
        if max_activation_norm_multiple is not None:
            raise ValueError(
                "max_activation_norm_multiple (dropping activations whose norm exceeds a multiple of the median) "
                "is not supported; pass None"
            )
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        super().__init__(data, model, submodule, d_submodule=d_submodule, io=io, n_ctxs=n_ctxs, ctx_len=ctx_len,
                         refresh_batch_size=refresh_batch_size, out_batch_size=out_batch_size, device=device,
                         dtype=dtype, remove_bos=remove_bos, seed=seed, tokenizer=tokenizer,
                         add_special_tokens=add_special_tokens)
