"""The reference library's attribute names for our dictionaries' tensors, as views.

saprmarks/dictionary_learning keeps weights in `nn.Linear` layers (`ae.encoder.weight` [F, D],
`ae.encoder.bias`, `ae.decoder.weight` [D, F]) and in loose parameters (`ae.bias`,
`ae.decoder_bias`, `ae.gate_bias`, `ae.mag_bias`). Our classes hold W_enc [D, F], ... and save them
under the reference's keys (`Dictionary.saved_as`); the same table gives the attribute names:

    saved key "encoder.weight" (transposed)  ->  ae.encoder.weight  = W_encᵀ, a view
    saved key "encoder.bias"                 ->  ae.encoder.bias    = b_enc, the parameter itself
    saved key "bias"                         ->  ae.bias            = b_dec, the parameter itself

Nothing is stored twice. Reading gives the parameters or views of them (gradients flow, in-place
writes land in the parameters); assigning (`ae.encoder.weight = w`, `ae.encoder.weight.data = w`,
`ae.bias = b`) copies the value into the parameter, after checking its shape. `ae.encoder(x)`
computes x Wᵀ + b as the reference's layer does.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn.functional as F

__all__ = ["ParameterView", "LinearView", "reference_attributes", "assign"]


def assign(module: torch.nn.Module, name: str, value: Any, transposed: bool = False, alias: str = "") -> None:
    """Copy `value` (transposed if `transposed`) into `module.<name>` in place, without autograd.
    Raises ValueError naming `alias` (the reference's name) when the shape does not fit."""
    target = getattr(module, name)
    value = torch.as_tensor(value)
    value = value.T if transposed else value
    if value.shape != target.shape:
        expected = tuple(target.T.shape if transposed else target.shape)
        raise ValueError(f"{alias or name} must have shape {expected} (it is {name}{'ᵀ' if transposed else ''}); "
                         f"got {tuple(value.T.shape if transposed else value.shape)}")
    with torch.no_grad():
        target.copy_(value)


class ParameterView(torch.Tensor):
    """A view of a parameter (W_enc or W_dec, transposed) whose `.data = value` assignment copies the
    value into the parameter, as the reference's code and tests set weights that way."""

    __torch_function__ = torch._C._disabled_torch_function_impl  # results of operations are plain tensors

    @classmethod
    def of(cls, module: torch.nn.Module, name: str, alias: str) -> "ParameterView":
        view = getattr(module, name).T.as_subclass(cls)
        view._owner, view._name, view._alias = module, name, alias
        return view

    @property
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        assign(self._owner, self._name, value, transposed=True, alias=self._alias)


class LinearView:
    """`ae.encoder` / `ae.decoder`: the reference's `nn.Linear` over our tensors. `weight` is
    `weight_name`ᵀ ([out, in]) and `bias` the parameter `bias_name` (None when there is none)."""

    def __init__(self, module: torch.nn.Module, prefix: str, weight_name: str, bias_name: str | None):
        object.__setattr__(self, "_fields", (module, prefix, weight_name, bias_name))

    @property
    def weight(self) -> ParameterView:
        module, prefix, weight_name, _ = self._fields
        return ParameterView.of(module, weight_name, f"{prefix}.weight")

    @weight.setter
    def weight(self, value: Any) -> None:
        module, prefix, weight_name, _ = self._fields
        assign(module, weight_name, value, transposed=True, alias=f"{prefix}.weight")

    @property
    def bias(self) -> torch.nn.Parameter | None:
        module, _, _, bias_name = self._fields
        return getattr(module, bias_name) if bias_name else None

    @bias.setter
    def bias(self, value: Any) -> None:
        module, prefix, _, bias_name = self._fields
        if bias_name is None:
            raise AttributeError(f"the reference's {prefix} has no bias")
        assign(module, bias_name, value, alias=f"{prefix}.bias")

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x Wᵀ + b, [..., out_features]."""
        return F.linear(x, self.weight, self.bias)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in ("weight", "bias"):
            raise AttributeError(f"the reference's {self._fields[1]} has only 'weight' and 'bias'")
        object.__setattr__(self, name, value)


def reference_attributes(saved_as: Mapping[str, Any]) -> dict[str, Any]:
    """The reference's attribute names of a class whose tensors are saved as `saved_as` (tensor
    name -> SavedAs(key, transposed)): {"encoder": {"weight": "W_enc", "bias": "b_enc"}, "bias":
    "b_dec", ...}: a dict for an `nn.Linear` layer (prefix of a dotted key), a tensor name for a
    loose parameter. Only transposed weights and their biases make layers."""
    attributes: dict[str, Any] = {}
    for name, saved in saved_as.items():
        if "." in saved.key:
            prefix, field = saved.key.split(".", 1)
            attributes.setdefault(prefix, {"weight": None, "bias": None})[field] = name
        else:
            attributes[saved.key] = name
    return attributes
