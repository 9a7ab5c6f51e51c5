"""Every architecture of the library, declared once.

An `Architecture` says what a dictionary class is to the rest of the library: the recipes that
train it (trainer classes, each in its own file in trainers/), the class and trainer names the
reference library (saprmarks/dictionary_learning) writes into its configs, the saved state-dict keys
that identify it when a config does not name it, and how it maps to SAELens. `load_dictionary`, the
interop readers and writers, and the trainer lookup read this table; nothing else switches on
names. Adding an architecture = its dictionary class in dictionary.py + its recipe file in trainers/
(none for an architecture only read from other libraries' files) + one entry below.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Iterable

from .dictionary import (
    AbsTopKSAE,
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    Dictionary,
    GatedAutoEncoder,
    JumpReluAutoEncoder,
    JumpReluTranscoder,
    MatryoshkaBatchTopKSAE,
    TopKTranscoder,
    Transcoder,
)

__all__ = ["Architecture", "ARCHITECTURES", "architecture", "dictionary_class", "recipe_names", "recipe_class",
           "infer_architecture", "saelens_architecture"]


@dataclass(frozen=True)
class Architecture:
    """What the library knows about one dictionary class."""

    dictionary: type[Dictionary]
    recipes: dict[str, str]
    """trainer class name -> its module in trainers/ (imported on first use)."""
    saved_keys: frozenset[str]
    """keys that identify a saved state dict of this class when its config names no class (empty:
    only a config naming the class identifies it)."""
    saelens: str | None
    """the SAELens architecture it is exported as ("standard", "gated", "topk", "jumprelu", ...); None
    when SAELens has none."""
    saelens_reads: tuple[str, ...] = ()
    """SAELens architectures imported into this class."""
    saelens_skip: str | None = None
    """the SAELens architecture of its instances with a skip connection (skip transcoders)."""
    centres_input: bool = True
    """whether the encoder sees x − b_dec (SAELens' apply_b_dec_to_input)."""
    reference_classes: tuple[str, ...] = ()
    """other `dict_class` names the reference library writes for it (its own name always counts)."""
    reference_trainers: tuple[str, ...] = field(default=())
    """`trainer_class` names of the reference library's recipes that train it."""

    @property
    def name(self) -> str:
        return self.dictionary.__name__

    @property
    def class_names(self) -> tuple[str, ...]:
        return (self.name, *self.reference_classes)

    def saelens_name(self, dictionary: Dictionary) -> str | None:
        """The SAELens architecture of this instance (a skip transcoder's differs from its class's)."""
        return self.saelens_skip if getattr(dictionary, "skip", False) and self.saelens_skip else self.saelens

    def saelens_fields(self, dictionary: Dictionary) -> dict:
        """The cfg fields SAELens and SAEBench use to say how `dictionary` computes: architecture,
        apply_b_dec_to_input, activation_fn_str and activation_fn_kwargs (k for a top-k encoder)."""
        name = self.saelens_name(dictionary) or self.name
        top_k = name in ("topk", "abstopk")
        return {"architecture": name, "apply_b_dec_to_input": self.centres_input,
                "activation_fn_str": "topk" if top_k else "relu",
                "activation_fn_kwargs": {"k": int(dictionary.k)} if top_k else {}}


ARCHITECTURES: tuple[Architecture, ...] = (
    Architecture(
        AutoEncoder,
        recipes={"StandardTrainer": "standard", "StandardTrainerAprilUpdate": "standard_april",
                 "PAnnealTrainer": "p_anneal"},
        saved_keys=frozenset({"bias", "encoder.weight", "encoder.bias", "decoder.weight"}),
        saelens="standard", saelens_reads=("standard",),
    ),
    Architecture(
        GatedAutoEncoder,
        recipes={"GatedSAETrainer": "gated", "GatedAnnealTrainer": "gated_anneal"},
        saved_keys=frozenset({"decoder_bias", "r_mag", "gate_bias", "mag_bias"}),
        saelens="gated", saelens_reads=("gated",),
    ),
    Architecture(
        AutoEncoderTopK,
        recipes={"TopKTrainer": "top_k"},
        saved_keys=frozenset({"encoder.weight", "b_dec"}),
        saelens="topk", saelens_reads=("topk",),
    ),
    Architecture(
        BatchTopKSAE,
        recipes={"BatchTopKTrainer": "batch_top_k"},
        saved_keys=frozenset({"encoder.weight", "b_dec"}),
        saelens="jumprelu",  # with the learned inference threshold θ for every latent
        saelens_reads=("batchtopk",),  # SAELens' training checkpoints (its inference files are jumprelu)
    ),
    Architecture(
        MatryoshkaBatchTopKSAE,
        recipes={"MatryoshkaBatchTopKTrainer": "matryoshka_batch_top_k"},
        saved_keys=frozenset({"W_enc", "W_dec", "group_sizes"}),
        saelens="jumprelu", saelens_reads=("matryoshka_batchtopk",),
    ),
    Architecture(
        JumpReluAutoEncoder,
        recipes={"JumpReluTrainer": "jumprelu"},
        saved_keys=frozenset({"W_enc", "W_dec", "threshold"}),
        saelens="jumprelu", saelens_reads=("jumprelu",), centres_input=False,
    ),
    Architecture(
        Transcoder,
        recipes={"TranscoderTrainer": "transcoder"},
        saved_keys=frozenset(), centres_input=False,
        saelens="transcoder", saelens_skip="skip_transcoder", saelens_reads=("transcoder", "skip_transcoder"),
    ),
    Architecture(
        TopKTranscoder,
        recipes={"TopKTranscoderTrainer": "top_k_transcoder"},
        saved_keys=frozenset(), saelens=None, centres_input=False,
    ),
    Architecture(
        JumpReluTranscoder,
        recipes={"JumpReluTranscoderTrainer": "jumprelu_transcoder"},
        saved_keys=frozenset(), centres_input=False, saelens="jumprelu_transcoder",
        saelens_skip="jumprelu_skip_transcoder", saelens_reads=("jumprelu_transcoder", "jumprelu_skip_transcoder"),
    ),
    # read-only architectures: no recipe of ours trains them; loaded from the reference's folders / SAELens
    Architecture(
        AutoEncoderNew,
        recipes={},
        saved_keys=frozenset({"encoder.weight", "encoder.bias", "decoder.weight", "decoder.bias"}),
        saelens="standard", centres_input=False,
    ),
    Architecture(
        AbsTopKSAE,
        recipes={},
        saved_keys=frozenset(), saelens="abstopk", saelens_reads=("abstopk",),
    ),
)

for _entry in ARCHITECTURES:  # each class knows its entry (Dictionary.cfg reads its SAELens name there)
    _entry.dictionary.architecture_entry = _entry
del _entry


def _names(entries: Iterable[Architecture]) -> str:
    return ", ".join(entry.name for entry in entries)


def architecture(name_or_class: str | type[Dictionary]) -> Architecture:
    """The entry of a dictionary class, given the class or one of its names (ours or the reference's)."""
    for entry in ARCHITECTURES:
        if name_or_class is entry.dictionary or name_or_class in entry.class_names:
            return entry
    name = getattr(name_or_class, "__name__", name_or_class)
    raise ValueError(f"unknown dictionary class {name!r}; this version of dictionary_learning has: "
                     f"{_names(ARCHITECTURES)}")


def dictionary_class(name: str) -> type[Dictionary]:
    """The dictionary class called `name` (ours or the reference library's name for it)."""
    return architecture(name).dictionary


def recipe_names() -> list[str]:
    """Every trainer class name, in the order of the table."""
    return [recipe for entry in ARCHITECTURES for recipe in entry.recipes]


def recipe_class(name: str):
    """The trainer class called `name` (e.g. "TopKTrainer"), imported from its module on first use."""
    for entry in ARCHITECTURES:
        if name in entry.recipes:
            module = importlib.import_module(f".trainers.{entry.recipes[name]}", __package__)
            return getattr(module, name)
    raise ValueError(f"unknown trainer {name!r}; known trainers: {', '.join(recipe_names())}")


def infer_architecture(keys: Iterable[str], trainer_class: str | None = None) -> Architecture:
    """The architecture of a saved state dict whose config names no class: by its recipe
    (`trainer_class`, ours or the reference's) when that is known, else by its keys."""
    keys = set(keys)
    for entry in ARCHITECTURES:
        if trainer_class and (trainer_class in entry.recipes or trainer_class in entry.reference_trainers):
            if entry.saved_keys <= keys:  # an entry without saved_keys: its recipe alone identifies it
                return entry
    matches = [entry for entry in ARCHITECTURES if entry.saved_keys and entry.saved_keys <= keys]
    if not matches:
        raise ValueError(
            f"cannot tell the dictionary class from the state-dict keys {sorted(keys)}; "
            "add trainer.dict_class (e.g. \"AutoEncoder\") to the folder's config.json"
        )
    return max(matches, key=lambda entry: len(entry.saved_keys))  # the most specific; a tie: the first listed


def saelens_architecture(name: str) -> Architecture:
    """The entry that imports SAELens architecture `name`."""
    for entry in ARCHITECTURES:
        if name in entry.saelens_reads:
            return entry
    supported = ", ".join(arch for entry in ARCHITECTURES for arch in entry.saelens_reads)
    raise ValueError(f"SAELens architecture {name!r} is not supported; supported: {supported}")
