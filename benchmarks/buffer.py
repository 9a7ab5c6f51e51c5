"""Activations per second delivered by ActivationBuffer versus a bare PyTorch pipeline, and the
buffer's memory per stored activation.

    python benchmarks/buffer.py [--reference] [--quick] [--threads 2] [--out results.json]

On each model (a tiny GPT-NeoX built here with a locally trained tokenizer, and the bundled
assets/tiny-pythia when it exists), over the same texts, both deliver the same number of
activations of `gpt_neox.layers[LAYER].mlp`'s output:

  bare      tokenise a batch of texts, run the HF model under inference_mode with a plain forward
            hook on the submodule that raises to stop the forward there, keep the real tokens
            (attention mask), copy them into a preallocated ring of `capacity` rows;
  ours      dictionary_learning.ActivationBuffer (nnsight 0.8), iterated until as many rows came out.

"ours / bare" is the ratio of activations/s delivered. A buffer computes ahead of what it serves:
when a run stops, up to `capacity` rows are computed and still unread, which a longer run would
deliver. "collected / bare" counts them:
(delivered + unread rows held at the end) / time, the rate in a long run. With --reference, the reference's ActivationBuffer
(nnsight 0.3.7, transformers 4.x) and the same bare pipeline run in the reference virtualenv, on
the same saved model and texts. Memory: for each storage dtype, a fresh process builds a buffer of
`--memory-rows` rows (and one of a quarter of that), fills it and serves from it; the slope of its
peak and held resident memory above the baseline (model loaded, one forward done) against the rows
stored is the cost in bytes of one more stored activation (the pure storage cost is d × itemsize);
the intercept is a fixed cost.

Only the standard library, torch and transformers are imported at module level: the reference
worker imports this file in the reference virtualenv (`reference_side`).
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

import _common

LAYER = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# -------------------------------------------------------------------------------------------
# models and texts
# -------------------------------------------------------------------------------------------

_WORDS = ("the a one every some river house garden letter song teacher robot bird king city road "
          "builds sees paints carries finds follows remembers sells writes reads opens closes "
          "red blue old small long wooden quiet bright early late near after before with again "
          "morning night rain station market window table story number water stone").split()


def synthetic_texts(n: int, seed: int) -> list[str]:
    """`n` English-like documents of 20 to 400 words (so contexts are both short and truncated)."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        sentences = [" ".join(rng.choices(_WORDS, k=rng.randint(5, 14))) + "." for _ in range(rng.randint(2, 40))]
        texts.append(" ".join(sentences).capitalize())
    return texts


def build_tiny_model(directory: Path, seed: int, hidden: int = 256, layers: int = 4) -> None:
    """A random GPT-NeoX with a byte-level BPE tokenizer trained on `synthetic_texts`, saved
    with save_pretrained (Pythia's conventions: <|endoftext|> is BOS, EOS and pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(synthetic_texts(500, seed), trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|endoftext|>",
                                        eos_token="<|endoftext|>", pad_token="<|endoftext|>")
    config = GPTNeoXConfig(vocab_size=len(tokenizer), hidden_size=hidden, num_hidden_layers=layers,
                           num_attention_heads=4, intermediate_size=4 * hidden, max_position_embeddings=512,
                           bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    GPTNeoXForCausalLM(config).eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def load_hf(directory: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a local folder, left padding (as nnsight and the bundled model use)."""
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    # tokenizer.json alone (transformers 4 cannot read the tokenizer_config.json of 5): the same
    # tokenizer in both virtualenvs
    special = json.loads((Path(directory) / "tokenizer_config.json").read_text())
    special = {key: special[key] for key in ("bos_token", "eos_token", "pad_token", "unk_token")
               if isinstance(special.get(key), str)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(Path(directory) / "tokenizer.json"), **special)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    import transformers

    dtype_key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    model = AutoModelForCausalLM.from_pretrained(directory, local_files_only=True, **{dtype_key: dtype})
    return model.eval(), tokenizer


def endless(texts: list[str]) -> Iterator[str]:
    return itertools.cycle(texts)


# -------------------------------------------------------------------------------------------
# the bare pipeline (the same code in both virtualenvs)
# -------------------------------------------------------------------------------------------


class _StopForward(Exception):
    pass


