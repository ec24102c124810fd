"""Optional shared-secret authentication of the handshake (HMAC-SHA256, both directions).

With a secret on both endpoints, HELLO carries ``[time, nonce, mac]`` over the decode side's
name, layout fingerprint and nonce; the prefill side refuses a HELLO whose MAC does not verify,
whose time is more than ``MAX_SKEW`` seconds off, or whose nonce it has seen (a replay). WELCOME
carries a MAC over the decode side's nonce, so the decode side knows it reached an endpoint that
holds the secret too. Nothing after the handshake is authenticated per message and nothing is
encrypted: keep the control plane on loopback or a private network (README, Security).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
import time

from kvlink.errors import AuthError  # noqa: F401  (kvlink.auth.AuthError, as before)

MAX_SKEW = 60.0  # seconds between the two hosts' clocks a HELLO may show
NONCE_BYTES = 16


def normalize_secret(secret) -> bytes | None:
    """The secret as bytes (``str`` is UTF-8 encoded); None or empty: no authentication."""
    if secret is None or secret == "" or secret == b"":
        return None
    if isinstance(secret, str):
        return secret.encode()
    if isinstance(secret, (bytes, bytearray)):
        return bytes(secret)
    raise TypeError(f"secret must be str or bytes, got {type(secret).__name__}")


def _mac(secret: bytes, *parts: bytes) -> bytes:
    return hmac.new(secret, b"|".join(parts), hashlib.sha256).digest()


def hello_auth(secret: bytes, endpoint: str, fingerprint: str) -> tuple[list, bytes]:
    """(the HELLO's ``auth`` field, the nonce to check the WELCOME against)."""
    nonce = os.urandom(NONCE_BYTES)
    stamp = time.time()
    mac = _mac(secret, b"kvlink-hello", struct.pack("<d", stamp), nonce, endpoint.encode(), fingerprint.encode())
    return [stamp, nonce, mac], nonce


class HelloVerifier:
    """Checks HELLO ``auth`` fields on the prefill side and remembers recent nonces (replays)."""

    def __init__(self, secret: bytes):
        self.secret = secret
        self._seen: dict[bytes, float] = {}

    def check(self, auth, endpoint: str, fingerprint: str) -> bytes:
        """The HELLO's nonce if ``auth`` is good; AuthError naming what failed."""
        if not (isinstance(auth, list) and len(auth) == 3 and isinstance(auth[0], float)
                and isinstance(auth[1], bytes) and len(auth[1]) == NONCE_BYTES and isinstance(auth[2], bytes)):
            raise AuthError("authentication required: the peer sent no valid credentials (set the same secret on both)")
        stamp, nonce, mac = auth
        expected = _mac(self.secret, b"kvlink-hello", struct.pack("<d", stamp), nonce, endpoint.encode(),
                        fingerprint.encode())
        if not hmac.compare_digest(mac, expected):
            raise AuthError("authentication failed: wrong secret")
        now = time.time()
        if abs(now - stamp) > MAX_SKEW:
            raise AuthError(f"authentication failed: HELLO is {now - stamp:+.0f} s off this host's clock")
        for old, seen in list(self._seen.items()):
            if now - seen > 2 * MAX_SKEW:
                del self._seen[old]
        if nonce in self._seen:
            raise AuthError("authentication failed: replayed HELLO")
        self._seen[nonce] = now
        return nonce


def welcome_auth(secret: bytes, nonce: bytes, endpoint: str) -> bytes:
    return _mac(secret, b"kvlink-welcome", nonce, endpoint.encode())


def check_welcome(secret: bytes, nonce: bytes, endpoint: str, auth) -> None:
    if not isinstance(auth, bytes) or not hmac.compare_digest(auth, welcome_auth(secret, nonce, endpoint)):
        raise AuthError(f"{endpoint} did not prove it holds the shared secret")
