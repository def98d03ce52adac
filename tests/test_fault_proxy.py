"""The fault proxy against the real moto server: faithful when quiet, and each fault really happens.

Small retry settings keep these fast: s3fs's own loop (`fs.retries`) and botocore's attempts are
set per filesystem. What each fault looks like to a client is written down in fault_proxy's
docstring; the tests below pin it.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import http.client
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import aiohttp
import botocore.exceptions
import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import s3fs
from fault_proxy import FaultProxy, FaultRule, fault_proxy_fixture

MiB = 2**20

fault_proxy = fault_proxy_fixture()


@pytest.fixture(scope="module")
def bucket(s3_server) -> str:
    s3_server.create_bucket("fault-proxy")
    return "fault-proxy"


def proxied_s3fs(
    proxy: FaultProxy, *, s3fs_retries: int = 2, botocore_retries: int = 1, timeout_s: float = 5
) -> s3fs.S3FileSystem:
    """An s3fs client through the proxy; botocore_retries is botocore's `max_attempts` (retries
    after the first attempt), s3fs_retries the number of attempts of s3fs's own loop."""
    fs = s3fs.S3FileSystem(
        client_kwargs={"endpoint_url": proxy.url},
        config_kwargs={
            "retries": {"max_attempts": botocore_retries, "mode": "standard"},
            "connect_timeout": timeout_s,
            "read_timeout": timeout_s,
        },
        skip_instance_cache=True,
        use_listings_cache=False,
    )
    fs.retries = s3fs_retries  # s3fs has no constructor argument for its own retry loop
    return fs


def random_bytes(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).bytes(size)


def raw_connection(proxy: FaultProxy) -> http.client.HTTPConnection:
    # A raw HTTP client shows exactly what goes on the wire (moto serves public objects unsigned).
    return http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10)


# -- faithful pass-through ---------------------------------------------------------------------


def test_every_s3_request_kind_passes_through_unchanged(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy)
    data = random_bytes(300_000)

    fs.pipe_file(f"{bucket}/kinds/blob", data)  # PUT
    assert fs.cat_file(f"{bucket}/kinds/blob") == data  # HEAD + GET
    assert fs.cat_file(f"{bucket}/kinds/blob", start=1000, end=2500) == data[1000:2500]  # Range
    assert fs.info(f"{bucket}/kinds/blob")["size"] == len(data)
    with pytest.raises(FileNotFoundError):  # a 404 HEAD without a body
        fs.info(f"{bucket}/kinds/missing")
    assert not fs.exists(f"{bucket}/kinds/missing")

    # Content-MD5 and checksum headers travel with the body (moto checks neither; the header
    # forwarding itself is pinned by test_headers_and_bodies_reach_the_upstream_byte_for_byte).
    md5 = hashlib.md5(data)
    put = fs.call_s3(
        "put_object",
        Bucket=bucket,
        Key="kinds/checked",
        Body=data,
        ContentMD5=base64.b64encode(md5.digest()).decode(),
        ChecksumSHA256=base64.b64encode(hashlib.sha256(data).digest()).decode(),
    )
    assert put["ETag"] == f'"{md5.hexdigest()}"'
    assert fs.cat_file(f"{bucket}/kinds/checked") == data

    # LIST v2 with continuation tokens, three pages.
    fs.pipe({f"{bucket}/kinds/many/{i:02d}": str(i).encode() for i in range(20)})
    keys, token = [], None
    while True:
        page = fs.call_s3(
            "list_objects_v2",
            Bucket=bucket,
            Prefix="kinds/many/",
            MaxKeys=7,
            **({"ContinuationToken": token} if token else {}),
        )
        keys += [item["Key"] for item in page["Contents"]]
        if not page["IsTruncated"]:
            break
        token = page["NextContinuationToken"]
    assert keys == [f"kinds/many/{i:02d}" for i in range(20)]

    fs.rm_file(f"{bucket}/kinds/many/00")  # DELETE
    fs.rm([f"{bucket}/kinds/many/{i:02d}" for i in range(1, 20)])  # POST ?delete
    assert fs.find(f"{bucket}/kinds/many/") == []

    # Multipart: create, upload part, abort.
    upload = fs.call_s3("create_multipart_upload", Bucket=bucket, Key="kinds/aborted")
    fs.call_s3(
        "upload_part",
        Bucket=bucket,
        Key="kinds/aborted",
        UploadId=upload["UploadId"],
        PartNumber=1,
        Body=data,
    )
    fs.call_s3(
        "abort_multipart_upload", Bucket=bucket, Key="kinds/aborted", UploadId=upload["UploadId"]
    )
    pending = fs.call_s3("list_multipart_uploads", Bucket=bucket, Prefix="kinds/")
    assert pending.get("Uploads", []) == []
    assert not fs.exists(f"{bucket}/kinds/aborted")

    counts = fault_proxy.counts()
    assert all(counts[f"requests:{m}"] > 0 for m in ("GET", "HEAD", "PUT", "POST", "DELETE"))
    assert fault_proxy.faults_injected() == 0


