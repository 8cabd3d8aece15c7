"""Remove outputs and execution counts from notebooks (they are committed without outputs).

Usage: python tools/strip_notebooks.py book/*.ipynb
"""

import sys

import nbformat


def strip(path: str) -> bool:
    """Strip one notebook in place; return True if it changed."""
    notebook = nbformat.read(path, as_version=4)
    changed = False
    for cell in notebook.cells:
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None):
            cell.outputs, cell.execution_count = [], None
            changed = True
    for key in ("widgets", "papermill"):
        changed |= notebook.metadata.pop(key, None) is not None
    if changed:
        nbformat.write(notebook, path)
    return changed


if __name__ == "__main__":
    for name in sys.argv[1:]:
        if strip(name):
            print(f"stripped {name}")
