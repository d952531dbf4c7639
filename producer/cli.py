"""Command line: ``qwen-allinone submit|get|wait|run|cancel|submit-file|eval|eval-replies`` (also ``python -m producer``).

Exit codes: 0 job succeeded (or submitted/found/cancelled), 1 job ended failed/timed_out/
expired/cancelled (or its record is unreadable), 2 invalid input or setting, 3 job not found,
4 queue full or broker unreachable, 5 wait timed out, 6 nothing to cancel (the job had ended).
"""

from __future__ import annotations

import argparse
import json
import sys

from producer.client import Client
from pydantic import ValidationError

from jobqueue import cancel
from jobqueue.errors import (
    AlreadyFinal,
    BrokerUnavailable,
    InvalidRequest,
    JobNotFound,
    ProducerError,
    QueueFull,
    WaitTimeout,
)
from jobqueue.protocol import LABEL_SETS, JobRecord, JobStatus, describe_validation_error

EXIT_JOB_FAILED, EXIT_INVALID, EXIT_NOT_FOUND, EXIT_UNAVAILABLE, EXIT_WAIT_TIMEOUT = 1, 2, 3, 4, 5
EXIT_ALREADY_FINAL = 6


def sentiment_line(record: JobRecord) -> str:
    sentiment = record.sentiment
    assert sentiment is not None
    labels = record.request.options.labels if record.request else "zh"
    face = dict(zip(LABEL_SETS[labels], ("😄", "😞", "😐"))).get(sentiment.label, "🙂")
    return f"{face} LLM 情感判断: {sentiment.label} (confidence {sentiment.confidence:.2f})"


def format_record(record: JobRecord) -> str:
    lines = [f"job:     {record.job_id}", f"status:  {record.status.value}"]
    if record.queue_position is not None:
        eta = "" if record.eta_s is None else f", about {record.eta_s:.0f} s"
        lines.append(f"queue:   #{record.queue_position} in line{eta}")
    if record.sentiment:
        lines.append(sentiment_line(record) + ("  [cached]" if record.sentiment.cached else ""))
    if record.reply is not None:
        suffix = f"  [cut short: {record.stop_reason}]" if record.truncated else ""
        suffix += "  [cached]" if record.reply_cached else ""
        lines.append(f"🤖 reply: {record.reply}{suffix}")
    if record.flagged:
        lines.append(f"flagged: input {record.flagged.input or '-'} · reply {record.flagged.reply or '-'}")
    if record.error:
        lines.append(f"error:   {record.error.code.value}: {record.error.message}")
    t = record.timings
    steps = [("queue", t.queue_wait_ms), ("sentiment", t.sentiment_ms), ("reply", t.reply_ms), ("total", t.total_ms)]
    shown = [f"{name} {ms:.0f} ms" for name, ms in steps if ms is not None]
    if shown:
        lines.append("timings: " + " · ".join(shown))
    if record.tokens.generated_tokens is not None:
        lines.append(
            f"tokens:  prompt {record.tokens.reply_prompt_tokens} · generated {record.tokens.generated_tokens}"
        )
    if record.worker:
        lines.append(f"worker:  {record.worker} ({record.model_id})")
    return "\n".join(lines)


def _print_record(record: JobRecord, as_json: bool) -> None:
    print(record.to_json() if as_json else format_record(record))


def _final_exit_code(record: JobRecord) -> int:
    return 0 if record.status is JobStatus.SUCCEEDED else EXIT_JOB_FAILED


def _submit(client: Client, args: argparse.Namespace) -> str:
    return client.submit(
        args.text,
        conversation_id=args.conversation_id,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
        temperature=args.temperature,
        labels=args.labels,
        priority=args.priority,
        callback_url=args.callback_url,
        idempotency_key=args.idempotency_key,
    )


def cmd_submit(client: Client, args: argparse.Namespace) -> int:
    job_id = _submit(client, args)
    print(json.dumps({"job_id": job_id}) if args.json else job_id)
    return 0


def cmd_get(client: Client, args: argparse.Namespace) -> int:
    record = client.get(args.job_id)
    if record is None:
        raise JobNotFound(args.job_id)
    _print_record(record, args.json)
    return 0


def cmd_wait(client: Client, args: argparse.Namespace) -> int:
    record = client.wait(args.job_id, timeout=args.timeout)
    _print_record(record, args.json)
    return _final_exit_code(record)


