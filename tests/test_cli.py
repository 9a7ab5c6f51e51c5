"""`python -m dictionary_learning`: every subcommand through the command line, on the bundled
offline model (a tiny run trained once per module), and every kind of bad input answered with one
line (no traceback) that names the fix."""
import dataclasses
import functools
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hub_fixtures import FakeHub

from dictionary_learning import load_dictionary, load_saelens
from dictionary_learning.cli import COMMANDS, main
from dictionary_learning.dataclass_args import ConfigError, build, convert, field_docs
from dictionary_learning.run_config import TrainRunConfig, parse_recipe, resolve_run_config

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "24", "--batch-size", "256", "--n-ctxs", "24", "--ctx-len", "64", "--refresh-batch-size", "8",
        "--eval-batches", "2", "--eval-texts", "4", "--no-progress", "--threads", "1"]
SWEEP = ["--recipe", "StandardTrainer:sparsity_penalty=3,lr=1e-3", "--recipe", "topk:k=16,dict_size=512"]


def run_cli(capsys, *argv):
    """(exit status, stdout, stderr) of the command line `argv`, run in this process."""
    try:
        status = main(list(argv))
    except SystemExit as exit_:
        status = exit_.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, err, *fragments, code=None):
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]
    assert status == (code if code is not None else status) and status != 0
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A sweep of two recipes on the bundled model's layer-0 MLP, trained through the CLI."""
    folder = tmp_path_factory.mktemp("cli") / "run"
    status = main(["train", *TINY, *SWEEP, "--save-dir", str(folder)])
    assert status == 0
    return folder


# --------------------------------------------------------------------------------------------
# The parser: help from the dataclasses, one-line errors
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_of_every_command_lists_each_field_with_its_docstring_and_default(name, capsys):
    status, out, _ = run_cli(capsys, name, "--help")
    assert status == 0
    text = " ".join(out.split())
    config = COMMANDS[name].config
    docs = field_docs(config)
    for field in dataclasses.fields(config):
        if field.metadata.get("positional"):
            assert field.metadata.get("metavar", field.name.upper()) in text
        else:
            assert field.metadata.get("flag", "--" + field.name.replace("_", "-")) in text
        assert docs[field.name][:40] in text, field.name  # the docstring is the help
    if name == "train":
        assert "--steps STEPS training steps (batches); none: until the data runs out. (default: 1500)" in text
        assert "(default: StandardTrainer:sparsity_penalty=3.0,lr=0.001)" in text


def test_no_arguments_print_the_commands(capsys):
    status, out, _ = run_cli(capsys)
    assert status == 0 and all(name in out for name in COMMANDS)


def test_python_dash_m_runs_the_command_line():
    code = ("import runpy, sys; c = runpy.run_path(sys.argv[1]); c['import_checkout'](); sys.argv = ['x', 'recipes']; "
            "runpy.run_module('dictionary_learning', run_name='__main__')")
    result = subprocess.run([sys.executable, "-c", code, str(REPO / "scripts" / "_checkout.py")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "TopKTrainer" in result.stdout and "JumpReluTranscoderTrainer" in result.stdout


@pytest.mark.parametrize("argv, fragments", [
    (["trian"], ["invalid choice: 'trian'", "did you mean 'train'?"]),
    (["train", "--stpes", "10"], ["unknown option --stpes", "did you mean '--steps'?"]),
    (["eval", "run", "--n-batch", "2"], ["did you mean '--n-batches'?"]),
    (["train", "--io", "both"], ["invalid choice: 'both'", "'in_to_out'"]),
    (["train", "--steps", "many"], ["--steps", "'many'"]),
    (["train", "--recipe", "TopKTraner:k=32"], ["unknown recipe 'TopKTraner'", "did you mean 'TopKTrainer'?",
                                                "JumpReluTrainer"]),
    (["train", "--recipe", "TopKTrainer:kk=32"], ["TopKTrainer has no hyperparameter 'kk'", "did you mean 'k'?",
                                                  "auxk_alpha"]),
    (["train", "--recipe", "TopKTrainer:k=lots"], ["recipe TopKTrainer: k must be an int", "'lots'"]),
    (["train", "--recipe", "TopKTrainer:k"], ["'k' is not key=value"]),
    (["train", "--recipe", "TopKTrainer:activation_dim=3"], ["activation_dim is set by the run"]),
    (["train", "--steps", "0"], ["steps must be a positive int"]),
    (["train", "--resume", "--overwrite", "--save-dir", "x"], ["resume and overwrite exclude each other"]),
    (["recipes", "topkk"], ["unknown recipe 'topkk'", "did you mean 'TopKTrainer'?"]),
])
def test_bad_arguments_get_one_line_naming_the_fix(argv, fragments, capsys):
    status, _, err = run_cli(capsys, *argv)
    assert_one_line_error(status, err, *fragments, code=2)


def test_config_file_keys_are_checked_with_a_suggestion(tmp_path, capsys):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"stpes": 10}))
    status, _, err = run_cli(capsys, "train", "--config", str(path))
    assert_one_line_error(status, err, "run.json: unknown key 'stpes'; did you mean 'steps'?", code=2)
    path.write_text(json.dumps({"steps": "ten"}))
    status, _, err = run_cli(capsys, "train", "--config", str(path))
    assert_one_line_error(status, err, "steps must be an int", "'ten'", code=2)
    path.write_text("{not json")
    status, _, err = run_cli(capsys, "train", "--config", str(path))
    assert_one_line_error(status, err, "is not valid JSON", code=2)
    status, _, err = run_cli(capsys, "train", "--config", str(tmp_path / "missing.yaml"))
    assert_one_line_error(status, err, "missing.yaml' not found", code=2)


