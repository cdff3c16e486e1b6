"""The gateway's /metrics, scraped and parsed with prometheus_client's text parser."""

from __future__ import annotations

from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_samples(gw: Any) -> Samples:
    """Every sample of the gateway's /metrics: {(name, sorted label pairs): value}.
    `gw` is a RunningGateway, or anything with an admin_url."""
    async with aiohttp.ClientSession() as s, s.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        return parse_samples(await r.text())


def parse_samples(text: str) -> Samples:
    """Every sample of a /metrics text: {(name, sorted label pairs): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def metric_sum(samples: Samples, name: str, **labels: str) -> float:
    """Sum of every sample of `name` whose labels include `labels`."""
    total = 0.0
    for (n, lbls), value in samples.items():
        d = dict(lbls)
        if n == name and all(d.get(k) == v for k, v in labels.items()):
            total += value
    return total


async def metric_value(gw: Any, name: str, **labels: str) -> float:
    """Sum of the samples of `name` on the gateway's /metrics whose labels include `labels`."""
    return metric_sum(await scrape_samples(gw), name, **labels)
