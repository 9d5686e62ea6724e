"""The session cookie's pure core: what a token mints it accepts until expiry, and nothing
else (another token's, a changed byte, a forged far expiry, any text at all)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dgdm.sync.coordinator import page_session

NOW = 1_765_000_000.0
tokens = st.text(min_size=1, max_size=64)


@given(tokens, st.floats(min_value=0, max_value=page_session.MAX_AGE_S - 1))
def test_a_minted_cookie_is_valid_until_it_expires(token: str, later: float) -> None:
    cookie = page_session.mint(token, NOW)
    assert page_session.valid(cookie, token, NOW + later)
    assert not page_session.valid(cookie, token, NOW + page_session.MAX_AGE_S)


@given(tokens, tokens)
def test_another_tokens_cookie_is_refused(token: str, other: str) -> None:
    if token != other:
        assert not page_session.valid(page_session.mint(other, NOW), token, NOW)


@given(tokens, st.integers(min_value=0), st.sampled_from("0123456789abcdef"))
def test_a_changed_character_is_refused(token: str, index: int, char: str) -> None:
    cookie = page_session.mint(token, NOW)
    i = index % len(cookie)
    changed = cookie[:i] + char + cookie[i + 1 :]
    if changed != cookie:
        assert not page_session.valid(changed, token, NOW)


def test_a_forged_far_expiry_is_refused_even_with_the_right_mac() -> None:
    """A mac for an expiry further off than any mint gives is only found with the token;
    even then the cookie is refused (no login lasts longer than MAX_AGE_S)."""
    far = int(NOW) + 10 * page_session.MAX_AGE_S
    forged = f"{far}.{page_session._mac('tok', far)}"
    assert not page_session.valid(forged, "tok", NOW)


@given(st.one_of(st.none(), st.text(max_size=200)))
def test_any_text_is_refused_without_an_error(cookie: str | None) -> None:
    assert not page_session.valid(cookie, "tok", NOW)


@given(tokens, tokens)
def test_the_login_token_must_match_exactly(token: str, given_token: str) -> None:
    assert page_session.token_matches(given_token, token) == (given_token == token)
