"""Object storage: the one place that turns a URI into an fsspec filesystem, and retries.

Every read and write of the pipeline's inputs and output (shards, files, manifests, Parquet,
commit markers) goes through `filesystem_for`, so endpoints and credentials are configured once.
Credentials are never passed here: botocore finds them itself (AWS_* variables, ~/.aws files,
instance profiles), which keeps them out of arguments, Ray runtime envs and error messages.
(Checkpoints are read by ast_model.checkpoint, which uses fsspec directly: ast_model stays free of
the pipeline.)

Faults of the store are never the data's: after the retries they surface as `StorageError`, which
the stages turn into a unit that does not commit (a rerun reads it again), never an error row.
`with_retries` takes every exception of a call for a fault of the store: many are not OSErrors
(aiohttp's ClientPayloadError for a body cut short, botocore's ConnectionClosedError and
EndpointConnectionError; tests/fault_proxy.py lists what each fault looks like).

The primitives every writer uses live here too: `put_file` (a whole file, atomically, retried),
`delete_path` (a file or a folder/prefix), `read_files` (many whole files at once).
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import re
import shutil
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

from pipeline.errors import UserError

T = TypeVar("T")

# The client's own retries of one request, below our RetryPolicy: botocore's (standard mode:
# exponential backoff with jitter, SlowDown and 5xx included) and s3fs's loop around it (SlowDown,
# dropped connections, bodies cut short), each this many attempts. Kept short: botocore's adaptive
# mode with 10 attempts took 5 minutes and more per call in a 503 storm (s3fs loops over SlowDown
# on top), and its retry quota stops all retries of a client after 100 failures; RetryPolicy's
# pauses ride out longer outages instead. AST_LABEL_S3_ATTEMPTS overrides the count (tests make
# storms short).
S3_CLIENT_ATTEMPTS = 5
# Seconds to connect, and to wait for an answer's next bytes, before a request counts as failed
# (and is retried). AST_LABEL_S3_TIMEOUT_S overrides both (tests make timeouts short).
S3_TIMEOUT_S = 15.0
# S3 part size of big writes: files under twice this go up in one PUT, bigger ones as a multipart
# upload that becomes visible only when completed (s3fs aborts it on failure). 8 MiB parts keep a
# retried part cheap; S3's minimum is 5 MiB.
S3_PART_BYTES = 8 * 2**20

_GLOB_CHARS = re.compile(r"[*?\[]")


_S3_PROTOCOLS = ("s3", "s3a")


def protocol_of(uri: str) -> str:
    """The URI's scheme ("s3", "gs", ...), or "file" for a plain path."""
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) == "file"


