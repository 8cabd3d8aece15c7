"""The book's layout and the conventions every chapter follows (see README.md)."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import re
import shlex

import nbformat
import pytest
import tomllib
import yaml

from conftest import BOOK, ROOT, chapter_notebooks, toc_files

NOTEBOOKS = chapter_notebooks()
NOTEBOOK_IDS = [p.stem for p in NOTEBOOKS]


def test_every_toc_entry_exists():
    for name in toc_files():
        candidates = [ROOT / f"{name}{suffix}" for suffix in (".ipynb", ".md")]
        assert any(c.exists() for c in candidates), (
            f"_toc.yml names {name}, which is not in the repository"
        )


def test_every_page_in_book_is_in_the_toc():
    listed = set(toc_files())
    pages = {
        str(p.relative_to(ROOT).with_suffix(""))
        for p in BOOK.rglob("*")
        if p.suffix in {".ipynb", ".md"}
        and ".ipynb_checkpoints" not in p.parts
        and "_build" not in p.parts
    }
    assert pages - listed == set(), (
        f"pages in book/ missing from _toc.yml: {sorted(pages - listed)}"
    )


def test_chapters_are_numbered_notebooks():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text())
    numbered = [
        c["file"]
        for part in toc["parts"]
        if part.get("numbered")
        for c in part["chapters"]
    ]
    assert numbered, "the table of contents should have at least one numbered part"
    for name in numbered:
        assert re.fullmatch(r"book/\d\d_[a-z0-9_]+", name), (
            f"chapter {name} is not named book/NN_topic"
        )
        assert (ROOT / f"{name}.ipynb").exists(), f"chapter {name} should be a notebook"
    numbers = [int(name.split("/")[1][:2]) for name in numbered]
    assert numbers == sorted(numbers) and len(set(numbers)) == len(numbers), (
        f"chapter numbers out of order: {numbers}"
    )


def test_config_executes_every_chapter_and_fails_on_errors(config):
    assert config["only_build_toc_files"] is True
    assert config["execute"]["execute_notebooks"] in {"force", "cache"}
    assert config["execute"]["allow_errors"] is False
    assert 0 < config["execute"]["timeout"] <= 1800
    for pattern in (".venv", "tests", "baddiff_core"):
        assert pattern in config["exclude_patterns"]


def test_a_page_may_give_its_cells_at_most_an_hour():
    # myst-nb reads a page's own cell timeout from its metadata (mystnb.execution_timeout):
    # the Scoreboard's board, one library call of 830 s from an empty model cache on 2
    # cores, would pass 1800 s on a machine three times slower.
    overrides = {
        page.stem: json.loads(page.read_text())["metadata"]["mystnb"]
        for page in sorted(ROOT.glob("book/*.ipynb"))
        if "mystnb" in json.loads(page.read_text())["metadata"]
    }
    assert overrides == {"scoreboard": {"execution_timeout": 3600}}


def test_config_launch_buttons(config):
    assert config["repository"]["path_to_book"] == ""
    assert config["repository"]["branch"] == "main"
    assert config["repository"]["url"].startswith("https://github.com/")
    assert "colab" in config["launch_buttons"]["colab_url"]
    assert config["launch_buttons"]["binderhub_url"]


def test_every_citation_is_in_the_bibliography(config):
    bib = (ROOT / config["bibtex_bibfiles"][0]).read_text()
    keys = set(re.findall(r"@\w+\{([^,]+),", bib))
    cited = set()
    for page in BOOK.rglob("*"):
        if page.suffix == ".ipynb":
            text = "\n".join(c.source for c in nbformat.read(page, as_version=4).cells)
        elif page.suffix == ".md":
            text = page.read_text()
        else:
            continue
        for group in re.findall(r"\{cite:[pt]\}`([^`]+)`", text):
            cited.update(k.strip() for k in group.split(","))
    assert cited, "the book should cite its sources"
    assert cited - keys == set(), (
        f"cited but missing from references.bib: {sorted(cited - keys)}"
    )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_is_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert not cell.outputs, (
                f"{path.name} cell {index} holds outputs: run `make format`"
            )
            assert cell.execution_count is None, (
                f"{path.name} cell {index} has an execution count: run `make format`"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_notebook_follows_the_chapter_skeleton(path, config):
    cells = nbformat.read(path, as_version=4).cells
    assert cells[0].cell_type == "markdown" and cells[0].source.startswith("# "), (
        "first cell: the title"
    )
    assert (
        "you will learn" in cells[0].source.lower()
        and "you need" in cells[0].source.lower()
    )

    install = cells[1]
    assert install.cell_type == "code" and "google.colab" in install.source
    assert "hide-cell" in install.metadata.get("tags", []), (
        "the Colab install cell is hidden in the book"
    )
    pip_lines = [
        line.strip() for line in install.source.splitlines() if "pip install" in line
    ]
    assert len(pip_lines) == 1, "one pip install line in the Colab cell"
    requirements = [w for w in shlex.split(pip_lines[0])[2:] if not w.startswith("-")]
    url = f"git+{config['repository']['url']}@{config['repository']['branch']}"
    assert requirements == [f"baddiff-core[full] @ {url}"], (
        f"the Colab cell installs this package and its full-mode extra only (Colab has the heavy dependencies), "
        f"got {requirements}"
    )

    tagged = [
        i for i, c in enumerate(cells) if "parameters" in c.metadata.get("tags", [])
    ]
    assert len(tagged) == 1, "exactly one cell is tagged `parameters`"
    assigned = {}
    for node in ast.parse(cells[tagged[0]].source).body:
        assert isinstance(node, ast.Assign), (
            "the parameters cell holds plain assignments only"
        )
        assigned[node.targets[0].id] = ast.literal_eval(node.value)
    assert assigned == {"QUICK": True, "DEVICE": "auto", "SEED": 0}
    assert (
        "chapter_settings(quick=QUICK, device=DEVICE, seed=SEED)"
        in cells[tagged[0] + 1].source
    )

    headings = [
        line
        for c in cells
        if c.cell_type == "markdown"
        for line in c.source.splitlines()
        if line.startswith("## ")
    ]
    for wanted in ("## Summary", "## Exercises", "## References"):
        assert wanted in headings, f"{path.name} lacks a '{wanted}' section"


def test_package_metadata_has_lower_bounds_only():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [
        r for extra in project["optional-dependencies"].values() for r in extra
    ]
    for requirement in requirements:
        assert "==" not in requirement, (
            f"{requirement!r}: pin versions in requirements/lock.txt, not in the package"
        )
    assert project["requires-python"] == ">=3.10"
    assert {"book", "test"} <= set(project["optional-dependencies"])


def test_conda_environment_matches_the_pip_extras():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    conda_names = {"torch": "pytorch", "matplotlib": "matplotlib-base"}
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    listed = {
        re.split(r"[<>=! ]", d)[0] for d in env["dependencies"] if isinstance(d, str)
    }
    pip_part = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-e ." in pip_part, (
        "environment.yml installs this package from the repository"
    )
    wanted = (
        project["dependencies"]
        + project["optional-dependencies"]["book"]
        + project["optional-dependencies"]["test"]
    )
    for requirement in wanted:
        name = re.split(r"[<>=!\[ ]", requirement)[0]
        assert conda_names.get(name, name) in listed, f"environment.yml lacks {name}"


def test_lock_file_pins_what_the_makefile_installs():
    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pins = dict(
        line.split("==")
        for line in lock.splitlines()
        if line and not line.startswith("#")
    )
    for name in ("torch", "diffusers", "jupyter-book", "nbval", "papermill"):
        assert name in pins, f"requirements/lock.txt should pin {name}"
    assert "+" not in pins["torch"], (
        "the lock pins torch without a local label so GPU builds match"
    )
    assert "-c $(CONSTRAINTS)" in (ROOT / "Makefile").read_text()


def test_ci_runs_the_readme_commands():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text()
    for command in ("make test", "make book"):
        assert command in readme, f"README should give `{command}`"
        assert re.search(rf"^{command}$", ci, re.M), f".ci/run should call `{command}`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=NOTEBOOK_IDS)
def test_chapter_code_fits_the_page(path):
    """The book's text column shows about 88 characters; longer lines scroll
    sideways."""
    cells = nbformat.read(path, as_version=4).cells
    # the hidden install cell may be long
    for index, cell in enumerate(cells[2:], start=2):
        if cell.cell_type == "code":
            for line in cell.source.splitlines():
                assert len(line) <= 88, (
                    f"{path.name} cell {index}: {len(line)} characters: {line[:50]}..."
                )


# --------------------------------------------------------------------------- #
# Links from the chapters to the API reference (book/api.md).
# --------------------------------------------------------------------------- #

API_ROLE = re.compile(r"\{py:(func|class|meth|data|mod|attr)\}`([^`]+)`")


def api_modules() -> dict[str, bool]:
    """The modules book/api.md documents, each with whether its members are
    documented too (an ``automodule`` without ``:no-members:``)."""
    text = (BOOK / "api.md").read_text()
    found = re.findall(r"^\.\. automodule:: (\S+)\n((?:[ \t]+.*\n)*)", text, re.M)
    return {name: ":no-members:" not in options for name, options in found}


def has_doc_comment(module, name: str) -> bool:
    """Whether the module constant ``name`` has a ``#:`` comment (or a docstring
    after it): autodoc shows a constant only then."""
    source = inspect.getsource(module)
    lines = source.splitlines()
    body = ast.parse(source).body
    for index, node in enumerate(body):
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AnnAssign):
            targets = [node.target]
        else:
            continue
        if any(isinstance(t, ast.Name) and t.id == name for t in targets):
            after = body[index + 1] if index + 1 < len(body) else None
            return (
                lines[node.lineno - 2].lstrip().startswith("#:")
                or "#:" in lines[node.lineno - 1]
                or isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            )
    return False


def api_role_problem(kind: str, text: str) -> str | None:
    """Why ``{py:kind}`text``` does not name a public object of the API page, or
    None when it does. The target is the part in ``<...>`` if present, without a
    leading ``~``; a name is documented under the module that lists it in
    ``__all__`` when api.md documents that module's members."""
    link = re.search(r"<([^>]+)>$", text)
    name = (link.group(1) if link else text).strip().lstrip("~")
    modules = api_modules()
    if kind == "mod":
        if name not in modules:
            return f"module {name} has no automodule in book/api.md"
        importlib.import_module(name)
        return None
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        break
    else:
        return f"no importable module in {name}"
    rest = parts[cut:]
    if rest[0] not in getattr(module, "__all__", ()):
        return f"{rest[0]} is not in {module_name}.__all__"
    if not modules.get(module_name):
        return f"book/api.md does not document the members of {module_name}"
    owner, obj = module, module
    for part in rest:
        if part.startswith("_"):
            return f"{part} is private"
        owner = obj
        try:
            obj = getattr(owner, part)
        except AttributeError:
            return f"{owner.__name__} has no attribute {part}"
        if isinstance(owner, type) and part not in vars(owner):
            return f"{part} is inherited by {owner.__name__}, not documented there"
    in_class = isinstance(owner, type)
    is_class = isinstance(obj, type)
    routine = callable(obj) and not is_class
    wanted = {
        "func": not in_class and routine,
        "class": is_class,
        "meth": in_class and routine,
        "attr": in_class and not routine,
        "data": not in_class
        and not routine
        and not is_class
        and not inspect.ismodule(obj)
        and has_doc_comment(module, rest[0]),
    }
    if not wanted[kind]:
        return f"{{py:{kind}}} does not fit {name} (or it has no #: comment)"
    return None


