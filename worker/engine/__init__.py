"""The model engine: the ONLY package that imports torch and transformers.

``QwenEngine`` (qwen.py) serves jobs and speaks in the plain dataclasses of
``results.py``; ``baseline.py`` re-creates the original
single-process pipeline for the benchmark; ``shapes.py`` builds random-weight
models with the published Qwen shapes, so anyone can benchmark without weights.
"""

from worker.engine.qwen import DTYPES, PromptPrefix, QwenEngine
from worker.engine.results import ReplyRequest, ReplyResult, SentimentResult

__all__ = ["DTYPES", "PromptPrefix", "QwenEngine", "ReplyRequest", "ReplyResult", "SentimentResult"]
