"""The page's files as installed: no HTML sink in the script, nothing inline in the HTML
(the CSP would block it), nothing loaded from elsewhere."""

from __future__ import annotations

import importlib.resources
import re

import pytest

STATIC = importlib.resources.files("dgdm.sync.coordinator").joinpath("static")
SINKS = ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "Function(")


def test_the_script_never_parses_strings_as_html() -> None:
    code = "\n".join(
        line
        for line in STATIC.joinpath("app.js").read_text().splitlines()
        if not line.lstrip().startswith("//")
    )
    assert [sink for sink in SINKS if sink in code] == []


@pytest.mark.parametrize("name", ["index.html", "login.html"])
def test_the_html_has_nothing_inline_and_nothing_from_elsewhere(name: str) -> None:
    html = STATIC.joinpath(name).read_text()
    assert re.findall(r"<script(?![^>]*\bsrc=)[^>]*>", html) == []  # no inline script
    assert re.findall(r"<style|\sstyle=|\son[a-z]+=", html) == []  # no inline style or handler
    assert re.findall(r"(?:src|href)=\"(?!/|#)", html) == []  # same origin only
