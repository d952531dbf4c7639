"""Worker settings: everything the producer knows, plus the model and its limits.

Read from environment variables when the Celery app is created (``worker.app``),
never at import time. Each field has one row in docs/settings.md's table.
"""

from __future__ import annotations

import os
from typing import Literal

from pydantic import Field, model_validator

from jobqueue.protocol import MAX_NEW_TOKENS_LIMIT, MAX_TEMPERATURE
from jobqueue.settings import QueueSettings
from worker.engine.generation import DEFAULT_NO_COPY_NGRAM, DEFAULT_REPETITION_WINDOW, ReplyControls
from worker.engine.model_source import llama_cpp_installed
from worker.engine.prompts import DEFAULT_CLASSIFIER_PROMPT, DEFAULT_POSITIVE_THRESHOLD, DEFAULT_REPLY_PROMPT, REPLY_PROMPTS

#: The model the original single-process demo used: a Hugging Face folder, run on the torch engine.
DEFAULT_MODEL = "Qwen/Qwen1.5-0.5B-Chat"
#: The default once the [llama] extra is installed: the original's model in Qwen's official GGUF form, in
#: Q4_K_M, downloaded once into the Hugging Face cache (issue 32). Its 16 key/value heads take 8 times the
#: cache per token of Qwen2.5-0.5B's 2 (docs/engines.md says how to choose that one instead).
DEFAULT_GGUF_MODEL = "Qwen/Qwen1.5-0.5B-Chat-GGUF:q4_k_m"


def default_model() -> str:
    """MODEL when unset: the GGUF for the llama.cpp engine when it is installed, else the original's folder."""
    return DEFAULT_GGUF_MODEL if llama_cpp_installed() else DEFAULT_MODEL


