"""dictionary_learning: train, load and evaluate sparse autoencoders on model activations.

The public API is `__all__`, the names the README's "API" section lists (tests/test_public_api.py
checks that the two agree). nnsight and transformers load only when the buffer or the
language-model metrics are first used.
"""
from .buffer import ActivationBuffer
from .bundled import load_bundled_model, stdlib_text_stream
from .cache import cache_activations
from .cache_reader import CachedActivations
from .dashboards import dashboard, render_dashboard
from .dictionary import (
    AbsTopKSAE,
    AutoEncoder,
    AutoEncoderNew,
    AutoEncoderTopK,
    BatchTopKSAE,
    Dictionary,
    GatedAutoEncoder,
    IdentityDict,
    JumpReluAutoEncoder,
    JumpReluTranscoder,
    MatryoshkaBatchTopKSAE,
    TopKTranscoder,
    Transcoder,
)
from .evaluation import MetricAccumulator, evaluate, evaluate_sweep, format_table, fvu, loss_recovered, tensor_metrics
from .feature_stats import FeatureStats, collect_features
from .interop import load_dictionary, load_saelens, save_saelens
from .synthetic import (
    HierarchicalActivations,
    SyntheticActivations,
    dictionary_directions,
    fraction_recovered,
    ground_truth_scores,
    mean_correlation_coefficient,
    mean_max_cosine_similarity,
)
from .trainers.base import ConstrainedAdam
from .training import trainSAE
from .utils import hf_dataset_to_generator, keep_freed_cpu_memory, zst_to_generator

__version__ = "0.3.0"

__all__ = [
    "AbsTopKSAE",
    "ActivationBuffer",
    "AutoEncoder",
    "AutoEncoderNew",
    "AutoEncoderTopK",
    "BatchTopKSAE",
    "CachedActivations",
    "ConstrainedAdam",
    "Dictionary",
    "FeatureStats",
    "GatedAutoEncoder",
    "HierarchicalActivations",
    "IdentityDict",
    "JumpReluAutoEncoder",
    "JumpReluTranscoder",
    "MatryoshkaBatchTopKSAE",
    "MetricAccumulator",
    "SyntheticActivations",
    "TopKTranscoder",
    "Transcoder",
    "cache_activations",
    "collect_features",
    "dashboard",
    "dictionary_directions",
    "evaluate",
    "evaluate_sweep",
    "format_table",
    "fraction_recovered",
    "fvu",
    "ground_truth_scores",
    "hf_dataset_to_generator",
    "keep_freed_cpu_memory",
    "load_bundled_model",
    "load_dictionary",
    "load_saelens",
    "loss_recovered",
    "mean_correlation_coefficient",
    "mean_max_cosine_similarity",
    "render_dashboard",
    "save_saelens",
    "stdlib_text_stream",
    "tensor_metrics",
    "trainSAE",
    "zst_to_generator",
]