def test_yaml_config_with_flags_overriding_it(tmp_path, capsys):
    pytest.importorskip("yaml")  # PyYAML is the optional 'yaml' extra
    path = tmp_path / "run.yaml"
    path.write_text("steps: 300\nsites: [gpt_neox.layers.1.mlp]\nrecipes:\n  - TopKTrainer:k=8\n"
                    "  - {trainer: BatchTopKTrainer, k: 16}\nsave_dir: somewhere\n")
    status, out, _ = run_cli(capsys, "train", "--config", str(path), "--steps", "400", "--print-config")
    assert status == 0
    config = json.loads(out)
    assert config["steps"] == 400 and config["sites"] == ["gpt_neox.layers.1.mlp"] and config["save_dir"] == "somewhere"
    assert config["recipes"] == [{"trainer": "TopKTrainer", "k": 8, "warmup_steps": 40, "threshold_start_step": 200},
                                 {"trainer": "BatchTopKTrainer", "k": 16, "warmup_steps": 40,
                                  "threshold_start_step": 200}]
    path.write_text("steps: [unclosed\n")
    status, _, err = run_cli(capsys, "train", "--config", str(path))
    assert_one_line_error(status, err, "is not valid YAML", code=2)


# --------------------------------------------------------------------------------------------
# Configs: dataclasses, recipes, resolution
# --------------------------------------------------------------------------------------------


def test_convert_follows_the_annotation():
    assert convert("1e3", int, "x") == 1000 and convert("0.5", float, "x") == 0.5
    assert convert("none", int | None, "x") is None and convert("no", bool, "x") is False
    assert convert("1,2,3", list[int], "x") == [1, 2, 3] and convert("[0.25, 0.75]", list[float], "x") == [0.25, 0.75]
    assert convert({"trainer": "TopKTrainer"}, list[str | dict], "x") == [{"trainer": "TopKTrainer"}]
    for value, annotation in [("1.5", int), (True, int), ("maybe", bool), (None, int), ("x", float)]:
        with pytest.raises(ConfigError, match="^where"):
            convert(value, annotation, "where")


def test_build_layers_defaults_file_then_flags():
    config = build(TrainRunConfig, {"steps": 10, "seed": 3}, {"steps": "20"}, where=["file", "flags"])
    assert (config.steps, config.seed, config.model) == (20, 3, "bundled")
    with pytest.raises(ConfigError, match="file: unknown key 'sede'; did you mean 'seed'"):
        build(TrainRunConfig, {"sede": 1}, where=["file"])
    assert field_docs(TrainRunConfig)["steps"] == "training steps (batches); none: until the data runs out."


def test_recipes_parse_to_trainsae_configs():
    assert parse_recipe("topk:k=32,dict_size=4096") == {"trainer": "TopKTrainer", "k": 32, "dict_size": 4096}
    assert parse_recipe("MatryoshkaBatchTopKTrainer:k=8,group_fractions=0.25,0.75") == {
        "trainer": "MatryoshkaBatchTopKTrainer", "k": 8, "group_fractions": [0.25, 0.75]}
    assert parse_recipe({"trainer": "StandardTrainer", "l1_penalty": "0.1"}) == {
        "trainer": "StandardTrainer", "sparsity_penalty": 0.1}  # the reference's key, converted


