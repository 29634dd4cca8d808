"""The API reference at `/` and `/docs.json` is the product's, not BentoML's stock page.

In process: BentoML's own spec of the LipSync service (the `openapi_spec` its `/docs.json`
serves), rewritten by `lipsync_runner.serving.docs_page`. The browser view of `/` is in
tests/test_ui.py. The first test pins what this rewrite relies on in BentoML 1.4: when a
BentoML upgrade changes it, that test names what moved.
"""

from __future__ import annotations

import json
import re

import pytest
from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from lipsync_runner import __version__
from lipsync_runner.jobs import schemas
from lipsync_runner.api.auth import OPEN_PATHS
from lipsync_runner.serving.docs_page import (
    BENTOML_TAG,
    INFRA_TAG,
    REST_OPERATIONS,
    REST_TAG,
    SECURITY_SCHEME,
    TITLE,
    DocsPage,
    product_openapi,
)

API = "/api/lip-sync"
BENTOML_ENDPOINTS = {"/generate", "/status", "/download", "/cancel", "/cleanup", "/jobs", "/health", "/usage"}
PROBES = {"/livez", "/readyz", "/metrics"}


@pytest.fixture(scope="module")
def stock_spec() -> dict:
    import service  # cheap to import: the heavy imports live in the services' __init__

    return json.loads(json.dumps(service.LipSync.openapi_spec.asdict()))  # what BentoML's /docs.json sends


@pytest.fixture(scope="module")
def spec(stock_spec) -> dict:
    return product_openapi(stock_spec)


def operations(spec: dict):
    for path, item in spec["paths"].items():
        for method, op in item.items():
            if method in ("get", "post", "put", "delete", "patch"):
                yield method, path, op


def test_bentoml_spec_still_looks_like_what_the_rewrite_expects(stock_spec):
    """What product_openapi relies on in BentoML 1.4.40; a change here means docs_page.py needs a look."""
    assert stock_spec["info"]["version"] == "None" and "created with BentoML" in stock_spec["info"]["description"]
    assert {t["name"] for t in stock_spec["tags"]} == {"Service APIs", "Infrastructure"}
    bentoml_ops = {p for m, p, op in operations(stock_spec) if "x-bentoml-name" in op}
    assert bentoml_ops == BENTOML_ENDPOINTS
    assert PROBES <= {p for m, p, op in operations(stock_spec) if op.get("tags") == ["Infrastructure"]}
    rest = {(m, p[len(API):]) for m, p, op in operations(stock_spec) if p.startswith(API + "/")}
    assert set(REST_OPERATIONS) <= rest, "a documented REST route is gone or renamed"
    # the REST routes keep the REST app's own tags: none of them may be mistaken for a BentoML one
    assert not [p for m, p, op in operations(stock_spec) if p.startswith(API + "/")
                and {"Service APIs", "Infrastructure"} & set(op.get("tags", []))]


def test_title_version_and_description_are_the_products(spec):
    info = spec["info"]
    assert info["title"] == TITLE and info["version"] == __version__
    text = info["description"]
    assert "BentoML" not in text.split("####")[0], "the introduction is about the product"
    assert "](./ui/)" in text, "a link to the web page"
    assert "use this one" in text and REST_TAG in text and BENTOML_TAG in text  # which surface to use
    assert "contact" not in info and "servers" not in spec  # no BentoML contact, no server picker
    # no image of any kind in any text Swagger UI renders as Markdown (the stock page had five badges)
    rendered = json.dumps(spec)
    assert not re.search(r"!\[[^\]]*\]\(", rendered) and "<img" not in rendered
    assert "shields.io" not in rendered and "badgen" not in rendered


def rest_tags(spec: dict) -> list[str]:
    return [t["name"] for t in spec["tags"]][:-2]


def test_every_operation_is_tagged_by_surface_the_rest_api_first(stock_spec, spec):
    names = [t["name"] for t in spec["tags"]]
    assert names[-2:] == [BENTOML_TAG, INFRA_TAG] and rest_tags(spec), names
    own = [op["tags"][0] for _, p, op in operations(stock_spec) if p.startswith(API + "/") and op.get("tags")]
    assert set(own) <= set(rest_tags(spec)), "the REST app's own tags are kept"
    assert all("use this one" in t["description"] for t in spec["tags"][:-2])
    by_tag: dict[str, set[str]] = {}
    for _, path, op in operations(spec):
        assert len(op["tags"]) == 1, (path, op["tags"])
        by_tag.setdefault(op["tags"][0], set()).add(path)
    assert set(by_tag) == set(names)
    assert all(p.startswith(API + "/") for tag in rest_tags(spec) for p in by_tag[tag])
    assert by_tag[BENTOML_TAG] == BENTOML_ENDPOINTS
    assert PROBES <= by_tag[INFRA_TAG]
    for _, path, op in operations(spec):
        if path in BENTOML_ENDPOINTS:
            assert op["summary"].startswith("BentoML: ") and op["description"], path


def test_rest_routes_are_documented_with_examples_that_match_their_schemas(stock_spec, spec):
    documented = 0
    for (method, sub), docs in REST_OPERATIONS.items():
        op, stock = spec["paths"][API + sub][method], stock_spec["paths"][API + sub][method]
        assert op["description"] in (docs["description"], stock["description"] if "description" in stock else None)
        assert "422" not in op["responses"], "the REST app answers 400, never FastAPI's 422"
        for code in docs["examples"]:
            content = op["responses"][code]["content"]["application/json"]
            model_name = content["schema"]["$ref"].rsplit("/", 1)[-1]
            model = getattr(schemas, model_name)
            example = content["example"]
            if model.model_config.get("extra") != "allow":  # health's body is open-ended
                assert set(example) <= set(model.model_fields), (sub, code, set(example) - set(model.model_fields))
            model.model_validate(example)
            documented += 1
    assert documented >= 6
    generate = spec["paths"][f"{API}/generate"]["post"]
    assert "demo/face.mp4" in generate["description"]


def test_bentoml_error_responses_are_the_unwrapped_rest_body(spec):
    # serving/bentoml_compat.py unwraps BentoML's [{"error": ...}] into the REST API's {"error": ...}
    for _, path, op in operations(spec):
        if path in BENTOML_ENDPOINTS:
            for code, response in op["responses"].items():
                if code[0] in "45":
                    assert response["content"]["application/json"]["schema"] == {
                        "$ref": "#/components/schemas/ErrorResponse"}, (path, code)


def test_the_lock_marks_exactly_the_routes_that_ask_for_a_token(spec):
    assert spec["components"]["securitySchemes"][SECURITY_SCHEME]["scheme"] == "bearer"
    open_ones = {path for _, path, op in operations(spec) if "security" not in op}
    assert {f"{API}/health", f"{API}/params", "/health", "/livez", "/readyz"} <= open_ones
    assert open_ones <= OPEN_PATHS, "documented as open, but api/auth.py asks a token for these"
    for path in (f"{API}/generate", f"{API}/status/{{job_id}}", f"{API}/jobs", "/generate", "/status", "/metrics"):
        assert path not in open_ones, path


def test_without_tokens_no_route_is_marked_as_needing_one(stock_spec):
    """With auth off (no LIP_SYNC_API_TOKENS), the document does not ask for an Authorization header."""
    spec = product_openapi(stock_spec, auth=False)
    assert not [path for _, path, op in operations(spec) if "security" in op]


def test_the_rewrite_leaves_the_input_alone(stock_spec):
    before = json.dumps(stock_spec, sort_keys=True)
    product_openapi(stock_spec)
    assert json.dumps(stock_spec, sort_keys=True) == before


# ------------------------------------------------------------------ the middleware


def wrapped_app() -> TestClient:
    """A stand-in for BentoML's app: a stock /docs.json and / page; DocsPage around it."""

    async def docs(_):
        return JSONResponse({"openapi": "3.0.2", "info": {"title": "LipSync", "version": "None"},
                             "paths": {f"{API}/jobs": {"get": {"responses": {"200": {"description": "ok"}}}}}})

    async def index(_):
        return PlainTextResponse("stock page")

    async def other(_):
        return PlainTextResponse("other")

    inner = Starlette(routes=[Route("/docs.json", docs), Route("/", index, methods=["GET", "POST"]),
                              Route("/other", other)])
    return TestClient(DocsPage(inner))


def test_middleware_serves_our_page_and_rewrites_the_spec_only():
    with wrapped_app() as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert f"<title>{TITLE} {__version__}</title>" in page.text and 'href="./ui/"' in page.text
        assert "googletagmanager" not in page.text and "stock page" not in page.text
        csp = page.headers["content-security-policy"]
        assert "img-src 'self' data:" in csp and "script-src 'self'" in csp  # no outside image or script loads
        # every script and stylesheet is local: BentoML's Swagger UI build, or our two files
        for ref in re.findall(r'(?:src|href)="([^"]+)"', page.text):
            assert ref.startswith(("./", "data:")), ref
        for asset in re.findall(r'(?:src|href)="\./(docs-assets/[^"]+)"', page.text):
            assert client.get("/" + asset).status_code == 200, asset

        head = client.head("/")
        assert head.status_code == 200 and head.content == b""

        spec = client.get("/docs.json").json()
        assert spec["info"]["title"] == TITLE and spec["paths"][f"{API}/jobs"]["get"]["tags"] == [REST_TAG]
        assert [t["name"] for t in spec["tags"]] == [REST_TAG, BENTOML_TAG, INFRA_TAG]

        assert client.get("/other").text == "other"
        assert client.post("/").text == "stock page"  # only GET and HEAD are ours
        assert client.get("/docs-assets/nope.js").status_code == 404  # not ours: passed on
