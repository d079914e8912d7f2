# NeuroLens server image: CPU PyTorch plus the project, run by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# torch first, from the CPU wheel index, in its own layer: it is by far the largest dependency
# and changes far less often than the project's code. The CPU build avoids gigabytes of CUDA.
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY server ./server
COPY trainer ./trainer
COPY clients ./clients
COPY migrations ./migrations
RUN pip install .

# Jobs and artifacts must survive container upgrades, so they live on a volume; running as a
# non-root user keeps a trainer from writing anywhere else.
RUN useradd --create-home --uid 1000 neurolens && mkdir /data && chown neurolens /data
USER neurolens
ENV NEUROLENS_DATA_DIR=/data
VOLUME ["/data"]
EXPOSE 8000

CMD ["neurolens", "serve", "--host", "0.0.0.0", "--port", "8000"]