def test_resolution_sizes_schedules_to_the_run_and_fills_target_l0():
    config = resolve_run_config(TrainRunConfig(steps=200, target_l0=20, device="cpu", save_dir="x", recipes=[
        "TopKTrainer", "StandardTrainer", "JumpReluTrainer:sparsity_warmup_steps=50", "TopKTrainer:k=4,warmup_steps=30"]))
    assert config.recipes == [
        {"trainer": "TopKTrainer", "k": 20, "warmup_steps": 20, "threshold_start_step": 100},
        {"trainer": "StandardTrainer", "target_l0": 20, "warmup_steps": 20},
        {"trainer": "JumpReluTrainer", "sparsity_warmup_steps": 50, "target_l0": 20, "warmup_steps": 20},
        {"trainer": "TopKTrainer", "k": 4, "warmup_steps": 30, "threshold_start_step": 100},
    ]
    assert config.log_steps == 2 and resolve_run_config(config) == config  # idempotent
    assert resolve_run_config(dataclasses.replace(config, tokens=1000, batch_size=256)).steps == 4


# --------------------------------------------------------------------------------------------
# train, eval, export on the bundled model
# --------------------------------------------------------------------------------------------


def state(folder):
    return load_dictionary(folder)[0].state_dict()


@pytest.mark.slow
def test_train_writes_the_run_folder(trained_run):
    record = json.loads((trained_run / "run_config.json").read_text())
    assert record["command"].startswith("python -m dictionary_learning train --steps 24")
    assert record["config"]["recipes"] == [
        {"trainer": "StandardTrainer", "sparsity_penalty": 3.0, "lr": 0.001, "warmup_steps": 2},
        {"trainer": "TopKTrainer", "k": 16, "dict_size": 512, "warmup_steps": 2, "threshold_start_step": 12}]
    assert record["config"]["overwrite"] is False and record["config"]["resume"] is False
    for i, (recipe, dict_size) in enumerate([("StandardTrainer", 1024), ("TopKTrainer", 512)]):
        folder = trained_run / f"trainer_{i}"
        trainer = json.loads((folder / "config.json").read_text())["trainer"]
        assert (trainer["trainer_class"], trainer["activation_dim"], trainer["dict_size"]) == (recipe, 128, dict_size)
        assert trainer["site"] == "gpt_neox.layers.0.mlp" and trainer["seed"] == 0 and trainer["steps"] == 24
        steps = [json.loads(line)["step"] for line in (folder / "log.jsonl").read_text().splitlines()]
        assert steps[0] == 1 and steps[-1] == 24
    rows = json.loads((trained_run / "eval.json").read_text())["rows"]
    assert [row["folder"] for row in rows] == ["trainer_0", "trainer_1"]
    assert rows[1]["l0"] == pytest.approx(16, abs=0.5)  # TopK keeps k latents per token
    assert all(0 < row["fvu"] < 1 and 0 < row["ce_recovered"] <= 1.05 for row in rows)


@pytest.mark.slow
def test_train_prints_the_folder_first_and_a_summary_last(tmp_path, capsys):
    status, out, err = run_cli(capsys, "train", *TINY, "--steps", "6", "--eval-batches", "0", "--save-dir",
                               str(tmp_path / "run"), "--recipe", "BatchTopKTrainer:k=8")
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0] == f"run folder: {tmp_path / 'run'}"
    assert "trained 1 dictionary for 6 steps (1,536 activations)" in out
    assert "| trainer_0 | gpt_neox.layers.0.mlp | BatchTopKTrainer k=8 | 1024 |" in out
    assert lines[-1].startswith(f"next: python -m dictionary_learning plot {tmp_path / 'run'}")


@pytest.mark.slow
def test_run_config_repeats_the_run_and_a_used_folder_is_refused(trained_run, tmp_path, capsys):
    recorded = trained_run / "run_config.json"
    status, _, err = run_cli(capsys, "train", "--config", str(recorded))
    assert_one_line_error(status, err, f"save_dir {str(trained_run)!r} holds the dictionaries of an earlier run",
                          "pass --resume to continue it, --overwrite to replace it, or another --save-dir", code=1)
    again = tmp_path / "again"
    status, _, _ = run_cli(capsys, "train", "--config", str(recorded), "--save-dir", str(again), "--eval-batches", "0")
    assert status == 0
    for name in ("trainer_0", "trainer_1"):
        for key, value in state(trained_run / name).items():
            assert torch.equal(value, state(again / name)[key]), (name, key)
    status, _, err = run_cli(capsys, "train", "--resume", "--save-dir", str(again))
    assert_one_line_error(status, err, "--resume", "training_state.pt' not found", code=1)


