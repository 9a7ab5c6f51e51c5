"""Dictionaries (sparse autoencoders): f = encode(x), x̂ = decode(f).

Every dictionary holds its weights in one layout, that of SAELens and SAEBench:

    W_enc [D, F]   the encoder, one column per latent        b_enc [F]   encoder bias
    W_dec [F, D]   the decoder, one direction per row        b_dec [D]   decoder bias

plus what its architecture adds (the gated SAE's b_gate, b_mag, r_mag; thresholds; k). Each class
is an `nn.Module` with `encode`, `decode`, `forward(x, output_features=False)`, `activation_dim`,
`dict_size`, `scale_biases` and `from_pretrained(path, dtype=None, device=None)`. Inputs may be
[B, D] or [B, L, D]; every operation acts on the last dimension.

State dicts keep the key names of the published and reference files (`ae.pt` of the Pythia-70m
dictionaries: `encoder.weight` [F, D], `bias`, ...): each class declares in `saved_as` which of its
tensors are saved under another name, and whether transposed; saving and loading map them. Every
saved tensor is exactly the trained one, so save → load is bit for bit.

What an architecture is besides its class (its recipes, its SAELens name, the reference's class
names) is declared once, in registry.py.

What other libraries read off a dictionary is there too: the reference's attribute names
(`ae.encoder.weight`, `ae.bias`, ...: views of the same parameters, reference_names.py), and what
SAEBench needs, `device`, `dtype` (both follow `.to()`) and `cfg` (saebench.py).
"""
from __future__ import annotations

import functools
import os
from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .checks import as_dtype
from .files import load_state_dict
from .hub import fetch_weights, is_hub_path
from .kernels import GatedEncode, SparseCodes
from .reference_names import LinearView, assign, reference_attributes
from .saebench import DictionaryConfig

__all__ = ["Dictionary", "AutoEncoder", "IdentityDict", "GatedAutoEncoder", "AutoEncoderTopK", "BatchTopKSAE",
           "MatryoshkaBatchTopKSAE", "JumpReluAutoEncoder", "Transcoder", "TopKTranscoder", "JumpReluTranscoder",
           "AutoEncoderNew", "AbsTopKSAE", "SavedAs"]


class SavedAs(NamedTuple):
    """How a tensor appears in saved state dicts: under `key`, transposed if `transposed`."""

    key: str
    transposed: bool = False


