"""Evaluate dictionaries: tensor metrics of the reconstruction and the features, and
language-model metrics (the model's loss with the reconstruction spliced in).

Tensor metrics (`MetricAccumulator`, `tensor_metrics`) pool their running sums over any number of
batches, so the result over many batches is the result over their concatenation (no averaging of
per-batch ratios). With N tokens x_n ∈ R^D, reconstructions x̂_n and features f_n ∈ R^F:

    mse                           (1/N) Σ_n ‖x_n − x̂_n‖² / D    (mean squared error per element)
    l2_loss                       (1/N) Σ_n ‖x_n − x̂_n‖₂
    l1                            (1/N) Σ_n ‖f_n‖₁
    l0                            (1/N) Σ_n #{i : f_ni ≠ 0}
    frac_alive                    #{i : f_ni ≠ 0 for some n} / F
    frac_variance_explained       1 − Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖²,  x̄ = (1/N) Σ_n x_n
    cossim                        mean over tokens with x_n ≠ 0 of <x_n, x̂_n> / (‖x_n‖ ‖x̂_n‖)
    l2_ratio                      mean over tokens with x_n ≠ 0 of ‖x̂_n‖ / ‖x_n‖
    relative_reconstruction_bias  γ = Σ_n ‖x̂_n‖² / Σ_n <x̂_n, x_n>
    tokens                        N

γ is the relative reconstruction bias of the Gated SAE paper (Rajamanoharan et al. 2024, in its
corrected form): γ = argmin_γ' E‖x̂/γ' − x‖² = E‖x̂‖² / E<x̂, x>, expectations pooled over tokens.
γ < 1 means the dictionary shrinks its reconstructions (L1 shrinkage); γ = 1 means no such bias.

For a transcoder the batches are pairs (x, y) of a module's input and output, and every metric
above compares y with ŷ = transcoder(x): FVU = 1 − frac_variance_explained is the share of the
output's variance it misses.
"""
from __future__ import annotations

import itertools
import math
import warnings
import os
from pathlib import Path
from typing import Any, Iterable

import torch

from .normalization import batch_scale

# =============================================================================================
# Tensor metrics
# =============================================================================================

# frac_alive counts a latent as alive if it fired once; over fewer tokens than this, latents that
# fire rarely look dead.
MIN_TOKENS_FOR_FRAC_ALIVE = 8192