def test_multipart_uploads_over_5_mib_pass_through_from_s3fs_and_pyarrow(fault_proxy, bucket):
    data = random_bytes(17 * MiB, seed=1)

    fs = proxied_s3fs(fault_proxy)
    # s3fs goes multipart only from 2 x chunksize: 17 MiB -> parts of 8, 8 and 1 MiB.
    fs.pipe_file(f"{bucket}/mpu/s3fs.bin", data, chunksize=8 * MiB)
    assert fault_proxy.requests_seen("PUT", r"mpu/s3fs\.bin") == 3
    assert fs.cat_file(f"{bucket}/mpu/s3fs.bin") == data

    arrow_fs = pafs.S3FileSystem(
        endpoint_override=fault_proxy.endpoint_override, scheme="http", region="us-east-1"
    )
    # pyarrow sends its parts with Transfer-Encoding: chunked (aws-chunked bodies with a trailer
    # checksum) and Expect: 100-continue.
    with arrow_fs.open_output_stream(f"{bucket}/mpu/arrow.bin") as stream:
        stream.write(data)
    with arrow_fs.open_input_file(f"{bucket}/mpu/arrow.bin") as stream:
        assert stream.read_at(3 * MiB, 5 * MiB) == data[5 * MiB : 8 * MiB]
        assert stream.size() == len(data)

    rows = 400_000
    table = pa.table(
        {
            "key": [f"clip-{i}" for i in range(rows)],
            "noise": np.random.default_rng(2).standard_normal(rows).astype(np.float32),
        }
    )
    pq.write_table(table, f"{bucket}/mpu/table.parquet", filesystem=arrow_fs, compression="none")
    assert arrow_fs.get_file_info(f"{bucket}/mpu/table.parquet").size > 5 * MiB
    assert pq.read_table(f"{bucket}/mpu/table.parquet", filesystem=arrow_fs).equals(table)

    assert fault_proxy.requests_seen("POST", r"mpu/arrow\.bin") == 2  # create + complete
    assert fault_proxy.requests_seen("PUT", r"mpu/arrow\.bin") >= 2  # the parts
    assert fault_proxy.faults_injected() == 0


def test_chunked_requests_and_keep_alive_pass_through(fault_proxy, bucket):
    connection = raw_connection(fault_proxy)
    body = random_bytes(200_000, seed=3)
    chunks = [body[i : i + 65_536] for i in range(0, len(body), 65_536)]
    # A public object: moto answers unsigned requests for it.
    connection.request(
        "PUT",
        f"/{bucket}/raw/chunked",
        body=iter(chunks),
        headers={"x-amz-acl": "public-read"},
        encode_chunked=True,
    )
    assert connection.getresponse().read() == b""
    first_socket = connection.sock

    for start, end in [(0, 99), (150_000, 199_999)]:
        connection.request(
            "GET", f"/{bucket}/raw/chunked", headers={"Range": f"bytes={start}-{end}"}
        )
        response = connection.getresponse()
        assert response.status == 206
        assert response.read() == body[start : end + 1]
    connection.request("HEAD", f"/{bucket}/raw/chunked")
    response = connection.getresponse()
    assert response.getheader("Content-Length") == str(len(body))
    assert response.read() == b""
    assert connection.sock is first_socket  # one kept-alive connection for all four requests
    connection.close()


