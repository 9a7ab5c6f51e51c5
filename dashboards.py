"""Feature dashboards: static HTML that shows what each latent of a dictionary responds to.

`dashboard(dictionary, data, model, site, out_dir)` runs the streaming pass of feature_stats.py,
adds each latent's logit effects, saves the statistics to `out_dir/features.pt` and writes

    index.html            summary, log10 feature-density histogram (inline SVG), a sortable,
                          filterable, paginated table of every latent
    latent.html#<i>       one latent: its statistics, activation histogram, logit effects, top
                          activating contexts and samples by activation quantile, tokens shaded by
                          the latent's value (hover shows it)
    dashboard.css, dashboard.js
    data/meta.js, data/vocab.js, data/index.js
    data/latents/NNNNN.js chunk_size latents each, loaded by a script tag when a latent is shown

No server, no network: the data are script files (`DL.chunk(i, [...])`), which browsers load from
file:// where they refuse fetch(). `render_dashboard(stats_or_path, out_dir)` rebuilds the HTML
from a saved `features.pt` without the model.
"""
from __future__ import annotations

import html
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from .feature_stats import FeatureStats, collect_features, logit_effects, reading_buffer
from .dictionary import Transcoder
from .files import atomic_write

__all__ = ["dashboard", "render_dashboard", "token_texts"]

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "dashboard"
ASSETS = ("dashboard.css", "dashboard.js", "latent.html")
INDEX_TOP_TOKENS = 5  # distinct top-activating tokens per latent in the index table
INDEX_PROMOTED = 3  # promoted tokens per latent in the index table
QUANTUM = 1000  # context values are stored as round(QUANTUM · f / max|f|)


def dashboard(dictionary, data, model=None, site=None, out_dir: str | os.PathLike = "dashboard",
              n_tokens: int = 1_000_000, *, io: str | None = None, ctx_len: int = 128, batch_size: int = 32,
              remove_bos: bool = False, tokenizer=None, top_k: int = 10, n_samples: int = 16, context: int = 10,
              n_bins: int = 32, n_logits: int = 10, seed: int = 0, chunk_size: int = 256, title: str | None = None,
              progress: bool = True) -> Path:
    """Collect the feature statistics of `dictionary` over `n_tokens` tokens and write the dashboard
    into `out_dir`; returns the path of its index.html.

    data: an iterator of strings, with `model` (an nnsight model, or a torch causal LM with
        `tokenizer=`) and `site` (the module the dictionary reads: envoy, module or dotted path);
        or an ActivationBuffer, whose text stream, model and site are used.
    io: "out" or "in" (default: "in" for a transcoder, else "out"). ctx_len, batch_size (texts per
        forward pass), remove_bos: as for ActivationBuffer.
    top_k contexts of largest activation and n_samples uniformly sampled ones per latent, each
    `context` tokens either side; n_bins histogram bins; n_logits promoted and suppressed tokens;
    seed: the samples' generator. chunk_size: latents per data file.
    """
    io = io or ("in" if isinstance(dictionary, Transcoder) else "out")
    buffer = reading_buffer(data, model, site, io, ctx_len, batch_size, remove_bos, tokenizer)
    stats = collect_features(dictionary, buffer, n_tokens=n_tokens, io=io, top_k=top_k, n_samples=n_samples,
                             context=context, n_bins=n_bins, seed=seed, progress=progress)
    bos = buffer.tokenizer.bos_token_id
    try:
        stats.logits = logit_effects(dictionary, buffer.reader.torch_module, n=n_logits,
                                     probe_id=bos if bos is not None else 0)
        if stats.logits is None:
            stats.meta["logits_note"] = ("no logit effects: the decoder's width is not the unembedding's "
                                         "(the site is not in the residual stream's width)")
    except ValueError as error:
        stats.meta["logits_note"] = f"no logit effects: {error}"
    stats.vocab = token_texts(buffer.tokenizer, stats.used_token_ids())
    out = Path(out_dir)
    stats.save(out / "features.pt")
    return render_dashboard(stats, out, chunk_size=chunk_size, title=title)


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
"""The control characters shown as escapes (all but tab and newline)."""


