"""Signing webhook messages by the Standard Webhooks scheme (standardwebhooks.com).

A message is its id (``webhook-id``, the same on every attempt), its Unix timestamp
in seconds (``webhook-timestamp``) and its body. The signature is the base64 of the
HMAC-SHA256 of ``{id}.{timestamp}.{body}`` keyed with the secret's bytes (the base64
after ``whsec_``), sent as ``v1,<signature>`` in ``webhook-signature``; during a secret
rotation one such entry per secret, space-separated, so receivers holding either verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Sequence

PREFIX = "whsec_"


def key_of(secret: str) -> bytes:
    """The HMAC key a ``whsec_`` secret stands for."""
    return base64.b64decode(secret.removeprefix(PREFIX), validate=True)


def signature(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``v1,<base64 HMAC-SHA256>`` of one message under one secret."""
    content = f"{msg_id}.{timestamp}.".encode() + body
    digest = hmac.new(key_of(secret), content, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The three Standard Webhooks headers of a message signed with every one of ``secrets``."""
    signed = " ".join(signature(secret, msg_id, timestamp, body) for secret in secrets)
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signed,
        "content-type": "application/json",
    }
