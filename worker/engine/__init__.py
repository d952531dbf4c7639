"""The model engine: the ONLY package that imports torch, transformers and llama.cpp.

Importing this package imports no torch: it names the engine boundary
(``interface.py``) and its plain dataclasses (``results.py``). ``load_engine``
imports the chosen engine when it is called, inside the worker's pool process.

- ``qwen.py``: ``QwenEngine``, the two jobs over any ``SequenceModel``;
- ``chat.py``: prompts as token ids (engine-neutral);
- ``generation.py``: sampling and the batched decode loop;
- ``torch_model.py``, ``decoder.py``, ``weights.py``: the torch engine's model,
  its lean Qwen2 forward pass and its weight formats;
- ``llama_model.py``, ``llama_vocab.py``: the llama.cpp engine's model and
  tokenizer, on a GGUF file (the optional ``[llama]`` extra).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from worker.engine.interface import Engine, SequenceModel
from worker.engine.results import EngineInfo, ReplyRequest, ReplyResult, SentimentResult, StopReason

if TYPE_CHECKING:
    from worker.engine.model_source import ModelSource

__all__ = ["Engine", "EngineInfo", "ReplyRequest", "ReplyResult", "SentimentResult", "SequenceModel", "StopReason",
           "load_engine"]


def load_engine(source: ModelSource, dtype: str = "int8", threads: int | None = None, *, engine: str = "auto",
                **options) -> Engine:
    """The engine for MODEL: ``engine`` is "torch", "llama.cpp" or "auto" (model_source.choose_engine).

    ``options`` go to it: prompt_variant and positive_threshold to both;
    kv_cache_tokens and max_rows size llama.cpp's context.
    """
    from worker.engine.qwen import QwenEngine
    from worker.engine.model_source import choose_engine

    return QwenEngine.load(source, dtype, threads, engine=choose_engine(engine, source), **options)
