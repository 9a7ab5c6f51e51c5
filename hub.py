"""The Hugging Face Hub: dictionaries at `hf://` paths, run folders pushed to a repository, and a
hub that cannot be reached failing in seconds with one line instead of a minute of retries.

    hf://OWNER/REPO/path/to/folder             a dictionary folder in a model repository
    hf://OWNER/REPO@REVISION/path/to/ae.pt     a weights file (its folder's config.json comes along)

`fetch_dictionary(url)` downloads a dictionary's files into the Hub cache (huggingface_hub's
`hf_hub_download`, so a second call reads the cache) and returns the local folder or file, which
`load_dictionary` and `Dictionary.from_pretrained` then read as any local path. With
`HF_HUB_OFFLINE=1` nothing is asked of the network: the cached files are used, or the error says
they are not cached.

`push_to_hub(folder_or_sweep, repo_id)` uploads, in one commit, every dictionary folder under a
run folder with the layout the reference library and SAEBench read: `<path_in_repo>/<relative
folder>/{ae.pt, config.json}` (plus `log.jsonl`, `eval.json` and `run_config.json` when present;
checkpoints only when asked; never the resumable state or the lock).

Before the first request to the Hub, a metadata request with a short timeout (`HUB_TIMEOUT`) and
no retries checks that it answers; huggingface_hub's own downloads retry a failed connection for
half a minute or more, which is right for a flaky link and wrong for no link at all.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Callable

__all__ = ["HubPath", "HubUnreachable", "HUB_TIMEOUT", "HF_SCHEME", "is_hub_path", "parse_hub_path", "hub_offline",
           "check_model_on_hub", "check_dataset_on_hub", "fetch_dictionary", "fetch_weights", "fetch_run", "push_to_hub",
           "DICTIONARY_FILES", "RUN_FILES"]

HF_SCHEME = "hf://"
HUB_TIMEOUT = 10.0
"""Seconds the first request to the Hub may take before it counts as unreachable."""

DICTIONARY_FILES = ("config.json", "ae.pt", "ae.safetensors", "cfg.json", "sae_weights.safetensors")
"""The files of one dictionary folder: ours and the reference's (ae.pt + config.json, or
ae.safetensors), SAELens' (cfg.json + sae_weights.safetensors)."""
RUN_FILES = ("log.jsonl", "eval.json", "run_config.json")
"""What else a run folder holds that is worth sharing: metrics logs, evaluation, the run's config."""


class HubUnreachable(ConnectionError):
    """The Hugging Face Hub did not answer (no network, a proxy, a firewall)."""


@dataclass(frozen=True)
class HubPath:
    """A parsed `hf://OWNER/REPO[@REVISION][/PATH]`."""

    repo_id: str
    path: str = ""
    revision: str | None = None

    @property
    def url(self) -> str:
        revision = f"@{self.revision}" if self.revision else ""
        return f"{HF_SCHEME}{self.repo_id}{revision}" + (f"/{self.path}" if self.path else "")


def is_hub_path(path: Any) -> bool:
    return isinstance(path, str) and path.startswith(HF_SCHEME)


