"""Check dictionaries fetched by pretrained_dictionary_downloader.sh and print what is on disk.

    python scripts/verify_download.py --root dictionaries/pythia-70m-deduped --set 10_32768 \
        --expect-shape 512,32768 embed mlp_out_layer1 ...

An AutoEncoder with activation dim D and F latents has the state_dict
    bias [D], encoder.weight [F, D], encoder.bias [F], decoder.weight [D, F]
Each `ae.pt` must hold exactly these keys with (D, F) as expected (`--expect-shape any`: any
consistent D, F) and load with `AutoEncoder.from_pretrained`; checkpoints/ae_STEP.pt get the key
and shape check (memory-mapped, so 10 GB of checkpoints are not read); config.json must parse.
Prints one row per file (site, file, shape, size) and exits 1 if any check fails.

The library is imported from the checkout this file sits in (a clone under any name, or the
installed package; _checkout.py).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import torch


def expected_shapes(activation_dim: int, dict_size: int) -> dict[str, tuple[int, ...]]:
    return {
        "bias": (activation_dim,),
        "encoder.weight": (dict_size, activation_dim),
        "encoder.bias": (dict_size,),
        "decoder.weight": (activation_dim, dict_size),
    }


def check_state_dict(state: dict, expect: tuple[int, int] | None) -> tuple[int, int]:
    """(D, F) of an AutoEncoder state_dict; ValueError naming what is wrong."""
    if not isinstance(state, dict):
        raise ValueError(f"holds a {type(state).__name__}, not a state_dict")
    keys = set(state)
    wanted = set(expected_shapes(1, 1))
    if keys != wanted:
        raise ValueError(
            f"keys {sorted(keys)} are not the AutoEncoder keys {sorted(wanted)}"
            + (f" (missing {sorted(wanted - keys)})" if wanted - keys else "")
            + (f" (unexpected {sorted(keys - wanted)})" if keys - wanted else "")
        )
    encoder_weight = state["encoder.weight"]
    if not isinstance(encoder_weight, torch.Tensor) or encoder_weight.dim() != 2:
        raise ValueError("encoder.weight is not a 2-d tensor")
    dict_size, activation_dim = encoder_weight.shape
    if expect is not None and (activation_dim, dict_size) != expect:
        raise ValueError(
            f"has activation dim {activation_dim} and {dict_size} latents; expected {expect[0]} and "
            f"{expect[1]} (pass --expect-shape D,F or 'any' for other dictionaries)"
        )
    for key, shape in expected_shapes(activation_dim, dict_size).items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{key} has shape {list(state[key].shape)}, expected {list(shape)}")
    return activation_dim, dict_size


def load_tensors(path: Path) -> dict:
    """torch.load(weights_only) memory-mapped where the file format allows it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # legacy (non-zip) torch.save format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def import_autoencoder():
    """(AutoEncoder class or None, reason it is None)."""
    try:
        if "dictionary_learning" not in sys.modules:  # run as a script: this folder is on sys.path
            from _checkout import import_checkout

            import_checkout()
        from dictionary_learning import AutoEncoder

        return AutoEncoder, ""
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"


def check_file(path: Path, expect: tuple[int, int] | None, autoencoder) -> str:
    """Shape column for `path`; ValueError if the file fails its check."""
    if path.name == "config.json":
        try:
            json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"is not valid JSON: {e}") from e
        return "-"
    try:
        state = load_tensors(path)
    except Exception as e:
        raise ValueError(
            f"does not load with torch.load(weights_only=True): {type(e).__name__}: {e}"
        ) from e
    activation_dim, dict_size = check_state_dict(state, expect)
    if path.name == "ae.pt" and autoencoder is not None:
        try:
            loaded = autoencoder.from_pretrained(str(path)).state_dict()
        except Exception as e:
            raise ValueError(f"AutoEncoder.from_pretrained failed: {type(e).__name__}: {e}") from e
        got = {key: tuple(value.shape) for key, value in loaded.items()}
        if got != expected_shapes(activation_dim, dict_size):
            raise ValueError(f"AutoEncoder.from_pretrained gave parameters {got}")
    return f"{activation_dim} x {dict_size}"


def human_size(n_bytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n_bytes < 1024 or unit == "GiB":
            return f"{n_bytes:.0f} {unit}" if unit == "B" else f"{n_bytes:.1f} {unit}"
        n_bytes /= 1024


def files_of(site_dir: Path) -> list[Path]:
    """ae.pt, config.json, then checkpoints/ae_STEP.pt by increasing step."""
    checkpoints = [
        p for p in (site_dir / "checkpoints").glob("ae_*.pt") if re.fullmatch(r"ae_\d+\.pt", p.name)
    ]
    checkpoints.sort(key=lambda p: int(p.stem.split("_")[1]))
    return [site_dir / "ae.pt", site_dir / "config.json", *checkpoints]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, required=True, help="DIR/pythia-70m-deduped")
    parser.add_argument("--set", dest="set_name", required=True, help="e.g. 10_32768")
    parser.add_argument("--expect-shape", default="any", help="D,F or 'any'")
    parser.add_argument("sites", nargs="+", help="e.g. embed mlp_out_layer1")
    args = parser.parse_args(argv)
    if args.expect_shape == "any":
        expect = None
    else:
        match = re.fullmatch(r"(\d+),(\d+)", args.expect_shape)
        if match is None:
            parser.error(f"--expect-shape {args.expect_shape!r} must be D,F (e.g. 512,32768) or 'any'")
        expect = (int(match.group(1)), int(match.group(2)))

    autoencoder, reason = import_autoencoder()
    if autoencoder is None:
        print(
            f"warning: could not import dictionary_learning.AutoEncoder ({reason}); checking key "
            "names and shapes with torch only",
            file=sys.stderr,
        )

    rows, failures, total = [], [], 0
    for site in args.sites:
        site_dir = args.root / site / args.set_name
        for path in files_of(site_dir):
            name = path.relative_to(site_dir).as_posix()
            if not path.exists():
                failures.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            total += size
            try:
                shape = check_file(path, expect, autoencoder)
            except ValueError as e:
                failures.append(f"{path}: {e}")
                shape = "FAILED"
            rows.append((site, name, shape, human_size(size)))

    print(f"{'site':<18} {'file':<24} {'shape (D x F)':<14} size")
    for site, name, shape, size in rows:
        print(f"{site:<18} {name:<24} {shape:<14} {size}")
    print(f"total {human_size(total)} in {args.root}")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
