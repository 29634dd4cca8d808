"""HTTP layer: the seed-compatible REST API (``/api/lip-sync``) and its request limits."""

from lipsync_runner.config import ApiLimits
from lipsync_runner.api.limits import BodySizeLimitMiddleware
from lipsync_runner.api.rest import Manager, create_rest_app, get_owner

__all__ = ["ApiLimits", "BodySizeLimitMiddleware", "Manager", "create_rest_app", "get_owner"]