def bare_pipeline(model, tokenizer, texts: Iterator[str], n_rows: int, ctx_len: int, batch_size: int,
                  capacity: int, dtype: torch.dtype = torch.float32) -> int:
    """Deliver `n_rows` activations of gpt_neox.layers[LAYER].mlp's output: tokenise, forward
    with a hook that stops right after the submodule, keep real tokens, copy into a ring buffer of
    `capacity` rows. Returns the rows delivered."""
    submodule = model.gpt_neox.layers[LAYER].mlp
    storage = torch.empty(capacity, model.config.hidden_size, dtype=dtype)
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output[0] if isinstance(output, tuple) else output)
        raise _StopForward

    handle = submodule.register_forward_hook(hook)
    delivered, write = 0, 0
    try:
        with torch.inference_mode():
            while delivered < n_rows:
                batch = list(itertools.islice(texts, batch_size))
                encoding = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=ctx_len)
                captured.clear()
                try:
                    model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"])
                except _StopForward:
                    pass
                rows = captured[0][encoding["attention_mask"].bool()]  # [n_tokens, d]
                rows = rows[: n_rows - delivered]
                first = min(len(rows), capacity - write)
                storage[write : write + first] = rows[:first]
                storage[: len(rows) - first] = rows[first:]
                write = (write + len(rows)) % capacity
                delivered += len(rows)
    finally:
        handle.remove()
    return delivered


def rate(fn: Callable[[], int | tuple[int, int]]) -> dict[str, float]:
    """Rows per second of one call of fn, which returns the rows it delivered, or (delivered,
    collected): a buffer also holds rows it has computed but not yet served when the run ends."""
    start = _common.CLOCKS[_common._clock_name]()
    rows = fn()
    seconds = _common.CLOCKS[_common._clock_name]() - start
    delivered, collected = rows if isinstance(rows, tuple) else (rows, rows)
    return {"rows": delivered, "collected": collected, "seconds": seconds, "act_per_s": delivered / seconds,
            "collected_per_s": collected / seconds}


def interleaved_rates(candidates: dict[str, Callable[[], int | tuple[int, int]]], rounds: int) -> dict[str, dict[str, Any]]:
    """Each candidate `rounds` times, alternating; median activations/s (delivered, and collected)
    per candidate."""
    samples: dict[str, list[dict]] = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, fn in candidates.items():
            samples[name].append(rate(fn))
    results = {}
    for name, runs in samples.items():
        delivered = [r["act_per_s"] for r in runs]
        results[name] = {"act_per_s": statistics.median(delivered), "min": min(delivered), "max": max(delivered),
                         "collected_per_s": statistics.median(r["collected_per_s"] for r in runs), "runs": runs}
    return results


# -------------------------------------------------------------------------------------------
# memory
# -------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Reset VmHWM (the peak resident set) to the current RSS (Linux: clear_refs 5)."""
    Path("/proc/self/clear_refs").write_text("5")


# glibc returns large freed blocks to the system only below a fixed mmap threshold; with its
# default (dynamic) threshold, freed forward-pass temporaries stay resident and would be counted
MEMORY_PROBE_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}


def tensor_bytes(obj: Any) -> int:
    """Bytes of the distinct tensor storages held in `obj`'s attributes."""
    storages = {}
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def memory_of(build_and_fill: Callable[[], Any], rows: int) -> dict[str, float]:
    """Memory of the buffer built and filled by `build_and_fill` (`rows` rows): the tensors it
    holds, and the peak and held resident memory above the RSS before, per row."""
    import gc

    gc.collect()
    reset_peak_rss()
    baseline = _status_kib("VmRSS")
    buffer = build_and_fill()
    held = _status_kib("VmRSS")
    peak = _status_kib("VmHWM")
    tensors = tensor_bytes(buffer)
    del buffer
    return {"rows": rows, "tensor_bytes_per_row": tensors / rows,
            "peak_bytes_per_row": (peak - baseline) * 1024 / rows,
            "held_bytes_per_row": (held - baseline) * 1024 / rows}


