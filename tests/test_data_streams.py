"""Text streams: `zst_to_generator` (.jsonl.zst) and `hf_dataset_to_generator`, on files written here."""
import json
import warnings

import pytest
import zstandard

from dictionary_learning.utils import hf_dataset_to_generator, zst_to_generator


def jsonl(records) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in records)


def write_zst(path, payload: bytes, **compressor_kwargs):
    path.write_bytes(zstandard.ZstdCompressor(**compressor_kwargs).compress(payload))
    return path


TEXTS = [f"document {i}: " + "lorem ipsum dolor " * (i % 7) + "é✓" for i in range(3000)]


def test_zst_yields_every_text_in_order_across_chunks(tmp_path):
    path = write_zst(tmp_path / "shard.jsonl.zst", jsonl({"text": t, "meta": {"i": i}} for i, t in enumerate(TEXTS)))
    assert list(zst_to_generator(path, chunk_bytes=257)) == TEXTS  # lines split across chunks


def test_zst_concatenated_frames_and_last_line_without_newline(tmp_path):
    first = zstandard.ZstdCompressor().compress(jsonl({"text": t} for t in TEXTS[:10]))
    second = zstandard.ZstdCompressor().compress(json.dumps({"text": "last"}).encode())
    path = tmp_path / "two.jsonl.zst"
    path.write_bytes(first + second)
    assert list(zst_to_generator(path, chunk_bytes=64)) == TEXTS[:10] + ["last"]


def test_zst_skips_malformed_lines_and_warns_once_at_the_end(tmp_path):
    lines = [json.dumps({"text": "a"}).encode(), b"{not json", json.dumps({"body": "no text field"}).encode(),
             json.dumps(["a list"]).encode(), json.dumps({"text": 7}).encode(), b"\xff\xfe bad utf8",
             b"", json.dumps({"text": "b"}).encode()]
    path = write_zst(tmp_path / "messy.jsonl.zst", b"\n".join(lines) + b"\n")
    stream = zst_to_generator(path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert next(stream) == "a"
        assert not caught  # no warning until the stream ends
        assert list(stream) == ["b"]
    messages = [str(w.message) for w in caught]
    assert len(messages) == 1 and "skipped 5 malformed line(s)" in messages[0] and "line 2" in messages[0]


def test_zst_custom_text_field(tmp_path):
    path = write_zst(tmp_path / "c.jsonl.zst", jsonl({"content": t} for t in TEXTS[:5]))
    assert list(zst_to_generator(path, text_field="content")) == TEXTS[:5]


def test_zst_truncated_file_yields_what_it_can_then_raises(tmp_path):
    payload = jsonl({"text": t} for t in TEXTS)
    whole = zstandard.ZstdCompressor(level=1).compress(payload)
    path = tmp_path / "cut.jsonl.zst"
    path.write_bytes(whole[: int(len(whole) * 0.8)])
    got = []
    with pytest.raises(ValueError, match="truncated"):
        for text in zst_to_generator(path, chunk_bytes=1024):
            got.append(text)
    assert got == TEXTS[: len(got)]  # whatever came out before the cut is correct


def test_zst_corrupt_and_non_zstd_files(tmp_path):
    plain = tmp_path / "plain.jsonl"
    plain.write_bytes(jsonl({"text": t} for t in TEXTS[:3]))
    with pytest.raises(ValueError, match="not a zstd-compressed file"):
        zst_to_generator(plain)  # fails at the call, before iteration
    with pytest.raises(FileNotFoundError, match="no such file"):
        zst_to_generator(tmp_path / "missing.jsonl.zst")
    damaged = bytearray(zstandard.ZstdCompressor(write_checksum=True).compress(jsonl({"text": t} for t in TEXTS)))
    damaged[len(damaged) // 2] ^= 0xFF
    path = tmp_path / "damaged.jsonl.zst"
    path.write_bytes(bytes(damaged))
    with pytest.raises(ValueError, match="corrupt|truncated"):
        list(zst_to_generator(path))


def test_zst_closes_its_file(tmp_path, monkeypatch):
    import dictionary_learning.utils as utils

    opened = []

    def tracking_open(*args, **kwargs):
        opened.append(open(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(utils, "open", tracking_open, raising=False)
    path = write_zst(tmp_path / "s.jsonl.zst", jsonl({"text": t} for t in TEXTS[:100]))
    stream = zst_to_generator(path)
    next(stream)
    assert any(not f.closed for f in opened)  # the stream holds the file open while it runs
    stream.close()
    assert opened and all(f.closed for f in opened)
    opened.clear()
    assert len(list(zst_to_generator(path))) == 100
    assert opened and all(f.closed for f in opened)


def test_hf_dataset_local_json(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_bytes(jsonl({"text": t, "n": i} for i, t in enumerate(TEXTS[:20])))
    for streaming in (True, False):
        stream = hf_dataset_to_generator("json", data_files=str(path), streaming=streaming)
        assert list(stream) == TEXTS[:20]
    with pytest.raises(KeyError, match="no field 'body'.*'n', 'text'"):
        next(hf_dataset_to_generator("json", data_files=str(path), text_field="body"))
    with pytest.raises(TypeError, match="not a string"):
        next(hf_dataset_to_generator("json", data_files=str(path), text_field="n"))


def test_hf_dataset_passes_arguments_to_load_dataset(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(name, config_name=None, **kwargs):
        calls.append((name, config_name, kwargs))
        return iter([{"text": "one"}, {"text": "two"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    stream = hf_dataset_to_generator("monology/pile-uncopyrighted", split="validation", config_name="cfg")
    assert list(stream) == ["one", "two"]
    assert calls == [("monology/pile-uncopyrighted", "cfg", {"split": "validation", "streaming": True})]
