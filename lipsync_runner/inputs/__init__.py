"""Job inputs that are not uploads: files fetched from a URL by the worker."""

from .fetch import FetchedInput, FetchSettings, fetch_input

__all__ = ["FetchSettings", "FetchedInput", "fetch_input"]
