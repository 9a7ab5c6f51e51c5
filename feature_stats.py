"""What each latent of a dictionary responds to, collected in one streaming pass over a language
model's activations: the numbers behind a feature dashboard (dashboards.py renders them as HTML).

For N counted tokens and the features f_n ∈ R^F of token n, every latent i gets

    fire_count_i   #{n : f_ni ≠ 0}                 density_i = fire_count_i / N
    value_sum_i    Σ_n f_ni                         mean when active = value_sum_i / fire_count_i
    value_max_i    max_n f_ni
    histogram_i    counts of |f_ni| ≠ 0 in n_bins equal bins over [0, 2^e_i), e_i the smallest integer
                   with max_n |f_ni| < 2^e_i (bins merge pairwise whenever a larger value arrives, so the
                   streamed histogram equals the one computed from all values at once)
    top            the top_k tokens of largest f_ni (ties: the earlier token), each with its context
    samples        n_samples tokens drawn uniformly without replacement from those where f_ni ≠ 0
                   (each entry gets a random key; the n_samples largest keys are kept): sorted by
                   value, sample j of S sits near the j/S quantile of the latent's activations

A context is the `context` tokens before and after the token, with their token ids (−1 past the
ends of the text) and the latent's value at each. Everything is computed on the nonzero entries of
each batch's features (O(nonzeros) per batch); the per-latent state is bounded: F·(top_k +
n_samples)·(2·context + 1) context slots, whatever the number of tokens.

`logit_effects` gives each latent's direct effect on the next-token logits: its decoder row through
the model's final norm and unembedding.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from .buffer import ActivationBuffer, token_mask
from .dictionary import Transcoder
from .files import atomic_torch_save
from .kernels import SparseCodes

__all__ = ["FeatureCollector", "FeatureStats", "TopEntries", "collect_features", "feature_batches",
           "sparse_features", "dense_to_codes", "flat_nonzero", "logit_effects", "final_norm"]

FORMAT = "dictionary_learning.feature_stats"
VERSION = 1
# Features are encoded this many entries (contexts × positions × latents) at a time, at least one
# context: small enough that a chunk's nonzeros are taken while it is in the cache.
CHUNK_ENTRIES = 2**21


# =============================================================================================
# Bounded per-latent selections
# =============================================================================================


def descending_rank(keys: torch.Tensor) -> torch.Tensor:
    """float32 keys -> int64 in [0, 2^32) that orders them from largest to smallest (−0.0 just after
    +0.0; no NaN): the IEEE bit pattern read as an integer is monotonic in the value for positive
    floats and reversed for negative ones."""
    bits = keys.float().view(torch.int32).long()
    ordered = torch.where(bits >= 0, bits, -(bits & 0x7FFFFFFF) - 1)  # increasing with the value
    return (2**31 - 1) - ordered


class TopEntries:
    """For each of F latents, the k entries of largest key offered so far (ties: the one offered
    first), each with its value, its global token index and its context window.

    keys [F, k] (−inf in empty slots), values [F, k], tokens [F, k] (−1 in empty slots),
    window_ids [F, k, W] int32, window_values [F, k, W]. Slots are not kept in order (`sorted()`
    gives them largest key first); an entry that is replaced frees its slot for the one that
    replaces it, so an offer writes the windows of the entries it admits and touches no others.
    """

    def __init__(self, dict_size: int, k: int, width: int, device: torch.device | str = "cpu"):
        self.k = k
        self.keys = torch.full((dict_size, k), -math.inf, device=device)
        self.values = torch.zeros(dict_size, k, device=device)
        self.tokens = torch.full((dict_size, k), -1, dtype=torch.long, device=device)
        self.window_ids = torch.full((dict_size, k, width), -1, dtype=torch.int32, device=device)
        self.window_values = torch.zeros(dict_size, k, width, device=device)
        self.threshold = torch.full((dict_size,), -math.inf, device=device)  # the smallest key held

    def offer(self, keys: torch.Tensor, columns: torch.Tensor, describe) -> None:
        """Offer M entries with `keys` and latent `columns` [M], in the order their tokens came
        (earlier first). `describe(entries)` gives, for the admitted entries (indices into the M),
        their (values [m], global token indices [m], window ids [m, W], window values [m, W])."""
        if self.k == 0:
            return
        # an entry must beat the smallest key its latent holds
        entries = (keys > self.threshold.index_select(0, columns)).nonzero().squeeze(1)
        if entries.numel() == 0:
            return
        keys, columns = keys.index_select(0, entries), columns.index_select(0, entries)
        # At most k candidates per latent: group by latent, largest key first, earlier token first on
        # ties (one stable sort of (latent, descending key) packed into an int64).
        order = (columns * 2**32 + descending_rank(keys)).argsort(stable=True)
        entries, keys, columns = (t.index_select(0, order) for t in (entries, keys, columns))
        rank = torch.arange(len(columns), device=columns.device) - torch.searchsorted(columns, columns)
        kept = (rank < self.k).nonzero().squeeze(1)
        entries, keys, columns, rank = (t.index_select(0, kept) for t in (entries, keys, columns, rank))
        latents, group = torch.unique_consecutive(columns, return_inverse=True)  # [U], [c]
        # The k best of each touched latent's held entries and candidates (held ones hold earlier tokens).
        candidate_keys = torch.full((len(latents), self.k), -math.inf, device=keys.device)
        candidate_keys[group, rank] = keys
        held_keys = self.keys[latents]  # [U, k]
        order = self.tokens[latents].argsort(dim=1)  # held entries by token, so that earlier wins ties
        merged = torch.cat([held_keys.gather(1, order), candidate_keys], dim=1)  # [U, 2k]
        best = merged.argsort(dim=1, descending=True, stable=True)[:, : self.k]
        survives = torch.zeros_like(merged, dtype=torch.bool).scatter_(1, best, True)
        evicted = torch.zeros_like(held_keys, dtype=torch.bool).scatter_(1, order, ~survives[:, : self.k])
        admitted = survives[:, self.k:] & (candidate_keys > -math.inf)
        # Pair the evicted slots of each latent with its admitted candidates (as many of each).
        slot_latent, slot = evicted.nonzero(as_tuple=True)  # sorted by latent
        new_latent, new_rank = admitted.nonzero(as_tuple=True)
        position = torch.full((len(latents), self.k), -1, dtype=torch.long, device=keys.device)
        position[group, rank] = torch.arange(len(entries), device=keys.device)
        chosen = position[new_latent, new_rank]  # into the kept candidates
        rows = latents[slot_latent]
        self.keys[rows, slot] = keys[chosen]
        values, tokens, window_ids, window_values = describe(entries[chosen])
        self.values[rows, slot] = values.to(self.values.dtype)
        self.tokens[rows, slot] = tokens
        self.window_ids[rows, slot] = window_ids
        self.window_values[rows, slot] = window_values.to(self.window_values.dtype)
        self.threshold[latents] = self.keys[latents].amin(dim=1)

    def sorted(self) -> dict[str, torch.Tensor]:
        """values, tokens, window_ids, window_values with each latent's slots by key, largest first
        (ties: earlier token first), empty slots last (token −1, value 0)."""
        order = self.tokens.argsort(dim=1)
        order = order.gather(1, self.keys.gather(1, order).argsort(dim=1, descending=True, stable=True))
        empty = self.tokens.gather(1, order) < 0
        expand = order[..., None].expand(-1, -1, self.window_ids.shape[-1])
        return {"values": self.values.gather(1, order).masked_fill(empty, 0), "tokens": self.tokens.gather(1, order),
                "window_ids": self.window_ids.gather(1, expand), "window_values": self.window_values.gather(1, expand)}


# =============================================================================================
# The collector
# =============================================================================================


class FeatureCollector:
    """Streams batches of features and keeps, per latent, the statistics of the module docstring.

        collector = FeatureCollector(dict_size)
        for f, token_ids, keep, real in batches:   # f [B, T, F]; the rest [B, T]
            collector.update(f, token_ids, keep, real)
        stats = collector.result()

    `keep` marks the tokens that count (e.g. not padding, not a removed BOS); `real` marks the
    tokens shown in contexts (the attention mask; defaults to `keep`). Random sample keys come from
    the collector's own generator (`seed`).
    """

    def __init__(self, dict_size: int, top_k: int = 10, n_samples: int = 16, context: int = 10, n_bins: int = 32,
                 seed: int = 0, device: torch.device | str = "cpu"):
        for name, value, low in (("dict_size", dict_size, 1), ("top_k", top_k, 0), ("n_samples", n_samples, 0),
                                 ("context", context, 0), ("n_bins", n_bins, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")
        self.dict_size, self.context, self.n_bins = dict_size, context, n_bins
        self.device = torch.device(device)
        width = 2 * context + 1
        self.n_tokens = 0
        self.value_sum = torch.zeros(dict_size, dtype=torch.float64, device=device)
        self.value_max = torch.full((dict_size,), -math.inf, device=device)
        self.histogram = torch.zeros(dict_size, n_bins, dtype=torch.long, device=device)
        self.exponent = torch.full((dict_size,), -(2**40), dtype=torch.long, device=device)  # scale 2^e
        self.bin_scale = torch.zeros(dict_size, device=device)  # n_bins / 2^e
        self.top = TopEntries(dict_size, top_k, width, device)
        self.samples = TopEntries(dict_size, n_samples, width, device)
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.seed = seed

    @torch.no_grad()
    def update(self, features: torch.Tensor | SparseCodes, token_ids: torch.Tensor, keep: torch.Tensor,
               real: torch.Tensor | None = None) -> "FeatureCollector":
        """Add one batch of B contexts of T positions: their features, as a dense [B, T, F] tensor or
        as SparseCodes whose rows are the B·T positions (row b·T + t; entries in row-major order,
        columns increasing within a row, as `sparse_features` gives them), their token ids and the
        masks `keep` and `real` [B, T]. Only features at `keep` positions count."""
        batch, length = token_ids.shape
        for name, mask in (("keep", keep), ("real", real)):
            if mask is not None and tuple(mask.shape) != (batch, length):
                raise ValueError(f"{name} must be [{batch}, {length}] like token_ids; got {tuple(mask.shape)}.")
        if isinstance(features, torch.Tensor):
            if features.dim() != 3 or tuple(features.shape) != (batch, length, self.dict_size):
                raise ValueError(f"features must be [{batch}, {length}, {self.dict_size}] (token_ids' shape and "
                                 f"dict_size); got {tuple(features.shape)}.")
            features = dense_to_codes(features.reshape(batch * length, self.dict_size))
        elif features.n_rows != batch * length:
            raise ValueError(f"the codes have {features.n_rows} rows; token_ids has {batch} x {length} positions.")
        device = self.device
        keep = keep.to(device=device, dtype=torch.bool)
        real = keep if real is None else real.to(device=device, dtype=torch.bool)
        token_ids = token_ids.to(device)
        values, position, columns = (t.to(device) for t in features[:3])
        if not bool(keep.all()):  # drop the entries of positions that do not count
            counted = keep.reshape(-1).index_select(0, position).nonzero().squeeze(1)
            values, position, columns = (t.index_select(0, counted) for t in (values, position, columns))
        values = values.float()
        n_latents = self.dict_size
        # the global index of each counted token: tokens counted before this batch, then in order
        token_index = self.n_tokens + keep.reshape(-1).cumsum(0) - 1  # [B·T]

        self.value_sum += torch.bincount(columns, weights=values, minlength=n_latents).double()
        signed = bool((values < 0).any())
        batch_max = self._add_to_histograms(columns, values.abs() if signed else values)
        if signed:
            batch_max = torch.full_like(self.value_max, -math.inf).scatter_reduce_(0, columns, values, reduce="amax")
        torch.maximum(self.value_max, batch_max, out=self.value_max)

        offsets = torch.arange(-self.context, self.context + 1, device=device)
        width = len(offsets)
        lookup: dict[str, torch.Tensor] = {}

        def window_values(entries, pos, latent, row, at, inside) -> torch.Tensor:
            """[m, W] the latent's value at each window position of each entry (0 where it is zero
            or not counted). Few entries: a binary search of each position among the batch's
            nonzeros; many: the entry's neighbours in (latent, position) order, where a latent's
            nonzeros within `context` positions of an entry sit at most `context` places away."""
            if len(entries) * width <= len(values):
                if "cells" not in lookup:
                    lookup["cells"] = position * n_latents + columns  # [M] increasing: place in [B·T, F]
                cells = lookup["cells"]
                wanted = (row[:, None] * length + at) * n_latents + latent[:, None]  # [m, W]
                found = torch.searchsorted(cells, wanted).clamp_max(len(cells) - 1)
                hit = inside & (cells[found] == wanted)
                return torch.where(hit, values[found], 0.0)
            if "place" not in lookup:
                order = (columns * (batch * length) + position).argsort()
                lookup.update(position=position[order], column=columns[order], value=values[order],
                              place=torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=device)))
            near = (lookup["place"][entries][:, None] + offsets).clamp(0, len(values) - 1)  # [m, W]
            near_position = lookup["position"][near]
            shift = near_position - pos[:, None]
            hit = (lookup["column"][near] == latent[:, None]) & (near_position // length == row[:, None]) & \
                (shift.abs() <= self.context)
            found = torch.zeros(len(entries), width, device=device)
            slot = torch.arange(len(entries), device=device)[:, None] * width + shift + self.context
            found.view(-1)[slot[hit]] = lookup["value"][near[hit]]
            return found

        def describe(entries: torch.Tensor) -> tuple[torch.Tensor, ...]:
            """Values, token indices, and the token ids and the latent's values at the `context`
            positions either side of each entry."""
            pos, latent = position.index_select(0, entries), columns.index_select(0, entries)
            row, col = pos // length, pos % length
            at = col[:, None] + offsets  # [m, W]
            inside = (at >= 0) & (at < length)
            at = at.clamp(0, length - 1)
            shown = inside & real[row[:, None], at]
            ids = torch.where(shown, token_ids[row[:, None], at], -1).to(torch.int32)
            return (values.index_select(0, entries), token_index.index_select(0, pos), ids,
                    window_values(entries, pos, latent, row, at, inside))

        self.top.offer(values, columns, describe)
        if self.samples.k:
            self.samples.offer(torch.rand(len(values), generator=self.generator, device=device), columns, describe)
        self.n_tokens += int(keep.sum())
        return self

    def _add_to_histograms(self, columns: torch.Tensor, magnitudes: torch.Tensor) -> torch.Tensor:
        """Count |f| into each latent's n_bins bins over [0, 2^e); when a value ≥ 2^e arrives, e
        grows to fit it and old bin j moves to bin j >> (growth), exactly as if binned afresh.
        Returns the batch's largest |f| per latent (−inf where it has none)."""
        batch_max = torch.full((self.dict_size,), -math.inf, device=magnitudes.device).scatter_reduce_(
            0, columns, magnitudes, reduce="amax")
        _, needed = torch.frexp(batch_max)  # batch_max < 2^needed
        needed = torch.where(batch_max > 0, needed.long(), self.exponent)
        grow = (needed - self.exponent).clamp_min(0)
        rows = (grow > 0).nonzero().squeeze(1)
        if len(rows):
            shift = grow[rows].clamp_max(62)[:, None]
            target = torch.arange(self.n_bins, device=rows.device)[None, :] >> shift  # [r, n_bins]
            self.histogram[rows] = torch.zeros_like(self.histogram[rows]).scatter_add_(1, target, self.histogram[rows])
            self.exponent[rows] = needed[rows]
            self.bin_scale[rows] = torch.ldexp(torch.full_like(rows, self.n_bins, dtype=torch.float32), -needed[rows])
        # bin = ⌊|f| · n_bins / 2^e⌋ (one rounding of the exact product, as |f| / 2^e · n_bins)
        bins = (magnitudes * self.bin_scale.index_select(0, columns)).long().clamp_(0, self.n_bins - 1)
        self.histogram += torch.bincount(columns * self.n_bins + bins,
                                         minlength=self.dict_size * self.n_bins).view(self.dict_size, self.n_bins)
        return batch_max

    def result(self, meta: dict[str, Any] | None = None) -> "FeatureStats":
        """The statistics so far, on the CPU."""
        def selection(entries: TopEntries) -> dict[str, torch.Tensor]:
            return {name: tensor.cpu() for name, tensor in entries.sorted().items()}

        fire_count = self.histogram.sum(dim=1)  # every nonzero entry is in one bin
        fired = fire_count > 0
        return FeatureStats(
            n_tokens=self.n_tokens,
            fire_count=fire_count.cpu(),
            value_sum=self.value_sum.cpu(),
            value_max=torch.where(fired, self.value_max, 0.0).cpu(),
            histogram=self.histogram.cpu(),
            histogram_exponent=torch.where(fired, self.exponent, 0).cpu(),
            top=selection(self.top),
            samples=selection(self.samples),
            meta={"context": self.context, "n_bins": self.n_bins, "seed": self.seed, **(meta or {})},
        )


