"""Import this checkout as the package `dictionary_learning`, whatever its folder is called.

The repository root is the package. Installed with `pip install -e .` (the README's set-up), the
plain import already finds this checkout; a bare clone under another name does not. The library's
own tests (tests/conftest.py), benchmarks and scripts use `import_checkout()` for that, and
`load_script(name)` to import one of the scripts in this folder as a module (in tests).
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS_DIR = REPO_ROOT / "scripts"


def _in_this_checkout(origin: str | None) -> bool:
    return origin is not None and Path(origin).resolve().parent == REPO_ROOT


def import_checkout() -> ModuleType:
    """`dictionary_learning` imported from this checkout (an installed copy only if it is this one)."""
    loaded = sys.modules.get("dictionary_learning")
    if loaded is not None:
        if _in_this_checkout(getattr(loaded, "__file__", None)):
            return loaded
        raise RuntimeError(f"dictionary_learning is already imported from {loaded.__file__}, not from this "
                           f"checkout ({REPO_ROOT}); import this checkout first")
    spec = importlib.util.find_spec("dictionary_learning")
    if spec is None or not _in_this_checkout(spec.origin):
        spec = importlib.util.spec_from_file_location(
            "dictionary_learning", REPO_ROOT / "__init__.py", submodule_search_locations=[str(REPO_ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["dictionary_learning"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["dictionary_learning"]
        raise
    return module


def load_script(name: str) -> ModuleType:
    """The script scripts/<name>.py as a module (its `if __name__ == "__main__"` part does not run)."""
    import_checkout()
    module_name = f"dictionary_learning_scripts.{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS_DIR / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module
