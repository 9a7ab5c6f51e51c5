"""Feature dashboards: the cost of the statistics pass against encoding the same tokens, the total
time of `dashboard`, and the size and load time of the HTML for 4,096 and 32,768 latents.

    python benchmarks/dashboard.py [--quick] [--threads 2] [--clock wall|cpu] [--tokens N] [--out results.json]

Model: the bundled tiny Pythia (assets/tiny-pythia), site gpt_neox.layers.0.mlp (output), text: the
stdlib stream (train split, cycled), ctx_len 128, 32 texts per forward pass. Dictionary: a standard
AutoEncoder with 4,096 latents trained here with the demo's recipe (L1 3.0, lr 1e-3, 1,024
activations per step; `--train-steps`, default 1,500) and cached under DL_BENCH_CACHE.

Passes over the same `--tokens` tokens, alternated `--rounds` times so that load from other
processes hits both alike:

  encode    tokenize, run the model to the site (the library's one-pass reader) and encode every
            context with the dictionary, in the chunks the statistics pass uses: what any pass that
            looks at the features costs;
  collect   `collect_features`: the same, plus taking each chunk's nonzeros and the per-latent
            statistics (counts, sums, maxima, histograms, top-k and sampled contexts).

`collect / encode` is the issue's target (<= 1.3). The breakdown times `feature_batches` (model,
encode, nonzeros) and `FeatureCollector.update` separately in one more collect pass.

Then the whole `dashboard` call (statistics, logit effects, statistics file, HTML) once, the sizes
of its files, and the same HTML for 32,768 latents: the 4,096 latents' statistics repeated 8 times
(the per-latent data of the same dictionary; a 32,768-latent dictionary has as many contexts per
latent once the pass is long enough to fill them). With a `chromium` executable, both index pages
and a latent page are opened in headless Chromium: seconds to the load event and to the table or
the latent rendered. `--big-tokens` also measures collect/encode for a 32,768-latent dictionary
over fewer tokens: random, with encoder biases set so that each latent fires on L0 / 32,768 of the
tokens, L0 that of the trained 4,096-latent dictionary.
"""
from __future__ import annotations

import hashlib
import json
import runpy
import tempfile
import time
from pathlib import Path

import torch

import _common

SITE = "gpt_neox.layers.0.mlp"
CTX_LEN, BATCH = 128, 32


