"""A serving process's way to the agent: a request it does not answer itself goes, as it
came, to the agent's unix socket, and the agent's answer comes back as it was given.

The request keeps its method, path, query, headers (Host and Authorization too: the agent
checks them again) and body, minus the hop-by-hop headers; the answer keeps its status,
headers and body, streamed both ways. An agent that does not answer is a 503 with
Retry-After, in the form of the path (`{"error": sentence}` under `/v2`).
"""

from __future__ import annotations

import logging
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger(__name__)

# RFC 9110 §7.6.1, and what the two servers set for themselves.
_NOT_PASSED = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "expect",
    }
)
_NOT_RETURNED = _NOT_PASSED | {"content-length", "date", "server"}
CHUNK = 64 * 1024
UNAVAILABLE = "the agent's main process did not answer: retry"


class AgentProxy:
    def __init__(self, socket_path: str, connections: int = 64) -> None:
        self.socket_path = socket_path
        self.connections = connections
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.UnixConnector(path=self.socket_path, limit=self.connections)
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=5.0)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, cookie_jar=_NoCookies()
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def forward(self, request: web.Request, body: bytes | None = None) -> web.StreamResponse:
        """`request` as the agent answers it; `body` when it was read already."""
        assert self._session is not None, "start() comes first"
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in _NOT_PASSED
        )
        data: Any = body if body is not None else (request.content if request.body_exists else None)
        url = f"http://agent{request.rel_url}"
        try:
            async with self._session.request(
                request.method, url, headers=headers, data=data, allow_redirects=False
            ) as upstream:
                return await _relay(request, upstream)
        except (aiohttp.ClientError, ConnectionRefusedError, FileNotFoundError) as exc:
            log.warning("request not passed on to the agent", extra={"error": repr(exc)})
            return _unavailable(request)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
    for name, value in upstream.headers.items():
        if name.lower() not in _NOT_RETURNED:
            response.headers.add(name, value)
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_chunked(CHUNK):
            await response.write(chunk)
    except (aiohttp.ClientError, OSError) as exc:  # begun: the client sees it cut off
        raise ConnectionResetError("the agent's answer broke off") from exc
    await response.write_eof()
    return response


def _unavailable(request: web.Request) -> web.Response:
    from dgdm.agent.jsonio import dumps

    body = {"error": UNAVAILABLE} if request.path.startswith("/v2") else {
        "error": "unavailable", "message": UNAVAILABLE}  # fmt: skip
    return web.Response(
        status=503, body=dumps(body), content_type="application/json", headers={"Retry-After": "1"}
    )


class _NoCookies(aiohttp.DummyCookieJar):
    """Cookies are the client's business: none is kept between requests."""
