"""Loading and exporting dictionaries: trainer folders (ours and saprmarks/dictionary_learning's, one
layout) and the SAELens file format. Which class a file holds, and how it maps, is read from the
architecture table in registry.py.

Trainer folders: `ae.pt` + `config.json` with `trainer.dict_class` (and `checkpoints/ae_STEP.pt`).
Our dictionaries save the reference's state-dict key names (`Dictionary.saved_as`), so a reference
state dict loads directly; checkpoints written before `k` became a buffer get it from the config.
`load_dictionary` is the entry point; `dictionary_from_reference` does the work on a state dict.

SAELens (`sae_weights.safetensors` + `cfg.json`): tensors W_enc [d_in, d_sae], W_dec [d_sae, d_out],
b_enc [d_sae], b_dec [d_out] (d_out = d_in but for transcoders; + `threshold` [d_sae] for the
JumpReLU kinds; b_gate, b_mag, r_mag instead of b_enc for gated; W_skip [d_out, d_in] for skip
transcoders) — the names and layout our dictionaries hold. With x' = x − b_dec if
`apply_b_dec_to_input` else x (transcoders: always x), and h = x' W_enc + b_enc:

    standard, transcoder:    f = ReLU(h)
    topk:                    f = ReLU(TopK_k(h))             (k per token)
    abstopk:                 f = h on the k largest |h_i|, 0 elsewhere (signed)
    jumprelu(_transcoder):   f = ReLU(h) ⊙ 1[h > threshold]
    gated:                   f = 1[x' W_enc + b_gate > 0] ⊙ ReLU(x' (W_enc ⊙ exp(r_mag)) + b_mag)
    all:                     x̂ = f W_dec + b_dec  (+ x W_skipᵀ for skip_transcoder, jumprelu_skip_transcoder)

TopK SAEs trained with `rescale_acts_by_decoder_norm` (SAELens' default for training) select on
h ⊙ ‖W_dec‖ and decode f / ‖W_dec‖; on import the norms n are folded into the weights (W_enc·n,
b_enc·n, W_dec/n: unit-norm decoder rows, the same top-k, the same x̂). SAELens' training checkpoints
of `batchtopk` and `matryoshka_batchtopk` SAEs (its inference files are jumprelu) import as
BatchTopKSAE / MatryoshkaBatchTopKSAE with their learned `topk_threshold`. Inputs normalised per
token at run time (`normalize_activations` "layer_norm", "constant_norm_rescale") give a
`RunTimeNormalized` dictionary (normalization.py); "expected_average_only_in" is folded in with
the factor passed as `activation_scale`.

`save_saelens(dictionary, folder)` writes each class as its registry entry's SAELens architecture.
BatchTopKSAE and MatryoshkaBatchTopKSAE become jumprelu SAEs with their learned inference threshold
θ for every latent; TopKTranscoder has no SAELens architecture. A `dictionary_learning` block in
cfg.json names the class, k and groups (SAELens ignores it) so that `load_saelens(folder)` rebuilds
the same class. Exported weights are exact copies, so an export followed by an import gives
identical outputs.
"""
from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import torch

from .dictionary import Dictionary
from .checks import as_dtype
from .files import atomic_write, atomic_write_json, load_state_dict, read_json_object
from .hub import fetch_dictionary, is_hub_path
from .normalization import RUN_TIME_NORMALIZATIONS, RunTimeNormalized
from .registry import ARCHITECTURES, Architecture, architecture, infer_architecture, saelens_architecture
from .saebench import DictionaryConfig, config_from_run

__all__ = [
    "load_dictionary",
    "get_nested_folders",
    "dictionary_from_reference",
    "saelens_state_dict",
    "dictionary_from_saelens",
    "save_saelens",
    "load_saelens",
    "SAELENS_WEIGHTS_FILE",
    "SAELENS_CONFIG_FILE",
]

