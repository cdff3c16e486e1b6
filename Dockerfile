# graygate: traffic-splitting reverse proxy for gray releases.
#   docker build -t graygate .
#   docker run -p 8080:8080 -p 127.0.0.1:9901:9901 -e GRAYGATE_ADMIN_TOKEN=... \
#     -v $PWD/graygate.yaml:/etc/graygate/graygate.yaml:ro graygate
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
# README.md* : the glob keeps the build working while the file is absent.
COPY pyproject.toml README.md* ./
COPY proxy ./proxy
RUN pip install . && rm -rf /src

# Unprivileged user; the state directory is the only place it writes.
RUN useradd --system --uid 10001 --home-dir /var/lib/graygate --shell /usr/sbin/nologin graygate \
    && mkdir -p /etc/graygate /var/lib/graygate \
    && chown graygate:graygate /var/lib/graygate
COPY config/docker.yaml /etc/graygate/graygate.yaml

USER graygate
WORKDIR /var/lib/graygate
VOLUME ["/var/lib/graygate"]

# 8080: proxy listener; 9901: admin API, /metrics, /healthz, /readyz, dashboard.
EXPOSE 8080 9901

HEALTHCHECK --interval=10s --timeout=3s --start-period=5s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9901/healthz', timeout=2)"]

# SIGTERM starts graygate's graceful drain; give it the configured grace period.
STOPSIGNAL SIGTERM
CMD ["graygate", "serve", "-c", "/etc/graygate/graygate.yaml"]
