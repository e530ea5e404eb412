"""The page's HTTP side, in process (no browser needed): ``/`` and its assets
are served without an API key, with the headers the page relies on, while
the API around them stays protected."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from quart_trio import QuartTrio

from server.settings import Settings
from server.web.app import create_app
from server.web.page import STATIC_DIR


@pytest.fixture
async def app() -> AsyncIterator[QuartTrio]:
    app = create_app(Settings(data_dir=""))
    async with app.test_app():
        yield app


async def test_page_is_served_without_an_api_key(app: QuartTrio) -> None:
    response = await app.test_client().get("/")
    assert response.status_code == 200
    assert response.mimetype == "text/html"
    body = await response.get_data(as_text=True)
    assert '<script src="/static/app.js" defer></script>' in body
    assert 'id="api-key"' in body
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "connect-src 'self'" in policy
    assert response.headers["Cache-Control"] == "no-cache"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    ("name", "mimetype"), [("app.js", "text/javascript"), ("style.css", "text/css")]
)
async def test_assets_are_served_and_revalidated(app: QuartTrio, name: str, mimetype: str) -> None:
    response = await app.test_client().get(f"/static/{name}")
    assert response.status_code == 200
    assert response.mimetype == mimetype
    assert await response.get_data() == (STATIC_DIR / name).read_bytes()
    assert response.headers["Cache-Control"] == "no-cache"
    assert "Expires" not in response.headers
    assert response.headers["ETag"]


@pytest.mark.parametrize("path", ["/static/missing.js", "/static/../app.py", "/static/"])
async def test_only_the_static_folder_is_served(app: QuartTrio, path: str) -> None:
    response = await app.test_client().get(path)
    assert response.status_code == 404
    assert (await response.get_json())["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/runs/run-1"),
        ("GET", "/v1/runs/run-1/events"),
        ("POST", "/v1/runs/run-1/cancel"),
        ("GET", "/v1/sessions/s-1"),
    ],
)
async def test_the_api_still_needs_a_key(app: QuartTrio, method: str, path: str) -> None:
    response = await app.test_client().open(path, method=method, json={"prompt": "x"})
    assert response.status_code == 401
    assert (await response.get_json())["error"]["code"] == "unauthorized"