def available_cores() -> int:
    """Cores this process may run on (respects taskset and container cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


class WorkerSettings(QueueSettings):
    #: A local .gguf file or model folder, or a Hub name: org/repo:q4_k_m or org/repo/file.gguf (a GGUF
    #: file), org/repo (a model folder); see worker/engine/model_source.py.
    model: str = Field(default_factory=default_model)
    #: Weights on the CPU: int8 (dynamic int8 linear layers; the default, chosen by
    #: measurement in BENCHMARKS.md), bfloat16 or float32.
    dtype: Literal["float32", "bfloat16", "int8"] = "int8"
    #: Which engine runs the model: auto (llama.cpp for a .gguf file when the [llama]
    #: extra is installed, torch otherwise), torch or llama.cpp.
    engine: Literal["auto", "torch", "llama.cpp"] = "auto"
    #: Compute threads of either engine; 0 = every core this process may use.
    torch_threads: int = Field(0, ge=0)
    #: llama.cpp's key/value cache holds BATCH_MAX times this many tokens beyond the fixed
    #: prompt prefixes; a batch that needs more runs in waves that fit.
    kv_tokens_per_job: int = Field(1024, ge=64)
    #: Classifier instructions: a variant name from worker/engine/prompts.py (EVAL.md compares them).
    classifier_prompt: str = DEFAULT_CLASSIFIER_PROMPT
    #: Two-class sets answer positive when its probability is at least this (tuned in EVAL.md).
    positive_threshold: float = Field(DEFAULT_POSITIVE_THRESHOLD, gt=0.0, lt=1.0)
    #: A classifier adapter file from ``python -m worker.tune``: its label set is decided with
    #: the adapter (and the adapter's own threshold); the reply never sees it. Torch engine only.
    classifier_adapter: str | None = None
    #: Reply instructions: a variant name from worker/engine/prompts.py (EVAL.md compares them).
    reply_prompt: str = DEFAULT_REPLY_PROMPT
    #: The repetition penalty of replies; unset: the model's generation config's, else 1.2 (EVAL.md).
    #: 1.0 turns it off.
    repetition_penalty: float | None = Field(None, ge=1.0, le=2.0)
    #: The penalty covers this many of the latest tokens, prompt included; 0 = the whole prompt and reply.
    repetition_window: int = Field(DEFAULT_REPETITION_WINDOW, ge=0)
    #: A reply never repeats an n-gram of this many tokens; 0 = no such rule.
    no_repeat_ngram: int = Field(0, ge=0, le=32)
    #: A reply never copies an n-gram of this many tokens from the job's own text (or history); 0 = no
    #: such rule. It stops echoes that the penalty alone let through (EVAL.md).
    no_copy_ngram: int = Field(DEFAULT_NO_COPY_NGRAM, ge=0, le=32)
    #: Sampled replies draw from the top k words; unset: the model's generation config's, else 20; 0 = all.
    top_k: int | None = Field(None, ge=0)
    #: ... and from the likeliest words holding this much probability; unset: the config's, else 0.8;
    #: 1.0 = all.
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    #: Reply length when the job does not say.
    max_new_tokens: int = Field(128, ge=1, le=MAX_NEW_TOKENS_LIMIT)
    #: Sampling temperature when the job does not say; 0 = greedy.
    temperature: float = Field(0.7, ge=0.0, le=MAX_TEMPERATURE)
    #: Earlier turns of a conversation are kept within this many prompt tokens, oldest dropped first.
    history_max_tokens: int = Field(1024, ge=0)
    #: At most this many earlier turns are stored per conversation.
    history_max_turns: int = Field(16, ge=0)
    #: Jobs served together: when more wait in the queue, a worker takes up to this many
    #: and runs them as one batch (BENCHMARKS.md measures it); 1 turns batching off.
    batch_max: int = Field(8, ge=1, le=64)
    #: Under load (the previous batch had more than one job), wait at most this long for
    #: more jobs to arrive; after a batch of one, a fifth of it.
    batch_wait_ms: float = Field(50.0, ge=0, le=1000)
    #: A decoding batch takes waiting jobs into its free rows for this long after it starts
    #: (continuous batching); 0 = a batch is only the jobs that start together. The hard time
    #: limit grows by it: the last joiner may run a whole JOB_TIMEOUT_S after the window.
    join_window_s: float = Field(30.0, ge=0)
    #: A running job's record gets its reply-so-far at most this often; 0 = only the final reply.
    partial_reply_interval_ms: float = Field(250.0, ge=0)
    #: Celery's hard time limit is job_timeout_s plus this (plus join_window_s); a job killed by it
    #: is ``timed_out``.
    time_limit_grace_s: float = Field(10.0, gt=0)
    #: A process that holds queue messages refreshes its heartbeat four times in this
    #: period; once it lapses (the process died), its messages go back to the queue.
    liveness_ttl_s: float = Field(10.0, ge=1)
    #: Each worker's parent runs the reconciler this often (one worker at a time sweeps).
    reconcile_interval_s: float = Field(3.0, gt=0)
    #: Sentiments (and greedy replies without history) are cached in Redis this long, for the
    #: same inputs; 0 turns the cache off.
    cache_ttl_s: int = Field(3600, ge=0)
    #: ``tenant``: a cached result answers only the tenant (API key) whose job computed it, so no
    #: tenant learns what another sent; ``global``: every tenant shares the entries.
    cache_scope: Literal["tenant", "global"] = "tenant"
    #: A word list (one term a line): a job whose text holds a term gets SAFETY_MESSAGE as its
    #: reply, without generating one, and so does a reply that holds one. Unset: no filter.
    safety_words_file: str | None = None
    safety_message: str = Field("抱歉，这个话题我不能回复。", min_length=1)
    #: A bulk job that has waited this long joins the end of the interactive lane, so a steady
    #: stream of interactive jobs cannot starve bulk ones (the reconciler moves it).
    bulk_max_wait_s: float = Field(60.0, gt=0)
    #: The last resort behind liveness: a message fetched but not acknowledged is
    #: redelivered after this long whatever else happened.
    visibility_timeout_s: int = Field(3600, ge=1)

    @model_validator(mode="after")
    def _known_reply_prompt(self) -> WorkerSettings:
        if self.reply_prompt not in REPLY_PROMPTS:
            raise ValueError(f"REPLY_PROMPT={self.reply_prompt!r} is not one of {sorted(REPLY_PROMPTS)}")
        if self.no_repeat_ngram == 1:
            raise ValueError("NO_REPEAT_NGRAM must be 0 (off) or at least 2: 1 would forbid every token used once")
        if self.no_copy_ngram == 1:
            raise ValueError("NO_COPY_NGRAM must be 0 (off) or at least 2: 1 would forbid every token of the text")
        return self

    @property
    def reply_controls(self) -> ReplyControls:
        return ReplyControls(self.repetition_penalty, self.repetition_window, self.no_repeat_ngram,
                             self.no_copy_ngram, self.top_k, self.top_p)

    @model_validator(mode="after")
    def _visibility_outlasts_time_limit(self) -> WorkerSettings:
        # Otherwise Redis would hand a still-running job to a second worker.
        if self.visibility_timeout_s <= self.hard_time_limit_s:
            raise ValueError(
                f"VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}) must be longer than the hard "
                f"time limit JOB_TIMEOUT_S + TIME_LIMIT_GRACE_S + JOIN_WINDOW_S ({self.hard_time_limit_s:g})"
            )
        return self

    @model_validator(mode="after")
    def _records_outlive_open_jobs(self) -> WorkerSettings:
        # Otherwise a job's record could expire while the job is still queued or running,
        # and its client would get "not found" for a job that still runs.
        if self.result_ttl_s <= self.longest_open_s:
            raise ValueError(
                f"RESULT_TTL_S ({self.result_ttl_s}) must be longer than the longest time a job can stay "
                f"open: QUEUE_TIMEOUT_S + JOB_TIMEOUT_S + TIME_LIMIT_GRACE_S + JOIN_WINDOW_S + VISIBILITY_TIMEOUT_S "
                f"({self.longest_open_s:g} s)"
            )
        return self

    @property
    def longest_open_s(self) -> float:
        """Waiting, then running to the hard limit, then redelivered after a dead worker's visibility timeout."""
        return self.queue_timeout_s + self.hard_time_limit_s + self.visibility_timeout_s

    @property
    def hard_time_limit_s(self) -> float:
        """Celery's limit for a whole batch: its last joiner joins at most join_window_s in."""
        return self.job_timeout_s + self.time_limit_grace_s + self.join_window_s

    @property
    def shutdown_drain_s(self) -> float:
        """A warm shutdown ends the running batch within this: it takes no more joiners, and every
        row's deadline is at most JOB_TIMEOUT_S away (the grace covers a pass in flight)."""
        return self.job_timeout_s + self.time_limit_grace_s

    @property
    def broker_heartbeat_s(self) -> int:
        """AMQP heartbeat (whole seconds, as AMQP counts them). RabbitMQ gives a silent connection up
        after two to three missed heartbeats (measured: 27 to 30 s at 10 s), so a third of
        LIVENESS_TTL_S hands a dead or cut-off worker's jobs back within about LIVENESS_TTL_S."""
        return max(1, round(self.liveness_ttl_s / 3))

    @property
    def threads(self) -> int:
        return self.torch_threads or available_cores()
