"""python -m worker.bench: measure the service on this machine.

    python -m worker.bench accuracy --model DIR [--dtypes float32,bfloat16,int8] [--n 400]
    python -m worker.bench adapters --model DIR|FILE.gguf --adapters FILE[,FILE] [--engine auto]
    python -m worker.bench replies --model DIR|FILE.gguf [--configs original:1.0,mood-examples]
    python -m worker.bench step --model FILE.gguf [--configs original:q8_0,mood-examples:f16]
    python -m worker.bench prompts --model DIR [--layouts system:fewshot,example-turns]
    python -m worker.bench run --model DIR|FILE.gguf [--baseline] ...
    python -m worker.bench run --shape qwen2.5-0.5b [--baseline] ...
    python -m worker.bench batching --model DIR [--baseline] [--concurrency 1,2,4,8,16]
    python -m worker.bench engine --model DIR [--dtypes float32,bfloat16,int8]
    python -m worker.bench profile --model DIR [--dtype int8]
    python -m worker.bench kernels
    python -m worker.bench peers --gguf FILE --hf DIR --llama-bin DIR [--dtype int8]

See BENCHMARKS.md for the figures and the exact commands that produced them. The commands live by
family: cli_quality.py, cli_load.py, cli_batching.py and cli_engine.py (cli_common.py: what they share).
"""

from __future__ import annotations

import argparse
import sys

from worker.bench.cli_batching import add_batching_command
from worker.bench.cli_engine import add_engine_commands
from worker.bench.cli_load import add_load_commands
from worker.bench.cli_quality import add_quality_commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.bench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    add_quality_commands(sub)
    add_load_commands(sub)
    add_batching_command(sub)
    add_engine_commands(sub)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
