"""pytest settings for every run from the repository, `pytest book/NN_chapter.ipynb`
alone included."""

from __future__ import annotations

#: Seconds nbval waits for a cell's outputs after the kernel has answered (nbval's own
#: is 5). A long
#: training cell with progress bars on a busy machine lags more than that, and nbval
#: then fails the
#: cell with "Timeout of 5 seconds exceeded waiting for output" (measured: chapter 3
#: from an empty
#: model cache on one core). Here, at the root, so that it holds whichever paths pytest
#: is given.
NBVAL_OUTPUT_TIMEOUT = 120


def pytest_collection_modifyitems(items):
    for item in items:
        if hasattr(item, "output_timeout"):  # nbval's cells of the book's notebooks
            item.output_timeout = NBVAL_OUTPUT_TIMEOUT