SAELENS_WEIGHTS_FILE = "sae_weights.safetensors"
SAELENS_CONFIG_FILE = "cfg.json"

_WEIGHTS = ("W_enc", "b_enc", "W_dec", "b_dec")
# the tensors of each SAELens architecture
SAELENS_TENSORS = {
    "standard": _WEIGHTS,
    "topk": _WEIGHTS,
    "abstopk": _WEIGHTS,
    "gated": ("W_enc", "b_gate", "b_mag", "r_mag", "W_dec", "b_dec"),
    "jumprelu": (*_WEIGHTS, "threshold"),
    "transcoder": _WEIGHTS,
    "skip_transcoder": (*_WEIGHTS, "W_skip"),
    "jumprelu_transcoder": (*_WEIGHTS, "threshold"),
    "jumprelu_skip_transcoder": (*_WEIGHTS, "threshold", "W_skip"),
    "batchtopk": _WEIGHTS,  # training checkpoints (+ the learned scalar topk_threshold)
    "matryoshka_batchtopk": _WEIGHTS,
}
# the architectures whose encoder is a top-k (k in the cfg; rescale_acts_by_decoder_norm applies)
SAELENS_TOP_K = ("topk", "abstopk", "batchtopk", "matryoshka_batchtopk")

# cfg.json block holding what SAELens cannot express (our class, k, Matryoshka groups, the top-k
# inference threshold); SAELens ignores unknown fields, our importer uses it to rebuild the class
_OUR_CFG_KEY = "dictionary_learning"


# ---------------------------------------------------------------------------------------------
# Trainer folders (ours and saprmarks/dictionary_learning's)
# ---------------------------------------------------------------------------------------------


def _dictionary_files(path: Path) -> tuple[Path, Path]:
    """(weights file, config.json) for a trainer folder, its ae.pt, or one of its checkpoints."""
    if path.is_dir():
        config_path, weights = path / "config.json", path / "ae.pt"
        if not weights.exists() and (path / "ae.safetensors").exists():
            weights = path / "ae.safetensors"
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
) -> tuple[Dictionary, dict[str, Any]]:
    """Load a saved dictionary and its config: returns (dictionary, config).

    `path`: a trainer folder (`ae.pt` + `config.json`, as written by trainSAE or by
    saprmarks/dictionary_learning; or `ae.safetensors` + `config.json`), its `ae.pt`, a checkpoint
    `checkpoints/ae_STEP.pt` (read with the folder's config.json), a SAELens folder (`cfg.json` +
    `sae_weights.safetensors`), or any of these on the Hugging Face Hub as
    `hf://OWNER/REPO/path/to/folder` (downloaded into the Hub cache: hub.py).
    The class is `config["trainer"]["dict_class"]` (recognised from the weights when absent). The
    dictionary's `cfg` (SAEBench's) says what config.json records: model, hook point, layer, context size.
    `normalize_decoder`: a dictionary whose decoder directions are not unit-norm has the norms
    moved into its encoder where that keeps x̂ (AutoEncoder.normalize_decoder), as the reference
    loader does.
    """
    if is_hub_path(path):
        path = fetch_dictionary(path)
    path, dtype = Path(path), as_dtype(dtype)
    if path.is_dir() and (path / SAELENS_CONFIG_FILE).exists() and not (path / "config.json").exists():
        return load_saelens(path, device=device, dtype=dtype)
    weights, config_path = _dictionary_files(path)
    config = read_json_object(config_path, "folder's config.json")
    trainer_config = config.get("trainer")
    if not isinstance(trainer_config, dict):
        trainer_config = {}
    state_dict = load_state_dict(weights)
    dict_class = trainer_config.get("dict_class") or infer_architecture(
        state_dict, trainer_config.get("trainer_class")).name
    try:
        dictionary = dictionary_from_reference(dict_class, state_dict, trainer_config, normalize_decoder)
    except ValueError as e:
        raise ValueError(f"cannot load {str(weights)!r} as {dict_class} (from {str(config_path)!r}): {e}") from None
    dictionary.cfg = config_from_run(config, dictionary.default_cfg())
    if device is not None or dtype is not None:
        dictionary = dictionary.to(device=device, dtype=dtype)
    return dictionary, config


