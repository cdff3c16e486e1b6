#!/usr/bin/env bash
# Installs what the benchmark harness runs besides Python: nginx (upstreams and the
# comparison proxy), wrk (load generator) and taskset (CPU pinning); redis-server and
# chromium for the tests. Debian/Ubuntu.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
# Not a benchmark tool: tests/test_store_redis.py starts a real redis-server.
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
# Not a benchmark tool: tests/test_dashboard.py drives Debian's chromium with Playwright.
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
if [ ${#need[@]} -eq 0 ]; then
    echo "tools present: nginx, wrk, taskset, redis-server, chromium"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; run as root: apt-get update && apt-get install -y ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y --no-install-recommends "${need[@]}"
# The Debian packages start a system nginx (port 80) and redis (6379); tests run their own.
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nginx redis-server >/dev/null 2>&1 || true
fi
echo "installed: ${need[*]}"
