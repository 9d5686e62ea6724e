"""Device tags (`key=value`): parsing and the rules, with no I/O.

- A key is 1..32 of `[a-z0-9_.-]`, starting with a letter or digit (`site`, `hw.rev`):
  lower case so that `Site` and `site` cannot both exist, no `=` so `k=v` splits once.
- A value is 1..64 printable characters (`str.isprintable`: no control characters, no
  newline; spaces and `=` are fine, `site=a=b` is key `site`, value `a=b`).
- At most 16 tags per device, so that a hostile or mistaken script cannot make the fleet
  list heavy.

Every error is a `TagError` naming the offending tag (its `field`), for a 400 or an exit 2.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from dgdm.sync.errors import SyncError

MAX_TAGS = 16
MAX_KEY = 32
MAX_VALUE = 64
_KEY = re.compile(r"[a-z0-9][a-z0-9_.-]{0,31}")


class TagError(SyncError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def check_key(key: object) -> str:
    if not isinstance(key, str) or not _KEY.fullmatch(key):
        raise TagError(
            f"tag {key!r}",
            f"a tag key is 1..{MAX_KEY} of [a-z0-9_.-], starting with a letter or digit",
        )
    return key


def check_value(key: str, value: object) -> str:
    if not isinstance(value, str) or not 1 <= len(value) <= MAX_VALUE or not value.isprintable():
        raise TagError(f"tag {key!r}", f"a tag value is 1..{MAX_VALUE} printable characters")
    return value


def parse_tag(text: str) -> tuple[str, str]:
    """`key=value` -> (key, value)."""
    key, sep, value = text.partition("=")
    if not sep:
        raise TagError(f"tag {text!r}", "write key=value")
    return check_key(key), check_value(key, value)


def parse_tags(texts: Iterable[str]) -> dict[str, str]:
    """Several `key=value` (a key given twice: the last wins); at most MAX_TAGS."""
    tags = dict(parse_tag(t) for t in texts)
    return check_count(tags)


def check_tags(tags: object) -> dict[str, str]:
    """A JSON object of tags (as `POST /jobs` gives them), checked."""
    if not isinstance(tags, Mapping):
        raise TagError("tags", "must be an object of key: value strings")
    checked = {check_key(k): check_value(k, v) for k, v in tags.items()}
    return check_count(checked)


def check_count(tags: Mapping[str, str]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise TagError("tags", f"a device has at most {MAX_TAGS} tags ({len(tags)} given)")
    return dict(tags)


def merged(
    current: Mapping[str, str], add: Mapping[str, str], remove: Iterable[str] = ()
) -> dict[str, str]:
    """A device's tags after `tag` (add, replacing values) and `untag` (remove): the
    count is checked on the result, so a 17th tag is refused naming it."""
    result = {k: v for k, v in current.items() if k not in set(remove)}
    for key, value in add.items():
        if key not in result and len(result) >= MAX_TAGS:
            raise TagError(f"tag {key!r}", f"a device has at most {MAX_TAGS} tags")
        result[key] = value
    return result
