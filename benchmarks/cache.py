"""The activation cache: writing speed against a bare hooked forward, bytes stored per value,
reading speed against zstd alone, training from the cache against training from memory, and a
sweep of M trainers over one cache against M runs that each run the model.

    python benchmarks/cache.py [--quick] [--threads 2] [--rounds 3] [--out results/cache.json]

Models: tiny GPT-NeoX built here with d = 256 and d = 512 (4 layers, locally trained BPE) and the
bundled assets/tiny-pythia (d = 128). Site: `gpt_neox.layers.1.mlp`, ctx_len 128, 32 texts per
forward pass. Every pipeline is run `--rounds` times, alternating, and the median is reported.

writing    rows/s delivered to their destination by
           bare      tokenise, HF forward under inference_mode with a plain forward hook that stops
                     the pass after the site, keep real tokens, copy into a preallocated ring
                     (benchmarks/buffer.py's bare pipeline, float32);
           collect   the same collection as the cache's main thread does it (ActivationBuffer's
                     tokenize + token_activations, nnsight, bf16), with nothing stored;
           cache     cache_activations(..., dtype=bf16) into a fresh folder (zstd level 1, byte
                     shards of 32,768 rows), from the first forward pass to the manifest
                     of the last shard: compression, fsync and renames included.
           "cache/bare" is the issue's measure; "cache/collect" isolates what storing costs.
storage    bytes per stored activation value (activation columns only; token ids and positions add
           8 bytes per row), for each storage dtype and compression, from the float32 cache's rows
           re-encoded frame by frame (frames of 4,096 rows), with each variant's compression speed
           and the storage error ‖x̂ − x‖² / ‖x − x̄‖² (int8: 8-bit values and a float32 scale per
           row). Measured by its own run, --storage-only (a float32 cache per model).
reading    rows/s over one epoch of the bf16 cache: "zstd" decompresses every frame's activation
           part with zstandard and nothing else (no batches); "reader" is
           CachedActivations(shuffle=True, batch_size=4096, shuffle_window=32768: a quarter of the
           cache), "in order" the same with shuffle=False; "4 epochs" the shuffled reader over 4
           epochs (epochs=4): its sustained rate, with the window's first fill (a quarter of the
           cache decoded before the first batch) and its last drain counted once, not every epoch.
           "resume": seconds to the batch after the first 31 (the epoch's last) with skip(31)
           (nothing decoded but the window's rows) and by reading them. --reading-only writes one
           cache per model untimed and measures reading alone.
training   trainSAE with one TopKTrainer (F = 16 d, k = 32, batch 4,096) fed by CachedActivations
           against the same batches held in memory as a list (the same bf16 tensors, read before);
           wall clock, and the process's CPU time (every thread: the reader's decoding included),
           which a loaded machine disturbs less.
sweep      (bundled model) M TopK trainers (k = 8, 16, 32, 64) trained for S steps each: "on the fly"
           M runs, each with its own ActivationBuffer; "one pass" one run of M trainers on one
           buffer; "cache" cache_activations of S × 4,096 rows once, then M runs from the cache.
"""
from __future__ import annotations

import itertools
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import _common
from buffer import bare_pipeline, build_tiny_model, endless, interleaved_rates, load_hf, synthetic_texts

SITE = "gpt_neox.layers.1.mlp"
WINDOW = 32768  # the readers' shuffle window: a quarter of the cache, so an epoch is mostly steady state
SUSTAINED_EPOCHS = 4  # the sustained rate: the window's first fill and last drain spread over 4 epochs
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "int8": torch.int8}
STORAGE_VARIANTS = [(-1, True), (1, False), (1, True), (3, True)]  # (zstd level, byte shuffle)


def prepare_models(args, workdir: Path) -> list[dict]:
    _common.import_library()
    from dictionary_learning import bundled

    models = []
    for hidden in [int(name) for name in args.models if name != "bundled"]:
        directory = workdir / f"tiny-gpt-neox-{hidden}"
        build_tiny_model(directory, args.seed, hidden=hidden)
        models.append({"name": f"tiny GPT-NeoX d={hidden}", "dir": str(directory),
                       "texts": synthetic_texts(300 if args.quick else 2000, args.seed + 1)})
    if "bundled" in args.models:
        texts = list(itertools.islice(bundled.stdlib_text_stream(split="train"), 300 if args.quick else 2000))
        models.append({"name": "bundled tiny-pythia", "dir": str(bundled.BUNDLED_MODEL_DIR), "texts": texts})
    return models


