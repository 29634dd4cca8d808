"""Signed webhooks for job events: outbox rows in the job store, delivered with retries.

    job event -> WebhookNotifier.job_event -> outbox row (body frozen)
              -> WebhookDispatcher (claim with a lease, sign, POST, record the attempt, back off)

Signing is Stripe's scheme (``signing``); receivers verify with ``lipsync_client.verify_webhook``.
"""

from lipsync_runner.integration.webhooks.delivery import RetryPolicy, WebhookDispatcher
from lipsync_runner.config import WebhookSettings
from lipsync_runner.integration.webhooks.events import WebhookDeliveryStatus, WebhookNotifier, deliveries_status
from lipsync_runner.integration.webhooks.outbox import SQLiteWebhookOutbox, WebhookDelivery, WebhookOutbox
from lipsync_runner.integration.webhooks.signing import (
    EVENT_HEADER,
    EVENT_ID_HEADER,
    SIGNATURE_HEADER,
    signature_header,
)

__all__ = [
    "EVENT_HEADER",
    "EVENT_ID_HEADER",
    "RetryPolicy",
    "SIGNATURE_HEADER",
    "SQLiteWebhookOutbox",
    "WebhookDelivery",
    "WebhookDeliveryStatus",
    "WebhookDispatcher",
    "WebhookNotifier",
    "WebhookOutbox",
    "WebhookSettings",
    "deliveries_status",
    "signature_header",
]
