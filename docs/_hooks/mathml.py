"""MkDocs hook: the equations as MathML, written at build time (no JavaScript, no network).

``pymdownx.arithmatex`` (generic mode) leaves ``\\(…\\)`` in ``<span class="arithmatex">`` and
``\\[…\\]`` in ``<div class="arithmatex">``; this hook converts each one with ``latex2mathml``,
which every current browser renders natively. Aligned rows (``&`` and ``\\\\``) become one
displayed line each. An equation ``latex2mathml`` cannot convert stays as its TeX source in a
``<code>`` element, so the page still reads.
"""

from __future__ import annotations

import html
import re
from typing import Any

from latex2mathml.converter import convert

_MATH = re.compile(
    r'<(?P<tag>span|div) class="arithmatex">\s*(?:\\\((?P<inline>.*?)\\\)|\\\[(?P<block>.*?)\\\])'
    r"\s*</(?P=tag)>",
    re.DOTALL,
)
_ENVIRONMENT = re.compile(r"\\(?:begin|end)\{(?:aligned|align\*?|split|gathered)\}")


def on_page_content(content: str, page: Any, config: Any, files: Any) -> str:
    return _MATH.sub(_replace, content)


def _replace(match: re.Match[str]) -> str:
    if match["inline"] is not None:
        return _convert(html.unescape(match["inline"]), display="inline")
    tex = _ENVIRONMENT.sub("", html.unescape(match["block"]))
    lines = [line.replace("&", " ") for line in re.split(r"\\\\", tex) if line.strip()]
    return '<div class="math-block">' + "".join(_convert(t, "block") for t in lines) + "</div>"


def _convert(tex: str, display: str) -> str:
    try:
        return convert(tex.strip(), display=display)
    except Exception:  # an unsupported command: show the source rather than fail the build
        tag = "code" if display == "inline" else "pre"
        return f'<{tag} class="arithmatex-source">{html.escape(tex.strip())}</{tag}>'
