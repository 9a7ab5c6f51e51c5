"""Train the bundled tiny Pythia (GPT-NeoX) on the Python standard library's own sources.

    python scripts/train_bundled_model.py --out assets/tiny-pythia
    python scripts/train_bundled_model.py --steps 20 --out /tmp/tiny-smoke      # smoke run

1. Corpus: the stdlib `*.py` files of `bundled.stdlib_source_files("train")` (held-out split: every
   20th file in sorted order), each followed by the end-of-text token.
2. Tokenizer: byte-level BPE trained here with `tokenizers` on the train split only; special
   tokens `<|endoftext|>` (BOS = EOS) and `<|padding|>` (PAD), as in Pythia.
3. Model: `GPTNeoXForCausalLM` (parallel residual, partial rotary, untied unembedding), fp32.
4. Training: next-token cross-entropy on random windows of `context_length + 1` tokens from the
   concatenated train stream; AdamW, linear warmup then cosine decay to `min_lr_ratio * lr`,
   gradient clipping at 1.
5. Evaluation: mean CE (nats/token) on evenly spaced held-out windows, next to the unigram
   entropy H = -sum_v p(v) ln p(v) of the train-split token counts, and the held-out CE of that
   unigram model (add-one smoothed): a model that learned structure sits far below both.
6. Output: a standard HF folder (config, model.safetensors, tokenizer, training_info.json),
   written into a temp folder next to `--out` and renamed into place.

Defaults take about 15 minutes on 2 idle CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

# On shared CPUs, idle OpenMP threads must sleep rather than spin: spinning made a 2-thread run
# several times slower when other jobs held the cores. Read when torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

if "dictionary_learning" not in sys.modules:  # run as a script: this folder is on sys.path
    from _checkout import import_checkout

    import_checkout()
from dictionary_learning.bundled import (BUNDLED_MODEL_DIR, EXCLUDED_FOLDERS, HELDOUT_EVERY,  # noqa: E402
                                         read_source, stdlib_root, stdlib_source_files)

EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|padding|>"


@dataclass
class TinyPythiaConfig:
    vocab_size: int = 4096
    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    context_length: int = 256
    steps: int = 800
    batch_size: int = 8
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    weight_decay: float = 0.1
    eval_windows: int = 256
    seed: int = 0
    num_threads: int = 2

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "context_length",
                     "steps", "batch_size", "eval_windows", "num_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}.")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
                "pick sizes with hidden_size % num_heads == 0."
            )
        if self.vocab_size < 258:
            raise ValueError(
                f"vocab_size={self.vocab_size} is below the 256 byte symbols + 2 special tokens."
            )


def train_tokenizer(texts: list[str], cfg: TinyPythiaConfig):
    """Byte-level BPE with `vocab_size` entries, wrapped as a left-padding fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer, length=len(texts))
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        model_max_length=cfg.context_length,
    )


def tokenize_split(tokenizer, texts: list[str]) -> torch.Tensor:
    """All texts as one stream of token ids, each text followed by EOS. Shape [n_tokens].

    Encoded by a copy of the fast tokenizer's backend without truncation or padding: a call such as
    `tokenizer(texts, truncation=True)` leaves truncation switched on in the backend itself."""
    backend = copy.deepcopy(tokenizer.backend_tokenizer)
    backend.no_truncation()
    backend.no_padding()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    return torch.tensor([t for enc in encodings for t in (*enc.ids, eos)], dtype=torch.long)


def unigram_stats(train_ids: torch.Tensor, heldout_ids: torch.Tensor, vocab_size: int) -> dict:
    """Unigram entropy of the train counts and the held-out CE of the add-one-smoothed unigram."""
    counts = torch.bincount(train_ids, minlength=vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    smoothed = (counts + 1) / (counts.sum() + vocab_size)
    heldout_ce = -smoothed.log()[heldout_ids].mean().item()
    return {"unigram_entropy_nats": entropy, "heldout_unigram_ce_nats": heldout_ce}


def build_model(cfg: TinyPythiaConfig, tokenizer):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    model_config = GPTNeoXConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        intermediate_size=4 * cfg.hidden_size,
        max_position_embeddings=cfg.context_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_parallel_residual=True,
        tie_word_embeddings=False,
    )
    return GPTNeoXForCausalLM(model_config)


