"""What the tests share as functions and classes (fixtures stay in conftest.py, which
builds them from these). Import from here: `from tests.helpers import route_config`.

- client: raw_request (send bytes, read until close or timeout), raw_exchange (the same,
  and whether the server closed), read_response / read_framed_body (one response with exact
  HTTP/1.1 framing), RawClient and Resp (a raw keep-alive connection), split_head, status_of
- upstreams: Upstream and version_app (real aiohttp upstreams), serve_app (any aiohttp app
  on a free port), ScriptedUpstream (a raw loopback server that answers scripted bytes),
  RawServer (asyncio.start_server that closes every connection it made), read_request
- builders: route_config (the YAML dict of a route), route_model (a RouteConfig),
  ConfigFile (a graygate.yaml on free ports, for the real command)
- gateway: RunningGateway, start_gateway, stop_gateway (the real App in-process)
- waiting: wait_until
- metrics: scrape_samples, parse_samples, metric_sum, metric_value (/metrics parsed by
  prometheus_client)
- fakes: FakeTransport (a socket-free asyncio transport), deliver (bytes into a
  BufferedProtocol as the loop's reads)
- net, paths, processes: free_port, wait_port, ROOT, compiled_sources, module_of,
  Process, RedisServer
- bench (not re-exported: short harness runs): tools_or_fail, graygate_works, quick_run
- rollout (not re-exported: the end-to-end rollout tests' traffic, admin and process calls)
- openapi_check (not re-exported: it loads the admin OpenAPI document): ResponseChecker, DOC
"""

from tests.helpers.builders import ConfigFile, route_config, route_model
from tests.helpers.client import (
    RawClient,
    Resp,
    raw_exchange,
    raw_request,
    read_framed_body,
    read_response,
    split_head,
    status_of,
)
from tests.helpers.fakes import FakeTransport, deliver
from tests.helpers.gateway import RunningGateway, start_gateway, stop_gateway
from tests.helpers.metrics import metric_sum, metric_value, parse_samples, scrape_samples
from tests.helpers.net import free_port, wait_port
from tests.helpers.paths import ROOT, compiled_sources, module_of
from tests.helpers.processes import Process, RedisServer
from tests.helpers.upstreams import (
    Handler,
    RawServer,
    Script,
    ScriptedUpstream,
    Upstream,
    read_request,
    serve_app,
    version_app,
)
from tests.helpers.waiting import wait_until

__all__ = [
    "ROOT",
    "ConfigFile",
    "FakeTransport",
    "Handler",
    "Process",
    "RawClient",
    "RawServer",
    "RedisServer",
    "Resp",
    "RunningGateway",
    "Script",
    "ScriptedUpstream",
    "Upstream",
    "compiled_sources",
    "deliver",
    "free_port",
    "metric_sum",
    "metric_value",
    "module_of",
    "parse_samples",
    "raw_exchange",
    "raw_request",
    "read_framed_body",
    "read_request",
    "read_response",
    "route_config",
    "route_model",
    "scrape_samples",
    "serve_app",
    "split_head",
    "start_gateway",
    "status_of",
    "stop_gateway",
    "version_app",
    "wait_port",
    "wait_until",
]