def wall_seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# -------------------------------------------------------------------------------------------
# writing
# -------------------------------------------------------------------------------------------


def writing(spec: dict, model, hf_model, tokenizer, config: dict, workdir: Path) -> tuple[dict, Path]:
    from dictionary_learning import ActivationBuffer, cache_activations

    texts = spec["texts"]
    folders = iter(workdir / f"write_{i}" for i in itertools.count())
    kept: list[Path] = []

    def bare(n_rows: int) -> int:
        return bare_pipeline(hf_model, tokenizer, endless(texts), n_rows, config["ctx_len"],
                             config["refresh_batch_size"], 32768)

    def collect(n_rows: int) -> int:
        buffer = ActivationBuffer(endless(texts), model, submodules=SITE, n_ctxs=2, ctx_len=config["ctx_len"],
                                  refresh_batch_size=config["refresh_batch_size"], out_batch_size=1, device="cpu",
                                  dtype=torch.bfloat16)
        rows = 0
        while rows < n_rows:
            collected = buffer.token_activations(buffer.tokenize(buffer.text_batch()))
            rows += len(collected[0][0]) if collected is not None else 0
        return n_rows

    def cache(n_rows: int) -> int:
        folder = next(folders)
        cache_activations(endless(texts), model, SITE, folder, n_rows, ctx_len=config["ctx_len"],
                          refresh_batch_size=config["refresh_batch_size"], shard_tokens=config["shard_tokens"],
                          progress=False)
        kept.append(folder)
        return n_rows

    candidates = {"bare": bare, "collect": collect, "cache": cache}
    for fn in candidates.values():  # warm up
        fn(min(config["rows"], 16384))
    rates = interleaved_rates({name: (lambda fn=fn: fn(config["rows"])) for name, fn in candidates.items()},
                              config["rounds"])
    bytes_written = sum(p.stat().st_size for p in kept[-1].glob("shard-*"))
    return {name: result["act_per_s"] for name, result in rates.items()} | {
        "runs": {name: [run["act_per_s"] for run in result["runs"]] for name, result in rates.items()},
        "bytes_per_row": bytes_written / config["rows"]}, kept[-1]


# -------------------------------------------------------------------------------------------
# storage
# -------------------------------------------------------------------------------------------


def storage(rows: torch.Tensor, frame_rows: int = 4096) -> list[dict]:
    """Bytes per value, compression speed and storage error of every (dtype, level, shuffle) on
    `rows` [N, d] (float32). "error" = ‖x̂ − x‖² / ‖x − x̄‖²: the share of the variance that storage
    loses, on the scale of an SAE's FVU."""
    from dictionary_learning.shards import dequantize, encode_part, quantize, tensor_bytes

    table = []
    variance = float((rows.double() - rows.double().mean(0)).pow(2).sum())
    for dtype_name, dtype in DTYPES.items():
        if dtype == torch.int8:
            stored_rows = quantize(rows.numpy())  # [N, d + 4]: int8 values and a float32 scale per row
            restored = torch.from_numpy(dequantize(stored_rows, rows.shape[1]))
            itemsize, raw_bytes = 1, stored_rows.nbytes
        else:
            values = rows.to(dtype)
            stored_rows, restored, itemsize = tensor_bytes(values), values.float(), dtype.itemsize
            raw_bytes = stored_rows.nbytes
        error = float((restored.double() - rows.double()).pow(2).sum()) / variance
        frames = [stored_rows[i : i + frame_rows] for i in range(0, len(stored_rows), frame_rows)]
        table.append({"dtype": dtype_name, "compression": "none", "bytes/value": raw_bytes / rows.numel(),
                      "vs raw bf16": raw_bytes / rows.numel() / 2, "MB/s": None, "error": error})
        for level, shuffle in STORAGE_VARIANTS:
            if shuffle and itemsize == 1:
                continue
            start = time.perf_counter()
            stored = sum(len(encode_part(frame, level, shuffle, itemsize)) for frame in frames)
            seconds = time.perf_counter() - start
            table.append({"dtype": dtype_name, "compression": f"zstd {level}" + (" + shuffle" if shuffle else ""),
                          "bytes/value": stored / rows.numel(), "vs raw bf16": stored / rows.numel() / 2,
                          "MB/s": raw_bytes / seconds / 1e6, "error": error})
    return table


# -------------------------------------------------------------------------------------------
# reading
# -------------------------------------------------------------------------------------------