def lr_at(step: int, cfg: TinyPythiaConfig) -> float:
    """Linear warmup to `lr`, then cosine decay to `min_lr_ratio * lr` at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * cosine)


def next_token_ce(model, windows: torch.Tensor) -> torch.Tensor:
    """Mean next-token CE (nats) of windows [batch, context_length + 1]."""
    logits = model(input_ids=windows[:, :-1]).logits  # [batch, context_length, vocab]
    return F.cross_entropy(logits.flatten(0, 1), windows[:, 1:].flatten())


@torch.no_grad()
def heldout_ce(model, heldout_ids: torch.Tensor, cfg: TinyPythiaConfig) -> float:
    """Mean CE over up to `eval_windows` evenly spaced, non-overlapping held-out windows."""
    span = cfg.context_length + 1
    n_windows = min(cfg.eval_windows, len(heldout_ids) // span)
    if n_windows == 0:
        raise ValueError(
            f"the held-out split has {len(heldout_ids)} tokens, fewer than one window of {span}."
        )
    starts = torch.linspace(0, len(heldout_ids) - span, n_windows).long()
    model.eval()
    total = 0.0
    for i in range(0, n_windows, 16):
        windows = torch.stack([heldout_ids[s : s + span] for s in starts[i : i + 16]])
        total += next_token_ce(model, windows).item() * len(windows)
    return total / n_windows


def train(cfg: TinyPythiaConfig, out: Path) -> dict:
    torch.set_num_threads(cfg.num_threads)
    torch.manual_seed(cfg.seed)
    t0 = time.time()

    train_files, heldout_files = stdlib_source_files("train"), stdlib_source_files("heldout")
    train_texts = [read_source(p) for p in train_files]
    heldout_texts = [read_source(p) for p in heldout_files]
    tokenizer = train_tokenizer(train_texts, cfg)
    train_ids, heldout_ids = tokenize_split(tokenizer, train_texts), tokenize_split(tokenizer, heldout_texts)

    model = build_model(cfg, tokenizer)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(0.9, 0.95),
    )
    generator = torch.Generator().manual_seed(cfg.seed)
    span = cfg.context_length + 1
    offsets = torch.arange(span)

    model.train()
    recent_losses: list[float] = []
    bar = tqdm(range(cfg.steps), desc="tiny-pythia", unit="step")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg)
        starts = torch.randint(0, len(train_ids) - span + 1, (cfg.batch_size,), generator=generator)
        windows = train_ids[starts[:, None] + offsets]  # [batch, context_length + 1]
        loss = next_token_ce(model, windows)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent_losses = (recent_losses + [loss.item()])[-50:]
        if step % 10 == 0 or step == cfg.steps - 1:
            bar.set_postfix(loss=f"{sum(recent_losses) / len(recent_losses):.3f}")

    ce = heldout_ce(model, heldout_ids, cfg)
    info = {
        "corpus": (
            "Python standard library sources (*.py under sysconfig stdlib, excluding folders "
            f"{sorted(EXCLUDED_FOLDERS)}), sorted; "
            f"file i held out iff i % {HELDOUT_EVERY} == 0"
        ),
        "python_version": platform.python_version(),
        "stdlib_root": str(stdlib_root()),
        "train_files": len(train_files),
        "heldout_files": len(heldout_files),
        "train_chars": sum(map(len, train_texts)),
        "train_tokens": len(train_ids),
        "heldout_tokens": len(heldout_ids),
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.context_length,
        "param_count": sum(p.numel() for p in model.parameters()),
        "stored_dtype": "float32",
        "heldout_ce_nats": ce,
        "final_train_loss_nats": sum(recent_losses) / len(recent_losses),
        **unigram_stats(train_ids, heldout_ids, len(tokenizer)),
        "train_config": asdict(cfg),
        "versions": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "tokenizers": __import__("tokenizers").__version__,
        },
        "wall_time_s": round(time.time() - t0, 1),
    }
    save_folder_atomically(model, tokenizer, info, out)
    return info


def save_folder_atomically(model, tokenizer, info: dict, out: Path) -> None:
    """Write the HF folder into `.<name>.tmp-<pid>` beside `out`, then rename it to `out`."""
    out = Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; the folder ships inside the package
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def parse_args(argv=None) -> tuple[TinyPythiaConfig, Path]:
    defaults = TinyPythiaConfig()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=BUNDLED_MODEL_DIR,
                        help="output folder (replaced atomically)")
    for name, value in asdict(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = vars(parser.parse_args(argv))
    out = args.pop("out")
    return TinyPythiaConfig(**args), out


def main(argv=None) -> None:
    cfg, out = parse_args(argv)
    info = train(cfg, out)
    summary = {k: info[k] for k in ("param_count", "tokens_seen", "heldout_ce_nats",
                                    "unigram_entropy_nats", "heldout_unigram_ce_nats", "wall_time_s")}
    print(f"wrote {out}: {json.dumps(summary)}")


if __name__ == "__main__":
    main()
