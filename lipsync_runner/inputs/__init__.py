"""Job inputs that are not uploads: URL references (reference.py), fetched by the worker (fetch.py, sources.py).

No imports here: admission imports `reference` while the API package is still loading.
"""
