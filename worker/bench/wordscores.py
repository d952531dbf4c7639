"""Scores of any words at a prompt's answer position: the prompt bench's instrument (worker/bench/prompts.py)."""

from __future__ import annotations

from worker.engine.chat import ChatFormat, HFTokenizer
from worker.engine.interface import SequenceModel
from worker.engine.model_source import ModelSource


class WordScorer:
    """The output-layer score of each word at the answer position of a prompt: one uncached pass."""

    def __init__(self, model: SequenceModel, chat: ChatFormat, words: list[str]):
        self.model = model
        self.chat = chat
        self.words = words
        # A word is scored on its first token, as the service scores its label words.
        self.token_ids = chat.first_token_ids(words)

    def scores(self, messages: list[dict[str, str]]) -> dict[str, float]:
        ids = self.chat.encode_chat(messages)
        sequences = self.model.new_sequences(1, len(ids))
        scores = sequences.extend([(0, ids)]).scores(self.token_ids)[0]
        return dict(zip(self.words, scores.tolist()))

    @classmethod
    def load(cls, source: ModelSource, words: list[str], dtype: str, threads: int | None = None) -> WordScorer:
        from worker.engine.memory import release_freed_memory
        from worker.engine.torch_model import build_sequence_model, load_model

        hf_model, tokenizer = load_model(source, dtype, threads)
        chat = ChatFormat(HFTokenizer(tokenizer), source.model_id, hf_model.generation_config.eos_token_id)
        model = build_sequence_model(hf_model, dtype, sorted(set(chat.first_token_ids(words))), threads or 0)
        del hf_model
        release_freed_memory()
        return cls(model, chat, words)