def parse_hub_path(url: str) -> HubPath:
    """`hf://OWNER/REPO[@REVISION][/PATH]` as a HubPath; ValueError for anything else."""
    if not is_hub_path(url):
        raise ValueError(f"{url!r} is not a Hub path; write hf://OWNER/REPO/path/to/folder")
    parts = [part for part in url[len(HF_SCHEME):].split("/") if part]
    if len(parts) < 2 or any(part in (".", "..") for part in parts):
        raise ValueError(f"{url!r} is not a Hub path; write hf://OWNER/REPO/path/to/folder (OWNER/REPO is the "
                         "repository id)")
    name, _, revision = parts[1].partition("@")
    if not name:
        raise ValueError(f"{url!r} has no repository name; write hf://OWNER/REPO/path/to/folder")
    return HubPath(f"{parts[0]}/{name}", "/".join(parts[2:]), revision or None)


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) asks for the local cache only."""
    return any(os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
               for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def _is_connection_error(error: BaseException) -> bool:
    module = type(error).__module__ or ""
    return isinstance(error, (ConnectionError, TimeoutError)) or module.split(".")[0].startswith("httpx") or (
        isinstance(error, OSError) and "connect" in str(error).lower())


def _hub_call(what: str, call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, a request to the Hub about `what`; its failures as one-line errors:
    HubUnreachable, FileNotFoundError (no such repository, revision or file), PermissionError."""
    from huggingface_hub import errors

    try:
        return call(*args, **kwargs)
    except errors.GatedRepoError:
        raise PermissionError(f"{what} is gated: accept its terms on the Hub and log in (hf auth login, or "
                              "HF_TOKEN)") from None
    except errors.RepositoryNotFoundError:
        raise FileNotFoundError(f"{what}: no such repository on the Hub ({_endpoint()}), or it is private (log in "
                                "with hf auth login, or set HF_TOKEN)") from None
    except errors.RevisionNotFoundError:
        raise FileNotFoundError(f"{what}: no such revision on the Hub") from None
    except errors.EntryNotFoundError as error:
        if isinstance(error, errors.LocalEntryNotFoundError) and hub_offline():
            raise FileNotFoundError(f"{what} is not in the local Hub cache, and HF_HUB_OFFLINE is set: unset it to "
                                    "download, or pass a local path") from None
        if isinstance(error, errors.LocalEntryNotFoundError):
            raise _unreachable(what, error) from None
        raise FileNotFoundError(f"{what}: no such file on the Hub") from None
    except errors.OfflineModeIsEnabled:
        raise FileNotFoundError(f"{what} is not in the local Hub cache, and HF_HUB_OFFLINE is set: unset it to "
                                "download, or pass a local path") from None
    except Exception as error:
        if _is_connection_error(error):
            raise _unreachable(what, error) from None
        raise


def _unreachable(what: str, error: BaseException) -> HubUnreachable:
    reason = " ".join(str(error).split())[:160] or type(error).__name__
    return HubUnreachable(f"cannot reach the Hugging Face Hub ({_endpoint()}) for {what}: {reason}. Set "
                          "HF_HUB_OFFLINE=1 to use the local cache only, or pass a local path")


def _repo_files(repo_id: str, revision: str | None = None, repo_type: str = "model") -> list[str]:
    """The files of a repository (one metadata request, HUB_TIMEOUT, no retries)."""
    from huggingface_hub import HfApi

    api = HfApi()
    info_of = api.dataset_info if repo_type == "dataset" else api.model_info
    what = f"the {'dataset' if repo_type == 'dataset' else 'repository'} {repo_id!r}"
    info = _hub_call(what, info_of, repo_id, revision=revision, timeout=HUB_TIMEOUT)
    return sorted(sibling.rfilename for sibling in (getattr(info, "siblings", None) or []))


def check_model_on_hub(repo_id: str) -> None:
    """Fail in seconds, with one line, when the Hub does not answer or has no model `repo_id`
    (nothing is checked with HF_HUB_OFFLINE: the cache decides)."""
    if not hub_offline():
        _repo_files(repo_id)


def check_dataset_on_hub(name: str) -> None:
    """As check_model_on_hub, for a dataset."""
    if not hub_offline():
        _repo_files(name, repo_type="dataset")


def _download(hub: HubPath, filename: str) -> Path:
    import huggingface_hub

    return Path(_hub_call(f"{HF_SCHEME}{hub.repo_id}/{filename}", huggingface_hub.hf_hub_download, hub.repo_id,
                          filename, revision=hub.revision, local_files_only=hub_offline()))


def _config_folder(weights: PurePosixPath) -> PurePosixPath:
    """The folder whose config.json goes with a weights file (a checkpoint's is its run folder's)."""
    return weights.parent.parent if weights.parent.name == "checkpoints" else weights.parent