class MetricAccumulator:
    """Running float64 sums of the tensor metrics over batches; `compute()` gives the pooled values
    (definitions in the module docstring).

        acc = MetricAccumulator(dict_size)
        for x, x_hat, f in ...:       # x, x_hat [..., D], f [..., F]; leading dims are tokens
            acc.update(x, x_hat, f)
        metrics = acc.compute()

    The variance about the pooled mean is combined batch by batch (Chan et al.'s parallel update:
    each batch's sum of squares about its own mean plus a between-batch term), which equals
    Σ‖x‖² − N‖x̄‖² without its cancellation when activations have a large mean.
    """

    # Running float64 sums, kept as one vector on the batches' device (no sync per batch).
    SUM_NAMES = (
        "squared_error",  # Σ ‖x − x̂‖²
        "error_norm",  # Σ ‖x − x̂‖
        "l1",  # Σ ‖f‖₁
        "l0",  # Σ #{i : f_i ≠ 0}
        "cossim",  # Σ cos(x, x̂) over tokens with x ≠ 0
        "l2_ratio",  # Σ ‖x̂‖ / ‖x‖ over tokens with x ≠ 0
        "nonzero_tokens",  # #{n : x_n ≠ 0}
        "x_hat_squared",  # Σ ‖x̂‖²
        "x_hat_dot_x",  # Σ <x̂, x>
        "squared_deviation",  # Σ ‖x − x̄‖² about the running mean x̄
    )

    def __init__(self, dict_size: int | None = None):
        self.dict_size = dict_size  # F; None: taken from the first batch
        self.tokens = 0  # N
        self.sums: torch.Tensor | None = None  # [len(SUM_NAMES)] float64
        self.x_mean: torch.Tensor | None = None  # [D] float64, mean of the tokens seen
        self.fired: torch.Tensor | None = None  # [F] bool, latents that were ever nonzero

    @torch.no_grad()
    def update(self, x: torch.Tensor, x_hat: torch.Tensor, f: torch.Tensor) -> "MetricAccumulator":
        """Add a batch: activations x and reconstructions x_hat [..., D], features f [..., F].

        Leading dimensions ([B], [B, L], ...) are flattened to tokens. Returns self, so
        `MetricAccumulator().update(x, x_hat, f).compute()` gives the metrics of one batch.
        """
        for name, t in (("x", x), ("x_hat", x_hat), ("f", f)):
            if not isinstance(t, torch.Tensor) or t.ndim == 0:
                got = type(t).__name__ if not isinstance(t, torch.Tensor) else "a 0-d tensor"
                raise TypeError(
                    f"MetricAccumulator.update: {name} must be a tensor [..., dim], got {got}."
                )
        if x_hat.shape != x.shape:
            raise ValueError(
                f"MetricAccumulator.update: x_hat {tuple(x_hat.shape)} must have the shape of x "
                f"{tuple(x.shape)}."
            )
        if f.shape[:-1] != x.shape[:-1]:
            raise ValueError(
                f"MetricAccumulator.update: f {tuple(f.shape)} must have the token dims of x "
                f"{tuple(x.shape)} (all but the last): one feature vector per token."
            )
        if self.dict_size is None:
            self.dict_size = f.shape[-1]
        elif f.shape[-1] != self.dict_size:
            raise ValueError(
                f"MetricAccumulator.update: f has {f.shape[-1]} latents but dict_size is "
                f"{self.dict_size}; use one accumulator per dictionary."
            )
        if self.x_mean is not None and x.shape[-1] != self.x_mean.numel():
            raise ValueError(
                f"MetricAccumulator.update: x has dim {x.shape[-1]} but earlier batches had "
                f"{self.x_mean.numel()}."
            )
        dim = x.shape[-1]
        dtype = torch.promote_types(torch.promote_types(x.dtype, x_hat.dtype), torch.float32)
        x = x.reshape(-1, dim).to(dtype)  # [N, D]
        x_hat = x_hat.reshape(-1, dim).to(device=x.device, dtype=dtype)  # [N, D]
        f = f.reshape(-1, self.dict_size).to(x.device)  # [N, F]
        n = x.shape[0]
        if n == 0:
            return self

        f64 = torch.float64
        error_sq = (x - x_hat).pow(2).sum(-1)  # [N]
        x_norm, x_hat_norm = x.norm(dim=-1), x_hat.norm(dim=-1)  # [N]
        dot = (x * x_hat).sum(-1)  # [N]
        nonzero = x_norm > 0  # [N]
        cos = dot / (x_norm * x_hat_norm).clamp_min(torch.finfo(dtype).tiny)  # 0 where x̂ = 0
        ratio = x_hat_norm / torch.where(nonzero, x_norm, 1)  # [N]
        active = f != 0  # [N, F]

        # Chan et al.: M2 = M2_a + M2_b + ‖mean_b − mean_a‖² n_a n_b / (n_a + n_b). The batch's
        # M2 is taken about its mean rounded to x's dtype, c, and corrected exactly in float64:
        # Σ‖x − mean_b‖² = Σ‖x − c‖² − n ‖mean_b − c‖².
        batch_mean = x.sum(0, dtype=f64) / n  # [D]
        center = batch_mean.to(dtype)
        center_error = (batch_mean - center.to(f64)).pow(2).sum()
        batch_m2 = (x - center).pow(2).sum(dtype=f64) - n * center_error
        if self.x_mean is None:
            between, self.x_mean = batch_m2.new_zeros(()), batch_mean
        else:
            delta = batch_mean - self.x_mean.to(x.device)  # [D]
            total = self.tokens + n
            between = delta.pow(2).sum() * (self.tokens * n / total)
            self.x_mean = self.x_mean.to(x.device) + delta * (n / total)

        batch_sums = torch.stack([
            error_sq.sum(dtype=f64),
            error_sq.sqrt().sum(dtype=f64),
            f.abs().sum(dtype=f64),
            active.sum(dtype=f64),
            (cos * nonzero).sum(dtype=f64),
            (ratio * nonzero).sum(dtype=f64),
            nonzero.sum(dtype=f64),
            x_hat_norm.pow(2).sum(dtype=f64),
            dot.sum(dtype=f64),
            batch_m2 + between,
        ])
        self.sums = batch_sums if self.sums is None else self.sums.to(x.device) + batch_sums
        fired = active.any(dim=0)  # [F]
        self.fired = fired if self.fired is None else self.fired.to(x.device) | fired
        self.tokens += n
        return self

    def compute(self) -> dict[str, float]:
        """The pooled metrics (see the module docstring). Ratios with a zero denominator are nan.

        Warns if fewer than MIN_TOKENS_FOR_FRAC_ALIVE (8192) tokens were seen: frac_alive is then
        an underestimate.
        """
        if self.tokens == 0:
            raise ValueError(
                "MetricAccumulator.compute: no tokens were accumulated; call update(x, x_hat, f) "
                "with at least one non-empty batch first."
            )
        _warn_if_few_tokens(self.tokens, stacklevel=3)
        s = dict(zip(self.SUM_NAMES, self.sums.tolist()))
        n, dim = self.tokens, self.x_mean.numel()
        return {
            "mse": s["squared_error"] / (n * dim),
            "l2_loss": s["error_norm"] / n,
            "l1": s["l1"] / n,
            "l0": s["l0"] / n,
            "frac_alive": self.fired.float().mean().item(),
            "frac_variance_explained": 1 - _ratio(s["squared_error"], s["squared_deviation"]),
            "cossim": _ratio(s["cossim"], s["nonzero_tokens"]),
            "l2_ratio": _ratio(s["l2_ratio"], s["nonzero_tokens"]),
            "relative_reconstruction_bias": _ratio(s["x_hat_squared"], s["x_hat_dot_x"]),
            "tokens": n,
        }


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator != 0 else math.nan