# =============================================================================================
# The result, saved without pickle
# =============================================================================================


@dataclass
class FeatureStats:
    """Per-latent statistics of one pass (see the module docstring); `top` and `samples` hold
    values [F, k], tokens [F, k] (−1: empty slot), window_ids [F, k, W], window_values [F, k, W].
    `logits` (optional): promoted_ids / promoted_values / suppressed_ids / suppressed_values [F, n].
    `vocab`: token id -> its text, for the ids the contexts and logits use."""

    n_tokens: int
    fire_count: torch.Tensor
    value_sum: torch.Tensor
    value_max: torch.Tensor
    histogram: torch.Tensor
    histogram_exponent: torch.Tensor
    top: dict[str, torch.Tensor]
    samples: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] | None = None
    vocab: dict[int, str] = field(default_factory=dict)

    @property
    def dict_size(self) -> int:
        return len(self.fire_count)

    @property
    def density(self) -> torch.Tensor:
        """[F] the fraction of tokens on which each latent fires."""
        return self.fire_count.double() / max(self.n_tokens, 1)

    @property
    def mean_active(self) -> torch.Tensor:
        """[F] the mean of each latent's nonzero values (0 for a latent that never fired)."""
        return self.value_sum / self.fire_count.clamp_min(1)

    def used_token_ids(self) -> torch.Tensor:
        """The sorted distinct token ids the contexts and logit effects show."""
        parts = [self.top["window_ids"].reshape(-1), self.samples["window_ids"].reshape(-1)]
        if self.logits is not None:
            parts += [self.logits["promoted_ids"].reshape(-1), self.logits["suppressed_ids"].reshape(-1)]
        ids = torch.cat([part.long() for part in parts]).unique()
        return ids[ids >= 0]

    def save(self, path) -> None:
        """Write to `path` with torch.save (tensors, numbers, strings only: `load` reads it with
        weights_only=True), atomically."""
        vocab_ids = sorted(self.vocab)
        atomic_torch_save({
            "format": FORMAT, "version": VERSION, "n_tokens": self.n_tokens, "meta": self.meta,
            "tensors": {"fire_count": self.fire_count, "value_sum": self.value_sum, "value_max": self.value_max,
                        "histogram": self.histogram, "histogram_exponent": self.histogram_exponent},
            "top": self.top, "samples": self.samples, "logits": self.logits,
            "vocab_ids": torch.tensor(vocab_ids, dtype=torch.long), "vocab_strings": [self.vocab[i] for i in vocab_ids],
        }, path)

    @classmethod
    def load(cls, path) -> "FeatureStats":
        """Read a file written by `save` (torch.load with weights_only=True: no code runs)."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"could not read {str(path)!r} as feature statistics ({type(error).__name__}: "
                             f"{error}); rebuild it with dictionary_learning.dashboard.") from error
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise ValueError(f"{str(path)!r} is not a feature-statistics file (written by FeatureStats.save).")
        if state.get("version") != VERSION:
            raise ValueError(f"{str(path)!r} has version {state.get('version')}; this library reads {VERSION}.")
        return cls(n_tokens=state["n_tokens"], **state["tensors"], top=state["top"], samples=state["samples"],
                   meta=state["meta"], logits=state["logits"],
                   vocab=dict(zip(state["vocab_ids"].tolist(), state["vocab_strings"])))


# =============================================================================================
# The pass over a model
# =============================================================================================


def flat_nonzero(flat: torch.Tensor) -> torch.Tensor:
    """The positions of the nonzero entries of a 1-D tensor, increasing: `flat.nonzero()[:, 0]`.

    For elements narrower than 8 bytes, the tensor is first read as int64 words of g = 8 / itemsize
    elements: only words with a nonzero bit are kept (a word of zeros holds g zeros), then their
    elements are compared with 0 (so −0.0 still counts as zero). On sparse features this is about
    twice as fast as nonzero() itself, which tests each element."""
    group = 8 // flat.element_size()
    if group < 2 or flat.numel() % group or flat.storage_offset() % group or not flat.is_contiguous():
        return flat.nonzero().squeeze(1)
    words = flat.view(torch.int64)
    held = words.nonzero().squeeze(1)  # words holding a nonzero bit
    inside = (words.index_select(0, held).view(flat.dtype) != 0).nonzero().squeeze(1)  # [g·w] → nonzero
    shift = group.bit_length() - 1  # g is 2, 4 or 8
    return (held.index_select(0, inside >> shift) << shift) + (inside & (group - 1))


def dense_to_codes(features: torch.Tensor) -> SparseCodes:
    """The nonzero entries of features [N, F] as SparseCodes, in row-major order."""
    n_latents = features.shape[-1]
    flat = features.reshape(-1)
    where = flat_nonzero(flat)
    if n_latents & (n_latents - 1) == 0:  # a power of two: shifts instead of divisions
        shift = n_latents.bit_length() - 1
        rows, columns = where >> shift, where & (n_latents - 1)
    else:
        rows = where // n_latents
        columns = where - rows * n_latents
    return SparseCodes(flat.index_select(0, where), rows, columns, features.shape[0])


def sparse_features(dictionary, acts: torch.Tensor, max_chunk_entries: int = CHUNK_ENTRIES) -> SparseCodes:
    """The nonzero features of activations [B, T, D] as SparseCodes over the B·T positions.

    The dictionary encodes a few contexts at a time (at most `max_chunk_entries` feature entries,
    at least one context), and each chunk's nonzeros are taken while it is fresh in the cache, so no
    dense [tokens × latents] matrix larger than a chunk ever exists."""
    batch, length = acts.shape[:2]
    per_chunk = max(1, max_chunk_entries // max(1, length * dictionary.dict_size))
    parts = []
    for start in range(0, batch, per_chunk):
        features = dictionary.encode(acts[start:start + per_chunk])  # [b, T, F]
        codes = dense_to_codes(features.reshape(-1, dictionary.dict_size))
        parts.append(codes._replace(rows=codes.rows + start * length))
    return SparseCodes(torch.cat([p.values for p in parts]), torch.cat([p.rows for p in parts]),
                       torch.cat([p.columns for p in parts]), batch * length)


def feature_batches(dictionary, buffer: ActivationBuffer, n_tokens: int, batch_size: int,
                    max_chunk_entries: int = CHUNK_ENTRIES) -> Iterator[tuple[SparseCodes, torch.Tensor, torch.Tensor,
                                                                        torch.Tensor]]:
    """(codes, token_ids [B, T], keep [B, T], real [B, T]) for the texts of `buffer`'s stream,
    `batch_size` texts per forward pass, until `n_tokens` tokens are counted or the texts run out;
    `codes` are the nonzero features of the B·T positions (`sparse_features`).

    The dictionary reads the buffer's (first) site: its output, or its input for io="in" and
    "in_to_out". Counted tokens (`keep`) are the real ones (attention mask, `real`), without a
    leading BOS when the buffer has remove_bos.
    """
    parameter = next(dictionary.parameters(), None)
    counted = 0
    bos = buffer.tokenizer.bos_token_id if buffer.remove_bos else None
    while counted < n_tokens:
        encoding = buffer.tokenized_batch(batch_size)
        if encoding["input_ids"].numel() == 0:
            return
        real = encoding["attention_mask"].bool()
        keep = token_mask(encoding["input_ids"], encoding["attention_mask"], bos)
        surplus = counted + int(keep.sum()) - n_tokens
        if surplus > 0:  # count exactly n_tokens: drop the last counted positions of this batch
            last = keep.reshape(-1).nonzero().squeeze(1)[-surplus:]
            keep.view(-1)[last] = False
        if not keep.any():
            continue
        acts = buffer.reader(encoding)[0]  # [B, T, D]: the site's output, or its input
        if parameter is not None:
            acts = acts.to(device=parameter.device, dtype=parameter.dtype)
        with torch.no_grad():
            codes = sparse_features(dictionary, acts, max_chunk_entries)
        yield codes, encoding["input_ids"], keep, real
        counted += int(keep.sum())


def reading_buffer(data, model, site, io: str, ctx_len: int, batch_size: int, remove_bos: bool,
                   tokenizer=None) -> ActivationBuffer:
    """`data` itself when it is an ActivationBuffer; else an ActivationBuffer over the texts `data`
    used only for its tokenization and its one-pass reading of `site` (it stores two contexts)."""
    if isinstance(data, ActivationBuffer):
        return data
    if model is None or site is None:
        raise ValueError("pass model= and site= (the module the dictionary was trained on), or pass an "
                         "ActivationBuffer as data.")
    return ActivationBuffer(data, model, site, io=io, n_ctxs=2, ctx_len=ctx_len, refresh_batch_size=batch_size,
                            out_batch_size=1, remove_bos=remove_bos, tokenizer=tokenizer, seed=0)


def collect_features(dictionary, data, model=None, site=None, n_tokens: int = 1_000_000, *, io: str | None = None,
                     ctx_len: int = 128, batch_size: int = 32, remove_bos: bool = False, tokenizer=None,
                     top_k: int = 10, n_samples: int = 16, context: int = 10, n_bins: int = 32, seed: int = 0,
                     progress: bool = True) -> FeatureStats:
    """One streaming pass: the FeatureStats of `dictionary` over `n_tokens` tokens of `data`.

    data: an iterator of strings (then `model` and `site` say where to read: an nnsight model or a
        torch model with `tokenizer=`, and a module, envoy or dotted path), or an ActivationBuffer
        (its text stream, model, site, ctx_len and remove_bos are used; its stored rows are not).
    io: what the dictionary reads at the site: "out", or "in" (default: "in" for a transcoder).
    The other arguments: see FeatureCollector.
    """
    if isinstance(n_tokens, bool) or not isinstance(n_tokens, int) or n_tokens < 1:
        raise ValueError(f"n_tokens must be a positive int; got {n_tokens!r}.")
    io = io or ("in" if isinstance(dictionary, Transcoder) else "out")
    buffer = reading_buffer(data, model, site, io, ctx_len, batch_size, remove_bos, tokenizer)
    width = buffer.reader.widths[0]
    if getattr(dictionary, "activation_dim", width) != width:
        raise ValueError(f"the dictionary reads {dictionary.activation_dim}-dim activations but the site gives "
                         f"{width}; pass the site (and io) the dictionary was trained on.")
    parameter = next(dictionary.parameters(), None)
    collector = FeatureCollector(dictionary.dict_size, top_k=top_k, n_samples=n_samples, context=context,
                                 n_bins=n_bins, seed=seed, device=parameter.device if parameter is not None else "cpu")
    from tqdm.auto import tqdm

    with tqdm(total=n_tokens, desc="feature statistics", unit="tok", disable=not progress) as bar:
        for features, token_ids, keep, real in feature_batches(dictionary, buffer, n_tokens, buffer.refresh_batch_size):
            before = collector.n_tokens
            collector.update(features, token_ids, keep, real)
            bar.update(collector.n_tokens - before)
    if collector.n_tokens == 0:
        raise ValueError("data gave no tokens; pass a non-empty text stream.")
    site_config = buffer.config
    meta = {"dictionary": type(dictionary).__name__, "dict_size": dictionary.dict_size,
            "model": site_config.get("model"), "site": site_config.get("submodule") or site_config.get("submodules"),
            "io": io, "ctx_len": buffer.ctx_len, "remove_bos": buffer.remove_bos}
    return collector.result(meta)


# =============================================================================================
# Logit effects
# =============================================================================================


def final_norm(module: torch.nn.Module, probe_id: int = 0):
    """(the final norm module, the output embedding) of a causal LM: the norm is the module whose
    output the unembedding reads, found by hooks during a one-token forward pass (None when the
    unembedding reads something else, e.g. a model without a final norm)."""
    unembedding = module.get_output_embeddings() if hasattr(module, "get_output_embeddings") else None
    if unembedding is None or getattr(unembedding, "weight", None) is None:
        raise ValueError(f"{type(module).__name__} has no output embedding (get_output_embeddings()); logit "
                         "effects need a causal language model.")
    seen: dict[str, torch.Tensor] = {}
    read: list[torch.Tensor] = []
    handles = [unembedding.register_forward_pre_hook(lambda _m, args: read.append(args[0]))]
    for name, sub in module.named_modules():
        if "norm" in type(sub).__name__.lower():
            handles.append(sub.register_forward_hook(lambda _m, _a, out, name=name: seen.__setitem__(name, out)))
    try:
        parameter = next(module.parameters())
        ids = torch.tensor([[probe_id]], device=parameter.device)
        with torch.inference_mode():
            module(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        for handle in handles:
            handle.remove()
    if not read:
        raise ValueError(f"the forward pass of {type(module).__name__} never called its output embedding.")
    for name, out in reversed(list(seen.items())):
        if isinstance(out, torch.Tensor) and out.shape == read[0].shape and torch.equal(out, read[0]):
            return module.get_submodule(name), unembedding
    return None, unembedding


@torch.no_grad()
def logit_effects(dictionary, model, n: int = 10, probe_id: int | None = None,
                  chunk: int = 1024) -> dict[str, torch.Tensor] | None:
    """Each latent's direct effect on the logits: ℓ_i = W_U (norm(d_i) − norm(0)) for its decoder row
    d_i = W_dec[i], with `norm` the model's final norm (the identity when it has none): for LayerNorm
    that is W_U (γ ⊙ (d_i − mean(d_i)) / σ(d_i)), for RMSNorm W_U (γ ⊙ d_i / rms(d_i)); the output bias
    is left out. Returns promoted_ids / promoted_values (the n largest ℓ_i) and suppressed_ids /
    suppressed_values (the n smallest), each [F, n]; None when the decoder's width is not the
    unembedding's (a site outside the residual stream's width).

    `model`: an nnsight model or a torch causal LM. `probe_id`: the token of the one-token pass that
    finds the final norm (default: the tokenizer's BOS or EOS, else 0).
    """
    module = getattr(model, "_module", model)  # nnsight keeps the torch module there
    if probe_id is None:
        tokenizer = getattr(model, "tokenizer", None)
        probe_id = next((i for i in (getattr(tokenizer, "bos_token_id", None),
                                     getattr(tokenizer, "eos_token_id", None)) if i is not None), 0)
    norm, unembedding = final_norm(module, probe_id)
    W_U = unembedding.weight  # [V, D]
    W_dec = getattr(dictionary, "W_dec", None)
    if W_dec is None or W_dec.shape[-1] != W_U.shape[-1]:
        return None
    n = min(n, W_U.shape[0])
    out = {key: [] for key in ("promoted_ids", "promoted_values", "suppressed_ids", "suppressed_values")}
    zero = torch.zeros(1, W_U.shape[-1], device=W_U.device, dtype=W_U.dtype)
    for start in range(0, W_dec.shape[0], chunk):
        directions = W_dec[start:start + chunk].to(device=W_U.device, dtype=W_U.dtype)
        if norm is not None:
            directions = norm(directions) - norm(zero)
        logits = (directions @ W_U.T).float()  # [c, V]
        top, bottom = logits.topk(n, dim=1), logits.topk(n, dim=1, largest=False)
        out["promoted_ids"].append(top.indices.cpu())
        out["promoted_values"].append(top.values.cpu())
        out["suppressed_ids"].append(bottom.indices.cpu())
        out["suppressed_values"].append(bottom.values.cpu())
    return {key: torch.cat(value) for key, value in out.items()}
