"""Docker HEALTHCHECK of the llamapool server: exit 0 when GET /healthz answers 200.

It reads the server's own variables: PORT (default 8080), and TLS_CERT to choose
https. The certificate is not verified: the check talks to 127.0.0.1, whose name
the certificate does not carry.
"""

from __future__ import annotations

import os
import ssl
import sys
import urllib.request


def main() -> int:
    port = os.environ.get("PORT") or "8080"
    scheme = "https" if os.environ.get("TLS_CERT") else "http"
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    url = f"{scheme}://127.0.0.1:{port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=4, context=context) as response:
            return 0 if response.status == 200 else 1
    except OSError as exc:
        print(f"llamapool healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
