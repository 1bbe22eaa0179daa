"""A griffe extension for the API reference: the reST bits of lorsum's Google-style docstrings.

lorsum's docstrings are Google style (``Args:``, ``Returns:``, ``Raises:``) with a few reST
directives and roles, which griffe leaves as they are. Before the docstrings are parsed, this
rewrites, in the docstring text only (the sources are untouched):

* ``.. math::`` and its indented block into a ``$$ … $$`` block, which ``pymdownx.arithmatex``
  picks up (and ``docs/_hooks/mathml.py`` turns into MathML);
* ``.. note::`` into a Material ``!!! note`` admonition;
* an ``Args:`` entry that documents several parameters at once (``rank, alpha: as X.``) into
  one entry per parameter with the same text, which is how griffe's Google parser reads them;
* the roles ``:func:`x```, ``:class:`~a.b.X``` (and ``:meth:``, ``:data:``, ``:mod:``, ``:attr:``)
  into inline code: a cross-reference when ``x`` is a fully qualified ``lorsum.`` name that the
  API reference documents, else plain code (``~`` keeps the last component, as in Sphinx).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_DIRECTIVE = re.compile(r"^(?P<indent>[ ]*)\.\. (?P<name>math|note)::[ ]*(?P<rest>.*)$")
_SHARED_ARGS = re.compile(r"^(?P<indent>[ ]+)(?P<names>\w+(?:, \w+)+): (?P<text>.*)$")
_ROLE = re.compile(r":(?:func|class|meth|data|mod|attr|obj|exc):`(?P<tilde>~?)(?P<target>[^`]+)`")


def rewrite(text: str, resolvable: Any = None) -> str:
    """The docstring ``text`` with its reST directives and roles rewritten as markdown."""
    lines = text.splitlines()
    out: list[str] = []
    i = 0
    while i < len(lines):
        match = _DIRECTIVE.match(lines[i])
        if not match:
            out.append(lines[i])
            i += 1
            continue
        indent, name, rest = match["indent"], match["name"], match["rest"]
        i += 1
        block: list[str] = []
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > len(indent)):
            block.append(lines[i])
            i += 1
        while block and not block[0].strip():
            block.pop(0)
        while block and not block[-1].strip():
            block.pop()
        body = ([rest] if rest else []) + _dedent(block)
        if name == "math":
            out += [f"{indent}$$"] + [f"{indent}{b}" for b in body if b.strip()] + [f"{indent}$$"]
        else:
            out += [f"{indent}!!! note", ""] + [f"{indent}    {b}" if b else "" for b in body]
        out.append("")
    text = _split_shared_args("\n".join(out))
    return _ROLE.sub(lambda m: _role(m, resolvable), text)


def _split_shared_args(text: str) -> str:
    """``a, b: text`` in an ``Args:`` section becomes ``a: text`` and ``b: text``."""
    lines = text.splitlines()
    out: list[str] = []
    section: int | None = None  # the indent of the current "Args:" header
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.strip() == "Args:":
            section = _indent(line)
        elif line.strip() and section is not None and _indent(line) <= section:
            section = None
        match = _SHARED_ARGS.match(line) if section is not None else None
        if not match:
            out.append(line)
            i += 1
            continue
        body = [match["text"]]
        i += 1
        while i < len(lines) and lines[i].strip() and _indent(lines[i]) > len(match["indent"]):
            body.append(lines[i])
            i += 1
        for name in match["names"].split(", "):
            out.append(f"{match['indent']}{name}: {body[0]}")
            out.extend(body[1:])
    return "\n".join(out)


def _role(match: re.Match[str], resolvable: Any) -> str:
    target = match["target"].strip()
    shown = target.rsplit(".", 1)[-1] if match["tilde"] else target
    if target.startswith("lorsum.") and (resolvable is None or resolvable(target)):
        return f"[`{shown}`][{target}]"
    return f"`{shown}`"


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _dedent(block: list[str]) -> list[str]:
    width = min((_indent(b) for b in block if b.strip()), default=0)
    return [b[width:] if b.strip() else "" for b in block]


class ReSTDirectives(griffe.Extension):
    """Rewrites every docstring as :func:`rewrite` says, once griffe has loaded it."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = rewrite(obj.docstring.value, _documented)


def _documented(target: str) -> bool:
    """Whether ``target`` is a public lorsum path (no ``_private`` part): those have anchors."""
    return not any(part.startswith("_") for part in target.split("."))
