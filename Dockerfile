# llmswap itself in a container: it drives the host's Docker engine through the mounted socket.
# Build: docker build -t llmswap .    Run: see docker-compose.yml
FROM python:3.11-slim
WORKDIR /app
COPY setup.cfg pyproject.toml README.md ./
COPY llmswap ./llmswap
COPY twisted ./twisted
RUN pip install --no-cache-dir . && twistd --help | grep -q llmswap
COPY llmswap.yaml /etc/llmswap/llmswap.yaml
EXPOSE 8888
# -n: stay in the foreground and log to stdout, so `docker logs -f llmswap` shows everything.
ENTRYPOINT ["twistd", "-n", "--pidfile=", "llmswap"]
CMD ["--config", "/etc/llmswap/llmswap.yaml"]
