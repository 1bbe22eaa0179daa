"""The documentation site: built with ``mkdocs build --strict`` and opened in headless Chromium.

Covers: the build passes with warnings as errors; the home page, one guide and one API page
render (in Chromium, offline) with their headings and images, and every image they reference is
in the built site; every internal link and anchor of the built HTML resolves; every public name
of the package has an entry in the API reference; a screenshot of the home page is written to
the test's temporary folder.

Skipped when mkdocs or Chromium is missing, unless ``LORSUM_REQUIRE_DOCS=1`` (set by
``.ci/run``), which turns the skip into a failure. Marked ``docs``: it takes about 15 s.
"""

from __future__ import annotations

import html.parser
import importlib
import os
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

pytestmark = pytest.mark.docs

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("LORSUM_CHROMIUM", "/usr/bin/chromium")
PUBLIC_MODULES = (
    "lorsum",
    "lorsum.optim",
    "lorsum.functional",
    "lorsum.adapters",
    "lorsum.compression",
    "lorsum.distributed",
    "lorsum.integrations.peft",
    "lorsum.integrations.transformers",
)
# The optimizers re-exported by ``lorsum`` are documented once, under ``lorsum.optim``; the
# submodules ``lorsum.functional`` and ``lorsum.optim`` have pages of their own.
ALIASES = {
    f"lorsum.{name}": f"lorsum.optim.{name}"
    for name in ("LoRAPro", "LoRSum", "PrecondLoRA", "SVDLoRA", "ScaledLoRSum")
}
SUBMODULE_PAGES = {"lorsum.functional": "api/functional", "lorsum.optim": "api/optim"}


def _require(condition: bool, reason: str) -> None:
    if condition:
        return
    if os.environ.get("LORSUM_REQUIRE_DOCS") == "1":
        pytest.fail(f"LORSUM_REQUIRE_DOCS=1 but {reason}")
    pytest.skip(reason)


def _mkdocs() -> str | None:
    found = Path(sys.executable).with_name("mkdocs")
    return str(found) if found.exists() else shutil.which("mkdocs")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    mkdocs = _mkdocs()
    _require(mkdocs is not None, "mkdocs is not installed (pip install -e '.[docs]')")
    _require((REPO / "mkdocs.yml").exists(), "no mkdocs.yml: the tests run outside the source tree")
    out = tmp_path_factory.mktemp("site")
    result = subprocess.run(
        [mkdocs, "build", "--strict", "-f", str(REPO / "mkdocs.yml"), "-d", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stderr[-4000:]}"
    return out


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    _require(Path(CHROMIUM).exists(), f"{CHROMIUM} is missing (apt-get install chromium)")
    profile = tmp_path_factory.mktemp("chromium-profile")
    return [
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
    ]  # fmt: skip


def _chromium(browser: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*browser, *args], capture_output=True, text=True, timeout=120)


