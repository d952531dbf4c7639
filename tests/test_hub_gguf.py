"""MODEL=org/repo:TAG and MODEL=org/repo/file.gguf: GGUF files named on the Hugging Face Hub.

Nothing here reaches the network. Every test runs against a Hugging Face cache it lays out itself
(models--org--repo/blobs, snapshots/<commit>/<file>, refs/main, as huggingface_hub writes it), with
HF_HOME pointing at it and HF_HUB_OFFLINE=1, and with sockets refused; the online path talks to a
stand-in for huggingface_hub's HfApi.list_repo_files and hf_hub_download.
"""

from __future__ import annotations

import hashlib
import os
import socket
from pathlib import Path

import pytest

from jobqueue.protocol import JobStatus
from tests.conftest import require_llama_cpp, start_worker
from worker.engine.model_source import ModelLoadError, choose_engine, resolve_model_source
from worker.settings import DEFAULT_GGUF_MODEL

COMMIT = "0123456789abcdef0123456789abcdef01234567"
UNREACHABLE = "not in the Hugging Face cache and the hub is unreachable (HF_HUB_OFFLINE=1)"


def lay_out_cache(hub: Path, repo_id: str, files: dict[str, bytes], commit: str = COMMIT) -> Path:
    """``files`` in the cache as huggingface_hub writes a download: blobs, snapshot links, refs/main."""
    repo = hub / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, content in files.items():
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(content)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return repo / "snapshots" / commit


def _refuse_network(monkeypatch) -> None:
    def refuse(*args, **kwargs):
        raise AssertionError(f"a test tried to reach the network: {args!r}")

    original = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return original(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def hub(tmp_path, monkeypatch) -> Path:
    """An empty Hugging Face cache under HF_HOME, offline, with the network refused; its hub folder."""
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    # huggingface_hub reads these once, at its import: this process imported it long ago.
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _refuse_network(monkeypatch)
    return home / "hub"


@pytest.fixture
def quantised_repo(hub, tiny_gguf) -> Path:
    """org/repo with the tiny model in two quantisations (the same bytes), a split one and a vision projector."""
    weights = tiny_gguf.read_bytes()
    return lay_out_cache(hub, "org/repo", {
        "tiny-q8_0.gguf": weights,
        "tiny-Q4_K_M.gguf": weights + b"\0",
        "split/tiny-IQ4_XS-00001-of-00002.gguf": weights,
        "split/tiny-IQ4_XS-00002-of-00002.gguf": b"rest",
        "mmproj-tiny-f16.gguf": b"projector",
        "README.md": b"# tiny",
    })


@pytest.mark.parametrize(("model", "expected"), [
    ("org/repo:q8_0", "tiny-q8_0.gguf"),
    ("org/repo:Q8_0", "tiny-q8_0.gguf"),
    ("org/repo:q4_k_m", "tiny-Q4_K_M.gguf"),
    ("org/repo:iq4_xs", "split/tiny-IQ4_XS-00001-of-00002.gguf"),  # the first shard: llama.cpp finds the rest
    ("org/repo/tiny-q8_0.gguf", "tiny-q8_0.gguf"),
    ("org/repo/split/tiny-IQ4_XS-00001-of-00002.gguf", "split/tiny-IQ4_XS-00001-of-00002.gguf"),
])
def test_a_hub_name_resolves_to_the_cached_gguf_file(quantised_repo, model, expected):
    source = resolve_model_source(model)
    assert source.folder / source.gguf_file == quantised_repo / expected
    assert source.model_id == model  # what job records report
    assert (source.folder / source.gguf_file).read_bytes()[:4] == b"GGUF"
    assert choose_engine("torch", source) == "torch"  # a GGUF like any other: ENGINE decides
    if _llama_installed():
        assert choose_engine("auto", source) == "llama.cpp"


def test_the_default_model_names_the_official_gguf_file(hub, tiny_gguf):
    # The file name Qwen publishes the Q4_K_M quantisation under, beside its siblings.
    snapshot = lay_out_cache(hub, "Qwen/Qwen1.5-0.5B-Chat-GGUF", {
        f"qwen1_5-0_5b-chat-{tag}.gguf": tiny_gguf.read_bytes() for tag in ("q4_0", "q4_k_m", "q5_k_m", "q8_0")
    })
    source = resolve_model_source(DEFAULT_GGUF_MODEL)
    assert source.folder / source.gguf_file == snapshot / "qwen1_5-0_5b-chat-q4_k_m.gguf"


@pytest.mark.parametrize(("model", "message"), [
    # An unknown tag names the files there are; q4_k is not q4_k_m, and a projector is not a model.
    ("org/repo:q4_k", "MODEL='org/repo:q4_k': no .gguf file tagged 'q4_k' in the Hugging Face cache, and the hub "
                      "is unreachable (HF_HUB_OFFLINE=1); its .gguf files: mmproj-tiny-f16.gguf, tiny-IQ4_XS-00001"),
    ("org/repo:f16", "MODEL='org/repo:f16': no .gguf file tagged 'f16'"),
    ("org/repo/tiny-q2_k.gguf", f"MODEL='org/repo/tiny-q2_k.gguf': {UNREACHABLE}; nor is it a local file"),
    ("org/missing:q4_k_m", f"MODEL='org/missing:q4_k_m': {UNREACHABLE}"),
    ("org/missing/model.gguf", f"MODEL='org/missing/model.gguf': {UNREACHABLE}; nor is it a local file"),
])
def test_an_unknown_tag_file_or_repo_is_one_line_naming_model(quantised_repo, model, message):
    with pytest.raises(ModelLoadError) as raised:
        resolve_model_source(model)
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)


