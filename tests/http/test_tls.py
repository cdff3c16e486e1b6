"""HTTPS on the listener (proxy/dataplane/tls.py and its wiring): the config shape, what
`graygate check` says about the files, curl through graygate with a test CA, and SIGHUP
with a new certificate (new connections see it, an open keep-alive one keeps working).
Certificates are made here with the openssl command, never committed."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy import cli
from proxy.core.config.load import parse_config
from proxy.core.config.model import ConfigError, TlsConfig
from proxy.dataplane.tls import reload_context, server_context
from tests.helpers import ROOT, free_port, read_framed_body, route_config, split_head, wait_port


@dataclass
class Leaf:
    cert: Path
    key: Path

    @property
    def der(self) -> bytes:
        return ssl.PEM_cert_to_DER_cert(self.cert.read_text())


class ScratchCA:
    """A throwaway CA (EC keys: instant) that issues localhost certificates."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.pem = folder / "ca.pem"
        self.key = folder / "ca.key"
        self._openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-keyout", self.key, "-out", self.pem, "-days", "2",
            "-subj", "/CN=graygate test CA",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip

    def _openssl(self, *args: object) -> None:
        subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True)

    def issue(self, name: str, serial: int) -> Leaf:
        key, csr, cert = (self.folder / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
        ext = self.folder / f"{name}.ext"
        ext.write_text(
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
            "keyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n"
            "subjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
        )
        self._openssl(
            "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", key, "-out", csr, "-subj", "/CN=localhost",
        )  # fmt: skip
        self._openssl(
            "x509", "-req", "-in", csr, "-CA", self.pem, "-CAkey", self.key,
            "-set_serial", serial, "-days", "1", "-extfile", ext, "-out", cert,
        )  # fmt: skip
        return Leaf(cert, key)

    def client_context(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.pem))


@pytest.fixture
def ca(tmp_path: Path) -> ScratchCA:
    folder = tmp_path / "pki"
    folder.mkdir()
    return ScratchCA(folder)


def tls_config(leaf: Leaf, **extra: Any) -> dict[str, Any]:
    return {"cert": str(leaf.cert), "key": str(leaf.key), **extra}


def config_with(listen: object) -> dict[str, Any]:
    return {"listen": listen, "routes": [route_config("http://127.0.0.1:9001")]}


# ---- config --------------------------------------------------------------------------------


def test_listen_takes_a_string_or_a_mapping_with_tls():
    assert parse_config(config_with("127.0.0.1:8443"), env={}).listen_tls is None
    cfg = parse_config(
        config_with({"address": "127.0.0.1:8443", "tls": {"cert": "c.pem", "key": "k.pem"}}),
        env={},
    )
    assert (cfg.listen.host, cfg.listen.port) == ("127.0.0.1", 8443)
    assert cfg.listen_tls == TlsConfig("c.pem", "k.pem", "TLSv1.2")
    plain = parse_config(config_with({"address": ":8080"}), env={})
    assert plain.listen_tls is None and plain.listen.port == 8080


@pytest.mark.parametrize(
    ("listen", "path", "words"),
    [
        ({"tls": {"cert": "c", "key": "k"}}, "listen.address", "is required"),
        ({"address": ":1", "tls": {"cert": "c"}}, "listen.tls.key", "is required"),
        ({"address": ":1", "tls": {"cert": "c", "key": "k", "x": 1}}, "listen.tls.x", "unknown"),
        (
            {"address": ":1", "tls": {"cert": "c", "key": "k", "min_version": "TLSv1.1"}},
            "listen.tls.min_version",
            "TLSv1.2, TLSv1.3",
        ),
        ({"address": ":1", "ssl": True}, "listen.ssl", "unknown key"),
        (8443, "listen", "must be a string"),
    ],
)
def test_listen_refusals_name_the_key(listen: object, path: str, words: str):
    with pytest.raises(ConfigError) as err:
        parse_config(config_with(listen), env={})
    assert err.value.path == path and words in str(err.value)


