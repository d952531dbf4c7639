"""Random-weight Qwen2 models: the published shapes for benchmarks, a tiny one for tests.

Nothing is downloaded. The tokenizer is a byte-level BPE trained here on a few
hundred lines with the ChatML special tokens and template, so prompts and chat
formatting work exactly as with a real Qwen chat model; the text is gibberish.
A shaped model's compute and memory match the real model (hidden size, layers,
heads, KV heads, intermediate size, vocabulary of 151,936).
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

#: Published configurations (config.json of each model on the Hugging Face Hub), and a tiny one for tests.
SHAPES = {
    "qwen1.5-0.5b": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=16,
                         num_key_value_heads=16, vocab_size=151936, rope_theta=1_000_000.0,
                         max_position_embeddings=32768),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, rope_theta=1_000_000.0,
                         max_position_embeddings=32768),
    # Heads of 32: llama.cpp's q8_0 key/value cache (blocks of 32) runs in the tests as in production.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=None, max_position_embeddings=4096),
}

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

_SEED_LINES = [
    "很快，好吃，味道足，量大",
    "送餐太慢了，等了两个小时，菜都凉了",
    "服务很好，下次还会再来",
    "太难吃了，再也不点了",
    "正面 负面 中性 情感 判断 回复",
    "positive negative neutral sentiment reply",
    # The label words at line starts (no leading space, as the classifier's answer
    # begins), so each becomes one token, as in Qwen's own vocabulary.
    *[f"{word}，{word}" for word in ("正面", "负面", "中性", "positive", "negative", "neutral") for _ in range(3)],
    "The delivery was fast and the food was great.",
    "Terrible service, the soup was cold and late.",
    "你是一个情感分析助手。请判断用户文本的情感。",
    "You are a helpful, empathetic assistant.",
    "def main():\n    return 42",
    "<html><body>hello</body></html>",
    "我今天很开心！😄 I am so happy today!",
    "system user assistant",
]


def training_lines(repeat: int = 30) -> list[str]:
    """A few hundred lines of mixed Chinese/English/code text."""
    lines = []
    for i in range(repeat):
        for line in _SEED_LINES:
            lines.append(f"{line} {i}")
    return lines


def build_chatml_tokenizer(vocab_size: int = 800) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(training_lines(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def build_random_qwen(shape: str, dest: Path, *, seed: int = 0, tie_word_embeddings: bool = True) -> Path:
    """Save a random-weight Qwen2 model of ``shape`` (a key of SHAPES) and its tokenizer into ``dest``."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tokenizer = build_chatml_tokenizer()
    tokenizer.save_pretrained(dest)
    dims = dict(SHAPES[shape])
    dims["vocab_size"] = dims["vocab_size"] or len(tokenizer)
    torch.manual_seed(seed)
    config = Qwen2Config(
        **dims,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(dest)
    return dest
