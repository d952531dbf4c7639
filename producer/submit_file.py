"""``qwen-allinone submit-file``: every line of a file as a bulk job, its results as a CSV, resumable.

- The input is a CSV (one text per row, in ``--column``) or any other file read as one text per line.
- Every text is validated before any job is queued: one bad line (blank, too long) is reported with
  its line number and nothing is submitted (all or none).
- Jobs are submitted through the Client in chunks, keeping at most ``--in-flight`` open, so the run
  never fills the queue by itself; a full queue (MAX_QUEUE, TENANT_MAX_QUEUE) is waited out.
- Resumable: each submitted job's id goes to ``<out>.jobs.jsonl`` (the sidecar) and each finished
  row to ``<out>`` at once. Run again with the same ``--out``: rows in ``<out>`` are skipped, jobs in
  the sidecar are waited on, never submitted again. Each submit carries an idempotency key made of
  the file's sha256 (or ``--idempotency-key``, kept in the sidecar) and the row's index, so a job
  queued just before a kill (its id not yet in the sidecar) is found again rather than queued twice,
  within RESULT_TTL_S; and a second run under the same key, even to another ``--out``, gets the
  first run's jobs.
- When every row is in, ``<out>`` is rewritten in input order.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError
from tqdm import tqdm

from jobqueue.batches import READ_CHUNK, read_records, result_row
from jobqueue.errors import InvalidRequest, QueueFull, WaitTimeout
from jobqueue.protocol import IDEMPOTENCY_KEY_PATTERN, JobRecord, JobRequest, validation_problems
from producer.client import Client

#: The results file's columns: the input's line number, then the gateway's result columns.
OUT_COLUMNS = ("index", "line", "text", "status", "label", "confidence", "reply")
#: Seconds between reads of the open jobs, and after a full queue.
POLL_S = 0.5


@dataclass
class Row:
    index: int
    line: int
    text: str


@dataclass
class Run:
    """One run's state: the rows, which are written, which jobs are open."""

    rows: list[Row]
    file_sha256: str
    job_ids: dict[int, str] = field(default_factory=dict)  # index → job id (the sidecar)
    written: set[int] = field(default_factory=set)
    #: What each row's idempotency key starts with (``<prefix>:<index>``): --idempotency-key, or the file's.
    key_prefix: str = ""

    def __post_init__(self) -> None:
        self.key_prefix = self.key_prefix or f"submit-file:{self.file_sha256[:32]}"


def run_key(given: str | None, rows: int) -> str | None:
    """``--idempotency-key`` checked: its rows' keys (``<key>:<index>``) must be idempotency keys too."""
    if given is not None and not re.fullmatch(IDEMPOTENCY_KEY_PATTERN, f"{given}:{max(rows - 1, 0)}"):
        raise InvalidRequest("--idempotency-key: must be printable ASCII characters, not starting with a space, "
                             f"and at most {254 - len(str(max(rows - 1, 0)))} of them for {rows} rows "
                             "(each row's key is <key>:<index>, at most 255)")
    return given


