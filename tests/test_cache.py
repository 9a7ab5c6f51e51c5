"""The on-disk activation cache: exact round trips, shuffling, resuming after kill -9, damaged shards,
bounded memory, several sites, and training from a cache."""
import errno
import json
import multiprocessing
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from dictionary_learning import ActivationBuffer, CachedActivations, cache_activations, trainSAE
from dictionary_learning import shards as shard_format
from dictionary_learning.shards import byte_planes, from_byte_planes, tensor_bytes

from lm_fixtures import documents, reference_activations, tiny_gpt_neox, tiny_tokenizer, wrap

MLP0, LAYER1 = "gpt_neox.layers.0.mlp", "gpt_neox.layers.1"
SITES = [MLP0, LAYER1]
SETTINGS = {"ctx_len": 24, "refresh_batch_size": 8, "shard_tokens": 300, "frame_rows": 64, "progress": False,
            "data_source": "documents"}


@pytest.fixture(scope="module")
def hf():
    return tiny_gpt_neox(init_std=0.2)


@pytest.fixture(scope="module")
def lm(hf):
    return wrap(hf)


def write(lm, path, n_tokens, texts=None, sites=SITES, **overrides):
    texts = documents(200) if texts is None else texts
    return cache_activations(iter(texts), lm, sites, path, n_tokens, **{**SETTINGS, **overrides})


def in_order(path, site=None, **kwargs):
    """Every row of the cache in stored order (one tensor, a dict, or pairs), by a reader without shuffling."""
    batches = list(CachedActivations(path, site=site, batch_size=128, shuffle=False, **kwargs))
    first = batches[0]
    if isinstance(first, dict):
        return {name: _cat([batch[name] for batch in batches]) for name in first}
    return _cat(batches)


def _cat(values):
    if isinstance(values[0], tuple):
        return tuple(torch.cat(parts) for parts in zip(*values))
    return torch.cat(values)


def shard_digests(path):
    manifest = json.loads((Path(path) / "manifest.json").read_text())
    return [(entry["file"], entry["rows"], entry["sha256"]) for entry in manifest["shards"]], manifest


def same_multiset(a, b):
    ua, ca = torch.unique(a, dim=0, return_counts=True)
    ub, cb = torch.unique(b, dim=0, return_counts=True)
    return torch.equal(ua, ub) and torch.equal(ca, cb)


# --------------------------------------------------------------------------------------------
# Round trip
# --------------------------------------------------------------------------------------------


def test_byte_planes_round_trip_every_bit():
    values = torch.randn(1000, generator=torch.Generator().manual_seed(0)) * 1e3
    values[:4] = torch.tensor([float("inf"), -0.0, float("nan"), -1e-38])
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.float64):
        x = values.to(dtype) if dtype != torch.int32 else torch.arange(-500, 500, dtype=torch.int32) * 7919
        raw = tensor_bytes(x[:, None])
        expected = ((x.float().numpy().view(np.uint32) >> 16).astype(np.uint16) if dtype == torch.bfloat16
                    else x.numpy())  # a bfloat16 is the top half of its float32
        assert raw.shape == (1000, x.element_size()) and raw.tobytes() == expected.tobytes()
        planes = byte_planes(raw)
        assert [plane.tobytes() for plane in planes] == [raw[:, k].tobytes() for k in range(x.element_size())]
        assert from_byte_planes(planes).tobytes() == raw.tobytes()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_exact(lm, hf, tmp_path, dtype):
    """Read back in order, the cache holds exactly what the buffer's collection gives, in `dtype`,
    with each token's id and position; shuffled, the same rows in another order."""
    texts = documents(60)
    with pytest.warns(UserWarning, match=r"the data ran out after \d+ tokens, before n_tokens=1000000"):
        manifest = write(lm, tmp_path, 10**6, texts=texts, dtype=dtype, byte_shuffle=dtype == torch.float32)
    collector = ActivationBuffer(iter(texts), lm, submodules=SITES, n_ctxs=2, ctx_len=24, refresh_batch_size=8,
                                 out_batch_size=1, dtype=dtype)
    expected = {site: [] for site in SITES}
    while texts_batch := collector.text_batch():
        reads, _ = collector.token_activations(collector.tokenize(texts_batch))
        for site, rows in zip(SITES, reads):
            expected[site].append(rows)
    stored = in_order(tmp_path)
    assert manifest["rows"] == len(stored[MLP0]) == sum(len(rows) for rows in expected[MLP0])  # the data ran out
    for site in SITES:
        assert stored[site].dtype == dtype
        assert torch.equal(stored[site].view(torch.uint8), torch.cat(expected[site]).view(torch.uint8))
    # against plain forward passes of each text alone (no padding, no nnsight)
    reference = torch.cat(reference_activations(hf, tiny_tokenizer(), texts, MLP0, max_length=24))
    torch.testing.assert_close(stored[MLP0].float(), reference.to(dtype).float(), atol=2e-2 if dtype != torch.float32
                               else 1e-5, rtol=1e-2 if dtype != torch.float32 else 1e-5)
    # token ids and positions, shard by shard
    reader = CachedActivations(tmp_path, site=MLP0, shuffle=False, batch_size=64)
    shards = [reader.read_shard(i) for i in range(len(manifest["shards"]))]
    ids = [tiny_tokenizer()(text, truncation=True, max_length=24)["input_ids"] for text in texts]
    assert torch.equal(torch.cat([s["token_ids"] for s in shards]), torch.tensor(sum(ids, []), dtype=torch.int32))
    assert torch.equal(torch.cat([s["positions"] for s in shards]),
                       torch.cat([torch.arange(len(i), dtype=torch.int32) for i in ids]))
    assert torch.equal(torch.cat([s[MLP0] for s in shards]), stored[MLP0])
    statistics = CachedActivations(tmp_path, site=LAYER1).statistics()["out"]
    exact = stored[LAYER1].double()
    assert statistics["mean_squared_norm"] == pytest.approx(float(exact.pow(2).sum(1).mean()), rel=1e-12)
    torch.testing.assert_close(statistics["mean"], exact.mean(0).float())
    shuffled = CachedActivations(tmp_path, site=LAYER1, batch_size=50, shuffle_window=200, seed=0)
    assert same_multiset(torch.cat(list(shuffled)).float(), stored[LAYER1].float())


