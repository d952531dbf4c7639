"""One command, end to end on this machine: start a worker, run one text, stop the worker.

    python -m worker.demo "送餐太慢了，等了两个小时，菜都凉了" --model /path/to/model-folder-or.gguf

It uses the local Redis (REDIS_URL, default redis://127.0.0.1:6379/0) and the
same worker command and client as production; nothing is simulated.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from producer.cli import main as producer_main
from worker.settings import DEFAULT_MODEL

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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.demo", description=__doc__.splitlines()[0])
    parser.add_argument("text", nargs="?", default=SAMPLE_TEXT, help="text to run (default: a sample review)")
    parser.add_argument("--model", default=os.environ.get("MODEL", DEFAULT_MODEL),
                        help="MODEL: Hub id, local folder or .gguf file (default: $MODEL or %(default)s)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds for loading plus the job")
    args = parser.parse_args(argv)

    env = {**os.environ, "MODEL": args.model}
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
        return producer_main(["run", args.text, "--timeout", str(args.timeout)])
    finally:
        worker.terminate()
        worker.wait(60)


if __name__ == "__main__":
    sys.exit(main())