def reading(folder: Path, rounds: int) -> dict:
    import zstandard

    from dictionary_learning import CachedActivations
    from dictionary_learning.shards import Column, ShardFile, read_manifest

    manifest = read_manifest(folder)
    columns = [Column.from_json(entry) for entry in manifest["columns"]]
    part = next(i for i, column in enumerate(columns) if column.site == SITE)
    shards = [ShardFile(folder / entry["file"], entry["bytes"]) for entry in manifest["shards"]]
    rows = manifest["rows"]

    def zstd_only() -> int:
        decompressor = zstandard.ZstdDecompressor()
        for shard in shards:
            with open(shard.path, "rb") as file:
                for frame in shard.frames:
                    offset, length = frame["parts"][part]
                    file.seek(offset)
                    decompressor.decompress(file.read(length))
        return rows

    def reader(shuffle: bool, epochs: int = 1):
        def run() -> int:
            served = 0
            with CachedActivations(folder, batch_size=4096, shuffle=shuffle, seed=0, shuffle_window=WINDOW,
                                   epochs=epochs) as cache:
                for batch in cache:
                    served += len(batch)
            assert served == epochs * rows
            return served
        return run

    candidates = {"zstd": zstd_only, "reader": reader(True), "in order": reader(False),
                  f"reader, {SUSTAINED_EPOCHS} epochs": reader(True, SUSTAINED_EPOCHS)}
    for fn in candidates.values():
        fn()
    rates = interleaved_rates(candidates, rounds)
    n_batches = rows // 4096 - 1  # resuming at the last batch of the epoch: skip() against reading up to it

    def resume(skip: bool) -> float:
        with CachedActivations(folder, batch_size=4096, seed=0, shuffle_window=WINDOW) as cache:
            start = time.perf_counter()
            if skip:
                cache.skip(n_batches)
            else:
                for _ in range(n_batches):
                    next(cache)
            next(cache)
            return time.perf_counter() - start

    skip_seconds = statistics.median(resume(True) for _ in range(rounds))
    read_seconds = statistics.median(resume(False) for _ in range(rounds))
    return {name: result["act_per_s"] for name, result in rates.items()} | {
        "runs": {name: [run["act_per_s"] for run in result["runs"]] for name, result in rates.items()},
        "resume batches": n_batches, "skip s": skip_seconds, "read s": read_seconds}


def training_from_cache(folder: Path, d: int, rounds: int, steps: int) -> dict:
    from dictionary_learning import CachedActivations, trainSAE

    config = [{"trainer": "TopKTrainer", "activation_dim": d, "dict_size": 16 * d, "k": 32, "warmup_steps": 2,
               "threshold_start_step": 2, "seed": 0}]

    def cache() -> CachedActivations:
        return CachedActivations(folder, batch_size=4096, seed=0, epochs=None, shuffle_window=WINDOW)

    reader = cache()
    in_memory = [next(reader) for _ in range(steps)]
    reader.close()
    seconds: dict[str, list[float]] = {"memory": [], "cache": [], "memory cpu": [], "cache cpu": []}

    def timed(name: str, fn) -> None:
        cpu = time.process_time()  # every thread of the process: the reader's decoding included
        seconds[name].append(wall_seconds(fn))
        seconds[f"{name} cpu"].append(time.process_time() - cpu)

    trainSAE(in_memory, trainer_configs=config, steps=2, progress=False)  # warm up
    for _ in range(rounds):
        timed("memory", lambda: trainSAE(in_memory, trainer_configs=config, steps=steps, progress=False))
        with cache() as data:
            timed("cache", lambda: trainSAE(data, trainer_configs=config, steps=steps, progress=False))
    median = {name: statistics.median(values) for name, values in seconds.items()}
    return {"steps": steps, "memory s": median["memory"], "cache s": median["cache"],
            "cache speed / memory": median["memory"] / median["cache"],
            "cpu: cache speed / memory": median["memory cpu"] / median["cache cpu"], "runs": seconds}


# -------------------------------------------------------------------------------------------
# sweep
# -------------------------------------------------------------------------------------------