def markdown_of(page) -> str:
    if page.suffix == ".ipynb":
        cells = nbformat.read(page, as_version=4).cells
        return "\n".join(c.source for c in cells if c.cell_type == "markdown")
    return page.read_text()


def test_chapter_api_links_name_documented_objects():
    """Every ``{py:func}`` (class, meth, data, mod, attr) role of the book links to
    an entry of the API reference, and every numbered chapter has at least one."""
    # The check itself: names that build no link are refused.
    assert api_role_problem("func", "bd.sample <baddiff_core.sampling.sample>") is None
    for kind, bad in [
        ("func", "baddiff_core.sample"),  # exported, documented under sampling
        ("func", "baddiff_core.attack.no_such_function"),
        ("class", "baddiff_core.attack.plant_backdoor"),  # a function
        ("func", "baddiff_core.defenses.scan_model"),  # :no-members: in api.md
        ("mod", "baddiff_core.no_such_module"),
    ]:
        assert api_role_problem(kind, bad) is not None, (kind, bad)

    problems, roles = [], {}
    pages = [*NOTEBOOKS, *sorted(BOOK.glob("*.md"))]
    for page in pages:
        found = API_ROLE.findall(markdown_of(page))
        roles[page.name] = len(found)
        for kind, text in found:
            problem = api_role_problem(kind, text)
            if problem:
                problems.append(f"{page.name}: {{py:{kind}}}`{text}`: {problem}")
    assert not problems, "roles that do not link to book/api.md:\n" + "\n".join(
        problems
    )
    chapters = sorted(p.name for p in BOOK.glob("0*.ipynb"))
    assert chapters, "the numbered chapters are book/0N_*.ipynb"
    unlinked = [name for name in chapters if not roles.get(name)]
    assert not unlinked, (
        f"chapters without a link to the API reference ({{py:func}}`bd.NAME "
        f"<baddiff_core.module.NAME>`): {unlinked}"
    )