def trained_dictionary(model, dict_size: int, steps: int, seed: int):
    """The demo's recipe on the bundled model's layer-0 MLP, cached by its settings."""
    from dictionary_learning import ActivationBuffer, AutoEncoder, stdlib_text_stream, trainSAE

    key = hashlib.sha256(json.dumps([dict_size, steps, seed, "demo-recipe-v1"]).encode()).hexdigest()[:12]
    path = _common.CACHE_DIR / f"dashboard_ae_{key}.pt"
    if path.exists():
        return AutoEncoder.from_pretrained(path)
    print(f"training the {dict_size}-latent dictionary ({steps} steps; cached at {path}) ...", flush=True)
    buffer = ActivationBuffer(stdlib_text_stream(repeat=True), model, SITE, n_ctxs=96, ctx_len=CTX_LEN,
                              refresh_batch_size=BATCH, out_batch_size=1024, seed=seed)
    ae = trainSAE(buffer, 128, dict_size, lr=1e-3, sparsity_penalty=3.0, steps=steps, warmup_steps=100, seed=seed,
                  progress=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(ae.state_dict(), path)
    return ae


def sparse_random_dictionary(model, dict_size: int, seed: int, density: float):
    """A random AutoEncoder whose encoder biases make each latent fire on `density` of the tokens."""
    from dictionary_learning import ActivationBuffer, AutoEncoder, stdlib_text_stream

    ae = AutoEncoder(128, dict_size, generator=torch.Generator().manual_seed(seed))
    buffer = ActivationBuffer(stdlib_text_stream(), model, SITE, n_ctxs=64, ctx_len=CTX_LEN, refresh_batch_size=BATCH,
                              out_batch_size=4096, seed=seed)
    x = next(iter(buffer))
    with torch.no_grad():
        pre = (x - ae.b_dec) @ ae.W_enc
        ae.b_enc.copy_(-pre.quantile(1 - density, dim=0))
    return ae


def encode_pass(dictionary, model, n_tokens: int) -> int:
    """Tokenize, read the site, encode in the statistics pass's chunks; the tokens counted."""
    from dictionary_learning import stdlib_text_stream
    from dictionary_learning.buffer import token_mask
    from dictionary_learning.feature_stats import CHUNK_ENTRIES, reading_buffer

    buffer = reading_buffer(stdlib_text_stream(repeat=True), model, SITE, "out", CTX_LEN, BATCH, False)
    per_chunk = max(1, CHUNK_ENTRIES // (CTX_LEN * dictionary.dict_size))
    counted = 0
    with torch.no_grad():
        while counted < n_tokens:
            encoding = buffer.tokenized_batch(BATCH)
            keep = token_mask(encoding["input_ids"], encoding["attention_mask"])
            acts = buffer.reader(encoding)[0]
            for start in range(0, len(acts), per_chunk):
                dictionary.encode(acts[start:start + per_chunk])
            counted += int(keep.sum())
    return counted


def collect_pass(dictionary, model, n_tokens: int):
    from dictionary_learning import collect_features, stdlib_text_stream

    return collect_features(dictionary, stdlib_text_stream(repeat=True), model, SITE, n_tokens=n_tokens,
                            ctx_len=CTX_LEN, batch_size=BATCH, progress=False)


def breakdown(dictionary, model, n_tokens: int) -> dict[str, float]:
    """Seconds in feature_batches (model, encode, nonzeros) and in FeatureCollector.update."""
    from dictionary_learning import stdlib_text_stream
    from dictionary_learning.feature_stats import FeatureCollector, feature_batches, reading_buffer

    buffer = reading_buffer(stdlib_text_stream(repeat=True), model, SITE, "out", CTX_LEN, BATCH, False)
    collector = FeatureCollector(dictionary.dict_size)
    batches = feature_batches(dictionary, buffer, n_tokens, BATCH)
    produce = update = 0.0
    while True:
        start = _common._clock()
        batch = next(batches, None)
        produce += _common._clock() - start
        if batch is None:
            break
        start = _common._clock()
        collector.update(*batch)
        update += _common._clock() - start
    return {"features_s": produce, "update_s": update, "tokens": collector.n_tokens}


def alternate(dictionary, model, n_tokens: int, rounds: int) -> dict:
    """encode and collect passes over the same tokens, alternated; seconds of each run."""
    runs = {"encode": [], "collect": []}
    for _ in range(rounds):
        start = _common._clock()
        encode_pass(dictionary, model, n_tokens)
        runs["encode"].append(_common._clock() - start)
        start = _common._clock()
        stats = collect_pass(dictionary, model, n_tokens)
        runs["collect"].append(_common._clock() - start)
    encode, collect = min(runs["encode"]), min(runs["collect"])
    return {"runs": runs, "encode_s": encode, "collect_s": collect, "ratio": collect / encode,
            "ratios": [c / e for c, e in zip(runs["collect"], runs["encode"])], "stats": stats}


def tiled(stats, times: int):
    """The statistics of `stats` repeated `times` times along the latents (a bigger dictionary of
    latents like these)."""
    from dictionary_learning import FeatureStats

    def rep(tensor):
        return tensor.repeat(times, *([1] * (tensor.dim() - 1)))

    return FeatureStats(
        n_tokens=stats.n_tokens, fire_count=rep(stats.fire_count), value_sum=rep(stats.value_sum),
        value_max=rep(stats.value_max), histogram=rep(stats.histogram), histogram_exponent=rep(stats.histogram_exponent),
        top={k: rep(v) for k, v in stats.top.items()}, samples={k: rep(v) for k, v in stats.samples.items()},
        meta={**stats.meta, "dict_size": stats.dict_size * times},
        logits=None if stats.logits is None else {k: rep(v) for k, v in stats.logits.items()}, vocab=stats.vocab)


def html_sizes(folder: Path) -> dict[str, float]:
    files = [p for p in folder.rglob("*") if p.is_file()]
    size = lambda paths: sum(p.stat().st_size for p in paths) / 2**20  # noqa: E731
    chunks = [p for p in files if p.parent.name == "latents"]
    return {"html_mb": size([p for p in files if p.name != "features.pt"]),
            "index_page_mb": size([folder / "index.html", folder / "dashboard.js", folder / "dashboard.css"]
                                  + [folder / "data" / n for n in ("meta.js", "vocab.js", "index.js")]),
            "index_data_mb": size([folder / "data" / "index.js"]),
            "chunk_mb": size(chunks) / max(1, len(chunks)), "chunks": len(chunks),
            "features_pt_mb": size([folder / "features.pt"]) if (folder / "features.pt").exists() else None}


def browser_times(folder: Path, latent: int) -> dict[str, float] | None:
    """Seconds to open index.html until its table is built and latent.html#latent until rendered."""
    chromium = runpy.run_path(str(_common.REPO_ROOT / "scripts" / "chromium.py"))
    if chromium["chromium_binary"]() is None:
        return None
    with chromium["Browser"]() as browser:
        start = time.perf_counter()
        page = browser.open(folder / "index.html")
        page.wait_until("document.body.dataset.ready")
        index_s = time.perf_counter() - start
        table = page.evaluate("document.getElementById('render-time').textContent")
        errors = page.errors
        start = time.perf_counter()
        page = browser.open(folder / "latent.html", fragment=str(latent))
        page.wait_until(f"document.body.dataset.ready === '{latent}'")
        latent_s = time.perf_counter() - start
        errors += page.errors
    return {"index_ready_s": index_s, "index_table": table, "latent_ready_s": latent_s, "errors": errors}


def main() -> None:
    parser = _common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=None, help="tokens per pass (default 1,000,000; quick 20,000)")
    parser.add_argument("--rounds", type=int, default=None, help="alternations of encode and collect (default 2)")
    parser.add_argument("--dict-size", type=int, default=4096)
    parser.add_argument("--train-steps", type=int, default=None, help="training steps (default 1,500; quick 100)")
    parser.add_argument("--big-tokens", type=int, default=None,
                        help="tokens for the 32,768-latent collect/encode (default 50,000; 0 skips; quick 4,096)")
    args = parser.parse_args()
    _common.set_threads(args.threads)
    _common.set_clock(args.clock)
    _common.import_library()
    from dictionary_learning import dashboard, load_bundled_model, render_dashboard, stdlib_text_stream
    from dictionary_learning.utils import keep_freed_cpu_memory

    keep_freed_cpu_memory()
    tokens = args.tokens or (20_000 if args.quick else 1_000_000)
    rounds = args.rounds or (1 if args.quick else 2)
    big_tokens = args.big_tokens if args.big_tokens is not None else (4096 if args.quick else 50_000)
    model = load_bundled_model()
    ae = trained_dictionary(model, args.dict_size, args.train_steps or (100 if args.quick else 1500), args.seed)

    print(f"encode vs collect over {tokens:,} tokens, {rounds} rounds ...", flush=True)
    passes = alternate(ae, model, tokens, rounds)
    stats = passes.pop("stats")
    parts = breakdown(ae, model, tokens)
    big = None
    if big_tokens:
        print(f"32,768 latents over {big_tokens:,} tokens ...", flush=True)
        big_ae = sparse_random_dictionary(model, 32768, args.seed, density=float(stats.density.sum()) / 32768)
        big = alternate(big_ae, model, big_tokens, rounds)
        big.pop("stats")

    with tempfile.TemporaryDirectory(prefix="dl_bench_dashboard_") as tmp:
        out = Path(tmp) / "d4096"
        start = _common._clock()
        dashboard(ae, stdlib_text_stream(repeat=True), model, SITE, out, n_tokens=tokens, ctx_len=CTX_LEN,
                  batch_size=BATCH, progress=False)
        total = _common._clock() - start
        start = _common._clock()
        render_dashboard(out / "features.pt", out)
        render = _common._clock() - start
        sizes = {4096: html_sizes(out)}
        latent = int(stats.fire_count.argmax())
        browser = {4096: browser_times(out, latent)}
        big_out = Path(tmp) / "d32768"
        start = _common._clock()
        render_dashboard(tiled(stats, 8), big_out)
        render_big = _common._clock() - start
        sizes[32768] = html_sizes(big_out)
        browser[32768] = browser_times(big_out, 32768 - 4096 + latent)

    per_token = passes["collect_s"] / tokens
    rows = [{"what": f"collect / encode, {args.dict_size} latents", "value": passes["ratio"],
             "note": f"best of {rounds}: encode {passes['encode_s']:.1f} s, collect {passes['collect_s']:.1f} s "
                     f"({tokens:,} tokens); rounds {', '.join(f'{r:.2f}' for r in passes['ratios'])}"},
            {"what": "  of which model + encode + nonzeros (s)", "value": parts["features_s"], "note": "feature_batches"},
            {"what": "  of which statistics update (s)", "value": parts["update_s"], "note": "FeatureCollector.update"}]
    if big:
        rows.append({"what": "collect / encode, 32,768 latents", "value": big["ratio"],
                     "note": f"random dictionary at the same L0, {big_tokens:,} tokens: encode {big['encode_s']:.1f} s, "
                             f"collect {big['collect_s']:.1f} s"})
    rows += [{"what": "dashboard() total (s)", "value": total,
              "note": f"{tokens:,} tokens: statistics, logit effects, features.pt, HTML"},
             {"what": "  extrapolated to 1M tokens (s)", "value": total - passes["collect_s"] + per_token * 1e6,
              "note": "collect rate x 1M + the rest"},
             {"what": "render_dashboard, 4,096 / 32,768 (s)", "value": f"{render:.1f} / {render_big:.1f}",
              "note": "HTML from features.pt"}]
    for size in (4096, 32768):
        s, b = sizes[size], browser[size]
        rows.append({"what": f"HTML, {size:,} latents (MB)", "value": s["html_mb"],
                     "note": f"index page {s['index_page_mb']:.2f} MB (data {s['index_data_mb']:.2f}), "
                             f"{s['chunks']} latent files of {s['chunk_mb']:.2f} MB"
                             + (f"; features.pt {s['features_pt_mb']:.1f} MB" if s["features_pt_mb"] else "")})
        if b:
            rows.append({"what": "  Chromium: index / latent ready (s)", "value":
                         f"{b['index_ready_s']:.2f} / {b['latent_ready_s']:.2f}",
                         "note": f"{b['index_table']}; console errors: {len(b['errors'])}"})
    alive = int((stats.fire_count > 0).sum())
    title = (f"Feature dashboard, bundled model {SITE}, AutoEncoder {args.dict_size} latents (L0 "
             f"{float(stats.density.sum()):.1f}, alive {alive}), {args.threads} threads, {args.clock} clock")
    text = _common.print_table(rows, ["what", "value", "note"], title=title)
    _common.write_json(args.out, {"benchmark": "dashboard", "machine": _common.machine_info(args.threads, args.clock),
                                  "config": {"tokens": tokens, "rounds": rounds, "dict_size": args.dict_size,
                                             "ctx_len": CTX_LEN, "batch_size": BATCH, "big_tokens": big_tokens},
                                  "passes": passes, "breakdown": parts, "big": big, "dashboard_s": total,
                                  "render_s": render, "render_32768_s": render_big,
                                  "sizes": {str(k): v for k, v in sizes.items()},
                                  "browser": {str(k): v for k, v in browser.items()}, "table_text": text})


if __name__ == "__main__":
    main()