def read_rows(path: Path, column: str) -> list[Row]:
    """The file's texts with their line numbers (CSV: the row's last physical line)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        if path.suffix.lower() != ".csv":
            return [Row(i, i + 1, line.rstrip("\r\n")) for i, line in enumerate(handle)]
        reader = csv.DictReader(handle)
        if column not in (reader.fieldnames or []):
            raise InvalidRequest(f"--column {column!r}: {path} has columns {reader.fieldnames}")
        return [Row(i, reader.line_num, record.get(column) or "") for i, record in enumerate(reader)]


def check_rows(rows: list[Row], path: Path, max_input_chars: int, options: dict) -> None:
    """Raise InvalidRequest naming every bad line (``reviews.csv:17: text: must ...``); nothing is queued."""
    problems = []
    for row in rows:
        try:
            JobRequest.model_validate({"text": row.text, "priority": "bulk", "options": options},
                                      context={"max_input_chars": max_input_chars})
        except ValidationError as err:
            problems += [f"{path.name}:{row.line}: {name}: {message}" for name, message in validation_problems(err)]
    if problems:
        shown = "\n  ".join(problems[:20]) + (f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        raise InvalidRequest(f"{len(problems)} bad line(s), nothing submitted:\n  {shown}",
                             [("text", problem) for problem in problems])


def load_state(out: Path, sidecar: Path, run: Run, key_given: bool = False) -> None:
    """Rows already in ``out`` and job ids already in the sidecar (and its run's key, unless
    ``key_given`` and then the same); ``out`` is rewritten clean (a row cut by a kill is dropped, and run again)."""
    if sidecar.exists():
        lines = [json.loads(line) for line in sidecar.read_text(encoding="utf-8").splitlines() if line.strip()]
        if lines and lines[0].get("file_sha256") != run.file_sha256:
            raise InvalidRequest(f"{sidecar} belongs to another input file (its sha256 differs); "
                                 "use another --out, or delete both files to start over")
        stored = (lines[0] if lines else {}).get("key", f"submit-file:{run.file_sha256[:32]}")
        if key_given and stored != run.key_prefix:
            raise InvalidRequest(f"--idempotency-key: {sidecar} was started under another key; resume with "
                                 "that key (or without one), or use another --out")
        run.key_prefix = stored
        run.job_ids = {entry["index"]: entry["job_id"] for entry in lines[1:]}
    elif out.exists():
        raise InvalidRequest(f"{out} exists but {sidecar} does not: not a run of this command; use another --out")
    kept = []
    if out.exists():
        with open(out, newline="", encoding="utf-8") as handle:
            for entry in csv.DictReader(handle):
                if entry.get("index", "").isdigit() and entry.get("status") and int(entry["index"]) < len(run.rows):
                    kept.append(entry)
    run.written = {int(entry["index"]) for entry in kept}
    _write_rows(out, kept)
    if not sidecar.exists():
        sidecar.write_text(json.dumps({"file_sha256": run.file_sha256, "rows": len(run.rows),
                                       "key": run.key_prefix}) + "\n", encoding="utf-8")


def _write_rows(out: Path, rows: Iterable[dict]) -> None:
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=OUT_COLUMNS, lineterminator="\n", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, out)


def _submit_some(client: Client, run: Run, todo: list[Row], open_ids: dict[str, Row], sidecar, options: dict,
                 in_flight: int) -> None:
    """Submit rows from the front of ``todo`` until ``in_flight`` jobs are open (or the queue is full)."""
    while todo and len(open_ids) < in_flight:
        row = todo[0]
        key = f"{run.key_prefix}:{row.index}"
        try:
            job_id = client.submit(row.text, priority="bulk", idempotency_key=key, **options)
        except QueueFull:
            return  # waited out: the next round tries again
        todo.pop(0)
        run.job_ids[row.index] = job_id
        open_ids[job_id] = row
        sidecar.write(json.dumps({"index": row.index, "job_id": job_id}) + "\n")
        sidecar.flush()


def _collect(client: Client, open_ids: dict[str, Row], out_handle, bar: tqdm) -> list[JobRecord | None]:
    """Write the rows of the open jobs that are final (or whose record expired); return their records."""
    finished = []
    writer = csv.DictWriter(out_handle, fieldnames=OUT_COLUMNS, lineterminator="\n", extrasaction="ignore")
    for job_id, record in list(read_records(list(open_ids), client.get_many, READ_CHUNK)):
        if record is not None and not record.status.is_final:
            continue
        row = open_ids.pop(job_id)
        entry = result_row(row.index, record)
        writer.writerow({**entry, "line": row.line, "text": row.text})
        finished.append(record)
        bar.update(1)
    out_handle.flush()
    return finished


def run_file(client: Client, run: Run, out: Path, options: dict, in_flight: int, timeout: float,
             progress: bool = True) -> dict[str, int]:
    """Submit what is not submitted, wait for what is open, write every row; the final statuses counted."""
    sidecar_path = Path(f"{out}.jobs.jsonl")
    open_ids = {job_id: run.rows[index] for index, job_id in run.job_ids.items() if index not in run.written}
    todo = [row for row in run.rows if row.index not in run.written and row.index not in run.job_ids]
    deadline = time.monotonic() + timeout
    with open(sidecar_path, "a", encoding="utf-8") as sidecar, open(out, "a", newline="", encoding="utf-8") as handle, \
            tqdm(total=len(run.rows), initial=len(run.written), unit="row", disable=not progress) as bar:
        while todo or open_ids:
            _submit_some(client, run, todo, open_ids, sidecar, options, in_flight)
            _collect(client, open_ids, handle, bar)
            if todo or open_ids:
                if time.monotonic() > deadline:
                    raise WaitTimeout(f"{len(todo) + len(open_ids)} rows", timeout, "queued or running")
                time.sleep(POLL_S)
    return finish_out(out)


def finish_out(out: Path) -> dict[str, int]:
    """Rewrite ``out`` in input order; count its rows by status."""
    with open(out, newline="", encoding="utf-8") as handle:
        rows = sorted(csv.DictReader(handle), key=lambda entry: int(entry["index"]))
    _write_rows(out, rows)
    counts: dict[str, int] = {}
    for entry in rows:
        counts[entry["status"]] = counts.get(entry["status"], 0) + 1
    return counts


def submit_file(client: Client, path: Path, out: Path, column: str, options: dict, in_flight: int = 200,
                timeout: float = 3600.0, progress: bool = True, idempotency_key: str | None = None,
                ) -> dict[str, int]:
    """The whole command: read, check, resume, run; the rows of ``out`` counted by status."""
    rows = read_rows(path, column)
    options = {name: value for name, value in options.items() if value is not None}
    check_rows(rows, path, client.settings.max_input_chars, options)
    run = Run(rows, hashlib.sha256(path.read_bytes()).hexdigest(),
              key_prefix=run_key(idempotency_key, len(rows)) or "")
    load_state(out, Path(f"{out}.jobs.jsonl"), run, key_given=idempotency_key is not None)
    return run_file(client, run, out, options, in_flight, timeout, progress)