def test_offline_with_an_empty_cache_is_one_line_naming_model(hub):
    assert not hub.exists()
    with pytest.raises(ModelLoadError) as raised:
        resolve_model_source("org/repo:q4_k_m")
    assert str(raised.value) == f"MODEL='org/repo:q4_k_m': {UNREACHABLE}"


def test_a_local_folder_or_file_wins_over_a_hub_name(quantised_repo, tiny_model_dir, tiny_gguf, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "repo:q8_0").symlink_to(tiny_model_dir, target_is_directory=True)
    (tmp_path / "org" / "repo").mkdir()
    (tmp_path / "org" / "repo" / "tiny-q8_0.gguf").symlink_to(tiny_gguf)
    folder = resolve_model_source("org/repo:q8_0")
    assert (folder.folder, folder.gguf_file) == (Path("org/repo:q8_0"), None)
    local = resolve_model_source("org/repo/tiny-q8_0.gguf")
    assert (local.folder, local.gguf_file) == (Path("org/repo"), "tiny-q8_0.gguf")


@pytest.mark.parametrize("model", ["models/tiny.gguf", "/no/such/file.gguf", "./org/repo:q4_k_m", "a/b:c:d"])
def test_names_that_cannot_be_on_the_hub_are_refused_without_asking_it(hub, model):
    with pytest.raises(ModelLoadError, match=r"no such file or folder, and not a Hub name like"):
        resolve_model_source(model)


class FakeHub:
    """huggingface_hub's list_repo_files and hf_hub_download, over a dict of repositories."""

    def __init__(self, hub: Path, repos: dict[str, dict[str, bytes]]):
        self.hub, self.repos, self.downloads, self.listings = hub, repos, [], 0

    def list_repo_files(self, repo_id: str, **_) -> list[str]:
        from huggingface_hub.errors import RepositoryNotFoundError

        self.listings += 1
        if repo_id not in self.repos:
            raise RepositoryNotFoundError("404 Client Error", response=_response(404))
        return sorted(self.repos[repo_id])

    def hf_hub_download(self, repo_id: str, filename: str, **_) -> str:
        self.downloads.append((repo_id, filename))
        content = self.repos[repo_id][filename]
        return str(lay_out_cache(self.hub, repo_id, {filename: content}) / filename)


