"""The bundled offline default: a tiny Pythia-style causal LM and the text it was trained on.

Nothing here touches the network. The model in `BUNDLED_MODEL_DIR` is a 4-layer GPT-NeoX (the
Pythia architecture, so `model.gpt_neox.layers[i].mlp` works as it does for Pythia) with its own
4096-token byte-level BPE, trained by `scripts/train_bundled_model.py` on the source files of the Python
standard library, which exist on every machine that runs Python. `stdlib_text_stream` yields that
same text, split the same way, as the default data stream for `ActivationBuffer`.

    from dictionary_learning.bundled import load_bundled_model, stdlib_text_stream
    model = load_bundled_model()                      # nnsight TransformersModel, CPU
    data = stdlib_text_stream(split="train", repeat=True)
    batch = model.tokenizer([next(data), next(data)], return_tensors="pt", padding=True, truncation=True)
    with model.trace(batch):                          # truncation: the 256-token context
        mlp_out = model.gpt_neox.layers[1].mlp.output.save()  # [2, 256, 128]
"""
from __future__ import annotations

import functools
import random
import sysconfig
from collections.abc import Iterator
from pathlib import Path

BUNDLED_MODEL_DIR = Path(__file__).parent / "assets" / "tiny-pythia"

HELDOUT_EVERY = 20  # file i (in sorted order) is held out iff i % HELDOUT_EVERY == 0
# Test suites, installed packages, and `encodings` (mostly generated charmap tables: ~15% of the
# tokens, trivially predictable, and no use for learning or probing code features).
EXCLUDED_FOLDERS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "encodings"})
SPLITS = ("train", "heldout")


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_source_files(split: str = "train") -> list[Path]:
    """The stdlib `*.py` files of one split, in sorted order.

    All `*.py` files under `stdlib_root()`, except those inside a folder named in
    `EXCLUDED_FOLDERS` (test suites, installed packages, codec tables), sorted by relative path;
    file i goes to "heldout" when i % HELDOUT_EVERY == 0 and to "train" otherwise.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}; pass split='train' or 'heldout'.")
    root = stdlib_root()
    relative_paths = _sorted_sources(root)
    if not relative_paths:
        raise FileNotFoundError(
            f"found no *.py files under the standard library folder {str(root)!r}; this Python "
            "installation ships without sources. Pass your own text iterator to ActivationBuffer."
        )
    keep_heldout = split == "heldout"
    return [
        root / rel for i, rel in enumerate(relative_paths) if (i % HELDOUT_EVERY == 0) == keep_heldout
    ]


@functools.lru_cache(maxsize=4)
def _sorted_sources(root: Path) -> tuple[Path, ...]:
    """The relative paths of the `*.py` files under `root` outside EXCLUDED_FOLDERS, sorted (the
    walk is cached: the standard library does not change while a process runs)."""
    return tuple(sorted(
        path.relative_to(root)
        for path in root.rglob("*.py")
        if not EXCLUDED_FOLDERS.intersection(path.relative_to(root).parts[:-1])
    ))


def read_source(path: Path) -> str:
    """A source file's text, decoded as UTF-8 (undecodable bytes become U+FFFD)."""
    return path.read_bytes().decode("utf-8", errors="replace")


def line_aligned_chunks(text: str, chunk_chars: int) -> Iterator[str]:
    """Consecutive pieces of `text`, each at most `chunk_chars` long, cut after a newline when
    the window has one; whitespace-only pieces are skipped."""
    start = 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            last_newline = text.rfind("\n", start, end)
            if last_newline > start:
                end = last_newline + 1
        chunk = text[start:end]
        if chunk.strip():
            yield chunk
        start = end


def stdlib_text_stream(
    split: str = "train",
    chunk_chars: int = 1024,
    repeat: bool = False,
    shuffle_seed: int | None = 0,
) -> Iterator[str]:
    """Deterministic stream of text chunks from the stdlib sources of one split.

    Each file is cut into line-aligned chunks of at most `chunk_chars` characters (1024 chars is
    about 280 tokens of the bundled tokenizer, so a chunk fills a 256-token context). Files come in
    an order shuffled by `shuffle_seed` (a fresh permutation each pass; `None` keeps sorted order),
    so consecutive chunks are not all from one package. `repeat=False` stops after one pass;
    `repeat=True` cycles forever. The same arguments give the same chunks on every call.
    """
    if isinstance(chunk_chars, bool) or not isinstance(chunk_chars, int) or chunk_chars < 1:
        raise ValueError(f"chunk_chars must be a positive int (characters per chunk), got {chunk_chars!r}.")
    files = stdlib_source_files(split)  # validates `split` now, not at the first next()
    return _stream_chunks(files, chunk_chars, repeat, shuffle_seed)


def _stream_chunks(
    files: list[Path], chunk_chars: int, repeat: bool, shuffle_seed: int | None
) -> Iterator[str]:
    epoch = 0
    while True:
        order = list(files)
        if shuffle_seed is not None:
            random.Random(shuffle_seed * 1_000_003 + epoch).shuffle(order)
        for path in order:
            yield from line_aligned_chunks(read_source(path), chunk_chars)
        if not repeat:
            return
        epoch += 1


def load_bundled_model(device: str = "cpu", dtype=None):
    """The bundled tiny Pythia as an `nnsight.TransformersModel` (text-generation), offline.

    The HF model and its tokenizer are loaded from `BUNDLED_MODEL_DIR` first and handed to nnsight,
    so nnsight never resolves a repo id. The tokenizer left-pads (nnsight's convention for
    decoders). `dtype` defaults to the stored float32.
    """
    import torch
    from nnsight import TransformersModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not (BUNDLED_MODEL_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"the bundled model is missing from {str(BUNDLED_MODEL_DIR)!r}. Rebuild it with "
            "`python scripts/train_bundled_model.py --out "
            f"{BUNDLED_MODEL_DIR}` (about 20 minutes on 2 CPU cores)."
        )
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL_DIR, local_files_only=True)
    tokenizer.padding_side = "left"
    hf_model = AutoModelForCausalLM.from_pretrained(
        BUNDLED_MODEL_DIR, local_files_only=True, dtype=dtype or torch.float32
    )
    hf_model.to(device).eval()
    return TransformersModel(hf_model, tokenizer=tokenizer, task="text-generation")
