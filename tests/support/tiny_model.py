"""Build a tiny Qwen2-architecture chat model for tests: random weights, a
byte-level BPE tokenizer trained here, ChatML template. Nothing is downloaded.

Its text is gibberish; it exists so tests can drive the production loading
and generation code end to end in seconds.
"""

from __future__ import annotations

from pathlib import Path

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


def build_tiny_qwen(dest: Path, *, vocab_size: int = 800, seed: int = 0) -> Path:
    """Write a tiny Qwen2 model + tokenizer to ``dest`` and return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)

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
    fast.save_pretrained(dest)

    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(fast),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        eos_token_id=fast.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=fast.convert_tokens_to_ids("<|endoftext|>"),
        bos_token_id=None,
    )
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(dest)
    return dest


if __name__ == "__main__":  # pragma: no cover - manual helper
    import sys

    print(build_tiny_qwen(Path(sys.argv[1])))
