"""pretrained_dictionary_downloader.sh against a local HTTP server (127.0.0.1) that holds a fake
per-file tree and a fake zip of small random dictionaries (D=16, F=64) with the published layout.
The script reaches it through DL_TREE_BASE_URL / DL_HF_BASE_URL. Each test that downloads runs
with curl and with wget where both are installed (DL_DOWNLOADER picks one).
"""
import functools
import http.server
import os
import re
import shutil
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch

from dictionary_learning import AutoEncoder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "pretrained_dictionary_downloader.sh"
MODEL = "pythia-70m-deduped"
SET = "10_32768"
D, F = 16, 64
SITES = ["embed"] + [f"{kind}_out_layer{i}" for i in range(6) for kind in ("attn", "mlp", "resid")]
STEPS = [0, 100, 2000]
ZIP_NAME = f"dictionaries_{MODEL}_10.zip"
DOWNLOADERS = [tool for tool in ("curl", "wget") if shutil.which(tool)]

needs_downloader = pytest.mark.skipif(not DOWNLOADERS, reason="neither curl nor wget is installed")


def random_autoencoder_state(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {
        "bias": torch.randn(D, generator=generator),
        "encoder.weight": torch.randn(F, D, generator=generator),
        "encoder.bias": torch.randn(F, generator=generator),
        "decoder.weight": torch.randn(D, F, generator=generator),
    }


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Served folder: tree/<MODEL>/<site>/<SET>/{ae.pt,config.json,checkpoints/ae_STEP.pt} and
    hf/<ZIP_NAME> holding dictionaries/<MODEL>/<site>/<SET>/{ae.pt,config.json}."""
    served = tmp_path_factory.mktemp("served")
    tree = served / "tree" / MODEL
    for i, site in enumerate(SITES):
        site_dir = tree / site / SET
        (site_dir / "checkpoints").mkdir(parents=True)
        torch.save(random_autoencoder_state(i), site_dir / "ae.pt")
        (site_dir / "config.json").write_text(f'{{"trainer": {{"activation_dim": {D}, "dict_size": {F}}}}}')
        for step in STEPS:
            torch.save(random_autoencoder_state(1000 * i + step + 1), site_dir / "checkpoints" / f"ae_{step}.pt")
    (served / "hf").mkdir()
    with zipfile.ZipFile(served / "hf" / ZIP_NAME, "w") as archive:
        for site in SITES:
            for name in ("ae.pt", "config.json"):
                archive.write(tree / site / SET / name, f"dictionaries/{MODEL}/{site}/{SET}/{name}")
    return served


def source_file(source: Path, site: str, name: str) -> Path:
    return source / "tree" / MODEL / site / SET / name


class RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with `Range: bytes=N-` support; can cut one transfer of a path halfway."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()  # directory listings, redirects, 404
        data = path.read_bytes()
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
        if match and self.server.support_ranges:
            start = int(match.group(1))
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        body = data[start:]
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.path in self.server.cut_once:
            self.server.cut_once.discard(self.path)
            self.wfile.write(body[: len(body) // 2])
            self.close_connection = True
            return
        self.wfile.write(body)


@pytest.fixture
def server(source):
    httpd = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(RangeHandler, directory=str(source))
    )
    httpd.requests, httpd.support_ranges, httpd.cut_once = [], True, set()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def run_script(server, target, *args, downloader=None, verify=False, env=None):
    """Run the script into `target`; without `verify`, --no-verify keeps runs fast (no torch import)."""
    full_env = {
        **os.environ,
        "DL_HF_BASE_URL": f"{server.url}/hf",
        "DL_TREE_BASE_URL": f"{server.url}/tree",
        "PYTHON": sys.executable,
        **({"DL_DOWNLOADER": downloader} if downloader else {}),
        **(env or {}),
    }
    command = ["bash", str(SCRIPT), "--dir", str(target), *args, *([] if verify else ["--no-verify"])]
    return subprocess.run(command, env=full_env, capture_output=True, text=True, timeout=120, cwd=target.parent)


def sites_on_disk(target: Path) -> set[str]:
    return {p.parent.parent.name for p in (target / MODEL).glob(f"*/{SET}/ae.pt")}


def leftovers(target: Path) -> list[Path]:
    return [p for p in target.rglob("*") if p.name.endswith(".part") or p.suffix == ".zip"]


def assert_same_files(source, target, site, names=("ae.pt", "config.json")):
    for name in names:
        got = target / MODEL / site / SET / name
        assert got.read_bytes() == source_file(source, site, name).read_bytes(), got


def path_without(tmp_path: Path, *tools: str) -> str:
    """A PATH whose single folder links every executable of $PATH except `tools`."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for folder in os.environ["PATH"].split(os.pathsep):
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            target = os.path.join(folder, name)
            if name in tools or (bin_dir / name).exists() or not os.path.isfile(target):
                continue
            if os.access(target, os.X_OK):
                (bin_dir / name).symlink_to(target)
    return str(bin_dir)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_default_run_unpacks_every_site_from_the_zip(source, server, tmp_path, downloader):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert sites_on_disk(target) == set(SITES)
    for site in SITES:
        assert_same_files(source, target, site)
    assert leftovers(target) == []
    assert [path for path, _ in server.requests] == [f"/hf/{ZIP_NAME}"]
    ae = AutoEncoder.from_pretrained(target / MODEL / "mlp_out_layer1" / SET / "ae.pt")
    expected = torch.load(source_file(source, "mlp_out_layer1", "ae.pt"), weights_only=True)
    assert ae.W_enc.T.shape == (F, D)
    for key, value in ae.state_dict().items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=0)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_layers_fetch_only_those_sites_from_the_tree(source, server, tmp_path, downloader):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, "--layers", "embed,2", downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert sites_on_disk(target) == {"embed", "attn_out_layer2", "mlp_out_layer2", "resid_out_layer2"}
    for site in sites_on_disk(target):
        assert_same_files(source, target, site)
    assert all(path.startswith(f"/tree/{MODEL}/") for path, _ in server.requests)
    assert len(server.requests) == 8
    assert leftovers(target) == []