def test_eight_bit_rows_are_within_half_a_step_of_the_activations(lm, tmp_path):
    """dtype=torch.int8: x ≈ q · s with s = max|x| / 127 per row, served as float32."""
    write(lm, tmp_path / "exact", 600, dtype=torch.float32)
    write(lm, tmp_path / "int8", 600, dtype=torch.int8)
    exact, stored = in_order(tmp_path / "exact"), in_order(tmp_path / "int8")
    for site in SITES:
        x, x8 = exact[site], stored[site]
        assert x8.dtype == torch.float32 and x8.shape == x.shape
        step = x.abs().amax(1, keepdim=True) / 127
        assert ((x8 - x).abs() <= step / 2 * (1 + 1e-5) + 1e-12).all()
        assert float((x8 - x).pow(2).sum() / x.pow(2).sum()) < 1e-3
        statistics = CachedActivations(tmp_path / "int8", site=site).statistics()["out"]
        assert statistics["mean_squared_norm"] == pytest.approx(float(x8.double().pow(2).sum(1).mean()), rel=1e-9)
    manifest = json.loads((tmp_path / "int8" / "manifest.json").read_text())
    assert manifest["dtype"] == "int8" and manifest["columns"][2]["dtype"] == "int8_row_scale"
    batch = next(CachedActivations(tmp_path / "int8", site=MLP0, batch_size=64, shuffle_window=256, seed=0))
    assert batch.dtype == torch.float32 and batch.shape == (64, 32)


def test_manifest_records_the_source_and_the_statistics(lm, hf, tmp_path):
    hf.config._name_or_path = "tiny-neox"
    try:
        manifest = write(lm, tmp_path, 700, dtype=torch.float32, data_source="documents(200)")
    finally:
        hf.config._name_or_path = ""
    assert manifest["model"]["name"] == "tiny-neox" and manifest["data_source"] == "documents(200)"
    assert manifest["sites"][MLP0] == {"path": MLP0, "io": "out", "width": 32, "layer": 0}
    assert manifest["ctx_len"] == 24 and manifest["dtype"] == "float32" and manifest["tokenizer"]["vocab_size"] > 0
    assert [s["rows"] for s in manifest["shards"]] == [300, 300, 100] and manifest["rows"] == 700
    stored = in_order(tmp_path)
    for site in SITES:
        statistics = CachedActivations(tmp_path, site=site).statistics()["out"]
        torch.testing.assert_close(statistics["mean"], stored[site].double().mean(0).float())
        assert statistics["mean_squared_norm"] == pytest.approx(float(stored[site].double().pow(2).sum(1).mean()),
                                                                rel=1e-9)
    for entry in manifest["shards"]:
        assert entry["sha256"] == shard_format.file_sha256(tmp_path / entry["file"])


