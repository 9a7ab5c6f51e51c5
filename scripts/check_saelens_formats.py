"""Check the SAELens import and export against the SAELens library itself.

Run with a Python that has `sae_lens` installed (it is not a dependency of this library), e.g. the
benchmarks' SAELens virtualenv:

    ~/.cache/saelens_bench/venv/bin/python scripts/check_saelens_formats.py [--json OUT.json]

For every architecture both sides have: SAELens builds an SAE with random weights (free decoder
norms, positive thresholds) and saves it (`save_model`, or `save_model` of a training SAE for its
training checkpoints), `load_saelens` reads the folder, and our features and outputs are compared
with SAELens' `encode` and `forward` on random inputs (for a training checkpoint: with the
inference SAE SAELens derives from it, `save_inference_model`); then, the other way, `save_saelens`
writes each of our classes and SAELens' `SAE.load_from_disk` reads it. Prints one line per case
(the largest absolute difference) and exits with 1 if any case differs by more than 1e-4.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _checkout import import_checkout  # noqa: E402

import_checkout()
import sae_lens  # noqa: E402
from sae_lens import saes  # noqa: E402

from dictionary_learning import dictionary as ours  # noqa: E402
from dictionary_learning.interop import load_saelens, save_saelens  # noqa: E402
from dictionary_learning.normalization import RunTimeNormalized  # noqa: E402

D, F, D_OUT, K = 16, 48, 12, 5
TOLERANCE = 1e-4


@torch.no_grad()
def randomise(module: torch.nn.Module, seed: int) -> None:
    """Every float tensor random: weights N(0, 0.3²), decoder rows of norms in [0.3, 2.3],
    thresholds in [0.05, 0.35]."""
    g = torch.Generator().manual_seed(seed)
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if not tensor.is_floating_point():
            continue
        if "threshold" in name:
            tensor.copy_(torch.rand(tensor.shape, generator=g) * 0.3 + 0.05)
        else:
            tensor.copy_(torch.randn(tensor.shape, generator=g) * 0.3)
    if hasattr(module, "W_dec"):
        norms = torch.rand(module.W_dec.shape[0], 1, generator=g) * 2 + 0.3
        module.W_dec.copy_(torch.nn.functional.normalize(module.W_dec, dim=1) * norms)


def inputs(width: int, seed: int) -> torch.Tensor:
    return torch.randn(4, 9, width, generator=torch.Generator().manual_seed(seed)) * 2 + 0.5


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max())


def saelens_cases() -> dict[str, object]:
    """name -> a SAELens SAE (inference or training) with random weights."""
    base = {"d_in": D, "d_sae": F}
    transcoder = {**base, "d_out": D_OUT, "apply_b_dec_to_input": False}
    configs = {
        "standard": saes.StandardSAEConfig(**base),
        "standard, apply_b_dec_to_input=False": saes.StandardSAEConfig(**base, apply_b_dec_to_input=False),
        "gated": saes.GatedSAEConfig(**base),
        "topk": saes.TopKSAEConfig(**base, k=K),
        "topk, rescale_acts_by_decoder_norm": saes.TopKSAEConfig(**base, k=K, rescale_acts_by_decoder_norm=True),
        "abstopk, rescale_acts_by_decoder_norm": saes.AbsTopKSAEConfig(**base, k=K, rescale_acts_by_decoder_norm=True),
        "jumprelu": saes.JumpReLUSAEConfig(**base),
        "jumprelu, apply_b_dec_to_input=True": saes.JumpReLUSAEConfig(**base, apply_b_dec_to_input=True),
        "transcoder": saes.TranscoderConfig(**transcoder),
        "skip_transcoder": saes.SkipTranscoderConfig(**transcoder),
        "jumprelu_transcoder": saes.JumpReLUTranscoderConfig(**transcoder),
        "jumprelu_skip_transcoder": saes.JumpReLUSkipTranscoderConfig(**transcoder),
        "standard, layer_norm": saes.StandardSAEConfig(**base, normalize_activations="layer_norm"),
        "topk, layer_norm": saes.TopKSAEConfig(**base, k=K, normalize_activations="layer_norm"),
        "skip_transcoder, layer_norm": saes.SkipTranscoderConfig(**transcoder, normalize_activations="layer_norm"),
        "standard, constant_norm_rescale": saes.StandardSAEConfig(**base, normalize_activations="constant_norm_rescale"),
        "training topk (rescaled)": saes.TopKTrainingSAEConfig(**base, k=K),
        "training batchtopk (rescaled)": saes.BatchTopKTrainingSAEConfig(**base, k=float(K)),
        "training matryoshka_batchtopk": saes.MatryoshkaBatchTopKTrainingSAEConfig(
            **base, k=float(K), matryoshka_widths=[8, 24, F]),
    }
    cases = {}
    for seed, (name, cfg) in enumerate(configs.items()):
        training = isinstance(cfg, saes.TrainingSAEConfig)
        sae = (saes.TrainingSAE if training else saes.SAE).from_dict(cfg.to_dict())
        randomise(sae, seed)
        if hasattr(sae, "topk_threshold"):
            sae.topk_threshold = torch.tensor(0.35, dtype=torch.double)
        cases[name] = sae.eval()
    return cases


def check_saelens_to_ours(folder: Path) -> list[dict]:
    rows = []
    for seed, (name, sae) in enumerate(saelens_cases().items()):
        path = folder / f"in_{seed}"
        sae.save_model(path)
        reference = sae
        if isinstance(sae, saes.TrainingSAE):  # what SAELens serves from this checkpoint: its inference SAE
            sae.save_inference_model(folder / f"inference_{seed}")
            reference = saes.SAE.load_from_disk(folder / f"inference_{seed}").eval()
        dictionary, _ = load_saelens(path)
        x = inputs(D, 100 + seed)
        with torch.no_grad():
            features = difference(dictionary.encode(x), reference.encode(x))
            outputs = difference(dictionary(x), reference(x))
        rows.append({"direction": "SAELens -> ours", "case": name, "class": type(dictionary).__name__,
                     "max |Δf|": features, "max |Δx̂|": outputs})
    return rows


def our_cases() -> dict[str, ours.Dictionary]:
    """name -> one of our dictionaries (the exportable classes, and a run-time normalised one)."""
    cases = {
        "AutoEncoder": ours.AutoEncoder(D, F),
        "AutoEncoderNew": ours.AutoEncoderNew(D, F),
        "GatedAutoEncoder": ours.GatedAutoEncoder(D, F),
        "AutoEncoderTopK": ours.AutoEncoderTopK(D, F, k=K),
        "BatchTopKSAE": ours.BatchTopKSAE(D, F, k=K),
        "MatryoshkaBatchTopKSAE": ours.MatryoshkaBatchTopKSAE(D, F, k=K, group_sizes=[8, 40]),
        "JumpReluAutoEncoder": ours.JumpReluAutoEncoder(D, F),
        "AbsTopKSAE": ours.AbsTopKSAE(D, F, k=K),
        "Transcoder": ours.Transcoder(D, F, output_dim=D_OUT),
        "Transcoder (skip)": ours.Transcoder(D, F, output_dim=D_OUT, skip=True),
        "JumpReluTranscoder": ours.JumpReluTranscoder(D, F, output_dim=D_OUT),
        "JumpReluTranscoder (skip)": ours.JumpReluTranscoder(D, F, output_dim=D_OUT, skip=True),
    }
    for seed, dictionary in enumerate(cases.values()):
        randomise(dictionary, 200 + seed)
        if hasattr(dictionary, "has_threshold"):
            dictionary.threshold.fill_(0.35)
    cases["AutoEncoderTopK, layer_norm"] = RunTimeNormalized(cases["AutoEncoderTopK"], "layer_norm")
    return cases


def check_ours_to_saelens(folder: Path) -> list[dict]:
    rows = []
    for seed, (name, dictionary) in enumerate(our_cases().items()):
        path = save_saelens(dictionary, folder / f"out_{seed}")
        sae = saes.SAE.load_from_disk(path).eval()
        x = inputs(D, 300 + seed)
        with torch.no_grad():
            features = difference(dictionary.encode(x), sae.encode(x))
            outputs = difference(dictionary(x), sae(x))
        rows.append({"direction": "ours -> SAELens", "case": name, "class": type(sae).__name__,
                     "max |Δf|": features, "max |Δx̂|": outputs})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        rows = check_saelens_to_ours(Path(folder)) + check_ours_to_saelens(Path(folder))
    print(f"sae_lens {sae_lens.__version__}, torch {torch.__version__}")
    print("| direction | case | class | max abs Δ features | max abs Δ output |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['direction']} | {row['case']} | {row['class']} | {row['max |Δf|']:.2e} | {row['max |Δx̂|']:.2e} |")
    if args.json:
        args.json.write_text(json.dumps({"sae_lens": sae_lens.__version__, "rows": rows}, indent=1))
    failed = [row["case"] for row in rows if max(row["max |Δf|"], row["max |Δx̂|"]) > TOLERANCE]
    if failed:
        print(f"differ by more than {TOLERANCE}: {', '.join(failed)}")
        sys.exit(1)


if __name__ == "__main__":
    main()
