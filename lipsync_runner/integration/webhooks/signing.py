"""How a webhook delivery is signed (the receiver's side is `lipsync_client.verify_webhook`).

Stripe's scheme, so receivers can reuse what they know:

    Lipsync-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>

The timestamp is inside the signed text, so a captured delivery cannot be replayed later
than the receiver's tolerance (5 minutes by default). ``LIP_SYNC_WEBHOOK_SECRET`` may hold
several comma-separated secrets while one is rotated: each signs, one ``v1=`` per secret, and
a receiver that knows any of them accepts the delivery.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

SIGNATURE_HEADER = "Lipsync-Signature"
EVENT_HEADER = "Lipsync-Event"  # started, progress, completed, failed, cancelled
EVENT_ID_HEADER = "Lipsync-Event-Id"  # the same on every retry of one delivery: receivers dedupe on it


def signature(secret: str, timestamp: int, body: bytes) -> str:
    return hmac.new(secret.encode(), f"{int(timestamp)}.".encode() + body, hashlib.sha256).hexdigest()


def signature_header(body: bytes, secrets: Sequence[str], timestamp: int) -> str:
    if not secrets:
        raise ValueError("webhook deliveries need a signing secret (LIP_SYNC_WEBHOOK_SECRET)")
    return ",".join([f"t={int(timestamp)}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])