class _Page(html.parser.HTMLParser):
    """Headings, images, links and ids of one HTML document."""

    def __init__(self) -> None:
        super().__init__()
        self.headings: list[tuple[str, str]] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.ids: set[str] = set()
        self._heading: str | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if attributes.get("id"):
            self.ids.add(attributes["id"] or "")
        if tag == "img" and attributes.get("src"):
            self.images.append(attributes["src"] or "")
        if tag == "a" and attributes.get("href"):
            self.links.append(attributes["href"] or "")
        if tag in ("h1", "h2", "h3"):
            self._heading, self._text = tag, []

    def handle_data(self, data: str) -> None:
        if self._heading is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == self._heading:
            text = " ".join("".join(self._text).split()).rstrip("¶").strip()
            self.headings.append((tag, text))
            self._heading = None


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def _target(site: Path, page: Path, url: str) -> tuple[Path, str] | None:
    """The file and fragment an internal ``url`` of ``page`` points to; None if external."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme or parts.netloc or url.startswith(("mailto:", "javascript:")):
        return None
    path = urllib.parse.unquote(parts.path)
    if path.startswith("/"):  # 404.html links from the site root (no site_url is set)
        target = (site / path.lstrip("/")).resolve()
    else:
        target = page if not path else (page.parent / path).resolve()
    if target.is_dir():
        target = target / "index.html"
    return target, urllib.parse.unquote(parts.fragment)


# (page, a heading it must show, a minimum number of images)
RENDERED = [
    ("index.html", "lorsum", 1),
    ("guides/plain-pytorch/index.html", "Plain PyTorch with LoRALinear", 0),
    ("api/optim/index.html", "lorsum.optim", 0),
    ("concepts/index.html", "Many sweeps are SVDLoRA", 2),
    ("results/synthetic/index.html", "Results: the synthetic task", 1),
]


@pytest.mark.parametrize(("uri", "heading", "min_images"), RENDERED)
def test_a_page_renders_in_chromium_with_its_headings_and_images(
    site: Path, browser: list[str], uri: str, heading: str, min_images: int
) -> None:
    path = site / uri
    assert path.exists(), f"{uri} was not built"
    result = _chromium(browser, "--dump-dom", path.as_uri())
    assert result.returncode == 0, result.stderr[-2000:]
    dom = _parse(result.stdout)
    titles = [text for _, text in dom.headings]
    assert heading in titles, f"{uri}: heading {heading!r} not rendered; got {titles[:20]}"
    assert len(dom.images) >= min_images, f"{uri}: {len(dom.images)} <img>, want {min_images}"
    for src in dom.images:
        target = _target(site, path, src)
        assert target is not None, f"{uri}: image {src} is not part of the site"
        assert target[0].is_file(), f"{uri}: image {src} is not in the built site"
        assert target[0].stat().st_size > 0, f"{uri}: image {src} is empty"


def test_the_api_page_shows_the_optimizers_with_their_math(site: Path, browser: list[str]) -> None:
    dom = _chromium(browser, "--dump-dom", (site / "api/optim/index.html").as_uri()).stdout
    page = _parse(dom)
    for name in ("lorsum.optim.LoRSum", "lorsum.optim.ScaledLoRSum", "lorsum.optim.SVDLoRA"):
        assert name in page.ids, f"no entry for {name} on the lorsum.optim page"
    assert "<math" in dom, "the docstrings' .. math:: blocks were not rendered as MathML"


def test_every_public_name_has_an_api_entry(site: Path) -> None:
    ids: set[str] = set()
    for page in (site / "api").rglob("index.html"):
        ids |= _parse(page.read_text(encoding="utf-8")).ids
    missing = []
    for module_name in PUBLIC_MODULES:
        for name in importlib.import_module(module_name).__all__:
            full = f"{module_name}.{name}"
            if full in SUBMODULE_PAGES:
                if not (site / SUBMODULE_PAGES[full] / "index.html").exists():
                    missing.append(full)
            elif ALIASES.get(full, full) not in ids:
                missing.append(full)
    assert not missing, f"public names without an API entry: {missing}"


def test_no_internal_link_or_anchor_is_broken(site: Path) -> None:
    broken = []
    ids: dict[Path, set[str]] = {}
    pages = sorted(site.rglob("*.html"))
    parsed = {page: _parse(page.read_text(encoding="utf-8")) for page in pages}
    for page, dom in parsed.items():
        ids[page.resolve()] = dom.ids
    for page, dom in parsed.items():
        for url in dom.links + dom.images:
            found = _target(site, page, url)
            if found is None:
                continue
            target, fragment = found
            if not target.exists():
                broken.append(f"{page.relative_to(site)} -> {url}")
            elif fragment and target.suffix == ".html" and fragment not in ids.get(target, set()):
                broken.append(f"{page.relative_to(site)} -> {url} (no such anchor)")
    assert not broken, f"{len(broken)} broken internal links:\n" + "\n".join(broken[:50])


def test_the_home_page_screenshot_is_written(site: Path, browser: list[str], tmp_path: Path):
    shot = tmp_path / "home.png"
    result = _chromium(
        browser, f"--screenshot={shot}", "--window-size=1280,900", (site / "index.html").as_uri()
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert shot.is_file(), result.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert shot.stat().st_size > 10_000, "the screenshot looks blank"
