"""The chat page: ``GET /`` answers ``static/index.html``; its script and
style are Quart's static route (``/static/<file>``) over the same folder,
which ships inside the package.

Neither needs an API key: the page holds no data and asks for the key
itself (kept in the browser's ``localStorage``); every API route it calls
still authenticates. The page only talks to its own origin, which its
Content-Security-Policy states.
"""

from __future__ import annotations

from pathlib import Path

from quart import Response, request
from quart_trio import QuartTrio

STATIC_DIR = Path(__file__).parent / "static"

PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}
# The page and its assets are revalidated (ETag) on every load, so a new
# server version never meets a cached script of the old one.
ASSET_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}


def install_page(app: QuartTrio) -> None:
    # The static route exists because create_app roots the app next to
    # STATIC_DIR; say so loudly if that ever changes.
    if app.static_folder is None or Path(app.static_folder) != STATIC_DIR:
        raise RuntimeError(f"the app's static folder must be {STATIC_DIR}")

    @app.get("/")
    async def chat_page() -> Response:
        response = await app.send_static_file("index.html")
        response.headers.update(PAGE_HEADERS)
        return response

    @app.after_request
    async def asset_headers(response: Response) -> Response:  # noqa: ASYNC124
        if request.endpoint in ("chat_page", "static"):
            response.headers.update(ASSET_HEADERS)
            response.headers.pop("Expires", None)
        return response