def get_nested_folders(path: str | os.PathLike) -> list[str]:
    """Every folder under `path` (itself included) that holds an `ae.pt`, sorted."""
    return sorted(root for root, _, files in os.walk(path) if "ae.pt" in files)


def _meta_state_dict(cls: type[Dictionary], state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict (shapes and dtypes) of a `cls` shaped like `state_dict`, on the meta device."""
    with torch.device("meta"):
        return cls(**cls.shape_from_state_dict(state_dict)).state_dict()


def dictionary_from_reference(
    dict_class: str,
    state_dict: dict[str, torch.Tensor],
    trainer_config: dict[str, Any] | None = None,
    normalize_decoder: bool = True,
) -> Dictionary:
    """A dictionary from a state dict written by saprmarks/dictionary_learning (or by us: the
    formats agree). `trainer_config` is the folder's `config["trainer"]`; it supplies `k` to old
    top-k checkpoints that did not store it. `normalize_decoder` moves non-unit decoder norms into
    the encoder, for the classes where that keeps x̂, as the reference's loader does."""
    cls = architecture(dict_class).dictionary
    state_dict = dict(state_dict)
    trainer_config = trainer_config or {}
    if "k" in cls.constructor_buffers and "k" not in state_dict and "k" in trainer_config:
        state_dict["k"] = torch.tensor(int(trainer_config["k"]))
    try:
        expected = _meta_state_dict(cls, state_dict)
    except KeyError as e:
        raise ValueError(
            f"not a {dict_class} state dict: key {e.args[0]!r} is missing (found keys: {sorted(state_dict)})"
        ) from None
    if "threshold" in expected and expected["threshold"].ndim == 0 and "threshold" not in state_dict:
        state_dict["threshold"] = torch.tensor(-1.0)  # written before the inference threshold existed: not set
    for key, value in list(state_dict.items()):  # integer buffers (k) keep our dtype
        if key in expected and not value.is_floating_point() and value.dtype != expected[key].dtype:
            state_dict[key] = value.to(expected[key].dtype)
    dictionary = cls.from_state_dict(state_dict)
    if normalize_decoder and hasattr(dictionary, "normalize_decoder"):
        dictionary.normalize_decoder()
    return dictionary


# ---------------------------------------------------------------------------------------------
# SAELens
# ---------------------------------------------------------------------------------------------


def _learned_threshold(dictionary: Dictionary, threshold: torch.Tensor) -> torch.Tensor:
    """θ [F] for a jumprelu export: per-latent as it is, or a top-k dictionary's global θ for every latent."""
    if threshold.ndim == 1:
        return threshold
    if float(threshold) < 0:
        raise ValueError(
            f"this {type(dictionary).__name__} has no inference threshold yet (threshold = {float(threshold)}: "
            "it is set during training after threshold_start_step); SAELens has no batch-top-k "
            "inference, so train past threshold_start_step before exporting"
        )
    return threshold.expand(dictionary.dict_size)


def saelens_state_dict(dictionary: Dictionary) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, cfg fields) of `dictionary` in SAELens' layout: see the module docstring."""
    normalization = "none"
    if isinstance(dictionary, RunTimeNormalized):
        normalization, dictionary = dictionary.normalization, dictionary.dictionary
    try:
        entry = architecture(type(dictionary))
    except ValueError:
        raise ValueError(
            f"SAELens has no architecture for {type(dictionary).__name__}; exportable classes: "
            f"{', '.join(entry.name for entry in ARCHITECTURES if entry.saelens)}"
        ) from None
    name = entry.saelens_name(dictionary)
    if name is None:
        raise ValueError(f"SAELens has no architecture for {entry.name}; save it as our folder (ae.pt + config.json) "
                         "instead")
    ours = {key: value.detach() for key, value in dictionary.from_saved_names(dictionary.state_dict()).items()}
    if "threshold" in SAELENS_TENSORS[name]:
        ours["threshold"] = _learned_threshold(dictionary, ours["threshold"])
    tensors = {key: ours[key].contiguous().cpu() for key in SAELENS_TENSORS[name]}
    cfg: dict[str, Any] = {"architecture": name, "apply_b_dec_to_input": entry.centres_input,
                           "activation_fn": "relu", "activation_fn_kwargs": {}, "normalize_activations": normalization}
    block: dict[str, Any] = {"dict_class": entry.name}  # what SAELens cannot express goes into our own block
    if "k" in ours:
        k = block["k"] = int(ours["k"])
        if name in SAELENS_TOP_K:
            cfg.update(k=k, rescale_acts_by_decoder_norm=False)
        if name == "topk":
            cfg.update(activation_fn="topk", activation_fn_kwargs={"k": k})
            block["threshold"] = float(ours["threshold"])
        if "group_sizes" in ours:
            block["group_sizes"] = ours["group_sizes"].tolist()
    cfg[_OUR_CFG_KEY] = block
    cfg.update(d_in=dictionary.activation_dim, d_sae=dictionary.dict_size)
    if dictionary.is_transcoder:
        cfg["d_out"] = dictionary.output_dim
    return tensors, cfg


