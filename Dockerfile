# Worker image: CPU-only torch, the model cache on a volume (/hf-cache).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf-cache

WORKDIR /app

# The CPU wheel first: from PyPI, torch is a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.14"

COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN pip install ".[worker]"

RUN useradd --create-home --uid 1000 app && mkdir -p /hf-cache && chown app /hf-cache
USER app

CMD ["celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
