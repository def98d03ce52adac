"""A fault-injecting HTTP reverse proxy in front of the test S3 server (moto).

Code under test reaches the store through the proxy (`AWS_ENDPOINT_URL=proxy.url` for s3fs and
botocore, `endpoint_override=proxy.endpoint_override, scheme="http"` for pyarrow), from this
process or any other (Ray workers, a subprocess `ast-label run`). Every request is passed through
unchanged (method, path, query, headers, body), except when a fault is injected:

- error: a 500 InternalError or 503 SlowDown with S3's XML error body, answered by the proxy
  without forwarding the request (the store is left untouched);
- drop: the request is forwarded, then the answer is cut: status and headers with the real
  Content-Length, `drop_fraction` of the body, then the socket is closed. With
  `drop_before_status`, and always for an answer without a body (PUT, DELETE, HEAD), nothing at
  all is sent back: the store has applied the request but the client never hears so;
- delay: the request is forwarded at once and its answer held back `delay_s` seconds (a client
  whose read timeout is shorter gives up and retries; the store applied the first request);
- storm: every matching request gets the storm's 5xx, unforwarded, until the test ends it
  (`end_storm()`) or `max_failures` requests have failed; a storm takes precedence over the rules;
- refused: an object that is gone or forbidden (`refuse(path, status=404 | 403, after=n)`):
  after the first `after` matching requests, every one is answered 404 NoSuchKey or 403
  AccessDenied, unforwarded, until `reset()`. Not a fault of the store's health: what a
  client sees when an input listed at planning time is deleted, or a prefix is not writable.
  Refusals take precedence over storms and rules.

A rule with `max_faults` injects at most that many faults (then passes requests through): "the
first PUT of a marker loses its answer", whatever else happens at random beside it.

    rules = [FaultRule(path=r"/bucket/shards/", methods="GET", drop_rate=0.2)]
    with FaultProxy(s3_server.endpoint_url, rules, seed=1) as proxy:   # or the fixture below
        proxy.start_storm(r"/_commits/", methods="PUT", status=503, max_failures=10)
        proxy.refuse(r"/bucket/shards/shard-3", status=404, after=1)   # gone after one HEAD
        ...                                  # AWS_ENDPOINT_URL=proxy.url for the code under test
        assert proxy.faults_injected("storm") == 10

Rules are consulted in order; each matching rule draws its dice from one seeded RNG (a sequential
test replays the same faults); the first error or drop decided wins, delays add up. Counters and
logs are thread-safe.

How clients see each fault, measured through this proxy against moto 5.2.5 with s3fs 2026.9.0,
aiobotocore 3.10.0, botocore 1.43.117, aiohttp 3.14.5, pyarrow 26.0.1
(tests/test_fault_proxy.py pins the cheap cases):

Retry layers, outermost first:
- s3fs's loop, `fs.retries` attempts (default 5; an attribute: `S3FileSystem(retries=...)` is not
  an argument, it would reach `AioSession(**kwargs)`), sleeping 0.1 * 1.7**i s. It retries
  botocore `HTTPClientError`s (`ConnectionClosedError`, `ReadTimeoutError`, ...),
  aiohttp `ClientPayloadError`, and `ClientError`s whose text holds "SlowDown" or "reduce your
  request rate"; any other error (InternalError included) is raised at once. The ranged GET of
  `cat_file(start=, end=)` / `open().read()` runs this loop inside another one: errors before
  the status line (timeouts, connection closed) are retried `retries**2` times, a short body
  `retries` times, a ClientError `retries` times (the inner loop turns it into an OSError).
- botocore, `max_attempts` = retries after the first request (config `{"max_attempts": N}` means
  N + 1 requests); default mode "legacy" (5 requests, sleeps rand * 2**(n-1) s, no cap);
  "standard"/"adaptive" sleep rand * min(2**(n-1), 20) s and draw on a per-client retry quota
  of 500 tokens, 5 per retry (10 after a timeout), 1 back per success: after 100 failed
  retries in one client (one cached S3FileSystem per process), botocore stops retrying at all
  until the quota refills (measured: exactly 100 calls, then 1 request per call).
- aiohttp resends an idempotent request (GET, HEAD, PUT, DELETE; not POST) once, at once, when
  a kept-alive connection closes before the status line: drops count twice.

What surfaces after all retries:
- 500 storm: `OSError` (builtins, exactly; MRO OSError, Exception) with errno EREMOTEIO (121),
  "[Errno 121] We encountered an internal error. Please try again.", `__cause__` a
  `botocore.exceptions.ClientError` (MRO ClientError, Exception) with Error.Code "InternalError"
  and HTTPStatusCode 500. Retried by botocore only. On a HEAD (info, exists, size, open,
  cat_file without a range: all HEAD first) the answer has no body: Code "500",
  "[Errno 121] Internal Server Error". `fs.exists(key)` raises; `fs.exists(bucket)` returns
  False (its probes swallow every error).
- 503 storm: `OSError` errno EBUSY (16), "[Errno 16] Please reduce your request rate.", cause
  ClientError Code "SlowDown" (503): retried by botocore and s3fs (5 x 5 = 25 requests by
  default). On a HEAD: Code "503", "[Errno 16] Service Unavailable", which s3fs does NOT retry
  (no "SlowDown" in the text): botocore's attempts only.
- dropped GET body: `aiohttp.ClientPayloadError` (MRO ClientPayloadError,
  aiohttp.ClientError, Exception: not an OSError, not botocore), "Response payload is not
  completed: <ContentLengthError: 400, message='Not enough data to satisfy content length header
  (received 500 of 1000 bytes).'>", cause aiohttp.http_exceptions.ContentLengthError. The body
  is read outside botocore: retried by s3fs's loop only (`fs.retries` requests). A LIST's
  body is read inside botocore: `botocore.exceptions.ConnectionClosedError`.
- dropped before the status line (any PUT, HEAD, DELETE; GET with drop_before_status):
  `botocore.exceptions.ConnectionClosedError` (MRO ConnectionClosedError, HTTPClientError,
  BotoCoreError, Exception: not an OSError), 'Connection was closed before we received a valid
  response from endpoint URL: "http://127.0.0.1:PORT/bucket/key".', context
  aiohttp.ServerDisconnectedError. The write has happened. Default retries: 50 PUTs in 39 s.
- dropped CompleteMultipartUpload answer: the object is written; botocore's retry finds the
  upload gone and s3fs raises `FileNotFoundError` ("The specified upload does not exist...",
  `__cause__` a ClientError with Code "NoSuchUpload") for a write that succeeded (moto; real
  S3's answer to a repeated complete is not checked here). pipeline.storage retries such a
  write whole instead of taking it for a missing object. A dropped CreateMultipartUpload answer
  leaves orphan uploads behind. When one part of `pipe_file` fails, s3fs aborts the upload and
  raises while the sibling parts' tasks go on retrying in the background.
- delay past read_timeout (s3fs default 15 s): `botocore.exceptions.ReadTimeoutError`,
  'Read timeout on endpoint URL: "..."', an OSError with errno None (its MRO runs through
  botocore's vendored requests.RequestException, an OSError); context aiohttp
  SocketTimeoutError. The GET case is nested, as above.
- store unreachable (connection refused): `botocore.exceptions.EndpointConnectionError`
  (MRO botocore ConnectionError, BotoCoreError, Exception: not an OSError), 'Could not connect
  to the endpoint URL: "..."': retried by botocore only, not by s3fs (5 requests, ~6 s, default).
- pyarrow (default retry strategy: 3 requests) raises plain `OSError`, errno None: "When
  reading information for key 'k' in bucket 'b': AWS Error UNKNOWN (HTTP status 500) during
  HeadObject operation: No response body.", "AWS Error SLOW_DOWN during
  CreateMultipartUpload operation: Please reduce your request rate.", "AWS Error
  NETWORK_CONNECTION during GetObject operation: curlCode: 18, Transferred a partial file",
  "... curlCode: 52, Server returned nothing (no headers, no data)".

How long retries take (one call against a storm that outlasts them, measured):
- s3fs + botocore defaults (legacy, 5 requests): 500 PUT 6.5 s; 503 HEAD 9.8 s; 503 PUT
  44 s (25 requests); 503 ranged GET 34 s (25); dropped PUT answer 39 s (50); dropped LIST
  answer 48 s (25); dropped GET body 2.8 s (5). A GET delayed past the 15 s read timeout:
  25 x 5 x 15 s > 30 min.
- an earlier pipeline.storage setting, `{"max_attempts": 10, "mode": "adaptive"}` (11 requests,
  expected sum of sleeps ~65 s per s3fs attempt): 500 PUT 38 s (11 requests); 503 HEAD 76 s
  (11); 503 PUT 321 s (55); 503 ranged GET 385 s (55); dropped PUT answer 308 s (110); dropped
  LIST answer 324 s (55); dropped GET body 2.1 s (5). A GET dropped before its status line:
  2 x 25 x 11 = 550 requests; delayed past the read timeout: 275 x 15 s, over an hour. A faulty
  unit could thus hold a worker for many minutes before the error surfaced (pipeline.storage
  now keeps botocore at 5 standard-mode attempts; AST_LABEL_S3_ATTEMPTS bounds both client
  layers).
"""