def _warn_if_few_tokens(tokens: int, stacklevel: int) -> None:
    if tokens < MIN_TOKENS_FOR_FRAC_ALIVE:
        warnings.warn(
            f"frac_alive was measured over only {tokens} tokens (< {MIN_TOKENS_FOR_FRAC_ALIVE}): "
            "latents that fire more rarely than that look dead. Evaluate on more tokens for a "
            "reliable count.",
            stacklevel=stacklevel,
        )


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> float:
    """The fraction of variance unexplained, Σ_n ‖x_n − x̂_n‖² / Σ_n ‖x_n − x̄‖² over the tokens of
    x, x̂ [..., D] (x̄ their mean), in float64: 1 − frac_variance_explained of one batch."""
    x = x.reshape(-1, x.shape[-1]).double()
    x_hat = x_hat.reshape(-1, x.shape[-1]).to(x)
    return ((x - x_hat).pow(2).sum() / (x - x.mean(0)).pow(2).sum()).item()


def tensor_metrics(
    dictionary, batches: Iterable[torch.Tensor], n_batches: int | None = None
) -> dict[str, float]:
    """Pooled tensor metrics of `dictionary` over activation batches [B, D] or [B, L, D].

    dictionary: anything with encode(x) -> f and decode(f) -> x̂ (a `Dictionary`); x is moved to
        the device and dtype of its first parameter, if it has one. Runs under torch.no_grad.
    batches: an iterable of activation tensors (a list, a DataLoader of tensors, an
        ActivationBuffer, a SyntheticActivations stream...). [B, L, D] is flattened to B·L tokens.
    n_batches: use at most this many batches (required in effect for endless streams); None
        exhausts `batches`.
    Errors are measured against x as given (before any dtype cast), in at least float32.
    """
    if n_batches is not None and (not isinstance(n_batches, int) or n_batches < 1):
        raise ValueError(f"n_batches must be a positive int or None, got {n_batches!r}.")
    param = next(iter(dictionary.parameters()), None) if hasattr(dictionary, "parameters") else None
    activation_dim = getattr(dictionary, "activation_dim", None)
    accumulator = MetricAccumulator(getattr(dictionary, "dict_size", None))
    with torch.no_grad():
        for x in itertools.islice(batches, n_batches):
            if not isinstance(x, torch.Tensor):
                raise TypeError(
                    "tensor_metrics: each batch must be a tensor of activations [B, D] or "
                    f"[B, L, D], got {type(x).__name__}."
                )
            if activation_dim is not None and x.shape[-1] != activation_dim:
                raise ValueError(
                    f"tensor_metrics: batch of shape {tuple(x.shape)} has last dim {x.shape[-1]}, "
                    f"but the dictionary expects activation_dim={activation_dim}."
                )
            x = x.reshape(-1, x.shape[-1])  # [B, L, D] -> [B*L, D]
            x_in = x if param is None else x.to(device=param.device, dtype=param.dtype)
            f = dictionary.encode(x_in)
            x_hat = dictionary.decode(f)
            accumulator.update(x.to(x_hat.device), x_hat, f)
    if accumulator.tokens == 0:
        raise ValueError(
            "tensor_metrics: `batches` yielded no activations; pass at least one batch."
        )
    _warn_if_few_tokens(accumulator.tokens, stacklevel=3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # warned above, at the caller of tensor_metrics
        return accumulator.compute()


# =============================================================================================
# Language-model metrics
# =============================================================================================

# Splice the dictionary into the model and measure next-token loss:
#
#   CE_clean   next-token cross-entropy of the unmodified model
#   CE_rec     same, with the submodule's activation x replaced by the reconstruction x̂
#   CE_zero    same, with x replaced by 0 (the "nothing recovered" baseline)
#   frac_recovered = (CE_zero − CE_rec) / (CE_zero − CE_clean)
#   KL_rec     KL(p_clean ‖ p_rec) of the next-token distributions, per target
#
# Averages run over next-token targets whose input and target positions are both real tokens
# (attention mask), so padding never counts and a real EOS target does. The three variants run
# as one forward pass on the batch stacked three times, spliced at the submodule in one trace.


def _encode_text(model, text, max_len: int | None) -> dict[str, torch.Tensor]:
    """`text` (a string, a list of strings, token ids [B, T] / [T], or an encoding with
    `input_ids`) -> {"input_ids", "attention_mask"} [B, T] on the CPU, truncated to `max_len`."""
    if isinstance(text, str):
        text = [text]
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        if not text:
            raise ValueError("text is an empty list; pass at least one string.")
        enc = model.tokenizer(list(text), return_tensors="pt", padding=True,
                              truncation=max_len is not None, max_length=max_len)
        ids, mask = enc["input_ids"], enc["attention_mask"]
    elif isinstance(text, torch.Tensor) and not text.is_floating_point():
        ids = text[None] if text.dim() == 1 else text
        mask = torch.ones_like(ids)
    elif hasattr(text, "keys") and "input_ids" in text:
        ids = torch.as_tensor(text["input_ids"])
        ids = ids[None] if ids.dim() == 1 else ids
        mask = torch.as_tensor(text["attention_mask"]).reshape(ids.shape) if "attention_mask" in text \
            else torch.ones_like(ids)
    else:
        raise TypeError(
            f"text must be a string, a list of strings, token ids (an integer tensor) or an encoding "
            f"with 'input_ids'; got {type(text).__name__}."
        )
    if max_len is not None and ids.shape[1] > max_len:  # pre-tokenized input wider than max_len
        if not bool(mask[:, 0].all()):
            raise ValueError(f"the token ids are left-padded and longer than max_len={max_len}; "
                             "truncate them before padding, or pass the texts as strings.")
        ids, mask = ids[:, :max_len], mask[:, :max_len]
    return {"input_ids": ids.cpu(), "attention_mask": mask.cpu().long()}


def check_dictionary_width(dictionary, x: torch.Tensor, what: str) -> None:
    """ValueError when the activations x [..., D] are not as wide as the dictionary's inputs."""
    expected = getattr(dictionary, "activation_dim", None)
    if expected is not None and x.shape[-1] != expected:
        raise ValueError(f"{what} are {x.shape[-1]}-dimensional but the {type(dictionary).__name__} takes "
                         f"{expected}-dimensional inputs: evaluate it on the site it was trained on")


def check_finite(x: torch.Tensor, what: str) -> None:
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"{what} contain NaN or inf; metrics on them would be meaningless (check the model's dtype "
                         "for float16 overflow, or the dictionary's weights)")


