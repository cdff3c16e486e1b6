"""Child processes of a benchmark: nginx upstreams and proxy, graygate, with their configs.

Every process is started through a `Processes` owner that kills the whole set on exit,
on Ctrl-C and on SIGTERM; nginx runs in the foreground with its prefix, pid file and
temp paths inside the run's temporary directory. Also: CPU and RSS readings from /proc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType

BODY_SMALL = b"hello"  # 5 B
BODY_LARGE_SIZE = 64 * 1024
ROUTE = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


class ToolMissing(RuntimeError):
    """nginx, wrk or taskset is not installed; the message says how to install it."""


def require_tool(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else "")
    if not path:
        raise ToolMissing(
            f"{name} is not installed: run `sudo bash benchmarks/install_tools.sh` "
            "(installs the Debian packages nginx-light and wrk)"
        )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on 127.0.0.1:{port} after {timeout} s")


def pin(cpu: int | None) -> list[str]:
    if cpu is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(cpu)]


class Processes:
    """Owns every child; `close()` (also via `with`, SIGTERM or Ctrl-C) ends them all."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[subprocess.Popen[bytes]] = []
        self._old_term: object = None

    def __enter__(self) -> Processes:
        self._old_term = signal.signal(signal.SIGTERM, self._on_term)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
        signal.signal(signal.SIGTERM, self._old_term)  # type: ignore[arg-type]

    def _on_term(self, signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def start(
        self, argv: list[str], name: str, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "wb")  # noqa: SIM115 - owned by the child
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # Ctrl-C reaches us only; we end the children ourselves
        )
        log.close()
        self.children.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(grace)
        if proc in self.children:
            self.children.remove(proc)

    def close(self) -> None:
        for proc in reversed(list(self.children)):
            self.stop(proc)

    def log_tail(self, name: str, lines: int = 15) -> str:
        path = self.workdir / f"{name}.log"
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --- nginx -----------------------------------------------------------------------------

NGINX_MAIN = """daemon off;
master_process {master};
worker_processes {workers};
{user}pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 8192; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {prefix}/client_body;
    proxy_temp_path {prefix}/proxy;
    fastcgi_temp_path {prefix}/fastcgi;
    uwsgi_temp_path {prefix}/uwsgi;
    scgi_temp_path {prefix}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    tcp_nodelay on;
{body}
}}
"""

UPSTREAM_SERVER = """    sendfile on;
    tcp_nopush off;  # on: ~40 ms p99 stalls with 64 KiB bodies (DESIGN.md section 10)
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        root {prefix}/www;
        location = /5b {{ add_header X-Upstream {name}; try_files /5b =404; }}
        location = /64k {{ add_header X-Upstream {name}; try_files /64k =404; }}
        location / {{ return 200 "{name}"; }}
    }}"""

PROXY_SERVER = """    split_clients "${{cookie_gg_uid}}${{remote_addr}}" $gg_version {{
        90% blue;
        * green;
    }}
    upstream blue {{ server 127.0.0.1:{blue}; keepalive 64; keepalive_requests 1000000; }}
    upstream green {{ server 127.0.0.1:{green}; keepalive 64; keepalive_requests 1000000; }}
    server {{
        listen 127.0.0.1:{port}{ssl} reuseport backlog=4096;{tls}
        location / {{
            proxy_pass http://$gg_version;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            add_header X-Graygate-Version $gg_version always;
            # Hold a whole 64 KiB answer in memory: the default 8 x 4k buffers spill
            # larger bodies to temp files, which would make nginx look slower than it is.
            proxy_buffer_size 16k;
            proxy_buffers 8 16k;
            proxy_busy_buffers_size 32k;
            proxy_max_temp_file_size 0;
        }}
    }}"""


def nginx_conf(prefix: Path, body: str, workers: int = 1) -> str:
    # One process unless asked for more: then a master with `workers` worker processes
    # (as root, workers would switch to `nobody` and lose the run's private directory).
    user = "user root;\n" if workers > 1 and os.geteuid() == 0 else ""
    master = "on" if workers > 1 else "off"
    return NGINX_MAIN.format(prefix=prefix, body=body, master=master, workers=workers, user=user)


def start_nginx(
    procs: Processes, name: str, body: str, port: int, cpu: int | None, workers: int = 1
) -> subprocess.Popen[bytes]:
    nginx = require_tool("nginx")
    prefix = procs.workdir / name
    prefix.mkdir(parents=True, exist_ok=True)
    conf = prefix / "nginx.conf"
    conf.write_text(nginx_conf(prefix, body, workers))
    argv = [*pin(cpu), nginx, "-p", str(prefix), "-c", str(conf), "-e", str(prefix / "error.log")]
    proc = procs.start(argv, name)
    try:
        wait_port(port, proc)
    except RuntimeError as exc:
        err = (
            (prefix / "error.log").read_text(errors="replace")
            if (prefix / "error.log").exists()
            else ""
        )
        raise RuntimeError(f"nginx {name}: {exc}\n{procs.log_tail(name)}\n{err[-2000:]}") from exc
    return proc


def start_upstream(
    procs: Processes, name: str, port: int, cpu: int | None
) -> subprocess.Popen[bytes]:
    www = procs.workdir / name / "www"
    www.mkdir(parents=True, exist_ok=True)
    (www / "5b").write_bytes(BODY_SMALL)
    (www / "64k").write_bytes(b"x" * BODY_LARGE_SIZE)
    body = UPSTREAM_SERVER.format(port=port, prefix=procs.workdir / name, name=name)
    return start_nginx(procs, name, body, port, cpu)