@pytest.mark.slow
def test_resume_continues_the_recorded_run(tmp_path, capsys):
    folder = tmp_path / "run"
    argv = [*TINY, "--steps", "8", "--save-steps", "4", "--eval-batches", "0", "--save-dir", str(folder),
            "--recipe", "topk:k=8"]
    assert run_cli(capsys, "train", *argv)[0] == 0
    (folder / "trainer_0" / "ae.pt").unlink()  # as if killed after its checkpoint at step 4
    status, out, _ = run_cli(capsys, "train", "--resume", "--save-dir", str(folder), "--steps", "12")
    assert status == 0, out
    config = json.loads((folder / "trainer_0" / "config.json").read_text())
    assert config["training"]["steps_done"] == 12 and config["trainer"]["k"] == 8
    steps = [json.loads(line)["step"] for line in (folder / "trainer_0" / "log.jsonl").read_text().splitlines()]
    assert steps[-1] == 12 and steps == sorted(set(steps))


@pytest.mark.slow
def test_eval_scores_a_sweep_as_a_table_or_json(trained_run, capsys):
    status, out, _ = run_cli(capsys, "eval", str(trained_run), "--n-batches", "2", "--batch-size", "256", "--texts",
                             "2", "--no-save")
    assert status == 0
    assert out.splitlines()[0].startswith("| run | folder | site | trainer | dict_size | l0 | fvu | dead_pct |")
    status, out, _ = run_cli(capsys, "eval", str(trained_run / "trainer_1"), "--json", "--n-batches", "2",
                             "--batch-size", "256", "--texts", "2", "--no-save")
    assert status == 0
    (row,) = json.loads(out)
    assert row["trainer"] == "TopKTrainer" and row["folder"] == "." and row["l0"] == pytest.approx(16, abs=0.5)
    assert {"fvu", "dead_pct", "ce_recovered", "kl"} <= set(row)


@pytest.mark.slow
def test_export_writes_saelens_and_safetensors_folders_that_load_identically(trained_run, tmp_path, capsys):
    x = torch.randn(32, 128, generator=torch.Generator().manual_seed(0))
    status, out, _ = run_cli(capsys, "export", str(trained_run), str(tmp_path / "saelens"))
    assert status == 0 and "exported 2 dictionaries as saelens" in out
    status, _, _ = run_cli(capsys, "export", str(trained_run), str(tmp_path / "st"), "--format", "safetensors")
    assert status == 0
    for name in ("trainer_0", "trainer_1"):
        ours, _ = load_dictionary(trained_run / name)
        theirs, cfg = load_saelens(tmp_path / "saelens" / name)
        assert torch.equal(ours(x), theirs(x))
        assert cfg["hook_name"] == "blocks.0.hook_mlp_out" and cfg["hook_layer"] == 0 and cfg["context_size"] == 64
        again, _ = load_dictionary(tmp_path / "st" / name / "ae.safetensors")
        assert torch.equal(ours(x), again(x))


def test_a_site_glob_that_matches_nothing_is_one_line(tmp_path, capsys):
    status, _, err = run_cli(capsys, "train", *TINY, "--sites", "gpt_neox.layers.*.mlpp", "--save-dir",
                             str(tmp_path / "run"))
    assert_one_line_error(status, err, "the pattern 'gpt_neox.layers.*.mlpp' matches no submodule of the model",
                          "gpt_neox.layers.0.mlp", code=1)
    assert not (tmp_path / "run" / "run_config.json").exists()


@pytest.mark.slow
def test_a_local_model_folder_and_text_files_train(tmp_path, capsys):
    from lm_fixtures import documents, fresh_tokenizer, tiny_gpt_neox

    model_dir = tmp_path / "model"
    tiny_gpt_neox(hidden=32, layers=2).save_pretrained(model_dir)
    status, _, err = run_cli(capsys, "train", "--model", str(model_dir))
    assert_one_line_error(status, err, "has no tokenizer files", "tokenizer.save_pretrained", code=1)
    fresh_tokenizer().save_pretrained(model_dir)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i, document in enumerate(documents(200)):
        (texts / f"doc{i:03d}.txt").write_text(document)
    status, out, err = run_cli(capsys, "train", *TINY, "--steps", "4", "--model", str(model_dir), "--dataset",
                               str(texts), "--sites", "gpt_neox.layers.*.mlp", "--recipe", "topk:k=4",
                               "--save-dir", str(tmp_path / "run"))
    assert status == 0, err
    folders = sorted(p.name for p in (tmp_path / "run").glob("trainer_*"))
    assert folders == ["trainer_0", "trainer_1"]  # one per matched site
    buffer = json.loads((tmp_path / "run" / "trainer_1" / "config.json").read_text())["buffer"]
    assert buffer["submodule"] == "gpt_neox.layers.1.mlp" and buffer["d_submodule"] == 32


