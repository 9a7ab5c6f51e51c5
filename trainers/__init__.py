"""Training recipes, one file each; which recipes exist is declared in registry.py.
`get_trainer_class(name)` resolves a recipe by name, importing its module on first use."""
from ..registry import recipe_class as get_trainer_class
from ..registry import recipe_names as trainer_names
from .base import ConstrainedAdam, SAETrainer, TrainerConfig

__all__ = ["ConstrainedAdam", "SAETrainer", "TrainerConfig", "get_trainer_class", "trainer_names", *trainer_names()]


def __getattr__(name):
    if name in trainer_names():
        return get_trainer_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