@needs_downloader
def test_zip_source_keeps_only_the_selected_sites(source, server, tmp_path):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, "--source", "hf", "--layers", "1", "--kinds", "mlp,resid", "--keep-zip")
    assert result.returncode == 0, result.stderr
    assert sites_on_disk(target) == {"mlp_out_layer1", "resid_out_layer1"}
    for site in ("mlp_out_layer1", "resid_out_layer1"):
        assert_same_files(source, target, site)
    assert (target / ZIP_NAME).read_bytes() == (source / "hf" / ZIP_NAME).read_bytes()


@needs_downloader
def test_zip_is_unpacked_with_python_when_unzip_is_missing(source, server, tmp_path):
    target = tmp_path / "dictionaries"
    env = {"PATH": path_without(tmp_path, "unzip")}
    result = run_script(server, target, "--source", "hf", "--layers", "3", "--kinds", "attn", env=env)
    assert result.returncode == 0, result.stderr
    assert sites_on_disk(target) == {"attn_out_layer3"}
    assert_same_files(source, target, "attn_out_layer3")


@needs_downloader
def test_checkpoints_are_read_from_the_listing_and_checked(source, server, tmp_path):
    target = tmp_path / "dictionaries"
    result = run_script(
        server, target, "--layers", "mlp_out_layer1", "--checkpoints", "--expect-shape", f"{D},{F}", verify=True
    )
    assert result.returncode == 0, result.stderr
    names = [f"checkpoints/ae_{step}.pt" for step in STEPS]
    assert_same_files(source, target, "mlp_out_layer1", ("ae.pt", "config.json", *names))
    rows = re.findall(r"^mlp_out_layer1\s+(\S+)\s+(16 x 64|-)\s+\d", result.stdout, flags=re.M)
    # ae.pt, config.json, then the checkpoints by increasing step (not 0, 2000, 100)
    assert rows == [("ae.pt", "16 x 64"), ("config.json", "-"), *[(name, "16 x 64") for name in names]]


