"""Each tenant's own callback signing key, derived from CALLBACK_SECRET.

With one key for everyone, every tenant's receiver holds the key that signs every other
tenant's callbacks, so a receiver could not tell its own tenant's callbacks from another's.
A job of tenant ``t`` is signed with HMAC-SHA256(CALLBACK_SECRET's bytes, "tenant:" + t) instead,
in the same Standard Webhooks form (``whsec_`` and base64), which the operator hands to that
tenant (``python -m producer.api.callbacks.keys TENANT``, with CALLBACK_SECRET set). A job without a tenant is signed with
CALLBACK_SECRET itself. Nothing is stored: any gateway derives the same key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import sys

PREFIX = "whsec_"


def tenant_secret(secret: str, tenant: str | None) -> str:
    """The key that signs ``tenant``'s callbacks (``secret`` itself for no tenant)."""
    if tenant is None:
        return secret
    raw = base64.b64decode(secret.removeprefix(PREFIX))
    derived = hmac.new(raw, f"tenant:{tenant}".encode("utf-8"), hashlib.sha256).digest()
    return PREFIX + base64.b64encode(derived).decode("ascii")


def main(argv: list[str] | None = None) -> int:
    """Print each named tenant's signing key, derived from CALLBACK_SECRET in the environment."""
    tenants = sys.argv[1:] if argv is None else argv
    secret = os.environ.get("CALLBACK_SECRET")
    if not secret or not tenants:
        print("usage: CALLBACK_SECRET=whsec_... python -m producer.api.callbacks.keys TENANT [TENANT ...]",
              file=sys.stderr)
        return 2
    for tenant in tenants:
        print(f"{tenant}\t{tenant_secret(secret, tenant)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