def save_saelens(
    dictionary: Dictionary,
    folder: str | os.PathLike,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write `dictionary` as a SAELens folder: `sae_weights.safetensors` and `cfg.json`.

    `metadata`: extra cfg.json fields SAELens records, e.g. {"model_name": "pythia-70m-deduped",
    "hook_name": "blocks.3.hook_resid_post", "hook_layer": 3, "context_size": 128} (a transcoder
    also has "hook_name_out"). Weights are saved as float32. Returns the folder.
    """
    from safetensors.torch import save as safetensors_bytes

    tensors, fields = saelens_state_dict(dictionary)
    tensors = {key: value.float() for key, value in tensors.items()}
    cfg = {
        **fields,
        "dtype": "float32",
        "device": "cpu",
        "finetuning_scaling_factor": False,
        "reshape_activations": "none",
        "exported_from": f"dictionary_learning {type(dictionary).__name__}",
        **(metadata or {}),
    }
    folder = Path(folder)
    data = safetensors_bytes(tensors)
    atomic_write(folder / SAELENS_WEIGHTS_FILE, lambda file: file.write(data))
    atomic_write_json(cfg, folder / SAELENS_CONFIG_FILE)
    return folder


def _saelens_activation(cfg: dict[str, Any]) -> str:
    return str(cfg.get("activation_fn", cfg.get("activation_fn_str", "relu")) or "relu")


def _saelens_k(cfg: dict[str, Any]) -> int:
    k = cfg.get("k", (cfg.get("activation_fn_kwargs") or {}).get("k"))
    if k is None:
        raise ValueError("SAELens cfg.json of a top-k SAE has neither 'k' nor activation_fn_kwargs.k")
    if float(k) != int(float(k)):
        raise ValueError(f"SAELens k={k} is not a whole number of latents; our top-k dictionaries keep an int k")
    return int(float(k))


def dictionary_from_saelens(
    tensors: dict[str, torch.Tensor],
    cfg: dict[str, Any],
    activation_scale: float | None = None,
) -> Dictionary:
    """One of our dictionaries from SAELens tensors and cfg (see the module docstring); the
    tensors are copied, never shared.

    An SAE whose `apply_b_dec_to_input` differs from our class's convention gets b_dec folded
    into its encoder biases (x'·W = x·W − b_dec·W). `activation_scale`: for cfg
    normalize_activations = "expected_average_only_in", the factor s SAELens multiplies inputs
    by; it is folded in so the result takes raw activations.
    """
    tensors = {key: value.detach().clone() for key, value in tensors.items()}
    return _dictionary_from_saelens(tensors, cfg, activation_scale)


def _saelens_architecture_name(cfg: dict[str, Any]) -> str:
    name = str(cfg.get("architecture", "standard"))
    if name == "standard" and _saelens_activation(cfg) == "topk":
        return "topk"  # SAELens < 6 wrote top-k SAEs as standard + activation_fn "topk"
    return name


def _check_saelens_cfg(architecture_name: str, cfg: dict[str, Any], tensors, activation_scale) -> str:
    """The cfg's normalisation after refusing what cannot be imported exactly."""
    if architecture_name not in SAELENS_TENSORS:
        saelens_architecture(architecture_name)  # raises, listing the supported architectures
    if architecture_name in ("standard", "transcoder", "skip_transcoder") and _saelens_activation(cfg) != "relu":
        raise ValueError(f"SAELens {architecture_name} SAE with activation {_saelens_activation(cfg)!r} is not "
                         "supported (relu is; top-k SAEs are architecture 'topk')")
    if cfg.get("finetuning_scaling_factor") or "finetuning_scaling_factor" in tensors or "scaling_factor" in tensors:
        raise ValueError("SAELens SAEs with a finetuning scaling factor are not supported")
    normalization = cfg.get("normalize_activations") or "none"
    if normalization is True:
        normalization = "expected_average_only_in"
    if normalization not in ("none", "expected_average_only_in", *RUN_TIME_NORMALIZATIONS):
        raise ValueError(
            f"SAELens normalize_activations={normalization!r} cannot be imported: it needs statistics that "
            "cfg.json and the weights do not hold (SAELens folds covariance whitening into the weights when "
            "it saves an inference SAE: load that file instead); supported: none, expected_average_only_in "
            f"(with activation_scale=), {', '.join(RUN_TIME_NORMALIZATIONS)}"
        )
    if normalization == "expected_average_only_in" and activation_scale is None:
        raise ValueError(
            "this SAELens SAE expects inputs scaled by a dataset-wide factor "
            "(normalize_activations='expected_average_only_in'); pass activation_scale=<that factor> "
            "to fold it into the weights"
        )
    return normalization


def _saelens_target(architecture_name: str, cfg: dict[str, Any], tensors: dict[str, torch.Tensor]) -> Architecture:
    """The class to import into: the one our own cfg block names when it was exported as this
    SAELens architecture (with its convention and, for a global threshold, a constant one), else
    the registry's reader of the architecture."""
    block = cfg.get(_OUR_CFG_KEY)
    if isinstance(block, dict) and block.get("dict_class"):
        try:
            entry = architecture(block["dict_class"])
        except ValueError:
            entry = None
        threshold = tensors.get("threshold")
        if (entry is not None and architecture_name in (entry.saelens, entry.saelens_skip)
                and bool(cfg.get("apply_b_dec_to_input", True)) == entry.centres_input
                and (threshold is None or bool((threshold == threshold[0]).all()))):
            return entry
    return saelens_architecture(architecture_name)


def _fold_decoder_norms(ours: dict[str, torch.Tensor]) -> None:
    """SAELens' rescale_acts_by_decoder_norm folded into the weights, in place: with n_i = ‖W_dec[i]‖,
    W_enc[:, i]·n_i, b_enc[i]·n_i, W_dec[i]/n_i (the top-k of h ⊙ n and the decoding of f / n)."""
    norms = ours["W_dec"].norm(dim=1)
    ours["W_enc"] = ours["W_enc"] * norms
    ours["b_enc"] = ours["b_enc"] * norms
    ours["W_dec"] = ours["W_dec"] / norms[:, None]


def _global_threshold(ours: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], block: dict) -> torch.Tensor:
    """θ of a top-k-family dictionary: the constant threshold of its jumprelu export, SAELens'
    learned `topk_threshold` of a batchtopk checkpoint, our block's, or −1 (not learned)."""
    if "threshold" in ours:
        threshold = ours["threshold"][0]
    elif "topk_threshold" in tensors:
        threshold = tensors["topk_threshold"]
    else:
        threshold = block.get("threshold", -1.0)
    return torch.as_tensor(threshold, dtype=torch.float32).clone().reshape(())


def _group_sizes(cfg: dict[str, Any], block: dict, d_sae: int) -> list[int]:
    """Matryoshka group sizes: our block's, or the differences of SAELens' `matryoshka_widths` (the
    cumulative widths of the nested dictionaries, the last one d_sae)."""
    if "group_sizes" in block:
        return [int(size) for size in block["group_sizes"]]
    widths = [int(width) for width in cfg.get("matryoshka_widths") or []]
    if not widths or widths[-1] != d_sae or any(b <= a for a, b in zip([0, *widths], widths)):
        raise ValueError(f"a Matryoshka SAE needs matryoshka_widths increasing to d_sae={d_sae} in cfg.json; got "
                         f"{cfg.get('matryoshka_widths')!r}")
    return [b - a for a, b in zip([0, *widths], widths)]


@torch.no_grad()
def _dictionary_from_saelens(
    tensors: dict[str, torch.Tensor], cfg: dict[str, Any], activation_scale: float | None
) -> Dictionary:
    architecture_name = _saelens_architecture_name(cfg)
    normalization = _check_saelens_cfg(architecture_name, cfg, tensors, activation_scale)
    if "log_threshold" in tensors and "threshold" not in tensors:  # SAELens' older JumpReLU checkpoints
        tensors = {**tensors, "threshold": tensors["log_threshold"].exp()}
    missing = sorted(set(SAELENS_TENSORS[architecture_name]) - set(tensors))
    if missing:
        raise ValueError(f"SAELens {architecture_name} weights lack {missing} (found {sorted(tensors)})")
    ours = {name: tensors[name] for name in SAELENS_TENSORS[architecture_name]}
    W_enc, W_dec, b_dec = ours["W_enc"], ours["W_dec"], ours["b_dec"]
    d_in, d_sae = W_enc.shape
    transcoder = "transcoder" in architecture_name
    if W_dec.shape[0] != d_sae or (not transcoder and W_dec.shape[1] != d_in) or b_dec.shape != W_dec.shape[1:]:
        raise ValueError(f"SAELens W_dec has shape {tuple(W_dec.shape)} and b_dec {tuple(b_dec.shape)}; W_enc "
                         f"{tuple(W_enc.shape)} needs W_dec [{d_sae}, {'d_out' if transcoder else d_in}] and b_dec "
                         "of its width")
    applies_b_dec = bool(cfg.get("apply_b_dec_to_input", not transcoder))
    if transcoder and applies_b_dec:
        raise ValueError("SAELens transcoders never subtract b_dec from their input (it lives in the output "
                         "space); this cfg.json says apply_b_dec_to_input=True")
    if architecture_name in SAELENS_TOP_K and cfg.get("rescale_acts_by_decoder_norm"):
        _fold_decoder_norms(ours)
    entry = _saelens_target(architecture_name, cfg, tensors)
    if applies_b_dec != entry.centres_input:  # keep h = x' W + bias under the other input convention
        sign = -1.0 if applies_b_dec else 1.0
        for bias in ("b_enc", "b_gate", "b_mag"):
            if bias in ours:
                weight = ours["W_enc"] * ours["r_mag"].exp() if bias == "b_mag" else ours["W_enc"]
                ours[bias] = ours[bias] + sign * (b_dec @ weight)
    block = cfg.get(_OUR_CFG_KEY) if isinstance(cfg.get(_OUR_CFG_KEY), dict) else {}
    block = block if block.get("dict_class") == entry.name else {}
    if "k" in entry.dictionary.constructor_buffers:
        ours["k"] = torch.tensor(int(block["k"]) if "k" in block else _saelens_k(cfg), dtype=torch.int)
    if hasattr(entry.dictionary, "has_threshold"):  # the top-k family's global inference threshold θ
        ours["threshold"] = _global_threshold(ours, tensors, block)
    if "group_sizes" in entry.dictionary.constructor_buffers:
        ours["group_sizes"] = torch.tensor(_group_sizes(cfg, block, d_sae), dtype=torch.long)
    dictionary = entry.dictionary.from_state_dict(entry.dictionary.to_saved_names(ours))
    if normalization == "expected_average_only_in":
        dictionary.scale_biases(1.0 / float(activation_scale))
    if normalization in RUN_TIME_NORMALIZATIONS:
        dictionary = RunTimeNormalized(dictionary, normalization)
    return dictionary


def _config_from_saelens(cfg: dict[str, Any], base: DictionaryConfig) -> DictionaryConfig:
    """`base` with what a SAELens cfg.json records about the inputs (top level, or under
    `metadata` from SAELens 6 on): model, hook point (and a transcoder's output hook), layer
    (read off the hook name when absent), context size, BOS, dataset, Neuronpedia id."""
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}

    def field(name: str, default: Any = None) -> Any:
        value = cfg.get(name, metadata.get(name))
        return default if value is None else value

    hook_name = str(field("hook_name", field("hook_point", "")))
    layer = field("hook_layer")
    if layer is None and re.search(r"\d+", hook_name):
        layer = int(re.search(r"\d+", hook_name).group(0))
    return dataclasses.replace(
        base, model_name=str(field("model_name", "")), hook_name=hook_name, hook_layer=layer,
        context_size=field("context_size"), hook_head_index=field("hook_head_index"),
        prepend_bos=bool(field("prepend_bos", True)), dataset_path=str(field("dataset_path", "")),
        neuronpedia_id=field("neuronpedia_id"),
        hook_name_out=field("hook_name_out") if base.d_out is not None else None,
    )


