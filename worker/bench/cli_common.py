"""What every ``python -m worker.bench`` report shares: the machine it ran on, the default data set,
and the short reviews the load commands submit as jobs."""

from __future__ import annotations

import platform
from pathlib import Path

from worker.settings import available_cores

DEFAULT_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "waimai_10k.csv"


def machine_line() -> str:
    from importlib.metadata import version

    cpu = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import torch  # the vector extensions torch's CPU kernels use: figures compare only within one kind

    return (f"{available_cores()} cores ({cpu}), CPU capability {torch.backends.cpu.get_cpu_capability()}, "
            f"torch {version('torch')}, Python {platform.python_version()}")


def short_reviews(data: str) -> list[str]:
    """The jobs of `run`, `batching`, `brokers` and `peers`: up to 100 short Chinese reviews (at most
    40 characters) of a fixed balanced sample."""
    from producer.evaluate import balanced_sample, read_rows

    examples = balanced_sample(read_rows(Path(data)), 400, seed=1)
    return [e.text for e in examples if len(e.text) <= 40][:100]