from __future__ import annotations

import http.client
import os
import random
import re
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import pytest

# S3's own codes and messages for the two 5xx answers a client must survive.
S3_ERRORS = {
    500: ("InternalError", "We encountered an internal error. Please try again."),
    503: ("SlowDown", "Please reduce your request rate."),
}
# ...and for an object that is gone or forbidden (refusals).
S3_REFUSALS = {
    403: ("AccessDenied", "Access Denied"),
    404: ("NoSuchKey", "The specified key does not exist."),
}

FAULT_KINDS = ("error", "storm", "drop", "delay", "refused")

# Hop-by-hop headers (RFC 9110 7.6.1) belong to one connection and are never forwarded; the proxy
# frames each body itself with Content-Length.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        # The client's 100-continue is answered by the proxy; http.client would not wait for it.
        "expect",
    }
)


def _methods(methods: str | Iterable[str] | None) -> frozenset[str] | None:
    if methods is None:
        return None
    if isinstance(methods, str):
        methods = [methods]
    return frozenset(method.upper() for method in methods)


def _check_status(status: int) -> None:
    if status not in S3_ERRORS:
        raise ValueError(f"status must be one of {sorted(S3_ERRORS)}, got {status}")


@dataclass(frozen=True)
class FaultRule:
    """Which requests (methods, path regex, query regex) get which faults, with what probability.

    `path` is searched (re.search) in the percent-decoded URL path, "/bucket/key"; `query` in the
    raw query string ("list-type=2&prefix=...", "partNumber=3&uploadId=...", "delete").
    """

    path: str = ""
    methods: str | Iterable[str] | None = None
    query: str | None = None
    error_rate: float = 0.0
    error_status: int = 500
    drop_rate: float = 0.0
    drop_fraction: float = 0.5
    drop_before_status: bool = False
    delay_rate: float = 0.0
    delay_s: float = 0.0
    max_faults: int | None = None  # at most this many faults (errors, drops, delays) in all

    def __post_init__(self) -> None:
        object.__setattr__(self, "methods", _methods(self.methods))
        re.compile(self.path)
        if self.query is not None:
            re.compile(self.query)
        _check_status(self.error_status)
        for name in ("error_rate", "drop_rate", "delay_rate", "drop_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")

    def matches(self, method: str, path: str, query: str) -> bool:
        return _matches(self.methods, self.path, self.query, method, path, query)


