"""What the workers of `workers: N` send back, gathered for the control plane: the policy
generations each acknowledged (and the wait for all of them), their figures added into the
one Stats with the in-flight gauges, and which endpoints they find available. The
supervisor decides what a late or lost worker means; this module only keeps the books.
"""

from __future__ import annotations

import asyncio
import contextlib

from proxy.control.children import WorkerProcess
from proxy.core import figures
from proxy.core.mirror import Mirrors
from proxy.core.state import PolicyStore
from proxy.core.stats import Stats
from proxy.dataplane.channel import EndpointRow, Figures


class WorkerReports:
    """The books over the supervisor's worker slots (the same list, updated in place)."""

    def __init__(
        self,
        stats: Stats,
        mirrors: Mirrors | None,
        store: PolicyStore,
        workers: list[WorkerProcess | None],
    ) -> None:
        self.stats = stats
        self.mirrors = mirrors  # the workers' shadow copies add up here
        self.store = store
        self.workers = workers
        self.loop = asyncio.get_running_loop()
        self._waiters: list[asyncio.Future[None]] = []

    def merge(self, w: WorkerProcess, message: Figures) -> None:
        figures.merge(self.stats, message.versions)
        if message.mirrors and self.mirrors is not None:
            figures.merge_mirrors(self.mirrors, message.mirrors)
        w.inflight = figures.inflight_of(message.versions)
        figures.set_inflight(self.stats, self._inflight_reports())
        if message.endpoints is not None:
            w.endpoints = message.endpoints

    def lost(self, w: WorkerProcess) -> None:
        """A dead worker's requests are no longer in flight."""
        w.inflight = {}
        figures.set_inflight(self.stats, self._inflight_reports())

    def _inflight_reports(self) -> list[dict[figures.Pair, int]]:
        return [w.inflight for w in self.workers if w is not None]

    async def late(self, generation: int, within: float) -> list[WorkerProcess]:
        """The serving workers that have not applied `generation` after `within` seconds;
        empty as soon as every one has (woken by wake())."""
        deadline = self.loop.time() + within
        while True:
            late = [w for w in self.workers if w is not None and w.serving and w.acked < generation]
            if not late:
                return []
            left = deadline - self.loop.time()
            if left <= 0:
                return late
            waiter = self.loop.create_future()
            self._waiters.append(waiter)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(waiter, left)

    def wake(self) -> None:
        """Something late() counts changed: an acknowledgement, or a worker gone."""
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def endpoint_states(self) -> list[EndpointRow]:
        """An endpoint counts as available only while every serving worker that reported
        finds it so (each worker ejects on its own traffic)."""
        merged: dict[tuple[str, str, str], bool] = {}
        for w in self.workers:
            if w is None or not w.serving or w.endpoints is None:
                continue
            for route, version, url, available in w.endpoints:
                key = (route, version, url)
                merged[key] = merged.get(key, True) and available
        if not merged:  # before the first report
            for rc in self.store.config.routes:
                for v in rc.versions:
                    for ep in v.endpoints:
                        merged[(rc.name, v.name, ep.url)] = True
        return [(r, v, u, a) for (r, v, u), a in merged.items()]
