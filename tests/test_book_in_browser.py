"""The built book as a reader sees it: every chapter page opened in headless Chromium.

The module builds the book once, with the command `make book` runs (`jupyter-book build
. --all --warningiserror --keep-going`), serves `_build/html` on a free local port and
opens every page that `_toc.yml` lists as a chapter notebook in headless Chromium. For
each chapter it checks that

1. the page renders: HTTP 200, the notebook's title as an `<h1>`, a screenshot that is
   not blank;
2. it shows at least one figure: an `<img>` inside a cell's output, whose file the
   server has;
3. its Colab launch link opens this chapter's notebook on branch `main` of the book's
   repository;
4. no cell output shows an error: no traceback or error output, no "Traceback (most
   recent call last)", no ANSI-coloured exception name, no stderr block mentioning
   "Error";
5. widgets have saved state: a chapter whose code uses ipywidgets embeds the widget
   state, and every widget view on the page refers to a model in that state.

The front page is checked to render too. A full-page screenshot of every page it opens
is kept in `_build/screenshots/<page>.png` (beside the HTML, so that it is not published
with it).

Time: the build executes the chapters unless the jupyter cache (`_build/.jupyter_cache`)
already holds them: about 8 minutes on 2 CPU cores with the chapters' models already in
`~/.cache/baddiff` (about 17 without), a few seconds with the jupyter cache warm, when
the whole module takes about 25 seconds. The cache is emptied when `baddiff_core`
changed (the Makefile's `_build/.core-stamp` rule, which this module runs too). The
build's log is kept in `_build/book-build.log`. Chromium takes about 4 seconds per page.
The checking helpers are tested on small HTML snippets at the end of this file; those
tests need no build: `pytest tests/test_book_in_browser.py -k helpers`.

Chromium: `make test` installs Debian's `chromium` package with apt when it is missing.
Set `CHROMIUM` to use another Chromium binary.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

import nbformat
import pytest
from bs4 import BeautifulSoup
from PIL import Image

from conftest import ROOT, chapter_notebooks, toc_files

HTML = ROOT / "_build" / "html"
SCREENSHOTS = ROOT / "_build" / "screenshots"
BUILD_LOG = ROOT / "_build" / "book-build.log"
BUILD_ARGS = [
    "build",
    ".",
    "--all",
    "--warningiserror",
    "--keep-going",
]  # as `make book`
REPOSITORY = {
    "owner": "baddiff-book",
    "name": "backdooring-diffusion-models",
    "branch": "main",
}

WIDGET_STATE = "application/vnd.jupyter.widget-state+json"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"
EXCEPTION_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")

# Headless, offline and with a throw-away profile; the flags that work in a closed
# network.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--virtual-time-budget=8000",
]
WIDTH = 1300  # pixels: wide enough for the book's three columns
MAX_HEIGHT = 30_000  # pixels: longer pages are shot down to this height

CHAPTERS = chapter_notebooks()  # the .ipynb entries of _toc.yml, in reading order
# The first test builds the book: from an empty model cache on a machine three times
# slower than ours that took 69 minutes (README), so the module's bound is two hours,
# not pytest's 30 minutes.
pytestmark = pytest.mark.timeout(7200)


# --- What a page should show: small helpers, each returning the problems it finds
# ----------------


def notebook_title(path: pathlib.Path) -> str:
    """The first Markdown heading of a notebook or Markdown page, as plain text."""
    if path.suffix == ".ipynb":
        text = "\n".join(
            c.source
            for c in nbformat.read(path, as_version=4).cells
            if c.cell_type == "markdown"
        )
    else:
        text = path.read_text()
    first = next(line for line in text.splitlines() if line.startswith("# "))
    return first[2:].replace("`", "").replace("*", "").strip()


def uses_widgets(path: pathlib.Path) -> bool:
    code = "\n".join(
        c.source
        for c in nbformat.read(path, as_version=4).cells
        if c.cell_type == "code"
    )
    return (
        re.search(r"^\s*(import|from) ipywidgets\b|\bwidgets\.", code, re.M) is not None
    )


def title_problems(dom: BeautifulSoup, title: str) -> list[str]:
    headings = []
    for h1 in dom.find_all("h1"):
        h1 = copy.copy(h1)
        # "1. " before, "#" after
        for extra in h1.select(".section-number, .headerlink"):
            extra.decompose()
        headings.append(" ".join(h1.get_text().split()))
    return [] if title in headings else [f"no <h1> reads {title!r} (found {headings})"]


def screenshot_problems(png: pathlib.Path) -> list[str]:
    """A blank page (a browser that showed nothing) has one or a few colours; a page has
    thousands."""
    colours = Image.open(png).convert("RGB").getcolors(maxcolors=16)
    return (
        []
        if colours is None
        else [f"the screenshot {png.name} is blank ({len(colours)} colours)"]
    )


def output_figures(dom: BeautifulSoup) -> list[str]:
    """The sources of the images inside cells' outputs (matplotlib figures,
    animations)."""
    return [
        img.get("src", "")
        for output in dom.select("div.cell_output")
        for img in output.find_all("img")
    ]


def colab_problems(dom: BeautifulSoup, expected: str) -> list[str]:
    links = [
        a["href"]
        for a in dom.find_all("a", href=True)
        if "colab.research.google.com" in a["href"]
    ]
    return [] if expected in links else [f"no Colab link to {expected} (found {links})"]


def error_problems(dom: BeautifulSoup) -> list[str]:
    """Cell outputs that show an error, as myst-nb renders them (classes checked on a
    real build)."""
    problems = []
    for output in dom.select("div.cell_output"):
        text = output.get_text()
        excerpt = " ".join(text.split())[:120]
        coloured = [
            s.get_text() for s in output.select('span[class*="-Color"]')
        ]  # ANSI colours
        if output.select(".traceback, .error"):
            problems.append(f"an error output: {excerpt}")
        elif "Traceback (most recent call last)" in text:
            problems.append(f"a traceback in an output: {excerpt}")
        elif "\x1b[" in text or any(EXCEPTION_NAME.search(c) for c in coloured):
            problems.append(
                f"an ANSI-coloured exception or raw ANSI codes in an output: {excerpt}"
            )
        elif any("Error" in s.get_text() for s in output.select(".stderr")):
            problems.append(f"an error on stderr: {excerpt}")
    return problems


def widget_problems(html: str, needs_state: bool) -> list[str]:
    """The embedded widget state holds a model for every widget view on the page."""
    soup = BeautifulSoup(html, "html.parser")
    models = {}
    for script in soup.find_all("script", type=WIDGET_STATE):
        models.update(json.loads(script.string)["state"])
    views = [
        json.loads(s.string)["model_id"]
        for s in soup.find_all("script", type=WIDGET_VIEW)
    ]
    problems = []
    if needs_state and not models:
        problems.append(
            f"the notebook uses ipywidgets but the page has no saved widget state ({WIDGET_STATE})"
        )
    missing = [view for view in views if view not in models]
    if missing:
        problems.append(
            f"{len(missing)} of {len(views)} widget views refer to models missing from the saved state"
        )
    return problems


def colab_link(notebook: pathlib.Path, config: dict) -> str:
    """The Colab launch link of a chapter, made from `_config.yml` as jupyter-book makes
    it."""
    repository = config["repository"]
    owner_and_name = urllib.parse.urlparse(repository["url"]).path.strip("/")
    path = "/".join(
        p
        for p in (
            repository["path_to_book"].strip("/"),
            notebook.relative_to(ROOT).as_posix(),
        )
        if p
    )
    return f"{config['launch_buttons']['colab_url']}/github/{owner_and_name}/blob/{repository['branch']}/{path}"


# --- Building, serving and opening pages
# -----------------------------------------------------------


def chromium(*args: str) -> str:
    """Run headless Chromium with a fresh profile; return what it prints (the DOM for
    --dump-dom)."""
    binary = shutil.which(os.environ.get("CHROMIUM", "chromium"))
    assert binary, (
        "headless Chromium is missing: `make test` installs Debian's package as root "
        "(apt-get install chromium); or set CHROMIUM to a Chromium binary"
    )
    with tempfile.TemporaryDirectory() as profile:
        result = subprocess.run(
            [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
            capture_output=True,
            text=True,
            timeout=180,
        )
    assert result.returncode == 0, (
        f"chromium {' '.join(args)} failed:\n{result.stderr[-3000:]}"
    )
    return result.stdout


def build_book() -> None:
    """Build exactly as `make book` does, with this environment's jupyter-book."""
    # the Makefile empties the jupyter cache if baddiff_core changed
    if shutil.which("make"):
        subprocess.run(
            ["make", "--no-print-directory", "_build/.core-stamp"],
            cwd=ROOT,
            check=True,
            capture_output=True,
        )
    jupyter_book = pathlib.Path(sys.executable).parent / "jupyter-book"
    result = subprocess.run(
        [str(jupyter_book), *BUILD_ARGS],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # A cold build took 3,600 s on a busy 2-core machine (12 pages, 2026-12-03): the
        # test's own limit (7,200 s) bounds it, and each cell has the book's 1,800 s
        # (the Scoreboard's an hour: its notebook metadata).
        timeout=6900,
    )
    log = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout)  # without terminal colours
    BUILD_LOG.parent.mkdir(exist_ok=True)
    BUILD_LOG.write_text(log)
    if result.returncode != 0:
        lines = log.splitlines()
        warnings = [
            line
            for line in lines
            if re.search(r"WARNING|ERROR|CRITICAL|timed out|Error:", line)
            and "running over TCP without encryption" not in line
        ]  # every kernel says so
        pytest.fail(
            f"`jupyter-book {' '.join(BUILD_ARGS)}` failed (exit {result.returncode}); whole log in "
            f"{BUILD_LOG}.\nIts warnings and errors:\n"
            + "\n".join(warnings[:40])
            + "\nIts end:\n"
            + "\n".join(lines[-40:]),
            pytrace=False,
        )


