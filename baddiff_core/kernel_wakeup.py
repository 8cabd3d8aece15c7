"""Waiting for a Jupyter kernel's messages in short slices (jupyter/nbclient#312).

The book's chapters are executed by nbclient (jupyter-book, through myst-nb and
jupyter-cache, and papermill in the tests). nbclient waits for a cell's reply with
``await kc.shell_channel.get_msg(timeout=...)``; jupyter_client's
``AsyncZMQSocketChannel.get_msg`` awaits ``socket.poll(timeout)``, and pyzmq's asyncio
poller waits on the ZMQ socket's file descriptor. That descriptor is edge-triggered:
when the reply is already queued, the wake-up can be missed, the poller sleeps the whole
timeout, then finds the reply with a last non-blocking poll. A cell that shows
ipywidgets then "hangs" for exactly the cell timeout (1800 s in the book build) and
succeeds. This is https://github.com/jupyter/nbclient/issues/312 (open; its pull
request #311 polls in slices).

:func:`install_kernel_wakeup` makes every ``get_msg`` of jupyter_client's asyncio
channels wait in slices of at most :data:`SLICE_SECONDS`: each slice ends with that
non-blocking poll, so a missed wake-up costs at most a slice. The book's build loads
this module as a Sphinx extension (``_config.yml``); the tests install it in
``tests/conftest.py``.

Only the standard library is imported here; jupyter_client is imported when the patch
is installed.
"""

from __future__ import annotations

import functools
import queue
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["SLICE_SECONDS", "install_kernel_wakeup", "setup", "sliced_get_msg"]

#: Longest single wait, in seconds, for a kernel message: what a missed wake-up costs.
SLICE_SECONDS = 1.0

# The attribute that marks the installed wrapper, and jupyter_client's own get_msg.
_MARKER = "_baddiff_kernel_wakeup"
_original_get_msg: Callable[..., Awaitable[dict[str, Any]]] | None = None


async def sliced_get_msg(
    get_msg: Callable[..., Awaitable[dict[str, Any]]],
    timeout: float | None,
    slice_seconds: float = SLICE_SECONDS,
) -> dict[str, Any]:
    """Wait for one message with ``get_msg``, at most ``slice_seconds`` at a time.

    Args:
        get_msg: An async function, called as ``await get_msg(timeout=seconds)``,
            that returns a message or raises :class:`queue.Empty` when none came
            within ``seconds`` (jupyter_client's ``AsyncZMQSocketChannel.get_msg``,
            bound to its channel).
        timeout: Seconds to wait in all; ``None`` waits for ever (in slices), ``0``
            (or less) tries once without waiting.
        slice_seconds: The longest timeout passed to one call of ``get_msg``; the
            last slice is what remains of ``timeout``.

    Returns:
        The first message ``get_msg`` returns.

    Raises:
        queue.Empty: No message came within ``timeout`` seconds.
    """
    if slice_seconds <= 0:
        raise ValueError(f"slice_seconds must be positive, got {slice_seconds}")
    if timeout is not None and timeout <= 0:
        return await get_msg(timeout=0)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        if deadline is None:
            step = slice_seconds
        else:
            step = min(slice_seconds, max(0.0, deadline - time.monotonic()))
        try:
            return await get_msg(timeout=step)
        except queue.Empty:
            if deadline is not None and time.monotonic() >= deadline:
                raise


def install_kernel_wakeup() -> bool:
    """Make ``jupyter_client.channels.AsyncZMQSocketChannel.get_msg`` wait in slices.

    Every call then goes through :func:`sliced_get_msg` with the original method; the
    original stays reachable as the wrapper's ``__wrapped__``. Installing twice does
    nothing the second time.

    Returns:
        ``True`` if the wrapper was installed now, ``False`` if it already was.
    """
    global _original_get_msg
    from jupyter_client.channels import AsyncZMQSocketChannel

    current = AsyncZMQSocketChannel.get_msg
    if getattr(current, _MARKER, False):
        return False
    _original_get_msg = current

    @functools.wraps(current)
    async def get_msg(self: Any, timeout: float | None = None) -> dict[str, Any]:
        original = _original_get_msg
        assert original is not None  # set just above, before the wrapper is installed
        return await sliced_get_msg(
            functools.partial(original, self), timeout, SLICE_SECONDS
        )

    setattr(get_msg, _MARKER, True)
    AsyncZMQSocketChannel.get_msg = get_msg  # type: ignore[method-assign]
    return True


def setup(app: Any) -> dict[str, bool]:
    """Sphinx extension entry point: install the wrapper before notebooks are executed.

    myst-nb executes a notebook while Sphinx reads it, after every extension's
    ``setup``.

    Args:
        app: The Sphinx application (unused).

    Returns:
        Sphinx's extension metadata: safe for parallel reading and writing.
    """
    install_kernel_wakeup()
    return {"parallel_read_safe": True, "parallel_write_safe": True}