def _reconstruct(dictionary, acts: torch.Tensor, real: torch.Tensor, normalize_batch: bool) -> torch.Tensor:
    """x̂ for acts [B, T, D] in acts' dtype/device. With `normalize_batch`, x is scaled to mean norm
    √D over the real tokens (mask `real` [B, T]) before the dictionary and x̂ scaled back."""
    check_dictionary_width(dictionary, acts, "the submodule's activations")
    parameter = next(dictionary.parameters(), None)
    x = acts if parameter is None else acts.to(parameter.device, parameter.dtype)
    scale = batch_scale(x, real).to(x.dtype) if normalize_batch else 1.0
    x_hat = _apply(dictionary, x * scale)
    return (x_hat / scale).to(acts.device, acts.dtype)


def _apply(dictionary, x: torch.Tensor) -> torch.Tensor:
    """x̂ = decode(encode(x)); a transcoder's ŷ with its skip term."""
    return dictionary(x) if getattr(dictionary, "is_transcoder", False) else dictionary.decode(dictionary.encode(x))


def _spliced_loss_sums(model, submodule, dictionary, encoding, io: str, normalize_batch: bool,
                       tracer_args: dict | None = None) -> dict[str, float]:
    """Summed next-token losses (clean / reconstructed / zero-ablated) and KLs over one batch,
    plus the number of targets `n_tokens`: one forward pass of the batch stacked three times
    (`tracer_args`: keyword arguments of that pass, e.g. {"use_cache": False})."""
    ids, mask = encoding["input_ids"], encoding["attention_mask"]  # [B, T]
    n_rows = len(ids)
    stacked = {"input_ids": ids.repeat(3, 1), "attention_mask": mask.repeat(3, 1)}
    real = mask.bool()
    with torch.inference_mode():
        with model.trace(stacked, **(tracer_args or {})):
            if io == "in_to_out":  # the transcoder's ŷ(input) replaces the output
                source = submodule.input
                source = source[0] if isinstance(source, tuple) else source  # [3B, T, D_in]
            value = submodule.input if io == "in" else submodule.output
            acts = value[0] if isinstance(value, tuple) else value  # [3B, T, D]
            x = acts[:n_rows]
            source = source if io == "in_to_out" else acts
            spliced = torch.cat([x, _reconstruct(dictionary, source[n_rows : 2 * n_rows], real, normalize_batch),
                                 torch.zeros_like(x)])
            if io == "in":
                submodule.input = spliced
            else:
                submodule.output = (spliced, *value[1:]) if isinstance(value, tuple) else spliced
            output = model.output
            logits = (output.logits if hasattr(output, "logits") else output[0]).save()  # [3B, T, V]
    targets = ids[:, 1:].to(logits.device)  # [B, T-1]
    valid = (mask[:, :-1].bool() & mask[:, 1:].bool()).to(logits.device)  # [B, T-1]
    logp_clean, logp_rec, logp_zero = (part[:, :-1].float().log_softmax(-1) for part in logits.chunk(3))
    p_clean = logp_clean.exp()

    def nll_sum(logp):
        return -logp.gather(-1, targets[..., None]).squeeze(-1)[valid].sum().item()

    def kl_sum(logp):
        return (p_clean * (logp_clean - logp)).sum(-1)[valid].sum().item()

    return {
        "ce_clean": nll_sum(logp_clean),
        "ce_reconstructed": nll_sum(logp_rec),
        "ce_zero": nll_sum(logp_zero),
        "kl_reconstructed": kl_sum(logp_rec),
        "kl_zero": kl_sum(logp_zero),
        "n_tokens": int(valid.sum().item()),
    }


