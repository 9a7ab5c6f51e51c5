"""Failure behaviour: divergence stops a run with a clear error, no run overwrites another, resume
checks its data, bad input gets errors naming the argument, saved files are never corrupted and
get the user's umask. One test (or more) per case of the robustness issue; the numbers in the test
names' comments refer to its list."""
import itertools
import json
import os
import random
import signal
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from dictionary_learning import ActivationBuffer, AutoEncoder, evaluate, trainSAE
from dictionary_learning.buffer import CHARS_PER_TOKEN
from dictionary_learning.evaluation import loss_recovered
from dictionary_learning.files import atomic_torch_save
from dictionary_learning.interop import load_saelens, save_saelens
from dictionary_learning.runs import STATE_FILE
from dictionary_learning.training import MAX_SKIPPED_IN_A_ROW

from lm_fixtures import documents, tiny_language_model

D, F_ = 16, 32
REPO = Path(__file__).resolve().parents[1]


def batches(n, seed=0, batch=64, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [scale * torch.randn(batch, D, generator=g) for _ in range(n)]


def config(trainer="StandardTrainer", **fields):
    extra = {"k": 4} if "TopK" in trainer else {"sparsity_penalty": 0.1} if trainer != "GatedSAETrainer" else {}
    return {"trainer": trainer, "activation_dim": D, "dict_size": F_, "lr": 1e-3, "warmup_steps": 2, "seed": 0,
            **extra, **fields}


def state_of(dictionary):
    return {k: v.clone() for k, v in dictionary.state_dict().items()}


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def lm():
    return tiny_language_model()


# --- 1. divergence ---------------------------------------------------------------------------


@pytest.mark.parametrize("trainer", ["StandardTrainer", "TopKTrainer", "GatedSAETrainer"])
def test_a_diverging_run_stops_naming_trainer_step_and_cause_and_keeps_its_last_checkpoint(tmp_path, trainer):
    data = batches(4) + [x * 1e30 for x in batches(4, seed=1)]  # finite inputs whose squares overflow
    with pytest.raises(FloatingPointError) as error:
        trainSAE(data, trainer_configs=[config(trainer)], steps=8, save_dir=tmp_path, save_steps=[3], progress=False)
    message = str(error.value)
    assert f"trainer 0 ({trainer})" in message and "at step 5" in message
    assert "normalize_activations=True" in message and "step 3" in message and "resume_from" in message
    assert not (tmp_path / "trainer_0" / "ae.pt").exists()  # no NaN dictionary saved
    checkpoint = torch.load(tmp_path / "trainer_0" / "checkpoints" / "ae_3.pt", weights_only=True)
    assert all(bool(torch.isfinite(v).all()) for v in checkpoint.values())
    assert torch.load(tmp_path / STATE_FILE, weights_only=True)["steps_done"] == 3


def test_float16_autocast_overflow_names_the_dtype(tmp_path):
    data = batches(3, scale=300.0)  # norms ~1200: squared errors overflow float16
    with pytest.raises(FloatingPointError, match="float16 autocast.*bfloat16"):
        trainSAE(data, trainer_configs=[config(warmup_steps=1)], steps=3, autocast_dtype=torch.float16,
                 progress=False)


def test_on_nonfinite_skip_skips_the_bad_batch_and_records_it(tmp_path):
    data = batches(3) + [batches(1, seed=7)[0] * 1e30] + batches(3, seed=2)
    (ae,) = trainSAE(data, trainer_configs=[config()], steps=7, save_dir=tmp_path, log_steps=1,
                     on_nonfinite="skip", progress=False)
    assert all(bool(torch.isfinite(p).all()) for p in ae.parameters())
    training = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["training"]
    assert training["skipped_steps"] == 1 and training["steps_done"] == 7
    log = [json.loads(line) for line in (tmp_path / "trainer_0" / "log.jsonl").read_text().splitlines()]
    assert [r.get("skipped_steps", 0) for r in log] == [0, 0, 0, 1, 1, 1, 1]
    # skipping the batch is the same as never being shown it at that step: the trainer state is untouched
    reference = trainSAE(data[:3], trainer_configs=[config(steps=7)], steps=7, progress=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        three = trainSAE(data[:4], trainer_configs=[config(steps=7)], steps=7, on_nonfinite="skip",
                         progress=False)[0]
    assert_same_state(state_of(three), state_of(reference))


def test_on_nonfinite_skip_gives_up_after_many_bad_batches_in_a_row():
    data = [x * 1e30 for x in batches(MAX_SKIPPED_IN_A_ROW + 2)]
    with pytest.raises(FloatingPointError, match=f"the {MAX_SKIPPED_IN_A_ROW}th batch in a row"):
        trainSAE(data, trainer_configs=[config()], on_nonfinite="skip", progress=False)
    with pytest.raises(ValueError, match="on_nonfinite must be 'raise' or 'skip'"):
        trainSAE(data, trainer_configs=[config()], on_nonfinite="ignore", progress=False)


# --- 2. nothing untrusted is unpickled ----------------------------------------------------------


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_no_load_runs_code_from_a_file(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"encoder.weight": Payload(marker)}, tmp_path / "ae.pt")
    with pytest.raises(ValueError, match="weights_only=True"):
        AutoEncoder.from_pretrained(tmp_path / "ae.pt")
    (tmp_path / "config.json").write_text(json.dumps({"trainer": {"dict_class": "AutoEncoder"}}))
    from dictionary_learning import load_dictionary

    with pytest.raises(ValueError):
        load_dictionary(tmp_path)
    assert not marker.exists()


# --- 3. locks and overwrite protection ---------------------------------------------------------


def child_configs():
    return [{"trainer": "StandardTrainer", "activation_dim": 16, "dict_size": 32, "lr": 1e-3, "warmup_steps": 2,
             "sparsity_penalty": 0.1, "seed": 0, "resample_steps": 5},
            {"trainer": "TopKTrainer", "activation_dim": 16, "dict_size": 32, "k": 4, "lr": 1e-3, "warmup_steps": 2,
             "seed": 0, "threshold_start_step": 3, "dead_tokens_threshold": 256}]


def child_run(n_batches):
    """The child's data and trainSAE arguments: two recipes, a state every 3 steps, a log line each."""
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(64, 16, generator=g) for _ in range(n_batches)]
    kwargs = dict(trainer_configs=child_configs(), steps=n_batches, log_steps=1,
                  save_steps=list(range(3, n_batches, 3)), progress=False)
    return data, kwargs


