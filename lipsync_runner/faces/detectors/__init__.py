"""Face detectors: the protocol (base.py), one file per detector, and the loader (load.py)."""