def is_local_filesystem(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def filesystem_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for a local path, an s3:// URI or any fsspec URL.

    Local paths come back absolute. Filesystems are built once per process and reused (a Ray actor
    builds its S3 client on first use, not per batch).
    """
    protocol = protocol_of(uri)
    if protocol == "file":
        path = uri.split("://", 1)[1] if "://" in uri else uri
        return _local_filesystem(), os.path.abspath(os.path.expanduser(path))
    if protocol in _S3_PROTOCOLS:
        fs = _s3_filesystem(
            # botocore (>= 1.31) reads AWS_ENDPOINT_URL and AWS_ENDPOINT_URL_S3 itself; they are
            # part of the cache key so a process that changes them gets a client that sees it.
            # The pid is too: a forked child must not reuse its parent's event loop thread.
            os.getpid(),
            os.environ.get("AWS_ENDPOINT_URL"),
            os.environ.get("AWS_ENDPOINT_URL_S3"),
            os.environ.get("AWS_PROFILE"),
            os.environ.get("AST_LABEL_S3_ATTEMPTS"),
            os.environ.get("AST_LABEL_S3_TIMEOUT_S"),
        )
        return fs, fs._strip_protocol(uri)
    # fsspec keeps its own per-process instance cache for the other schemes.
    return fsspec.core.url_to_fs(uri)


def uri_for(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """The full URI of `path` in `fs`: an absolute path when local, scheme://path otherwise."""
    if isinstance(fs, LocalFileSystem):
        return path
    return fs.unstrip_protocol(path)


def error_reason(exc: BaseException) -> str:
    """One short line for an error row or message: exception type and text, never a traceback.

    botocore's messages name the operation and error code, never the credentials.
    """
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"[:300]


def list_folder(fs: fsspec.AbstractFileSystem, path: str, detail: bool = False) -> list[Any]:
    """Direct children of path: their paths, or with `detail` their info dicts (name, size,
    modification time); [] when it does not exist. detail=False is not derived from the details:
    locally those cost one stat per file. Never from a stale listing cache: other processes (Ray
    tasks, earlier runs) write here."""
    fs.invalidate_cache(path)
    try:
        return list(fs.ls(path, detail=detail))
    except FileNotFoundError:
        return []


def join_uri(base: str, *parts: str) -> str:
    """`base` joined with path parts by "/", for local paths and URIs alike."""
    joined = base.rstrip("/")
    for part in parts:
        joined = f"{joined}/{part.strip('/')}"
    return joined


@functools.cache
def _local_filesystem() -> LocalFileSystem:
    return LocalFileSystem()


@functools.lru_cache(maxsize=8)
def _s3_filesystem(
    pid: int,
    endpoint_url: str | None,
    endpoint_url_s3: str | None,
    profile: str | None,
    attempts_text: str | None,
    timeout_text: str | None,
) -> fsspec.AbstractFileSystem:
    import s3fs  # imported lazily: purely local runs never need botocore

    # skip_instance_cache: s3fs's own cache keys on the arguments only, which are the same for
    # every endpoint; this function's cache is the one that knows the environment.
    # use_listings_cache=False: other processes (Ray workers) write the output and commit markers
    # this process lists; a cached listing would hide them for the life of the process.
    attempts = max(1, int(attempts_text or S3_CLIENT_ATTEMPTS))
    timeout_s = float(timeout_text or S3_TIMEOUT_S)
    # A fresh dict per client: botocore rewrites the retries entry in place.
    config = {
        "retries": {"total_max_attempts": attempts, "mode": "standard"},
        "connect_timeout": timeout_s,
        "read_timeout": timeout_s,
    }
    fs = s3fs.S3FileSystem(config_kwargs=config, skip_instance_cache=True, use_listings_cache=False)
    fs.retries = attempts  # s3fs's own loop: an attribute, not a constructor argument
    return fs


# --- faults and retries -------------------------------------------------------------------------


class StorageError(Exception):
    """A read or write that the store failed (5xx, throttling, dropped connections, timeouts, an
    object listed at planning time that is now missing, forbidden or replaced), after the
    retries."""


class CredentialsError(StorageError, UserError):
    """The store refused who we are: no credentials, or keys it does not accept. Retrying cannot
    help and the user can fix it (exit 2, one line naming the settings); code that turns storage
    faults into uncommitted units still sees a StorageError."""


# S3 error codes that mean the credentials themselves are wrong (not a missing permission).
_CREDENTIAL_CODES = frozenset(
    {
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "ExpiredToken",
        "InvalidToken",
        "TokenRefreshRequired",
    }
)
CREDENTIALS_ADVICE = (
    "set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_ENDPOINT_URL for "
    "an S3-compatible store), or run where an instance profile applies"
)


class ObjectChanged(Exception):
    """The object was replaced while being read: the bytes after a retry would be another
    object's. Not the data's fault either; a rerun reads the new object whole."""


@dataclass(frozen=True)
class RetryPolicy:
    """Our retries, on top of the client's own (botocore's standard mode, s3fs's loop): a call
    that still fails is tried again after a pause with full jitter, up to 1, 2, 4, ... s (at most
    `max_delay_s`), `attempts` times in all. A burst of errors longer than the client's retries
    then does not end a unit; one longer than these does, and the rerun reads it again.

    AST_LABEL_IO_ATTEMPTS and AST_LABEL_IO_DELAY_S override the defaults (tests shorten them).
    """

    attempts: int = 4
    first_delay_s: float = 1.0
    max_delay_s: float = 16.0

    @classmethod
    def from_environment(cls) -> RetryPolicy:
        defaults = cls()
        return cls(
            attempts=max(1, int(os.environ.get("AST_LABEL_IO_ATTEMPTS", defaults.attempts))),
            first_delay_s=float(os.environ.get("AST_LABEL_IO_DELAY_S", defaults.first_delay_s)),
        )

    def delay_s(self, attempt: int) -> float:
        """The pause after failed attempt number `attempt` (0-based)."""
        return random.uniform(0, min(self.max_delay_s, self.first_delay_s * 2**attempt))


# Not worth retrying: the object is gone, forbidden or replaced, and will be for the next few
# seconds too.
_PERMANENT = (
    FileNotFoundError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    ObjectChanged,
)
# ...except this "not found", which is a write that was done: when the answer to a multipart
# upload's completion is lost, the client's retry finds the upload already gone (s3fs raises
# FileNotFoundError). Writing the whole object again is right; giving up would fail the unit.
_WRITE_DONE_CODES = frozenset({"NoSuchUpload"})


def with_retries(call: Callable[[], T], what: str, policy: RetryPolicy | None = None) -> T:
    """call(), retried per the policy; its last failure raised as StorageError("<what>: reason").

    Any exception of the call is a fault of the store (see the module docstring); the ones
    that retrying cannot help (`is_permanent`) fail at once.
    """
    policy = policy or RetryPolicy.from_environment()
    for attempt in range(policy.attempts):
        try:
            return call()
        except Exception as error:
            if is_credentials_problem(error):
                raise CredentialsError(
                    f"{what}: no usable credentials ({error_reason(error)}); {CREDENTIALS_ADVICE}"
                ) from error
            if is_permanent(error) or attempt + 1 >= policy.attempts:
                raise StorageError(f"{what}: {storage_reason(error)}") from error
            time.sleep(policy.delay_s(attempt))
    raise AssertionError("unreachable")


def is_credentials_problem(error: BaseException) -> bool:
    """Whether the store refused the credentials themselves: none found, or keys or a token it
    does not accept (an access denied to valid keys is a permission, not this)."""
    botocore_errors = sys.modules.get("botocore.exceptions")
    for candidate in _causes(error):
        if botocore_errors is not None and isinstance(
            candidate, botocore_errors.NoCredentialsError | botocore_errors.PartialCredentialsError
        ):
            return True
        if _s3_error_code(candidate) in _CREDENTIAL_CODES:
            return True
    # An error that crossed a process boundary keeps only its text: botocore's own wording,
    # "An error occurred (InvalidAccessKeyId) when calling ...", not a file name that happens to
    # contain a code.
    return any(f"({code})" in str(error) for code in _CREDENTIAL_CODES)


def _causes(error: BaseException, depth: int = 6) -> Iterator[BaseException]:
    """The error, then what caused it (raise ... from) or was being handled, a few levels down:
    s3fs raises its PermissionError while handling botocore's ClientError, and ours wrap both."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [error]
    while pending and len(seen) < depth:
        candidate = pending.pop(0)
        if candidate is None or id(candidate) in seen:
            continue
        seen.add(id(candidate))
        yield candidate
        pending += [candidate.__cause__, candidate.__context__]


def is_permanent(error: BaseException) -> bool:
    """Whether retrying cannot help: the object or bucket is missing, access is denied, or the
    object was replaced while being read (credentials: is_credentials_problem)."""
    if isinstance(error, _PERMANENT):
        return _s3_error_code(error) not in _WRITE_DONE_CODES
    return False


def _s3_error_code(error: BaseException) -> str | None:
    """The S3 error code ("NoSuchKey", "AccessDenied", ...) behind an s3fs error, when known."""
    for candidate in (error, error.__cause__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return response.get("Error", {}).get("Code")
    return None


def storage_reason(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError):
        return "not found"
    if isinstance(error, PermissionError):
        return f"access denied ({error_reason(error)})"
    return error_reason(error)


class RetryingReader:
    """A forward-only reader of one object that outlives dropped connections and 5xx answers:
    a failed read is retried on a fresh handle from the same offset (a ranged GET), per the
    policy. What tarfile's stream mode needs: read(n) and close().

    A fresh handle must read the same object: s3fs pins one handle's reads to the ETag it saw
    (If-Match), but a new handle sees whatever the key holds now. One whose ETag differs from the
    first handle's raises ObjectChanged rather than splice two objects' bytes together.
    """

    def __init__(
        self,
        fs: fsspec.AbstractFileSystem,
        path: str,
        block_size: int,
        policy: RetryPolicy | None = None,
    ):
        self._fs = fs
        self._path = path
        self._block_size = block_size
        self._policy = policy or RetryPolicy.from_environment()
        self._uri = uri_for(fs, path)
        self._position = 0
        self._etag: str | None = None  # of the first handle; None for local files
        self._handle = with_retries(self._open, f"cannot open {self._uri}", self._policy)
        self._etag = _etag_of(self._handle)

    def _open(self):
        handle = self._fs.open(self._path, "rb", block_size=self._block_size)
        etag = _etag_of(handle)
        if self._etag is not None and etag != self._etag:
            with contextlib.suppress(Exception):
                handle.close()
            raise ObjectChanged(f"the object was replaced while being read (ETag {etag})")
        if self._position:
            handle.seek(self._position)
        return handle

    def read(self, size: int = -1) -> bytes:
        def attempt() -> bytes:
            if self._handle is None:
                self._handle = self._open()
            try:
                return self._handle.read(size)
            except BaseException:
                with contextlib.suppress(Exception):
                    self._handle.close()
                self._handle = None  # the next attempt starts a new request at the same offset
                raise

        what = f"cannot read {self._uri} at byte {self._position}"
        data = with_retries(attempt, what, self._policy)
        self._position += len(data)
        return data

    def close(self) -> None:
        if self._handle is not None:
            with contextlib.suppress(Exception):
                self._handle.close()
            self._handle = None

    def __enter__(self) -> RetryingReader:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _etag_of(handle) -> str | None:
    details = getattr(handle, "details", None)  # s3fs: the HEAD's answer; local files: none
    return details.get("ETag") if isinstance(details, dict) else None


# --- whole files: written atomically, read many at once, deleted --------------------------------


def put_file(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Writes a whole file so that readers see either nothing/the old file or all of the new one;
    retried per RetryPolicy, then StorageError.

    Local: a hidden temp file in the same folder, fsync, os.replace. Object stores: one pipe_file,
    a single PUT or (s3fs, big files) a multipart upload that only appears once completed.
    """
    with_retries(lambda: _put_once(fs, path, data), f"cannot write {uri_for(fs, path)}")


def _put_once(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if not is_local_filesystem(fs):
        protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
        fs.pipe_file(path, data, **({"chunksize": S3_PART_BYTES} if "s3" in protocols else {}))
        return
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    temp = os.path.join(folder, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex}")
    try:
        with open(temp, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temp)
        raise
    # Make the rename durable before the caller writes anything that depends on it (a marker).
    folder_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(folder_fd)
    finally:
        os.close(folder_fd)


def is_temp_name(name: str) -> bool:
    """Whether a file name is one of put_file's local temp files (left by a killed process)."""
    return name.startswith(".") and ".tmp-" in name


def read_files(fs: fsspec.AbstractFileSystem, paths: list[str], what: str) -> list[bytes]:
    """Whole files, in order; s3fs fetches them concurrently. Retried per RetryPolicy, then
    StorageError("<what>: reason"). (fs.cat would treat [ ] * ? in a path as a glob; cat_ranges
    takes paths literally.) Memory: the files' bytes at once."""
    if not paths:
        return []
    return with_retries(lambda: fs.cat_ranges(paths, None, None, on_error="raise"), what)


def delete_path(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """delete_path_once, retried per RetryPolicy, then StorageError."""
    with_retries(lambda: delete_path_once(fs, path), f"cannot delete {uri_for(fs, path)}")


def delete_path_once(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Deletes a file or a whole folder/prefix; nothing when it does not exist."""
    if is_local_filesystem(fs):
        if os.path.isdir(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)
        return
    fs.invalidate_cache(path)
    objects = fs.find(path)  # the object itself, or every object under the prefix
    if any(_GLOB_CHARS.search(name) for name in objects):
        for name in objects:  # fs.rm would expand these names as glob patterns
            fs.rm_file(name)
    elif objects:
        fs.rm(objects)  # s3fs: bulk deletes of up to 1000 keys


def delete_if_empty(fs: fsspec.AbstractFileSystem, path: str) -> None:
    """Removes an empty local folder (object stores have no empty folders)."""
    if is_local_filesystem(fs):
        with contextlib.suppress(OSError):
            os.rmdir(path)


def modified_s(info: dict[str, Any]) -> float | None:
    """A listing entry's modification time in seconds (local mtime, S3 LastModified)."""
    if "mtime" in info:
        return float(info["mtime"])
    modified = info.get("LastModified") or info.get("last_modified")
    if isinstance(modified, datetime):
        return modified.timestamp()
    return None
