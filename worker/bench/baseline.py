"""The ORIGINAL single-process pipeline, re-created as the benchmark's reference.

As the original write-up describes it: float32 weights, nothing cached,
``generate(max_new_tokens=10)`` with a "冷酷的情感分析师 … 仅输出'正面'或'负面'"
system prompt and a substring search for the label, then a second
``generate`` with the chat template for the reply (sampling, temperature 0.7).
The wording of the system prompt (the "original" CLASSIFIER_PROMPT variant) is
reconstructed from the write-up's quote.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from worker.engine.model_source import ModelSource
from worker.engine.prompts import classifier_prompt

ORIGINAL_CLASSIFIER_PROMPT = classifier_prompt("zh", "original")


@dataclass(frozen=True)
class BaselineTiming:
    label: str | None  # None when neither label word appears in the generated text
    sentiment_ms: float
    reply_ms: float
    reply_tokens: int

    @property
    def total_ms(self) -> float:
        return self.sentiment_ms + self.reply_ms


class OriginalPipeline:
    def __init__(self, source: ModelSource, threads: int):
        torch.set_num_threads(threads)
        kwargs = {"gguf_file": source.gguf_file} if source.gguf_file else {}
        self.tokenizer = AutoTokenizer.from_pretrained(source.folder, **kwargs)
        self.model = AutoModelForCausalLM.from_pretrained(source.folder, dtype=torch.float32, **kwargs).eval()

    def _prompt(self, messages) -> torch.Tensor:
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer(text, return_tensors="pt").input_ids

    @torch.inference_mode()
    def sentiment(self, text: str) -> str | None:
        """The original decision: generate up to 10 tokens, then look for a label word in them."""
        ids = self._prompt([{"role": "system", "content": ORIGINAL_CLASSIFIER_PROMPT},
                            {"role": "user", "content": text}])
        out = self.model.generate(ids, max_new_tokens=10, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        answer = self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
        return "正面" if "正面" in answer else "负面" if "负面" in answer else None

    @torch.inference_mode()
    def run(self, text: str, reply_tokens: int) -> BaselineTiming:
        started = time.perf_counter()
        label = self.sentiment(text)
        sentiment_ms = 1000 * (time.perf_counter() - started)

        started = time.perf_counter()
        ids = self._prompt([{"role": "user", "content": text}])
        # The reply length is fixed on both sides of a comparison, so like is compared with like.
        out = self.model.generate(ids, max_new_tokens=reply_tokens, min_new_tokens=reply_tokens, do_sample=True,
                                  temperature=0.7,
                                  pad_token_id=self.tokenizer.pad_token_id or self.tokenizer.eos_token_id)
        reply_ms = 1000 * (time.perf_counter() - started)
        return BaselineTiming(label, sentiment_ms, reply_ms, out.shape[1] - ids.shape[1])