# TLS as graygate terminates it: the same files, TLS 1.2 and 1.3, OpenSSL's default ciphers.
NGINX_TLS = """
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;"""


def start_nginx_proxy(
    procs: Processes,
    port: int,
    blue: int,
    green: int,
    cpu: int | None,
    tls: tuple[Path, Path] | None = None,
    workers: int = 1,
) -> subprocess.Popen[bytes]:
    ssl, tls_lines = "", ""
    if tls is not None:
        ssl, tls_lines = " ssl", NGINX_TLS.format(cert=tls[0], key=tls[1])
    body = PROXY_SERVER.format(port=port, blue=blue, green=green, ssl=ssl, tls=tls_lines)
    return start_nginx(procs, "nginx-proxy", body, port, cpu, workers)


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed ECDSA P-256 certificate for 127.0.0.1 (wrk does not verify), made with
    the openssl command for this run only; both proxies serve the same files."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise ToolMissing("openssl is not installed: apt-get install -y openssl")
    cert, key = folder / "bench-cert.pem", folder / "bench-key.pem"
    subprocess.run(
        [
            openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    return cert, key


# --- graygate --------------------------------------------------------------------------


@dataclass(frozen=True)
class GraygateConfig:
    port: int
    admin_port: int
    blue: str  # "http://127.0.0.1:PORT"
    green: str
    weights: tuple[int, int] = (90, 10)
    rollout_interval: str = "1s"
    min_samples: int = 50
    tls: tuple[Path, Path] | None = None  # (cert, key): listen with HTTPS
    workers: int = 1


def graygate_yaml(cfg: GraygateConfig, state_path: Path) -> str:
    # The real configuration (DESIGN.md section 10): cohort stickiness, metrics, forwarding
    # headers and the version header on; access log off.
    listen = f'"127.0.0.1:{cfg.port}"'
    if cfg.tls is not None:
        listen = (
            f'{{address: "127.0.0.1:{cfg.port}", '
            f'tls: {{cert: "{cfg.tls[0]}", key: "{cfg.tls[1]}", min_version: TLSv1.2}}}}'
        )
    return f"""listen: {listen}
admin:
  listen: "127.0.0.1:{cfg.admin_port}"
state:
  backend: file
  path: "{state_path}"
version_header: X-Graygate-Version
access_log: false
workers: {cfg.workers}
routes:
  - name: {ROUTE}
    match: {{host: "*", path_prefix: "/"}}
    versions:
      blue: {{endpoints: ["{cfg.blue}"]}}
      green: {{endpoints: ["{cfg.green}"]}}
    stable: blue
    weights: {{blue: {cfg.weights[0]}, green: {cfg.weights[1]}}}
    sticky:
      keys: ["header:X-User-Id"]
      cookie: {{name: gg_uid}}
    rollout:
      steps: [10, 25, 50, 100]
      interval: {cfg.rollout_interval}
      analysis:
        min_samples: {cfg.min_samples}
        max_error_rate: 0.01
        # Blue is nginx and green an aiohttp app: their latencies differ by design, so
        # only errors decide here (the latency checks have their own tests).
        max_latency_ratio: null
        max_p99_latency: null
      failure_limit: 1
      on_failure: rollback
"""


def graygate_command() -> list[str] | None:
    """The graygate command to benchmark: env GRAYGATE_CMD, the venv's script, PATH, -m proxy."""
    env = os.environ.get("GRAYGATE_CMD")
    if env:
        return env.split()
    beside = Path(sys.executable).parent / "graygate"
    if beside.exists():
        return [str(beside)]
    found = shutil.which("graygate")
    if found:
        return [found]
    with contextlib.suppress(ImportError):
        import proxy.cli  # noqa: F401

        return [sys.executable, "-m", "proxy"]
    return None


def start_graygate(
    procs: Processes,
    cmd: list[str],
    cfg: GraygateConfig,
    cpu: int | None,
    name: str = "graygate",
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    conf_dir = procs.workdir / name
    conf_dir.mkdir(parents=True, exist_ok=True)
    conf = conf_dir / "graygate.yaml"
    state = conf_dir / "state.json"
    state.unlink(missing_ok=True)
    conf.write_text(graygate_yaml(cfg, state))
    proc = procs.start([*pin(cpu), *cmd, "serve", "-c", str(conf)], name, env)
    try:
        wait_port(cfg.port, proc, timeout=15.0)
    except RuntimeError as exc:
        procs.stop(proc)
        raise RuntimeError(f"graygate: {exc}\n{procs.log_tail(name)}") from exc
    return proc


# --- /proc readings --------------------------------------------------------------------


def _tree(pid: int) -> list[int]:
    pids = [pid]
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for k in kids:
        pids.extend(_tree(int(k)))
    return pids


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime, stime) in seconds of the process and its descendants (taskset execs, so pid
    is the proxy): user time is the proxy's own code, system time the kernel's share."""
    user = system = 0
    for p in _tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        user += int(fields[11])  # field 14 of stat(5)
        system += int(fields[12])  # field 15
    return user / CLK_TCK, system / CLK_TCK


def rss_by_process_kib(pid: int) -> dict[int, int]:
    """VmHWM of the process and of each descendant (a supervisor and its workers)."""
    out: dict[int, int] = {}
    for p in _tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    out[p] = int(line.split()[1])
    return out


def peak_rss_kib(pid: int) -> int:
    """Largest VmHWM among the process and its descendants (the target is per process)."""
    best = 0
    for p in _tree(pid):
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    best = max(best, int(line.split()[1]))
        except OSError:
            continue
    return best