def _byte_level_alphabet() -> dict[str, int]:
    """{character: byte} of byte-level BPE (GPT-2, Pythia): the printable Latin-1 bytes stand for
    themselves, every other byte b for chr(256 + its rank among those bytes)."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_texts(tokenizer, ids) -> dict[int, str]:
    """{id: the text of that one token} for `ids` (special tokens included, spaces kept). A byte-level
    token that is only part of a UTF-8 character (it decodes to U+FFFD) shows its bytes instead,
    e.g. "\\xe2\\x80", and control characters other than newline and tab show as escapes ("\\x1e"),
    which a browser would draw as empty boxes or not at all."""
    ids = [int(i) for i in ids]
    texts = tokenizer.batch_decode([[i] for i in ids], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    partial = [n for n, text in enumerate(texts) if "\ufffd" in text]
    if partial:
        byte_of = _byte_level_alphabet()
        pieces = tokenizer.convert_ids_to_tokens([ids[n] for n in partial])
        for n, piece in zip(partial, pieces):
            if isinstance(piece, str) and piece and all(char in byte_of for char in piece):  # byte-level BPE
                texts[n] = bytes(byte_of[char] for char in piece).decode("utf-8", errors="backslashreplace")
    texts = [_CONTROL.sub(lambda found: f"\\x{ord(found.group()):02x}", text) for text in texts]
    return dict(zip(ids, texts))


# =============================================================================================
# HTML
# =============================================================================================


def render_dashboard(stats: FeatureStats | str | os.PathLike, out_dir: str | os.PathLike, chunk_size: int = 256,
                     title: str | None = None) -> Path:
    """Write the dashboard's pages and data files for `stats` (a FeatureStats, or the path of a
    features.pt written by `dashboard`) into `out_dir`; returns the path of index.html. Data files
    of an earlier, larger dashboard in `out_dir` are removed."""
    if not isinstance(stats, FeatureStats):
        stats = FeatureStats.load(stats)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int (latents per data file); got {chunk_size!r}.")
    out = Path(out_dir)
    meta = stats.meta
    title = title or f"{meta.get('dictionary', 'Dictionary')} on {meta.get('site') or 'its site'}"
    n_latents = stats.dict_size
    page_meta = {"title": title, "n_latents": n_latents, "n_tokens": stats.n_tokens, "chunk_size": chunk_size,
                 "context": meta.get("context"), "model": meta.get("model"), "site": meta.get("site"),
                 "io": meta.get("io"), "dictionary": meta.get("dictionary"), "logits_note": meta.get("logits_note")}
    _write_text(out / "data" / "meta.js", f"DL.meta = {_json(page_meta)};\n")
    _write_text(out / "data" / "vocab.js", f"DL.vocab = {_json({str(k): v for k, v in stats.vocab.items()})};\n")
    _write_text(out / "data" / "index.js", f"DL.index = {_json(index_columns(stats))};\n")
    latents = latent_records(stats)
    written = set()
    for chunk in range(math.ceil(n_latents / chunk_size)):
        name = f"{chunk:05d}.js"
        part = latents[chunk * chunk_size:(chunk + 1) * chunk_size]
        _write_text(out / "data" / "latents" / name, f"DL.chunk({chunk}, {_json(part)});\n")
        written.add(name)
    for stale in (out / "data" / "latents").glob("*.js"):
        if stale.name not in written:
            stale.unlink()
    assets = ASSET_DIR
    for name in ASSETS:
        data = (assets / name).read_bytes()
        atomic_write(out / name, lambda file, data=data: file.write(data))
    template = (assets / "index.html").read_text()
    page = template.format(title=html.escape(title), summary=summary_html(stats),
                           histogram=density_histogram_svg(stats.density, stats.n_tokens))
    return _write_text(out / "index.html", page)


def index_columns(stats: FeatureStats) -> dict[str, Any]:
    """The index table's data: density, mean when active and max per latent, the distinct centre
    tokens of its top contexts, and its most promoted tokens."""
    context = stats.meta.get("context", (stats.top["window_ids"].shape[-1] - 1) // 2)
    centre = stats.top["window_ids"][:, :, context].tolist()
    filled = (stats.top["tokens"] >= 0).tolist()
    top = [list(dict.fromkeys(i for i, ok in zip(ids, oks) if ok))[:INDEX_TOP_TOKENS]
           for ids, oks in zip(centre, filled)]
    columns = {"density": _rounded(stats.density), "mean": _rounded(stats.mean_active),
               "max": _rounded(stats.value_max), "top": top}
    if stats.logits is not None:
        columns["promoted"] = stats.logits["promoted_ids"][:, :INDEX_PROMOTED].tolist()
    return columns


def latent_records(stats: FeatureStats) -> list[dict[str, Any]]:
    """One JSON-ready record per latent for its page. Contexts are [value, token index, ids, q]
    with q_k = round(QUANTUM · f_k / qscale), qscale the latent's largest |f| shown."""
    shown = torch.cat([stats.top["window_values"], stats.samples["window_values"]], dim=1)  # [F, k+S, W]
    qscale = torch.maximum(shown.abs().amax(dim=(1, 2)), stats.value_max.abs())
    qscale = torch.where(qscale > 0, qscale, torch.ones_like(qscale))

    def contexts(selection: dict[str, torch.Tensor], by_value: bool) -> list[list]:
        q = (selection["window_values"] / qscale[:, None, None] * QUANTUM).round().int().tolist()
        values, tokens = selection["values"].tolist(), selection["tokens"].tolist()
        ids = selection["window_ids"].tolist()
        out = []
        for i in range(len(values)):
            entries = [[_round(values[i][s]), tokens[i][s], ids[i][s], q[i][s]]
                       for s in range(len(values[i])) if tokens[i][s] >= 0]
            if by_value:
                entries.sort(key=lambda entry: (-entry[0], entry[1]))
            out.append(entries)
        return out

    top, samples = contexts(stats.top, False), contexts(stats.samples, True)
    density, mean, value_max = _rounded(stats.density), _rounded(stats.mean_active), _rounded(stats.value_max)
    fires, histogram = stats.fire_count.tolist(), stats.histogram.tolist()
    hscale = torch.exp2(stats.histogram_exponent.double()).tolist()
    qscale = qscale.tolist()
    logits = None
    if stats.logits is not None:
        logits = {key: stats.logits[key].tolist() for key in stats.logits}
    records = []
    for i in range(stats.dict_size):
        record = {"i": i, "fires": fires[i], "density": density[i], "mean": mean[i], "max": value_max[i],
                  "hist": histogram[i], "hscale": hscale[i], "qscale": _round(qscale[i]), "top": top[i],
                  "samples": samples[i]}
        if logits is not None:
            record["pos"] = [[t, _round(v)] for t, v in zip(logits["promoted_ids"][i], logits["promoted_values"][i])]
            record["neg"] = [[t, _round(v)] for t, v in zip(logits["suppressed_ids"][i], logits["suppressed_values"][i])]
        records.append(record)
    return records


