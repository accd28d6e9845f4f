# llmswap itself in a container: it drives the host's Docker engine through the mounted socket.
# Build: docker build -t llmswap .    Run: docker compose up -d (see docker-compose.yml)
# BASE: any Debian-like image with python3 >= 3.11 and its venv module.
ARG BASE=python:3.11-slim
FROM ${BASE}
# Extra pip options, e.g. "--no-index --find-links /src/wheels" for an offline build.
ARG PIP_INSTALL_ARGS=""
# memory: auto (GGUF estimates) and probe: nvml:N (NVIDIA GPUs) work in the image.
ARG EXTRAS="[gguf,nvml]"
COPY . /src
RUN python3 -m venv /opt/llmswap \
 && /opt/llmswap/bin/pip install --no-cache-dir ${PIP_INSTALL_ARGS} "/src${EXTRAS}" \
 && /opt/llmswap/bin/twistd --help | grep -q llmswap \
 && mkdir -p /etc/llmswap \
 && cp /src/llmswap.yaml /etc/llmswap/llmswap.yaml \
 && rm -rf /src
ENV PATH=/opt/llmswap/bin:$PATH PYTHONUNBUFFERED=1
EXPOSE 8888
# -n: stay in the foreground and log to stdout, so `docker logs -f llmswap` shows everything.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "llmswap"]
CMD ["--config", "/etc/llmswap/llmswap.yaml"]
