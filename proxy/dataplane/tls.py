"""HTTPS on the listener (`listen: {address, tls: {cert, key, min_version}}`): the one
ssl.SSLContext the server is created with, and `reload_context`, which loads new files
into that same context. OpenSSL copies the certificate into each connection at its
handshake, so a reload changes new handshakes only; open connections keep theirs.
"""

from __future__ import annotations

import ssl

from proxy.core.config.model import ConfigError, TlsConfig

VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
PATH = "listen.tls"


class _Encrypted(Exception):
    """Raised by the password callback: a key that needs a passphrase is refused, never
    prompted for on a terminal (a reload would hang on it)."""


def _no_password() -> bytes:
    raise _Encrypted


def server_context(tls: TlsConfig) -> ssl.SSLContext:
    """A server context for `tls`; ConfigError (with the dotted key) when a file is missing,
    holds no certificate or key, or the key does not match the certificate."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    # HTTP/1.1 only (DESIGN.md section 11): say so in ALPN, so clients never try h2.
    ctx.set_alpn_protocols(["http/1.1"])
    _configure(ctx, tls)
    return ctx


def reload_context(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    """Re-read the files into the live `ctx`, after a trial load into a fresh context, so a
    bad file leaves the running certificate in place (and raises ConfigError)."""
    server_context(tls)
    _configure(ctx, tls)


def _configure(ctx: ssl.SSLContext, tls: TlsConfig) -> None:
    for key, path in (("cert", tls.cert), ("key", tls.key)):
        try:
            open(path, "rb").close()  # readable: else a clear error, not ssl's
        except OSError as exc:
            raise ConfigError(f"{PATH}.{key}", f"cannot read {path}: {exc.strerror}") from exc
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        probe.load_verify_locations(cafile=tls.cert)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{PATH}.cert", f"{tls.cert} holds no PEM certificate ({exc.reason or exc})"
        ) from exc
    try:
        ctx.load_cert_chain(tls.cert, tls.key, password=_no_password)
    except _Encrypted as exc:
        raise ConfigError(
            f"{PATH}.key", f"{tls.key} is encrypted; give the key without a passphrase"
        ) from exc
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(
                f"{PATH}.key", f"{tls.key} does not match the certificate in {tls.cert}"
            ) from exc
        raise ConfigError(
            f"{PATH}.key", f"{tls.key} holds no PEM private key ({exc.reason or exc})"
        ) from exc
    ctx.minimum_version = VERSIONS[tls.min_version]