def _listing(files: list[str], prefix: str) -> str:
    entries = sorted({f[len(prefix):].split("/")[0] for f in files if f.startswith(prefix)})
    shown = ", ".join(entries[:12]) + (f" (and {len(entries) - 12} more)" if len(entries) > 12 else "")
    return f"it holds {shown}" if entries else "it holds nothing there"


def fetch_dictionary(url: str) -> Path:
    """The local copy of the dictionary at `url` (hf://OWNER/REPO/folder, or .../file.pt): its
    files downloaded into the Hub cache. A folder gives the local folder; a weights file gives the
    local file, with its folder's config.json next to it when the repository has one."""
    hub = parse_hub_path(url)
    files = None if hub_offline() else _repo_files(hub.repo_id, hub.revision)
    path = PurePosixPath(hub.path)
    if hub.path.endswith((".pt", ".pth", ".safetensors")):
        config = str(_config_folder(path) / "config.json").removeprefix("./")
        if files is not None and hub.path not in files:
            listing = _listing(files, _prefix(str(path.parent)))
            raise FileNotFoundError(f"{url}: no such file in {hub.repo_id}; {listing}")
        weights = _download(hub, hub.path)
        if files is None or config in files:
            try:
                _download(hub, config)
            except FileNotFoundError:
                if files is not None:
                    raise
        return weights
    prefix = _prefix(hub.path)
    wanted = [prefix + name for name in DICTIONARY_FILES]
    if files is not None:
        present = [name for name in wanted if name in files]
        if not present:
            nested = sorted({f[len(prefix):].rsplit("/", 1)[0] for f in files
                             if f.startswith(prefix) and f.endswith("/ae.pt") and "/checkpoints/" not in f})
            if nested:
                raise FileNotFoundError(
                    f"{url} holds no dictionary itself but {len(nested)} below it ({', '.join(nested[:6])}"
                    f"{', ...' if len(nested) > 6 else ''}): pass one of them, e.g. {url.rstrip('/')}/{nested[0]}")
            raise FileNotFoundError(f"{url}: no dictionary there (ae.pt + config.json, or SAELens' cfg.json + "
                                    f"sae_weights.safetensors); {_listing(files, prefix)}")
    else:
        present = wanted
    local = None
    for name in present:
        try:
            local = _download(hub, name).parent
        except FileNotFoundError:
            if files is not None:
                raise
    if local is None:
        raise FileNotFoundError(f"{url} is not in the local Hub cache, and HF_HUB_OFFLINE is set: unset it to "
                                "download, or pass a local path")
    return local


def fetch_weights(url: str) -> Path:
    """The local weights file of the dictionary at `url`: the file itself, or the weights of the
    folder it names (ae.pt, ae.safetensors or SAELens' sae_weights.safetensors)."""
    local = fetch_dictionary(url)
    if local.is_file():
        return local
    for name in ("ae.pt", "ae.safetensors", "sae_weights.safetensors"):
        if (local / name).is_file():
            return local / name
    raise FileNotFoundError(f"{url}: no weights file (ae.pt, ae.safetensors, sae_weights.safetensors) there")


def _prefix(path: str) -> str:
    path = path.strip("/")
    return f"{path}/" if path and path != "." else ""


def fetch_run(url: str) -> Path:
    """The local copy of every dictionary folder at or under `url` (a run folder or a sweep pushed
    with push_to_hub), with their logs and evaluations, but no checkpoints: the local folder that
    corresponds to `url`."""
    hub = parse_hub_path(url)
    prefix = _prefix(hub.path)
    files = _repo_files(hub.repo_id, hub.revision)
    names = DICTIONARY_FILES + RUN_FILES
    chosen = [f for f in files if f.startswith(prefix) and f.rsplit("/", 1)[-1] in names and "/checkpoints/" not in f]
    if not any(f.rsplit("/", 1)[-1] in ("ae.pt", "sae_weights.safetensors", "ae.safetensors") for f in chosen):
        raise FileNotFoundError(f"{url}: no dictionary folder there; {_listing(files, prefix)}")
    local = None
    for name in chosen:
        downloaded = _download(hub, name)
        local = downloaded.parents[len(PurePosixPath(name).parts) - 1]  # the snapshot's root
    return local / hub.path if hub.path else local