def load_saelens(
    folder: str | os.PathLike,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    activation_scale: float | None = None,
) -> tuple[Dictionary, dict[str, Any]]:
    """(dictionary, cfg) from a SAELens folder holding `cfg.json` and `sae_weights.safetensors`;
    the dictionary's `cfg` (SAEBench's) holds the model and hook point cfg.json records."""
    from safetensors.torch import load_file

    folder = Path(folder)
    cfg_path, weights_path = folder / SAELENS_CONFIG_FILE, folder / SAELENS_WEIGHTS_FILE
    for path in (cfg_path, weights_path):
        if not path.exists():
            raise FileNotFoundError(
                f"{str(path)!r} not found: a SAELens folder holds {SAELENS_CONFIG_FILE} and {SAELENS_WEIGHTS_FILE}"
            )
    dtype = as_dtype(dtype)
    cfg = read_json_object(cfg_path, "SAELens cfg.json")
    try:
        tensors = load_file(str(weights_path))
    except Exception as e:
        raise ValueError(f"could not read {str(weights_path)!r} as a safetensors file: {e}") from e
    try:
        dictionary = _dictionary_from_saelens(tensors, cfg, activation_scale)  # fresh tensors: no copy
    except (KeyError, TypeError, ValueError) as e:
        detail = f"missing key {e}" if isinstance(e, KeyError) else str(e)
        raise ValueError(f"cannot load the SAELens folder {str(folder)!r} ({str(cfg_path)!r}): {detail}") from None
    dictionary.cfg = _config_from_saelens(cfg, dictionary.default_cfg())
    if device is not None or dtype is not None:
        dictionary = dictionary.to(device=device, dtype=dtype)
    return dictionary, cfg