# --------------------------------------------------------------------------------------------
# download: the published dictionaries, through the downloader script
# --------------------------------------------------------------------------------------------


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.mark.skipif(not any(Path(d, tool).exists() for d in os.environ.get("PATH", "").split(os.pathsep)
                            for tool in ("curl", "wget")), reason="neither curl nor wget is installed")
def test_download_runs_the_downloader_with_the_flags(tmp_path, capfd, monkeypatch):
    served = tmp_path / "served" / "pythia-70m-deduped" / "embed" / "10_32768"
    served.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    torch.save({"bias": torch.randn(16, generator=generator), "encoder.weight": torch.randn(64, 16, generator=generator),
                "encoder.bias": torch.randn(64, generator=generator),
                "decoder.weight": torch.randn(16, 64, generator=generator)}, served / "ae.pt")
    (served / "config.json").write_text('{"trainer": {"activation_dim": 16, "dict_size": 64}}')
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler,
                                                                               directory=str(tmp_path / "served")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("DL_TREE_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    try:
        status, out, err = run_cli(capfd, "download", "--layers", "embed", "--source", "tree", "--dir",
                                   str(tmp_path / "dicts"), "--expect-shape", "16,64", "--no-verify")
    finally:
        server.shutdown()
        server.server_close()
    assert status == 0, err
    downloaded = tmp_path / "dicts" / "pythia-70m-deduped" / "embed" / "10_32768" / "ae.pt"
    assert downloaded.read_bytes() == (served / "ae.pt").read_bytes()
    assert "1 submodule(s)" in out and "embed" in out  # the script reports what it fetched (its own tests check it)
    status, _, err = run_cli(capfd, "download", "--source", "ftp")
    assert_one_line_error(status, err, "invalid choice: 'ftp'", code=2)


# --------------------------------------------------------------------------------------------
# Live metrics: every recipe logs loss, L0, FVU and dead %
# --------------------------------------------------------------------------------------------


def recipe_config(name, d=16, f=64):
    config = {"trainer": name, "activation_dim": d, "dict_size": f, "warmup_steps": 0, "seed": 0}
    if "TopK" in name:
        config.update(k=4, **({} if "Transcoder" in name else {"threshold_start_step": 5}))
    if "JumpRelu" in name:
        config["sparsity_warmup_steps"] = 5
    if name == "MatryoshkaBatchTopKTrainer":
        config["group_fractions"] = [0.25, 0.75]
    if "Anneal" in name:
        config["anneal_start"] = 5
    return config


@pytest.mark.parametrize("name", __import__("dictionary_learning.registry", fromlist=["x"]).recipe_names())
def test_every_recipe_reports_l0_and_fvu_of_the_batch_it_trained_on(name):
    import copy

    from dictionary_learning.evaluation import fvu
    from dictionary_learning.training import build_trainer

    trainer = build_trainer(recipe_config(name), steps=40)
    generator = torch.Generator().manual_seed(0)
    batch = lambda: torch.randn(64, 16, generator=generator) * 2 + 1  # noqa: E731
    pair = lambda: (batch(), batch())  # noqa: E731
    transcoder = "Transcoder" in name
    trainer.update(0, pair() if transcoder else batch())
    x = pair() if transcoder else batch()
    before = copy.deepcopy(trainer.ae)
    metrics = trainer.update(1, x)
    assert {"loss", "l0", "fvu", "mse_loss"} <= set(metrics), name
    inputs, target = x if transcoder else (x, x)
    if name in ("StandardTrainer", "StandardTrainerAprilUpdate", "PAnnealTrainer", "GatedSAETrainer",
                "GatedAnnealTrainer", "JumpReluTrainer", "TopKTrainer", "TranscoderTrainer"):
        with torch.no_grad():  # the step's loss saw the weights before its update: the same x̂ and features
            features = before.encode(inputs)
            reconstruction = before.decode(features) + (before.skip_term(inputs) if transcoder else 0)
        assert float(metrics["fvu"]) == pytest.approx(fvu(target, reconstruction), rel=1e-4)
        assert float(metrics["l0"]) == pytest.approx(float((features != 0).sum(-1).float().mean()), rel=1e-5)
    else:
        assert 0 < float(metrics["fvu"]) < 10 and 0 < float(metrics["l0"]) <= 64
    trainer.full_metrics = False  # trainSAE's setting for steps it neither logs nor shows: no extra pass
    assert ("fvu" in trainer.update(2, x)) == (name in ("TranscoderTrainer", "TopKTranscoderTrainer",
                                                        "JumpReluTranscoderTrainer"))


def test_the_log_and_the_bar_show_loss_l0_fvu_and_dead_and_a_run_inside_warmup_warns(tmp_path):
    from dictionary_learning import trainSAE
    from dictionary_learning.training import _postfix  # noqa: the bar's text, checked on its own

    generator = torch.Generator().manual_seed(0)
    batches = [torch.randn(128, 16, generator=generator) for _ in range(6)]
    with pytest.warns(UserWarning, match=r"ended after 6 steps, inside the learning-rate warmup of trainer 1 "
                                         r"\(TopKTrainer, warmup_steps=50\)"):
        trainSAE(iter(batches), trainer_configs=[{**recipe_config("StandardTrainer"), "warmup_steps": 2},
                                                 {**recipe_config("TopKTrainer"), "warmup_steps": 50}],
                 save_dir=tmp_path, log_steps=3, progress=False)
    for i in range(2):
        records = [json.loads(line) for line in (tmp_path / f"trainer_{i}" / "log.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == [1, 3, 6]
        assert all({"loss", "l0", "fvu", "dead_pct"} <= set(r) for r in records)
        assert all(0 <= r["dead_pct"] <= 100 for r in records)
    assert _postfix([{"loss": 0.5, "l0": 31.25, "fvu": 0.0874, "dead_pct": 1.25}]) == \
        "loss 0.5, L0 31.2, FVU 0.087, dead 1.2%"
    assert _postfix([{"loss": 0.5, "l0": 12, "fvu": 0.1, "dead_pct": 0.0},
                     {"loss": 0.7, "l0": 64, "fvu": 0.05, "dead_pct": 3.0}]) == \
        "loss 0.5–0.7, L0 12–64, FVU 0.050–0.100, dead 0.0–3.0%"


def test_dead_fraction_counts_latents_silent_for_the_window_or_since_the_start():
    from dictionary_learning.trainers.base import DeadLatentTracker

    tracker = DeadLatentTracker(4, "cpu")
    tracker.update(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0]]))  # latents 2, 3 never fired
    assert tracker.dead_fraction(1, window_tokens=100) == 0.5
    for _ in range(3):
        tracker.update(torch.tensor([[0, 1.0, 0, 0], [0, 0, 0, 0]]))  # latent 0 silent for 6 tokens
    assert tracker.dead_fraction(4, window_tokens=100) == 0.5
    assert tracker.dead_fraction(4, window_tokens=6) == 0.75