def cmd_run(client: Client, args: argparse.Namespace) -> int:
    job_id = _submit(client, args)
    if not args.json:
        print(f"job {job_id} queued", file=sys.stderr)
    shown_status, shown_sentiment, record = JobStatus.QUEUED, False, None
    for record in client.watch(job_id, timeout=args.timeout):
        if args.json:
            continue
        if record.status is not shown_status and not record.status.is_final:
            print(f"job {job_id} {record.status.value}", file=sys.stderr)
            shown_status = record.status
        if record.sentiment and not shown_sentiment:
            # Shown as soon as the worker knows it, before the reply exists.
            print(sentiment_line(record), flush=True)
            shown_sentiment = True
    assert record is not None
    if args.json:
        print(record.to_json())
    else:
        if record.reply is not None:
            suffix = f"  [cut short: {record.stop_reason}]" if record.truncated else ""
            print(f"🤖 {record.reply}{suffix}")
        if record.status is not JobStatus.SUCCEEDED:
            print(format_record(record), file=sys.stderr)
    return _final_exit_code(record)


def cmd_cancel(client: Client, args: argparse.Namespace) -> int:
    try:
        record = client.cancel(args.job_id)
    except AlreadyFinal as err:
        print(str(err), file=sys.stderr)
        _print_record(err.record, args.json)
        return EXIT_ALREADY_FINAL
    if not args.json:
        print(cancel.describe(args.job_id, record), file=sys.stderr)
    _print_record(record, args.json)
    return 0


def cmd_eval(client: Client, args: argparse.Namespace) -> int:
    from pathlib import Path

    from producer.evaluate import balanced_sample, format_summary, read_rows, run_eval, summarize, write_report

    rows = read_rows(Path(args.file), args.text_column, args.label_column, args.domain_column)
    if args.domain:
        rows = [row for row in rows if row.domain == args.domain]
        if not rows:
            raise InvalidRequest(f"--domain {args.domain!r}: no row of {args.file} has it in column "
                                 f"{args.domain_column!r}")
    if args.limit:
        rows = balanced_sample(rows, args.limit, args.seed)
    predictions = run_eval(client, rows, args.labels, args.concurrency, args.reply_tokens)
    summary = summarize(predictions, args.labels)
    write_report(Path(args.report), summary, predictions)
    print(format_summary(summary))
    print(f"\nper-row predictions and confidences: {args.report}")
    return 0


def cmd_eval_replies(client: Client, args: argparse.Namespace) -> int:
    from pathlib import Path

    from producer.reply_eval import SHIPPED_PROMPTS, run_reply_eval, write_replies
    from producer.reply_scores import format_tables, per_kind, read_prompts, summarize

    items = read_prompts(Path(args.prompts) if args.prompts else SHIPPED_PROMPTS)
    runs = run_reply_eval(client, items, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                          concurrency=args.concurrency)
    scores = [run.score for run in runs]
    write_replies(Path(args.out), runs)
    failed = sum(run.status != JobStatus.SUCCEEDED.value for run in runs)
    print(format_tables(summarize(scores), per_kind(scores)))
    print(f"\n{len(runs)} prompts at temperature {args.temperature:g}; failed jobs {failed}; "
          f"every reply with its scores: {args.out}")
    return 0


