"""Resolve the MODEL setting to files on disk, without importing torch.

Runs in the worker's parent process before the pool forks (torch must not be
imported there), so a bad MODEL stops the worker with one clear line instead
of a crash loop in every child.

MODEL is, in this order:

- a local ``.gguf`` file or model folder (a name that exists on disk always wins);
- ``org/repo:TAG``: the GGUF file of that quantisation (``q4_k_m``, ``Q8_0``, any case) in a
  Hub repository, such as ``Qwen/Qwen2.5-0.5B-Instruct-GGUF:q4_k_m``;
- ``org/repo/path/file.gguf``: that GGUF file of a Hub repository;
- ``org/repo``: a Hub repository in the Hugging Face folder layout (the torch engine's).

Hub files are downloaded once, with a progress bar, into the Hugging Face cache (``HF_HOME``,
``HF_HUB_CACHE``), and read from there without asking the Hub again; with ``HF_HUB_OFFLINE=1``
only the cache is read.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

#: What ENGINE accepts.
ENGINES = ("auto", "torch", "llama.cpp")

log = logging.getLogger("qwen_allinone.worker")

_HUB_PART = r"[A-Za-z0-9][\w.-]*"
#: ``org/repo``, ``org/repo:TAG`` or ``org/repo/path/file.gguf``.
_HUB_NAME = re.compile(
    rf"^(?P<repo>{_HUB_PART}/{_HUB_PART})(?::(?P<tag>[\w.-]+)|/(?P<file>(?:[\w.-]+/)*[\w.-]+\.gguf))?$"
)
#: The parts of one GGUF file split in shards: ``name-00001-of-00003.gguf``.
_SHARD = re.compile(r"-\d{5}-of-\d{5}(?=\.gguf$)")
_HUB_FORMS = "'org/repo', 'org/repo:q4_k_m' or 'org/repo/file.gguf'"


class ModelLoadError(RuntimeError):
    """The model named by MODEL cannot be loaded; the message names the setting."""


@dataclass(frozen=True)
class ModelSource:
    #: What the user configured (a Hub id or a path); reported in job records.
    model_id: str
    #: Local folder holding config/tokenizer files (or the .gguf file).
    folder: Path
    #: File name inside ``folder`` when loading a GGUF file, else None.
    gguf_file: str | None = None


@dataclass(frozen=True)
class HubName:
    """MODEL read as a Hugging Face Hub name (``parse_hub_name``)."""

    repo_id: str
    #: ``org/repo:TAG``: the quantisation tag, as written.
    tag: str | None = None
    #: ``org/repo/path/file.gguf``: the file's path in the repository.
    filename: str | None = None

    @property
    def is_gguf(self) -> bool:
        return self.tag is not None or self.filename is not None


def parse_hub_name(model: str) -> HubName | None:
    """MODEL as a Hub name, or None when it cannot be one (a path, a stray ``.gguf`` name)."""
    match = _HUB_NAME.match(model)
    if match is None or (match["tag"] is None and match["file"] is None and model.endswith(".gguf")):
        return None
    return HubName(match["repo"], match["tag"], match["file"])


def resolve_model_source(model: str) -> ModelSource:
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"MODEL={model!r} is a file but not a .gguf file")
        return ModelSource(model_id=model, folder=path.parent, gguf_file=path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"MODEL={model!r} is a folder without config.json: not a model folder")
        return ModelSource(model_id=model, folder=path)
    name = parse_hub_name(model)
    if name is None:
        raise ModelLoadError(f"MODEL={model!r}: no such file or folder, and not a Hub name like {_HUB_FORMS}")
    if name.is_gguf:
        gguf = _gguf_from_hub(model, name)
        return ModelSource(model_id=model, folder=gguf.parent, gguf_file=gguf.name)
    return ModelSource(model_id=model, folder=_download_from_hub(model))


def llama_cpp_installed() -> bool:
    """Whether the ``[llama]`` extra is installed (found without importing it)."""
    return importlib.util.find_spec("llama_cpp") is not None


def choose_engine(setting: str, source: ModelSource) -> str:
    """ENGINE resolved: "auto" runs a GGUF file on llama.cpp when it is installed, anything else on torch."""
    if setting not in ENGINES:
        raise ModelLoadError(f"ENGINE={setting!r} is not one of {list(ENGINES)}")
    if setting == "auto":
        return "llama.cpp" if source.gguf_file and llama_cpp_installed() else "torch"
    if setting == "llama.cpp":
        if not llama_cpp_installed():
            raise ModelLoadError("ENGINE=llama.cpp needs llama-cpp-python: pip install -e '.[llama]' (README, Set up)")
        if source.gguf_file is None:
            raise ModelLoadError(f"ENGINE=llama.cpp runs a .gguf file, and MODEL={source.model_id!r} is a folder")
    return setting


# --- GGUF files on the Hub -------------------------------------------------------


def hub_offline() -> bool:
    """HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set: only the cache is read."""
    from huggingface_hub import constants

    flags = (os.environ.get("HF_HUB_OFFLINE"), os.environ.get("TRANSFORMERS_OFFLINE"))
    return constants.HF_HUB_OFFLINE or any((flag or "").upper() in {"1", "ON", "YES", "TRUE"} for flag in flags)


def _gguf_from_hub(model: str, name: HubName) -> Path:
    """The local path of MODEL's GGUF file (its first shard, if split), downloaded once into the cache."""
    from huggingface_hub.errors import HFValidationError

    try:
        files = [name.filename] if name.filename is not None else _files_for_tag(model, name.repo_id, name.tag)
        return [_hub_file(model, name.repo_id, file) for file in files][0]
    except HFValidationError as err:
        raise ModelLoadError(f"MODEL={model!r}: not a valid Hub repository name ({_short(err)})") from None
    except ModelLoadError as err:
        if name.filename is None:
            raise
        raise ModelLoadError(f"{err}; nor is it a local file") from None


