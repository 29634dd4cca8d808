"""Where job files live: the local data directory (default) or an S3-compatible bucket.

The job manager persists a job's inputs when it is submitted and its output when it
completes; workers stage the inputs to local scratch and run the pipeline there. Any
replica can then serve a download (:class:`StoredObject`, :func:`object_response`).
"""

from lipsync_runner.storage.base import JobStorage, StoredObject
from lipsync_runner.storage.factory import open_storage
from lipsync_runner.storage.http import object_response, parse_range
from lipsync_runner.storage.local import LocalStorage

__all__ = ["JobStorage", "LocalStorage", "StoredObject", "object_response", "open_storage", "parse_range"]
