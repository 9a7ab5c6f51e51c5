"""Interoperability with saprmarks/dictionary_learning folders and the SAELens file format.

Reference folders (`ae.pt` + `config.json` with `trainer.dict_class`): our dictionary classes keep
the reference's state-dict key names, so a reference state dict loads after at most a key rename
(`REFERENCE_KEY_RENAMES`) and, for checkpoints written before `k` became a buffer, filling `k`
from the config. `utils.load_dictionary` is the entry point; `dictionary_from_reference` does the
work on an in-memory state dict.

SAELens (`sae_weights.safetensors` + `cfg.json`): tensors W_enc [d_in, d_sae], W_dec [d_sae, d_in],
b_enc [d_sae], b_dec [d_in] (+ `threshold` [d_sae] for jumprelu; b_gate, b_mag, r_mag instead of
b_enc for gated). With x' = x − b_dec if `apply_b_dec_to_input` else x:

    standard:  f = ReLU(x' W_enc + b_enc)
    topk:      f = TopK_k(ReLU(x' W_enc + b_enc))     (k per token)
    jumprelu:  f = ReLU(h) ⊙ 1[h > threshold],  h = x' W_enc + b_enc
    gated:     f = 1[x' W_enc + b_gate > 0] ⊙ ReLU(x' (W_enc ⊙ exp(r_mag)) + b_mag)
    all:       x̂ = f W_dec + b_dec

`save_saelens(dictionary, folder)` writes that format for AutoEncoder (standard), GatedAutoEncoder
(gated), AutoEncoderTopK (topk), JumpReluAutoEncoder (jumprelu), and BatchTopKSAE /
MatryoshkaBatchTopKSAE (jumprelu with their learned inference threshold θ, the same for every
latent; a `dictionary_learning` block in cfg.json names the class, k and groups, and SAELens
ignores it); `load_saelens(folder)` reads standard, gated, topk and jumprelu back into our
classes. Exported weights are exact copies (transposed), so an export followed by an import gives
a dictionary of the same class with identical outputs.
"""
from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any

import torch

from . import dictionary as dictionary_module
from .dictionary import Dictionary
from .utils import atomic_write_json, _atomic_write

__all__ = [
    "REFERENCE_KEY_RENAMES",
    "dictionary_class",
    "dictionary_from_reference",
    "infer_dict_class",
    "saelens_state_dict",
    "dictionary_from_saelens",
    "save_saelens",
    "load_saelens",
    "SAELENS_WEIGHTS_FILE",
    "SAELENS_CONFIG_FILE",
]

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"

# dict_class -> {reference state-dict key: our key}, for classes whose names differ.
REFERENCE_KEY_RENAMES: dict[str, dict[str, str]] = {}


# ---------------------------------------------------------------------------------------------
# Dictionary classes by name
# ---------------------------------------------------------------------------------------------


def _known_classes() -> dict[str, type[Dictionary]]:
    return {
        name: obj
        for name, obj in vars(dictionary_module).items()
        if isinstance(obj, type) and issubclass(obj, Dictionary) and obj is not Dictionary
    }


def dictionary_class(name: str) -> type[Dictionary]:
    """The dictionary class called `name` in `dictionary_learning.dictionary`."""
    known = _known_classes()
    if name not in known:
        raise ValueError(
            f"unknown dictionary class {name!r}; this version of dictionary_learning has: "
            f"{', '.join(sorted(known))}"
        )
    return known[name]


def infer_dict_class(state_dict: dict[str, torch.Tensor], trainer_class: str | None = None) -> str:
    """Guess the dictionary class of a reference state dict from its keys (for configs without
    `dict_class`); `trainer_class` separates the classes that share a layout."""
    keys = set(state_dict)
    if {"bias", "encoder.weight", "encoder.bias", "decoder.weight"} <= keys:
        return "AutoEncoder"
    if {"decoder_bias", "r_mag", "gate_bias", "mag_bias"} <= keys:
        return "GatedAutoEncoder"
    if "group_sizes" in keys:
        return "MatryoshkaBatchTopKSAE"
    if {"encoder.weight", "b_dec"} <= keys:
        return "BatchTopKSAE" if trainer_class and "BatchTopK" in trainer_class else "AutoEncoderTopK"
    if {"W_enc", "W_dec", "threshold"} <= keys:
        return "JumpReluAutoEncoder"
    raise ValueError(
        f"cannot tell the dictionary class from the state-dict keys {sorted(keys)}; "
        "add trainer.dict_class (e.g. \"AutoEncoder\") to the folder's config.json"
    )