@dataclass
class Storm:
    """Every matching request fails with `status` until `max_failures` have failed or it ends."""

    path: str
    methods: frozenset[str] | None
    query: str | None
    status: int
    max_failures: int | None
    failures: int = 0

    @property
    def exhausted(self) -> bool:
        return self.max_failures is not None and self.failures >= self.max_failures


@dataclass
class Refusal:
    """Matching requests after the first `after` get 404 NoSuchKey or 403 AccessDenied."""

    path: str
    methods: frozenset[str] | None
    query: str | None
    status: int
    after: int = 0
    seen: int = 0  # matching requests so far, let through or refused


def _matches(
    methods: frozenset[str] | None,
    path_regex: str,
    query_regex: str | None,
    method: str,
    path: str,
    query: str,
) -> bool:
    if methods is not None and method not in methods:
        return False
    if not re.search(path_regex, path):
        return False
    return query_regex is None or re.search(query_regex, query) is not None


@dataclass(frozen=True)
class RequestRecord:
    method: str
    path: str
    query: str
    time: float  # time.monotonic() on arrival
    range: str = ""  # the Range header ("bytes=0-1023"), "" when none


@dataclass(frozen=True)
class FaultEvent:
    kind: str  # one of FAULT_KINDS
    method: str
    path: str
    query: str
    status: int | None = None  # the 5xx of "error" and "storm", the 403 or 404 of "refused"
    request: int = -1  # the faulty request's index in request_log()


