"""Two fixes to what Sphinx makes of the library's docstrings on the API page.

Registered in ``_config.yml`` (``sphinx: local_extensions``) for ``book/api.md``, whose
entries autodoc generates from ``baddiff_core``:

- A dataclass field made with ``field(default_factory=...)`` has the default
  ``<factory>`` in the class's signature. That is not Python, so Sphinx cannot parse
  the signature and splits it at every comma, brackets included (``dict[str,`` /
  ``~typing.Any] = <factory>``). The default is shown as ``...`` instead.
- napoleon reads the first line of a constant's, attribute's or property's docstring as
  ``type: description``: ``#: The paper's schedule: T = 1000 ...`` would be shown with
  the type "The paper's schedule". In this library those docstrings are prose, so
  napoleon reads only the docstrings of modules, classes, functions and methods, where
  its Google-style sections (``Args:``, ``Returns:``, ``Attributes:``) are.

The second fix calls ``sphinx.ext.napoleon._process_docstring``, napoleon's own
``autodoc-process-docstring`` handler (private, but unchanged since napoleon joined
Sphinx in 1.3), in place of napoleon's connection to that event.
"""

from __future__ import annotations

from typing import Any

from sphinx.application import Sphinx
from sphinx.ext import napoleon

#: The kinds of autodoc entry whose docstrings napoleon leaves as they are.
PROSE_KINDS = ("attribute", "data", "property")


def factory_default(
    app: Sphinx,
    what: str,
    name: str,
    obj: Any,
    options: Any,
    signature: str | None,
    return_annotation: str | None,
) -> tuple[str, str | None] | None:
    """``autodoc-process-signature`` handler: ``<factory>`` defaults become ``...``.

    Returns ``None`` (signature unchanged) when there is no ``<factory>`` in it.
    """
    if signature and "<factory>" in signature:
        return signature.replace("<factory>", "..."), return_annotation
    return None


def google_sections(
    app: Sphinx, what: str, name: str, obj: Any, options: Any, lines: list[str]
) -> None:
    """``autodoc-process-docstring`` handler: napoleon, except on :data:`PROSE_KINDS`.

    Like napoleon's own handler, it edits ``lines`` in place.
    """
    if what not in PROSE_KINDS:
        napoleon._process_docstring(app, what, name, obj, options, lines)


def setup(app: Sphinx) -> dict[str, Any]:
    """Load napoleon, replace its docstring handler by :func:`google_sections`, and
    connect :func:`factory_default`."""
    app.setup_extension("sphinx.ext.napoleon")
    for listener in list(app.events.listeners["autodoc-process-docstring"]):
        if listener.handler is napoleon._process_docstring:
            app.disconnect(listener.id)
    app.connect("autodoc-process-docstring", google_sections)
    app.connect("autodoc-process-signature", factory_default)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
