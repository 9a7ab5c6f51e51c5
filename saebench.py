"""What SAEBench (and SAELens-style tools) read off a dictionary besides its weights: a `cfg` with
the model, the hook point and the shapes, and TransformerLens hook names for our module paths.

SAEBench evaluates any `nn.Module` with `encode`, `decode`, `forward`, `W_enc` [D, F], `W_dec`
[F, D], `b_enc`, `b_dec`, `device`, `dtype` and a `cfg` whose fields are those of its
`CustomSAEConfig` (`model_name`, `d_in`, `d_sae`, `hook_name`, `hook_layer`, `context_size`,
`architecture`, ..., `to_dict()`). Every `Dictionary` has them (dictionary.py); `DictionaryConfig`
is that cfg, filled from a run folder's config.json by `load_dictionary` (`config_from_run`).

TransformerLens names the hook points of its own model implementation; where one of our module paths
reads the same tensor, `transformer_lens_hook` gives its name (the table `TRANSFORMER_LENS_HOOKS`):

    gpt_neox.layers.N / transformer.h.N / model.layers.N   out -> blocks.N.hook_resid_post
                                                           in  -> blocks.N.hook_resid_pre
    gpt_neox.layers.N.mlp / transformer.h.N.mlp            out -> blocks.N.hook_mlp_out
    gpt_neox.layers.N.attention / transformer.h.N.attn     out -> blocks.N.hook_attn_out
    gpt_neox.embed_in / transformer.wte                    out -> hook_embed

Not mapped: inputs of MLPs and attention (they are layer-normed, and TransformerLens folds the norm's
weights into the next layer by default, so its tensors differ), and the MLP/attention outputs of
`model.layers.N` (Llama-like models), because Gemma-2/3 apply a norm after them that
TransformerLens' hook_mlp_out includes. An unmapped site keeps its module path as `hook_name`.
"""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = ["DictionaryConfig", "TRANSFORMER_LENS_HOOKS", "transformer_lens_hook", "config_from_run"]

# (module path pattern with the layer as group 1 where there is one, io) -> TransformerLens hook
TRANSFORMER_LENS_HOOKS: dict[tuple[str, str], str] = {
    (r"(?:gpt_neox\.layers|transformer\.h|model\.layers)\.(\d+)", "out"): "blocks.{layer}.hook_resid_post",
    (r"(?:gpt_neox\.layers|transformer\.h|model\.layers)\.(\d+)", "in"): "blocks.{layer}.hook_resid_pre",
    (r"(?:gpt_neox\.layers|transformer\.h)\.(\d+)\.mlp", "out"): "blocks.{layer}.hook_mlp_out",
    (r"gpt_neox\.layers\.(\d+)\.attention", "out"): "blocks.{layer}.hook_attn_out",
    (r"transformer\.h\.(\d+)\.attn", "out"): "blocks.{layer}.hook_attn_out",
    (r"gpt_neox\.embed_in|transformer\.wte", "out"): "hook_embed",
}


def transformer_lens_hook(path: str, io: str = "out") -> tuple[str, int] | None:
    """(hook name, layer) of TransformerLens' hook point that reads what `io` ("out" or "in") of
    the module at `path` is, or None when there is none (see the module docstring)."""
    for (pattern, hook_io), hook in TRANSFORMER_LENS_HOOKS.items():
        match = re.fullmatch(pattern, path)
        if match and hook_io == io:
            layer = int(match.group(1)) if match.groups() else 0
            return hook.format(layer=layer), layer
    return None


@dataclass
class DictionaryConfig:
    """SAEBench's `CustomSAEConfig` fields (SAELens' cfg before version 6, which SAEBench reads):
    where the dictionary's inputs come from and how it computes. Attributes may be added freely
    (SAEBench adds `architecture_str` and `metadata`); `to_dict()` gives the fields."""

    model_name: str
    d_in: int
    d_sae: int
    hook_layer: int | None
    hook_name: str
    context_size: int | None = None
    hook_head_index: int | None = None
    architecture: str = ""
    apply_b_dec_to_input: bool = True
    finetuning_scaling_factor: bool = False
    activation_fn_str: str = "relu"
    activation_fn_kwargs: dict[str, Any] = field(default_factory=dict)
    prepend_bos: bool = True
    normalize_activations: str = "none"
    dtype: str = "float32"
    device: str = "cpu"
    model_from_pretrained_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset_path: str = ""
    dataset_trust_remote_code: bool = True
    seqpos_slice: tuple = (None,)
    training_tokens: int = 0
    sae_lens_training_version: str | None = None
    neuronpedia_id: str | None = None
    d_out: int | None = None
    """a transcoder's output width (None for an autoencoder)."""
    hook_name_out: str | None = None
    """where a transcoder's output is read (None for an autoencoder)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def follow(self, dtype: torch.dtype, device: torch.device) -> None:
        """Record the dictionary's dtype and device (as SAELens writes them: "float32", "cuda:0")."""
        self.dtype = str(dtype).removeprefix("torch.")
        self.device = str(device)


def config_from_run(config: dict[str, Any], base: DictionaryConfig) -> DictionaryConfig:
    """`base` (a dictionary's own cfg: shapes, architecture) with what a run folder's config.json
    says about its inputs: the model (`trainer.lm_name`, else `buffer.model`), the site as a
    TransformerLens hook name where one exists (else the module path; `trainer.submodule_name`
    when no path is recorded), its layer, the context size and the tokens trained on."""
    trainer = config.get("trainer") if isinstance(config.get("trainer"), dict) else {}
    buffer = config.get("buffer") if isinstance(config.get("buffer"), dict) else {}
    training = config.get("training") if isinstance(config.get("training"), dict) else {}
    path = buffer.get("submodule")
    io = buffer.get("io", "out")
    hook_name, layer, hook_name_out = None, trainer.get("layer"), None
    if isinstance(path, str):
        found = transformer_lens_hook(path, "out" if io == "in_to_out" else io)
        if io == "in_to_out":
            hook_name, hook_name_out = path, (found[0] if found else path)
        elif found is not None:
            hook_name = found[0]
            layer = found[1] if layer is None else layer
        else:
            hook_name = path
    hook_name = hook_name or trainer.get("submodule_name") or base.hook_name
    steps, batch = training.get("steps"), buffer.get("out_batch_size")
    tokens = steps * batch if isinstance(steps, int) and isinstance(batch, int) else base.training_tokens
    return DictionaryConfig(**{
        **base.to_dict(),
        "model_name": trainer.get("lm_name") or buffer.get("model") or base.model_name,
        "hook_name": hook_name,
        "hook_layer": layer if layer is not None else base.hook_layer,
        "context_size": buffer.get("ctx_len", base.context_size),
        "training_tokens": tokens,
        "hook_name_out": hook_name_out if base.d_out is not None else None,
    })
