"""End to end: activations of a language model's MLP -> a trained sparse autoencoder -> its metrics.

    python -m dictionary_learning.demo                 # bundled tiny Pythia, offline, ~2-3 min on CPU
    python -m dictionary_learning.demo --model EleutherAI/pythia-70m-deduped --layer 1 \\
        --dataset monology/pile-uncopyrighted --device cuda:0 --steps 20000 --dict-size 32768 --l1 0.04

Steps: load the model (nnsight), stream text through an `ActivationBuffer` on
`--submodule` (default `gpt_neox.layers.{layer}.mlp`, output), train a standard L1 SAE with
`trainSAE`, evaluate it with `evaluate` on text the training never saw, print the reference
README's table row, and write `ae.pt`, `config.json` (trainer, buffer and training settings,
plus this command's arguments and the metrics) and `eval.json` into `--out`.

With `--dashboard-tokens N` (default 50,000; 0 skips it) it also writes a feature dashboard of the
dictionary into `--out`/dashboard (`dashboard`: open dashboard/index.html in a browser), read on
held-out text.

`--dataset` is "stdlib" (the bundled model's own text: Python standard library sources; training
uses the train split and evaluation the held-out split), a `.jsonl.zst` file (e.g. a Pile
shard), or a Hugging Face dataset name (streamed).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from .buffer import ActivationBuffer
from .dashboards import dashboard
from .evaluation import evaluate
from .training import trainSAE
from .files import atomic_write_json
from .utils import hf_dataset_to_generator, keep_freed_cpu_memory, zst_to_generator

BUNDLED = "bundled"
STDLIB = "stdlib"
TABLE_COLUMNS = ["variance explained", "L1", "L0", "% alive", "CE diff", "% CE recovered"]
TABLE_HEADER = ["Layer", "Variance Explained (%)", "L1", "L0", "% Alive", "CE Diff", "% CE Recovered"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dictionary_learning.demo",
        description="Train and evaluate a sparse autoencoder on one MLP of a language model.",
    )
    parser.add_argument("--model", default=BUNDLED,
                        help="'bundled' (offline tiny Pythia) or a Hugging Face repo id / local folder")
    parser.add_argument("--dataset", default=None,
                        help="'stdlib', a .jsonl.zst file, or a Hugging Face dataset name "
                             "(default: 'stdlib' for the bundled model, else monology/pile-uncopyrighted)")
    parser.add_argument("--text-field", default="text", help="record field holding the text")
    parser.add_argument("--layer", type=int, default=0,
                        help="layer index filled into --submodule (default 0: the bundled model's layer-0 "
                             "MLP carries ~3 nats of its loss, its later MLPs < 0.15, so layer 0 is where "
                             "'%% CE recovered' says the most)")
    parser.add_argument("--submodule", default="gpt_neox.layers.{layer}.mlp",
                        help="dotted path of the module to read ({layer} is replaced by --layer)")
    parser.add_argument("--io", choices=["out", "in"], default="out", help="read the submodule's output or input")
    parser.add_argument("--dict-size", type=int, default=None, help="dictionary size (default 8 × activation dim)")
    parser.add_argument("--steps", type=int, default=1500, help="training steps (batches)")
    parser.add_argument("--batch-size", type=int, default=1024, help="activations per training batch")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--l1", type=float, default=3.0,
                        help="L1 sparsity penalty λ (default tuned for the bundled model's layer-0 MLP; "
                             "it scales with the activations' norm, so retune it for other models/layers)")
    parser.add_argument("--warmup-steps", type=int, default=100, help="linear learning-rate warmup")
    parser.add_argument("--n-ctxs", type=float, default=96, help="contexts held by the activation buffer")
    parser.add_argument("--ctx-len", type=int, default=128, help="tokens per context")
    parser.add_argument("--refresh-batch-size", type=int, default=32, help="texts per forward pass")
    parser.add_argument("--eval-batches", type=int, default=8, help="batches pooled by the evaluation")
    parser.add_argument("--eval-texts", type=int, default=16, help="texts per evaluation batch (CE metrics)")
    parser.add_argument("--dashboard-tokens", type=int, default=50_000,
                        help="tokens read for the feature dashboard written to OUT/dashboard (0: none)")
    parser.add_argument("--device", default="cuda:0" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default 1 on CPU: the matrices are small, and one thread "
                             "is fastest when the cores are shared)")
    parser.add_argument("--out", default="demo_out", help="folder for ae.pt, config.json and eval.json")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    for name in ["steps", "batch_size", "warmup_steps", "ctx_len", "refresh_batch_size", "eval_batches",
                 "eval_texts"]:
        if getattr(args, name) < (0 if name == "warmup_steps" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if args.dashboard_tokens < 0:
        parser.error(f"--dashboard-tokens must be >= 0, got {args.dashboard_tokens}")
    if args.dict_size is not None and args.dict_size < 1:
        parser.error(f"--dict-size must be positive, got {args.dict_size}")
    if args.dataset is None:
        args.dataset = STDLIB if args.model == BUNDLED else "monology/pile-uncopyrighted"
    return args


def load_model(name: str, device: str):
    """The bundled model, or a Hugging Face causal LM by repo id / folder, as an nnsight model."""
    if name == BUNDLED:
        from .bundled import load_bundled_model

        return load_bundled_model(device=device)
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    hf_model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32).to(device).eval()
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")


def text_stream(dataset: str, text_field: str, split: str):
    """Strings for the buffer: `split` is "train" or "heldout" (only the stdlib stream has one)."""
    if dataset == STDLIB:
        from .bundled import stdlib_text_stream

        return stdlib_text_stream(split=split, repeat=split == "train")
    if dataset.endswith(".zst"):
        return zst_to_generator(dataset, text_field=text_field)
    return hf_dataset_to_generator(dataset, split="train", streaming=True, text_field=text_field)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["| " + " | ".join(cell.ljust(w) for cell, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    start = time.perf_counter()
    on_cpu = torch.device(args.device).type == "cpu"
    threads = args.threads or (1 if on_cpu else None)
    if threads is not None:
        torch.set_num_threads(threads)
    if on_cpu:
        keep_freed_cpu_memory()  # a training process: reuse freed memory (utils.keep_freed_cpu_memory)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    submodule = args.submodule.format(layer=args.layer)

    print(f"loading {args.model} on {args.device} ...", file=sys.stderr)
    model = load_model(args.model, args.device)
    buffer = ActivationBuffer(
        text_stream(args.dataset, args.text_field, "train"), model, submodule, io=args.io,
        n_ctxs=args.n_ctxs, ctx_len=args.ctx_len, refresh_batch_size=args.refresh_batch_size,
        out_batch_size=args.batch_size, device=args.device, seed=args.seed,
    )
    dict_size = args.dict_size or 8 * buffer.d_submodule
    ae = trainSAE(
        buffer, buffer.d_submodule, dict_size, lr=args.lr, sparsity_penalty=args.l1, steps=args.steps,
        warmup_steps=args.warmup_steps, device=args.device, save_dir=out, seed=args.seed,
        log_steps=max(1, args.steps // 20), progress=not args.no_progress,
    )
    trained_at = time.perf_counter()

    heldout = STDLIB == args.dataset
    eval_buffer = buffer
    if heldout:  # evaluate on files the training never read
        eval_buffer = ActivationBuffer(
            text_stream(args.dataset, args.text_field, "heldout"), model, submodule, io=args.io,
            n_ctxs=max(2, args.eval_batches * args.batch_size * 2 // args.ctx_len), ctx_len=args.ctx_len,
            refresh_batch_size=args.refresh_batch_size, out_batch_size=args.batch_size, device=args.device,
            seed=args.seed,
        )
    metrics = evaluate(ae, eval_buffer, n_batches=args.eval_batches, max_len=args.ctx_len,
                       batch_size=args.eval_texts, device=args.device)
    metrics = {k: float(v) for k, v in metrics.items()}
    evaluated_at = time.perf_counter()
    if args.dashboard_tokens:
        dashboard(ae, text_stream(args.dataset, args.text_field, "heldout" if heldout else "train"), model, submodule,
                  out / "dashboard", n_tokens=args.dashboard_tokens, io=args.io, ctx_len=args.ctx_len,
                  batch_size=args.refresh_batch_size, progress=not args.no_progress)
    elapsed = time.perf_counter() - start

    config = json.loads((out / "config.json").read_text())
    config["demo"] = {**vars(args), "submodule": submodule, "dict_size": dict_size}
    config["eval"] = metrics
    atomic_write_json(config, out / "config.json")
    atomic_write_json({**metrics, "eval_text": "heldout split" if heldout else "fresh texts of the stream",
                       "seconds_total": elapsed, "seconds_load_and_train": trained_at - start,
                       "seconds_dashboard": elapsed - (evaluated_at - start)}, out / "eval.json")

    row = [str(args.layer)] + [f"{metrics[key]:.4g}" if key in metrics else "n/a" for key in TABLE_COLUMNS]
    print(f"\n{args.model} {submodule} ({args.io}put), dictionary {buffer.d_submodule} -> {dict_size}, "
          f"{args.steps} steps of {args.batch_size} activations; MSE {metrics['MSE']:.4g}, "
          f"KL {metrics.get('kl_reconstructed', float('nan')):.4g} nats/token")
    print(table([TABLE_HEADER, row]))
    written = f"{out / 'ae.pt'}, {out / 'config.json'}, {out / 'eval.json'}"
    if args.dashboard_tokens:
        written += f", {out / 'dashboard' / 'index.html'}"
    print(f"saved {written} in {elapsed:.0f} s")
    return metrics


if __name__ == "__main__":
    main()
