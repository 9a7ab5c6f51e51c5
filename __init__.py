"""dictionary_learning: train, load and evaluate sparse autoencoders on model activations.

The public API is what `__all__` lists; the README documents each name. Submodules are imported
lazily so that `import dictionary_learning` stays cheap (nnsight and transformers load only when the
buffer or the language-model metrics are first used).
"""
import importlib

__version__ = "0.2.0"

_EXPORTS = {
    # dictionaries
    "Dictionary": "dictionary",
    "AutoEncoder": "dictionary",
    "IdentityDict": "dictionary",
    "GatedAutoEncoder": "dictionary",
    "AutoEncoderTopK": "dictionary",
    "BatchTopKSAE": "dictionary",
    "JumpReluAutoEncoder": "dictionary",
    "MatryoshkaBatchTopKSAE": "dictionary",
    # activations
    "ActivationBuffer": "buffer",
    # training
    "trainSAE": "training",
    "ConstrainedAdam": "training",
    # evaluation
    "evaluate": "evaluation",
    "loss_recovered": "evaluation",
    # saving and loading
    "load_dictionary": "utils",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        module = importlib.import_module(f".{_EXPORTS[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'dictionary_learning' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
