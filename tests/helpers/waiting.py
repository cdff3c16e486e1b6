"""Polling until a condition holds, with a deadline."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def wait_until(
    check: Callable[[], Any], timeout: float = 3.0, step: float = 0.02, what: str = "condition"
) -> Any:
    """The first true value of `check()` (a plain function or a coroutine function), polled
    every `step` seconds; an AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} not reached within {timeout}s"
        await asyncio.sleep(step)
