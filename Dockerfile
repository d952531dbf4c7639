# Worker image: CPU-only torch, the model cache on a volume (/hf-cache).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HOME=/hf-cache

WORKDIR /app

# The CPU wheel first: from PyPI, torch is a multi-GB CUDA build.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.5,<2.15"

# `--build-arg EXTRAS=worker,llama` adds the llama.cpp engine. It compiles llama.cpp
# (a few minutes) for the vector extensions of the machine that builds the image.
ARG EXTRAS=worker
COPY pyproject.toml README.md ./
COPY producer ./producer
COPY worker ./worker
RUN case ",$EXTRAS," in *,llama,*) \
        apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
        && rm -rf /var/lib/apt/lists/* ;; esac \
    && CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install ".[$EXTRAS]"

RUN useradd --create-home --uid 1000 app && mkdir -p /hf-cache && chown app /hf-cache
USER app

CMD ["celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