def _files_for_tag(model: str, repo_id: str, tag: str) -> list[str]:
    """The repository's GGUF file of quantisation ``tag`` (any case): all its shards, first shard first.

    A file already in the cache is used without asking the Hub; otherwise the Hub lists the repository
    (offline, or when it cannot be reached, the cache's files are all there is)."""
    cached = _cached_repo_files(repo_id)
    found = _tagged(model, tag, cached or [])
    if found and _complete(found):
        return found
    files, where = _repo_files(model, repo_id, cached)
    found = _tagged(model, tag, files)
    if not found:
        ggufs = [Path(f).name for f in files if f.endswith(".gguf")]
        listed = ", ".join(ggufs[:12]) + (", ..." if len(ggufs) > 12 else "") if ggufs else "none"
        raise ModelLoadError(f"MODEL={model!r}: no .gguf file tagged {tag!r} in {where}; its .gguf files: {listed}")
    return found


def _tagged(model: str, tag: str, files: list[str]) -> list[str]:
    """The files of ``files`` that are the GGUF of ``tag``; several different ones are an error."""
    ends_with_tag = re.compile(rf"(?:^|[-_.]){re.escape(tag.lower())}(?:-\d{{5}}-of-\d{{5}})?\.gguf$")
    found = sorted(f for f in files if ends_with_tag.search(Path(f).name.lower())
                   and not Path(f).name.lower().startswith("mmproj"))  # a vision projector, not the model
    distinct = sorted({_SHARD.sub("", f) for f in found})
    if len(distinct) > 1:
        raise ModelLoadError(f"MODEL={model!r}: several .gguf files are tagged {tag!r} ({', '.join(distinct)}); "
                             f"name one as MODEL=org/repo/<file>")
    return found


def _complete(found: list[str]) -> bool:
    """One file, or every shard of a split one."""
    shards = re.search(r"-of-(\d{5})\.gguf$", found[0])
    return len(found) == (int(shards[1]) if shards else 1)


