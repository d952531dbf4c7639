"""Scores of any words at a prompt's answer position: the prompt bench's instrument (worker/bench/prompts.py)."""

from __future__ import annotations

import torch

from worker.engine.qwen import QwenEngine, first_token_ids, load_model, output_rows
from worker.model_source import ModelSource


class WordScorer:
    """The output-layer score of each word at the answer position of a prompt: one uncached pass."""

    def __init__(self, engine: QwenEngine, rows: dict[str, torch.Tensor]):
        self.engine = engine
        self.words = list(rows)
        self.matrix = torch.stack(list(rows.values()))

    def scores(self, messages: list[dict[str, str]]) -> dict[str, float]:
        ids = self.engine.encode_chat(messages)
        with torch.inference_mode(), self.engine.precision(precise=True):
            hidden = self.engine.model.base_model(torch.tensor([ids])).last_hidden_state[0, -1].float()
        return dict(zip(self.words, (self.matrix @ hidden).tolist()))

    @classmethod
    def load(cls, source: ModelSource, words: list[str], dtype: str, threads: int | None = None) -> WordScorer:
        model, tokenizer = load_model(source, dtype, threads)
        # A word is scored on its first token, as the service scores its label words.
        ids = first_token_ids(tokenizer, words)
        rows = output_rows(model, ids)  # before int8 quantizes the output layer
        engine = QwenEngine.from_model(model, tokenizer, source.model_id, dtype)
        return cls(engine, {word: rows[token_id] for word, token_id in zip(words, ids)})
