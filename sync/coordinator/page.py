"""The fleet page: `GET /` and its static files, and the browser's login.

GET  /               the page (static/index.html), or the login page (401) without a session
GET  /page/{file}    its script and style sheet (public: they hold no data)
GET  /login          the login form (public)
POST /login          form `token=...`: the right API token sets the session cookie, 303 to /
POST /logout         clears the cookie, 303 to /login

The page is plain files and one script (no build step, nothing from the network); the
script reads the JSON API with the session cookie (page_session.py). The cookie is accepted
for GET and HEAD only (`cookie_may_read`), so it can never send a command or create a job:
the page is read-only. With no token configured (loopback only) the page is open like the
API's reads, and /login just redirects to it.
"""

from __future__ import annotations

import functools
import importlib.resources
import logging
import time
from urllib.parse import parse_qs, urlsplit

from aiohttp import web

from dgdm.sync.coordinator import page_session
from dgdm.sync.coordinator.lograte import LogRate

log = logging.getLogger(__name__)
_REFUSED_LOG = LogRate(60.0)  # a refused login: one line per peer and reason a minute
ASSETS = {
    "app.js": "text/javascript",
    "page.css": "text/css",
}
PUBLIC_PATHS = frozenset({"/login", "/logout"} | {f"/page/{name}" for name in ASSETS})
MAX_LOGIN_BYTES = 4096
SECURITY_HEADERS = {
    # No inline script or style, nothing from elsewhere; no framing (clickjacking).
    "Content-Security-Policy": (
        "default-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-store",
}
_LOGIN_MESSAGES = {
    None: "",
    "wrong": "That is not this coordinator's API token.",
    "long": "That is longer than any token this form takes.",
    "origin": "The login form must be sent from this coordinator's own page.",
}


@functools.cache  # package files: read once, never on each request
def _static(name: str) -> bytes:
    resource = importlib.resources.files("dgdm.sync.coordinator").joinpath(f"static/{name}")
    return resource.read_bytes()


def _respond(body: bytes, content_type: str, status: int = 200) -> web.Response:
    response = web.Response(body=body, status=status, content_type=content_type)
    response.headers.update(SECURITY_HEADERS)
    return response


def _redirect(location: str) -> web.Response:
    response = web.Response(status=303, headers={"Location": location})
    response.headers.update(SECURITY_HEADERS)
    return response


def login_page(problem: str | None = None, status: int = 401) -> web.Response:
    """The plain login form; `problem` names a fixed message (never echoed input)."""
    html = _static("login.html").decode()
    html = html.replace("<!--MESSAGE-->", _LOGIN_MESSAGES[problem])
    return _respond(html.encode(), "text/html", status)


def public(request: web.Request, token: str | None) -> bool:
    """What passes the API's token check without the bearer header: the login routes and
    the static files (no data in them), and reads with a valid session cookie."""
    return request.path in PUBLIC_PATHS or (token is not None and cookie_may_read(request, token))


def cookie_may_read(request: web.Request, token: str) -> bool:
    """A valid session cookie lets a browser read (GET/HEAD), never act."""
    if request.method not in ("GET", "HEAD"):
        return False
    cookie = request.cookies.get(page_session.COOKIE_NAME)
    return page_session.valid(cookie, token, time.time())


def wants_page(request: web.Request) -> bool:
    """The page itself answers a missing session with the login form, not JSON."""
    return request.path == "/" and request.method in ("GET", "HEAD")


def _same_origin(request: web.Request) -> bool:
    """A cross-site login form is refused (login CSRF). Browsers say where a request comes
    from in Sec-Fetch-Site; Origin is the fallback, and "null" under Referrer-Policy:
    no-referrer, so it decides only when it names a host. With neither (curl), SameSite=Strict
    and the token itself suffice."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None:
        return site in ("same-origin", "none")
    origin = request.headers.get("Origin", "null")
    return origin == "null" or urlsplit(origin).netloc == request.host


def _over_https(request: web.Request) -> bool:
    """The coordinator speaks plain HTTP; behind a TLS proxy the proxy says so. A forged
    header only makes the sender's own cookie Secure."""
    return request.secure or request.headers.get("X-Forwarded-Proto") == "https"


def _log_refusal(request: web.Request, why: str) -> None:
    key = f"{request.remote} {why}"
    if _REFUSED_LOG.allow(key, time.monotonic()):
        held = _REFUSED_LOG.take_suppressed(key)
        log.warning(
            "fleet page login refused from %s: %s (%d more held back)", request.remote, why, held
        )


async def _small_body(request: web.Request) -> bytes | None:
    """The login form's body, or None beyond MAX_LOGIN_BYTES (read no further)."""
    body = b""
    while len(body) <= MAX_LOGIN_BYTES:
        chunk = await request.content.read(MAX_LOGIN_BYTES + 1 - len(body))
        if not chunk:
            return body
        body += chunk
    return None


def add_routes(app: web.Application, token: str | None) -> None:
    async def index(request: web.Request) -> web.Response:
        return _respond(_static("index.html"), "text/html")

    async def asset(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in ASSETS:
            raise web.HTTPNotFound(text='{"error": "no such file", "field": "name"}')
        return _respond(_static(name), ASSETS[name])

    async def login_form(request: web.Request) -> web.Response:
        if not token:
            return _redirect("/")
        return login_page(status=200)

    async def login(request: web.Request) -> web.Response:
        if not token:
            return _redirect("/")
        if not _same_origin(request):
            _log_refusal(request, "cross-site form")
            return login_page("origin", status=403)
        body = await _small_body(request)
        if body is None:
            return login_page("long", status=413)
        given = parse_qs(body.decode("utf-8", "replace")).get("token", [""])[0]
        if not page_session.token_matches(given, token):
            _log_refusal(request, "wrong token")
            return login_page("wrong")
        response = _redirect("/")
        response.set_cookie(
            page_session.COOKIE_NAME,
            page_session.mint(token, time.time()),
            max_age=page_session.MAX_AGE_S,
            path="/",
            httponly=True,
            samesite="Strict",
            secure=_over_https(request),
        )
        return response

    async def logout(request: web.Request) -> web.Response:
        response = _redirect("/login")
        response.del_cookie(page_session.COOKIE_NAME, path="/")
        return response

    app.router.add_get("/", index)
    app.router.add_get("/page/{name}", asset)
    app.router.add_get("/login", login_form)
    app.router.add_post("/login", login)
    app.router.add_post("/logout", logout)
