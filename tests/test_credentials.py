"""Content credentials: each MP4 result carries a signed C2PA manifest that c2pa's own reader validates.

A job through the real server (tiny models on the CPU, credentials on by default, no operator
certificate: the development pair). The manifest names the job, the model and both inputs; one
changed byte of the video stream is reported as a hash mismatch; `lipsync verify` says both.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import c2pa
import pytest

from lipsync_client import LipSyncClient, NotFound
from lipsync_client.credentials import verify_file
from lipsync_runner.media.credentials import DIGITAL_SOURCE_TYPE, JOB_ASSERTION, read_manifest
from lipsync_runner.media.samples import write_speech_like_audio

from .server import ROOT, Server, running_server


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir) -> Server:
    with running_server(tmp_path_factory.mktemp("credentials-server"), models_dir) as srv:
        yield srv


@pytest.fixture(scope="module")
def signed_job(server, media_dir, tmp_path_factory):
    """One completed job (video face.mp4, audio interview take 2.wav) and its downloaded result."""
    root = tmp_path_factory.mktemp("signed")
    audio = write_speech_like_audio(root / "interview take 2.wav", seconds=0.6)
    with LipSyncClient(server.url, timeout=120) as client:
        job = client.generate(media_dir / "face.mp4", audio, wait=True)
        out = client.download(job.job_id, root / "out.mp4")
        served = client.credentials(job.job_id)
    return job, out, served


def active(store: dict) -> dict:
    return store["manifests"][store["active_manifest"]]


def assertion(manifest: dict, label: str) -> dict:
    return next(a["data"] for a in manifest["assertions"] if a["label"] == label)


def test_the_result_reads_back_valid_and_names_the_job_the_model_and_both_inputs(signed_job, server):
    job, out, served = signed_job
    store = read_manifest(out)  # c2pa's Reader
    assert store is not None and store["validation_state"] == "Valid"  # intact; the dev signer is on no trust list
    manifest = active(store)
    actions = assertion(manifest, "c2pa.actions.v2")["actions"]
    assert [a["action"] for a in actions] == ["c2pa.opened", "c2pa.edited"]
    assert actions[1]["digitalSourceType"] == DIGITAL_SOURCE_TYPE
    assert actions[1]["softwareAgent"] == {"name": "MuseTalk", "version": "v1.5"}  # the tiny models are v1.5
    made = assertion(manifest, JOB_ASSERTION)
    assert made["job_id"] == job.job_id and made["model"] == "MuseTalk" and made["model_version"] == "v1.5"
    assert [(i["role"], i["title"]) for i in made["inputs"]] == [("video", "face.mp4"),
                                                                 ("audio", "interview take 2.wav")]
    assert all(len(i["sha256"]) == 64 for i in made["inputs"])
    assert {(i["title"], i["relationship"]) for i in manifest["ingredients"]} == {
        ("face.mp4", "parentOf"), ("interview take 2.wav", "inputTo")}
    # GET .../credentials serves the same manifest
    assert served["active_manifest"] == store["active_manifest"] and served["validation_state"] == "Valid"
    assert assertion(active(served), JOB_ASSERTION) == made
    # no operator certificate: a development pair, said once in the log
    assert server.log.read_text().count("DEVELOPMENT certificate") == 1
    trusted = read_manifest(out, (server.data_dir / "signing-dev" / "ca.pem").read_text())
    assert trusted["validation_state"] == "Trusted"


def mdat_payload(data: bytes) -> tuple[int, int]:
    """[start, end) of the mdat box's payload (the coded video and audio) in an MP4."""
    pos = 0
    while pos < len(data):
        size, kind = struct.unpack(">I4s", data[pos:pos + 8])
        if kind == b"mdat":
            return pos + 8, pos + size
        pos += size
    raise AssertionError("no mdat box")


def test_one_changed_byte_of_the_video_stream_is_a_hash_mismatch(signed_job, tmp_path):
    _, out, _ = signed_job
    data = bytearray(out.read_bytes())
    start, end = mdat_payload(bytes(data))
    data[(start + end) // 2] ^= 0x01
    tampered = tmp_path / "tampered.mp4"
    tampered.write_bytes(bytes(data))
    with c2pa.Reader(str(tampered)) as reader:
        assert reader.get_validation_state() == "Invalid"
        failures = reader.get_validation_results()["activeManifest"]["failure"]
    assert "assertion.bmffHash.mismatch" in {f["code"] for f in failures}
    assert [f["code"] for f in verify_file(tampered).mismatches] == ["assertion.bmffHash.mismatch"]


def lipsync(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LIPSYNC_SERVER", "LIPSYNC_TOKEN")}
    return subprocess.run([sys.executable, "-m", "lipsync_client.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_lipsync_verify_checks_a_file(signed_job, tmp_path, media_dir):
    job, out, _ = signed_job
    ok = lipsync("verify", str(out))
    assert ok.returncode == 0, ok.stderr
    assert f"{out}: Valid" in ok.stdout and job.job_id in ok.stdout and "compositeWithTrainedAlgorithmicMedia" in ok.stdout
    data = bytearray(out.read_bytes())
    start, end = mdat_payload(bytes(data))
    data[start + 16] ^= 0xFF
    (tmp_path / "changed.mp4").write_bytes(bytes(data))
    changed = lipsync("verify", str(tmp_path / "changed.mp4"), "--json")
    assert changed.returncode == 1 and json.loads(changed.stdout)["validation_state"] == "Invalid"
    unsigned = lipsync("verify", str(media_dir / "face.mp4"))
    assert unsigned.returncode == 3 and "no content credentials" in unsigned.stdout


def test_a_webm_result_carries_none_and_its_credentials_say_why(server, media_dir, signed_job):
    with LipSyncClient(server.url, timeout=120) as client:
        job = client.generate(media_dir / "face.mp4", media_dir / "speech_short.wav", wait=True,
                              output_format="webm", quality="draft", output_height=120)
        assert job.completed
        with pytest.raises(NotFound, match="webm"):
            client.credentials(job.job_id)


def test_verify_without_c2pa_says_what_to_install(monkeypatch, media_dir, capsys):
    from lipsync_client import cli
    from lipsync_client.credentials import INSTALL_HINT

    monkeypatch.setitem(sys.modules, "c2pa", None)  # as if c2pa-python were not installed: its import fails
    assert cli.main(["verify", str(media_dir / "face.mp4")]) == cli.BAD_INPUT
    assert capsys.readouterr().err.strip() == f"error: {INSTALL_HINT}"
