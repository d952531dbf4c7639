# Two images from one file, every dependency from a lock file with hashes (requirements/):
#   docker build --target worker .    the worker: CPU-only torch, the model cache on a volume (/hf-cache)
#   docker build --target gateway .   the HTTP gateway: no torch, no model (it never imports either)
# pip --require-hashes refuses any file whose sha256 is not in the lock, so a rebuild installs the same
# bytes. The project itself goes in last with --no-deps, and without build isolation: its build backend
# (setuptools) is in the locks too. requirements/lock.sh writes the locks; run it after changing
# pyproject.toml's dependencies. They are for linux/amd64 (python:3.11-slim on x86_64).
FROM python:3.11-slim AS base

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
RUN useradd --create-home --uid 1000 app


FROM base AS gateway

COPY requirements/gateway.lock requirements/
RUN pip install --require-hashes -r requirements/gateway.lock

COPY pyproject.toml README.md ./
COPY jobqueue ./jobqueue
COPY producer ./producer
RUN pip install --no-deps --no-build-isolation .

USER app
CMD ["uvicorn", "--factory", "producer.api:create_app", "--host", "0.0.0.0", "--port", "8000"]


FROM base AS worker

ENV HF_HOME=/hf-cache

# torch first, and alone, from PyTorch's CPU index: torch==2.13.0+cpu exists only there (PyPI's torch
# for Linux is the CUDA build, several GB of nvidia-* packages). Its hash is the one in worker.lock, so
# the next step finds it installed and takes everything else from PyPI, hashes checked.
COPY requirements/torch-cpu.lock requirements/worker.lock requirements/worker-llama.lock requirements/
RUN pip install --require-hashes --no-deps --index-url https://download.pytorch.org/whl/cpu \
        -r requirements/torch-cpu.lock

# `--build-arg EXTRAS=worker,llama` adds the llama.cpp engine (worker-llama.lock). It compiles
# llama.cpp (a few minutes) for the vector extensions of the machine that builds the image; its
# build tools (scikit-build-core, cmake) come through pip's build isolation, unhashed.
ARG EXTRAS=worker
RUN case ",$EXTRAS," in \
        ,worker,) lock=requirements/worker.lock ;; \
        ,worker,llama,|,llama,worker,) lock=requirements/worker-llama.lock \
            && apt-get update && apt-get install -y --no-install-recommends build-essential cmake \
            && rm -rf /var/lib/apt/lists/* ;; \
        *) echo "EXTRAS must be worker or worker,llama (the locked sets), not $EXTRAS" >&2; exit 1 ;; \
    esac \
    && CMAKE_ARGS="-DLLAVA_BUILD=OFF" pip install --require-hashes -r "$lock"

COPY pyproject.toml README.md ./
COPY jobqueue ./jobqueue
COPY producer ./producer
COPY worker ./worker
RUN pip install --no-deps --no-build-isolation .

RUN mkdir -p /hf-cache && chown app /hf-cache
USER app

CMD ["celery", "-A", "worker.app", "worker", "--concurrency", "1", "--loglevel", "INFO"]
