"""MuseTalk lip-sync inference core: models, audio features, faces, streaming video, jobs."""

__version__ = "0.1.0"
