"""Which `Host` headers the agent answers: the defence against DNS rebinding.

A web page open in a browser on the box can make its own name (`evil.example`) resolve to
127.0.0.1 and then talk to the loopback port as a same-origin site; what it cannot change
is the `Host` header the browser sends, which names the page's site. So a request is only
answered when its Host is a loopback name or address, the bind address, or one of
`http.allowed_hosts`. Pure: strings in, a decision out.
"""

from __future__ import annotations

import functools
import ipaddress

# RFC 6761: `localhost` and every name under `.localhost` always mean the loopback
# interface (browsers resolve them without DNS), so no outside party can point them here.
LOOPBACK_NAMES = frozenset({"localhost"})
WILDCARD_BINDS = frozenset({"0.0.0.0", "::", ""})  # noqa: S104 - names them, binds nothing


def hostname(header: str) -> str:
    """The name or address of a Host header without its port, lower case, no final dot;
    an IPv6 literal without its brackets. '' for a header that is no host at all."""
    value = header.strip().lower()
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :]
        if end < 0 or (rest and not _is_port(rest)):
            return ""
        return value[1:end]
    name, sep, port = value.rpartition(":")
    if sep and ":" not in name:
        if not port.isdigit():
            return ""
        value = name
    return value.rstrip(".")


def _is_port(suffix: str) -> bool:
    return suffix.startswith(":") and suffix[1:].isdigit()


def allowed(header: str | None, bind: str, extra: frozenset[str]) -> bool:
    """Whether to answer a request carrying this Host header (None: none was sent).

    A wildcard bind with no `allowed_hosts` answers any Host: such an agent is reachable
    from the network, so its token (required there) is the defence, not the name.
    """
    if bind in WILDCARD_BINDS and not extra:
        return True
    name = hostname(header or "")
    if not name:
        return False
    if name in LOOPBACK_NAMES or name.endswith(".localhost") or name in extra:
        return True
    if name == hostname(bind):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


@functools.lru_cache(maxsize=64)
def addressed_here(header: str | None, bind: str, allowed_hosts: tuple[str, ...]) -> bool:
    """`allowed` for the configured `http.bind` and `http.allowed_hosts`. Asked on every
    request with the same few values: ~4 us parsed, ~0.2 us cached."""
    return allowed(header, bind, frozenset(hostname(name) for name in allowed_hosts))
