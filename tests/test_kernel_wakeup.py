"""Waiting for kernel messages in slices: ``baddiff_core.kernel_wakeup``
(jupyter/nbclient#312)."""

from __future__ import annotations

import asyncio
import queue
import time

import pytest

from baddiff_core import kernel_wakeup
from baddiff_core.kernel_wakeup import install_kernel_wakeup, sliced_get_msg


class FakeGetMsg:
    """An async ``get_msg(timeout=...)`` that records its timeouts, sleeps each one and
    raises ``queue.Empty``, except on the calls listed in ``answer_on`` (1-based), which
    return a message at once."""

    def __init__(self, answer_on: int | None = None):
        self.timeouts: list[float | None] = []
        self.answer_on = answer_on

    async def __call__(self, timeout: float | None = None) -> dict:
        self.timeouts.append(timeout)
        if len(self.timeouts) == self.answer_on:
            return {"msg_type": "execute_reply", "call": len(self.timeouts)}
        await asyncio.sleep(timeout or 0)
        raise queue.Empty


def test_slices_are_short_and_cover_the_timeout_before_empty():
    fake = FakeGetMsg()
    start = time.monotonic()
    with pytest.raises(queue.Empty):
        asyncio.run(sliced_get_msg(fake, timeout=0.35, slice_seconds=0.1))
    elapsed = time.monotonic() - start
    assert len(fake.timeouts) >= 4
    assert all(0 <= t <= 0.1 for t in fake.timeouts)
    assert sum(fake.timeouts) == pytest.approx(0.35, abs=0.05)
    assert 0.34 <= elapsed < 1.0


def test_a_message_in_the_third_slice_is_returned_then():
    fake = FakeGetMsg(answer_on=3)
    msg = asyncio.run(sliced_get_msg(fake, timeout=10, slice_seconds=0.05))
    assert msg == {"msg_type": "execute_reply", "call": 3}
    assert fake.timeouts == [0.05, 0.05, 0.05]


def test_no_timeout_keeps_slicing_until_a_message_comes():
    fake = FakeGetMsg(answer_on=6)
    msg = asyncio.run(sliced_get_msg(fake, timeout=None, slice_seconds=0.01))
    assert msg["call"] == 6
    assert fake.timeouts == [0.01] * 6


@pytest.mark.parametrize("timeout", [0, 0.0, -1])
def test_a_zero_timeout_is_one_try_without_waiting(timeout):
    fake = FakeGetMsg()
    with pytest.raises(queue.Empty):
        asyncio.run(sliced_get_msg(fake, timeout=timeout))
    assert fake.timeouts == [0]


def test_install_is_idempotent_and_wraps_the_channel(monkeypatch):
    from jupyter_client.channels import AsyncZMQSocketChannel

    first = install_kernel_wakeup()  # False when conftest installed it already
    assert install_kernel_wakeup() is False
    wrapper = AsyncZMQSocketChannel.get_msg
    assert getattr(wrapper, "_baddiff_kernel_wakeup", False)
    original = wrapper.__wrapped__
    assert original is kernel_wakeup._original_get_msg
    assert not getattr(original, "_baddiff_kernel_wakeup", False)
    assert first in (True, False)

    # The wrapper calls the saved original, bound to the channel, in slices.
    calls: list[tuple[object, float | None]] = []

    async def fake_original(self, timeout=None):
        calls.append((self, timeout))
        if len(calls) < 3:
            await asyncio.sleep(timeout)
            raise queue.Empty
        return {"msg_type": "status"}

    monkeypatch.setattr(kernel_wakeup, "_original_get_msg", fake_original)
    monkeypatch.setattr(kernel_wakeup, "SLICE_SECONDS", 0.02)
    channel = object()
    assert asyncio.run(wrapper(channel, timeout=5)) == {"msg_type": "status"}
    assert [c[0] for c in calls] == [channel] * 3
    assert all(t is not None and t <= kernel_wakeup.SLICE_SECONDS for _, t in calls)


def test_sphinx_setup_installs_and_is_parallel_safe():
    from jupyter_client.channels import AsyncZMQSocketChannel

    assert kernel_wakeup.setup(None) == {
        "parallel_read_safe": True,
        "parallel_write_safe": True,
    }
    assert getattr(AsyncZMQSocketChannel.get_msg, "_baddiff_kernel_wakeup", False)


@pytest.mark.slow
def test_a_real_kernel_shows_a_widget_promptly():
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipywidgets")
    install_kernel_wakeup()
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("import ipywidgets\nprint('ready')"),
        nbformat.v4.new_code_cell(
            "from IPython.display import display\n"
            "slider = ipywidgets.IntSlider(value=3)\n"
            "display(slider)"
        ),
    ]
    start = time.monotonic()
    nbclient.NotebookClient(nb, timeout=60, kernel_name="python3").execute()
    assert time.monotonic() - start < 30
    assert nb.cells[0].outputs[0]["text"] == "ready\n"
    data = nb.cells[1].outputs[0]["data"]
    assert "application/vnd.jupyter.widget-view+json" in data