class _EchoHandler(BaseHTTPRequestHandler):
    """An upstream that answers with what it received: method, path, headers, body digest."""

    protocol_version = "HTTP/1.1"

    def do_PUT(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        echo = {
            "method": self.command,
            "path": self.path,
            "headers": [[name.lower(), value] for name, value in self.headers.items()],
            "body_sha256": hashlib.sha256(body).hexdigest(),
        }
        payload = json.dumps(echo).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(payload)))
        self.send_header("x-amz-checksum-crc32", "AAAAAA==")
        self.send_header("ETag", '"etag"')
        self.end_headers()
        self.wfile.write(payload)

    do_POST = do_PUT

    def log_message(self, format, *args) -> None:
        pass


def test_headers_and_bodies_reach_the_upstream_byte_for_byte():
    echo_server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    threading.Thread(target=echo_server.serve_forever, daemon=True).start()
    body = random_bytes(70_000, seed=5)
    sent_headers = {
        "Host": "bucket.example:9000",
        "Content-MD5": base64.b64encode(hashlib.md5(body).digest()).decode(),
        "x-amz-checksum-sha256": base64.b64encode(hashlib.sha256(body).digest()).decode(),
        "x-amz-content-sha256": "STREAMING-UNSIGNED-PAYLOAD-TRAILER",
        "Authorization": "AWS4-HMAC-SHA256 Credential=testing/20260101/us-east-1/s3/aws4_request",
        "Content-Encoding": "aws-chunked",
    }
    try:
        with FaultProxy(f"http://127.0.0.1:{echo_server.server_address[1]}") as proxy:
            connection = raw_connection(proxy)
            for chunked in (False, True):
                path = "/bucket/a%20key/with+odd=chars?partNumber=2&uploadId=u%2B1"
                if chunked:
                    pieces = iter([body[:1000], body[1000:]])
                    connection.request("PUT", path, pieces, sent_headers, encode_chunked=True)
                else:
                    connection.request("PUT", path, body, sent_headers)
                response = connection.getresponse()
                echo = json.loads(response.read())
                assert response.getheader("x-amz-checksum-crc32") == "AAAAAA=="
                assert response.getheader("ETag") == '"etag"'
                assert echo["method"] == "PUT" and echo["path"] == path
                assert echo["body_sha256"] == hashlib.sha256(body).hexdigest()
                received = dict(echo["headers"])
                for name, value in sent_headers.items():
                    assert received[name.lower()] == value
                assert received["content-length"] == str(len(body))
                assert "transfer-encoding" not in received
            connection.close()
        assert proxy.request_log()[0].path == "/bucket/a key/with+odd=chars"
    finally:
        echo_server.shutdown()
        echo_server.server_close()


def test_concurrent_clients_and_other_processes_go_through(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy)
    objects = {f"{bucket}/many/{i:03d}": random_bytes(10_000, seed=i) for i in range(60)}
    fs.pipe(objects)  # s3fs sends these concurrently

    def read_back(path: str) -> bool:
        return fs.cat_file(path) == objects[path]  # one client shared by 8 threads

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(read_back, objects))
    assert fs.cat(list(objects)) == objects

    script = (
        "import json, sys, s3fs\n"
        "fs = s3fs.S3FileSystem(skip_instance_cache=True)\n"
        f"fs.pipe_file('{bucket}/child/out', fs.cat_file('{bucket}/many/007'))\n"
        "print(json.dumps(fs.ls('" + bucket + "/child/', refresh=True)))\n"
    )
    child = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **fault_proxy.environ()},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert json.loads(child.stdout) == [f"{bucket}/child/out"]
    with fault_proxy.endpoint_env():  # what a process started meanwhile would inherit
        assert s3fs.S3FileSystem(skip_instance_cache=True).cat_file(f"{bucket}/child/out")
    assert os.environ["AWS_ENDPOINT_URL"] != fault_proxy.url
    assert fault_proxy.requests_seen("GET", r"/child/out$") == 1
    assert fault_proxy.requests_seen("PUT", r"/child/out$") == 1
    assert fs.cat_file(f"{bucket}/child/out") == objects[f"{bucket}/many/007"]


# -- faults -------------------------------------------------------------------------------------