@pytest.fixture(scope="module")
def child_script(tmp_path_factory):
    """A script that runs `child_run(n_batches)` into a folder, `delay` seconds per batch, printing
    "started" once it trains."""
    import inspect

    path = tmp_path_factory.mktemp("child") / "run.py"
    path.write_text("\n".join([
        "import runpy, sys, time",
        "runpy.run_path(sys.argv[1])['import_checkout']()",
        "import torch",
        "from dictionary_learning import trainSAE",
        inspect.getsource(child_configs), inspect.getsource(child_run),
        "data, kwargs = child_run(int(sys.argv[3]))",
        "def slow():",
        "    for i, x in enumerate(data):",
        "        if i == 1:",
        "            print('started', flush=True)",
        "        time.sleep(float(sys.argv[4]))",
        "        yield x",
        "trainSAE(slow(), save_dir=sys.argv[2], **kwargs)",
    ]))
    return path


def start_child(child_script, save_dir, n_batches, delay):
    return subprocess.Popen([sys.executable, str(child_script), str(REPO / "scripts" / "_checkout.py"), str(save_dir),
                             str(n_batches), str(delay)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_second_run_into_a_folder_in_use_fails_at_once_and_kill_9_frees_it(tmp_path, child_script):
    child = start_child(child_script, tmp_path, n_batches=400, delay=0.05)
    try:
        assert child.stdout.readline().strip() == "started"
        data, kwargs = child_run(400)
        with pytest.raises(RuntimeError, match=rf"in use by another run \(pid {child.pid} on "):
            trainSAE(data, save_dir=tmp_path, overwrite=True, **kwargs)
        deadline = time.monotonic() + 60
        while not (tmp_path / STATE_FILE).exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    # the killed run's lock went with it: its folder resumes
    steps_done = torch.load(tmp_path / STATE_FILE, weights_only=True)["steps_done"]
    kwargs.update(steps=steps_done + 2, save_steps=[])
    trainSAE(data, resume_from=tmp_path, **kwargs)


def test_a_folder_holding_a_run_is_refused_unless_resumed_or_overwritten(tmp_path):
    data = batches(6)
    trainSAE(data, trainer_configs=[config()], steps=6, save_dir=tmp_path, save_steps=[3], progress=False)
    first = (tmp_path / "trainer_0" / "ae.pt").read_bytes()
    with pytest.raises(FileExistsError, match="holds the resumable state of an earlier run.*overwrite=True"):
        trainSAE(data, trainer_configs=[config(lr=2e-3)], steps=4, save_dir=tmp_path, progress=False)
    assert (tmp_path / "trainer_0" / "ae.pt").read_bytes() == first
    trainSAE(data, trainer_configs=[config(lr=2e-3)], steps=4, save_dir=tmp_path, overwrite=True, progress=False)
    assert (tmp_path / "trainer_0" / "ae.pt").read_bytes() != first
    assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / "trainer_0" / "checkpoints" / "ae_3.pt").exists()
    with pytest.raises(FileExistsError, match="holds the dictionaries of an earlier run"):
        trainSAE(data, 16, 32, lr=1e-3, sparsity_penalty=0.1, warmup_steps=2, steps=4, save_dir=tmp_path / "trainer_0",
                 progress=False)


# --- fault injection: kill -9 at random moments, resume bit-identical ----------------------------


def wait_for_state(folder, steps, child, timeout=120):
    """Wait until the child's run has saved its state after at least `steps` steps (or has ended)."""
    deadline = time.monotonic() + timeout
    while steps and child.poll() is None and time.monotonic() < deadline:
        try:
            if torch.load(folder / STATE_FILE, weights_only=True)["steps_done"] >= steps:
                return
        except (FileNotFoundError, RuntimeError, EOFError):
            pass
        time.sleep(0.01)


def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path, child_script):
    n_batches = 24
    data, kwargs = child_run(n_batches)
    reference = [state_of(ae) for ae in trainSAE(data, save_dir=tmp_path / "uninterrupted", **kwargs)]
    rng = random.Random(0)
    outcomes = []
    for trial in range(10):
        folder = tmp_path / f"trial_{trial}"
        child = start_child(child_script, folder, n_batches, delay=0.01)
        assert child.stdout.readline().strip() == "started"
        # the moment: after a random number of saved states (whatever the machine's speed), then a
        # random fraction of a step or two, so kills also land inside writes
        wait_for_state(folder, rng.choice([0, 3, 6, 9, 12, 15, 18]), child)
        time.sleep(rng.uniform(0.0, 0.05))
        child.send_signal(signal.SIGKILL)
        child.wait()
        if (folder / STATE_FILE).exists():
            steps_done = torch.load(folder / STATE_FILE, weights_only=True)["steps_done"]
            resumed = trainSAE(data, resume_from=folder, **kwargs)
        else:  # killed before its first state: start again over what it left
            steps_done = 0
            resumed = trainSAE(data, save_dir=folder, overwrite=True, **kwargs)
        outcomes.append(steps_done)
        for got, expected in zip(resumed, reference):
            assert_same_state(state_of(got), expected)
        assert not list(folder.glob("**/.*.tmp"))  # what a killed write left was cleaned up
        logged = [json.loads(line)["step"] for line in (folder / "trainer_1" / "log.jsonl").read_text().splitlines()]
        assert logged == list(range(1, n_batches + 1))
    assert len(set(outcomes)) > 1, outcomes  # the kills landed at different moments


