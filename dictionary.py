"""Dictionaries (sparse autoencoders): f = encode(x), x̂ = decode(f).

Every dictionary class of the library lives in this file. Each one is an `nn.Module` with
`encode`, `decode`, `forward(x, output_features=False)`, `activation_dim`, `dict_size`, and
`from_pretrained(path, dtype=None, device=None)`. Inputs may be [B, D] or [B, L, D]; every
operation acts on the last dimension.
"""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

import torch
import torch.nn as nn
import torch.nn.functional as F

from .utils import load_state_dict


class Dictionary(nn.Module, ABC):
    """Base class: a map between activations x ∈ R^D and features f ∈ R^F."""

    activation_dim: int
    dict_size: int

    @abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] -> f [..., F]"""

    @abstractmethod
    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f [..., F] -> x̂ [..., D]"""

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """x̂ = decode(encode(x)); with `output_features`, returns (x̂, f)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f) if output_features else x_hat

    def scale_biases(self, factor: float) -> None:
        """Multiply every bias and threshold by `factor` (in place).

        A dictionary trained on inputs s·x becomes, after `scale_biases(1/s)`, one that takes raw x
        and returns x̂/s·s = the raw-space reconstruction (its features are scaled by 1/s). Used to
        fold activation normalisation into saved weights.
        """
        raise NotImplementedError(f"{type(self).__name__} does not implement scale_biases")

    @classmethod
    def shape_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict:
        """Constructor arguments (activation_dim, dict_size, ...) read off the weights' shapes."""
        raise NotImplementedError

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> "Dictionary":
        """Build a dictionary whose shapes are inferred from `state_dict` and load the weights.

        Raises ValueError naming the missing, unexpected or mis-shaped keys.
        """
        try:
            init_args = cls.shape_from_state_dict(state_dict)
        except KeyError as e:
            raise ValueError(
                f"not a {cls.__name__} state_dict: key {e.args[0]!r} is missing "
                f"(found keys: {sorted(state_dict)})"
            ) from None
        init_args.update(kwargs)
        with torch.device("meta"):
            dictionary = cls(**init_args)
        expected = dictionary.state_dict()
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"not a {cls.__name__} state_dict: missing keys {missing}, unexpected keys "
                f"{unexpected}; a {cls.__name__} has keys {sorted(expected)}"
            )
        wrong_shapes = [
            f"{k}: expected {tuple(v.shape)}, found {tuple(state_dict[k].shape)}"
            for k, v in expected.items()
            if v.shape != state_dict[k].shape
        ]
        if wrong_shapes:
            raise ValueError(f"{cls.__name__} weights have inconsistent shapes: {'; '.join(wrong_shapes)}")
        dictionary.load_state_dict(state_dict, assign=True)
        return dictionary

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        **kwargs,
    ) -> "Dictionary":
        """Load a dictionary from a `.pt` state_dict (torch.save) or a `.safetensors` file.

        Shapes are inferred from the weights. `dtype` casts floating-point tensors; `device` moves
        them; either works alone.
        """
        state_dict = load_state_dict(path)
        try:
            dictionary = cls.from_state_dict(state_dict, **kwargs)
        except ValueError as e:
            raise ValueError(f"cannot load {str(path)!r} as {cls.__name__}: {e}") from None
        if dtype is not None or device is not None:
            dictionary = dictionary.to(device=device, dtype=dtype)
        return dictionary


def _unit_norm_columns(weight: torch.Tensor) -> torch.Tensor:
    """weight [D, F] with each column scaled to unit L2 norm."""
    return weight / weight.norm(dim=0, keepdim=True).clamp_min(1e-12)


class AutoEncoder(Dictionary):
    """The standard one-layer SAE (Towards Monosemanticity):

        f = ReLU(W_enc (x − b_dec) + b_enc),   x̂ = W_dec f + b_dec

    State-dict keys (compatible with the published Pythia-70m dictionaries):
    `bias` = b_dec [D], `encoder.weight` = W_enc [F, D], `encoder.bias` = b_enc [F],
    `decoder.weight` = W_dec [D, F]. Decoder columns start unit-norm and W_enc starts as W_decᵀ.
    """

    def __init__(self, activation_dim: int, dict_size: int):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.bias = nn.Parameter(torch.zeros(activation_dim))
        self.encoder = nn.Linear(activation_dim, dict_size, bias=True)
        self.decoder = nn.Linear(dict_size, activation_dim, bias=False)
        if self.bias.device.type != "meta":
            with torch.no_grad():
                self.decoder.weight.copy_(_unit_norm_columns(torch.randn(activation_dim, dict_size)))
                self.encoder.weight.copy_(self.decoder.weight.T)
                self.encoder.bias.zero_()

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """W_enc (x − b_dec) + b_enc, [..., F]"""
        return self.encoder(x - self.bias)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.pre_activations(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self.decoder(f) + self.bias

    def ghost_reconstruction(self, x: torch.Tensor, ghost_mask: torch.Tensor) -> torch.Tensor:
        """W_dec[:, dead] exp(W_enc[dead] (x − b_dec) + b_enc[dead]), [..., D].

        Only the latents in `ghost_mask` [F] (bool) take part, so gradients through this output reach
        only their encoder rows, encoder biases and decoder columns (b_dec is held fixed here).
        """
        dead = ghost_mask.nonzero().squeeze(-1)
        pre = F.linear(x - self.bias.detach(), self.encoder.weight[dead], self.encoder.bias[dead])
        return F.linear(torch.exp(pre), self.decoder.weight[:, dead])

    def forward(self, x: torch.Tensor, output_features: bool = False, ghost_mask: torch.Tensor | None = None):
        """x̂ (and f with `output_features`). With `ghost_mask` [F] (bool), also the ghost
        reconstruction of the masked latents: returns (x̂, x̂_ghost) or (x̂, x̂_ghost, f)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        if ghost_mask is None:
            return (x_hat, f) if output_features else x_hat
        x_ghost = self.ghost_reconstruction(x, ghost_mask)
        return (x_hat, x_ghost, f) if output_features else (x_hat, x_ghost)

    def scale_biases(self, factor: float) -> None:
        with torch.no_grad():
            self.bias.mul_(factor)
            self.encoder.bias.mul_(factor)

    @classmethod
    def shape_from_state_dict(cls, state_dict):
        dict_size, activation_dim = state_dict["encoder.weight"].shape
        return {"activation_dim": activation_dim, "dict_size": dict_size}


class IdentityDict(Dictionary):
    """The no-op dictionary f = x, x̂ = f: the baseline for evaluation (it recovers everything)."""

    def __init__(self, activation_dim: int):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = activation_dim

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return f

    def scale_biases(self, factor: float) -> None:
        pass

    @classmethod
    def from_pretrained(cls, path=None, dtype=None, device=None, activation_dim: int | None = None):
        if activation_dim is None:
            raise ValueError("IdentityDict has no weights to load; construct it with IdentityDict(activation_dim)")
        return cls(activation_dim)
