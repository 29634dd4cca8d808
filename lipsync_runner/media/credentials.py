"""Content credentials: a signed C2PA manifest in each finished output, saying how it was made.

The manifest (written with ``c2pa-python``, the Content Authenticity Initiative's bindings of
c2pa-rs) states the AI alteration in a machine-readable way (EU AI Act, Article 50(2)):

* ``c2pa.actions``: the input video ``c2pa.opened``, then ``c2pa.edited`` by the model, with the IPTC
  digital source type for media composited with trained algorithmic media;
* the two inputs as ingredients (the video ``parentOf``, the audio ``inputTo``; a signed input's
  own manifest travels with it), and :data:`JOB_ASSERTION`: the job id, the model and its version,
  our software's version and each input's SHA-256.

It is signed with the operator's certificate chain and key; without them a development CA and
signer are made under the data directory on first start (:func:`development_pair`), with one log
line saying so. c2pa embeds manifests in ISO BMFF (MP4, MOV) but defines nothing for WebM: a
WebM output is left unsigned (:func:`can_sign`).
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import c2pa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from lipsync_runner.config import CredentialsSettings
from lipsync_runner.media.digests import file_sha256

log = logging.getLogger(__name__)

DIGITAL_SOURCE_TYPE = "http://cv.iptc.org/newscodes/digitalsourcetype/compositeWithTrainedAlgorithmicMedia"
JOB_ASSERTION = "org.lipsync.job"  # our own assertion: the job, the model, the inputs' hashes
DEV_DIRNAME = "signing-dev"  # under the data directory: the development CA, chain and key
# Outputs c2pa can embed a manifest in, by suffix. WebM (Matroska) has no C2PA binding.
SIGNABLE = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime"}
# Inputs c2pa can read as ingredients (their own manifests, if any), by the demuxer the probe settled on;
# the others are described without their bytes (title, format and hash in JOB_ASSERTION).
_INGREDIENT_TYPES = {"mov": "video/mp4", "avi": "video/x-msvideo", "mp3": "audio/mpeg", "wav": "audio/wav",
                     "flac": "audio/flac"}


@dataclass(frozen=True)
class Ingredient:
    """One input of the job."""

    role: str  # "video" or "audio"
    path: Path
    title: str  # the name the user gave it
    demuxer: str | None = None  # from the probe (inputs/validation.py); None: unknown


@dataclass(frozen=True)
class Provenance:
    """Who made the output, and from what."""

    job_id: str
    model: str  # "MuseTalk"
    model_version: str  # "v1.5"
    software: str  # "lipsync-runner"
    software_version: str


def can_sign(path: Path) -> bool:
    return Path(path).suffix.lower() in SIGNABLE


class ContentSigner:
    """Signs finished outputs in place with one certificate chain and key (thread-safe: no shared state)."""

    def __init__(self, chain_pem: bytes, key_pem: bytes, alg: str = "es256", *, development: bool = False) -> None:
        self.chain_pem, self.key_pem, self.alg = chain_pem, key_pem, alg
        self.development = development
        self._signer().close()  # a bad chain, key or algorithm fails at start, not on the first job

    @classmethod
    def from_settings(cls, settings: CredentialsSettings, data_dir: Path) -> ContentSigner | None:
        """The operator's signer; a development pair when none is configured; None when switched off."""
        if not settings.content_credentials:
            return None
        if (settings.signing_cert is None) != (settings.signing_key is None):
            raise ValueError("set both LIP_SYNC_SIGNING_CERT and LIP_SYNC_SIGNING_KEY (or neither, for a "
                             "development pair)")
        if settings.signing_cert is not None and settings.signing_key is not None:
            return cls(Path(settings.signing_cert).read_bytes(), Path(settings.signing_key).read_bytes(),
                       settings.signing_alg)
        chain, key, made = development_pair(Path(data_dir) / DEV_DIRNAME)
        log.warning("content credentials: signing with a %s DEVELOPMENT certificate (%s), for development only: "
                    "verifiers will not trust it; set LIP_SYNC_SIGNING_CERT and LIP_SYNC_SIGNING_KEY for production",
                    "new" if made else "self-made", Path(data_dir) / DEV_DIRNAME)
        return cls(chain, key, "es256", development=True)

    def _signer(self) -> c2pa.Signer:
        return c2pa.Signer.from_info(c2pa.C2paSignerInfo(self.alg, self.chain_pem, self.key_pem, None))

    def sign(self, output: Path, provenance: Provenance, ingredients: list[Ingredient]) -> dict[str, Any]:
        """Embed a signed manifest in ``output`` (replaced atomically) and return it as read back."""
        output = Path(output)
        media_type = SIGNABLE[output.suffix.lower()]
        hashes_ = {i.role: file_sha256(i.path) for i in ingredients}
        definition = {
            "claim_generator_info": [{"name": provenance.software, "version": provenance.software_version}],
            "title": output.name,
            "format": media_type,
            "assertions": [
                {"label": "c2pa.actions.v2", "data": {"actions": [
                    {"action": "c2pa.opened", "parameters": {"ingredientIds": ["video"]}},
                    {"action": "c2pa.edited", "digitalSourceType": DIGITAL_SOURCE_TYPE,
                     "softwareAgent": {"name": provenance.model, "version": provenance.model_version},
                     "description": "The mouth was re-generated to match new speech (lip-sync).",
                     "parameters": {"ingredientIds": ["audio"]}},
                ]}},
                {"label": JOB_ASSERTION, "data": {
                    "job_id": provenance.job_id, "model": provenance.model,
                    "model_version": provenance.model_version,
                    "software": f"{provenance.software} {provenance.software_version}",
                    "inputs": [{"role": i.role, "title": i.title, "sha256": hashes_[i.role]} for i in ingredients]}},
            ],
        }
        # an input c2pa can parse goes in with its bytes (and any manifest of its own); the others by description
        streamed = [i for i in ingredients if i.demuxer in _INGREDIENT_TYPES]
        try:
            self._embed(output, media_type, definition, ingredients, streamed)
        except c2pa.C2paError as exc:
            if not streamed:
                raise
            log.info("content credentials: the inputs of job %s go in by description only (%s)",
                     provenance.job_id, exc)
            self._embed(output, media_type, definition, ingredients, [])
        return read_manifest(output)

    def _embed(self, output: Path, media_type: str, definition: dict[str, Any], ingredients: list[Ingredient],
               streamed: list[Ingredient]) -> None:
        definition = {**definition, "ingredients": [_ingredient(i, "application/octet-stream") for i in ingredients
                                                    if i not in streamed]}
        builder = c2pa.Builder(definition)
        tmp = output.with_name(f".{output.name}.{uuid.uuid4().hex[:12]}.part")
        try:
            for ing in streamed:
                fmt = _INGREDIENT_TYPES[ing.demuxer or ""]
                with open(ing.path, "rb") as f:
                    builder.add_ingredient(_ingredient(ing, fmt), fmt, f)
            with open(output, "rb") as src, open(tmp, "w+b") as dst, self._signer() as signer:
                builder.sign(signer, media_type, src, dst)
            os.replace(tmp, output)
        finally:
            tmp.unlink(missing_ok=True)
            builder.close()


