"""Measure the service's replies on a prompt set, through the real queue.

``qwen-allinone eval-replies PROMPTS.jsonl`` sends every prompt as a job (so it
measures the deployed worker: its prompts, sampler and engine), scores each
reply with the model-free checks of ``reply_scores`` and writes every reply,
with its scores, to a JSON-lines file for reading by hand. The shipped set is
``producer/reply_prompts.jsonl``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from producer.client import Client
from jobqueue.errors import ProducerError
from producer.evaluate import in_threads
from producer.reply_scores import ReplyScore, score_reply

#: The prompt set shipped with the package.
SHIPPED_PROMPTS = Path(__file__).with_name("reply_prompts.jsonl")
#: The label set a prompt's sentiment is asked in, by its language.
LABELS_BY_LANG = {"zh": "zh", "en": "en"}


@dataclass(frozen=True)
class ReplyRun:
    """One prompt's job: its reply scored, and what the record said beside it."""

    score: ReplyScore
    status: str
    label: str | None
    confidence: float | None
    generated_tokens: int | None
    reply_ms: float | None
    job_id: str | None


def run_reply_eval(client: Client, items: list[dict[str, Any]], *, temperature: float, max_new_tokens: int | None,
                   concurrency: int = 2, timeout: float = 600) -> list[ReplyRun]:
    """Every prompt through the queue (bulk lane), in the order given; a failed job scores as an empty reply."""
    return in_threads(items, lambda item: _run_one(client, item, temperature, max_new_tokens, timeout),
                      concurrency, "eval-replies", "prompt")


def _run_one(client: Client, item: dict[str, Any], temperature: float, max_new_tokens: int | None,
             timeout: float) -> ReplyRun:
    job_id = None
    try:
        job_id = client.submit(item["text"], labels=LABELS_BY_LANG.get(item["lang"], "zh"),
                               max_new_tokens=max_new_tokens, temperature=temperature, priority="bulk")
        record = client.wait(job_id, timeout=timeout)
    except ProducerError as err:  # QueueFull, WaitTimeout, ...: this prompt fails, the eval goes on
        return ReplyRun(score_reply(item, "", None), type(err).__name__, None, None, None, None, job_id)
    sentiment = record.sentiment
    return ReplyRun(
        score=score_reply(item, record.reply or "", record.stop_reason),
        status=record.status.value,
        label=sentiment.label if sentiment else None,
        confidence=sentiment.confidence if sentiment else None,
        generated_tokens=record.tokens.generated_tokens,
        reply_ms=record.timings.reply_ms,
        job_id=job_id,
    )


def write_replies(path: Path, runs: list[ReplyRun]) -> None:
    """One JSON object a line: the prompt, the reply, its scores and the record's label and timings."""
    with open(path, "w", encoding="utf-8") as f:
        for run in runs:
            row = asdict(run.score) | {key: value for key, value in asdict(run).items() if key != "score"}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
