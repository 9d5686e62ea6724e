"""The page's routes and its login over plain HTTP against the shared real coordinator:
security headers, the cookie's attributes, what the cookie may and may not do."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator

import aiohttp
import pytest
import pytest_asyncio

from dgdm.sync.coordinator import page_session
from tests.page.conftest import TOKEN, Fleet

pytestmark = pytest.mark.asyncio(loop_scope="module")

COOKIE = page_session.COOKIE_NAME


@pytest_asyncio.fixture(loop_scope="module")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    # DummyCookieJar: every request says exactly which cookie it carries
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def assert_page_headers(headers: dict[str, str] | aiohttp.typedefs.LooseHeaders) -> None:
    assert headers["Content-Security-Policy"].startswith("default-src 'self'")
    assert "'unsafe-inline'" not in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert headers["Referrer-Policy"] == "no-referrer"


def tampered(cookie: str) -> str:
    return cookie[:-1] + ("1" if cookie.endswith("0") else "0")


async def login(http: aiohttp.ClientSession, fleet: Fleet, token: str) -> aiohttp.ClientResponse:
    async with http.post(
        fleet.base + "/login", data={"token": token}, allow_redirects=False
    ) as response:
        await response.read()
        return response


async def test_without_a_session_the_page_is_the_login_form(
    http: aiohttp.ClientSession, fleet: Fleet
) -> None:
    async with http.get(fleet.base + "/") as response:
        assert response.status == 401
        assert response.content_type == "text/html"
        body = await response.text()
        assert_page_headers(response.headers)
    assert 'action="/login"' in body
    assert not any(device_id in body for device_id in fleet.ids.values())


@pytest.mark.parametrize(
    ("name", "content_type"), [("app.js", "text/javascript"), ("page.css", "text/css")]
)
async def test_the_static_files_are_public_and_typed(
    http: aiohttp.ClientSession, fleet: Fleet, name: str, content_type: str
) -> None:
    async with http.get(f"{fleet.base}/page/{name}") as response:
        assert response.status == 200
        assert response.content_type == content_type
        assert_page_headers(response.headers)
    async with http.get(f"{fleet.base}/page/index.html") as response:
        assert response.status == 401  # only the listed assets are public


async def test_a_wrong_token_sets_no_cookie(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    response = await login(http, fleet, "wrong")
    assert response.status == 401
    assert "Set-Cookie" not in response.headers


async def test_refused_logins_are_logged_rarely_and_never_with_the_token_given(
    http: aiohttp.ClientSession, fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="dgdm.sync.coordinator.page"):
        for _ in range(5):
            assert (await login(http, fleet, "guess-0xC0FFEE")).status == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "dgdm.sync.coordinator.page"]
    assert len(lines) <= 1, lines  # one a minute per peer (an earlier test may have had it)
    assert not any("C0FFEE" in line for line in caplog.text.splitlines())


async def test_the_right_token_sets_a_strict_http_only_cookie(
    http: aiohttp.ClientSession, fleet: Fleet
) -> None:
    response = await login(http, fleet, TOKEN)
    assert response.status == 303
    assert response.headers["Location"] == "/"
    cookie = response.cookies[COOKIE]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["path"] == "/"
    assert int(cookie["max-age"]) == page_session.MAX_AGE_S
    assert TOKEN not in cookie.value  # the cookie is not the token
    assert page_session.valid(cookie.value, TOKEN, time.time())
    assert not cookie["secure"]  # plain HTTP: a Secure cookie would never come back
    async with http.post(
        fleet.base + "/login",
        data={"token": TOKEN},
        headers={"X-Forwarded-Proto": "https"},  # behind a TLS proxy
        allow_redirects=False,
    ) as behind_tls:
        assert behind_tls.cookies[COOKIE]["secure"]


@pytest.mark.parametrize(
    "headers",
    [{"Sec-Fetch-Site": "cross-site"}, {"Origin": "http://evil.example"}],
    ids=["sec-fetch-site", "origin"],
)
async def test_a_cross_site_login_is_refused(
    http: aiohttp.ClientSession, fleet: Fleet, headers: dict[str, str]
) -> None:
    async with http.post(
        fleet.base + "/login", data={"token": TOKEN}, headers=headers, allow_redirects=False
    ) as response:
        assert response.status == 403
        assert "Set-Cookie" not in response.headers


async def test_an_oversized_login_body_is_refused(
    http: aiohttp.ClientSession, fleet: Fleet
) -> None:
    response = await login(http, fleet, "x" * 10_000)
    assert response.status == 413

    async def endless() -> AsyncIterator[bytes]:  # chunked: no Content-Length to go by
        yield b"token="
        for _ in range(64):
            yield b"x" * 1024

    async with http.post(
        fleet.base + "/login",
        data=endless(),
        headers={"Content-Type": "application/x-www-form-urlencoded"},
        allow_redirects=False,
    ) as chunked:
        assert chunked.status == 413


async def test_the_cookie_reads_but_never_acts(http: aiohttp.ClientSession, fleet: Fleet) -> None:
    cookie = {COOKIE: page_session.mint(TOKEN, time.time())}
    async with http.get(fleet.base + "/devices", cookies=cookie) as response:
        assert response.status == 200
        assert {d["device_id"] for d in (await response.json())["devices"]} >= set(
            fleet.ids.values()
        )
    async with http.head(fleet.base + "/", cookies=cookie) as response:
        assert response.status == 200
    berlin = fleet.ids["berlin"]
    async with http.post(
        f"{fleet.base}/devices/{berlin}/commands", json={"cmd": "ping"}, cookies=cookie
    ) as response:
        assert response.status == 401
        assert (await response.json())["field"] == "Authorization"
    assert await fleet.coordinator.command(berlin, fleet.command_seq + 1) is None
    job = {"target": "all", "command": {"cmd": "ping"}}
    async with http.post(f"{fleet.base}/jobs", json=job, cookies=cookie) as response:
        assert response.status == 401
    async with http.post(f"{fleet.base}/jobs/{fleet.job_id}/cancel", cookies=cookie) as response:
        assert response.status == 401
    assert [j["id"] for j in await fleet.coordinator.list_jobs(10)] == [fleet.job_id]
    assert (await fleet.coordinator.job(fleet.job_id))["state"] == "running"


@pytest.mark.parametrize(
    "cookie",
    [
        page_session.mint(TOKEN, time.time() - page_session.MAX_AGE_S - 1),  # expired
        page_session.mint("another-token", time.time()),
        tampered(page_session.mint(TOKEN, time.time())),
    ],
    ids=["expired", "other-token", "tampered"],
)
async def test_a_bad_cookie_reads_nothing(
    http: aiohttp.ClientSession, fleet: Fleet, cookie: str
) -> None:
    async with http.get(fleet.base + "/devices", cookies={COOKIE: cookie}) as response:
        assert response.status == 401
    async with http.get(fleet.base + "/", cookies={COOKIE: cookie}) as response:
        assert response.status == 401
        body = await response.text()
    assert not any(device_id in body for device_id in fleet.ids.values())


async def test_the_bearer_token_still_reads_and_logout_clears_the_cookie(
    http: aiohttp.ClientSession, fleet: Fleet
) -> None:
    async with http.get(fleet.base + "/", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
        assert r.status == 200
        assert "/page/app.js" in await r.text()
    async with http.post(fleet.base + "/logout", allow_redirects=False) as response:
        assert response.status == 303
        assert response.cookies[COOKIE].value == ""
