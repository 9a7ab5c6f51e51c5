"""An in-memory Hugging Face Hub at huggingface_hub's API boundary (HfApi, hf_hub_download), for
the tests of push_to_hub, hub paths and the `push` command."""
from pathlib import Path
from types import SimpleNamespace

from huggingface_hub import errors


class FakeHub:
    """Model repositories in memory: {repo_id: {path: bytes}}, with the calls of huggingface_hub the
    library makes (HfApi.model_info / create_repo / create_commit, hf_hub_download) and a log of them."""

    def __init__(self, cache: Path):
        self.repos: dict[str, dict[str, bytes]] = {}
        self.cache, self.calls, self.commits = cache, [], []
        hub = self

        class Api:
            def __init__(self, token=None, **kwargs):
                self.token = token

            def model_info(self, repo_id, revision=None, timeout=None, **kwargs):
                hub.calls.append(("model_info", repo_id, revision, timeout))
                return SimpleNamespace(siblings=[SimpleNamespace(rfilename=name) for name in hub.repo(repo_id)])

            def create_repo(self, repo_id, private=None, exist_ok=False, **kwargs):
                hub.calls.append(("create_repo", repo_id, private))
                hub.repos.setdefault(repo_id, {})

            def create_commit(self, repo_id, operations, commit_message, revision=None, **kwargs):
                operations = list(operations)
                hub.commits.append((repo_id, commit_message, [op.path_in_repo for op in operations]))
                for op in operations:
                    hub.repo(repo_id)[op.path_in_repo] = Path(op.path_or_fileobj).read_bytes()

        self.Api = Api

    def repo(self, repo_id):
        if repo_id not in self.repos:
            error = errors.RepositoryNotFoundError.__new__(errors.RepositoryNotFoundError)
            Exception.__init__(error, f"404: {repo_id}")
            raise error
        return self.repos[repo_id]

    def hf_hub_download(self, repo_id, filename, revision=None, local_files_only=False, **kwargs):
        self.calls.append(("hf_hub_download", repo_id, filename, revision))
        files = self.repo(repo_id)
        if filename not in files:
            error = errors.EntryNotFoundError(f"404: {filename}")
            raise error
        local = self.cache / repo_id / (revision or "main") / filename
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(files[filename])
        return str(local)
