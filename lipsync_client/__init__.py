"""Client SDK and CLI for the MuseTalk lip-sync service (REST API under ``/api/lip-sync``).

Light on purpose: it needs only httpx, pydantic and tqdm (for the CLI), never torch,
numpy or bentoml, so it installs anywhere a script runs.

    from lipsync_client import LipSyncClient

    with LipSyncClient("https://my-deployment.bentoml.ai", token="...") as client:
        job = client.generate("in.mp4", "speech.wav", wait=True, progress=lambda j: print(j.stage, j.progress))
        client.download(job.job_id, "out.mp4")

        # from a pipeline: inputs by URL, a signed webhook when it ends, a safe retry
        job = client.generate(video_url="https://bucket.example/in.mp4", audio_url="https://bucket.example/fr.wav",
                              webhook_url="https://me.example/hooks/lipsync", idempotency_key="order-1234-fr")

        # one video, many languages: prepare it once, then send only each language's audio
        avatar = client.create_avatar("in.mp4", wait=True)
        job = client.generate(avatar_id=avatar.avatar_id, audio="fr.wav", wait=True)

``AsyncLipSyncClient`` has the same methods as coroutines. Errors are typed
(``lipsync_client.errors``) and carry the server's message. The ``lipsync`` command
(``python -m lipsync_client``) wraps all of it; see ``lipsync --help`` for its exit codes.
"""

__version__ = "0.1.0"

from .aio import AsyncLipSyncClient  # noqa: E402
from .client import LipSyncClient  # noqa: E402
from .errors import (  # noqa: E402
    AvatarFailed,
    AvatarNotReady,
    BadRequest,
    ConnectionFailed,
    IdempotencyConflict,
    InsufficientStorage,
    JobFailed,
    LipSyncClientError,
    NotFinished,
    NotFound,
    PayloadTooLarge,
    ServerError,
    ServiceUnavailable,
    TooManyRequests,
    Unauthorized,
    UnexpectedResponse,
    WaitTimeout,
)
from .models import (  # noqa: E402
    Avatar,
    AvatarDeleted,
    AvatarList,
    CleanupResult,
    Health,
    Job,
    JobList,
    JobSummary,
    Preview,
    Usage,
    UsageDay,
    WebhookDelivery,
)
from .webhooks import WebhookVerificationError, verify_webhook  # noqa: E402

__all__ = [
    "AsyncLipSyncClient",
    "Avatar",
    "AvatarDeleted",
    "AvatarFailed",
    "AvatarList",
    "AvatarNotReady",
    "BadRequest",
    "CleanupResult",
    "ConnectionFailed",
    "Health",
    "IdempotencyConflict",
    "InsufficientStorage",
    "Job",
    "JobFailed",
    "JobList",
    "JobSummary",
    "LipSyncClient",
    "LipSyncClientError",
    "NotFinished",
    "NotFound",
    "PayloadTooLarge",
    "Preview",
    "ServerError",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnexpectedResponse",
    "Usage",
    "UsageDay",
    "WaitTimeout",
    "WebhookDelivery",
    "WebhookVerificationError",
    "__version__",
    "verify_webhook",
]
