"""A GGUF model's own tokenizer, through llama.cpp, behind chat.py's ``Tokenizer`` protocol.

The llama.cpp engine tokenizes with the vocabulary the model file carries and
renders its chat template with Jinja (as transformers does), so it loads in
well under a second and needs neither transformers nor torch. The shared
engine suite checks that it gives the same ids as the Hugging Face tokenizer.
"""

from __future__ import annotations

import ctypes
import json
from datetime import datetime
from functools import lru_cache

import jinja2
import llama_cpp
from jinja2.sandbox import ImmutableSandboxedEnvironment


class LlamaVocab:
    """Tokenize and detokenize with a loaded llama.cpp model's vocabulary."""

    def __init__(self, model):
        self._model = model  # the llama_model pointer; its owner keeps it alive
        self._vocab = llama_cpp.llama_model_get_vocab(model)
        template = llama_cpp.llama_model_chat_template(model, None)
        self.chat_template = template.decode("utf-8") if template else None
        eos = llama_cpp.llama_vocab_eos(self._vocab)
        self.eos_token_id = eos if eos >= 0 else None
        self.vocabulary_size = llama_cpp.llama_vocab_n_tokens(self._vocab)

    def render_chat(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        return _compiled(self.chat_template).render(messages=messages, add_generation_prompt=add_generation_prompt)

    def encode_template(self, text: str) -> list[int]:
        return self._tokenize(text, parse_special=True)

    def encode_text(self, text: str) -> list[int]:
        return self._tokenize(text, parse_special=False)

    def decode(self, ids: list[int]) -> str:
        # Byte-level pieces: a character may span tokens, so join the bytes first.
        return b"".join(self._piece(i) for i in ids).decode("utf-8", errors="replace")

    def token_id(self, token: str) -> int | None:
        ids = self._tokenize(token, parse_special=True)
        return ids[0] if len(ids) == 1 else None

    def _tokenize(self, text: str, *, parse_special: bool) -> list[int]:
        data = text.encode("utf-8")
        room = len(data) + 8  # byte-level BPE: never more tokens than bytes
        buffer = (llama_cpp.llama_token * room)()
        count = llama_cpp.llama_tokenize(self._vocab, data, len(data), buffer, room, False, parse_special)
        if count < 0:
            raise ValueError(f"text of {len(data)} bytes tokenizes to {-count} tokens, more than expected")
        return buffer[:count]

    def _piece(self, token: int) -> bytes:
        buffer = ctypes.create_string_buffer(64)
        size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        if size < 0:  # a longer piece than the buffer: ask again with room for it
            buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(self._vocab, token, buffer, len(buffer), 0, False)
        return buffer.raw[:size]


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


@lru_cache(maxsize=4)
def _compiled(template: str) -> jinja2.Template:
    """The chat template in the environment transformers renders it in (same options, same helpers)."""
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    environment.filters["tojson"] = _tojson
    return environment.from_string(template)
