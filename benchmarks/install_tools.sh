#!/usr/bin/env bash
# Installs what the benchmark harness and the tests run besides Python: nginx (upstreams
# and the comparison proxy), wrk (load generator), taskset (CPU pinning), redis-server,
# prometheus and chromium (tests/control/test_dashboard.py drives it with Playwright). Debian/Ubuntu.
set -euo pipefail
need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx-light)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v taskset >/dev/null 2>&1 || need+=(util-linux)
# Not benchmark tools: the state and replica tests start a real redis-server, and the
# replica tests a real prometheus scraping two graygate processes.
command -v redis-server >/dev/null 2>&1 || [ -x /usr/bin/redis-server ] || need+=(redis-server)
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ] || need+=(chromium)
# The TLS tests make their certificates with the openssl command.
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if [ ${#need[@]} -eq 0 ]; then
    echo "tools present: nginx, wrk, taskset, redis-server, prometheus, chromium, openssl"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "missing: ${need[*]}; run as root: apt-get update && apt-get install -y ${need[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
# The Debian packages would start a system nginx (port 80), redis (6379) and prometheus
# (9090); tests run their own on free ports. A policy-rc.d that answers 101 keeps
# invoke-rc.d from starting them during the install (already so in Debian's Docker images).
policy=/usr/sbin/policy-rc.d
added_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod +x "$policy" && added_policy=1
fi
apt-get update -qq
apt-get install -y --no-install-recommends "${need[@]}"
if [ "$added_policy" -eq 1 ]; then rm -f "$policy"; fi
if command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now nginx redis-server prometheus >/dev/null 2>&1 || true
fi
echo "installed: ${need[*]}"
