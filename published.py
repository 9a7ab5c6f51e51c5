"""The published Pythia-70m-deduped dictionaries: `pretrained_dictionary_downloader.sh`'s options as a
dataclass, run by that script (one implementation of the download: resumable transfers, the zip or
the per-file tree, the check that every ae.pt loads).

    from dictionary_learning.published import DownloadConfig, download_published
    download_published(DownloadConfig(layers="embed,2", dir="dictionaries"))
"""
from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["DownloadConfig", "download_published", "DOWNLOADER_SCRIPT", "script_arguments"]

DOWNLOADER_SCRIPT = Path(__file__).resolve().parent / "pretrained_dictionary_downloader.sh"


@dataclass
class DownloadConfig:
    """The downloader's options (`pretrained_dictionary_downloader.sh --help` says more)."""

    layers: str = "embed,0,1,2,3,4,5"
    """comma-separated: embed, layer numbers 0..5, or site names such as mlp_out_layer1."""
    kinds: str = "attn,mlp,resid"
    """which submodules of a numbered layer."""
    set: str = "10_32768"
    """the dictionary set, <id>_<latents>."""
    source: str = field(default="auto", metadata={"choices": ["auto", "hf", "tree"]})
    """hf: the zip on the Hugging Face Hub; tree: file by file; auto: hf for the whole 10_32768 set, else tree."""
    checkpoints: bool = False
    """also download the training checkpoints (about 10 GB per submodule)."""
    steps: str | None = None
    """checkpoint steps to fetch, e.g. 0,1000 (implies --checkpoints)."""
    dir: str = "dictionaries"
    """the target folder."""
    expect_shape: str | None = None
    """D,F every dictionary must have, or 'any' (default: 512 and the set's latents)."""
    verify: bool = True
    """check that every ae.pt loads as an AutoEncoder of the expected shape."""
    keep_zip: bool = False
    """keep the downloaded zip."""


def script_arguments(config: DownloadConfig) -> list[str]:
    """The downloader script's command-line arguments for `config` (its checks run with this
    interpreter)."""
    arguments = ["--layers", config.layers, "--kinds", config.kinds, "--set", config.set, "--source", config.source,
                 "--dir", config.dir, "--python", sys.executable]
    if config.checkpoints:
        arguments.append("--checkpoints")
    if config.steps is not None:
        arguments += ["--steps", config.steps]
    if config.expect_shape is not None:
        arguments += ["--expect-shape", config.expect_shape]
    if not config.verify:
        arguments.append("--no-verify")
    if config.keep_zip:
        arguments.append("--keep-zip")
    return arguments


def download_published(config: DownloadConfig) -> int:
    """Run the downloader script with `config` (its output goes to this process's stdout and
    stderr); returns its exit status."""
    bash = shutil.which("bash")
    if bash is None:
        raise FileNotFoundError("the download needs bash (pretrained_dictionary_downloader.sh is a bash script)")
    if not DOWNLOADER_SCRIPT.is_file():
        raise FileNotFoundError(f"{str(DOWNLOADER_SCRIPT)!r} is missing from this installation")
    return subprocess.run([bash, str(DOWNLOADER_SCRIPT), *script_arguments(config)]).returncode
