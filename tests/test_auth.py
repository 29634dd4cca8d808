"""Optional bearer-token auth on both API surfaces, and jobs scoped to the token that made them."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from lipsync_runner.config import AuthSettings
from lipsync_runner.api.auth import TokenSet, owner_of

from .server import running_server
from .test_service import API, upload, wait_done

A, B = "token-a-0123456789", "token-b-9876543210"


def test_tokens_come_from_the_environment_and_a_rotatable_file(tmp_path: Path):
    file = tmp_path / "tokens"
    file.write_text("# one per line\nfile-token-1\n\n")
    tokens = TokenSet(AuthSettings(api_tokens="env-token", api_tokens_file=file))
    assert tokens.enabled and tokens.match("env-token") and tokens.match("file-token-1")
    assert not tokens.match("") and not tokens.match("# one per line") and not tokens.match("env-token ")
    file.write_text("file-token-2\n")
    import os
    os.utime(file, (time.time() + 5, time.time() + 5))  # a Secret update changes the mtime
    assert tokens.match("file-token-2") and not tokens.match("file-token-1")


def test_auth_is_off_without_tokens():
    assert not TokenSet(AuthSettings(api_tokens="", api_tokens_file=None)).enabled


@pytest.mark.parametrize("value", [",", " , ,", ",,,"])
def test_a_token_list_of_only_separators_refuses_to_start(value):
    with pytest.raises(ValueError, match="holds no token"):
        AuthSettings(api_tokens=value)


def test_an_unreadable_tokens_file_keeps_the_last_good_set(tmp_path: Path, caplog):
    file = tmp_path / "tokens"
    file.write_text("good-token\n")
    tokens = TokenSet(AuthSettings(api_tokens_file=file))
    assert tokens.match("good-token")
    file.unlink()  # a Secret being replaced, or a permission slip: not a reason to lock everyone out
    with caplog.at_level("ERROR"):
        assert tokens.match("good-token") and not tokens.match("other")
    assert "keeping the last good set" in caplog.text
    file.write_text("")  # readable and empty means what it says
    import os
    os.utime(file, (time.time() + 10, time.time() + 10))
    assert not tokens.match("good-token")


def test_a_rewrite_within_one_mtime_tick_is_still_seen(tmp_path: Path):
    file = tmp_path / "tokens"
    file.write_text("first-token\n")
    clock = [0.0]
    tokens = TokenSet(AuthSettings(api_tokens_file=file), clock=lambda: clock[0])
    stamp = file.stat().st_mtime_ns
    file.write_text("second-token-longer\n")
    import os
    os.utime(file, ns=(stamp, stamp))  # same mtime as before: only the size tells
    assert tokens.match("second-token-longer")
    file.write_text("third-token-longer!\n")  # same size and same mtime: the periodic re-read tells
    os.utime(file, ns=(stamp, stamp))
    assert tokens.match("second-token-longer")
    clock[0] += 60
    assert tokens.match("third-token-longer!") and not tokens.match("second-token-longer")


def _asgi_app_behind_auth(**settings):
    from lipsync_runner.api.auth import BearerAuthMiddleware

    seen = []

    async def app(scope, receive, send):
        seen.append(scope["path"])
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return BearerAuthMiddleware(app, AuthSettings(api_tokens=A, **settings)), seen


def test_open_paths_are_exact_and_websockets_need_a_token():
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    app, seen = _asgi_app_behind_auth()
    c = TestClient(app)
    assert c.get("/ui").status_code == 200 and c.get("/ui/app.js").status_code == 200
    for closed in ("/uiX", "/ui-admin/secrets", "/metrics", "/api/lip-sync/jobs"):
        assert c.get(closed).status_code == 401, closed
    assert c.get("/metrics", headers={"Authorization": f"Bearer {A}"}).status_code == 200
    assert c.get("/api/lip-sync/openapi.json").status_code == 200  # the schema is open, as documented
    # refused with a close code that says why (a close before the handshake is a bare HTTP 403)
    for offered in ([], ["lipsync.live", "bearer.wrong"]):
        with c.websocket_connect("/anything", subprotocols=offered) as ws:
            with pytest.raises(WebSocketDisconnect) as refused:
                ws.receive_text()
        assert refused.value.code == 4401
    with c.websocket_connect("/anything", headers={"Authorization": f"Bearer {A}"}):
        pass
    # a browser cannot set headers on a WebSocket: it offers the token as the subprotocol bearer.<token>
    with c.websocket_connect("/anything", subprotocols=["lipsync.live", f"bearer.{A}"]):
        pass
    assert seen.count("/anything") == 2  # only the authenticated websockets reached the app
    open_metrics, _ = _asgi_app_behind_auth(open_metrics=True)
    assert TestClient(open_metrics).get("/metrics").status_code == 200


def test_owner_ids_do_not_reveal_the_token():
    assert owner_of(A) != owner_of(B) and A not in owner_of(A) and len(owner_of(A)) == 24


@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    with running_server(tmp_path_factory.mktemp("auth"), models_dir, LIP_SYNC_API_TOKENS=f"{A},{B}",
                        LIP_SYNC_SCOPE_JOBS_TO_TOKEN="true") as srv:
        yield srv


def client(server, token: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=server.url, headers=headers, timeout=120)


def test_health_and_probes_stay_open_without_other_tenants_counts(server):
    with client(server, None) as c:
        health = c.get(f"{API}/health")
        assert health.status_code == 200 and health.json()["auth"] is True
        assert "jobs" not in health.json()  # every tenant's job counts: not for anonymous callers
        assert c.get("/readyz").status_code == 200 and c.get("/livez").status_code == 200
        assert "jobs" not in c.post("/health", json={}).json()
        assert c.get("/metrics").status_code == 401
    with client(server, A) as c:
        assert "completed" in c.get(f"{API}/health").json()["jobs"]
        assert "jobs" in c.post("/health", json={}).json()


@pytest.mark.parametrize("token", [None, "wrong-token", A + "x"])
def test_job_endpoints_need_a_valid_token_on_both_surfaces(server, media_dir, token):
    with client(server, token) as c:
        responses = [upload(c, media_dir / "face.mp4", media_dir / "speech_short.wav"),
                     c.get(f"{API}/jobs"), c.get(f"{API}/status/00000000-0000-4000-8000-000000000000"),
                     c.post("/jobs", json={}), c.post("/status", json={"job_id": "x"})]
    for r in responses:
        assert r.status_code == 401, r.text
        assert r.json() == {"error": "Missing or invalid API token"}
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_tokens_jobs_are_invisible_to_other_tokens(server, media_dir, tmp_path):
    with client(server, A) as a, client(server, B) as b:
        job_id = upload(a, media_dir / "face.mp4", media_dir / "speech_short.wav").json()["job_id"]
        assert wait_done(a, job_id)["status"] == "completed"
        assert a.get(f"{API}/download/{job_id}").status_code == 200
        # B cannot see, read, download, cancel or delete it: 404 as if it did not exist
        assert b.get(f"{API}/status/{job_id}").status_code == 404
        assert b.get(f"{API}/download/{job_id}").status_code == 404
        assert b.post(f"{API}/cancel/{job_id}").status_code == 404
        assert b.delete(f"{API}/cleanup/{job_id}").status_code == 404
        assert b.post("/status", json={"job_id": job_id}).status_code == 404
        assert job_id not in [j["job_id"] for j in b.get(f"{API}/jobs").json()["jobs"]]
        assert job_id not in [j["job_id"] for j in b.post("/jobs", json={}).json()["jobs"]]
        assert job_id in [j["job_id"] for j in a.get(f"{API}/jobs").json()["jobs"]]
        assert a.delete(f"{API}/cleanup/{job_id}").status_code == 200