def cmd_submit_file(client: Client, args: argparse.Namespace) -> int:
    from pathlib import Path

    from producer.submit_file import submit_file

    options = {"labels": args.labels, "max_new_tokens": args.max_new_tokens, "temperature": args.temperature}
    counts = submit_file(client, Path(args.file), Path(args.out), args.column, options, in_flight=args.in_flight,
                         timeout=args.timeout, progress=not args.no_progress, idempotency_key=args.idempotency_key)
    print(f"{sum(counts.values())} rows in {args.out}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0 if set(counts) <= {JobStatus.SUCCEEDED.value} else EXIT_JOB_FAILED


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qwen-allinone", description="Submit texts to the qwen-allinone queue and read results."
    )
    parser.add_argument("--redis-url", help="Redis URL (default: $REDIS_URL or redis://127.0.0.1:6379/0)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("submit", help="enqueue a text; print the job id")
    _add_job_arguments(p)
    _add_output_arguments(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("get", help="print a job's current record")
    p.add_argument("job_id")
    _add_output_arguments(p)
    p.set_defaults(func=cmd_get)

    p = sub.add_parser("wait", help="wait until a job is final; print its record")
    p.add_argument("job_id")
    _add_output_arguments(p, wait=True)
    p.set_defaults(func=cmd_wait)

    p = sub.add_parser("run", help="submit and wait: sentiment first, then the reply")
    _add_job_arguments(p)
    _add_output_arguments(p, wait=True)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("cancel", help="cancel a job: a queued one never runs, a running one stops")
    p.add_argument("job_id")
    _add_output_arguments(p)
    p.set_defaults(func=cmd_cancel)

    _add_submit_file_parser(sub)
    _add_eval_parsers(sub)
    return parser


def _add_job_arguments(p: argparse.ArgumentParser) -> None:
    """The request of `submit` and `run`: the text and the job's options."""
    p.add_argument("text", help="the user's text")
    p.add_argument("--conversation-id", help="continue this conversation (its earlier turns are the history)")
    p.add_argument("--max-new-tokens", type=int, help="longest reply, in tokens (worker default 128)")
    p.add_argument("--min-new-tokens", type=int, help="shortest reply, in tokens (EOS ignored until then)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (worker default 0.7)")
    p.add_argument("--labels", choices=list(LABEL_SETS), default="zh",
                   help="zh: 正面/负面, en: positive/negative, zh3/en3: also 中性/neutral")
    p.add_argument("--priority", choices=["interactive", "bulk"], default="interactive",
                   help="bulk waits behind interactive jobs, at most BULK_MAX_WAIT_S (default interactive)")
    p.add_argument("--callback-url", help="a gateway POSTs the final record here, signed (its host must be "
                                          "in CALLBACK_ALLOWED_HOSTS)")
    p.add_argument("--idempotency-key", help="run again with the same key within RESULT_TTL_S, it answers the "
                                             "first run's job and queues no other (a retry after an error)")


def _add_output_arguments(p: argparse.ArgumentParser, wait: bool = False) -> None:
    """How a command prints (--json) and, for one that waits, for how long (--timeout)."""
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    if wait:
        p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait (default 120)")


def _add_submit_file_parser(sub) -> None:
    p = sub.add_parser("submit-file", help="every line of a CSV or text file as a bulk job; results as a CSV "
                                           "(resumable: run again with the same --out)")
    p.add_argument("file", help="a CSV (the texts in --column) or any other file (one text per line)")
    p.add_argument("--out", required=True, help="the results CSV; its sidecar <out>.jobs.jsonl holds the job ids")
    p.add_argument("--column", default="review", help="the CSV's text column (default review)")
    p.add_argument("--labels", choices=list(LABEL_SETS), default="zh")
    p.add_argument("--max-new-tokens", type=int, help="longest reply, in tokens (worker default 128)")
    p.add_argument("--temperature", type=float, help="sampling temperature, 0 = greedy (worker default 0.7)")
    p.add_argument("--in-flight", type=int, default=200, help="at most this many jobs open at once (default 200)")
    p.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds (default 3600); "
                                                                 "run again to resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--idempotency-key", help="names the run: row i's job is submitted under <key>:<i>, so a run "
                                             "again with the key within RESULT_TTL_S (to any --out) gets the same "
                                             "jobs, and a new key makes new ones (default: the file's sha256)")
    p.set_defaults(func=cmd_submit_file)


def _add_eval_parsers(sub) -> None:
    """``eval`` (labels) and ``eval-replies`` (replies): measurements through the queue."""
    p = sub.add_parser("eval", help="sentiment accuracy on a labelled CSV, through the queue")
    p.add_argument("file", help="CSV with a text column and a label column (1/0/2 or label words)")
    p.add_argument("--text-column", default="review")
    p.add_argument("--label-column", default="label")
    p.add_argument("--domain", help="only the rows of this domain (a value of --domain-column)")
    p.add_argument("--domain-column", default="cat", help="the column naming each row's domain (default cat)")
    p.add_argument("--limit", type=int, help="a balanced sample of this many rows")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample (default 0)")
    p.add_argument("--labels", choices=list(LABEL_SETS), default="zh")
    p.add_argument("--concurrency", type=int, default=2, help="jobs in flight at once (default 2)")
    p.add_argument("--reply-tokens", type=int, default=1, help="reply length per job (default 1: sentiment only)")
    p.add_argument("--report", default="eval-report.json", help="JSON report path (default eval-report.json)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("eval-replies", help="score the replies to a prompt set, through the queue")
    p.add_argument("prompts", nargs="?", help="JSON lines of {id, kind, lang, text, polarity} "
                                             "(default: the shipped set, producer/reply_prompts.jsonl)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0: greedy)")
    p.add_argument("--max-new-tokens", type=int, help="reply length cap (default: the worker's MAX_NEW_TOKENS)")
    p.add_argument("--concurrency", type=int, default=8, help="jobs in flight at once (default 8)")
    p.add_argument("--out", default="replies.jsonl", help="every reply with its scores (default replies.jsonl)")
    p.set_defaults(func=cmd_eval_replies)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with Client(args.redis_url) as client:
            return args.func(client, args)
    except InvalidRequest as err:
        print(f"invalid input: {err}", file=sys.stderr)
        return EXIT_INVALID
    except JobNotFound as err:
        print(str(err), file=sys.stderr)
        return EXIT_NOT_FOUND
    except (QueueFull, BrokerUnavailable) as err:
        print(str(err), file=sys.stderr)
        return EXIT_UNAVAILABLE
    except WaitTimeout as err:
        print(str(err), file=sys.stderr)
        return EXIT_WAIT_TIMEOUT
    except ProducerError as err:  # e.g. a record this version cannot read
        print(str(err), file=sys.stderr)
        return EXIT_JOB_FAILED
    except ValidationError as err:  # a bad environment variable
        print(f"invalid setting: {describe_validation_error(err)}", file=sys.stderr)
        return EXIT_INVALID
