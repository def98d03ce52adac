"""The single place that turns a URI into an fsspec filesystem.

Every read and write of the pipeline (shards, manifests, checkpoints, output) goes through
`filesystem_for`, so retries, endpoints and credentials are configured once. Credentials are never
passed here: botocore finds them itself (AWS_* variables, ~/.aws files, instance profiles), which
keeps them out of arguments, Ray runtime envs and error messages.
"""

from __future__ import annotations

import functools
import os

import fsspec
from fsspec.implementations.local import LocalFileSystem

# S3 throttles (SlowDown) under many concurrent readers; botocore's adaptive mode backs off and
# rate-limits the client, on top of s3fs's own retry loop for connection errors.
S3_CONFIG_KWARGS = {"retries": {"max_attempts": 10, "mode": "adaptive"}}

_S3_PROTOCOLS = ("s3", "s3a")


def protocol_of(uri: str) -> str:
    """The URI's scheme ("s3", "gs", ...), or "file" for a plain path."""
    scheme, sep, _ = uri.partition("://")
    return scheme.lower() if sep else "file"


def is_local(uri: str) -> bool:
    return protocol_of(uri) == "file"


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
    pid: int, endpoint_url: str | None, endpoint_url_s3: str | None, profile: str | None
) -> fsspec.AbstractFileSystem:
    import s3fs  # imported lazily: purely local runs never need botocore

    # skip_instance_cache: s3fs's own cache keys on the arguments only, which are the same for
    # every endpoint; this function's cache is the one that knows the environment.
    # use_listings_cache=False: other processes (Ray workers) write the output and commit markers
    # this process lists; a cached listing would hide them for the life of the process.
    return s3fs.S3FileSystem(
        config_kwargs=S3_CONFIG_KWARGS, skip_instance_cache=True, use_listings_cache=False
    )
