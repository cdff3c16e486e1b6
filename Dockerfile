# graygate: traffic-splitting reverse proxy for gray releases.
#   docker build -t graygate .
#   docker run -p 8080:8080 -p 127.0.0.1:9901:9901 -e GRAYGATE_ADMIN_TOKEN=... \
#     -v $PWD/graygate.yaml:/etc/graygate/graygate.yaml:ro graygate

# Build stage: the wheel, its data plane compiled with mypyc (setup.py). The image has the
# Python headers; gcc is added here only, so the runtime image carries no compiler.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# README.md* : the glob keeps the build working while the file is absent.
COPY pyproject.toml setup.py README.md* ./
COPY proxy ./proxy
# A pure wheel here would mean the compiler failed: stop rather than ship it silently.
RUN pip wheel --no-deps --wheel-dir /wheels . \
    && python -c "import glob, sys, zipfile; \
names = zipfile.ZipFile(glob.glob('/wheels/graygate-*.whl')[0]).namelist(); \
sys.exit(0 if any(n.endswith('.so') for n in names) else 'graygate wheel is not compiled')"

FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

COPY --from=build /wheels /wheels
RUN pip install /wheels/graygate-*.whl && rm -rf /wheels \
    && graygate --version | grep -q "(compiled: mypyc)"

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
