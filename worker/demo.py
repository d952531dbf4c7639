"""One command, end to end on this machine: start a worker, run one text, stop the worker.

    python -m worker.demo "送餐太慢了，等了两个小时，菜都凉了" --model /path/to/model-folder-or.gguf

It uses the local Redis (REDIS_URL, default redis://127.0.0.1:6379/0) and the
same worker command and client as production; nothing is simulated. Where no
Redis answers at REDIS_URL and ``redis-server`` is on the PATH, it starts a
private one on a free port for the demo and stops it afterwards.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

from producer.cli import main as producer_main
from jobqueue.settings import DEFAULT_REDIS_URL
from worker.settings import default_model

SAMPLE_TEXT = "送餐太慢了，等了两个小时，菜都凉了，心情很差。"
WORKER_COMMAND = ["-m", "celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]


def wait_until_loaded(process: subprocess.Popen, log_path: Path, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        log = log_path.read_text(errors="replace")
        if " loaded (dtype=" in log:
            return True
        if process.poll() is not None or "cannot start:" in log:
            return False
        time.sleep(0.2)
    return False


def _answers(url: str) -> bool:
    """Whether a Redis listens at ``url``; one that answers with an error (a password) still counts."""
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.AuthenticationError:  # a ConnectionError, but it is there
        return True
    except (redis.ConnectionError, redis.TimeoutError):
        return False
    except redis.RedisError:
        return True  # it is there: the worker and client say what is wrong with it


def start_private_redis() -> tuple[str, subprocess.Popen] | None:
    """A redis-server of the demo's own on a free port (no persistence), or None without the binary."""
    binary = shutil.which("redis-server")
    if binary is None:
        return None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                                "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            return None
        time.sleep(0.05)
    return url, process


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.demo", description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=SAMPLE_TEXT, help="text to run (default: a sample review)")
    parser.add_argument("--model", default=os.environ.get("MODEL", default_model()),
                        help="MODEL: a local folder or .gguf file, or a Hub name (org/repo, org/repo:q4_k_m, "
                             "org/repo/file.gguf) (default: $MODEL or %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for loading plus the job")
    args = parser.parse_args(argv)

    redis_url = os.environ.get("REDIS_URL", DEFAULT_REDIS_URL)
    private = None
    try:
        listening = _answers(redis_url)
    except ValueError as err:  # not a Redis URL at all
        print(f"REDIS_URL={redis_url!r}: {err}", file=sys.stderr)
        return 1
    if not listening:
        private = start_private_redis()
        if private is None:
            print(f"no Redis answers at {redis_url}: start one (sudo apt install redis-server, or docker run -p "
                  "6379:6379 redis:7) or set REDIS_URL", file=sys.stderr)
            return 1
        redis_url = private[0]
        print(f"no Redis at REDIS_URL: started a private redis-server for this demo at {redis_url}", file=sys.stderr)
    try:
        return _run(args, redis_url)
    finally:
        if private is not None:
            private[1].terminate()
            private[1].wait(10)


def _run(args: argparse.Namespace, redis_url: str) -> int:
    env = {**os.environ, "MODEL": args.model, "REDIS_URL": redis_url}
    log_path = Path(tempfile.mkdtemp(prefix="qwen-allinone-demo-")) / "worker.log"
    print(f"starting a worker with MODEL={args.model} (log: {log_path})", file=sys.stderr)
    with open(log_path, "w") as log_file:
        worker = subprocess.Popen([sys.executable, *WORKER_COMMAND, "-n", f"demo-{os.getpid()}@%h"],
                                  env=env, stdout=log_file, stderr=subprocess.STDOUT)
    try:
        if not wait_until_loaded(worker, log_path, args.timeout):
            lines = [line for line in log_path.read_text(errors="replace").splitlines() if "cannot start:" in line]
            print(lines[-1].split("WARNING/ForkPoolWorker-1] ")[-1] if lines else
                  f"the worker did not load the model; see {log_path}", file=sys.stderr)
            print("without internet, pass --model /path/to/a/local/model-folder-or-file.gguf", file=sys.stderr)
            return 1
        return producer_main(["--redis-url", redis_url, "run", args.text, "--timeout", str(args.timeout)])
    finally:
        worker.terminate()
        worker.wait(60)


if __name__ == "__main__":
    sys.exit(main())