@dataclass
class _Plan:
    """What happens to one request."""

    status: int | None = None  # answer this 5xx (or refusal's 403/404) without forwarding
    drop_fraction: float | None = None  # cut the answer after this fraction of its body
    drop_before_status: bool = False  # cut it before its status line
    delay_s: float = 0.0


@dataclass
class _Log:
    requests: list[RequestRecord] = field(default_factory=list)
    faults: list[FaultEvent] = field(default_factory=list)


class FaultProxy:
    """A reverse proxy on 127.0.0.1 (a free port) in front of `upstream_url`, injecting faults."""

    def __init__(
        self,
        upstream_url: str,
        rules: Iterable[FaultRule] = (),
        *,
        seed: int = 0,
        host: str = "127.0.0.1",
        port: int = 0,
        upstream_timeout_s: float = 120.0,
    ):
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"upstream must be an http:// URL, got {upstream_url!r}")
        self.upstream_host = upstream.hostname
        self.upstream_port = upstream.port or 80
        self.upstream_timeout_s = upstream_timeout_s
        self._host = host
        self._port = port
        self._lock = threading.Lock()
        self._rng = random.Random(seed)
        self._rules: list[FaultRule] = list(rules)
        self._storm: Storm | None = None
        self._refusals: list[Refusal] = []
        self._rule_faults: Counter[int] = Counter()  # id(rule) -> faults it injected
        self._log = _Log()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()

    # -- life cycle ------------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        if self._server is not None:
            raise RuntimeError("the proxy is already running")
        server = _ProxyServer((self._host, self._port), _ProxyHandler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True
        )
        self._thread.name = f"fault-proxy-{self.port}"
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        # Handler threads of kept-alive client connections would go on proxying after the
        # listening socket is closed; cut them.
        with self._lock:
            connections = list(self._connections)
        for connection in connections:
            _close_quietly(connection)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the proxy is not running")
        return self._server.server_address[1]

    @property
    def url(self) -> str:
        """The endpoint URL for s3fs / botocore (`AWS_ENDPOINT_URL`, `endpoint_url=`)."""
        return f"http://{self._host}:{self.port}"

    @property
    def endpoint_override(self) -> str:
        """host:port for pyarrow's `S3FileSystem(endpoint_override=..., scheme="http")`."""
        return f"{self._host}:{self.port}"

    def environ(self) -> dict[str, str]:
        """The variables that send a (child) process's S3 traffic through this proxy."""
        return {"AWS_ENDPOINT_URL": self.url}

    @contextmanager
    def endpoint_env(self) -> Iterator[FaultProxy]:
        """Points AWS_ENDPOINT_URL at the proxy for the block, then restores it."""
        saved = {name: os.environ.get(name) for name in self.environ()}
        os.environ.update(self.environ())
        try:
            yield self
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    # -- faults ----------------------------------------------------------------------------------

    def add_rule(self, rule: FaultRule) -> None:
        with self._lock:
            self._rules.append(rule)

    def set_rules(self, rules: Iterable[FaultRule]) -> None:
        with self._lock:
            self._rules = list(rules)
            self._rule_faults.clear()

    def start_storm(
        self,
        path: str = "",
        *,
        methods: str | Iterable[str] | None = None,
        query: str | None = None,
        status: int = 503,
        max_failures: int | None = None,
    ) -> Storm:
        """Fails every matching request from now on (replacing any storm already blowing)."""
        _check_status(status)
        re.compile(path)
        storm = Storm(path, _methods(methods), query, status, max_failures)
        with self._lock:
            self._storm = storm
        return storm

    def end_storm(self) -> None:
        with self._lock:
            self._storm = None

    @property
    def storm_active(self) -> bool:
        with self._lock:
            return self._storm is not None and not self._storm.exhausted

    def refuse(
        self,
        path: str,
        *,
        methods: str | Iterable[str] | None = None,
        query: str | None = None,
        status: int = 404,
        after: int = 0,
    ) -> Refusal:
        """From the `after`+1-th matching request on, answers 404 NoSuchKey (the object is gone)
        or 403 AccessDenied (forbidden), unforwarded, until reset()."""
        if status not in S3_REFUSALS:
            raise ValueError(f"status must be one of {sorted(S3_REFUSALS)}, got {status}")
        re.compile(path)
        refusal = Refusal(path, _methods(methods), query, status, after)
        with self._lock:
            self._refusals.append(refusal)
        return refusal

    def reset(self, seed: int | None = None) -> None:
        """No rules, storm or refusals, and fresh counters: as a new proxy (for shared fixtures);
        with a seed, the dice start again from it."""
        with self._lock:
            if seed is not None:
                self._rng = random.Random(seed)
            self._rules = []
            self._rule_faults.clear()
            self._storm = None
            self._refusals = []
            self._log = _Log()

    # -- counters --------------------------------------------------------------------------------

    def requests_seen(self, method: str | None = None, path: str | None = None) -> int:
        """Requests that reached the proxy, optionally by method and path regex."""
        with self._lock:
            records = list(self._log.requests)
        return sum(
            1
            for record in records
            if (method is None or record.method == method.upper())
            and (path is None or re.search(path, record.path))
        )

    def faults_injected(
        self, kind: str | None = None, method: str | None = None, path: str | None = None
    ) -> int:
        """Faults injected, optionally by kind (one of FAULT_KINDS), method, path."""
        return len(self.fault_log(kind, method, path))

    def fault_log(
        self, kind: str | None = None, method: str | None = None, path: str | None = None
    ) -> list[FaultEvent]:
        if kind is not None and kind not in FAULT_KINDS:
            raise ValueError(f"kind must be one of {FAULT_KINDS}")
        with self._lock:
            events = list(self._log.faults)
        return [
            event
            for event in events
            if (kind is None or event.kind == kind)
            and (method is None or event.method == method.upper())
            and (path is None or re.search(path, event.path))
        ]

    def request_log(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._log.requests)

    def counts(self) -> dict[str, int]:
        """A snapshot: "requests", "requests:<METHOD>", and one entry per fault kind."""
        with self._lock:
            requests = list(self._log.requests)
            faults = list(self._log.faults)
        counts = Counter({kind: 0 for kind in FAULT_KINDS})
        counts["requests"] = len(requests)
        counts.update(f"requests:{record.method}" for record in requests)
        counts.update(event.kind for event in faults)
        return dict(counts)

    # -- used by the handler threads -------------------------------------------------------------

    def _plan(self, method: str, path: str, query: str, range_: str = "") -> _Plan:
        plan = _Plan()
        with self._lock:
            self._log.requests.append(RequestRecord(method, path, query, time.monotonic(), range_))
            for refusal in self._refusals:
                if _matches(refusal.methods, refusal.path, refusal.query, method, path, query):
                    refusal.seen += 1
                    if refusal.seen > refusal.after:
                        self._record("refused", method, path, query, refusal.status)
                        return _Plan(status=refusal.status)
            storm = self._storm
            if (
                storm is not None
                and not storm.exhausted
                and _matches(storm.methods, storm.path, storm.query, method, path, query)
            ):
                storm.failures += 1
                self._record("storm", method, path, query, storm.status)
                return _Plan(status=storm.status)
            delaying: list[FaultRule] = []
            for rule in self._rules:
                if not rule.matches(method, path, query):
                    continue
                # Each rule draws all three dice, so which faults a rule injects does not shift
                # the random sequence of the rules after it.
                error, drop, delay = (self._rng.random() for _ in range(3))
                if rule.max_faults is not None and self._rule_faults[id(rule)] >= rule.max_faults:
                    continue
                if delay < rule.delay_rate and rule.delay_s > 0:
                    plan.delay_s += rule.delay_s
                    delaying.append(rule)
                if plan.status is None and plan.drop_fraction is None:
                    if error < rule.error_rate:
                        plan.status = rule.error_status
                        self._rule_faults[id(rule)] += 1
                    elif drop < rule.drop_rate:
                        plan.drop_fraction = rule.drop_fraction
                        plan.drop_before_status = rule.drop_before_status
                        self._rule_faults[id(rule)] += 1
            if plan.status is not None:
                # An error is answered at once: a delay decided beside it does not happen (and
                # does not count against its rule's max_faults).
                plan.delay_s = 0.0
                plan.drop_fraction = None
                self._record("error", method, path, query, plan.status)
            else:
                self._rule_faults.update(id(rule) for rule in delaying)
            if plan.delay_s:
                self._record("delay", method, path, query)
            if plan.drop_fraction is not None:
                self._record("drop", method, path, query)
        return plan

    def _record(self, kind: str, method: str, path: str, query: str, status=None) -> None:
        # Called by _plan under the lock, right after it logged the request.
        request = len(self._log.requests) - 1
        self._log.faults.append(FaultEvent(kind, method, path, query, status, request))

    def _track(self, connection: socket.socket, open_: bool) -> None:
        with self._lock:
            if open_:
                self._connections.add(connection)
            else:
                self._connections.discard(connection)


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    # Many workers connect at once; the default backlog of 5 would make the kernel drop SYNs.
    request_queue_size = 256
    proxy: FaultProxy

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up (or a connection cut by stop()) is business as usual here.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _ProxyHandler(BaseHTTPRequestHandler):
    # HTTP/1.1: keep-alive, and BaseHTTPRequestHandler answers `Expect: 100-continue` itself.
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server: _ProxyServer

    def setup(self) -> None:
        super().setup()
        self.server.proxy._track(self.connection, True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, False)

    def log_message(self, format: str, *args) -> None:
        pass

    def do_GET(self) -> None:
        self._forward()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = do_GET

    def _forward(self) -> None:
        proxy = self.server.proxy
        target = urlsplit(self.path)
        path, query = unquote(target.path), target.query
        try:
            body = self._read_body()
        except (ValueError, OSError):
            self.close_connection = True
            return
        plan = proxy._plan(self.command, path, query, self.headers.get("Range", ""))
        try:
            if plan.status is not None:
                self._send_s3_error(plan.status, path)
                return
            try:
                status, reason, headers, payload = self._ask_upstream(body)
            except (OSError, http.client.HTTPException) as exc:
                message = f"upstream unreachable: {type(exc).__name__}".encode()
                self._send(502, "Bad Gateway", [("Content-Type", "text/plain")], message)
                return
            if plan.delay_s:
                time.sleep(plan.delay_s)
            if plan.drop_fraction is not None:
                if plan.drop_before_status:
                    payload = b""
                self._send_and_drop(status, reason, headers, payload, plan.drop_fraction)
                return
            self._send(status, reason, headers, payload)
        except OSError:
            # The client gave up (its read timeout ran out during a delay, say).
            self.close_connection = True

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = self.headers.get("Content-Length")
        if length is None:
            return None
        return self.rfile.read(int(length))

    def _read_chunked(self) -> bytes:
        chunks = []
        while True:
            size_line = self.rfile.readline(65537)
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                break
            chunks.append(self.rfile.read(size))
            self.rfile.readline()  # the CRLF after each chunk
        while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
            pass  # trailers: nothing S3 clients send as HTTP trailers matters to the store
        return b"".join(chunks)

    def _ask_upstream(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
        proxy = self.server.proxy
        # One upstream connection per request: a stale kept-alive connection would make the proxy
        # guess whether a non-idempotent request (complete-multipart) had been applied.
        upstream = http.client.HTTPConnection(
            proxy.upstream_host, proxy.upstream_port, timeout=proxy.upstream_timeout_s
        )
        try:
            # Host and every signed header go through unchanged: the signature stays valid.
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in _HOP_BY_HOP and name.lower() != "content-length":
                    upstream.putheader(name, value)
            if body is not None:
                upstream.putheader("Content-Length", str(len(body)))
            upstream.endheaders(body)
            response = upstream.getresponse()
            payload = response.read()
            headers = [
                (name, value)
                for name, value in response.getheaders()
                if name.lower() not in _HOP_BY_HOP
            ]
            return response.status, response.reason, headers, payload
        finally:
            upstream.close()

    def _head_lines(self, status: int, reason: str, headers, payload: bytes) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            # A HEAD answer keeps the object's Content-Length; every other body is framed here.
            if name.lower() == "content-length" and self.command != "HEAD":
                continue
            self.send_header(name, value)
        if self.command != "HEAD" and status not in (204, 304):
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()

    def _send(self, status: int, reason: str, headers, payload: bytes) -> None:
        self._head_lines(status, reason, headers, payload)
        if self.command != "HEAD" and status not in (204, 304):
            self.wfile.write(payload)

    def _send_and_drop(self, status: int, reason: str, headers, payload: bytes, fraction) -> None:
        if payload and self.command != "HEAD":
            self._head_lines(status, reason, headers, payload)
            self.wfile.write(payload[: int(len(payload) * fraction)])
            self.wfile.flush()
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def _send_s3_error(self, status: int, resource: str) -> None:
        code, message = {**S3_ERRORS, **S3_REFUSALS}[status]
        request_id = uuid.uuid4().hex[:16].upper()
        body = (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{code}</Code><Message>{message}</Message>"
            f"<Resource>{_xml_escape(resource)}</Resource><RequestId>{request_id}</RequestId>"
            "</Error>"
        ).encode()
        headers = [
            ("Content-Type", "application/xml"),
            ("x-amz-request-id", request_id),
            ("Date", self.date_time_string()),
            ("Server", "AmazonS3"),
        ]
        self._head_lines(status, http.client.responses[status], headers, body)
        if self.command != "HEAD":
            self.wfile.write(body)


def _xml_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _close_quietly(connection: socket.socket) -> None:
    # shutdown, not close: the handler thread then reads EOF and closes the socket itself.
    try:
        connection.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def fault_proxy_fixture(
    upstream_fixture: str = "s3_server",
    *,
    name: str = "fault_proxy",
    scope: str = "function",
    seed: int = 0,
    set_endpoint_env: bool = False,
):
    """A pytest fixture that yields a running FaultProxy in front of `upstream_fixture`.

    In conftest.py or a test module: `fault_proxy = fault_proxy_fixture()`. The upstream fixture's
    value must have an `endpoint_url` (conftest's `s3_server`). With `set_endpoint_env`,
    AWS_ENDPOINT_URL points at the proxy for the fixture's life (processes started meanwhile,
    `ast-label run` subprocesses, inherit it; a Ray started earlier does not).
    """

    @pytest.fixture(name=name, scope=scope)
    def fault_proxy(request):
        upstream = request.getfixturevalue(upstream_fixture)
        with FaultProxy(upstream.endpoint_url, seed=seed) as proxy:
            if set_endpoint_env:
                with proxy.endpoint_env():
                    yield proxy
            else:
                yield proxy

    return fault_proxy