def _response(status: int):
    # The HTTP client huggingface_hub's errors carry a response of (httpx, or its successor httpx2).
    from huggingface_hub.errors import HfHubHTTPError

    client = next(base for base in HfHubHTTPError.__mro__ if base.__name__ == "HTTPError").__module__.split(".")[0]
    http = __import__(client)
    return http.Response(status, request=http.Request("GET", "https://huggingface.co/api/models/x"))


@pytest.fixture
def online_hub(hub, tiny_gguf, monkeypatch) -> FakeHub:
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake = FakeHub(hub, {"org/remote": {"model-Q8_0.gguf": tiny_gguf.read_bytes(), "model-Q4_0.gguf": b"GGUF4"}})
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


def test_online_a_tag_is_downloaded_once_into_the_cache(online_hub):
    first = resolve_model_source("org/remote:q8_0")
    assert online_hub.downloads == [("org/remote", "model-Q8_0.gguf")]
    again = resolve_model_source("org/remote:q8_0")  # a restart: the cache answers, the Hub is not asked
    assert again == first and online_hub.downloads == [("org/remote", "model-Q8_0.gguf")]
    assert online_hub.listings == 1
    assert first.folder == online_hub.hub / "models--org--remote" / "snapshots" / COMMIT


def test_online_an_unknown_tag_or_repo_names_model(online_hub):
    with pytest.raises(ModelLoadError, match=r"^MODEL='org/remote:q6_k': no \.gguf file tagged 'q6_k' in the "
                                             r"repository; its \.gguf files: model-Q4_0\.gguf, model-Q8_0\.gguf$"):
        resolve_model_source("org/remote:q6_k")
    with pytest.raises(ModelLoadError, match=r"^MODEL='org/gone:q8_0': no such repository on the Hugging Face Hub"):
        resolve_model_source("org/gone:q8_0")
    assert online_hub.downloads == []


def _llama_installed() -> bool:
    from worker.engine.model_source import llama_cpp_installed

    return llama_cpp_installed()


# --- a real worker, offline, on a test-made cache ---------------------------------------


def _offline_env(worker_env: dict[str, str], home: Path, model: str) -> dict[str, str]:
    # HF_ENDPOINT on a closed local port as well: a request that slipped through would fail at once.
    return {**worker_env, "MODEL": model, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1",
            "HF_ENDPOINT": "http://127.0.0.1:9", "BATCH_MAX": "2", "KV_TOKENS_PER_JOB": "256"}


@pytest.mark.slow
def test_a_worker_runs_a_hub_name_from_the_cache_on_llama_cpp(worker_env, tiny_gguf, tmp_path, make_client):
    require_llama_cpp()
    home = tmp_path / "hf-home"
    lay_out_cache(home / "hub", "org/tiny-GGUF", {"tiny-q8_0.gguf": tiny_gguf.read_bytes()})
    worker = start_worker("worker.app", tmp_path / "hub.log", _offline_env(worker_env, home, "org/tiny-GGUF:Q8_0"),
                          name="hub-gguf")
    try:
        client = make_client()
        record = client.wait(client.submit("送餐太慢了", max_new_tokens=4, temperature=0), timeout=60)
        assert record.status is JobStatus.SUCCEEDED, record.error
        assert record.model_id == "org/tiny-GGUF:Q8_0"
        assert "engine=llama.cpp" in worker.log()
    finally:
        worker.stop()


@pytest.mark.slow
def test_a_worker_offline_without_the_file_stops_with_one_line(worker_env, tmp_path):
    worker = start_worker("worker.app", tmp_path / "offline.log",
                          _offline_env(worker_env, tmp_path / "empty-home", "org/tiny-GGUF:q4_k_m"),
                          wait_loaded=False, name="hub-offline")
    try:
        assert worker.process.wait(60) != 0
    finally:
        worker.stop()
    assert f"qwen-allinone worker: cannot start: MODEL='org/tiny-GGUF:q4_k_m': {UNREACHABLE}\n" in worker.log()
    assert "Traceback" not in worker.log()
