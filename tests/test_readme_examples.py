"""The README's code runs as written: every python or bash block is either a runnable example (the
block after `<!-- example: NAME -->`, run here on the bundled offline model in a temporary folder),
a CI command (`<!-- ci:... -->`, run by .ci/run), or says why it is not run (`<!-- not run: ... -->`).

The examples of the Python API walk-through (collect, train, sweep, load, saelens, evaluate) run
in that order in one namespace, as a reader would type them, with the Hub names and GPU sizes
swapped by SUBSTITUTIONS (each must occur, so the README cannot drift from them)."""
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"

SUBSTITUTIONS = {
    'LanguageModel("EleutherAI/pythia-70m-deduped", device_map="cuda:0")': "load_bundled_model()",
    'hf_dataset_to_generator("monology/pile-uncopyrighted")': "stdlib_text_stream(repeat=True)",
    '"cuda:0"': '"cpu"',
    "n_ctxs=3e4": "n_ctxs=32, ctx_len=64, refresh_batch_size=16, out_batch_size=64",
    "sparsity_penalty=1e-3, steps=10_000": "sparsity_penalty=1e-3, steps=40, warmup_steps=4",
    '"k": 32}': '"k": 32, "warmup_steps": 4, "threshold_start_step": 20}',
    '"sparsity_penalty": 1.0}': '"sparsity_penalty": 1.0, "warmup_steps": 4, "sparsity_warmup_steps": 8}',
    "steps=10_000": "steps=40",
    "save_steps=[1000, 5000]": "save_steps=[20]",
    '"dict_size": 8192': '"dict_size": 512',
    "n_batches=10": "n_batches=2",
    "text_batch(32)": "text_batch(4)",
}
"""Pythia-70m and The Pile -> the bundled model and the stdlib text; GPU sizes -> CPU test sizes, and
schedules sized for 10,000 steps -> the test's 40 steps."""
WALKTHROUGH = ["collect", "train", "sweep", "load", "saelens", "evaluate"]


def examples() -> dict[str, str]:
    text = README.read_text()
    return {name: code for name, code in re.findall(r"<!-- example: (\w+) -->\n```python\n(.*?)```", text, re.S)}


def test_every_code_block_runs_here_or_in_ci_or_says_why_not():
    lines = README.read_text().splitlines()
    unmarked = [f"README.md:{i + 1}" for i, line in enumerate(lines) if re.match(r"```(python|bash)", line)
                and not re.match(r"<!-- (example: \w+|ci:\w+|not run: .+) -->$", lines[i - 1])]
    assert unmarked == []
    assert {"sites", "transcoder", "compat", "cache", "dashboard", "use", *WALKTHROUGH} <= set(examples())


def test_readme_compat_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(examples()["compat"], "README.md example compat", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.splitlines() == ["torch.Size([1024, 128])", "standard 1024", "True"]
    assert (tmp_path / "saelens_folder" / "cfg.json").exists()


def test_readme_use_example_runs_on_a_dictionary_where_the_downloader_puts_it(tmp_path, monkeypatch):
    from dictionary_learning import AutoEncoder

    monkeypatch.chdir(tmp_path)
    path = tmp_path / "dictionaries/pythia-70m-deduped/mlp_out_layer1/10_32768/ae.pt"
    path.parent.mkdir(parents=True)
    published = AutoEncoder(512, 2048, generator=torch.Generator().manual_seed(0))  # the published layout, fewer latents
    torch.save(published.state_dict(), path)
    namespace = {"__name__": "readme_example"}
    exec(compile(examples()["use"], "README.md example use", "exec"), namespace)
    assert namespace["features"].shape == (16, 2048) and torch.equal(namespace["recon"], published(namespace["acts"]))


@pytest.mark.slow
def test_readme_python_api_walkthrough_runs_with_the_bundled_model(tmp_path, monkeypatch):
    from dictionary_learning import load_bundled_model, stdlib_text_stream

    monkeypatch.chdir(tmp_path)
    found = examples()
    code = "\n".join(found[name] for name in WALKTHROUGH)
    for old, new in SUBSTITUTIONS.items():
        assert old in code, f"the README no longer writes {old!r}; update SUBSTITUTIONS"
        code = code.replace(old, new)
    namespace = {"__name__": "readme_example", "load_bundled_model": load_bundled_model,
                 "stdlib_text_stream": stdlib_text_stream}
    exec(compile(code, "README.md Python API walk-through", "exec"), namespace)
    assert namespace["activation_dim"] == 128 and namespace["acts"].shape == (64, 128)
    assert namespace["dictionary_size"] == 2048 and len(namespace["aes"]) == 3
    assert sorted(p.name for p in (tmp_path / "runs" / "sweep").iterdir() if p.is_dir()) == \
        ["trainer_0", "trainer_1", "trainer_2"]
    config = namespace["config"]
    assert config["trainer"]["trainer_class"] == "TopKTrainer" and config["training"]["steps_done"] == 40
    assert (tmp_path / "saelens_folder" / "cfg.json").exists()
    metrics, ce = namespace["metrics"], namespace["ce"]
    assert {"MSE", "L1", "L0", "% alive", "variance explained", "CE diff", "% CE recovered"} <= set(metrics)
    assert metrics["L0"] == 32  # the TopK dictionary the walk-through loaded: k latents per token
    assert 0.5 < ce["frac_recovered"] <= 1.05  # a dictionary of the MLP, not noise
    assert {"ce_clean", "ce_reconstructed", "ce_zero", "ce_diff", "frac_recovered", "kl_reconstructed"} <= set(ce)


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