def summary_html(stats: FeatureStats) -> str:
    """The index page's summary line: what was read, and the alive fraction, L0 and dead count."""
    meta, density = stats.meta, stats.density
    alive = int((stats.fire_count > 0).sum())
    items = [("dictionary", f"{meta.get('dictionary', '?')}, {stats.dict_size:,} latents"),
             ("model", str(meta.get("model"))), ("site", f"{meta.get('site')} ({meta.get('io')}put)"),
             ("tokens", f"{stats.n_tokens:,}"), ("alive", f"{alive:,} ({100 * alive / stats.dict_size:.1f}%)"),
             ("dead", f"{stats.dict_size - alive:,}"), ("L0", f"{float(density.sum()):.2f}"),
             ("density < 1e-5", f"{int(((density > 0) & (density < 1e-5)).sum()):,}"),
             ("density > 0.1", f"{int((density > 0.1).sum()):,}")]
    return "".join(f'<span>{html.escape(name)} <b>{html.escape(value)}</b></span>' for name, value in items)


def density_histogram_svg(density: torch.Tensor, n_tokens: int, bin_width: float = 0.25, width: int = 760,
                          height: int = 210) -> str:
    """An inline SVG histogram of log10 density over the latents that fired, in bins of `bin_width`
    decades, with the dead latents as a separate bar on the left; every bar carries its range."""
    alive = density[density > 0].log10()
    dead = int((density == 0).sum())
    lowest = min(float(alive.min()) if len(alive) else 0.0, 0.0)
    lowest = max(lowest, math.log10(1 / max(n_tokens, 1)))
    start = math.floor(lowest / bin_width) * bin_width
    n_bins = max(1, math.ceil(-start / bin_width))
    counts = torch.histc(alive.float(), bins=n_bins, min=start, max=start + n_bins * bin_width).long().tolist() \
        if len(alive) else [0] * n_bins
    left, right, top, bottom, gap = 44, 10, 10, 34, 26
    plot = width - left - right - gap
    bar = plot / (n_bins + 1)
    peak = max(counts + [dead, 1])
    usable = height - top - bottom

    def y(count: int) -> float:
        return top + usable * (1 - count / peak)

    parts = [f'<svg id="density-svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             'role="img" aria-label="histogram of log10 feature density">']
    parts.append(f'<rect class="bar dead" x="{left + 1:.1f}" y="{y(dead):.1f}" width="{bar - 2:.1f}" '
                 f'height="{height - bottom - y(dead):.1f}" data-count="{dead}"><title>dead: {dead}</title></rect>')
    parts.append(f'<text x="{left + bar / 2:.1f}" y="{height - bottom + 14}" text-anchor="middle">dead</text>')
    x0 = left + bar + gap
    for j, count in enumerate(counts):
        lo, hi = start + j * bin_width, start + (j + 1) * bin_width
        if count:
            parts.append(f'<rect class="bar" x="{x0 + j * bar + 0.5:.1f}" y="{y(count):.1f}" '
                         f'width="{max(bar - 1, 1):.1f}" height="{height - bottom - y(count):.1f}" '
                         f'data-lo="{lo:g}" data-hi="{hi:g}" data-count="{count}">'
                         f'<title>{lo:g} to {hi:g}: {count}</title></rect>')
    parts.append(f'<line class="axis" x1="{x0:.1f}" x2="{x0 + n_bins * bar:.1f}" y1="{height - bottom}" '
                 f'y2="{height - bottom}"/>')
    for decade in range(math.ceil(start), 1):
        x = x0 + (decade - start) / bin_width * bar
        parts.append(f'<line class="axis" x1="{x:.1f}" x2="{x:.1f}" y1="{height - bottom}" y2="{height - bottom + 4}"/>')
        parts.append(f'<text x="{x:.1f}" y="{height - bottom + 16}" text-anchor="middle">{decade}</text>')
    parts.append(f'<text x="{x0 + n_bins * bar / 2:.1f}" y="{height - 3}" text-anchor="middle">'
                 'log10 density</text>')
    parts.append(f'<text x="4" y="{top + 8}">{peak}</text><text x="4" y="{height - bottom}">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def _round(value: float, digits: int = 4) -> float | int:
    """`value` to `digits` significant digits (integers stay integers in the JSON)."""
    if value == 0 or not math.isfinite(value):
        return 0
    rounded = float(f"{value:.{digits}g}")
    return int(rounded) if rounded.is_integer() and abs(rounded) < 2**53 else rounded


def _rounded(values: torch.Tensor) -> list:
    return [_round(v) for v in values.tolist()]


def _json(obj: Any) -> str:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _write_text(path: Path, text: str) -> Path:
    data = text.encode()
    return atomic_write(path, lambda file: file.write(data))
