"""Many sites in one forward pass: activations/s of a multi-site ActivationBuffer against a bare hooked
forward of the same sites, against one single-site pass to the deepest site, and against one buffer
per site; memory per stored row and site.

    python benchmarks/sites.py [--quick] [--threads 1] [--clock cpu] [--out results.json]

Sites: every layer's MLP output and residual-stream output (`gpt_neox.layers.{i}.mlp` and
`gpt_neox.layers.{i}`), 4 layers = 8 sites, on a tiny GPT-NeoX built here and the bundled
assets/tiny-pythia. Each pipeline delivers the same number of rows (tokens; a row of a multi-site
pipeline holds every site's activation of its token):

  bare         tokenise, one HF forward under inference_mode with plain forward hooks on every
               site, the deepest one raising to stop the pass, keep the real tokens, copy each site's
               rows into its preallocated ring;
  ours         ActivationBuffer(submodules=[8 sites]) (nnsight);
  ours hooks   the same buffer on the plain transformers model (forward hooks, no nnsight);
  deepest      ActivationBuffer of the deepest site alone (one single-site pass as far as the
               multi-site pass goes);
  separate     one single-site buffer per site, run one after the other (what 8 sites cost without
               multi-site collection): the sum of their times.

A buffer computes ahead of what it serves (it fills before serving and holds up to `capacity` unread
rows when a run stops): "collected/bare" counts those rows too, the rate of a long run.

Memory: a fresh process per storage dtype builds the 8-site buffer at two sizes; the slope of its
resident memory against rows, divided by the number of sites, is the cost of one stored activation
of one site (the pure storage cost is d × itemsize).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Iterator

import torch

import _common
from buffer import (DTYPES, _StopForward, endless, interleaved_rates, load_hf, memory_of, per_row_memory,
                    prepare_models, run_memory_probe)

LAYERS = 4


def site_names(n_layers: int) -> list[str]:
    return [name for i in range(n_layers) for name in (f"gpt_neox.layers.{i}.mlp", f"gpt_neox.layers.{i}")]


def bare_sites(model, tokenizer, texts: Iterator[str], sites: list[str], n_rows: int, ctx_len: int,
               batch_size: int, capacity: int) -> int:
    """Deliver `n_rows` tokens' activations at every site with one hooked forward per batch of texts
    (stopped after the deepest site, gpt_neox.layers.{last}), copied into one ring per site."""
    width = model.config.hidden_size
    storage = {site: torch.empty(capacity, width) for site in sites}
    captured: dict[str, torch.Tensor] = {}
    deepest = f"gpt_neox.layers.{LAYERS - 1}"
    handles = []
    for site in sites:
        def hook(_module, _inputs, output, site=site):
            captured[site] = output[0] if isinstance(output, tuple) else output
            if site == deepest:
                raise _StopForward
        handles.append(model.get_submodule(site).register_forward_hook(hook))
    delivered, write = 0, 0
    try:
        with torch.inference_mode():
            while delivered < n_rows:
                batch = [next(texts) for _ in range(batch_size)]
                encoding = tokenizer(batch, return_tensors="pt", padding=True, truncation=True, max_length=ctx_len)
                try:
                    model(input_ids=encoding["input_ids"], attention_mask=encoding["attention_mask"])
                except _StopForward:
                    pass
                keep = encoding["attention_mask"].bool()
                n = min(int(keep.sum()), n_rows - delivered)
                for site in sites:
                    rows = captured[site][keep][:n]
                    first = min(n, capacity - write)
                    storage[site][write : write + first] = rows[:first]
                    storage[site][: n - first] = rows[first:]
                write = (write + n) % capacity
                delivered += n
    finally:
        for handle in handles:
            handle.remove()
    return delivered


def buffer_factory(model_dir: str, config: dict, dtype: torch.dtype = torch.float32):
    """(hf_model, tokenizer, build(texts, submodules, backend, capacity) -> ActivationBuffer)."""
    _common.import_library()
    from nnsight import TransformersModel

    from dictionary_learning import ActivationBuffer

    hf_model, tokenizer = load_hf(model_dir)
    nnsight_model = TransformersModel(hf_model, tokenizer=tokenizer)

    def build(texts, submodules, backend="nnsight", capacity=None):
        capacity = capacity or config["capacity"]
        kwargs = dict(n_ctxs=capacity // config["ctx_len"], ctx_len=config["ctx_len"],
                      refresh_batch_size=config["refresh_batch_size"], out_batch_size=config["out_batch_size"],
                      dtype=dtype, seed=0)
        model = nnsight_model if backend == "nnsight" else hf_model
        if backend != "nnsight":
            kwargs["tokenizer"] = tokenizer
        if isinstance(submodules, str):
            return ActivationBuffer(texts, model, submodules, **kwargs)
        return ActivationBuffer(texts, model, submodules=submodules, **kwargs)

    return hf_model, tokenizer, build


def drain(buffer, n_rows: int) -> tuple[int, int]:
    delivered = 0
    while delivered < n_rows:
        batch = next(buffer)
        delivered += len(next(iter(batch.values())) if isinstance(batch, dict) else batch)
    return delivered, delivered + buffer.n_unread


def memory_probe(model_dir: str, config: dict, dtype_name: str) -> dict:
    """Run in a fresh process (--memory-probe): memory of the 8-site buffer at config's rows."""
    _hf, _tok, build = buffer_factory(model_dir, config, DTYPES[dtype_name])
    sites = site_names(LAYERS)
    texts = endless(config["texts"])
    warm = build(texts, sites, capacity=4 * config["ctx_len"] * config["refresh_batch_size"])
    next(warm)
    del warm
    rows = config["memory_rows"]

    def build_and_fill():
        buffer = build(texts, sites, capacity=rows)
        for _ in range(3):
            next(buffer)
        return buffer

    return memory_of(build_and_fill, rows)


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help="alternating runs per pipeline (default 3)")
    parser.add_argument("--ctx-len", type=int, default=128)
    parser.add_argument("--refresh-batch-size", type=int, default=32)
    parser.add_argument("--capacity", type=int, default=None, help="rows the buffers hold (default 16384)")
    parser.add_argument("--memory-rows", type=int, default=None, help="rows for the memory probe (default 65536)")
    parser.add_argument("--memory-probe", nargs=2, metavar=("MODEL_DIR", "DTYPE"), help="(internal)")
    parser.add_argument("--probe-config", type=Path, help="(internal)")
    args = parser.parse_args()
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)
    if args.memory_probe:
        config = json.loads(args.probe_config.read_text())
        print(json.dumps(memory_probe(args.memory_probe[0], config, args.memory_probe[1])))
        return

    capacity = args.capacity or (2048 if args.quick else 16384)
    config = {"ctx_len": args.ctx_len, "refresh_batch_size": args.refresh_batch_size,
              "out_batch_size": min(2048, capacity // 2), "capacity": capacity, "n_rows": 6 * capacity,
              "rounds": args.rounds or (1 if args.quick else 3),
              "memory_rows": args.memory_rows or (8192 if args.quick else 65536)}
    sites = site_names(LAYERS)
    results, table, memory_table = [], [], []
    with tempfile.TemporaryDirectory(prefix="dl_bench_sites_") as tmp:
        args.quick = True  # prepare_models: 200 texts per model are plenty (the stream cycles)
        for spec in prepare_models(args, Path(tmp)):
            texts = spec["texts"]
            hf_model, tokenizer, build = buffer_factory(spec["dir"], config)
            n_rows = config["n_rows"]
            candidates = {
                "bare": lambda: bare_sites(hf_model, tokenizer, endless(texts), sites, n_rows, config["ctx_len"],
                                           config["refresh_batch_size"], config["capacity"]),
                "ours": lambda: drain(build(endless(texts), sites), n_rows),
                "ours hooks": lambda: drain(build(endless(texts), sites, backend="torch"), n_rows),
                "deepest": lambda: drain(build(endless(texts), sites[-1]), n_rows),
            }
            for fn in candidates.values():  # warm up
                fn()
            rates = interleaved_rates(candidates, config["rounds"])
            separate = interleaved_rates({site: (lambda s=site: drain(build(endless(texts), s), n_rows))
                                          for site in sites}, 1)
            separate_seconds = sum(r["runs"][0]["seconds"] for r in separate.values())
            per_s = {name: r["act_per_s"] for name, r in rates.items()}
            entry = {"model": spec["name"], "d": hf_model.config.hidden_size, "sites": len(sites),
                     "bare rows/s": per_s["bare"], "ours rows/s": per_s["ours"],
                     "ours/bare": per_s["ours"] / per_s["bare"],
                     "collected/bare": rates["ours"]["collected_per_s"] / per_s["bare"],
                     "hooks/bare": per_s["ours hooks"] / per_s["bare"],
                     "ours time / deepest": per_s["deepest"] / per_s["ours"],
                     "separate / ours": per_s["ours"] * separate_seconds / n_rows}
            table.append(entry)
            print(f"  {spec['name']}: " + ", ".join(f"{k} {_common.fmt(v)}" for k, v in entry.items()
                                                     if k not in ("model",)), flush=True)

            memory = {name: per_row_memory(lambda rows, n=name: run_memory_probe(__file__, spec["dir"], n, rows, config,
                                                                                 texts, Path(tmp), args.threads),
                                           config["memory_rows"])
                      for name in DTYPES}
            for dtype_name, mem in memory.items():
                memory_table.append({
                    "model": spec["name"], "dtype": dtype_name,
                    "storage B/row/site": entry["d"] * DTYPES[dtype_name].itemsize,
                    "tensors B/row/site": _per_site(mem.get("tensor_bytes_per_row"), len(sites)),
                    "peak B/row/site": _per_site(mem.get("peak_bytes_per_row"), len(sites)),
                    "held B/row/site": _per_site(mem.get("held_bytes_per_row"), len(sites)),
                    "fixed MB": mem.get("fixed_held_mb"), "note": str(mem.get("error") or ""),
                })
            results.append({"model": spec["name"], "rates": rates, "separate": separate, "memory": memory})

    text = _common.print_table(table, list(table[0]), title=(
        f"{len(sites)} sites in one pass ({args.threads} threads, {args.clock} clock, ctx_len {config['ctx_len']}, "
        f"{config['refresh_batch_size']} texts/forward, {config['n_rows']:,} rows per run)"))
    text += "\n\n" + _common.print_table(memory_table, list(memory_table[0]), title=(
        f"memory per stored activation and site (slope between {config['memory_rows'] // 4:,} and "
        f"{config['memory_rows']:,} rows, {len(sites)} sites)"))
    _common.write_json(args.out, {"benchmark": "sites", "machine": _common.machine_info(args.threads, args.clock),
                                  "config": config, "sites": sites, "results": results, "table": table,
                                  "memory_table": memory_table, "table_text": text})


def _per_site(value, n_sites: int):
    return None if value is None else value / n_sites


if __name__ == "__main__":
    main()
