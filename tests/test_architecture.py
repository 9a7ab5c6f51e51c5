"""The skeleton the library is built on: the architecture table (registry.py) is complete and every
architecture round-trips through every format; the module layers import downwards only, with no
cycles and no private names across modules; recipes import the base, the families and the kernels,
never each other."""
import ast
import inspect
import json
from pathlib import Path

import pytest
import torch

import dictionary_learning
from dictionary_learning import dictionary as dictionary_module
from dictionary_learning.interop import load_dictionary, load_saelens, save_saelens
from dictionary_learning.registry import ARCHITECTURES, architecture, infer_architecture, recipe_class, recipe_names

REPO = Path(dictionary_learning.__file__).resolve().parent
D, F_ = 8, 32
EXTRA_ARGUMENTS = {"k": 3, "group_sizes": [4, 12, 16]}
TRANSCODER_ARGUMENTS = {"output_dim": 5, "skip": True}  # another output width, and the skip connection


@torch.no_grad()
def random_dictionary(entry, seed=0):
    """An instance of the entry's class with every float tensor random (thresholds positive)."""
    cls = entry.dictionary
    generator = torch.Generator().manual_seed(seed)
    parameters = inspect.signature(cls).parameters
    extra = {name: value for name, value in TRANSCODER_ARGUMENTS.items() if name in parameters}
    dictionary = cls(D, F_, **{name: EXTRA_ARGUMENTS[name] for name in cls.constructor_buffers}, **extra,
                     generator=generator)
    for name, tensor in [*dictionary.named_parameters(), *dictionary.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if name == "threshold":
            tensor.copy_(torch.rand(tensor.shape, generator=generator) * 0.3 + 0.05)
        else:
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.3)
    return dictionary


def assert_same_outputs(a, b):
    assert type(a) is type(b)
    x = torch.randn(40, D, generator=torch.Generator().manual_seed(1)) * 2
    assert torch.equal(a(x), b(x))
    assert torch.equal(a.encode(x), b.encode(x))
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_every_public_dictionary_class_has_one_entry_and_every_recipe_trains_it():
    public = {name for name, obj in vars(dictionary_module).items()
              if inspect.isclass(obj) and issubclass(obj, dictionary_module.Dictionary) and not name.startswith("_")
              and obj.__module__ == dictionary_module.__name__}
    assert public - {"Dictionary", "IdentityDict"} == {entry.name for entry in ARCHITECTURES}
    assert len(recipe_names()) == len(set(recipe_names()))
    for entry in ARCHITECTURES:
        assert architecture(entry.name) is entry and architecture(entry.dictionary) is entry
        for recipe in entry.recipes:
            assert recipe_class(recipe).dictionary_class is entry.dictionary, recipe
    with pytest.raises(ValueError, match="unknown dictionary class 'NoSuch'") as error:
        architecture("NoSuch")
    assert str(error.value).endswith(": " + ", ".join(entry.name for entry in ARCHITECTURES))  # no private classes


@pytest.mark.parametrize("entry", ARCHITECTURES, ids=lambda entry: entry.name)
def test_every_architecture_round_trips_through_every_format(tmp_path, entry):
    dictionary = random_dictionary(entry)
    # our trainer folders and the reference library's: ae.pt + config.json naming the class
    for name in entry.class_names:
        folder = tmp_path / f"folder_{name}"
        folder.mkdir()
        torch.save(dictionary.state_dict(), folder / "ae.pt")
        (folder / "config.json").write_text(json.dumps({"trainer": {"dict_class": name}}))
        loaded, _ = load_dictionary(folder, normalize_decoder=False)
        assert_same_outputs(dictionary, loaded)
    # a config that names only the recipe: the class is recognised from the recipe and the keys
    for recipe in entry.recipes:
        assert infer_architecture(dictionary.state_dict(), recipe) is entry
    # the bare weights file
    torch.save(dictionary.state_dict(), tmp_path / "ae.pt")
    assert_same_outputs(dictionary, entry.dictionary.from_pretrained(tmp_path / "ae.pt"))
    # SAELens
    if entry.saelens is None:
        with pytest.raises(ValueError, match=f"SAELens has no architecture for {entry.name}"):
            save_saelens(dictionary, tmp_path / "saelens")
        return
    save_saelens(dictionary, tmp_path / "saelens")
    assert json.loads((tmp_path / "saelens" / "cfg.json").read_text())["architecture"] == entry.saelens_name(dictionary)
    loaded, _ = load_saelens(tmp_path / "saelens")
    assert_same_outputs(dictionary, loaded)


# --------------------------------------------------------------------------------------------
# Imports
# --------------------------------------------------------------------------------------------


def package_modules() -> dict[str, Path]:
    """Module name (relative to the package) -> file, for every module of the package."""
    files = sorted(REPO.glob("*.py")) + sorted((REPO / "trainers").glob("*.py"))
    return {str(path.relative_to(REPO).with_suffix("")).replace("/", "."): path for path in files}


def relative_imports(name: str, path: Path) -> list[tuple[str, list[str]]]:
    """(imported module, imported names) for each relative import anywhere in the file."""
    package = name.rsplit(".", 1)[0] if "." in name else ""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            parts = package.split(".") if package else []
            parts = parts[: len(parts) - (node.level - 1)]
            if node.module is None:
                found += [(".".join(parts + [alias.name]), []) for alias in node.names]
            else:
                found.append((".".join(parts + [node.module]), [alias.name for alias in node.names]))
    return found


def test_modules_import_each_other_without_cycles_or_private_names():
    modules = package_modules()
    graph = {}
    for name, path in modules.items():
        targets = set()
        for target, names in relative_imports(name, path):
            target = {"": "__init__", "trainers": "trainers.__init__"}.get(target, target)
            assert target in modules, f"{name} imports {target}, which is not a module of the package"
            private = [n for n in names if n.startswith("_")]
            assert not private, f"{name} imports private names {private} from {target}"
            targets.add(target)
        graph[name] = targets

    def visit(node, path):
        for target in graph[node]:
            assert target not in path, f"import cycle: {' -> '.join(path[path.index(target):] + [target])}"
            visit(target, path + [target])

    for name in graph:
        visit(name, [name])


def test_recipes_import_only_the_base_the_families_and_the_kernels():
    allowed = {"dictionary", "kernels", "trainers.base", "trainers.families"}
    recipe_modules = {f"trainers.{module}" for entry in ARCHITECTURES for module in entry.recipes.values()}
    modules = package_modules()
    for name in recipe_modules:
        imported = {target for target, _ in relative_imports(name, modules[name])}
        assert imported <= allowed, f"{name} imports {sorted(imported - allowed)}"


# --------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------


def readme_api_names() -> list[str]:
    """The names listed in the README's "## API" table (first column, in backticks)."""
    text = (REPO / "README.md").read_text()
    section = text.split("\n## API\n", 1)[1].split("\n## ", 1)[0]
    return [line.split("`")[1] for line in section.splitlines() if line.startswith("| `")]


def test_the_package_exports_exactly_what_the_readme_documents():
    documented = readme_api_names()
    assert len(documented) == len(set(documented))
    assert sorted(documented) == sorted(dictionary_learning.__all__)
    for name in documented:
        assert getattr(dictionary_learning, name) is not None, name
