"""Training recipes, one file each. `get_trainer_class(name)` resolves a recipe by name."""
import importlib

from .base import ConstrainedAdam, SAETrainer, TrainerConfig

# name -> module in this package; imported on first use
_RECIPES = {
    "StandardTrainer": "standard",
    "StandardTrainerAprilUpdate": "standard_april",
    "GatedSAETrainer": "gated",
    "PAnnealTrainer": "p_anneal",
    "GatedAnnealTrainer": "gated_anneal",
    "TopKTrainer": "top_k",
    "BatchTopKTrainer": "batch_top_k",
    "JumpReluTrainer": "jumprelu",
    "MatryoshkaBatchTopKTrainer": "matryoshka_batch_top_k",
}

__all__ = ["ConstrainedAdam", "SAETrainer", "TrainerConfig", "get_trainer_class", "trainer_names", *_RECIPES]


def trainer_names() -> list[str]:
    return list(_RECIPES)


def get_trainer_class(name: str) -> type[SAETrainer]:
    """The trainer class called `name` (e.g. "TopKTrainer")."""
    if name not in _RECIPES:
        raise ValueError(f"unknown trainer {name!r}; known trainers: {', '.join(_RECIPES)}")
    module = importlib.import_module(f".{_RECIPES[name]}", __name__)
    return getattr(module, name)


def __getattr__(name):
    if name in _RECIPES:
        return get_trainer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
