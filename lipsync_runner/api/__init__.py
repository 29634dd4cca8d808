"""HTTP layer: the seed-compatible REST API (``/api/lip-sync``) and its request limits."""

from .limits import ApiLimits, BodySizeLimitMiddleware
from .rest import Manager, create_rest_app, get_owner

__all__ = ["ApiLimits", "BodySizeLimitMiddleware", "Manager", "create_rest_app", "get_owner"]