class Dictionary(nn.Module, ABC):
    """Base class: a map between activations x ∈ R^D and features f ∈ R^F."""

    activation_dim: int
    dict_size: int
    # tensor name -> its key in saved state dicts, for the tensors whose names differ there
    saved_as: ClassVar[dict[str, SavedAs]] = {}
    # the tensors that scale with the input (biases, thresholds): see scale_biases
    scales_with_input: ClassVar[tuple[str, ...]] = ()
    # the class's entry in registry.py (set there); it names the class's SAELens architecture for `cfg`
    architecture_entry: ClassVar = None
    # whether it reconstructs another activation than it reads (a module's output from its input)
    is_transcoder: ClassVar[bool] = False

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

    @torch.no_grad()
    def scale_biases(self, factor: float) -> None:
        """Multiply every bias and threshold by `factor` > 0 (in place).

        A dictionary trained on inputs s·x becomes, after `scale_biases(1/s)`, one that takes raw x
        and returns the raw-space reconstruction (its features are scaled by 1/s): every tensor
        that scales with the input (`scales_with_input`) is multiplied, the weights are not.
        """
        if not factor > 0:
            raise ValueError(f"scale_biases: factor must be positive (thresholds scale with it), got {factor}")
        for name in self.scales_with_input:
            getattr(self, name).mul_(factor)

    # -- what SAEBench reads: device, dtype and cfg ---------------------------------------------
    @property
    def device(self) -> torch.device:
        """Where the weights are (follows `.to()`)."""
        tensor = next(self.parameters(), None)
        return tensor.device if tensor is not None else torch.device(self.__dict__.get("_device") or "cpu")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the weights (follows `.to()`)."""
        tensor = next(self.parameters(), None)
        return tensor.dtype if tensor is not None else (self.__dict__.get("_dtype") or torch.get_default_dtype())

    @property
    def cfg(self) -> DictionaryConfig:
        """SAEBench's cfg (saebench.py): the shapes and architecture, and, for a dictionary from
        `load_dictionary`, the model, hook point, layer and context size of its run folder."""
        cfg = self.__dict__.get("_cfg")
        if cfg is None:
            cfg = self.__dict__["_cfg"] = self.default_cfg()
        return cfg

    @cfg.setter
    def cfg(self, value: DictionaryConfig) -> None:
        self.__dict__["_cfg"] = value

    def default_cfg(self) -> DictionaryConfig:
        """The cfg of this dictionary with nothing known of where its inputs come from."""
        entry = type(self).architecture_entry
        fields = entry.saelens_fields(self) if entry is not None else {}
        cfg = DictionaryConfig(model_name="", d_in=self.activation_dim, d_sae=self.dict_size, hook_layer=None,
                               hook_name="", d_out=self.output_dim if self.is_transcoder else None, **fields)
        cfg.follow(self.dtype, self.device)
        return cfg

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        if "_cfg" in self.__dict__:
            self._cfg.follow(self.dtype, self.device)
        return module

    # -- the reference library's attribute names: views of the same tensors ----------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            target = _reference_names(type(self)).get(name)
            if target is None:
                raise
        if isinstance(target, dict):
            return LinearView(self, name, target["weight"], target["bias"])
        return getattr(self, target)

    def __setattr__(self, name: str, value) -> None:
        target = _reference_names(type(self)).get(name)
        if target is None:
            super().__setattr__(name, value)
        elif isinstance(target, dict):
            raise AttributeError(f"{name} is the reference library's view of {target['weight']} (and its bias); "
                                 f"set {name}.weight or {name}.bias instead")
        else:
            assign(self, target, value, alias=name)

    # -- the weights every architecture has, and the tied initialisation it starts from --------
    def _create_weights(self, activation_dim: int, dict_size: int, per_latent: tuple[str, ...] = ("b_enc",)) -> None:
        """W_enc [D, F], the zero per-latent vectors `per_latent` [F] (encoder biases), W_dec [F, D]
        and b_dec [D], registered in that order."""
        self.activation_dim = activation_dim
        self.dict_size = dict_size
        self.W_enc = _parameter(activation_dim, dict_size)
        for name in per_latent:
            setattr(self, name, _parameter(dict_size))
        self.W_dec = _parameter(dict_size, activation_dim)
        self.b_dec = _parameter(activation_dim)

    @torch.no_grad()
    def _init_tied_weights(self, generator: torch.Generator | None) -> None:
        """Decoder rows: random unit-norm directions; W_enc = W_decᵀ; every other tensor as created.

        The directions are drawn on the CPU ([D, F] standard normal, columns normalised) from
        `generator` (torch's global generator when None), so a seed gives the same dictionary on
        every device. Skipped for tensors on the meta device (shapes only, e.g. before loading).
        """
        if self.W_dec.device.type == "meta":
            return
        directions = torch.randn(self.activation_dim, self.dict_size, generator=generator)
        directions /= directions.norm(dim=0, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(directions)
        self.W_dec.copy_(directions.T)

    # -- saved state dicts: the published key names ------------------------------------------
    @classmethod
    def to_saved_names(cls, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Tensors under our names (W_enc, ...) -> under the saved state dict's (see `saved_as`)."""
        out = {}
        for name, value in tensors.items():
            saved = cls.saved_as.get(name)
            out[saved.key if saved else name] = value.T if saved and saved.transposed else value
        return out

    @classmethod
    def from_saved_names(cls, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The inverse of `to_saved_names` (transposed tensors come back contiguous)."""
        ours = {saved.key: (name, saved.transposed) for name, saved in cls.saved_as.items()}
        out = {}
        for key, value in state_dict.items():
            name, transposed = ours.get(key, (key, False))
            out[name] = value.T.contiguous() if transposed else value
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        before = set(destination)
        super()._save_to_state_dict(destination, prefix, keep_vars)
        added = {key[len(prefix):]: destination.pop(key) for key in [k for k in destination if k not in before]}
        destination.update({prefix + key: value for key, value in self.to_saved_names(added).items()})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        saved_keys = {prefix + saved.key for saved in self.saved_as.values()}
        mine = {key[len(prefix):]: state_dict.pop(key) for key in [k for k in state_dict if k in saved_keys]}
        state_dict.update({prefix + name: value for name, value in self.from_saved_names(mine).items()})
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # constructor arguments that are saved as buffers (k, group_sizes), besides the shapes
    constructor_buffers: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def shape_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict:
        """Constructor arguments (activation_dim, dict_size, ...) read off a saved state dict."""
        tensors = cls.from_saved_names({key: state_dict[key] for key in state_dict})
        activation_dim, dict_size = tensors["W_enc"].shape
        args = {"activation_dim": activation_dim, "dict_size": dict_size}
        for name in cls.constructor_buffers:
            args[name] = tensors[name].tolist()
        return args

    @classmethod
    def from_state_dict(cls, state_dict: dict[str, torch.Tensor], **kwargs) -> "Dictionary":
        """Build a dictionary whose shapes are inferred from a saved `state_dict` and load the weights.

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
        dictionary.load_state_dict(dict(state_dict), assign=True)
        return dictionary

    @classmethod
    def from_pretrained(
        cls,
        path: str | os.PathLike,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        normalize_decoder: bool = False,
        **kwargs,
    ) -> "Dictionary":
        """Load a dictionary from a `.pt` state_dict (torch.save) or a `.safetensors` file (a local
        path, or `hf://OWNER/REPO/path/to/ae.pt` on the Hugging Face Hub, or the folder holding it).

        Shapes are inferred from the weights. `dtype` casts floating-point tensors; `device` moves
        them; either works alone. `normalize_decoder=True` (the reference's default; ours keeps
        the weights as saved) calls `normalize_decoder()` on classes that have it.
        """
        dtype = as_dtype(dtype)
        if is_hub_path(path):
            path = fetch_weights(path)
        state_dict = load_state_dict(path)
        try:
            dictionary = cls.from_state_dict(state_dict, **kwargs)
        except ValueError as e:
            raise ValueError(f"cannot load {str(path)!r} as {cls.__name__}: {e}") from None
        if normalize_decoder and hasattr(dictionary, "normalize_decoder"):
            dictionary.normalize_decoder()
        if dtype is not None or device is not None:
            dictionary = dictionary.to(device=device, dtype=dtype)
        return dictionary


@functools.cache
def _reference_names(cls: type[Dictionary]) -> dict:
    """The reference library's attribute names of a class (reference_names.reference_attributes)."""
    return reference_attributes(cls.saved_as)


def _parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.zeros(*shape))


class AutoEncoder(Dictionary):
    """The standard one-layer SAE (Towards Monosemanticity):

        f = ReLU((x − b_dec) W_enc + b_enc),   x̂ = f W_dec + b_dec

    Saved as the published Pythia-70m dictionaries: `bias` = b_dec [D], `encoder.weight` = W_encᵀ
    [F, D], `encoder.bias` = b_enc [F], `decoder.weight` = W_decᵀ [D, F]. Decoder directions start at
    unit norm and W_enc as W_decᵀ.
    """

    saved_as = {"W_enc": SavedAs("encoder.weight", True), "b_enc": SavedAs("encoder.bias"),
                "W_dec": SavedAs("decoder.weight", True), "b_dec": SavedAs("bias")}
    scales_with_input = ("b_enc", "b_dec")

    def __init__(self, activation_dim: int, dict_size: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self._create_weights(activation_dim, dict_size)
        self._init_tied_weights(generator)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """(x − b_dec) W_enc + b_enc = x W_enc + (b_enc − b_dec W_enc), [..., F].

        The second form needs no [..., D] copy of x and no gradient back into it: ∂/∂b_dec is a
        matrix-vector product instead of a full [N, F] × [F, D] matmul.
        """
        return F.linear(x, self.W_enc.T, self.b_enc - self.b_dec @ self.W_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu_(self.pre_activations(x))  # in place: π is a fresh tensor nobody else holds

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.W_dec.T, self.b_dec)

    def ghost_reconstruction(self, x: torch.Tensor, ghost_mask: torch.Tensor) -> torch.Tensor:
        """exp((x − b_dec) W_enc[:, dead] + b_enc[dead]) W_dec[dead], [..., D].

        Only the latents in `ghost_mask` [F] (bool) take part, so gradients through this output reach
        only their encoder columns, encoder biases and decoder rows (b_dec is held fixed here).
        """
        dead = ghost_mask.nonzero().squeeze(-1)
        pre = F.linear(x - self.b_dec.detach(), self.W_enc[:, dead].T, self.b_enc[dead])
        return torch.exp(pre) @ self.W_dec[dead]

    def forward(self, x: torch.Tensor, output_features: bool = False, ghost_mask: torch.Tensor | None = None):
        """x̂ (and f with `output_features`). With `ghost_mask` [F] (bool), also the ghost
        reconstruction of the masked latents: returns (x̂, x̂_ghost) or (x̂, x̂_ghost, f)."""
        f = self.encode(x)
        x_hat = self.decode(f)
        if ghost_mask is None:
            return (x_hat, f) if output_features else x_hat
        x_ghost = self.ghost_reconstruction(x, ghost_mask)
        return (x_hat, x_ghost, f) if output_features else (x_hat, x_ghost)

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Give every decoder direction unit norm without changing x̂: with n_i = ‖W_dec[i]‖,
        W_dec[i] /= n_i, W_enc[:, i] *= n_i, b_enc[i] *= n_i (so f_i becomes n_i f_i, comparable
        across latents). For dictionaries trained with free decoder norms (the April update);
        a decoder already at unit norm (to float tolerance) is left bit for bit as it is."""
        norms = self.W_dec.norm(dim=1)
        if torch.allclose(norms, torch.ones_like(norms)):
            return
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms)
        self.b_enc.mul_(norms)



class IdentityDict(Dictionary):
    """The no-op dictionary f = x, x̂ = f: the baseline for evaluation (it recovers everything).
    With `dtype` / `device` (the reference's arguments), encode and decode also move x there."""

    def __init__(self, activation_dim: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None):
        super().__init__()
        self.activation_dim = activation_dim
        self.dict_size = activation_dim
        self.__dict__.update(_dtype=dtype, _device=None if device is None else torch.device(device))

    def _move(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(device=self.__dict__["_device"], dtype=self.__dict__["_dtype"])

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self._move(x)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return self._move(f)

    @classmethod
    def from_pretrained(cls, path=None, dtype=None, device=None, activation_dim: int | None = None):
        if activation_dim is None:
            raise ValueError("IdentityDict has no weights to load; construct it with IdentityDict(activation_dim)")
        return cls(activation_dim, dtype=dtype, device=device)


class GatedAutoEncoder(Dictionary):
    """A gated SAE (Rajamanoharan et al. 2024): a gate path decides WHICH latents fire, a magnitude
    path HOW MUCH.

        π_gate = (x − b_dec) W_gate + b_gate                      [..., F]
        π_mag  = (x − b_dec) W_mag + b_mag,   W_mag = W_gate ⊙ exp(r_mag)  (column i scaled by exp(r_mag_i))
        f      = 1[π_gate > 0] ⊙ ReLU(π_mag),    x̂ = f W_dec + b_dec

    The two paths share their weights up to a per-latent scale, so a gated SAE has only 2F more
    parameters than a standard one. W_enc holds W_gate. Saved under the reference's names:
    `decoder_bias` = b_dec [D], `encoder.weight` = W_gateᵀ [F, D], `r_mag` [F], `gate_bias` = b_gate [F],
    `mag_bias` = b_mag [F], `decoder.weight` = W_decᵀ [D, F]. Initialisation: unit-norm random decoder
    directions, W_gate = W_decᵀ, every bias and r_mag zero.
    """

    saved_as = {"W_enc": SavedAs("encoder.weight", True), "b_gate": SavedAs("gate_bias"),
                "b_mag": SavedAs("mag_bias"), "W_dec": SavedAs("decoder.weight", True),
                "b_dec": SavedAs("decoder_bias")}
    scales_with_input = ("b_gate", "b_mag", "b_dec")  # r_mag is a ratio and stays

    def __init__(self, activation_dim: int, dict_size: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self._create_weights(activation_dim, dict_size, per_latent=("b_gate", "r_mag", "b_mag"))
        self._init_tied_weights(generator)

    @property
    def magnitude_weight(self) -> torch.Tensor:
        """W_mag = W_gate ⊙ exp(r_mag), [D, F] (each gate column scaled by exp(r_mag_i))."""
        return self.W_enc * self.r_mag.exp()

    def encode(self, x: torch.Tensor, return_gate: bool = False):
        """f [..., F]; with `return_gate`, (f, ReLU(π_gate)) — the second is what the sparsity
        penalty and the auxiliary loss of the gated recipe act on.

        With z = x W_gate, both paths are z plus per-latent constants: π_gate = z + (b_gate − b_dec W_gate)
        and π_mag = exp(r_mag) ⊙ z + (b_mag − exp(r_mag) ⊙ b_dec W_gate), so b_dec's gradient is a
        matrix-vector product and the elementwise work is one fused autograd Function.
        """
        flat = x.reshape(-1, x.shape[-1])
        with torch.no_grad():
            z = flat @ self.W_enc  # [N, F]
        gate_bias, mag_bias = self.folded_biases()
        f, gate = GatedEncode.apply(z, flat, self.W_enc, gate_bias, self.r_mag, mag_bias)
        f, gate = f.view(*x.shape[:-1], -1), gate.view(*x.shape[:-1], -1)
        return (f, gate) if return_gate else f

    def folded_biases(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(c_gate, c_mag) [F] with π_gate = x W_gate + c_gate and π_mag = exp(r_mag) ⊙ x W_gate + c_mag:
        b_dec folded in, c_gate = b_gate − b_dec W_gate and c_mag = b_mag − exp(r_mag) ⊙ b_dec W_gate."""
        centre = self.b_dec @ self.W_enc  # [F]
        return self.b_gate - centre, self.b_mag - self.r_mag.exp() * centre

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.W_dec.T, self.b_dec)



# =============================================================================================
# Sparse-activation dictionaries: TopK (Gao et al. 2024), BatchTopK (Bussmann et al. 2024),
# Matryoshka BatchTopK (Bussmann et al. 2025) and JumpReLU (Rajamanoharan et al. 2024).
# Their features are exactly zero off a small set of latents, so they are held as SparseCodes
# and decoded with one embedding-bag sum instead of a dense [N, F] @ [F, D] matmul.
# =============================================================================================


def _check_k(k, dict_size: int) -> int:
    if isinstance(k, torch.Tensor) and k.numel() == 1:
        k = int(k.item())
    if isinstance(k, bool) or not isinstance(k, int) or not 0 < k <= dict_size:
        raise ValueError(f"k (active latents per token) must be an int in [1, dict_size={dict_size}], got {k!r}")
    return k


class _TopKFamily(Dictionary):
    """What AutoEncoderTopK, BatchTopKSAE and MatryoshkaBatchTopKSAE share: a ReLU encoder
    π = (x − b_dec) W_enc + b_enc whose features are chosen by top-k, or at inference by a
    learned global threshold θ, and x̂ = f W_dec + b_dec.

    Persistent buffers: `k` (int) and `threshold` (θ, −1 until learned). Subclasses set
    `batch_top_k` (False: exactly k latents per token; True: BatchTopK).
    """

    batch_top_k: ClassVar[bool] = False
    scales_with_input = ("b_enc", "b_dec")
    constructor_buffers = ("k",)

    def __init__(self, activation_dim: int, dict_size: int, k: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self._create_weights(activation_dim, dict_size)
        self.register_buffer("k", torch.tensor(_check_k(k, dict_size), dtype=torch.int))
        self.register_buffer("threshold", torch.tensor(-1.0))
        self._init_tied_weights(generator)

    @property
    def has_threshold(self) -> bool:
        """Whether θ has been learned (it is −1 before)."""
        return bool(self.threshold >= 0)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """π = (x − b_dec) W_enc + b_enc, [..., F]."""
        return F.linear(x - self.b_dec, self.W_enc.T, self.b_enc)

    def select(self, pre_activations: torch.Tensor, use_threshold: bool | None = None) -> SparseCodes:
        """The features of pre-activations [N, F] as SparseCodes.

        use_threshold=False: top-k per token (AutoEncoderTopK) or over the batch (BatchTopK).
        use_threshold=True: f = π ⊙ 1[π > θ] with the learned θ. A BatchTopK dictionary whose θ
        is not learned yet (threshold < 0) falls back to per-token top-k, never to a dense ReLU.
        None: the class's inference rule (TopK: top-k per token; BatchTopK: the threshold).
        """
        if use_threshold is None:
            use_threshold = self.batch_top_k
        k = int(self.k)
        if use_threshold and self.has_threshold:
            return kernels.threshold_codes(pre_activations, self.threshold)
        if use_threshold and not self.batch_top_k:
            raise ValueError(
                f"{type(self).__name__}.threshold is not learned (it is {float(self.threshold)}); "
                "encode with use_threshold=False (top-k per token)"
            )
        if self.batch_top_k and not use_threshold:
            return kernels.batch_top_k_codes(pre_activations, k)
        return kernels.per_token_top_k_codes(pre_activations, k)

    def codes(self, x: torch.Tensor, use_threshold: bool | None = None) -> SparseCodes:
        """SparseCodes of the tokens of x [..., D] (flattened to N = x.numel() // D rows)."""
        return self.select(self.pre_activations(x.reshape(-1, x.shape[-1])), use_threshold)

    def encode(self, x: torch.Tensor, use_threshold: bool | None = None) -> torch.Tensor:
        """x [..., D] -> f [..., F]; k counts per token of [B, L, D] input (see `select`)."""
        return self.codes(x, use_threshold).to_dense(self.dict_size).reshape(*x.shape[:-1], self.dict_size)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.W_dec.T, self.b_dec)

    def forward(self, x: torch.Tensor, output_features: bool = False, use_threshold: bool | None = None):
        """x̂ (and f with `output_features`), decoding the sparse features directly."""
        codes = self.codes(x, use_threshold)
        x_hat = (kernels.sparse_decode(codes, self.W_dec) + self.b_dec).reshape(x.shape)
        if not output_features:
            return x_hat
        return x_hat, codes.to_dense(self.dict_size).reshape(*x.shape[:-1], self.dict_size)

    @torch.no_grad()
    def scale_biases(self, factor: float) -> None:
        super().scale_biases(factor)
        if self.has_threshold:
            self.threshold.mul_(factor)



_REFERENCE_TOP_K_KEYS = {"W_enc": SavedAs("encoder.weight", True), "b_enc": SavedAs("encoder.bias"),
                         "W_dec": SavedAs("decoder.weight", True)}


class AutoEncoderTopK(_TopKFamily):
    """TopK SAE (Gao et al. 2024): f = ReLU(TopK_k((x − b_dec) W_enc + b_enc)), exactly k active
    latents per token; x̂ = f W_dec + b_dec. `encode(x, use_threshold=True)` instead keeps
    π > θ with the threshold tracked during training.

    Saved as saprmarks/dictionary_learning's TopK SAEs: encoder.weight [F, D], encoder.bias [F],
    decoder.weight [D, F], b_dec [D], k, threshold.
    """

    batch_top_k = False
    saved_as = _REFERENCE_TOP_K_KEYS


class BatchTopKSAE(_TopKFamily):
    """BatchTopK SAE (Bussmann et al. 2024). Training keeps the k·N largest ReLU pre-activations
    over a batch of N tokens (`encode(x, use_threshold=False)`); inference keeps
    f = π ⊙ 1[π > θ] with the global threshold θ learned in training, so a token's features do
    not depend on the rest of its batch. Until θ is learned (threshold < 0), inference uses
    top-k per token. Saved like AutoEncoderTopK.
    """

    batch_top_k = True
    saved_as = _REFERENCE_TOP_K_KEYS


class MatryoshkaBatchTopKSAE(_TopKFamily):
    """Matryoshka BatchTopK SAE (Bussmann et al. 2025): a BatchTopK SAE whose latents are split
    into nested groups (sizes `group_sizes`, in order); the prefixes [0, m) of the dictionary are
    trained to reconstruct x on their own (see trainers/matryoshka_batch_top_k.py). Encoding is
    BatchTopKSAE's.

    Saved as saprmarks/dictionary_learning's: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D], k,
    threshold, group_sizes.
    """

    batch_top_k = True
    constructor_buffers = ("k", "group_sizes")

    def __init__(self, activation_dim: int, dict_size: int, k: int, group_sizes: list[int], *,
                 generator: torch.Generator | None = None):
        group_sizes = [int(s) for s in group_sizes]
        if not group_sizes or any(s <= 0 for s in group_sizes) or sum(group_sizes) != dict_size:
            raise ValueError(
                f"group_sizes must be positive and sum to dict_size={dict_size}, got {group_sizes}"
            )
        super().__init__(activation_dim, dict_size, k, generator=generator)
        self.register_buffer("group_sizes", torch.tensor(group_sizes, dtype=torch.long))

    @property
    def group_boundaries(self) -> list[int]:
        """[0, s_0, s_0 + s_1, ..., F]: group g is latents [boundaries[g], boundaries[g + 1])."""
        return [0, *torch.cumsum(self.group_sizes, 0).tolist()]



class JumpReluAutoEncoder(Dictionary):
    """JumpReLU SAE (Rajamanoharan et al. 2024):

        π = x W_enc + b_enc,   f = ReLU(π) ⊙ H(π − θ),   x̂ = f W_dec + b_dec

    with one threshold θ_i ≥ 0 per latent (x is not centred by b_dec, as in the paper and Gemma
    Scope). θ is the trained parameter itself, saved under `threshold` as by
    saprmarks/dictionary_learning and SAELens: W_enc [D, F], b_enc [F], W_dec [F, D], b_dec [D],
    threshold [F].
    """

    scales_with_input = ("b_enc", "b_dec", "threshold")

    def __init__(self, activation_dim: int, dict_size: int, initial_threshold: float = 0.001, *,
                 generator: torch.Generator | None = None):
        if not initial_threshold > 0:
            raise ValueError(f"initial_threshold must be positive, got {initial_threshold}")
        super().__init__()
        self._create_weights(activation_dim, dict_size)
        self.threshold = nn.Parameter(torch.full((dict_size,), float(initial_threshold)))
        self._init_tied_weights(generator)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """π = x W_enc + b_enc, [..., F]."""
        return F.linear(x, self.W_enc.T, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.W_dec.T, self.b_dec)



class Transcoder(Dictionary):
    """A transcoder (Dunefsky et al. 2024, "Transcoders find interpretable LLM feature circuits"):
    sparse features of a module's input x [D_in] that reconstruct the module's output y [D_out],

        f = ReLU(x W_enc + b_enc),   ŷ = f W_dec + b_dec  (+ x W_skipᵀ with `skip`)

    W_enc [D_in, F], b_enc [F], W_dec [F, D_out], b_dec [D_out] and, for a skip transcoder (as in
    sparsify and SAELens' skip_transcoder), W_skip [D_out, D_in], initialised at zero. `decode(f)`
    is the sparse part f W_dec + b_dec; `forward(x)` adds the skip term. `activation_dim` is D_in,
    `output_dim` D_out.
    """

    scales_with_input = ("b_enc", "b_dec")
    is_transcoder = True

    def __init__(self, activation_dim: int, dict_size: int, output_dim: int | None = None, skip: bool = False, *,
                 generator: torch.Generator | None = None):
        super().__init__()
        output_dim = activation_dim if output_dim is None else int(output_dim)
        self.activation_dim, self.dict_size, self.output_dim = activation_dim, dict_size, output_dim
        self.W_enc = _parameter(activation_dim, dict_size)
        self.b_enc = _parameter(dict_size)
        self.W_dec = _parameter(dict_size, output_dim)
        self.b_dec = _parameter(output_dim)
        self.W_skip = _parameter(output_dim, activation_dim) if skip else None
        self._init_weights(generator)

    @property
    def skip(self) -> bool:
        return self.W_skip is not None

    @torch.no_grad()
    def _init_weights(self, generator: torch.Generator | None) -> None:
        """Random unit-norm encoder columns and decoder rows (tied, W_enc = W_decᵀ, when D_in = D_out),
        drawn on the CPU from `generator`; biases and W_skip zero."""
        if self.W_dec.device.type == "meta":
            return
        encoder = torch.randn(self.activation_dim, self.dict_size, generator=generator)
        encoder /= encoder.norm(dim=0, keepdim=True).clamp_min(1e-12)
        if self.output_dim == self.activation_dim:
            decoder = encoder.T
        else:
            decoder = torch.randn(self.dict_size, self.output_dim, generator=generator)
            decoder /= decoder.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.W_enc.copy_(encoder)
        self.W_dec.copy_(decoder)

    @classmethod
    def shape_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict:
        args = super().shape_from_state_dict(state_dict)
        tensors = cls.from_saved_names(state_dict)
        args.update(output_dim=tensors["W_dec"].shape[1], skip="W_skip" in tensors)
        return args

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """π = x W_enc + b_enc, [..., F] (x is not centred: b_dec lives in the output space)."""
        return F.linear(x, self.W_enc.T, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.pre_activations(x).relu()

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """f W_dec + b_dec, [..., D_out] (without the skip term, which needs x)."""
        return F.linear(f, self.W_dec.T, self.b_dec)

    def skip_term(self, x: torch.Tensor) -> torch.Tensor | float:
        """x W_skipᵀ [..., D_out], or 0 without a skip connection."""
        return F.linear(x, self.W_skip) if self.W_skip is not None else 0.0

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """ŷ = decode(encode(x)) + x W_skipᵀ; with `output_features`, (ŷ, f)."""
        f = self.encode(x)
        y_hat = self.decode(f) + self.skip_term(x)
        return (y_hat, f) if output_features else y_hat


class TopKTranscoder(Transcoder):
    """A TopK transcoder (sparsify's; Paulo et al. 2025, "Transcoders beat sparse autoencoders for
    interpretability", with `skip`): exactly k active latents per token,

        f = ReLU(TopK_k(x W_enc + b_enc)),   ŷ = f W_dec + b_dec  (+ x W_skipᵀ)

    Saved like Transcoder, plus the buffer `k`.
    """

    constructor_buffers = ("k",)

    def __init__(self, activation_dim: int, dict_size: int, k: int, output_dim: int | None = None,
                 skip: bool = False, *, generator: torch.Generator | None = None):
        super().__init__(activation_dim, dict_size, output_dim, skip, generator=generator)
        self.register_buffer("k", torch.tensor(_check_k(k, dict_size), dtype=torch.int))

    def codes(self, x: torch.Tensor) -> SparseCodes:
        """SparseCodes of the tokens of x [..., D_in] (flattened to N rows)."""
        return kernels.per_token_top_k_codes(self.pre_activations(x.reshape(-1, x.shape[-1])), int(self.k))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.codes(x).to_dense(self.dict_size).reshape(*x.shape[:-1], self.dict_size)

    def forward(self, x: torch.Tensor, output_features: bool = False):
        codes = self.codes(x)
        y_hat = (kernels.sparse_decode(codes, self.W_dec) + self.b_dec).reshape(*x.shape[:-1], self.output_dim)
        y_hat = y_hat + self.skip_term(x)
        if not output_features:
            return y_hat
        return y_hat, codes.to_dense(self.dict_size).reshape(*x.shape[:-1], self.dict_size)


class JumpReluTranscoder(Transcoder):
    """A JumpReLU transcoder (as Gemma Scope's transcoders and SAELens' jumprelu_transcoder): one
    threshold θ_i ≥ 0 per latent,

        π = x W_enc + b_enc,   f = ReLU(π) ⊙ H(π − θ),   ŷ = f W_dec + b_dec  (+ x W_skipᵀ)

    θ is the trained parameter, saved under `threshold` [F].
    """

    scales_with_input = ("b_enc", "b_dec", "threshold")

    def __init__(self, activation_dim: int, dict_size: int, output_dim: int | None = None, skip: bool = False,
                 initial_threshold: float = 0.001, *, generator: torch.Generator | None = None):
        if not initial_threshold > 0:
            raise ValueError(f"initial_threshold must be positive, got {initial_threshold}")
        super().__init__(activation_dim, dict_size, output_dim, skip, generator=generator)
        self.threshold = nn.Parameter(torch.full((dict_size,), float(initial_threshold)))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        return pre.relu() * (pre > self.threshold)


class AutoEncoderNew(Transcoder):
    """The reference library's `AutoEncoderNew` (the architecture of Anthropic's April 2024 update):
    an SAE that does not centre its input,

        f = ReLU(x W_enc + b_enc),   x̂ = f W_dec + b_dec,

    that is, a Transcoder whose output space is its input space, without a skip connection. Saved as
    the reference saves it: `encoder.weight` = W_encᵀ [F, D], `encoder.bias` = b_enc,
    `decoder.weight` = W_decᵀ [D, F], `decoder.bias` = b_dec. Initialised as the reference's:
    decoder directions of norm 0.1, W_enc = W_decᵀ, zero biases. As in the reference,
    `forward(x, output_features=True)` returns the features times the decoder norms,
    f_i ‖W_dec[i]‖ (`encode(x)` returns f). No recipe trains it; load it with `load_dictionary`.
    """

    saved_as = {"W_enc": SavedAs("encoder.weight", True), "b_enc": SavedAs("encoder.bias"),
                "W_dec": SavedAs("decoder.weight", True), "b_dec": SavedAs("decoder.bias")}
    is_transcoder = False  # it reconstructs its input
    INIT_NORM: ClassVar[float] = 0.1

    def __init__(self, activation_dim: int, dict_size: int, *, generator: torch.Generator | None = None):
        super().__init__(activation_dim, dict_size, generator=generator)
        if self.W_dec.device.type != "meta":
            with torch.no_grad():
                self.W_enc.mul_(self.INIT_NORM)
                self.W_dec.mul_(self.INIT_NORM)

    @classmethod
    def shape_from_state_dict(cls, state_dict: dict[str, torch.Tensor]) -> dict:
        args = super().shape_from_state_dict(state_dict)
        if args.pop("skip") or args.pop("output_dim") != args["activation_dim"]:
            raise ValueError("an AutoEncoderNew reconstructs its input: decoder.weight must be [D, F] for "
                             "encoder.weight [F, D], with no W_skip")
        return args

    def forward(self, x: torch.Tensor, output_features: bool = False):
        """x̂; with `output_features`, (x̂, f ⊙ ‖W_dec‖) as the reference's forward returns."""
        f = self.encode(x)
        x_hat = self.decode(f)
        return (x_hat, f * self.W_dec.norm(dim=1)) if output_features else x_hat



class AbsTopKSAE(Dictionary):
    """AbsTopK SAE (SAELens' `abstopk`; "AbsTopK: Rethinking Sparse Autoencoders for Bidirectional
    Features", 2025): the k latents of largest |π| per token keep their signed value,

        π = (x − b_dec) W_enc + b_enc,   f_i = π_i if i ∈ TopK_k(|π|) else 0,   x̂ = f W_dec + b_dec,

    so features may be negative. Saved under SAELens' names: W_enc [D, F], b_enc [F], W_dec [F, D],
    b_dec [D], and the buffer `k`. No recipe trains it; it is imported from SAELens.
    """

    scales_with_input = ("b_enc", "b_dec")
    constructor_buffers = ("k",)

    def __init__(self, activation_dim: int, dict_size: int, k: int, *, generator: torch.Generator | None = None):
        super().__init__()
        self._create_weights(activation_dim, dict_size)
        self.register_buffer("k", torch.tensor(_check_k(k, dict_size), dtype=torch.int))
        self._init_tied_weights(generator)

    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        """π = (x − b_dec) W_enc + b_enc, [..., F]."""
        return F.linear(x - self.b_dec, self.W_enc.T, self.b_enc)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        pre = self.pre_activations(x)
        index = pre.abs().topk(int(self.k), dim=-1, sorted=False).indices
        return torch.zeros_like(pre).scatter_(-1, index, pre.gather(-1, index))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        return F.linear(f, self.W_dec.T, self.b_dec)
