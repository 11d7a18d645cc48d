"""TLS contexts: HTTPS and WSS served in process, and the worker's view of the server.

The worker verifies the server against the system's trust store, or a CA file when the
server's certificate comes from a private CA; it only skips verification when told to in so
many words, and says so in the log every time it connects.
"""

from __future__ import annotations

import os
import ssl

from llamapool.errors import ConfigError


class _Encrypted(Exception):
    """The private key asks for a passphrase."""


def _no_passphrase() -> str:
    # Without a callback OpenSSL would prompt on the terminal (and wait forever under a TTY).
    raise _Encrypted


def server_context(cert: str, key: str) -> ssl.SSLContext:
    """A context serving ``cert`` (a PEM chain) with its private ``key``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_no_passphrase)
    except _Encrypted:
        raise ConfigError(
            f"TLS_KEY {key!r} is encrypted with a passphrase (not supported): "
            "decrypt it with 'openssl pkey -in KEY -out PLAIN_KEY'"
        ) from None
    except FileNotFoundError:
        missing = next((path for path in (cert, key) if not os.path.isfile(path)), cert)
        raise ConfigError(f"TLS file not found: {missing}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot use TLS_CERT {cert!r} with TLS_KEY {key!r}: {exc}") from None
    return context


def client_context(
    *, ca_file: str = "", insecure: bool = False, what: str = "CA file"
) -> ssl.SSLContext:
    """How the worker checks the server's certificate (``what``: how errors name the file)."""
    if insecure:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except FileNotFoundError:
        raise ConfigError(f"{what} not found: {ca_file}") from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"cannot read {what} {ca_file!r}: {exc}") from None
