"""The README's runnable examples (the code blocks after `<!-- example: NAME -->`) run as written,
on the bundled offline model, in a temporary folder."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def examples() -> dict[str, str]:
    text = README.read_text()
    return {name: code for name, code in re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.S)}


def test_the_readme_marks_its_examples():
    assert {"sites", "transcoder", "compat", "cache", "dashboard"} <= set(examples())


def test_readme_compat_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(examples()["compat"], "README.md example compat", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.splitlines() == ["torch.Size([1024, 128])", "standard 1024", "True"]
    assert (tmp_path / "saelens_folder" / "cfg.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["sites", "transcoder", "cache", "dashboard"])
def test_readme_example_runs(name, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(examples()[name], f"README.md example {name}", "exec"), {"__name__": "readme_example"})
    printed = capsys.readouterr().out
    if name == "sites":
        rows = [line for line in printed.splitlines() if line.startswith("| trainer_")]
        assert len(rows) == 4 and all("TopKTrainer" in row for row in rows)
        assert sorted(path.name for path in (tmp_path / "runs" / "all_mlps").iterdir() if path.is_dir()) == \
            [f"trainer_{i}" for i in range(4)]
    elif name == "cache":
        results = re.findall(r"(\w+): FVU ([-\d.]+), L0 ([\d.]+)", printed)
        assert [recipe for recipe, _, _ in results] == ["TopKTrainer", "StandardTrainer"]
        assert all(0 <= float(fvu) < 0.5 and float(l0) > 0 for _, fvu, l0 in results)  # both learned the cache
        assert sorted(path.name for path in (tmp_path / "runs").iterdir()) == ["StandardTrainer", "TopKTrainer"]
        assert len(list((tmp_path / "cache" / "tiny-pythia").glob("shard-*.dlshard"))) == 4
    elif name == "dashboard":
        assert printed.strip().endswith("index.html") and (tmp_path / "runs" / "dashboard" / "latent.html").is_file()
        stats = torch.load(tmp_path / "runs" / "dashboard" / "features.pt", weights_only=True)
        fired = stats["tensors"]["fire_count"].sum().item()
        assert stats["n_tokens"] == 20_000 and 0.95 * 16 * 20_000 <= fired <= 16 * 20_000  # L0 of a k = 16 TopK
    else:
        fvu, recovered = (float(value) for value in re.findall(r"(?:FVU|CE recovered) ([-\d.]+)", printed))
        assert 0 <= fvu < 0.5 and recovered > 0.5  # a transcoder of the MLP, not noise
