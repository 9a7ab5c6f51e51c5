"""Tiny offline language models for tests: a BPE tokenizer trained here and a random GPT-NeoX.

Nothing touches the network. The tokenizer mimics Pythia's: one special token
`<|endoftext|>` that is BOS, EOS and pad at once, and no BOS added by default. Everything is
cached per process, so every test file shares one tokenizer (training it takes ~0.1 s).

Import from a test file with `from lm_fixtures import ...` (tests/conftest.py registers the module).
"""
from __future__ import annotations

import functools
import random
import warnings

import torch

ENDOFTEXT = "<|endoftext|>"

_SUBJECTS = ["the cat", "a dog", "my friend", "the old man", "her sister", "the robot",
             "a small bird", "the teacher", "our neighbour", "the king"]
_VERBS = ["sees", "likes", "builds", "paints", "finds", "carries", "follows", "writes about",
          "remembers", "sells"]
_OBJECTS = ["a red house", "the river", "seven apples", "a long letter", "the blue car",
            "an old song", "the garden", "three books", "a wooden boat", "the mountain"]
_TAILS = ["in the morning.", "after dinner.", "every day.", "near the station.", "with great care.",
          "before the rain.", "on sunday.", "for no reason.", "at night.", "again and again."]


def sentences(n: int = 400, seed: int = 0) -> list[str]:
    """`n` short, deterministic English-like sentences."""
    rng = random.Random(seed)
    return [
        f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} {rng.choice(_TAILS)}"
        for _ in range(n)
    ]


def documents(n: int, seed: int = 1, min_sentences: int = 1, max_sentences: int = 6) -> list[str]:
    """`n` documents of a random number of sentences (so their token counts differ)."""
    rng = random.Random(seed)
    pool = sentences(400, seed=seed)
    return [" ".join(rng.choices(pool, k=rng.randint(min_sentences, max_sentences))) for _ in range(n)]


@functools.lru_cache(maxsize=None)
def tiny_tokenizer(vocab_size: int = 300):
    """A byte-level BPE tokenizer trained on `sentences()`, wrapped like Pythia's (bos=eos=pad)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(sentences(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=ENDOFTEXT,
        eos_token=ENDOFTEXT,
        pad_token=ENDOFTEXT,
        unk_token=ENDOFTEXT,
    )


def fresh_tokenizer():
    """A copy of the cached tokenizer, safe to mutate (nnsight sets `padding_side` on it)."""
    import copy

    return copy.deepcopy(tiny_tokenizer())


def tiny_gpt_neox(hidden: int = 32, layers: int = 2, seed: int = 0, max_positions: int = 256,
                  init_std: float = 0.02):
    """A randomly initialised `GPTNeoXForCausalLM` sized for the tiny tokenizer, in eval mode.
    A larger `init_std` makes every layer matter more to the logits."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    tokenizer = tiny_tokenizer()
    config = GPTNeoXConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=init_std,
    )
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(config).eval()


def tiny_language_model(hidden: int = 32, layers: int = 2, seed: int = 0, deprecated_alias: bool = True):
    """The tiny GPT-NeoX wrapped in nnsight (`LanguageModel`, or `TransformersModel` if asked)."""
    from nnsight import LanguageModel, TransformersModel

    module = tiny_gpt_neox(hidden=hidden, layers=layers, seed=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # LanguageModel is a deprecated alias
        cls = LanguageModel if deprecated_alias else TransformersModel
        return cls(module, tokenizer=fresh_tokenizer())


def tiny_gpt2(hidden: int = 32, layers: int = 2, seed: int = 0, max_positions: int = 256):
    """A randomly initialised `GPT2LMHeadModel` (absolute positions: left padding must be undone)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = tiny_tokenizer()
    config = GPT2Config(
        vocab_size=len(tokenizer), n_embd=hidden, n_layer=layers, n_head=4, n_positions=max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def wrap(module, deprecated_alias: bool = True):
    """`module` in nnsight's `LanguageModel` (or `TransformersModel`) with a fresh tiny tokenizer."""
    from nnsight import LanguageModel, TransformersModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        cls = LanguageModel if deprecated_alias else TransformersModel
        return cls(module, tokenizer=fresh_tokenizer())


def unique_start_documents(n: int, seed: int = 2) -> list[str]:
    """Up to 36 documents whose first tokens all differ (capital letters and digits never occur in
    the tokenizer's training text, so each is a token of its own). A causal model then gives every
    (document, position) a distinct activation, so a row identifies where it came from."""
    starts = [chr(c) for c in range(ord("A"), ord("Z") + 1)] + [str(d) for d in range(10)]
    if n > len(starts):
        raise ValueError(f"at most {len(starts)} documents")
    return [f"{start} {doc}" for start, doc in zip(starts, documents(n, seed=seed))]


def reference_activations(hf_model, tokenizer, texts, module_name: str, io: str = "out",
                          max_length: int | None = None) -> list[torch.Tensor]:
    """Per text, the activations at `module_name` from a plain HF forward of that text alone
    (no padding, no nnsight): [n_tokens_i, d] each, taken with a torch forward hook."""
    module = hf_model.get_submodule(module_name)
    captured = []

    def hook(_module, args, output):
        value = args[0] if io == "in" else output
        captured.append(value[0] if isinstance(value, tuple) else value)

    handle = module.register_forward_hook(hook)
    try:
        out = []
        with torch.no_grad():
            for text in texts:
                ids = tokenizer(text, return_tensors="pt", truncation=max_length is not None,
                                max_length=max_length)["input_ids"]
                captured.clear()
                hf_model(input_ids=ids)
                out.append(captured[0][0].detach().clone())
        return out
    finally:
        handle.remove()


def match_rows(rows: torch.Tensor, reference: torch.Tensor, tol: float = 1e-4) -> torch.Tensor:
    """For each row, the smallest index of a reference row within `tol` (max abs difference);
    asserts every row has one. Equal reference rows share an id, so comparing the id counts of
    two sets compares them as multisets."""
    rows = rows.float()
    reference = reference.float()
    ids = torch.empty(len(rows), dtype=torch.long)
    for start in range(0, len(rows), 512):
        chunk = rows[start : start + 512]
        dist = (chunk[:, None, :] - reference[None, :, :]).abs().amax(-1)  # [chunk, n_ref]
        close = dist < tol
        assert close.any(1).all(), f"rows without a reference match (min dist {dist.min(1).values.max():.2e})"
        ids[start : start + 512] = close.int().argmax(1)
    return ids


def for_recipe(trainer_class, batches: list[torch.Tensor]) -> list:
    """`batches` [N, D] as `trainer_class` trains on them: a transcoder recipe learns (x, y) pairs,
    here y = ReLU(x) P for a fixed random P [D, D] (a module's input and output)."""
    from dictionary_learning.trainers.families import TranscoderFamilyConfig

    if not issubclass(trainer_class.Config, TranscoderFamilyConfig):
        return batches
    width = batches[0].shape[-1]
    mixing = torch.randn(width, width, generator=torch.Generator().manual_seed(99)) / width**0.5
    return [(x, x.relu() @ mixing) for x in batches]
