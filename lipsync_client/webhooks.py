"""Check that a webhook delivery came from your lip-sync server (stdlib only).

    from lipsync_client import verify_webhook, WebhookVerificationError

    def receive(request):                      # any web framework: you need the RAW body bytes
        try:
            event = verify_webhook(request.body, request.headers["Lipsync-Signature"], SECRET)
        except WebhookVerificationError:
            return 400
        if event["event"] == "completed": ...  # the job's status body, plus event, event_id, event_at
        return 200                             # any 2xx; anything else (or no answer in 10 s) is retried

The header is ``t=<unix seconds>,v1=<hex>`` where ``v1`` is HMAC-SHA256 with the shared
secret over ``"<t>." + body``. A delivery is accepted when one ``v1`` matches (there are
several while the server rotates secrets) and ``t`` is within ``tolerance_s`` of now, so a
captured delivery cannot be replayed later. Deliveries are at least once: dedupe on
``event_id`` (also the ``Lipsync-Event-Id`` header).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Any, Optional, Union

SIGNATURE_HEADER = "Lipsync-Signature"
DEFAULT_TOLERANCE_S = 300


class WebhookVerificationError(ValueError):
    """The delivery is not signed by the secret, or is too old, or its header or body is malformed."""


def _parse_header(header: str) -> tuple[int, list[str]]:
    timestamp: Optional[int] = None
    signatures: list[str] = []
    for item in header.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep:
            continue
        if key == "t":
            try:
                timestamp = int(value)
            except ValueError:
                raise WebhookVerificationError("the signature header's timestamp is not a number") from None
        elif key == "v1":
            signatures.append(value.strip())
    if timestamp is None:
        raise WebhookVerificationError("the signature header has no timestamp (t=...)")
    if not signatures:
        raise WebhookVerificationError("the signature header has no v1 signature")
    return timestamp, signatures


def verify_webhook(body: Union[bytes, str], header: Optional[str], secret: str,
                   tolerance_s: float = DEFAULT_TOLERANCE_S, *, now: Optional[float] = None) -> dict[str, Any]:
    """The delivery's JSON body once its signature and age check out; WebhookVerificationError if not.

    ``body`` must be the raw request body, exactly as received (parsing and re-serialising the
    JSON changes the bytes and breaks the signature). There is no way to turn the age check
    off: without it a captured delivery could be replayed forever.
    """
    if not secret:
        raise ValueError("verify_webhook needs the webhook secret")
    if not header:
        raise WebhookVerificationError(f"no {SIGNATURE_HEADER} header")
    raw = body.encode() if isinstance(body, str) else bytes(body)
    timestamp, signatures = _parse_header(header)
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + raw, hashlib.sha256).hexdigest()
    # compare against every signature in constant time (no early exit)
    if not any([hmac.compare_digest(expected, s) for s in signatures]):
        raise WebhookVerificationError("the signature does not match (wrong secret, or the body was changed)")
    age = (time.time() if now is None else now) - timestamp
    if abs(age) > tolerance_s:
        raise WebhookVerificationError(f"the delivery's timestamp is {age:.0f} s off (tolerance {tolerance_s:g} s)")
    try:
        data = json.loads(raw)
    except ValueError:
        raise WebhookVerificationError("the body is not JSON") from None
    if not isinstance(data, dict):
        raise WebhookVerificationError("the body is not a JSON object")
    return data