# --------------------------------------------------------------------------------------------
# plot
# --------------------------------------------------------------------------------------------


def png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


@pytest.mark.slow
def test_plot_writes_the_curves_of_each_run_and_the_frontier_of_all(trained_run, tmp_path, capsys):
    pytest.importorskip("matplotlib")  # the optional 'plot' extra
    from dictionary_learning.plots import _frontier_points  # noqa: the points the frontier draws

    status, out, _ = run_cli(capsys, "plot", str(trained_run), str(trained_run / "trainer_1"), "--out",
                             str(tmp_path / "plots"), "--dpi", "50")
    assert status == 0
    written = [Path(line) for line in out.splitlines()]
    assert [p.name for p in written] == ["run_curves.png", "trainer_1_curves.png", "frontier.png"]
    for path in written:
        width, height = png_size(path)
        assert width > 200 and height > 150
    points, evaluated = _frontier_points([trained_run])
    rows = json.loads((trained_run / "eval.json").read_text())["rows"]
    assert evaluated and [(p["recipe"], p["l0"], p["fvu"], p["ce_recovered"]) for p in points] == \
        [(r["trainer"], r["l0"], r["fvu"], r["ce_recovered"]) for r in rows]
    assert [p["label"] for p in points] == ["StandardTrainer λ=3", "TopKTrainer k=16"]


def test_plot_without_matplotlib_or_logs_is_one_line(tmp_path, capsys, monkeypatch):
    from dictionary_learning import plots

    with monkeypatch.context() as patch:  # whether or not matplotlib is installed, the missing log is named
        patch.setattr(plots, "_figure_class", lambda: object)
        status, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert_one_line_error(status, err, "holds no log.jsonl", code=1)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # as if matplotlib were not installed
    status, _, err = run_cli(capsys, "plot", str(tmp_path))
    assert_one_line_error(status, err, "plot needs matplotlib: pip install matplotlib", code=1)