def per_row_memory(probe: Callable[[int], dict], rows: int) -> dict[str, Any]:
    """Bytes per stored activation from two buffer sizes (rows // 4 and rows, one fresh process
    each): the slope of held and of peak resident memory against rows (what one more stored row
    costs), the intercept of held memory (a fixed cost, MB), and the tensor bytes per row at
    `rows`. {"error": ...} when a probe fails."""
    try:
        small, large = probe(rows // 4), probe(rows)
    except RuntimeError as e:
        return {"error": str(e).strip().splitlines()[-1:]}

    def total(result: dict, key: str) -> float:
        return result[key] * result["rows"]

    span = large["rows"] - small["rows"]
    held_slope = (total(large, "held_bytes_per_row") - total(small, "held_bytes_per_row")) / span
    return {
        "tensor_bytes_per_row": large["tensor_bytes_per_row"],
        "held_bytes_per_row": held_slope,
        "peak_bytes_per_row": (total(large, "peak_bytes_per_row") - total(small, "peak_bytes_per_row")) / span,
        "fixed_held_mb": (total(large, "held_bytes_per_row") - held_slope * large["rows"]) / 2**20,
        "probes": [small, large],
    }


# -------------------------------------------------------------------------------------------
# the reference side (runs in the reference virtualenv through reference_worker.py)
# -------------------------------------------------------------------------------------------


def run_memory_probe(script: str, model_dir: str, dtype_name: str, rows: int, config: dict, texts: list[str],
                     tmp: Path, threads: int) -> dict:
    """`script --memory-probe model_dir dtype_name` in a fresh process (allocator thresholds of
    MEMORY_PROBE_ENV) for a buffer of `rows` rows; its JSON result."""
    probe_config = tmp / "probe.json"
    probe_config.write_text(json.dumps({**config, "memory_rows": rows, "texts": texts[:200]}))
    cmd = [sys.executable, script, "--memory-probe", model_dir, dtype_name, "--probe-config", str(probe_config),
           "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **MEMORY_PROBE_ENV})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def reference_side(config: dict, tensors: dict) -> dict:
    from dictionary_learning.buffer import ActivationBuffer as ReferenceBuffer
    from nnsight import LanguageModel

    if config.get("memory_dtype"):
        dtype = DTYPES[config["memory_dtype"]]
        hf_model, tokenizer = load_hf(config["model_dir"], dtype)
        model = LanguageModel(hf_model, tokenizer=tokenizer)
        texts = endless(config["texts"])
        n_ctxs = config["memory_rows"] // config["ctx_len"]

        def build_and_fill():
            buffer = ReferenceBuffer(texts, model, model.gpt_neox.layers[LAYER].mlp,
                                     d_submodule=hf_model.config.hidden_size, n_ctxs=n_ctxs,
                                     ctx_len=config["ctx_len"], refresh_batch_size=config["refresh_batch_size"],
                                     out_batch_size=config["out_batch_size"], device="cpu")
            for _ in range(3):
                next(buffer)
            return buffer

        warm_capacity = _warm_capacity(config)
        next(_reference_buffer_factory(model, hf_model, texts, config, ReferenceBuffer, warm_capacity)())
        return {"memory": memory_of(build_and_fill, n_ctxs * config["ctx_len"])}

    hf_model, tokenizer = load_hf(config["model_dir"])
    model = LanguageModel(hf_model, tokenizer=tokenizer)
    texts = config["texts"]
    n_rows = config["n_rows"]

    def reference_buffer() -> tuple[int, int]:
        buffer = _reference_buffer_factory(model, hf_model, endless(texts), config, ReferenceBuffer)()
        delivered = 0
        while delivered < n_rows:
            delivered += len(next(buffer))
        return delivered, delivered + int((~buffer.read).sum())

    def bare() -> int:
        return bare_pipeline(hf_model, tokenizer, endless(texts), n_rows, config["ctx_len"],
                             config["refresh_batch_size"], config["capacity"])

    bare()  # warm up both
    reference_buffer()
    return {"rates": interleaved_rates({"bare": bare, "reference": reference_buffer}, config["rounds"])}


def _warm_capacity(config: dict) -> int:
    """The smallest buffer (whole contexts) that can serve one batch: used to warm up."""
    contexts = -(-2 * config["out_batch_size"] // config["ctx_len"])
    return contexts * config["ctx_len"]


def _reference_buffer_factory(model, hf_model, texts, config, buffer_class, capacity=None):
    capacity = capacity or config["capacity"]

    def build():
        return buffer_class(texts, model, model.gpt_neox.layers[LAYER].mlp, d_submodule=hf_model.config.hidden_size,
                            n_ctxs=capacity // config["ctx_len"], ctx_len=config["ctx_len"],
                            refresh_batch_size=config["refresh_batch_size"],
                            out_batch_size=config["out_batch_size"], device="cpu")

    return build


# -------------------------------------------------------------------------------------------
# our side
# -------------------------------------------------------------------------------------------


def our_buffer_factory(model_dir: str, config: dict, dtype: torch.dtype = torch.float32):
    """(hf_model, tokenizer, build(texts) -> our ActivationBuffer) for the model in `model_dir`."""
    _common.import_library()
    from nnsight import TransformersModel

    from dictionary_learning.buffer import ActivationBuffer

    hf_model, tokenizer = load_hf(model_dir)
    model = TransformersModel(hf_model, tokenizer=tokenizer)

    def build(texts: Iterator[str], capacity: int | None = None):
        capacity = capacity or config["capacity"]
        return ActivationBuffer(texts, model, f"gpt_neox.layers.{LAYER}.mlp", n_ctxs=capacity // config["ctx_len"],
                                ctx_len=config["ctx_len"], refresh_batch_size=config["refresh_batch_size"],
                                out_batch_size=config["out_batch_size"], dtype=dtype, seed=0)

    return hf_model, tokenizer, build


def memory_probe(model_dir: str, config: dict, dtype_name: str) -> dict:
    """Run in a fresh process (see --memory-probe): bytes per stored activation of our buffer."""
    _hf, _tok, build = our_buffer_factory(model_dir, config, DTYPES[dtype_name])
    texts = endless(config["texts"])
    warm = build(texts, capacity=_warm_capacity(config))
    next(warm)
    del warm
    rows = config["memory_rows"]

    def build_and_fill():
        buffer = build(texts, capacity=rows)
        for _ in range(3):
            next(buffer)
        return buffer

    return memory_of(build_and_fill, rows)


def prepare_models(args, workdir: Path) -> list[dict]:
    """The models to measure: [{name, dir, texts}]."""
    models = []
    tiny_dir = workdir / "tiny-gpt-neox"
    build_tiny_model(tiny_dir, args.seed)
    models.append({"name": "tiny GPT-NeoX", "dir": str(tiny_dir),
                   "texts": synthetic_texts(200 if args.quick else 2000, args.seed + 1)})
    _common.import_library()
    from dictionary_learning import bundled

    texts = list(itertools.islice(bundled.stdlib_text_stream(split="train"), 200 if args.quick else 2000))
    models.append({"name": "bundled tiny-pythia", "dir": str(bundled.BUNDLED_MODEL_DIR), "texts": texts})
    return models


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternating runs per pipeline (default 3)")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--refresh-batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--out-batch-size", type=int, default=2048)
    parser.add_argument("--capacity", type=int, default=None, help="rows the buffers hold (default 32768)")
    parser.add_argument("--rows", type=int, default=None, help="activations each pipeline delivers per run "
                                                                 "(default 4 x capacity)")
    parser.add_argument("--memory-rows", type=int, default=None, help="buffer rows for the memory probe "
                                                                        "(default 131072)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL_DIR", "DTYPE"), help=argparse_hidden())
    parser.add_argument("--probe-config", type=Path, help=argparse_hidden())
    args = parser.parse_args()
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)

    if args.memory_probe:  # internal: one fresh process per measurement
        config = json.loads(args.probe_config.read_text())
        print(json.dumps(memory_probe(args.memory_probe[0], config, args.memory_probe[1])))
        return

    capacity = args.capacity or (4096 if args.quick else 32768)
    config = {
        "ctx_len": args.ctx_len, "refresh_batch_size": args.refresh_batch_size,
        "out_batch_size": min(args.out_batch_size, capacity // 2), "capacity": capacity,
        "n_rows": args.rows or 4 * capacity, "rounds": args.rounds or (1 if args.quick else 3),
        "memory_rows": args.memory_rows or (16384 if args.quick else 131072),
    }
    results = []
    with tempfile.TemporaryDirectory(prefix="dl_bench_buffer_") as tmp:
        for spec in prepare_models(args, Path(tmp)):
            texts = spec["texts"]
            hf_model, tokenizer, build = our_buffer_factory(spec["dir"], config)

            def ours() -> tuple[int, int]:
                buffer = build(endless(texts))
                delivered = 0
                while delivered < config["n_rows"]:
                    delivered += len(next(buffer))
                return delivered, delivered + buffer.n_unread

            def bare() -> int:
                return bare_pipeline(hf_model, tokenizer, endless(texts), config["n_rows"], config["ctx_len"],
                                     config["refresh_batch_size"], config["capacity"])

            bare()  # warm up both
            ours()
            rates = interleaved_rates({"bare": bare, "ours": ours}, config["rounds"])
            row = {"model": spec["name"], "d": hf_model.config.hidden_size, "rates": rates}
            print(f"  {spec['name']}: bare {rates['bare']['act_per_s']:.0f}/s, ours {rates['ours']['act_per_s']:.0f}/s",
                  flush=True)

            row["memory"] = {
                name: per_row_memory(lambda rows, n=name: run_memory_probe(__file__, spec["dir"], n, rows, config, texts,
                                                                           Path(tmp), args.threads),
                                     config["memory_rows"])
                for name in DTYPES}

            if args.reference:
                ref_config = {**config, "model_dir": spec["dir"], "texts": texts}
                row["reference"] = _common.run_reference("buffer", ref_config, threads=args.threads)

                def reference_probe(dtype_name: str, rows: int) -> dict:
                    probe = {**ref_config, "memory_dtype": dtype_name, "memory_rows": rows, "texts": texts[:200]}
                    return _common.run_reference("buffer", probe, threads=args.threads,
                                                 extra_env=MEMORY_PROBE_ENV)["memory"]

                row["reference_memory"] = {
                    name: per_row_memory(lambda rows, n=name: reference_probe(n, rows), config["memory_rows"])
                    for name in DTYPES
                }
            results.append(row)

    table = []
    for row in results:
        rates = row["rates"]
        entry = {"model": row["model"], "d": row["d"], "bare act/s": rates["bare"]["act_per_s"],
                 "ours act/s": rates["ours"]["act_per_s"],
                 "ours/bare": rates["ours"]["act_per_s"] / rates["bare"]["act_per_s"],
                 "collected/bare": rates["ours"]["collected_per_s"] / rates["bare"]["act_per_s"]}
        if "reference" in row:
            ref_rates = row["reference"]["rates"]
            entry.update({"ref bare act/s": ref_rates["bare"]["act_per_s"],
                          "ref act/s": ref_rates["reference"]["act_per_s"],
                          "ref/ref bare": ref_rates["reference"]["act_per_s"] / ref_rates["bare"]["act_per_s"],
                          "ref collected/ref bare": (ref_rates["reference"].get("collected_per_s", math.nan)
                                                     / ref_rates["bare"]["act_per_s"]),
                          "ours/ref": rates["ours"]["act_per_s"] / ref_rates["reference"]["act_per_s"]})
        table.append(entry)
    columns = ["model", "d", "bare act/s", "ours act/s", "ours/bare", "collected/bare"]
    if args.reference:
        columns += ["ref bare act/s", "ref act/s", "ref/ref bare", "ref collected/ref bare", "ours/ref"]
    text = _common.print_table(table, columns, title=(
        f"buffer throughput ({args.threads} threads, {args.clock} clock, ctx_len {config['ctx_len']}, "
        f"{config['refresh_batch_size']} texts/forward, {config['n_rows']:,} rows per run)"))

    memory_table = []
    for row in results:
        for dtype_name in DTYPES:
            mem = row["memory"].get(dtype_name, {})
            ref_mem = row.get("reference_memory", {}).get(dtype_name, {})
            memory_table.append({
                "model": row["model"], "dtype": dtype_name,
                "storage B/row": row["d"] * DTYPES[dtype_name].itemsize,
                "tensors B/row": mem.get("tensor_bytes_per_row"),
                "peak B/row": mem.get("peak_bytes_per_row"), "held B/row": mem.get("held_bytes_per_row"),
                "fixed MB": mem.get("fixed_held_mb"),
                "ref tensors B/row": ref_mem.get("tensor_bytes_per_row"),
                "ref peak B/row": ref_mem.get("peak_bytes_per_row"),
                "ref held B/row": ref_mem.get("held_bytes_per_row"), "ref fixed MB": ref_mem.get("fixed_held_mb"),
                "note": str(mem.get("error") or ref_mem.get("error") or ""),
            })
    memory_columns = ["model", "dtype", "storage B/row", "tensors B/row", "peak B/row", "held B/row", "fixed MB"]
    if args.reference:
        memory_columns += ["ref tensors B/row", "ref peak B/row", "ref held B/row", "ref fixed MB"]
    text += "\n\n" + _common.print_table(memory_table, memory_columns + ["note"], title=(
        f"buffer memory per stored activation (slope between {config['memory_rows'] // 4:,} and "
        f"{config['memory_rows']:,} rows of resident memory above baseline; fixed = intercept)"))
    _common.write_json(args.out, {
        "benchmark": "buffer", "machine": _common.machine_info(args.threads, args.clock), "config": config,
        "results": results, "table": table, "memory_table": memory_table, "table_text": text,
    })


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