def _ingredient(ing: Ingredient, media_type: str) -> dict[str, Any]:
    # the label is what the actions' ingredientIds name
    return {"title": ing.title, "label": ing.role, "format": media_type,
            "relationship": "parentOf" if ing.role == "video" else "inputTo"}


def read_manifest(path: Path, trust_anchors_pem: str | None = None) -> dict[str, Any] | None:
    """The file's manifest store as JSON data with c2pa's validation (None: it has none).

    ``validation_state``: Invalid (a hash or signature does not match), Valid (intact, signer not on a
    trust list), or Trusted (intact, and the signer chains to ``trust_anchors_pem``).
    """
    context = c2pa.Context.from_dict({"trust": {"trust_anchors": trust_anchors_pem}}) if trust_anchors_pem else None
    reader = c2pa.Reader.try_create(str(path), context=context) if context else c2pa.Reader.try_create(str(path))
    if reader is None:
        return None
    with reader:
        store = json.loads(reader.json())
        store["validation_state"] = reader.get_validation_state()
        return store


def development_pair(directory: Path) -> tuple[bytes, bytes, bool]:
    """(certificate chain PEM, key PEM, made now): a CA and an ES256 end-entity certificate it issued,
    as c2pa requires (the signer is not its own CA), made once and kept in ``directory``."""
    chain_path, key_path, ca_path = directory / "chain.pem", directory / "key.pem", directory / "ca.pem"
    if chain_path.is_file() and key_path.is_file():
        return chain_path.read_bytes(), key_path.read_bytes(), False
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn),
                          x509.NameAttribute(NameOID.ORGANIZATION_NAME, "lipsync-runner development (untrusted)")])

    def usage(**on: bool) -> x509.KeyUsage:
        flags = dict.fromkeys(("digital_signature", "content_commitment", "key_encipherment", "data_encipherment",
                               "key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"), False)
        return x509.KeyUsage(**{**flags, **on})

    ca_key, ee_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("lipsync-runner development CA")).issuer_name(
        name("lipsync-runner development CA")).public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256()))
    ee = (x509.CertificateBuilder().subject_name(name("lipsync-runner development signer")).issuer_name(ca.subject)
          .public_key(ee_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=1)).not_valid_after(now + datetime.timedelta(days=825))
          .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
          .add_extension(usage(digital_signature=True), critical=True)
          .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
          .add_extension(x509.SubjectKeyIdentifier.from_public_key(ee_key.public_key()), critical=False)
          .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
          .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    chain = ee.public_bytes(pem) + ca.public_bytes(pem)
    key = ee_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    for path, data, mode in ((ca_path, ca.public_bytes(pem), 0o644), (chain_path, chain, 0o644), (key_path, key, 0o600)):
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)  # key last: a pair is complete once key.pem exists
    return chain, key, True