@pytest.mark.slow
def test_the_readme_python_api_example_runs(tmp_path, monkeypatch, capsys):
    import re

    readme = (REPO / "README.md").read_text()
    (code,) = re.findall(r"<!-- example: cli -->\n```python\n(.*?)```", readme, re.S)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md example cli", "exec"), {"__name__": "readme_example"})
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["TopKTrainer", "BatchTopKTrainer"]
    assert lines[0].split()[1] == "16" and 0 < int(lines[1].split()[1]) < 64  # BatchTopK: its learned threshold
    assert json.loads((tmp_path / "runs" / "python_api" / "run_config.json").read_text())["command"] is None


# --------------------------------------------------------------------------------------------
# cache, dashboard, push
# --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_cache_writes_a_cache_that_train_reads_without_the_model(tmp_path, capsys, monkeypatch):
    from dictionary_learning import CachedActivations

    cache = tmp_path / "cache"
    status, out, err = run_cli(capsys, "cache", str(cache), "--sites", "gpt_neox.layers.*.mlp", "--n-tokens", "3000",
                               "--ctx-len", "64", "--refresh-batch-size", "8", "--shard-tokens", "1024",
                               "--dtype", "float32", "--no-progress", "--threads", "1")
    assert status == 0, err
    assert out.splitlines()[0].startswith(f"{cache}: 3,0")  # at least n_tokens rows, the last forward batch whole
    manifest = json.loads((cache / "manifest.json").read_text())
    assert list(manifest["sites"]) == [f"gpt_neox.layers.{i}.mlp" for i in range(4)]
    assert manifest["rows"] >= 3000 and manifest["data_source"] == "stdlib" and manifest["ctx_len"] == 64
    reader = CachedActivations(cache, site="gpt_neox.layers.2.mlp", batch_size=512, shuffle=False)
    assert next(iter(reader)).shape == (512, 128)

    import dictionary_learning.workflow as workflow

    def no_model(*args, **kwargs):
        raise AssertionError("train on a cache loaded the language model")

    monkeypatch.setattr(workflow, "load_language_model", no_model)
    run = tmp_path / "run"
    status, out, err = run_cli(capsys, "train", "--dataset", str(cache), "--sites", "gpt_neox.layers.[12].mlp",
                               "--recipe", "topk:k=8,dict_size=256", "--steps", "6", "--batch-size", "256",
                               "--eval-batches", "2", "--no-progress", "--threads", "1", "--save-dir", str(run))
    assert status == 0, err
    record = json.loads((run / "run_config.json").read_text())["config"]
    assert record["model"] == manifest["model"]["name"] and record["ctx_len"] == 64
    configs = [json.loads((run / f"trainer_{i}" / "config.json").read_text()) for i in range(2)]
    assert [c["trainer"]["site"] for c in configs] == ["gpt_neox.layers.1.mlp", "gpt_neox.layers.2.mlp"]
    assert all(c["buffer"]["cache"] == str(cache.resolve()) for c in configs)
    rows = json.loads((run / "eval.json").read_text())["rows"]
    assert [row["l0"] for row in rows] == [pytest.approx(8, abs=0.01)] * 2 and all(0 < r["fvu"] < 1 for r in rows)
    monkeypatch.undo()
    status, out, err = run_cli(capsys, "eval", str(run), "--json", "--n-batches", "1", "--batch-size", "256",
                               "--texts", "2", "--no-save")  # on the text the cache was written from
    assert status == 0, err
    assert [row["site"] for row in json.loads(out)] == ["gpt_neox.layers.1.mlp", "gpt_neox.layers.2.mlp"]
    assert all("ce_recovered" in row for row in json.loads(out))

    status, _, err = run_cli(capsys, "train", "--dataset", str(cache), "--sites", "gpt_neox.layers.*.attn",
                             "--save-dir", str(tmp_path / "bad"))
    assert_one_line_error(status, err, "--sites 'gpt_neox.layers.*.attn' matches no site of the activation cache",
                          "gpt_neox.layers.0.mlp", code=2)
    status, _, err = run_cli(capsys, "train", "--dataset", str(cache), "--io", "in", "--save-dir", str(tmp_path / "b"))
    assert_one_line_error(status, err, "holds io='out' activations; pass --io out", code=2)
    status, _, err = run_cli(capsys, "cache", str(cache), "--n-tokens", "100", "--no-progress")
    assert_one_line_error(status, err, f"{str(cache)!r} holds an activation cache already; pass --resume", code=2)
    status, _, err = run_cli(capsys, "cache", str(cache), "--n-tokens", "100", "--resume", "--ctx-len", "32",
                             "--no-progress")
    assert_one_line_error(status, err, "ctx_len: cache has 64, now 32", code=1)
    status, out, err = run_cli(capsys, "cache", str(cache), "--resume", "--n-tokens", "4000", "--sites",
                               "gpt_neox.layers.*.mlp", "--ctx-len", "64", "--refresh-batch-size", "8",
                               "--shard-tokens", "1024", "--dtype", "float32", "--no-progress")
    assert status == 0, err  # extended: the shards written before are kept as they were
    extended = json.loads((cache / "manifest.json").read_text())
    assert extended["rows"] >= 4000 and extended["shards"][:len(manifest["shards"])] == manifest["shards"]
    status, _, err = run_cli(capsys, "cache", str(tmp_path / "c2"), "--n-tokens", "0")
    assert_one_line_error(status, err, "n_tokens must be a positive int; got 0", code=2)
    status, _, err = run_cli(capsys, "cache", str(tmp_path / "c2"), "--dtype", "float8")
    assert_one_line_error(status, err, "invalid choice: 'float8'", code=2)


