"""Webhook signatures (server/webhooks/signing.py) checked against the Standard Webhooks
scheme as published (standardwebhooks.com), re-implemented here from the spec's text:
the signed content is ``msg_id.timestamp.payload``, the key the base64-decoded secret
after ``whsec_``, the signature ``v1,`` + base64(HMAC-SHA256), several space-separated."""

from __future__ import annotations

import base64
import hashlib
import hmac

from registry.webhooks import new_secret
from server.webhooks import signing

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
"""The secret of the spec's own example."""


def verify(secret: str, headers: dict[str, str], body: bytes) -> bool:
    """A receiver's check, written from the spec, sharing no code with the sender."""
    key = base64.b64decode(secret.split("_", 1)[1])
    content = f"{headers['webhook-id']}.{headers['webhook-timestamp']}.{body.decode()}"
    expected = base64.b64encode(hmac.new(key, content.encode(), hashlib.sha256).digest())
    for entry in headers["webhook-signature"].split(" "):
        version, _, sig = entry.partition(",")
        if version == "v1" and hmac.compare_digest(sig.encode(), expected):
            return True
    return False


def test_the_spec_example_signature() -> None:
    body = b'{"test": 2432232314}'
    got = signing.signature(SECRET, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body)
    assert got == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_a_message_verifies_and_a_changed_one_does_not() -> None:
    secret, body = new_secret(), b'{"object":"event","type":"adapter.promoted"}'
    headers = signing.headers([secret], "msg_1", 1700000000, body)
    assert headers["webhook-timestamp"] == "1700000000" and headers["webhook-id"] == "msg_1"
    assert verify(secret, headers, body)
    assert not verify(secret, headers, body + b" ")
    assert not verify(secret, {**headers, "webhook-id": "msg_2"}, body)
    assert not verify(new_secret(), headers, body)


def test_during_a_rotation_either_secret_verifies() -> None:
    new, old, body = new_secret(), new_secret(), b"{}"
    headers = signing.headers([new, old], "msg_r", 1700000000, body)
    assert len(headers["webhook-signature"].split(" ")) == 2
    assert verify(new, headers, body) and verify(old, headers, body)