def _loss_means(sums: dict[str, float]) -> dict[str, float]:
    n = sums["n_tokens"]
    if n == 0:
        raise ValueError("no next-token targets: every text needs at least two real tokens.")
    out = {key: value / n for key, value in sums.items() if key != "n_tokens"}
    out["ce_diff"] = out["ce_reconstructed"] - out["ce_clean"]
    gap = out["ce_zero"] - out["ce_clean"]
    out["frac_recovered"] = (out["ce_zero"] - out["ce_reconstructed"]) / gap if gap != 0 else float("nan")
    out["n_tokens"] = n
    return out


def loss_recovered(
    text,
    model,
    submodule,
    dictionary,
    max_len: int | None = None,
    normalize_batch: bool = False,
    io: str = "out",
    tracer_args: dict[str, Any] | None = None,
) -> dict[str, float]:
    """How much of the model's next-token loss survives replacing `submodule`'s activation with
    the dictionary's reconstruction.

    Args:
        text: a string, a list of strings, token ids ([B, T] or [T]) or an encoding.
        model: an nnsight TransformersModel / LanguageModel of a causal LM.
        submodule: where to splice: an envoy of `model`, its torch module, or a dotted path.
        dictionary: a `Dictionary`; the splice is decode(encode(x)), x [B, T, D].
        max_len: truncate texts to this many tokens.
        normalize_batch: scale activations to mean norm √D before the dictionary (and back after),
            for dictionaries trained on normalised activations.
        io: "out" splices the submodule's output (first element of a tuple), "in" its first input,
            "in_to_out" (the reference's "in_and_out") replaces the output by a transcoder's ŷ of the input.
        tracer_args: keyword arguments of the model's forward pass (the reference's, e.g.
            {"use_cache": False}); None: none.

    Returns:
        {"ce_clean", "ce_reconstructed", "ce_zero", "ce_diff", "frac_recovered",
         "kl_reconstructed", "kl_zero", "n_tokens"} (n_tokens: next-token targets counted): mean per-target CE (nats) and KL, with
        ce_diff = CE_rec − CE_clean and frac_recovered = (CE_zero − CE_rec) / (CE_zero − CE_clean).
    """
    from .buffer import check_language_model, resolve_submodule

    io = _io(io)
    if io not in ("in", "out", "in_to_out"):
        raise ValueError(f"io must be 'in', 'out' or 'in_to_out'; got {io!r}.")
    model = check_language_model(model)
    submodule = resolve_submodule(model, submodule)
    encoding = _encode_text(model, text, max_len)
    return _loss_means(_spliced_loss_sums(model, submodule, dictionary, encoding, io, normalize_batch, tracer_args))


