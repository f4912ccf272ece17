"""The web page at `/`: one static HTML file (vanilla JS and CSS inline, no build step, nothing from a CDN) that
mints an adapter, lists its nearest experts, compares it with the base model on a prompt and downloads it —
all through the public API, with the API key the user types in."""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

router = APIRouter(tags=["web"], include_in_schema=False)

CSP = (
    "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
    "img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
"""The page loads nothing from elsewhere and talks only to this service; it may not be framed."""


@cache
def page() -> str:
    """The page's HTML, read once from the package data (service/static/index.html)."""
    return resources.files("loramint.service").joinpath("static/index.html").read_text(encoding="utf-8")


@router.get("/", response_class=HTMLResponse)
def index() -> HTMLResponse:
    """The web page. It is public under every `auth` setting: it holds no data, and the API calls it makes
    carry the key typed into it."""
    return HTMLResponse(page(), headers={"Content-Security-Policy": CSP, "Cache-Control": "no-cache"})