# --------------------------------------------------------------------------------------------
# Shuffling
# --------------------------------------------------------------------------------------------


def test_shuffling_serves_every_row_once_per_epoch_in_a_seeded_order(lm, tmp_path):
    write(lm, tmp_path, 1500, dtype=torch.float32)
    stored = in_order(tmp_path, site=LAYER1)
    # where a row is stored, for the rows that occur once (documents may share their first sentences)
    keys = [tuple(row.tolist()) for row in stored]
    counts = {key: keys.count(key) for key in set(keys)}
    position = {key: i for i, key in enumerate(keys) if counts[key] == 1}
    assert len(position) > 600

    def served(seed, epochs=1):
        return list(CachedActivations(tmp_path, site=LAYER1, batch_size=100, shuffle_window=400, seed=seed,
                                      epochs=epochs))

    first, again, other = served(0), served(0), served(1)
    rows = torch.cat(first)
    assert same_multiset(rows, stored) and [len(b) for b in first] == [100] * 15
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(rows, torch.cat(other))
    assert same_multiset(torch.cat(served(2, epochs=2)), torch.cat([stored, stored]))
    # mixed across the whole cache: the first batch takes rows from most shards, and the serving
    # order is uncorrelated with the stored order
    served_at = [(i, position[key]) for i, key in enumerate(tuple(row.tolist()) for row in rows) if key in position]
    served_index, stored_index = torch.tensor(served_at, dtype=torch.float64).T
    assert len({int(j) // 300 for i, j in served_at if i < 100}) >= 4  # from 4 of the 5 shards at least
    assert abs(float(torch.corrcoef(torch.stack([served_index, stored_index]))[0, 1])) < 0.2


def test_memory_is_bounded_by_the_window(lm, tmp_path):
    write(lm, tmp_path, 4000, dtype=torch.float32)
    reader = CachedActivations(tmp_path, site=LAYER1, batch_size=64, shuffle_window=256, seed=0, prefetch=2)
    n = sum(len(batch) for batch in reader)
    assert n == 4000
    frame_rows = 64
    assert 256 <= reader.peak_rows_held <= 256 + (2 + 1 + 1) * frame_rows  # window + queued + decoding + in use


def test_ranks_read_disjoint_shares_that_cover_the_cache(lm, tmp_path, monkeypatch):
    write(lm, tmp_path, 1500, dtype=torch.float32)
    stored = in_order(tmp_path, site=LAYER1)

    def served(rank, world_size=2, seed=0, **kwargs):
        return list(CachedActivations(tmp_path, site=LAYER1, batch_size=50, shuffle_window=200, seed=seed,
                                      rank=rank, world_size=world_size, **kwargs))

    shares = [torch.cat(served(rank)) for rank in (0, 1)]
    assert same_multiset(torch.cat(shares), stored)  # every row once, on one rank
    assert abs(len(shares[0]) - len(shares[1])) <= 2 * 64  # dealt by frames of <= 64 rows (shards end in shorter ones)
    assert all(torch.equal(a, b) for a, b in zip(served(1), served(1)))
    assert torch.equal(torch.cat(served(0, world_size=1)), torch.cat(served(None, world_size=None)))
    for rank in (0, 1):  # a rank's reader skips within its own share
        reader = CachedActivations(tmp_path, site=LAYER1, batch_size=50, shuffle_window=200, seed=0, rank=rank,
                                   world_size=2)
        reader.skip(5)
        assert all(torch.equal(a, b) for a, b in zip(reader, served(rank)[5:]))
    monkeypatch.setenv("RANK", "1")  # torchrun's variables, before trainSAE starts the process group
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    under_torchrun = CachedActivations(tmp_path, site=LAYER1, batch_size=50, shuffle_window=200, seed=0)
    assert (under_torchrun.rank, under_torchrun.world_size) == (1, 2)
    assert under_torchrun.fingerprint["rank"] == 1 and all(torch.equal(a, b) for a, b in zip(under_torchrun, served(1)))
    with pytest.raises(ValueError, match="CachedActivations: rank must be in \\[0, world_size=2\\)"):
        served(2)
    with pytest.raises(ValueError, match="pass both rank= and world_size="):
        CachedActivations(tmp_path, rank=1)


# --------------------------------------------------------------------------------------------
# Resuming, appending, one writer
# --------------------------------------------------------------------------------------------


def _slow_texts(texts, delay):
    for text in texts:
        time.sleep(delay)
        yield text


def _write_slowly(lm, path, n_tokens):
    write(lm, path, n_tokens, texts=_slow_texts(documents(200), 0.004))


def test_a_writer_killed_at_random_moments_resumes_to_the_same_shards(lm, tmp_path):
    """kill -9 of a writer process, then resume=True: the same shards, byte for byte, and the same
    manifest as an uninterrupted write."""
    n_tokens = 2000
    start = time.perf_counter()
    _write_slowly(lm, tmp_path / "whole", n_tokens)
    duration = time.perf_counter() - start
    expected, expected_manifest = shard_digests(tmp_path / "whole")
    assert len(expected) == 7
    rng = random.Random(0)
    fork = multiprocessing.get_context("fork")
    shards_at_kill = []
    for trial in range(4):
        path = tmp_path / f"killed_{trial}"
        writer = fork.Process(target=_write_slowly, args=(lm, path, n_tokens))
        writer.start()
        time.sleep(rng.uniform(0.1, 0.9) * duration)
        writer.kill()  # SIGKILL: no cleanup of any kind
        writer.join()
        shards_at_kill.append(len(list(path.glob("shard-*.dlshard"))))
        if (path / "manifest.json").exists():
            with pytest.raises(FileExistsError, match="pass resume=True"):
                write(lm, path, n_tokens)
        write(lm, path, n_tokens, resume=True)
        assert shard_digests(path) == (expected, expected_manifest)
        assert not [p.name for p in path.iterdir() if p.name.endswith(".tmp")]
    assert sum(0 < n < len(expected) for n in shards_at_kill) >= 2, shards_at_kill  # killed mid-way


def test_a_shard_written_but_not_listed_is_adopted_not_rewritten(lm, tmp_path):
    """A writer killed between a shard's rename and the manifest update: resume lists that shard."""
    write(lm, tmp_path, 600)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    last = manifest["shards"].pop()
    manifest["rows"] -= last["rows"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    mtime = (tmp_path / last["file"]).stat().st_mtime_ns
    write(lm, tmp_path, 600, resume=True)
    assert json.loads((tmp_path / "manifest.json").read_text())["shards"][-1] == last
    assert (tmp_path / last["file"]).stat().st_mtime_ns == mtime


def test_a_full_disk_leaves_complete_shards_valid_and_resume_finishes(lm, tmp_path, monkeypatch):
    write(lm, tmp_path / "whole", 1500)
    add_frame, frames = shard_format.ShardWriter.add_frame, []

    def add_frame_until_the_disk_is_full(self, rows, parts):
        frames.append(rows)
        if len(frames) == 12:  # inside the third shard (5 frames per shard)
            raise OSError(errno.ENOSPC, "No space left on device")
        add_frame(self, rows, parts)

    monkeypatch.setattr(shard_format.ShardWriter, "add_frame", add_frame_until_the_disk_is_full)
    with pytest.raises(OSError, match="no space left on the device .* 2 complete shards .* resume=True") as error:
        write(lm, tmp_path / "full", 1500)
    assert error.value.errno == errno.ENOSPC
    monkeypatch.setattr(shard_format.ShardWriter, "add_frame", add_frame)
    assert sorted(p.name for p in (tmp_path / "full").iterdir()) == [
        "manifest.json", "shard-000000.dlshard", "shard-000001.dlshard", "writer.lock"]
    CachedActivations(tmp_path / "full", verify=True)
    write(lm, tmp_path / "full", 1500, resume=True)
    assert shard_digests(tmp_path / "full") == shard_digests(tmp_path / "whole")


def test_resume_appends_and_checks_the_settings(lm, tmp_path):
    write(lm, tmp_path / "straight", 1100, dtype=torch.float32)
    write(lm, tmp_path / "appended", 500, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"other settings \(dtype: cache has 'float32', now 'bfloat16'"):
        write(lm, tmp_path / "appended", 1100, resume=True)
    with pytest.raises(ValueError, match="ctx_len: cache has 24, now 16"):
        write(lm, tmp_path / "appended", 1100, resume=True, dtype=torch.float32, ctx_len=16)
    manifest = write(lm, tmp_path / "appended", 1100, resume=True, dtype=torch.float32)
    assert [s["rows"] for s in manifest["shards"]] == [300, 200, 300, 300]
    straight, appended = in_order(tmp_path / "straight"), in_order(tmp_path / "appended")
    assert all(torch.equal(straight[site], appended[site]) for site in SITES)
    with pytest.raises(ValueError, match="data ran out after 20 texts while skipping"):
        write(lm, tmp_path / "appended", 1500, resume=True, dtype=torch.float32, texts=documents(20))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty and holds no activation cache"):
        write(lm, tmp_path / "other", 100)


def test_a_second_writer_is_refused(lm, tmp_path):
    errors = []

    def texts_that_start_a_second_writer():
        try:
            write(lm, tmp_path, 100)
        except RuntimeError as error:
            errors.append(str(error))
        yield from documents(50)

    cache_activations(texts_that_start_a_second_writer(), lm, SITES, tmp_path, 300, **SETTINGS)
    assert len(errors) == 1 and "another process is writing to the activation cache" in errors[0]
    write(lm, tmp_path, 600, resume=True, texts=documents(50))  # the lock is free again


def test_a_complete_cache_is_returned_while_another_process_extends_it(lm, tmp_path):
    write(lm, tmp_path, 300)
    seen = []

    def texts_that_ask_for_the_cache_meanwhile():
        seen.append(write(lm, tmp_path, 300, resume=True)["rows"])  # complete: no lock needed
        with pytest.raises(RuntimeError, match="another process is writing to the activation cache"):
            write(lm, tmp_path, 450, resume=True)  # needs rows the writer has not added yet
        with pytest.raises(ValueError, match="ctx_len"):
            write(lm, tmp_path, 300, resume=True, ctx_len=16)  # still checked against the request
        yield from documents(200)

    manifest = cache_activations(texts_that_ask_for_the_cache_meanwhile(), lm, SITES, tmp_path, 600,
                                 **{**SETTINGS, "resume": True})
    assert seen == [300] and manifest["rows"] >= 600


# --------------------------------------------------------------------------------------------
# Damage
# --------------------------------------------------------------------------------------------


def test_damaged_shards_are_named_never_skipped(lm, tmp_path):
    write(lm, tmp_path, 900, dtype=torch.float32)
    second, third = tmp_path / "shard-000001.dlshard", tmp_path / "shard-000002.dlshard"
    offset, length = shard_format.ShardFile(second).frames[1]["parts"][2]
    data = bytearray(second.read_bytes())
    data[offset + length // 2] ^= 0x10
    second.write_bytes(bytes(data))
    reader = CachedActivations(tmp_path, site=MLP0, batch_size=50, shuffle_window=200, seed=0)
    with pytest.raises(ValueError, match=r"shard-000001\.dlshard', frame 1, column 'gpt_neox.layers.0.mlp/out' is "
                                         r"damaged .*checksum"):
        list(reader)
    with pytest.raises(ValueError, match=r"shard-000001\.dlshard' does not match the sha256"):
        CachedActivations(tmp_path, verify=True)
    third.write_bytes(third.read_bytes()[:-100])
    with pytest.raises(ValueError, match=r"shard-000002\.dlshard' is \d+ bytes but manifest.json lists \d+: the "
                                         "shard is truncated"):
        CachedActivations(tmp_path)
    third.unlink()
    with pytest.raises(FileNotFoundError, match="shard-000002"):
        CachedActivations(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not an activation cache"):
        CachedActivations(tmp_path / "nowhere")


# --------------------------------------------------------------------------------------------
# Sites, transcoders, training
# --------------------------------------------------------------------------------------------


def test_sites_and_transcoder_pairs(lm, tmp_path):
    write(lm, tmp_path / "pairs", 400, sites=MLP0, io="in_to_out", dtype=torch.float32)
    reader = CachedActivations(tmp_path / "pairs", batch_size=40, shuffle_window=100, seed=0)
    assert reader.single_site and reader.sites == {MLP0: (32, 32)}
    x, y = next(reader)
    assert x.shape == y.shape == (40, 32)
    mlp = lm._module.get_submodule(MLP0)
    with torch.no_grad():
        torch.testing.assert_close(mlp(x), y, atol=1e-5, rtol=1e-5)  # each pair is the MLP's input and output
    reader.close()
    write(lm, tmp_path / "sites", 400, dtype=torch.float32)
    both = CachedActivations(tmp_path / "sites", batch_size=40, shuffle_window=100, seed=0)
    one = CachedActivations(tmp_path / "sites", site=LAYER1, batch_size=40, shuffle_window=100, seed=0, dtype=torch.float64)
    batch, single = next(both), next(one)
    assert list(batch) == SITES and torch.equal(batch[LAYER1].double(), single)  # same seed, same rows
    assert list(next(CachedActivations(tmp_path / "sites", site=[LAYER1], batch_size=40, shuffle_window=100))) == [LAYER1]
    with pytest.raises(ValueError, match=r"\['nope'\] not in the cache; the cache at .* holds \['gpt_neox.layers.0.mlp', "
                                         r"'gpt_neox.layers.1'\]"):
        CachedActivations(tmp_path / "sites", site="nope")
    with pytest.raises(ValueError, match="batch_size=80 is more than half of shuffle_window=100"):
        CachedActivations(tmp_path / "sites", batch_size=80, shuffle_window=100)
    with pytest.raises(ValueError, match="serves several sites"):
        both.mean_squared_norm()


def test_two_recipes_train_from_a_cache(lm, tmp_path):
    write(lm, tmp_path / "cache", 1200)
    configs = [{"trainer": "TopKTrainer", "site": MLP0, "activation_dim": 32, "dict_size": 64, "k": 4,
                "warmup_steps": 2, "threshold_start_step": 2, "seed": 0},
               {"trainer": "StandardTrainer", "site": LAYER1, "activation_dim": 32, "dict_size": 64, "lr": 1e-3,
                "sparsity_penalty": 1e-3, "warmup_steps": 2, "seed": 0}]

    def train(save_dir=None):
        cache = CachedActivations(tmp_path / "cache", batch_size=64, shuffle_window=512, seed=0, epochs=None)
        return trainSAE(cache, trainer_configs=configs, steps=30, normalize_activations=True, save_dir=save_dir,
                        progress=False), cache

    (topk, standard), cache = train(tmp_path / "run")
    again, _ = train()
    for a, b in zip((topk, standard), again):
        assert all(torch.equal(value, b.state_dict()[key]) for key, value in a.state_dict().items())
    for index, site in enumerate((MLP0, LAYER1)):
        config = json.loads((tmp_path / "run" / f"trainer_{index}" / "config.json").read_text())
        assert config["training"]["activation_scale"] == pytest.approx(cache.mean_squared_norm(site) ** -0.5)
        assert config["buffer"]["cache"] == str((tmp_path / "cache").resolve()) and config["buffer"]["site"] == site
        assert config["trainer"]["layer"] == index and config["trainer"]["submodule_name"] == site
    stored = in_order(tmp_path / "cache", site=MLP0).float()
    fvu = (stored - topk(stored)).pow(2).sum() / (stored - stored.mean(0)).pow(2).sum()
    assert fvu < 0.5  # it learned the activations (raw scale: the scale is folded into the weights)


# --------------------------------------------------------------------------------------------
# Skipping: resume without decoding what was read
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shuffle", [True, False])
def test_skip_starts_exactly_where_reading_would_have(lm, tmp_path, monkeypatch, shuffle):
    write(lm, tmp_path, 1000, dtype=torch.float32)
    kwargs = {"batch_size": 48, "shuffle_window": 192, "seed": 5, "epochs": 3, "shuffle": shuffle}
    everything = list(CachedActivations(tmp_path, **kwargs))
    decoded = []
    decode = shard_format.ShardFile.decode

    def counting_decode(self, frame, parts, columns, byte_shuffle):
        decoded.append(frame)
        return decode(self, frame, parts, columns, byte_shuffle)

    monkeypatch.setattr(shard_format.ShardFile, "decode", counting_decode)
    for n in (1, 7, 30, len(everything) - 1):
        decoded.clear()
        reader = CachedActivations(tmp_path, **kwargs)
        reader.skip(n)
        first = next(reader)
        skip_decodes = len(decoded)
        rest = [first, *reader]
        assert len(rest) == len(everything) - n
        assert all(torch.equal(a[MLP0], b[MLP0]) and torch.equal(a[LAYER1], b[LAYER1])
                   for a, b in zip(rest, everything[n:]))
        if n == 30:  # 30 batches of 48 rows = 23 frames of 64 rows read; skipping decodes only what the window holds
            assert skip_decodes < 20, skip_decodes
    reader = CachedActivations(tmp_path, **kwargs)
    reader.skip(len(everything) + 1)
    with pytest.raises(ValueError, match=f"serves only {len(everything)} batches"):
        next(reader)
    with pytest.raises(RuntimeError, match="before the first batch"):
        reader.skip(1)


def test_a_run_on_a_cache_resumes_without_rereading_and_checks_the_source(lm, tmp_path):
    write(lm, tmp_path / "cache", 1200)
    config = [{"trainer": "TopKTrainer", "site": LAYER1, "activation_dim": 32, "dict_size": 64, "k": 4,
               "warmup_steps": 2, "threshold_start_step": 2, "seed": 0}]

    def reader(seed=0):
        return CachedActivations(tmp_path / "cache", batch_size=64, shuffle_window=256, seed=seed, epochs=None)

    def train(save_dir, steps, data=None, **kwargs):
        return trainSAE(reader() if data is None else data, trainer_configs=config, steps=steps, save_dir=save_dir,
                        save_steps=[12], progress=False, **kwargs)[0]

    class Interrupted(CachedActivations):
        served = 0

        def __next__(self):
            self.served += 1
            if self.served > 13:
                raise KeyboardInterrupt
            return super().__next__()

    whole = train(tmp_path / "whole", 30)
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", 30, data=Interrupted(tmp_path / "cache", batch_size=64, shuffle_window=256, seed=0,
                                                    epochs=None))
    skipped = []
    data = reader()
    data.skip = lambda n, skip=data.skip: (skipped.append(n), skip(n))
    resumed = train(tmp_path / "cut", 30, data=data, resume_from=tmp_path / "cut")
    assert skipped == [12]
    assert all(torch.equal(value, resumed.state_dict()[key]) for key, value in whole.state_dict().items())
    with pytest.raises(ValueError, match=r"data source differs .*seed: saved 0, now 1"):
        train(tmp_path / "cut", 30, data=reader(seed=1), resume_from=tmp_path / "cut")
    buffer = ActivationBuffer(iter(documents(200)), lm, submodules=SITES, n_ctxs=16, ctx_len=24, refresh_batch_size=8,
                              out_batch_size=64, seed=0)
    with pytest.raises(ValueError, match=r"data source differs .*source: saved 'CachedActivations', now None"):
        train(tmp_path / "cut", 30, data=buffer, resume_from=tmp_path / "cut")


def test_resuming_on_a_buffer_with_another_seed_is_an_error(lm, tmp_path):
    def buffer(seed):
        return ActivationBuffer(iter(documents(100)), lm, MLP0, n_ctxs=16, ctx_len=24, refresh_batch_size=8,
                                out_batch_size=32, seed=seed)

    config = [{"trainer": "StandardTrainer", "activation_dim": 32, "dict_size": 64, "lr": 1e-3,
               "sparsity_penalty": 1e-3, "warmup_steps": 2, "seed": 0}]
    trainSAE(buffer(0), trainer_configs=config, steps=4, save_steps=[4], save_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"seed: saved 0, now 1\); pass the same data source .*the same seed"):
        trainSAE(buffer(1), trainer_configs=config, steps=8, resume_from=tmp_path, progress=False)
    trainSAE(buffer(0), trainer_configs=config, steps=8, resume_from=tmp_path, progress=False)


# --------------------------------------------------------------------------------------------
# Resuming on an ActivationBuffer without rerunning the model over the data already used
# --------------------------------------------------------------------------------------------

def counting_buffer(lm, texts, **kwargs):
    """An ActivationBuffer that counts the texts its model runs on (its forward passes' batch rows)."""
    buffer = ActivationBuffer(iter(texts), lm, **{"n_ctxs": 16, "ctx_len": 24, "refresh_batch_size": 8,
                                                  "out_batch_size": 40, "seed": 3, **kwargs})
    buffer.texts_run = 0
    reader = buffer.reader

    class Counted:
        def __getattr__(self, name):
            return getattr(reader, name)

        def __call__(self, encoding):
            buffer.texts_run += len(encoding["input_ids"])
            return reader(encoding)

    buffer.reader = Counted()
    return buffer


def same_batches(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same_batches(a[k], b[k]) for k in a)
    if isinstance(a, tuple):
        return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))
    return torch.equal(a, b)


@pytest.mark.parametrize("sites", [{"submodule": MLP0}, {"submodule": MLP0, "io": "in_to_out", "remove_bos": True},
                                   {"submodules": SITES}])
def test_a_skipped_buffer_serves_exactly_the_batches_that_follow(lm, sites):
    texts = documents(300)
    whole = list(counting_buffer(lm, texts, **sites))
    for n in (1, 7, 30, len(whole) - 1, len(whole) + 5):
        buffer = counting_buffer(lm, texts, **sites)
        buffer.skip(n)
        rest = list(buffer)
        assert len(rest) == max(len(whole) - n, 0)
        assert all(same_batches(a, b) for a, b in zip(whole[n:], rest))


def test_skipping_runs_the_model_on_a_bounded_number_of_texts(lm):
    texts = documents(600)
    runs = []
    for n in (100, 300):
        uninterrupted, skipped = counting_buffer(lm, texts, submodule=MLP0), counting_buffer(lm, texts, submodule=MLP0)
        for _ in range(n):
            next(uninterrupted)
        skipped.skip(n)
        assert same_batches(next(skipped), next(uninterrupted))
        runs.append((skipped.texts_run, uninterrupted.texts_run))
    (short, short_whole), (long, long_whole) = runs
    assert long_whole > 2.5 * short_whole and long < 1.5 * short  # grows with the run uninterrupted, not skipped
    assert long < long_whole / 4


def test_skip_wants_a_fresh_buffer_and_a_count(lm):
    buffer = counting_buffer(lm, documents(50), submodule=MLP0)
    with pytest.raises(ValueError, match="n_batches must be an int >= 0"):
        buffer.skip(-1)
    next(buffer)
    with pytest.raises(RuntimeError, match="skip\\(\\) must come before the buffer reads any text"):
        buffer.skip(2)
    assert buffer.fingerprint is None  # it read texts it did not peek: trainSAE replays it


def test_a_run_on_a_buffer_resumes_without_rerunning_the_model_over_trained_data(lm, tmp_path):
    texts = documents(400)
    config = [{"trainer": "TopKTrainer", "activation_dim": 32, "dict_size": 64, "k": 4, "warmup_steps": 2,
               "threshold_start_step": 2, "seed": 0}]

    def train(save_dir, data, **kwargs):
        return trainSAE(data, trainer_configs=config, steps=200, save_dir=save_dir, save_steps=[180], progress=False,
                        **kwargs)[0]

    whole_buffer = counting_buffer(lm, texts, submodule=MLP0)
    whole = train(tmp_path / "whole", whole_buffer)

    class Interrupted(ActivationBuffer):  # cut after the checkpoint at step 180
        served = 0

        def __next__(self):
            self.served += 1
            if self.served > 182:
                raise KeyboardInterrupt
            return super().__next__()

    cut = counting_buffer(lm, texts, submodule=MLP0)
    cut.__class__ = Interrupted
    with pytest.raises(KeyboardInterrupt):
        train(tmp_path / "cut", cut)
    resumed_buffer = counting_buffer(lm, texts, submodule=MLP0)
    resumed = train(tmp_path / "cut", resumed_buffer, resume_from=tmp_path / "cut")
    assert all(torch.equal(value, resumed.state_dict()[key]) for key, value in whole.state_dict().items())
    assert resumed_buffer.texts_run < whole_buffer.texts_run / 2  # not the 180 steps' texts again
    with pytest.raises(ValueError, match=r"data source differs .*first_texts_sha256"):
        train(tmp_path / "cut", counting_buffer(lm, texts[1:], submodule=MLP0), resume_from=tmp_path / "cut")


def test_a_buffer_run_saved_before_buffers_could_skip_resumes_by_replaying(lm, tmp_path):
    texts = documents(100)
    config = [{"trainer": "StandardTrainer", "activation_dim": 32, "dict_size": 64, "lr": 1e-3,
               "sparsity_penalty": 1e-3, "warmup_steps": 2, "seed": 0}]

    class Older(ActivationBuffer):  # as this library's buffers were: no fingerprint, no skip
        fingerprint = None

    def train(data, steps, **kwargs):
        return trainSAE(data, trainer_configs=config, steps=steps, progress=False, **kwargs)[0]

    old = counting_buffer(lm, texts, submodule=MLP0)
    old.__class__ = Older
    train(old, 12, save_steps=[12], save_dir=tmp_path / "cut")
    state = torch.load(tmp_path / "cut" / "training_state.pt", weights_only=True)
    assert "first_batch_sha256" in json.dumps(state.get("data", state))
    resumed_buffer = counting_buffer(lm, texts, submodule=MLP0)
    resumed = train(resumed_buffer, 20, save_dir=tmp_path / "cut", resume_from=tmp_path / "cut")
    whole = train(counting_buffer(lm, texts, submodule=MLP0), 20)
    assert all(torch.equal(value, resumed.state_dict()[key]) for key, value in whole.state_dict().items())