def test_five_percent_faults_are_absorbed_by_retries(fault_proxy, bucket):
    fault_proxy.set_rules(
        [
            FaultRule(error_rate=0.05, error_status=500),
            FaultRule(error_rate=0.05, error_status=503),
            FaultRule(methods="GET", drop_rate=0.05),
        ]
    )
    fs = proxied_s3fs(fault_proxy, s3fs_retries=5, botocore_retries=4)
    objects = {f"{bucket}/flaky/{i:03d}": random_bytes(50_000, seed=i) for i in range(30)}
    for path, data in objects.items():
        fs.pipe_file(path, data)
    assert {path: fs.cat_file(path, start=0, end=None) for path in objects} == objects
    assert sorted(fs.ls(f"{bucket}/flaky/", refresh=True)) == sorted(objects)

    assert fault_proxy.faults_injected("error") >= 5
    assert fault_proxy.faults_injected("drop") >= 1
    assert {e.status for e in fault_proxy.fault_log("error")} == {500, 503}


def test_a_500_storm_outlasting_the_retries_fails_the_read(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=3, botocore_retries=1)
    fs.pipe_file(f"{bucket}/storm/a", b"payload")
    fault_proxy.start_storm(r"/storm/a$", status=500)

    with pytest.raises(OSError) as raised:
        fs.cat_file(f"{bucket}/storm/a", start=0, end=7)  # a ranged GET: no HEAD first
    assert type(raised.value) is OSError and raised.value.errno == errno.EREMOTEIO
    assert str(raised.value) == "[Errno 121] We encountered an internal error. Please try again."
    cause = raised.value.__cause__
    assert isinstance(cause, botocore.exceptions.ClientError)
    assert cause.response["Error"]["Code"] == "InternalError"
    # botocore tried twice; s3fs does not retry an InternalError.
    assert fault_proxy.faults_injected("storm", "GET") == 2

    # A HEAD error has no body: botocore names it by its status, "500".
    with pytest.raises(OSError, match="Internal Server Error") as raised:
        fs.info(f"{bucket}/storm/a")
    assert raised.value.__cause__.response["Error"]["Code"] == "500"

    assert fault_proxy.storm_active
    fault_proxy.end_storm()
    assert fs.cat_file(f"{bucket}/storm/a") == b"payload"


def test_a_503_storm_is_retried_by_s3fs_too_then_fails(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=2, botocore_retries=1)
    fault_proxy.start_storm(r"/storm/b$", methods="PUT", status=503)

    with pytest.raises(OSError) as raised:
        fs.pipe_file(f"{bucket}/storm/b", b"payload")
    assert raised.value.errno == errno.EBUSY
    assert "Please reduce your request rate." in str(raised.value)
    assert raised.value.__cause__.response["Error"]["Code"] == "SlowDown"
    # SlowDown is retried by s3fs's own loop around botocore's: 2 x 2 attempts.
    assert fault_proxy.faults_injected("storm", "PUT") == 4
    assert not s3fs.S3FileSystem(skip_instance_cache=True).exists(f"{bucket}/storm/b")


def test_a_storm_ends_after_its_failures_and_retries_then_succeed(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=1, botocore_retries=2)
    fs.pipe_file(f"{bucket}/storm/c", b"survives")
    storm = fault_proxy.start_storm(r"/storm/c", methods=["GET", "HEAD"], max_failures=2)

    assert fs.cat_file(f"{bucket}/storm/c", start=0, end=8) == b"survives"
    assert storm.failures == 2 and not fault_proxy.storm_active
    assert fault_proxy.requests_seen("GET", r"/storm/c") == 3


def test_a_dropped_get_body_is_retried_by_s3fs_then_surfaces_as_aiohttp_error(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=3)
    data = random_bytes(100_000, seed=4)
    fs.pipe_file(f"{bucket}/drop/get", data)
    fault_proxy.add_rule(FaultRule(path=r"/drop/get$", methods="GET", drop_rate=1.0))

    with pytest.raises(aiohttp.ClientPayloadError, match="received 50000 of 100000 bytes"):
        fs.cat_file(f"{bucket}/drop/get", start=0, end=len(data))
    # The body is read outside botocore: only s3fs's loop retries it, once per attempt.
    assert fault_proxy.faults_injected("drop", "GET") == 3
    assert not issubclass(aiohttp.ClientPayloadError, OSError)

    fault_proxy.set_rules([FaultRule(path=r"/drop/get$", methods="GET", drop_rate=0.5)])
    assert fs.cat_file(f"{bucket}/drop/get", start=0, end=len(data)) == data


