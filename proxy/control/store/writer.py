"""How a route state change becomes durable before anyone is told it happened: the
StateWriter contract the admin API and the controller write through, the local one (file
backend: memory first, the caller saves), and the errors a shared store adds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from proxy.core.state import PolicyStore, RouteState

Compute = Callable[[RouteState], RouteState]


class StateUnavailable(Exception):
    """The shared state store cannot be reached: nothing was changed anywhere."""


class LeaseLost(Exception):
    """A controller write refused because this replica no longer holds the lease (fencing)."""


class StateWriter(Protocol):
    async def change(
        self, route: str, compute: Compute, expected: int | None = None, fenced: bool = False
    ) -> tuple[RouteState, RouteState]:
        """Apply `compute` to the route's current state and store the result everywhere.

        Returns (before, after). `expected`: the revision the caller saw (If-Match), else
        any. `fenced`: only while holding the controller lease. Raises PolicyError (409
        stale revision, or whatever `compute` raises), StateUnavailable, LeaseLost; on any
        of them nothing changed."""
        ...


class LocalWriter:
    """One process owns the state: the change is in force once swapped in memory; the
    caller's persist() writes the file."""

    def __init__(self, store: PolicyStore) -> None:
        self.store = store

    async def change(
        self, route: str, compute: Compute, expected: int | None = None, fenced: bool = False
    ) -> tuple[RouteState, RouteState]:
        current = self.store.state(route)
        prepared = self.store.prepare(route, compute(current), expected)
        return current, self.store.replace(route, prepared, current.revision)