@needs_downloader
def test_steps_select_checkpoints_without_a_listing(source, server, tmp_path):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, "--layers", "embed", "--steps", "100")
    assert result.returncode == 0, result.stderr
    checkpoints = target / MODEL / "embed" / SET / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["ae_100.pt"]
    assert_same_files(source, target, "embed", ("checkpoints/ae_100.pt",))
    assert not any(path.endswith("/checkpoints/") for path, _ in server.requests)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_partial_file_from_an_interrupted_run_is_resumed(source, server, tmp_path, downloader):
    target = tmp_path / "dictionaries"
    full = source_file(source, "embed", "ae.pt").read_bytes()
    part = target / MODEL / "embed" / SET / "ae.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(full[: len(full) // 2])
    result = run_script(server, target, "--layers", "embed", downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert (f"/tree/{MODEL}/embed/{SET}/ae.pt", f"bytes={len(full) // 2}-") in server.requests
    assert_same_files(source, target, "embed")
    assert leftovers(target) == []


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_cut_connection_is_resumed_within_the_run(source, server, tmp_path, downloader):
    target = tmp_path / "dictionaries"
    url_path = f"/tree/{MODEL}/mlp_out_layer4/{SET}/ae.pt"
    server.cut_once.add(url_path)
    result = run_script(server, target, "--layers", "mlp_out_layer4", downloader=downloader)
    assert result.returncode == 0, result.stderr
    ranges = [byte_range for path, byte_range in server.requests if path == url_path]
    half = len(source_file(source, "mlp_out_layer4", "ae.pt").read_bytes()) // 2
    assert len(ranges) == 2 and ranges[1] == f"bytes={half}-", ranges
    assert "resuming" in result.stderr
    assert_same_files(source, target, "mlp_out_layer4")
    assert leftovers(target) == []


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_complete_part_file_is_finished(source, server, tmp_path, downloader):
    """A run killed between the last byte and the rename leaves a complete .part."""
    target = tmp_path / "dictionaries"
    part = target / MODEL / "embed" / SET / "ae.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(source_file(source, "embed", "ae.pt").read_bytes())
    result = run_script(server, target, "--layers", "embed", downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert_same_files(source, target, "embed")
    assert leftovers(target) == []


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_failed_transfer_keeps_its_part_for_the_next_run(source, server, tmp_path, downloader):
    target = tmp_path / "dictionaries"
    url_path = f"/tree/{MODEL}/embed/{SET}/ae.pt"
    server.cut_once.add(url_path)
    result = run_script(server, target, "--layers", "embed", downloader=downloader, env={"DL_ATTEMPTS": "1"})
    assert result.returncode == 1
    assert "re-run the same command to resume" in result.stderr
    half = source_file(source, "embed", "ae.pt").stat().st_size // 2
    dest = target / MODEL / "embed" / SET / "ae.pt"
    assert not dest.exists() and Path(f"{dest}.part").stat().st_size == half
    result = run_script(server, target, "--layers", "embed", downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert server.requests[-2][1] == f"bytes={half}-"  # ae.pt resumed, then config.json
    assert_same_files(source, target, "embed")


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_server_without_range_support_restarts_the_file(source, server, tmp_path, downloader):
    server.support_ranges = False
    target = tmp_path / "dictionaries"
    full = source_file(source, "embed", "ae.pt").read_bytes()
    part = target / MODEL / "embed" / SET / "ae.pt.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(full[:1000])
    result = run_script(server, target, "--layers", "embed", downloader=downloader)
    assert result.returncode == 0, result.stderr
    assert_same_files(source, target, "embed")
    assert leftovers(target) == []


@needs_downloader
def test_complete_files_are_not_fetched_again(source, server, tmp_path):
    target = tmp_path / "dictionaries"
    assert run_script(server, target, "--layers", "embed").returncode == 0
    assert run_script(server, target).returncode == 0  # everything, through the zip
    server.requests.clear()
    for args in (["--layers", "embed"], []):
        result = run_script(server, target, *args)
        assert result.returncode == 0, result.stderr
        assert "have" in result.stdout
    assert server.requests == []
    assert sites_on_disk(target) == set(SITES)


@pytest.mark.parametrize("downloader", DOWNLOADERS)
def test_http_404_fails_with_the_url(server, tmp_path, downloader):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, "--set", "99_32768", "--layers", "embed", downloader=downloader)
    assert result.returncode == 1
    assert f"HTTP 404 for {server.url}/tree/{MODEL}/embed/99_32768/ae.pt" in result.stderr
    assert [p for p in target.rglob("*") if p.is_file()] == []


@needs_downloader
def test_missing_zip_fails_with_the_url(server, tmp_path):
    result = run_script(server, tmp_path / "dictionaries", "--set", "99_32768", "--source", "hf")
    assert result.returncode == 1
    assert f"HTTP 404 for {server.url}/hf/dictionaries_{MODEL}_99.zip" in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--bogus"], "unknown option '--bogus'"),
        (["extra"], "unknown option 'extra'"),
        (["--layers", "7"], "unknown layer '7' in --layers"),
        (["--layers", "embed,mlp"], "unknown layer 'mlp' in --layers"),
        (["--kinds", "ffn"], "unknown kind 'ffn' in --kinds"),
        (["--source", "s3"], "unknown --source 's3'"),
        (["--expect-shape", "512"], "--expect-shape '512' must be D,F"),
        (["--steps", "last"], "--steps 'last' must be comma-separated"),
        (["--set"], "option --set needs a value"),
    ],
)
def test_bad_arguments_fail_before_any_download(server, tmp_path, args, message):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, *args)
    assert result.returncode == 1
    assert message in result.stderr
    assert server.requests == [] and not target.exists()


