"""Make the repository importable as `dictionary_learning` whatever its folder is called.

After `pip install -e .` the import already works; this only covers running pytest on a bare
clone.
"""
import importlib.util
import pathlib
import sys

import torch

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

if "dictionary_learning" not in sys.modules:
    try:
        import dictionary_learning  # noqa: F401
    except ImportError:
        spec = importlib.util.spec_from_file_location(
            "dictionary_learning",
            REPO_ROOT / "__init__.py",
            submodule_search_locations=[str(REPO_ROOT)],
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["dictionary_learning"] = module
        spec.loader.exec_module(module)

# Tests use small tensors: one thread avoids OpenMP spin-waits that dominate on a busy 2-core
# machine, and keeps results independent of the core count.
torch.set_num_threads(1)