@pytest.mark.slow
def test_dashboard_of_a_run_reads_model_and_site_from_each_folder(trained_run, tmp_path, capsys):
    out_dir = tmp_path / "dash"
    status, out, err = run_cli(capsys, "dashboard", str(trained_run), "--n-tokens", "2000", "--out", str(out_dir),
                               "--no-progress", "--threads", "1")
    assert status == 0, err
    assert out.splitlines() == [str(out_dir / name / "index.html") for name in ("trainer_0", "trainer_1")]
    for name, dict_size in (("trainer_0", 1024), ("trainer_1", 512)):
        stats = torch.load(out_dir / name / "features.pt", weights_only=True)
        assert stats["n_tokens"] >= 2000 and stats["tensors"]["fire_count"].shape == (dict_size,)
        assert (out_dir / name / "latent.html").is_file()
        assert "gpt_neox.layers.0.mlp" in (out_dir / name / "data" / "meta.js").read_text()
    topk = torch.load(out_dir / "trainer_1" / "features.pt", weights_only=True)
    assert topk["tensors"]["fire_count"].sum().item() == pytest.approx(16 * topk["n_tokens"], rel=0.05)  # k = 16

    status, out, err = run_cli(capsys, "dashboard", str(trained_run / "trainer_1"), "--n-tokens", "500",
                               "--no-progress", "--threads", "1")
    assert status == 0 and out.strip() == str(trained_run / "trainer_1" / "dashboard" / "index.html"), err
    status, _, err = run_cli(capsys, "dashboard", str(tmp_path / "nothing"))
    assert_one_line_error(status, err, "does not exist", code=1)
    status, _, err = run_cli(capsys, "dashboard", str(tmp_path))
    assert_one_line_error(status, err, "no dictionary under", code=1)
    status, _, err = run_cli(capsys, "dashboard", str(trained_run), "--n-tokens", "0")
    assert_one_line_error(status, err, "n_tokens must be a positive int; got 0", code=2)


def test_push_uploads_a_run_through_the_hub_api(trained_run, tmp_path, capsys, monkeypatch):
    import huggingface_hub

    hub = FakeHub(tmp_path / "hub_cache")
    monkeypatch.setattr(huggingface_hub, "HfApi", hub.Api)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    status, out, err = run_cli(capsys, "push", str(trained_run), "me/saes", "--path-in-repo", "tiny/mlp0",
                               "--private", "--commit-message", "two recipes")
    assert status == 0, err
    assert out.strip() == f"pushed {trained_run} to hf://me/saes/tiny/mlp0"
    ((repo, message, paths),) = hub.commits
    assert repo == "me/saes" and message == "two recipes" and ("create_repo", "me/saes", True) in hub.calls
    assert {"tiny/mlp0/trainer_0/ae.pt", "tiny/mlp0/trainer_1/config.json", "tiny/mlp0/run_config.json"} <= set(paths)
    for path in paths:
        assert hub.repos["me/saes"][path] == (trained_run / path.removeprefix("tiny/mlp0/")).read_bytes()

    status, _, err = run_cli(capsys, "push", str(trained_run), "saes")
    assert_one_line_error(status, err, "repo_id 'saes' is not a repository id; write OWNER/NAME", code=1)
    status, _, err = run_cli(capsys, "push", str(tmp_path / "missing"), "me/saes")
    assert_one_line_error(status, err, "is not a folder", code=1)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    status, _, err = run_cli(capsys, "push", str(trained_run), "me/saes")
    assert_one_line_error(status, err, "HF_HUB_OFFLINE is set: unset it to push to the Hub", code=1)
    status, _, err = run_cli(capsys, "push", str(trained_run))
    assert_one_line_error(status, err, "REPO_ID", code=2)