def _repo_files(model: str, repo_id: str, cached: list[str] | None) -> tuple[list[str], str]:
    """The repository's files and where they were listed: the Hub, or, offline or when it cannot be
    reached, the cache (which holds only the files downloaded so far)."""
    reason = "HF_HUB_OFFLINE=1"
    if not hub_offline():
        from huggingface_hub import HfApi
        from huggingface_hub.errors import RepositoryNotFoundError

        try:
            return HfApi().list_repo_files(repo_id), "the repository"
        except RepositoryNotFoundError as err:
            raise ModelLoadError(_not_on_the_hub(model, err)) from None
        except Exception as err:  # the network, the Hub's own errors: the cache may still have it
            reason = _short(err)
    if cached is None:
        raise ModelLoadError(_unreachable(model, reason))
    return cached, f"the Hugging Face cache, and the hub is unreachable ({reason})"


def _cached_repo_files(repo_id: str) -> list[str] | None:
    """The files of the cached snapshot that ``refs/main`` names, or None when the cache has none."""
    from huggingface_hub import constants, scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir(constants.HF_HUB_CACHE)  # read now: tests and tools may point it elsewhere
    except CacheNotFound:
        return None
    for repo in cache.repos:
        if repo.repo_id == repo_id and repo.repo_type == "model":
            for revision in repo.revisions:
                if "main" in revision.refs:
                    return sorted(file.file_path.relative_to(revision.snapshot_path).as_posix()
                                  for file in revision.files)
    return None


def _hub_file(model: str, repo_id: str, filename: str) -> Path:
    """One file of the repository: from the cache, else downloaded into it (with a progress bar)."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError

    cached = try_to_load_from_cache(repo_id, filename)
    if isinstance(cached, str):
        return Path(cached)
    if hub_offline():
        raise ModelLoadError(_unreachable(model, "HF_HUB_OFFLINE=1"))
    log.info("MODEL=%r: downloading %s from %s into the Hugging Face cache", model, filename, repo_id)
    try:
        return Path(hf_hub_download(repo_id, filename))
    except LocalEntryNotFoundError as err:  # the Hub could not be reached
        raise ModelLoadError(_unreachable(model, _short(err))) from None
    except RepositoryNotFoundError as err:
        raise ModelLoadError(_not_on_the_hub(model, err)) from None
    except EntryNotFoundError:
        raise ModelLoadError(f"MODEL={model!r}: the repository {repo_id!r} has no file {filename!r}") from None
    except Exception as err:  # the network, disk space, the Hub's own errors
        raise ModelLoadError(f"MODEL={model!r}: {filename!r} could not be downloaded ({_short(err)})") from None


def _unreachable(model: str, reason: str) -> str:
    return f"MODEL={model!r}: not in the Hugging Face cache and the hub is unreachable ({reason})"


def _not_on_the_hub(model: str, err: Exception) -> str:
    from huggingface_hub.errors import GatedRepoError

    if isinstance(err, GatedRepoError):
        return f"MODEL={model!r}: a gated repository on the Hugging Face Hub: accept its terms there and set HF_TOKEN"
    return f"MODEL={model!r}: no such repository on the Hugging Face Hub (a private one needs HF_TOKEN)"


def _short(err: Exception) -> str:
    """An exception as one short line."""
    reason = str(err).splitlines()[0] if str(err) else ""
    return f"{type(err).__name__}: {reason[:200]}" if reason else type(err).__name__


# --- model folders on the Hub ------------------------------------------------------


def _download_from_hub(repo_id: str) -> Path:
    # huggingface_hub comes with transformers and does not import torch.
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
                # huggingface_hub reads HF_HUB_OFFLINE once, at import: asked here, a setting made
                # later (a test, an embedding program) is honoured too.
                local_files_only=hub_offline(),
            )
        )
    except Exception as err:  # network, auth, missing repo: all mean "cannot load"
        raise ModelLoadError(
            f"MODEL={repo_id!r} could not be fetched from the Hugging Face Hub ({_short(err)}); "
            f"without internet, set MODEL to a local model folder or .gguf file"
        ) from None