def sweep(spec: dict, model, config: dict, workdir: Path, steps: int, ks: list[int]) -> dict:
    from dictionary_learning import ActivationBuffer, CachedActivations, cache_activations, trainSAE

    batch = 4096
    d = model._module.config.hidden_size

    def trainer(k: int) -> dict:
        return {"trainer": "TopKTrainer", "activation_dim": d, "dict_size": 16 * d, "k": k, "warmup_steps": 2,
                "threshold_start_step": 2, "seed": 0}

    def buffer() -> ActivationBuffer:
        return ActivationBuffer(endless(spec["texts"]), model, SITE, n_ctxs=4 * batch // config["ctx_len"],
                                ctx_len=config["ctx_len"], refresh_batch_size=config["refresh_batch_size"],
                                out_batch_size=batch, dtype=torch.bfloat16, seed=0)

    def on_the_fly() -> None:
        for k in ks:
            trainSAE(buffer(), trainer_configs=[trainer(k)], steps=steps, progress=False)

    def one_pass() -> None:
        trainSAE(buffer(), trainer_configs=[trainer(k) for k in ks], steps=steps, progress=False)

    def from_cache() -> None:
        folder = workdir / f"sweep_{time.perf_counter_ns()}"
        cache_activations(endless(spec["texts"]), model, SITE, folder, steps * batch, ctx_len=config["ctx_len"],
                          refresh_batch_size=config["refresh_batch_size"], shard_tokens=config["shard_tokens"],
                          progress=False)
        for k in ks:
            with CachedActivations(folder, batch_size=batch, seed=0) as data:
                trainSAE(data, trainer_configs=[trainer(k)], steps=steps, progress=False)

    seconds = {"on the fly": wall_seconds(on_the_fly), "one pass": wall_seconds(one_pass),
               "cache": wall_seconds(from_cache)}
    return {"model": spec["name"], "trainers": len(ks), "steps": steps, "rows per run": steps * batch,
            **{f"{name} s": value for name, value in seconds.items()},
            "on the fly / cache": seconds["on the fly"] / seconds["cache"]}


# -------------------------------------------------------------------------------------------


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternating runs per pipeline (default 3)")
    parser.add_argument("--rows", type=int, default=None, help="rows written per cache (default 131072)")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--refresh-batch-size", type=int, default=32)
    parser.add_argument("--train-steps", type=int, default=None, help="steps of the training comparison (default 24)")
    parser.add_argument("--sweep-steps", type=int, default=None, help="steps per trainer in the sweep (default 40)")
    parser.add_argument("--models", nargs="+", choices=("256", "512", "bundled"), default=["256", "512", "bundled"],
                        help="which models to measure (default all)")
    parser.add_argument("--no-sweep", action="store_true", help="leave out the sweep")
    parser.add_argument("--storage-only", action="store_true", help="only the bytes-per-value table")
    parser.add_argument("--reading-only", action="store_true", help="only the reading table (caches written untimed)")
    args = parser.parse_args()
    _common.set_threads(args.threads)
    _common.import_library()
    from nnsight import TransformersModel

    from dictionary_learning import cache_activations, keep_freed_cpu_memory

    keep_freed_cpu_memory()
    config = {"ctx_len": args.ctx_len, "refresh_batch_size": args.refresh_batch_size,
              "rows": args.rows or (16384 if args.quick else 131072), "shard_tokens": 32768,
              "rounds": args.rounds or (1 if args.quick else 3)}
    train_steps = args.train_steps or (3 if args.quick else 24)
    sweep_steps = args.sweep_steps or (3 if args.quick else 40)
    tables: dict[str, Any] = {"write": [], "storage": {}, "read": [], "train": [], "sweep": None}
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="dl_bench_cache_") as tmp:
        for spec in prepare_models(args, Path(tmp)):
            hf_model, tokenizer = load_hf(spec["dir"])
            model = TransformersModel(hf_model, tokenizer=tokenizer)
            d = hf_model.config.hidden_size
            workdir = Path(tmp) / spec["name"].replace(" ", "_")
            if args.storage_only:
                storage_only(spec, model, config, workdir, tables)
                continue
            if args.reading_only:
                folder = workdir / "read"
                cache_activations(endless(spec["texts"]), model, SITE, folder, config["rows"], ctx_len=config["ctx_len"],
                                  refresh_batch_size=config["refresh_batch_size"], shard_tokens=config["shard_tokens"],
                                  progress=False)
                tables["read"].append(reading_row(spec, d, reading(folder, config["rounds"])))
                report(args, config, tables, results, complete=False)
                continue
            print(f"{spec['name']}: writing", flush=True)
            written, folder = writing(spec, model, hf_model, tokenizer, config, workdir)
            tables["write"].append({"model": spec["name"], "d": d, "bare rows/s": written["bare"],
                                    "collect rows/s": written["collect"], "cache rows/s": written["cache"],
                                    "cache/bare": written["cache"] / written["bare"],
                                    "cache/collect": written["cache"] / written["collect"],
                                    "file B/value": written["bytes_per_row"] / d})
            print(f"{spec['name']}: reading, training", flush=True)
            read = reading(folder, config["rounds"])
            tables["read"].append(reading_row(spec, d, read))
            train = training_from_cache(folder, d, config["rounds"], train_steps)
            tables["train"].append({"model": spec["name"], "d": d, "dict_size": 16 * d, "steps": train_steps,
                                    "memory s": train["memory s"], "cache s": train["cache s"],
                                    "cache speed / memory": train["cache speed / memory"],
                                    "cpu: cache speed / memory": train["cpu: cache speed / memory"]})
            results.append({"model": spec["name"], "d": d, "writing": written, "reading": read, "training": train})
            if spec["name"].startswith("bundled") and not args.no_sweep:
                report(args, config, tables, results, complete=False)
                print(f"{spec['name']}: sweep", flush=True)
                tables["sweep"] = sweep(spec, model, config, workdir, sweep_steps, [8, 16, 32, 64])
            report(args, config, tables, results, complete=False)
    report(args, config, tables, results, complete=True)


