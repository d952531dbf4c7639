"""Scores of any words at a prompt's answer position: the prompt bench's instrument (worker/bench/prompts.py)."""

from __future__ import annotations

import torch

from worker.engine.qwen import QwenEngine, load_model, output_rows
from worker.model_source import ModelSource


class WordScorer:
    """The output-layer score of each word at the answer position of a prompt: one uncached pass."""

    def __init__(self, engine: QwenEngine, words: list[str], rows_by_id: dict[int, torch.Tensor]):
        self.engine = engine
        self.word_ids = {word: engine.tokenizer.encode(word, add_special_tokens=False)[0] for word in words}
        self.matrix = torch.stack([rows_by_id[self.word_ids[word]] for word in self.word_ids])

    def scores(self, messages: list[dict[str, str]]) -> dict[str, float]:
        ids = self.engine.encode_chat(messages)
        with torch.inference_mode(), self.engine.precision(precise=True):
            hidden = self.engine.model.base_model(torch.tensor([ids])).last_hidden_state[0, -1].float()
        return dict(zip(self.word_ids, (self.matrix @ hidden).tolist()))

    @classmethod
    def load(cls, source: ModelSource, words: list[str], dtype: str, threads: int | None = None) -> WordScorer:
        model, tokenizer = load_model(source, dtype, threads)
        ids = {tokenizer.encode(word, add_special_tokens=False)[0] for word in words}
        rows_by_id = output_rows(model, sorted(ids))  # before int8 quantizes the output layer
        return cls(QwenEngine.from_model(model, tokenizer, source.model_id, dtype), words, rows_by_id)