def test_missing_downloader_is_reported(server, tmp_path):
    env = {"PATH": path_without(tmp_path, "curl", "wget")}
    result = run_script(server, tmp_path / "dictionaries", env=env)
    assert result.returncode == 1
    assert "neither curl nor wget is installed" in result.stderr
    env["DL_DOWNLOADER"] = "wget"
    result = run_script(server, tmp_path / "dictionaries", env=env)
    assert result.returncode == 1
    assert "DL_DOWNLOADER=wget but wget is not installed" in result.stderr


@needs_downloader
def test_wrong_shape_fails_the_check(server, tmp_path):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, "--layers", "embed", verify=True)  # expects 512 x 32768 for 10_32768
    assert result.returncode == 1
    assert "has activation dim 16 and 64 latents; expected 512 and 32768" in result.stderr
    assert "failed the check" in result.stderr


@needs_downloader
def test_without_python_torch_the_check_is_skipped_with_a_warning(source, server, tmp_path):
    target = tmp_path / "dictionaries"
    result = run_script(server, target, "--layers", "embed", "--python", "false", verify=True)
    assert result.returncode == 0, result.stderr
    assert "no python with torch found" in result.stderr
    size = f"{source_file(source, 'embed', 'ae.pt').stat().st_size / 1024:.1f} KiB"
    assert re.search(rf"^embed\s+ae\.pt\s+-\s+{size}$", result.stdout, flags=re.M), result.stdout
    assert_same_files(source, target, "embed")


def test_checker_reports_each_kind_of_bad_file(tmp_path, capsys, load_script):
    verify_download = load_script("verify_download")
    site_dir = tmp_path / MODEL / "embed" / SET
    site_dir.mkdir(parents=True)
    (site_dir / "config.json").write_text("{}")
    argv = ["--root", str(tmp_path / MODEL), "--set", SET, "--expect-shape", f"{D},{F}", "embed"]

    torch.save(random_autoencoder_state(0), site_dir / "ae.pt")
    assert verify_download.main(argv) == 0
    assert re.search(r"embed\s+ae\.pt\s+16 x 64", capsys.readouterr().out)

    assert verify_download.main(argv[:5] + ["any", "embed"]) == 0
    capsys.readouterr()

    state = random_autoencoder_state(0)
    del state["bias"]
    torch.save(state, site_dir / "ae.pt")
    assert verify_download.main(argv) == 1
    assert "(missing ['bias'])" in capsys.readouterr().err

    state = random_autoencoder_state(0)
    state["decoder.weight"] = torch.zeros(D, F + 1)
    torch.save(state, site_dir / "ae.pt")
    assert verify_download.main(argv[:5] + ["any", "embed"]) == 1
    assert "decoder.weight has shape [16, 65], expected [16, 64]" in capsys.readouterr().err

    torch.save(random_autoencoder_state(0), site_dir / "ae.pt")
    data = (site_dir / "ae.pt").read_bytes()
    (site_dir / "ae.pt").write_bytes(data[: len(data) // 2])
    assert verify_download.main(argv) == 1
    assert "does not load with torch.load" in capsys.readouterr().err

    torch.save(random_autoencoder_state(0), site_dir / "ae.pt")
    (site_dir / "config.json").write_text("{not json")
    assert verify_download.main(argv) == 1
    assert "config.json: is not valid JSON" in capsys.readouterr().err

    (site_dir / "config.json").unlink()
    assert verify_download.main(argv) == 1
    assert "config.json: missing" in capsys.readouterr().err


def test_help_documents_the_environment():
    result = subprocess.run(["bash", str(SCRIPT), "--help"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0
    for word in ("DL_HF_BASE_URL", "DL_TREE_BASE_URL", "DL_DOWNLOADER", "--steps", "--expect-shape", "checkpoints/"):
        assert word in result.stdout


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_script_passes_shellcheck():
    result = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout
