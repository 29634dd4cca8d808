"""The browser page at ``/ui``: static HTML, CSS and JavaScript, no build step.

The page talks only to the public REST API under ``/api/lip-sync`` (see ``static/app.js``), so
it doubles as a reference client. ``create_ui_app()`` is a plain ASGI app that serves the files
with a strict Content-Security-Policy; ``service.py`` mounts it with ``bentoml.asgi_app``. The
auth middleware leaves ``/ui`` open: the page holds no data, and every API call it makes
carries the token the user enters.
"""

from __future__ import annotations

from pathlib import Path

from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")

# Same-origin scripts, styles and API calls only; blob: for the local previews and the result video.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "media-src 'self' blob:; connect-src 'self'; form-action 'self'; base-uri 'self'; frame-ancestors 'none'")
HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-cache"),  # revalidate (ETag) so a redeploy shows up at once
]


class UiApp:
    """ASGI app: the files in ``directory`` (``index.html`` at the mount root) plus the headers above."""

    def __init__(self, directory: Path | str = STATIC_DIR) -> None:
        # check_dir=False: a build without the files answers 404/500 under /ui, never breaks the import
        self.files = StaticFiles(directory=directory, html=True, check_dir=False)

    async def __call__(self, scope, receive, send) -> None:
        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *HEADERS]}
            await send(message)

        await self.files(scope, receive, send_with_headers)


def create_ui_app() -> UiApp:
    return UiApp()
