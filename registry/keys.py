"""API keys: 256-bit random secrets, stored only as SHA-256 hashes."""

from __future__ import annotations

import hashlib
import secrets

KEY_PREFIX = "lpx-"
# Characters shown in listings so people can tell keys apart.
DISPLAY_CHARS = 12


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def key_sha256(plaintext: str) -> str:
    # A plain hash is enough: keys are 256-bit random, so there is nothing to brute-force.
    return hashlib.sha256(plaintext.encode()).hexdigest()


def display_prefix(plaintext: str) -> str:
    return plaintext[:DISPLAY_CHARS]
