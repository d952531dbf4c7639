"""Resolve the MODEL setting to files on disk, without importing torch.

Runs in the worker's parent process before the pool forks (torch must not be
imported there), so a bad MODEL stops the worker with one clear line instead
of a crash loop in every child.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

#: What ENGINE accepts.
ENGINES = ("auto", "torch", "llama.cpp")


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
    if model.startswith(("/", ".", "~")) or model.endswith(".gguf") or model.count("/") != 1:
        raise ModelLoadError(f"MODEL={model!r}: no such file or folder, and not a Hub id like 'Qwen/Qwen1.5-0.5B-Chat'")
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


def _download_from_hub(repo_id: str) -> Path:
    # huggingface_hub comes with transformers and does not import torch.
    from huggingface_hub import snapshot_download

    try:
        return Path(
            snapshot_download(
                repo_id,
                allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"],
            )
        )
    except Exception as err:  # network, auth, missing repo: all mean "cannot load"
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ModelLoadError(
            f"MODEL={repo_id!r} could not be fetched from the Hugging Face Hub ({type(err).__name__}: "
            f"{reason[:200]}); without internet, set MODEL to a local model folder or .gguf file"
        ) from None