# --- 4. a sweep with mixed widths --------------------------------------------------------------


def test_a_sweep_with_another_width_names_the_trainer():
    configs = [config(), config("TopKTrainer", activation_dim=8)]
    with pytest.raises(ValueError, match=r"trainer 1 \(TopKTrainer\): activations batch 0 has width 16 but the "
                                         r"trainer expects 8"):
        trainSAE(batches(2), trainer_configs=configs, progress=False)


# --- 5. a damaged log line ---------------------------------------------------------------------


def test_a_damaged_log_line_does_not_block_resume(tmp_path):
    data = batches(8)
    full = trainSAE(data, trainer_configs=[config()], steps=8, log_steps=1, progress=False)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainSAE(data[:4], trainer_configs=[config()], steps=8, save_dir=tmp_path, save_steps=[4], log_steps=1,
                 progress=False)
    with open(tmp_path / "trainer_0" / "log.jsonl", "a") as log:
        log.write('{"step": 5, "loss": 1.2\n')  # cut short by a crash
    (resumed,) = trainSAE(data, trainer_configs=[config()], steps=8, resume_from=tmp_path, log_steps=1,
                          progress=False)
    assert_same_state(state_of(resumed), state_of(full))
    steps = [json.loads(line)["step"] for line in (tmp_path / "trainer_0" / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


# --- 6. resume checks its data -----------------------------------------------------------------


def interrupted(tmp_path, data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainSAE(data[:3], trainer_configs=[config()], steps=6, save_dir=tmp_path, save_steps=[3], progress=False)


def test_resume_with_other_data_is_an_error(tmp_path):
    data = batches(6)
    interrupted(tmp_path, data)
    permuted = [data[0][torch.randperm(64, generator=torch.Generator().manual_seed(1))], *data[1:]]
    for other in (batches(6, seed=9), permuted):
        with pytest.raises(ValueError, match="first batch differs"):
            trainSAE(other, trainer_configs=[config()], steps=6, resume_from=tmp_path, progress=False)
    trainSAE(data, trainer_configs=[config()], steps=6, resume_from=tmp_path, progress=False)


def test_resume_with_another_buffer_seed_names_the_seed(tmp_path, lm):
    def buffer(seed):
        return ActivationBuffer(iter(documents(60)), lm, lm.gpt_neox.layers[0].mlp, n_ctxs=16, ctx_len=16,
                                refresh_batch_size=8, out_batch_size=32, seed=seed)

    cfg = {**config(), "activation_dim": 32}
    trainSAE(buffer(1), trainer_configs=[cfg], steps=3, save_dir=tmp_path, save_steps=[3], progress=False)
    with pytest.raises(ValueError, match=r"seed: saved 1, now 2"):
        trainSAE(buffer(2), trainer_configs=[cfg], steps=6, resume_from=tmp_path, progress=False)
    recorded = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["buffer"]["seed"]
    assert recorded == 1  # the refused resume did not overwrite what the folder records


# --- 7. data ending early; steps shorter than the steps done ------------------------------------


def test_data_ending_early_is_reported_and_recorded(tmp_path):
    with pytest.warns(UserWarning, match="data ran out after 5 of steps=10"):
        trainSAE(batches(5), trainer_configs=[config()], steps=10, save_dir=tmp_path, save_steps=[5], progress=False)
    training = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["training"]
    assert training["steps_done"] == 5 and training["steps"] == 10
    with pytest.raises(ValueError, match="already trained 5 steps, more than steps=3"):
        trainSAE(batches(5), trainer_configs=[config()], steps=3, resume_from=tmp_path, progress=False)


# --- 8. ActivationBuffer on token-less streams and huge documents --------------------------------


def test_a_stream_without_tokens_is_an_error_not_a_hang(lm):
    buffer = ActivationBuffer(itertools.repeat(""), lm, lm.gpt_neox.layers[0].mlp, n_ctxs=16, ctx_len=16,
                              refresh_batch_size=512, out_batch_size=32, d_submodule=32)
    with pytest.raises(ValueError, match="texts in a row that hold no token"):
        next(buffer)


def test_huge_documents_are_cut_before_tokenizing_with_the_same_tokens(lm):
    buffer = ActivationBuffer(iter([]), lm, lm.gpt_neox.layers[0].mlp, n_ctxs=16, ctx_len=16, refresh_batch_size=4,
                              out_batch_size=32, d_submodule=32)
    lengths = []
    real_tokenizer = buffer.tokenizer

    def spy(texts, **kwargs):
        lengths.extend(len(t) for t in texts)
        return real_tokenizer(texts, **kwargs)

    huge = " ".join(documents(3000, seed=4))  # ~ hundreds of thousands of characters
    spaces = "x" + " " * 5000 + "y z w"  # a text whose first tokens span more characters than the cut
    texts = [huge, "short text", spaces]
    buffer.tokenizer = spy
    cut = buffer.tokenize(texts)
    buffer.tokenizer = real_tokenizer
    whole = real_tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=16)
    assert torch.equal(cut["input_ids"], whole["input_ids"])
    assert torch.equal(cut["attention_mask"], whole["attention_mask"])
    assert len(huge) > 100 * CHARS_PER_TOKEN * 16 and max(lengths) < len(huge) / 10


# --- 9. the normalisation scale from several batches ----------------------------------------------


def test_normalization_scale_comes_from_several_batches_and_refuses_all_zero(tmp_path):
    data = [torch.zeros(64, D)] + batches(9, scale=5.0)
    trainSAE(data, trainer_configs=[config()], steps=10, normalize_activations=True, save_dir=tmp_path,
             progress=False)
    scale = json.loads((tmp_path / "trainer_0" / "config.json").read_text())["training"]["activation_scale"]
    expected = float(torch.cat(data[:8]).double().pow(2).sum(-1).mean() ** -0.5)
    assert scale == pytest.approx(expected, rel=1e-9) and 0.01 < scale < 1  # not 1e12 (a zero batch's)
    with pytest.raises(ValueError, match="normalize_activations: the first 8 batches of the data"):
        trainSAE([torch.zeros(64, D)] * 10, trainer_configs=[config()], normalize_activations=True, progress=False)


# --- 10. errors naming the argument ---------------------------------------------------------------


BAD_FIELDS = [
    ("dict_size", 0, "dict_size must be a positive int; got 0"),
    ("dict_size", -4, "dict_size must be a positive int"),
    ("dict_size", 32.5, "dict_size must be a positive int; got 32.5"),
    ("activation_dim", 0, "activation_dim must be a positive int"),
    ("lr", -1.0, "lr must be a positive finite number"),
    ("lr", float("nan"), "lr must be a positive finite number"),
    ("lr", 0.0, "lr must be a positive finite number"),
    ("sparsity_penalty", -1e-3, "sparsity_penalty .* must be a finite number >= 0"),
    ("warmup_steps", -1, "warmup_steps must be an int >= 0"),
    ("device", "cuda" if not torch.cuda.is_available() else "cuda:99", "device='cuda"),
    ("device", "gpu", "device='gpu' is not a device"),
]


@pytest.mark.parametrize("trainer, field, value, message", [
    (trainer, *case) for trainer in ("StandardTrainer", "GatedSAETrainer", "JumpReluTrainer", "TopKTrainer")
    for case in BAD_FIELDS if not (trainer == "TopKTrainer" and case[0] == "sparsity_penalty")  # TopK has no λ
])
def test_bad_trainer_configs_name_the_field(trainer, field, value, message):
    with pytest.raises(ValueError, match=message):
        trainSAE(batches(2), trainer_configs=[config(trainer, **{field: value})], progress=False)


def test_an_empty_batch_is_named():
    with pytest.raises(ValueError, match=r"activations batch 1 has shape \(0, 16\).*at least one row"):
        trainSAE([batches(1)[0], torch.zeros(0, D)], trainer_configs=[config()], progress=False)


def test_dtype_names_are_accepted_and_bad_ones_named(tmp_path, lm):
    ae = AutoEncoder(D, F_)
    atomic_torch_save(ae.state_dict(), tmp_path / "ae.pt")
    assert AutoEncoder.from_pretrained(tmp_path / "ae.pt", dtype="bfloat16").W_enc.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="dtype='int8' is not a floating dtype"):
        AutoEncoder.from_pretrained(tmp_path / "ae.pt", dtype="int8")
    buffer = ActivationBuffer(iter(documents(10)), lm, lm.gpt_neox.layers[0].mlp, n_ctxs=16, ctx_len=16,
                              refresh_batch_size=4, out_batch_size=32, d_submodule=32, dtype="float16")
    assert buffer.dtype == torch.float16
    with pytest.raises(ValueError, match="autocast_dtype='float17'"):
        trainSAE(batches(2), trainer_configs=[config()], autocast_dtype="float17", progress=False)


def test_evaluation_with_a_dictionary_of_another_width_is_named(lm):
    wrong = AutoEncoder(16, 64)  # the tiny model's MLP is 32 wide
    with pytest.raises(ValueError, match="are 32-dimensional but the AutoEncoder takes 16-dimensional inputs"):
        evaluate(wrong, [torch.randn(8, 32)])
    with pytest.raises(ValueError, match="are 32-dimensional but the AutoEncoder takes 16-dimensional inputs"):
        loss_recovered(documents(2), lm, lm.gpt_neox.layers[0].mlp, wrong, max_len=16)


def test_a_malformed_saelens_cfg_names_the_file(tmp_path):
    save_saelens(AutoEncoder(D, F_), tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    (tmp_path / "cfg.json").write_text(json.dumps({**cfg, "architecture": 5}))
    with pytest.raises(ValueError, match=r"cfg\.json'\): SAELens architecture '5' is not supported"):
        load_saelens(tmp_path)
    (tmp_path / "cfg.json").write_text('{"architecture": ')
    with pytest.raises(ValueError, match=r"cfg\.json' is not valid JSON"):
        load_saelens(tmp_path)


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk ({result.stderr.decode().strip()})")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_gives_a_clear_error_and_keeps_every_saved_file(tiny_disk):
    data = batches(6)
    with pytest.raises(OSError, match="no space left on the device writing .*previous version of the file"):
        trainSAE(data, trainer_configs=[config(dict_size=512)], steps=6, save_dir=tiny_disk, save_steps=[2, 4],
                 progress=False)
    for path in tiny_disk.glob("**/*.pt"):  # whatever was saved before the disk filled loads whole
        torch.load(path, weights_only=True)
    assert not list(tiny_disk.glob("**/.*.tmp"))


def test_temporary_files_of_a_killed_write_are_removed_by_the_next_run(tmp_path):
    data = batches(6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainSAE(data[:3], trainer_configs=[config()], steps=6, save_dir=tmp_path, save_steps=[3], progress=False)
    left = [tmp_path / ".training_state.pt.0123456789ab.tmp", tmp_path / "trainer_0" / ".ae.pt.00000000abcd.tmp",
            tmp_path / "trainer_0" / "checkpoints" / ".ae_6.pt.ffffffffffff.tmp"]
    for path in left:
        path.write_bytes(b"half a file")
    keep = tmp_path / "trainer_0" / "notes.tmp"
    keep.write_text("the user's")
    trainSAE(data, trainer_configs=[config()], steps=6, resume_from=tmp_path, progress=False)
    assert not any(path.exists() for path in left) and keep.exists()


# --- 11. evaluation of NaN activations ---------------------------------------------------------


def test_evaluating_nan_activations_is_an_error():
    x = torch.randn(8, D)
    x[3, 2] = float("nan")
    with pytest.raises(ValueError, match="activations of batch 0 contain NaN or inf"):
        evaluate(AutoEncoder(D, F_), [x])
    broken = AutoEncoder(D, F_)
    with torch.no_grad():
        broken.W_enc[0, 0] = float("nan")
    with pytest.raises(ValueError, match="the dictionary's features on batch 0 contain NaN"):
        evaluate(broken, [torch.randn(8, D)])


# --- 12. files get the user's umask -------------------------------------------------------------


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_saved_files_get_the_users_umask(tmp_path, umask):
    previous = os.umask(umask)
    try:
        trainSAE(batches(4), trainer_configs=[config()], steps=4, save_dir=tmp_path, save_steps=[2], log_steps=1,
                 progress=False)
    finally:
        os.umask(previous)
    files = [p for p in tmp_path.glob("**/*") if p.is_file() and p.name != ".lock"]
    assert {p.name for p in files} >= {"ae.pt", "config.json", "log.jsonl", STATE_FILE, "ae_2.pt"}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