def test_a_get_dropped_before_its_status_is_retried_by_nested_loops(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=2, botocore_retries=0)
    fs.pipe_file(f"{bucket}/drop/early", b"never seen")
    rule = FaultRule(path=r"/drop/early$", methods="GET", drop_rate=1.0, drop_before_status=True)
    fault_proxy.add_rule(rule)

    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        fs.cat_file(f"{bucket}/drop/early", start=0, end=5)
    # s3fs's ranged GET runs its retry loop inside another one (retries**2), botocore's attempts
    # inside that, and aiohttp resends an idempotent request once when a kept-alive connection
    # closes: 2 x 2 x 1 x 2.
    assert fault_proxy.faults_injected("drop", "GET") == 8


def test_a_dropped_put_or_list_answer_surfaces_as_connection_closed(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=1, botocore_retries=1)
    fault_proxy.add_rule(FaultRule(path=r"/drop/put$", methods="PUT", drop_rate=1.0))

    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        fs.pipe_file(f"{bucket}/drop/put", b"applied anyway")
    # The request reached the store before the answer was cut: the write happened.
    direct = s3fs.S3FileSystem(skip_instance_cache=True)
    assert direct.cat_file(f"{bucket}/drop/put") == b"applied anyway"
    assert not issubclass(botocore.exceptions.ConnectionClosedError, OSError)

    fault_proxy.set_rules([FaultRule(methods="GET", query=r"list-type=2", drop_rate=1.0)])
    with pytest.raises(botocore.exceptions.ConnectionClosedError):
        fs.ls(f"{bucket}/drop/", refresh=True)
    assert fault_proxy.faults_injected("drop", "GET") >= 2  # botocore retries a LIST's body


def test_a_delay_past_the_read_timeout_is_a_read_timeout(fault_proxy, bucket):
    fs = proxied_s3fs(fault_proxy, s3fs_retries=1, botocore_retries=0, timeout_s=0.5)
    fs.pipe_file(f"{bucket}/slow/a", b"late")
    fault_proxy.add_rule(FaultRule(path=r"/slow/a$", methods="GET", delay_rate=1.0, delay_s=1.0))

    with pytest.raises(botocore.exceptions.ReadTimeoutError):
        fs.cat_file(f"{bucket}/slow/a", start=0, end=4)
    assert issubclass(botocore.exceptions.ReadTimeoutError, OSError)

    patient = proxied_s3fs(fault_proxy, timeout_s=5)
    started = time.monotonic()
    assert patient.cat_file(f"{bucket}/slow/a", start=0, end=4) == b"late"
    assert time.monotonic() - started >= 1.0
    assert fault_proxy.faults_injected("delay") >= 2


# -- the proxy's own bookkeeping ----------------------------------------------------------------


def test_rules_match_methods_paths_and_queries():
    rule = FaultRule(path=r"/out/_commits/", methods=("put", "POST"), query=r"uploadId=")
    assert rule.matches("POST", "/b/out/_commits/u1.json", "uploadId=x")
    assert not rule.matches("GET", "/b/out/_commits/u1.json", "uploadId=x")
    assert not rule.matches("PUT", "/b/out/_commits/u1.json", "")
    assert not rule.matches("PUT", "/b/out/u1.parquet", "uploadId=x")
    assert FaultRule().matches("DELETE", "/anything", "")
    with pytest.raises(ValueError):
        FaultRule(error_status=404)
    with pytest.raises(ValueError):
        FaultRule(drop_rate=1.5)


def test_the_same_seed_replays_the_same_faults(s3_server, bucket):
    def fault_sequence(seed: int) -> list[tuple[str, int | None]]:
        rules = [FaultRule(error_rate=0.3, error_status=503), FaultRule(drop_rate=0.3)]
        with FaultProxy(s3_server.endpoint_url, rules, seed=seed) as proxy:
            connection = raw_connection(proxy)
            for i in range(30):
                try:
                    connection.request("GET", f"/{bucket}/seeded-{i}")
                    connection.getresponse().read()
                except (http.client.HTTPException, OSError):
                    connection.close()
                    connection = raw_connection(proxy)
            connection.close()
            assert proxy.requests_seen() == 30
            return [(event.path, event.status) for event in proxy.fault_log()]

    first = fault_sequence(7)
    assert first == fault_sequence(7)
    assert first != fault_sequence(8)
    assert len(first) > 0
