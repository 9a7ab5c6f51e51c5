"""Test-suite set-up: `dictionary_learning` is this checkout (whatever its folder is called;
scripts/_checkout.py), and torch runs on one thread.

After `pip install -e .` the import already finds this checkout; on a bare clone under another name
`import_checkout` maps it. Tests reach the scripts of scripts/ through the `load_script` fixture, and
the tiny language models of tests/lm_fixtures.py as `import lm_fixtures` and the in-memory Hub of
tests/hub_fixtures.py as `import hub_fixtures` (registered here: tests/ is not a package, since the
repository root above it is one).
"""
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest
import torch

_checkout = runpy.run_path(str(Path(__file__).resolve().parents[1] / "scripts" / "_checkout.py"))
_checkout["import_checkout"]()

for _name in ("lm_fixtures", "hub_fixtures"):
    _spec = importlib.util.spec_from_file_location(_name, Path(__file__).with_name(f"{_name}.py"))
    sys.modules[_name] = _module = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(_module)

# Tests use small tensors: one thread avoids OpenMP spin-waits that dominate on a busy 2-core
# machine, and keeps results independent of the core count.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def load_script():
    """load_script(name): the module of scripts/<name>.py."""
    return _checkout["load_script"]
