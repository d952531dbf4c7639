"""The torch side of ``python -m worker.tune``: load the model for training, train, score, export.

``Tuner`` holds the float32 (or bfloat16) decoder, the classifier prompt of
one label set and a ``TrainableClassifier`` (trainable.py) with the trainable
parameters. The command line, the data split and the progress bar live in
worker/tune.py; nothing here reads files other than the model.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from jobqueue.labels import LABEL_SETS
from worker.engine.adapter import DEEP_PREFIX, LORA, LORA_TARGETS, TECHNIQUES, lora_tensor_names
from worker.engine.chat import ChatFormat, HFTokenizer
from worker.engine.decoder import Qwen2Decoder
from worker.engine.trainable import TrainableClassifier, real_token_prefix
from worker.engine.torch_model import load_model, model_identity
from worker.engine.model_source import ModelSource



@dataclass(frozen=True)
class Recipe:
    """How an adapter is trained; recorded in its manifest. Defaults are the shipped recipe (EVAL.md)."""

    technique: str = LORA
    prefix_tokens: int = 16
    lora_rank: int = 8
    epochs: int = 1
    batch_size: int = 16
    learning_rate: float = 1e-3
    seed: int = 0
    dtype: str = "float32"


@dataclass(frozen=True)
class Example:
    #: Token ids after the classifier prompt's shared prefix: the text, then the assistant header.
    ids: list[int]
    #: Index in the label set.
    gold: int


@dataclass(frozen=True)
class Step:
    """Progress after one optimizer step."""

    step: int
    steps: int
    loss: float
    #: Share right among the training rows seen so far in this epoch (before their update).
    running_accuracy: float


class Tuner:
    def __init__(self, source: ModelSource, labels: str, prompt_variant: str, recipe: Recipe, threads: int = 0):
        if recipe.technique not in TECHNIQUES:
            raise ValueError(f"technique {recipe.technique!r} is not one of {TECHNIQUES}")
        if recipe.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"dtype {recipe.dtype!r}: training runs in float32 or bfloat16")
        torch.manual_seed(recipe.seed)
        hf_model, tokenizer = load_model(source, "float32", threads or None)
        self.recipe, self.labels = recipe, labels
        self.chat = ChatFormat(HFTokenizer(tokenizer), source.model_id, hf_model.generation_config.eos_token_id)
        if labels in self.chat.unavailable_label_sets:
            raise ValueError(self.chat.unavailable_label_sets[labels])
        self.prompt_variant = prompt_variant
        self.system = self.chat.classifier_messages("x", labels, prompt_variant)[:1]
        self.prompt_ids = self.chat.prefix_ids(self.system)
        label_ids = self.chat.label_token_ids[labels]
        label_rows = hf_model.get_output_embeddings().weight[label_ids]       # (labels, hidden)
        with torch.no_grad():
            decoder = Qwen2Decoder(hf_model, recipe.dtype).eval()
        del hf_model
        prefix = None
        if recipe.technique == DEEP_PREFIX:
            start = (self.prompt_ids * recipe.prefix_tokens)[: recipe.prefix_tokens]
            prefix = real_token_prefix(decoder, start)
        self.classifier = TrainableClassifier(decoder, self.prompt_ids, label_rows, prefix)
        if recipe.technique == LORA:
            _add_lora(self.classifier.decoder, recipe.lora_rank)
        self.trainable = [p for p in self.classifier.parameters() if p.requires_grad]

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.trainable)

    def example(self, text: str, gold: int) -> Example:
        ids = self.chat.encode_chat(self.chat.classifier_messages(text, self.labels, self.prompt_variant))
        assert ids[: len(self.prompt_ids)] == self.prompt_ids
        return Example(ids[len(self.prompt_ids):], gold)

    def train(self, examples: list[Example], on_step: Callable[[Step], None] | None = None) -> None:
        """``recipe.epochs`` passes over ``examples``, class-balanced loss, AdamW with a linear decay."""
        recipe = self.recipe
        rng = random.Random(recipe.seed)
        counts = np.bincount([e.gold for e in examples], minlength=len(LABEL_SETS[self.labels]))
        weights = torch.tensor(len(examples) / (len(counts) * np.maximum(counts, 1)), dtype=torch.float32)
        steps = recipe.epochs * -(-len(examples) // recipe.batch_size)
        optimizer = torch.optim.AdamW(self.trainable, lr=recipe.learning_rate, weight_decay=0.0)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 - step / max(steps, 1))
        self.classifier.train()
        step = 0
        for _ in range(recipe.epochs):
            seen = right = 0
            for batch in _batches(examples, recipe.batch_size, rng):
                gold = torch.tensor([e.gold for e in batch])
                scores = self.classifier([e.ids for e in batch])                      # (B, labels)
                loss = F.cross_entropy(scores, gold, weight=weights)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                seen += len(batch)
                right += int((scores.argmax(dim=-1) == gold).sum())
                if on_step is not None:
                    on_step(Step(step, steps, loss.item(), right / seen))
        self.classifier.eval()

    @torch.no_grad()
    def predict(self, examples: list[Example], batch_size: int = 32) -> list[int]:
        """The label index each example gets (argmax: the adapter's threshold is 0.5)."""
        predicted = [0] * len(examples)
        order = sorted(range(len(examples)), key=lambda i: len(examples[i].ids))
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            scores = self.classifier([examples[i].ids for i in chunk])  # (B, labels)
            for i, label in zip(chunk, scores.argmax(dim=-1).tolist()):
                predicted[i] = label
        return predicted

    def accuracy(self, examples: list[Example]) -> float:
        predicted = self.predict(examples)
        return sum(p == e.gold for p, e in zip(predicted, examples)) / max(len(examples), 1)

    def tensors(self) -> dict[str, np.ndarray]:
        """The adapter's tensors as the file holds them (adapter.py): the prefix, or LoRA's a and b."""
        if self.recipe.technique == DEEP_PREFIX:
            return {"prefix.keys": _numpy(self.classifier.keys), "prefix.values": _numpy(self.classifier.values)}
        tensors = {}
        for index, layer in enumerate(self.classifier.decoder.layers):
            for target in LORA_TARGETS:
                peft_layer = getattr(layer, target).inner
                a = peft_layer.lora_A["default"].weight                                # (rank, in)
                b = peft_layer.lora_B["default"].weight * peft_layer.scaling["default"]  # (out, rank)
                a_name, b_name = lora_tensor_names(index, target)
                tensors[a_name], tensors[b_name] = _numpy(a), _numpy(b)
        return tensors

    def manifest(self) -> dict:
        """What the adapter was trained for: the keys the engine checks (adapter.check_fits), and the recipe."""
        return {
            "technique": self.recipe.technique,
            "model": model_identity(self.classifier.decoder),
            "tokenizer_sha256": self.chat.tokenizer.vocabulary_sha256(),
            "labels": self.labels,
            "label_words": list(LABEL_SETS[self.labels]),
            "label_token_ids": self.chat.label_token_ids[self.labels],
            "classifier_prompt": self.system[0]["content"],
            "classifier_prompt_variant": self.prompt_variant,
            "positive_threshold": 0.5,
            "recipe": asdict(self.recipe),
        }


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return tensor.detach().float().numpy().copy()


def _batches(examples: list[Example], size: int, rng: random.Random) -> Iterator[list[Example]]:
    """Shuffled batches of similar lengths (little padding): shuffle, sort within pools of 32 batches."""
    order = list(examples)
    rng.shuffle(order)
    pool = size * 32
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda e: len(e.ids))
        batches += [chunk[i:i + size] for i in range(0, len(chunk), size)]
    rng.shuffle(batches)
    yield from batches


def _add_lora(decoder: Qwen2Decoder, rank: int) -> None:
    """LoRA (PEFT) on every projection: each FloatLinear becomes a frozen nn.Linear that PEFT wraps."""
    from peft import LoraConfig, inject_adapter_in_model

    for layer in decoder.layers:
        for name in LORA_TARGETS:
            old = getattr(layer, name)
            linear = torch.nn.Linear(old.weight.shape[1], old.weight.shape[0], bias=old.bias is not None,
                                     dtype=old.weight.dtype)
            linear.weight = torch.nn.Parameter(old.weight, requires_grad=False)  # (out, in)
            if old.bias is not None:
                linear.bias = torch.nn.Parameter(old.bias, requires_grad=False)  # (out,)
            setattr(layer, name, _Float32Out(linear))
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0,
                                       target_modules=[f"{name}.inner" for name in LORA_TARGETS]), decoder)


class _Float32Out(torch.nn.Module):
    """An nn.Linear in the weights' dtype with float32 activations in and out, as FloatLinear has."""

    def __init__(self, inner: torch.nn.Linear):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.to(self.inner.weight.dtype)).float()