def test_schema_accepts_the_tls_form():
    import jsonschema

    schema = json.loads((ROOT / "proxy" / "core" / "config" / "schema.json").read_text())
    tls = {"cert": "c.pem", "key": "k.pem", "min_version": "TLSv1.3"}
    jsonschema.validate(config_with({"address": "0.0.0.0:8443", "tls": tls}), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(config_with({"address": "0.0.0.0:8443", "tls": {"cert": "c"}}), schema)


# ---- the files: graygate check and reload -------------------------------------------------


def check(tmp_path: Path, tls: dict[str, Any]) -> int:
    path = tmp_path / "tls.yaml"
    path.write_text(yaml.safe_dump(config_with({"address": "127.0.0.1:8443", "tls": tls})))
    return cli.main(["check", "-c", str(path)])


def test_check_validates_the_files(
    ca: ScratchCA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    one, two = ca.issue("one", 1), ca.issue("two", 2)
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    cases = [
        (tls_config(one), 0, "https, TLSv1.2+"),
        (
            {"cert": str(tmp_path / "missing.pem"), "key": str(one.key)},
            2,
            "listen.tls.cert: cannot",
        ),
        (
            {"cert": str(junk), "key": str(one.key)},
            2,
            "listen.tls.cert: " + str(junk) + " holds no",
        ),
        (
            {"cert": str(one.cert), "key": str(junk)},
            2,
            "listen.tls.key: " + str(junk) + " holds no",
        ),
        ({"cert": str(one.cert), "key": str(two.key)}, 2, "does not match the certificate"),
    ]
    for tls, code, words in cases:
        assert check(tmp_path, tls) == code
        out = capsys.readouterr()
        assert words in (out.out if code == 0 else out.err)


def test_encrypted_key_is_refused_not_prompted(ca: ScratchCA, tmp_path: Path):
    one = ca.issue("one", 1)
    locked = tmp_path / "locked.key"
    subprocess.run(
        [
            "openssl",
            "pkey",
            "-in",
            str(one.key),
            "-aes256",
            "-passout",
            "pass:x",
            "-out",
            str(locked),
        ],
        check=True,
        capture_output=True,
    )
    with pytest.raises(ConfigError, match="encrypted"):
        server_context(TlsConfig(str(one.cert), str(locked)))


def test_a_bad_reload_leaves_the_running_certificate(ca: ScratchCA, tmp_path: Path):
    one, two = ca.issue("one", 1), ca.issue("two", 2)
    ctx = server_context(TlsConfig(str(one.cert), str(one.key)))
    with pytest.raises(ConfigError, match="does not match"):
        reload_context(ctx, TlsConfig(str(one.cert), str(two.key)))
    # The context still serves `one` with its key: a client handshake proves it.
    assert handshake_cert(ctx, ca) == one.der


def handshake_cert(server: ssl.SSLContext, ca: ScratchCA) -> bytes:
    """Run a TLS handshake in memory and return the certificate the server presented."""
    c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
    client = ca.client_context().wrap_bio(c_in, c_out, server_hostname="localhost")
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    for _ in range(10):
        for side in (client, srv):
            with contextlib.suppress(ssl.SSLWantReadError):
                side.do_handshake()
        s_in.write(c_out.read())
        c_in.write(s_out.read())
    cert = client.getpeercert(binary_form=True)
    assert cert is not None
    return cert


# ---- real clients through the real gateway --------------------------------------------------


async def test_curl_with_the_test_ca_gets_the_answer(ca: ScratchCA, gateway, upstreams):
    blue = await upstreams("blue")
    leaf = ca.issue("leaf", 7)
    gw = await gateway(
        [route_config(blue.url)],
        listen={"address": "127.0.0.1:0", "tls": tls_config(leaf)},
    )
    proc = await asyncio.create_subprocess_exec(
        "curl", "-sS", "--cacert", str(ca.pem), "-D", "-", "-H", "X-Forwarded-Proto: http",
        f"https://localhost:{gw.port}/hello",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 20)
    assert proc.returncode == 0, err.decode()
    head, _, body = out.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.1 200")  # ALPN offers http/1.1 only
    assert json.loads(body)["version"] == "blue"
    seen = dict((k.decode().lower(), v.decode()) for k, v in blue.requests[-1]["headers"])
    assert seen["x-forwarded-proto"] == "https"  # the client's own value is not trusted


async def tls_get(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str = "/"
) -> tuple[int, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    line, pairs = split_head(head)
    status = int(line.split()[1])
    fields = dict(pairs)
    body = await read_framed_body(
        reader, "GET", status, fields.get(b"transfer-encoding"), fields.get(b"content-length")
    )
    return status, body


async def connect(port: int, ca: ScratchCA) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.wait_for(
        asyncio.open_connection(
            "127.0.0.1", port, ssl=ca.client_context(), server_hostname="localhost"
        ),
        10,
    )


def peer_cert(writer: asyncio.StreamWriter) -> bytes:
    cert = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
    assert cert is not None
    return bytes(cert)


async def wait_log(proc: Any, words: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while proc.output().count(words) < count:
        assert time.monotonic() < deadline, f"no {words!r} in the log:\n{proc.output()}"
        await asyncio.sleep(0.05)


async def test_sighup_new_certificate_keeps_open_connections(
    ca: ScratchCA,
    tmp_path: Path,
    upstreams,
    graygate_process: Callable[..., Any],
):
    blue = await upstreams("blue")
    first, second = ca.issue("first", 1), ca.issue("second", 2)
    live = Leaf(tmp_path / "live.pem", tmp_path / "live.key")

    def install(leaf: Leaf) -> None:
        for src, dst in ((leaf.cert, live.cert), (leaf.key, live.key)):
            tmp = dst.with_suffix(".tmp")
            shutil.copyfile(src, tmp)
            tmp.replace(dst)  # atomic, as a certificate manager does it

    install(first)
    port, admin = free_port(), free_port()
    conf = tmp_path / "graygate.yaml"
    conf.write_text(
        yaml.safe_dump(
            {
                "listen": {"address": f"127.0.0.1:{port}", "tls": tls_config(live)},
                "admin": {"listen": f"127.0.0.1:{admin}"},
                "state": {"path": str(tmp_path / "state.json")},
                "routes": [route_config(blue.url)],
            }
        )
    )
    proc = graygate_process("serve", "-c", str(conf))
    await asyncio.to_thread(wait_port, admin)

    reader, writer = await connect(port, ca)
    assert peer_cert(writer) == first.der
    assert (await tls_get(reader, writer))[0] == 200

    install(second)
    proc.proc.send_signal(signal.SIGHUP)
    await wait_log(proc, "config reloaded on SIGHUP", 1)

    r2, w2 = await connect(port, ca)
    assert peer_cert(w2) == second.der  # a new handshake sees the new certificate
    assert (await tls_get(r2, w2))[0] == 200
    for _ in range(3):  # the open keep-alive connection goes on with its own session
        assert (await tls_get(reader, writer))[0] == 200
    assert peer_cert(writer) == first.der

    # A broken certificate on the next SIGHUP is refused; the running one stays.
    live.key.write_text("garbage\n")
    proc.proc.send_signal(signal.SIGHUP)
    await wait_log(proc, "SIGHUP reload refused", 1)
    assert "listen.tls.key" in proc.output()
    r3, w3 = await connect(port, ca)
    assert peer_cert(w3) == second.der
    assert (await tls_get(r3, w3))[0] == 200
    for w in (writer, w2, w3):
        w.close()