def _io(io: str | None) -> str | None:
    """`io` under our name: the reference's "in_and_out" is "in_to_out"."""
    return "in_to_out" if io == "in_and_out" else io


# the reference library's names of evaluate's keys: its name -> ours
REFERENCE_KEYS = {"l1_loss": "l1", "loss_original": "ce_clean", "loss_reconstructed": "ce_reconstructed",
                  "loss_zero": "ce_zero"}


def evaluate(
    dictionary,
    activations,
    max_len: int = 128,
    batch_size: int = 32,
    io: str | None = None,
    normalize_batch: bool = False,
    tracer_args: dict[str, Any] | None = None,
    device: str | torch.device | None = None,
    n_batches: int = 1,
    *,
    site: str | None = None,
) -> dict[str, float]:
    """Every metric of `dictionary` on `n_batches` batches, pooled over all of them. The arguments
    are the reference library's, in its order.

    `activations` is an `ActivationBuffer` (tensor metrics on its batches, plus, with an nnsight
    model, the language-model metrics of `loss_recovered` on `batch_size` fresh texts of its stream
    per batch, truncated to `max_len` tokens and spliced at the buffer's submodule), or any iterator
    of [B, D] tensors or (x, y) pairs (tensor metrics only). `io` defaults to the buffer's. With a
    multi-site buffer, `site` names the site the dictionary was trained on. With `normalize_batch`,
    each batch is scaled to mean norm √D before the dictionary (as in training with normalised
    activations). `tracer_args`: keyword arguments of the model's forward pass (see loss_recovered).

    Returns the accumulator's snake_case metrics, the `loss_recovered` keys, the reference's names
    of them (`REFERENCE_KEYS`: "l1_loss", "loss_original", "loss_reconstructed", "loss_zero"), and
    the reference README's column names: "MSE", "L1", "L0", "% alive" (percent), "variance
    explained" (percent), "CE diff" and "% CE recovered" (percent).
    """
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ValueError(f"n_batches must be a positive int; got {n_batches!r}.")
    io = _io(io)
    is_buffer = all(hasattr(activations, name) for name in ("model", "submodule", "text_batch"))
    splice_at = None
    if is_buffer:
        if io is not None and io != activations.io:
            raise ValueError(
                f"io={io!r} but the buffer collects {activations.io!r} activations; the dictionary "
                "must be spliced where its inputs come from: pass io=None."
            )
        io = activations.io
        sites = getattr(activations, "sites", {})
        if site is None and len(sites) > 1:
            raise ValueError(f"the buffer reads several sites {list(sites)}: pass site= (the one the dictionary "
                             "was trained on)")
        if site is not None and site not in sites:
            raise ValueError(f"site={site!r} is not read by the buffer; it reads {list(sites)}")
        if getattr(getattr(activations, "reader", None), "backend", "nnsight") == "nnsight":
            path = sites[site].path if site is not None else None
            splice_at = activations.submodule if path is None else (activations.model.get(path) if path else
                                                                    activations.model)
    if isinstance(activations, torch.Tensor):
        activations = iter([activations])
    parameter = next(dictionary.parameters(), None)
    if device is None:
        device = parameter.device if parameter is not None else "cpu"

    metrics = MetricAccumulator(getattr(dictionary, "dict_size", None))
    lm_sums: dict[str, float] = {}
    batches = 0
    with torch.no_grad():
        for batch in itertools.islice(activations, n_batches):
            if isinstance(batch, dict):
                batch = batch[site if site is not None else next(iter(batch))]
            x, target = batch if isinstance(batch, (tuple, list)) else (batch, batch)
            x = x.reshape(-1, x.shape[-1]).to(device)  # [N, D_in]
            target = target.reshape(-1, target.shape[-1]).to(device)  # [N, D_out]
            if normalize_batch:
                scale = batch_scale(x).to(x.dtype)
                x, target = x * scale, target * scale
            check_dictionary_width(dictionary, x, f"activations of batch {batches}")
            check_finite(x, f"activations of batch {batches}")
            x = x if parameter is None else x.to(parameter.dtype)
            f = dictionary.encode(x)
            check_finite(f, f"the dictionary's features on batch {batches}")
            x_hat = dictionary.decode(f)
            if getattr(dictionary, "is_transcoder", False):
                x_hat = x_hat + dictionary.skip_term(x)
            metrics.update(target, x_hat, f)
            batches += 1
            if splice_at is not None:
                texts = activations.text_batch(batch_size)
                if texts:
                    encoding = _encode_text(activations.model, texts, max_len)
                    sums = _spliced_loss_sums(activations.model, splice_at, dictionary, encoding, io, normalize_batch,
                                              tracer_args)
                    lm_sums = {k: lm_sums.get(k, 0) + v for k, v in sums.items()}
    if batches == 0:
        raise ValueError("activations yielded no batch to evaluate on.")
    out = dict(metrics.compute())
    if lm_sums.get("n_tokens"):
        out.update(_loss_means(lm_sums))
    out["n_batches"] = batches
    out.update({
        "MSE": out["mse"],
        "L1": out["l1"],
        "L0": out["l0"],
        "% alive": 100 * out["frac_alive"],
        "variance explained": 100 * out["frac_variance_explained"],
    })
    if "ce_diff" in out:
        out["CE diff"] = out["ce_diff"]
        out["% CE recovered"] = 100 * out["frac_recovered"]
    out.update({theirs: out[ours] for theirs, ours in REFERENCE_KEYS.items() if ours in out})
    return out