# A page that loads another in a WIDTH-wide frame and writes down how tall it is, so
# that the screenshot can show the whole page.
HEIGHT_PAGE = f"""<!doctype html><body style="margin:0">
<iframe id="page" style="width:{WIDTH}px;height:1000px;border:0"></iframe>
<script>
  const frame = document.getElementById("page");
  frame.onload = () => {{
    document.body.dataset.pageHeight = frame.contentDocument.documentElement.scrollHeight;
  }};
  frame.src = new URLSearchParams(location.search).get("page");
</script>
</body>"""


class BookHandler(SimpleHTTPRequestHandler):
    def do_GET(self):
        if self.path.startswith("/_page_height"):
            body = HEIGHT_PAGE.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        else:
            super().do_GET()

    def log_message(self, *args):  # quiet
        pass


@contextlib.contextmanager
def serve(folder: pathlib.Path):
    server = ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(BookHandler, directory=str(folder))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/"
    finally:
        server.shutdown()
        server.server_close()


def fetch(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, b""


@dataclasses.dataclass
class Page:
    url: str
    status: int
    html: str  # as the server sends it
    dom: BeautifulSoup  # after Chromium ran the page's scripts
    screenshot: pathlib.Path


def open_page(site: str, source: pathlib.Path) -> Page:
    """Fetch a page, let Chromium render it, and keep a full-page screenshot of it."""
    path = source.relative_to(ROOT).with_suffix(".html").as_posix()
    url = site + path
    status, body = fetch(url)
    dom = BeautifulSoup(chromium("--dump-dom", url), "html.parser")
    measured = BeautifulSoup(
        chromium("--dump-dom", f"{site}_page_height?page=/{path}"), "html.parser"
    )
    height = int(measured.body.get("data-page-height", 0))
    assert height > 0, f"{path}: Chromium could not measure the page"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    screenshot = SCREENSHOTS / f"{source.stem}.png"
    chromium(
        f"--screenshot={screenshot}",
        f"--window-size={WIDTH},{min(height, MAX_HEIGHT)}",
        "--hide-scrollbars",
        url,
    )
    return Page(url, status, body.decode("utf-8", "replace"), dom, screenshot)


def report(page: Page, problems: list[str]) -> str:
    return f"{page.url}:\n  " + "\n  ".join(problems)


@pytest.fixture(scope="module")
def site():
    """Build the book once for this module and serve `_build/html`; yields the site's
    URL."""
    chromium("--version")  # fail at once, not after the build, when Chromium is missing
    build_book()
    with serve(HTML) as url:
        yield url


@pytest.fixture(scope="module", params=CHAPTERS, ids=[p.stem for p in CHAPTERS])
def chapter(request, site) -> tuple[pathlib.Path, Page]:
    return request.param, open_page(site, request.param)


# --- The book, page by page
# ------------------------------------------------------------------------


@pytest.mark.slow
def test_builds_the_book_as_make_book_does():
    assert (
        f"$(BIN)/jupyter-book {' '.join(BUILD_ARGS)}" in (ROOT / "Makefile").read_text()
    )


def test_the_book_launches_from_its_repository_on_main(config):
    url = urllib.parse.urlparse(config["repository"]["url"])
    owner, name = url.path.strip("/").split("/")
    assert {
        "owner": owner,
        "name": name,
        "branch": config["repository"]["branch"],
    } == REPOSITORY
    assert config["launch_buttons"]["colab_url"] == "https://colab.research.google.com"


@pytest.mark.notebooks
@pytest.mark.slow
def test_front_page_renders(site):
    root = ROOT / toc_files()[0]
    source = next(
        root.with_suffix(s) for s in (".md", ".ipynb") if root.with_suffix(s).exists()
    )
    page = open_page(site, source)
    problems = [] if page.status == 200 else [f"HTTP {page.status}"]
    problems += title_problems(page.dom, notebook_title(source)) + screenshot_problems(
        page.screenshot
    )
    assert not problems, report(page, problems)
    assert fetch(site)[0] == 200, "the site's index.html is missing"


@pytest.mark.notebooks
@pytest.mark.slow
def test_chapter_renders(chapter):
    notebook, page = chapter
    problems = [] if page.status == 200 else [f"HTTP {page.status}"]
    problems += title_problems(
        page.dom, notebook_title(notebook)
    ) + screenshot_problems(page.screenshot)
    assert not problems, report(page, problems)


@pytest.mark.notebooks
@pytest.mark.slow
def test_chapter_shows_a_figure(chapter):
    _, page = chapter
    figures = output_figures(page.dom)
    assert figures, report(page, ["no figure (<img>) in any cell output"])
    missing = [
        src
        for src in figures
        if not src.startswith("data:")
        and fetch(urllib.parse.urljoin(page.url, src))[0] != 200
    ]
    assert not missing, report(page, [f"figure files not served: {missing}"])


@pytest.mark.notebooks
@pytest.mark.slow
def test_chapter_colab_link_opens_its_notebook_on_main(chapter, config):
    notebook, page = chapter
    assert not (problems := colab_problems(page.dom, colab_link(notebook, config))), (
        report(page, problems)
    )


@pytest.mark.notebooks
@pytest.mark.slow
def test_chapter_outputs_show_no_error(chapter):
    _, page = chapter
    assert not (problems := error_problems(page.dom)), report(page, problems)


@pytest.mark.notebooks
@pytest.mark.slow
def test_chapter_widgets_have_saved_state(chapter):
    notebook, page = chapter
    assert not (problems := widget_problems(page.html, uses_widgets(notebook))), report(
        page, problems
    )


@pytest.mark.notebooks
@pytest.mark.slow
def test_chapter_tables_scroll_instead_of_wrapping(chapter):
    """A result table wider than the text column scrolls sideways, its cells on one
    line, instead of wrapping word by word and cutting its last column: the page links
    the book's stylesheet (`_static/custom.css`), which the server has, with that rule."""
    _, page = chapter
    if not page.dom.select("div.cell_output table"):
        return
    sheets = [
        link.get("href", "") for link in page.dom.select('link[rel="stylesheet"]')
    ]
    custom = [href for href in sheets if "custom.css" in href]
    assert custom, report(page, ["result tables, but no link to _static/custom.css"])
    status, body = fetch(urllib.parse.urljoin(page.url, custom[0]))
    css = body.decode()
    assert status == 200 and "div.cell_output table" in css, report(
        page, [f"custom.css: HTTP {status}, no rule for div.cell_output table"]
    )
    assert "overflow-x: auto" in css and "white-space: nowrap" in css, report(
        page, ["custom.css does not make wide result tables scroll"]
    )


# --- The helpers catch what they should (no build needed)
# ------------------------------------------ The outputs below are copied from myst-nb's
# rendering of a notebook with errors.


def cell_output(inner: str) -> str:
    return f'<div class="cell_output docutils container">{inner}</div>'


TRACEBACK = cell_output(
    '<div class="output traceback highlight-ipythontb notranslate"><div class="highlight"><pre>'
    '<span class="ne">ZeroDivisionError</span>  Traceback (most recent call last)\n'
    '<span class="ne">ZeroDivisionError</span>: division by zero</pre></div></div>'
)
STDERR = cell_output(
    '<div class="output stderr highlight-myst-ansi notranslate"><div class="highlight"><pre>'
    "RuntimeError: the model did not load</pre></div></div>"
)
COLOURED = cell_output(
    '<div class="output stream highlight-myst-ansi notranslate"><div class="highlight"><pre>'
    '<span class="-Color -Color-Red">ValueError</span>: coloured</pre></div></div>'
)
PRINTED_TRACEBACK = cell_output(
    '<div class="output stream highlight-myst-ansi notranslate"><div class="highlight"><pre>'
    'Traceback (most recent call last):\n  File "x.py", line 1</pre></div></div>'
)
CLEAN = cell_output(
    '<div class="output stream highlight-myst-ansi notranslate"><div class="highlight"><pre>'
    "attack success rate 0.94, no errors</pre></div></div>"
)
FIGURE = cell_output('<img alt="../_images/a.png" src="../_images/a.png" />')
COLAB = (
    "https://colab.research.google.com/github/baddiff-book/backdooring-diffusion-models/"
    "blob/main/book/01_what_is_diffusion.ipynb"
)


def soup(html: str) -> BeautifulSoup:
    return BeautifulSoup(
        f"<html><body><article>{html}</article></body></html>", "html.parser"
    )


def widget_page(state_ids: list[str], view_ids: list[str]) -> str:
    state = {
        "version_major": 2,
        "version_minor": 0,
        "state": {i: {"model_name": "IntSliderModel", "state": {}} for i in state_ids},
    }
    scripts = (
        [f'<script type="{WIDGET_STATE}">{json.dumps(state)}</script>']
        if state_ids
        else []
    )
    scripts += [
        f'<script type="{WIDGET_VIEW}">{json.dumps({"model_id": i})}</script>'
        for i in view_ids
    ]
    return "<html><body>" + "".join(scripts) + "</body></html>"


@pytest.mark.parametrize(
    "output",
    [TRACEBACK, STDERR, COLOURED, PRINTED_TRACEBACK],
    ids=["traceback", "stderr", "ansi-coloured", "printed-traceback"],
)
def test_helpers_find_an_error_output(output):
    assert error_problems(soup(CLEAN + output + FIGURE)), output
    assert error_problems(soup(CLEAN + FIGURE)) == []


def test_helpers_count_figures_in_cell_outputs_only():
    logo = '<a href="#"><img src="../_static/images/logo_colab.png" /></a>'
    assert output_figures(soup(logo + CLEAN)) == []
    assert output_figures(soup(logo + CLEAN + FIGURE)) == ["../_images/a.png"]


def test_helpers_check_the_colab_link(config):
    link = f'<a class="btn" href="{COLAB}">Colab</a>'
    assert colab_link(ROOT / "book" / "01_what_is_diffusion.ipynb", config) == COLAB
    assert colab_problems(soup(link), COLAB) == []
    assert colab_problems(soup(link.replace("/main/", "/master/")), COLAB)
    assert colab_problems(
        soup(link.replace("01_what_is_diffusion", "02_denoising_diffusion")), COLAB
    )
    assert colab_problems(soup(""), COLAB)


def test_helpers_check_widget_state():
    assert widget_problems(widget_page(["a", "b"], ["b"]), needs_state=True) == []
    assert widget_problems(widget_page([], []), needs_state=False) == []
    assert widget_problems(widget_page([], []), needs_state=True)  # state not saved
    # a view without a model
    assert widget_problems(widget_page(["a"], ["a", "c"]), needs_state=True)
    assert widget_problems(widget_page([], ["c"]), needs_state=False)


def test_helpers_check_the_title():
    h1 = (
        '<h1><span class="section-number">1. </span>What is diffusion?'
        '<a class="headerlink" href="#what-is-diffusion">#</a></h1>'
    )
    assert title_problems(soup(h1), "What is diffusion?") == []
    assert title_problems(soup(h1), "Planting a backdoor")
    assert title_problems(soup(""), "What is diffusion?")


def test_helpers_tell_a_blank_screenshot(tmp_path):
    blank, page = tmp_path / "blank.png", tmp_path / "page.png"
    Image.new("RGB", (200, 100), "white").save(blank)
    Image.effect_noise((200, 100), 60).convert("RGB").save(page)
    assert screenshot_problems(blank)
    assert screenshot_problems(page) == []


def test_helpers_find_which_notebooks_use_widgets(tmp_path):
    def notebook(code: str) -> pathlib.Path:
        path = tmp_path / f"{abs(hash(code))}.ipynb"
        nbformat.write(
            nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(code)]), path
        )
        return path

    assert uses_widgets(notebook("import ipywidgets as widgets"))
    assert uses_widgets(notebook("from ipywidgets import IntSlider"))
    assert uses_widgets(notebook("slider = widgets.IntSlider()"))
    assert not uses_widgets(notebook("import matplotlib.pyplot as plt"))