def _meta_instance(cls: type[Dictionary], state_dict: dict[str, torch.Tensor]) -> Dictionary:
    with torch.device("meta"):
        return cls(**cls.shape_from_state_dict(state_dict))


# ---------------------------------------------------------------------------------------------
# saprmarks/dictionary_learning state dicts
# ---------------------------------------------------------------------------------------------


@torch.no_grad()
def _normalize_decoder_columns(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoEncoder with non-unit decoder columns n_i (trained without the norm constraint):
    W_dec[:, i] /= n_i, W_enc[i] *= n_i, b_enc[i] *= n_i. x̂ is unchanged (up to rounding) and
    f_i becomes f_i · n_i, comparable across latents; the reference loader does the same."""
    decoder = state_dict["decoder.weight"]
    norms = decoder.norm(dim=0)
    if torch.allclose(norms, torch.ones_like(norms)):
        return state_dict
    state_dict = dict(state_dict)
    state_dict["decoder.weight"] = decoder / norms
    state_dict["encoder.weight"] = state_dict["encoder.weight"] * norms[:, None]
    state_dict["encoder.bias"] = state_dict["encoder.bias"] * norms
    return state_dict


def dictionary_from_reference(
    dict_class: str,
    state_dict: dict[str, torch.Tensor],
    trainer_config: dict[str, Any] | None = None,
    normalize_decoder: bool = True,
) -> Dictionary:
    """A dictionary from a state dict written by saprmarks/dictionary_learning (or by us: the
    formats agree). `trainer_config` is the folder's `config["trainer"]`; it supplies `k` to old
    top-k checkpoints that did not store it. `normalize_decoder` (AutoEncoder only) rescales
    non-unit decoder columns into the encoder, as the reference's loader does."""
    cls = dictionary_class(dict_class)
    renames = REFERENCE_KEY_RENAMES.get(dict_class, {})
    state_dict = {renames.get(key, key): value for key, value in state_dict.items()}
    init_parameters = inspect.signature(cls.__init__).parameters
    if "k" in init_parameters and "k" not in state_dict:
        if trainer_config is None or "k" not in trainer_config:
            raise ValueError(
                f"{dict_class} state dict has no 'k' buffer and the config has no trainer.k; "
                "add \"k\": <top-k> to config.json's trainer section"
            )
        state_dict["k"] = torch.tensor(int(trainer_config["k"]))
    if dict_class == "AutoEncoder" and normalize_decoder:
        state_dict = _normalize_decoder_columns(state_dict)
    try:
        expected = _meta_instance(cls, state_dict).state_dict()
    except KeyError as e:
        raise ValueError(
            f"not a {dict_class} state dict: key {e.args[0]!r} is missing (found keys: {sorted(state_dict)})"
        ) from None
    if "threshold" in expected and "threshold" not in state_dict:
        # written before the inference threshold existed: "not set yet"
        state_dict["threshold"] = torch.full(expected["threshold"].shape, -1.0)
    for key, value in list(state_dict.items()):  # integer buffers (k) keep our dtype
        if key in expected and not value.is_floating_point() and value.dtype != expected[key].dtype:
            state_dict[key] = value.to(expected[key].dtype)
    return cls.from_state_dict(state_dict)


# ---------------------------------------------------------------------------------------------
# SAELens
# ---------------------------------------------------------------------------------------------

# our class -> SAELens architecture written on export
_SAELENS_ARCHITECTURE = {
    "AutoEncoder": "standard",
    "GatedAutoEncoder": "gated",
    "AutoEncoderTopK": "topk",
    "JumpReluAutoEncoder": "jumprelu",
    "BatchTopKSAE": "jumprelu",
    "MatryoshkaBatchTopKSAE": "jumprelu",
}

# cfg.json block holding what SAELens cannot express (our class, k, Matryoshka groups, the top-k
# inference threshold); SAELens ignores unknown fields, our importer uses it to rebuild the class
_OUR_CFG_KEY = "dictionary_learning"


def _t(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().T.contiguous().cpu()


def _c(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().contiguous().cpu()


def _jumprelu_applies_b_dec(dictionary: Dictionary) -> bool:
    return bool(getattr(dictionary, "apply_b_dec_to_input", False))


def _batch_threshold(dictionary: Dictionary, dict_size: int) -> torch.Tensor:
    threshold = dictionary.state_dict()["threshold"].detach().float()
    if threshold.numel() == 1 and float(threshold) < 0:
        raise ValueError(
            f"this {type(dictionary).__name__} has no inference threshold yet (threshold = {float(threshold)}: "
            "it is set during training after threshold_start_step); SAELens has no batch-top-k "
            "inference, so train past threshold_start_step before exporting"
        )
    return threshold.expand(dict_size).clone().contiguous().cpu() if threshold.numel() == 1 else _c(threshold)


def saelens_state_dict(dictionary: Dictionary) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, cfg fields) of `dictionary` in SAELens' layout: see the module docstring."""
    name = type(dictionary).__name__
    if name not in _SAELENS_ARCHITECTURE:
        raise ValueError(
            f"SAELens has no architecture for {name}; exportable classes: {', '.join(_SAELENS_ARCHITECTURE)}"
        )
    sd = dictionary.state_dict()
    cfg: dict[str, Any] = {"architecture": _SAELENS_ARCHITECTURE[name], "apply_b_dec_to_input": True}
    if name in ("AutoEncoder", "AutoEncoderTopK", "BatchTopKSAE"):
        bias_key = "bias" if name == "AutoEncoder" else "b_dec"
        tensors = {
            "W_enc": _t(sd["encoder.weight"]),
            "b_enc": _c(sd["encoder.bias"]),
            "W_dec": _t(sd["decoder.weight"]),
            "b_dec": _c(sd[bias_key]),
        }
    elif name == "GatedAutoEncoder":
        tensors = {
            "W_enc": _t(sd["encoder.weight"]),
            "b_gate": _c(sd["gate_bias"]),
            "r_mag": _c(sd["r_mag"]),
            "b_mag": _c(sd["mag_bias"]),
            "W_dec": _t(sd["decoder.weight"]),
            "b_dec": _c(sd["decoder_bias"]),
        }
    else:  # JumpReluAutoEncoder, MatryoshkaBatchTopKSAE: W_enc [D, F], W_dec [F, D] already
        tensors = {key: _c(sd[key]) for key in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if name == "JumpReluAutoEncoder":
        tensors["threshold"] = _c(sd["threshold"])
        cfg["apply_b_dec_to_input"] = _jumprelu_applies_b_dec(dictionary)
    elif name in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE"):
        tensors["threshold"] = _batch_threshold(dictionary, dictionary.dict_size)
        cfg[_OUR_CFG_KEY] = {"dict_class": name, "k": int(sd["k"])}
        if name == "MatryoshkaBatchTopKSAE":
            cfg[_OUR_CFG_KEY]["group_sizes"] = sd["group_sizes"].tolist()
    if name == "AutoEncoderTopK":
        k = int(sd["k"])
        cfg.update(k=k, activation_fn="topk", activation_fn_kwargs={"k": k})
        cfg[_OUR_CFG_KEY] = {"dict_class": name, "k": k, "threshold": float(sd["threshold"])}
    else:
        cfg.update(activation_fn="relu", activation_fn_kwargs={})
    cfg.update(d_in=dictionary.activation_dim, d_sae=dictionary.dict_size)
    return tensors, cfg


def save_saelens(
    dictionary: Dictionary,
    folder: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `dictionary` as a SAELens folder: `sae_weights.safetensors` and `cfg.json`.

    `metadata`: extra cfg.json fields SAELens records, e.g. {"model_name": "pythia-70m-deduped",
    "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "context_size": 128}.
    Weights are saved as float32. Returns the folder.
    """
    from safetensors.torch import save as safetensors_bytes

    tensors, fields = saelens_state_dict(dictionary)
    tensors = {key: value.float() for key, value in tensors.items()}
    cfg = {
        **fields,
        "dtype": "float32",
        "device": "cpu",
        "normalize_activations": "none",
        "finetuning_scaling_factor": False,
        "reshape_activations": "none",
        "exported_from": f"dictionary_learning {type(dictionary).__name__}",
        **(metadata or {}),
    }
    folder = Path(folder)
    data = safetensors_bytes(tensors)
    _atomic_write(folder / SAELENS_WEIGHTS_FILE, lambda f: f.write(data))
    atomic_write_json(cfg, folder / SAELENS_CONFIG_FILE)
    return folder


def _saelens_activation(cfg: dict[str, Any]) -> str:
    return str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu")


def _saelens_k(cfg: dict[str, Any]) -> int:
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise ValueError("SAELens cfg.json of a topk SAE has neither 'k' nor activation_fn_kwargs.k")
    return int(k)


def dictionary_from_saelens(
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    activation_scale: float | None = None,
) -> Dictionary:
    """One of our dictionaries from SAELens tensors and cfg (see the module docstring); the
    tensors are copied, never shared.

    An SAE whose `apply_b_dec_to_input` differs from our class's convention gets b_dec folded
    into its encoder bias (x'·W = x·W − b_dec·W). `activation_scale`: for cfg
    normalize_activations = "expected_average_only_in", the factor s SAELens multiplies inputs
    by; it is folded in so the result takes raw activations.
    """
    tensors = {key: value.detach().clone() for key, value in tensors.items()}
    return _dictionary_from_saelens(tensors, cfg, activation_scale)


@torch.no_grad()
def _dictionary_from_saelens(
    tensors: dict[str, torch.Tensor], cfg: dict[str, Any], activation_scale: float | None
) -> Dictionary:
    architecture = str(cfg.get("architecture", "standard"))
    if architecture == "standard" and _saelens_activation(cfg) == "topk":
        architecture = "topk"  # SAELens < 6 wrote top-k SAEs as standard + activation_fn "topk"
    if architecture not in ("standard", "gated", "topk", "jumprelu"):
        raise ValueError(
            f"SAELens architecture {architecture!r} is not supported; supported: standard, gated, topk, jumprelu"
        )
    if architecture == "standard" and _saelens_activation(cfg) != "relu":
        raise ValueError(f"SAELens standard SAE with activation {_saelens_activation(cfg)!r} is not supported (relu, topk are)")
    if cfg.get("finetuning_scaling_factor") or "finetuning_scaling_factor" in tensors or "scaling_factor" in tensors:
        raise ValueError("SAELens SAEs with a finetuning scaling factor are not supported")
    if cfg.get("rescale_acts_by_decoder_norm"):
        raise ValueError("SAELens topk SAEs with rescale_acts_by_decoder_norm=True are not supported")
    normalization = cfg.get("normalize_activations") or "none"
    if normalization is True:
        normalization = "expected_average_only_in"
    if normalization not in ("none", False, "expected_average_only_in"):
        raise ValueError(
            f"SAELens normalize_activations={normalization!r} rescales every input at run time; "
            "our dictionaries take raw activations, so only 'none' and 'expected_average_only_in' "
            "(with activation_scale=) can be imported"
        )
    if normalization == "expected_average_only_in" and activation_scale is None:
        raise ValueError(
            "this SAELens SAE expects inputs scaled by a dataset-wide factor "
            "(normalize_activations='expected_average_only_in'); pass activation_scale=<that factor> "
            "to fold it into the weights"
        )
    required = {"W_enc", "W_dec", "b_dec"} | ({"b_gate", "b_mag", "r_mag"} if architecture == "gated" else {"b_enc"})
    if architecture == "jumprelu":
        required.add("threshold")
    missing = sorted(required - set(tensors))
    if missing:
        raise ValueError(f"SAELens {architecture} weights lack {missing} (found {sorted(tensors)})")
    W_enc, W_dec, b_dec = tensors["W_enc"], tensors["W_dec"], tensors["b_dec"]
    d_in, d_sae = W_enc.shape
    if W_dec.shape != (d_sae, d_in):
        raise ValueError(f"SAELens W_dec has shape {tuple(W_dec.shape)}; W_enc {tuple(W_enc.shape)} needs {(d_sae, d_in)}")
    applies_b_dec = bool(cfg.get("apply_b_dec_to_input", True))

    def encoder_bias(bias: torch.Tensor, weight: torch.Tensor, ours_applies_b_dec: bool) -> torch.Tensor:
        """Bias that keeps h = x' W + bias when the input convention changes."""
        if applies_b_dec == ours_applies_b_dec:
            return bias
        shift = b_dec @ weight  # [F]
        return bias - shift if applies_b_dec else bias + shift

    if architecture in ("standard", "topk"):
        sd = {
            "encoder.weight": W_enc.T.contiguous(),
            "encoder.bias": encoder_bias(tensors["b_enc"], W_enc, True),
            "decoder.weight": W_dec.T.contiguous(),
        }
        if architecture == "standard":
            sd["bias"] = b_dec
            dictionary = dictionary_class("AutoEncoder").from_state_dict(sd)
        else:
            cls = dictionary_class("AutoEncoderTopK")
            sd["b_dec"] = b_dec
            sd["k"] = torch.tensor(_saelens_k(cfg))
            expected = _meta_instance(cls, sd).state_dict()
            sd["k"] = sd["k"].to(expected["k"].dtype)
            if "threshold" in expected:
                ours = cfg.get(_OUR_CFG_KEY)
                learned = ours.get("threshold", -1.0) if isinstance(ours, dict) else -1.0
                sd["threshold"] = torch.full(expected["threshold"].shape, float(learned), dtype=expected["threshold"].dtype)
            dictionary = cls.from_state_dict(sd)
    elif architecture == "gated":
        magnitude_weight = W_enc * tensors["r_mag"].exp()
        sd = {
            "encoder.weight": W_enc.T.contiguous(),
            "gate_bias": encoder_bias(tensors["b_gate"], W_enc, True),
            "mag_bias": encoder_bias(tensors["b_mag"], magnitude_weight, True),
            "r_mag": tensors["r_mag"],
            "decoder.weight": W_dec.T.contiguous(),
            "decoder_bias": b_dec,
        }
        dictionary = dictionary_class("GatedAutoEncoder").from_state_dict(sd)
    elif _batch_top_k_export(cfg, tensors["threshold"]):
        # exported from one of our BatchTopK dictionaries: rebuild it (same θ, same centring)
        ours = cfg[_OUR_CFG_KEY]
        cls = dictionary_class(ours["dict_class"])
        sd = {"k": torch.tensor(int(ours["k"]), dtype=torch.int), "threshold": tensors["threshold"][0].clone()}
        if ours["dict_class"] == "MatryoshkaBatchTopKSAE":
            sd.update(W_enc=W_enc, b_enc=tensors["b_enc"], W_dec=W_dec, b_dec=b_dec,
                      group_sizes=torch.tensor([int(g) for g in ours["group_sizes"]], dtype=torch.long))
        else:
            sd.update({"encoder.weight": W_enc.T.contiguous(), "encoder.bias": tensors["b_enc"],
                       "decoder.weight": W_dec.T.contiguous(), "b_dec": b_dec})
        dictionary = cls.from_state_dict(sd)
    else:
        cls = dictionary_class("JumpReluAutoEncoder")
        ours_applies = _class_applies_b_dec(cls)
        sd = {
            "W_enc": W_enc,
            "b_enc": encoder_bias(tensors["b_enc"], W_enc, ours_applies),
            "W_dec": W_dec,
            "b_dec": b_dec,
            "threshold": tensors["threshold"],
        }
        dictionary = cls.from_state_dict(sd)
    if normalization == "expected_average_only_in":
        dictionary.scale_biases(1.0 / float(activation_scale))
    return dictionary


def _batch_top_k_export(cfg: dict[str, Any], threshold: torch.Tensor) -> bool:
    ours = cfg.get(_OUR_CFG_KEY)
    return (
        isinstance(ours, dict)
        and ours.get("dict_class") in ("BatchTopKSAE", "MatryoshkaBatchTopKSAE")
        and bool(cfg.get("apply_b_dec_to_input", True))
        and bool((threshold == threshold[0]).all())
    )


def _class_applies_b_dec(cls: type[Dictionary]) -> bool:
    """Whether a fresh instance of `cls` subtracts b_dec from its input (JumpReLU convention)."""
    with torch.device("meta"):
        return bool(getattr(cls(1, 1), "apply_b_dec_to_input", False))


def load_saelens(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    activation_scale: float | None = None,
) -> tuple[Dictionary, dict[str, Any]]:
    """(dictionary, cfg) from a SAELens folder holding `cfg.json` and `sae_weights.safetensors`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / SAELENS_CONFIG_FILE, folder / SAELENS_WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(
                f"{str(path)!r} not found: a SAELens folder holds {SAELENS_CONFIG_FILE} and {SAELENS_WEIGHTS_FILE}"
            )
    cfg = json.loads(cfg_path.read_text())
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:
        raise ValueError(f"could not read {str(weights_path)!r} as a safetensors file: {e}") from e
    dictionary = _dictionary_from_saelens(tensors, cfg, activation_scale)  # fresh tensors: no copy
    if device is not None or dtype is not None:
        dictionary = dictionary.to(device=device, dtype=dtype)
    return dictionary, cfg