def evaluate_sweep(
    folder: str | os.PathLike,
    activations,
    n_batches: int = 1,
    max_len: int = 128,
    batch_size: int = 32,
    normalize_batch: bool = False,
) -> list[dict[str, Any]]:
    """One row per dictionary folder under `folder` (a trainSAE save_dir, or a tree of them): its
    site and recipe, and its L0, FVU, % dead, and (with an nnsight buffer) CE/KL recovered.

    Every dictionary is scored on the same `n_batches` batches of `activations` (an ActivationBuffer,
    with several sites or one; each dictionary reads the site its folder's config names, else the site
    named by its submodule path) and, for the
    language-model metrics, on the same `batch_size` texts spliced at its folder's submodule.
    """
    from .interop import get_nested_folders, load_dictionary

    folders = get_nested_folders(folder)
    if not folders:
        raise ValueError(f"no dictionary folders (ae.pt + config.json) under {str(folder)!r}")
    batches = list(itertools.islice(activations, n_batches))
    if not batches:
        raise ValueError("activations yielded no batch to evaluate on.")
    backend = getattr(getattr(activations, "reader", None), "backend", None)
    texts = activations.text_batch(batch_size) if backend == "nnsight" else []
    rows = []
    for path in folders:
        dictionary, config = load_dictionary(path)
        trainer, buffer = config.get("trainer", {}), config.get("buffer") or {}
        site = trainer.get("site")
        if site is None and isinstance(batches[0], dict) and buffer.get("submodule") in batches[0]:
            site = buffer["submodule"]  # a one-site run's folder, evaluated with a buffer of several sites
        stream = [batch[site if site is not None else next(iter(batch))] if isinstance(batch, dict) else batch
                  for batch in batches]
        metrics = evaluate(dictionary, stream, n_batches=len(stream), normalize_batch=normalize_batch)
        row = {"folder": str(Path(path).relative_to(folder)) if Path(path) != Path(folder) else ".",
               "site": site or buffer.get("submodule"), "trainer": trainer.get("trainer_class"),
               "dict_size": dictionary.dict_size, "l0": metrics["l0"], "fvu": 1 - metrics["frac_variance_explained"],
               "dead_pct": 100 * (1 - metrics["frac_alive"])}
        submodule = buffer.get("submodule")
        if texts and isinstance(submodule, str):
            lm = loss_recovered(texts, activations.model, submodule, dictionary, max_len=max_len,
                                normalize_batch=normalize_batch, io=buffer.get("io", "out"))
            row.update(ce_recovered=lm["frac_recovered"], ce_diff=lm["ce_diff"], kl=lm["kl_reconstructed"])
        rows.append(row)
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    """`rows` (e.g. evaluate_sweep's) as a Markdown table, numbers to 4 significant digits."""
    if not rows:
        return ""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def cell(value):
        return f"{value:.4g}" if isinstance(value, float) else ("" if value is None else str(value))

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(column)) for column in columns) + " |" for row in rows]
    return "\n".join(lines)
