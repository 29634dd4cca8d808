"""``lipsync verify``: read and check a file's content credentials (C2PA) locally.

Needs ``c2pa-python`` (``pip install c2pa-python``), imported only here and only when used: the
rest of the client works without it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from .errors import LipSyncClientError

JOB_ASSERTION = "org.lipsync.job"  # the service's assertion: job id, model, inputs (lipsync_runner/media/credentials.py)
INSTALL_HINT = "checking content credentials needs c2pa-python: pip install c2pa-python"


class CredentialsUnavailable(LipSyncClientError):
    """c2pa-python is not installed."""


@dataclass
class Verification:
    """What c2pa found in a file."""

    state: Optional[str]  # Trusted, Valid (intact, signer not trusted here), Invalid; None: no manifest
    manifest: dict[str, Any] = field(default_factory=dict)  # the active manifest
    failures: list[dict[str, Any]] = field(default_factory=list)  # c2pa's failure codes (untrusted signer included)

    @property
    def intact(self) -> bool:
        """The manifest's signature and the hashes of the content it covers match."""
        return self.state in ("Valid", "Trusted")

    @property
    def job(self) -> dict[str, Any]:
        for assertion in self.manifest.get("assertions", []):
            if assertion.get("label") == JOB_ASSERTION:
                return assertion.get("data") or {}
        return {}

    @property
    def mismatches(self) -> list[dict[str, Any]]:
        """Failures other than an untrusted signer: the content or the manifest was changed."""
        return [f for f in self.failures if not str(f.get("code", "")).startswith("signingCredential.untrusted")]


def verify_file(path: str | Path, trust_anchors: str | Path | None = None) -> Verification:
    """Read ``path``'s C2PA manifest and validate it (``trust_anchors``: a PEM file of CAs to trust)."""
    try:
        import c2pa
    except ImportError:
        raise CredentialsUnavailable(INSTALL_HINT) from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(2, "No such file", str(path))
    kwargs: dict[str, Any] = {}
    if trust_anchors is not None:
        kwargs["context"] = c2pa.Context.from_dict({"trust": {"trust_anchors": Path(trust_anchors).read_text()}})
    try:
        reader = c2pa.Reader.try_create(str(path), **kwargs)
    except c2pa.C2paError as exc:  # a format c2pa cannot read (webm), or a manifest too broken to parse
        raise LipSyncClientError(f"{path.name}: c2pa cannot read its credentials ({exc})") from None
    if reader is None:
        return Verification(state=None)
    with reader:
        store = json.loads(reader.json())
        state = reader.get_validation_state()
        results = reader.get_validation_results() or {}
    active = store.get("manifests", {}).get(store.get("active_manifest", ""), {})
    failures = list((results.get("activeManifest") or {}).get("failure") or [])
    return Verification(state=state, manifest=active, failures=failures)