def _upload_list(root: Path, include_checkpoints: bool) -> list[Path]:
    """The files of `root` to upload: every dictionary folder's files, the run's own files."""
    folders = sorted({p.parent for name in ("ae.pt", "ae.safetensors", "sae_weights.safetensors")
                      for p in root.rglob(name)})
    if not folders:
        raise FileNotFoundError(f"no dictionary under {str(root)!r} (a folder holding ae.pt and config.json, a "
                                "trainSAE save_dir, or a SAELens folder)")
    chosen: list[Path] = []
    for folder in folders:
        if not (folder / "config.json").exists() and not (folder / "cfg.json").exists():
            raise FileNotFoundError(f"{str(folder)!r} has weights but no config.json; the reference library and "
                                    "SAEBench need it next to ae.pt")
        chosen += [folder / name for name in DICTIONARY_FILES + RUN_FILES if (folder / name).is_file()]
        if include_checkpoints and (folder / "checkpoints").is_dir():
            chosen += sorted((folder / "checkpoints").glob("ae_*.pt"))
    chosen += [root / name for name in RUN_FILES if (root / name).is_file()]
    return sorted(set(chosen))


def push_to_hub(
    folder_or_sweep: str | os.PathLike,
    repo_id: str,
    path_in_repo: str = "",
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    include_checkpoints: bool = False,
    token: str | None = None,
) -> str:
    """Upload a dictionary folder or a whole run (sweep) folder to the model repository
    `repo_id` (created if missing) in one commit; returns the hf:// path of the upload.

    Layout: `<path_in_repo>/<folder relative to folder_or_sweep>/{ae.pt, config.json, ...}`, the one
    `load_dictionary("hf://...")`, the reference library's loaders and SAEBench read. Uploaded:
    every dictionary's weights and config (ours, or SAELens' files), its log.jsonl and eval.json,
    the run's run_config.json and eval.json; with `include_checkpoints`, checkpoints/ae_N.pt too.
    Never the resumable state (training_state.pt) or the lock. `token`: a Hub token (default:
    the logged-in one, or HF_TOKEN)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    root = Path(folder_or_sweep)
    if not root.is_dir():
        raise FileNotFoundError(f"{str(root)!r} is not a folder; pass a dictionary folder or a run folder")
    if "/" not in repo_id or repo_id.startswith(HF_SCHEME):
        raise ValueError(f"repo_id {repo_id!r} is not a repository id; write OWNER/NAME (e.g. 'me/pythia-saes')")
    if hub_offline():
        raise HubUnreachable("HF_HUB_OFFLINE is set: unset it to push to the Hub")
    files = _upload_list(root, include_checkpoints)
    prefix = path_in_repo.strip("/")
    api = HfApi(token=token)
    try:
        _hub_call(f"the repository {repo_id!r}", api.model_info, repo_id, timeout=HUB_TIMEOUT)
    except FileNotFoundError:
        pass  # created below
    _hub_call(f"creating {repo_id!r}", api.create_repo, repo_id, private=private, exist_ok=True)
    operations = [CommitOperationAdd(path_in_repo=str(PurePosixPath(prefix, *file.relative_to(root).parts)),
                                     path_or_fileobj=str(file)) for file in files]
    message = commit_message or f"dictionary_learning: {root.name} ({len(operations)} files)"
    _hub_call(f"pushing to {repo_id!r}", api.create_commit, repo_id, operations, commit_message=message,
              revision=revision)
    return HubPath(repo_id, prefix, revision).url