def reading_row(spec: dict, d: int, read: dict) -> dict:
    sustained = read[f"reader, {SUSTAINED_EPOCHS} epochs"]
    return {"model": spec["name"], "d": d, "zstd rows/s": read["zstd"], "reader rows/s": read["reader"],
            "in order rows/s": read["in order"], f"{SUSTAINED_EPOCHS} epochs rows/s": sustained,
            "reader/zstd": read["reader"] / read["zstd"], "in order/zstd": read["in order"] / read["zstd"],
            f"{SUSTAINED_EPOCHS} epochs/zstd": sustained / read["zstd"],
            "resume: skip s": read["skip s"], "resume: read s": read["read s"]}


def storage_only(spec: dict, model, config: dict, workdir: Path, tables: dict) -> None:
    """The storage table alone, from one float32 cache of the model (--storage-only)."""
    from dictionary_learning import CachedActivations, cache_activations

    cache_activations(endless(spec["texts"]), model, SITE, workdir / "float32", config["rows"], dtype=torch.float32,
                      ctx_len=config["ctx_len"], refresh_batch_size=config["refresh_batch_size"], progress=False)
    rows = torch.cat(list(CachedActivations(workdir / "float32", batch_size=8192, shuffle=False)))
    tables["storage"][spec["name"]] = storage(rows)
    _common.print_table(tables["storage"][spec["name"]], list(tables["storage"][spec["name"]][0]),
                        title=f"bytes per stored value: {spec['name']}")


def report(args, config: dict, tables: dict, results: list, complete: bool) -> None:
    """Print the tables so far and write the JSON (marked incomplete until the last model is done)."""
    if not tables["write"] and tables["read"]:
        text = _common.print_table(tables["read"], list(tables["read"][0]), title=(
            f"reading the bf16 cache (batch 4,096, shuffle window {WINDOW:,}, {config['rows']:,} rows)"))
        _common.write_json(args.out, {"benchmark": "cache reading", "complete": complete,
                                      "machine": _common.machine_info(args.threads, "wall"), "config": config,
                                      "read": tables["read"], "table_text": text})
        return
    if not tables["write"]:
        _common.write_json(args.out, {"benchmark": "cache storage", "machine": _common.machine_info(args.threads),
                                      "config": config, "storage": tables["storage"]})
        return
    text = _common.print_table(tables["write"], list(tables["write"][0]), title=(
        f"writing ({args.threads} threads, wall clock, {config['rows']:,} rows per run, bf16, zstd 1, "
        f"ctx_len {config['ctx_len']}, {config['refresh_batch_size']} texts/forward)"))
    text += "\n\n" + _common.print_table(tables["read"], list(tables["read"][0]), title=(
        f"reading one epoch of the bf16 cache (batch 4,096, shuffle window {WINDOW:,})"))
    text += "\n\n" + _common.print_table(tables["train"], list(tables["train"][0]), title=(
        f"TopK training (batch 4,096, k 32) fed from the cache (shuffle window {WINDOW:,}) vs the same batches "
        "in memory"))
    if tables["sweep"] is not None:
        text += "\n\n" + _common.print_table([tables["sweep"]], list(tables["sweep"]),
                                             title="sweep of M trainers (wall seconds)")
    _common.write_json(args.out, {"benchmark": "cache", "complete": complete,
                                  "machine": _common.machine_info(args.threads, "wall"), "config": config,
                                  "results": results, "tables": tables, "table_text": text})


if __name__ == "__main__":
    main()
