"""What an output's nearest-neighbour index holds, and where (built by neighbour_index.py).

Under OUT/.ast-label/neighbours/:

    manifest.json              the commit point: the model, and every segment with the units it
                               holds (and each unit file's size when indexed)
    <segment>.faiss            one segment: a FAISS index of unit-length embeddings (cosine =
                               inner product): IVF{nlist},SQ8 when big, exact (Flat) when small
    <segment>.ids.npy          (N, 3) int32: each vector's unit (in the segment's list), row in
                               the unit file, file ordinal in the unit

A unit the index holds counts as covered while its unit file has the size it had when indexed;
`similar` searches every other committed unit exactly (new ones, and ones a run with
--overwrite rewrote), so no result is missed for being newer than the index.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.defaults import META_DIR
from pipeline.output.layout import unit_id_of
from pipeline.output.reader import CommittedOutput
from pipeline.storage import StorageError, list_folder, read_files, with_retries

INDEX_DIR = f"{META_DIR}/neighbours"
MANIFEST_NAME = f"{INDEX_DIR}/manifest.json"
INDEX_FORMAT = "ast-label-neighbours"
INDEX_VERSION = 1


@dataclass(frozen=True)
class Segment:
    name: str  # the files' stem: seg-<12 hex>
    kind: str  # "ivf" or "flat"
    windows: int
    units: tuple[str, ...]  # unit ids, in the order their vectors were added
    # Each unit file's size when indexed: a unit rewritten since (a run with --overwrite) has
    # another, and is searched exactly until the next `index`.
    unit_bytes: tuple[int, ...]
    nprobe: int = 0  # lists probed per query (ivf)

    @property
    def index_file(self) -> str:
        return f"{INDEX_DIR}/{self.name}.faiss"

    @property
    def ids_file(self) -> str:
        return f"{INDEX_DIR}/{self.name}.ids.npy"

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Segment:
        return cls(
            name=str(data["name"]),
            kind=str(data["kind"]),
            windows=int(data["windows"]),
            units=tuple(data["units"]),
            unit_bytes=tuple(int(size) for size in data["unit_bytes"]),
            nprobe=int(data.get("nprobe", 0)),
        )


@dataclass(frozen=True)
class Manifest:
    dim: int
    weights_sha256: str
    model_fingerprint: str
    segments: tuple[Segment, ...] = ()
    library: str = ""
    model: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def windows(self) -> int:
        return sum(segment.windows for segment in self.segments)

    def unit_bytes(self) -> dict[str, int]:
        """unit id -> its unit file's size when indexed, for every unit the index holds."""
        return {
            unit: size
            for segment in self.segments
            for unit, size in zip(segment.units, segment.unit_bytes, strict=True)
        }

    def covered(self, sizes: dict[str, int]) -> set[str]:
        """The committed units (`sizes`: unit id -> size now) the index holds as they are."""
        return {unit for unit, size in self.unit_bytes().items() if sizes.get(unit) == size}

    def to_json(self) -> bytes:
        data = {
            "format": INDEX_FORMAT,
            "version": INDEX_VERSION,
            "library": self.library,
            "metric": "cosine: inner product of unit-length embeddings",
            "dim": self.dim,
            "model": self.model,
            "weights_sha256": self.weights_sha256,
            "model_fingerprint": self.model_fingerprint,
            "segments": [asdict(segment) for segment in self.segments],
        }
        return json.dumps(data, indent=1).encode()


def read_manifest(output: CommittedOutput) -> Manifest | None:
    """The index's manifest; None when there is none. A manifest this version cannot read counts
    as none (the next `index` rebuilds). StorageError when the store keeps failing."""
    fs, path = output.location.fs, output.location.path(MANIFEST_NAME)
    try:
        (blob,) = read_files(fs, [path], f"cannot read {MANIFEST_NAME} of {output.uri}")
    except StorageError as error:
        if isinstance(error.__cause__, FileNotFoundError):
            return None
        raise
    try:
        data = json.loads(blob)
        if data.get("format") != INDEX_FORMAT or data.get("version") != INDEX_VERSION:
            return None
        return Manifest(
            dim=int(data["dim"]),
            weights_sha256=str(data["weights_sha256"]),
            model_fingerprint=str(data.get("model_fingerprint", "")),
            segments=tuple(Segment.from_json(item) for item in data["segments"]),
            library=str(data.get("library", "")),
            model=str(data.get("model", "")),
        )
    except (ValueError, KeyError, TypeError):
        return None


def index_fits(manifest: Manifest, output: CommittedOutput, dim: int) -> str | None:
    """Why the index does not describe this output's embeddings (None when it does)."""
    if manifest.dim != dim:
        return f"it holds {manifest.dim}-d vectors, the output {dim}-d"
    if manifest.weights_sha256 != output.metadata.get("weights_sha256"):
        return "it was built for another model's embeddings"
    return None


def unit_sizes(output: CommittedOutput) -> dict[str, int]:
    """unit id -> size in bytes of each committed unit file (one listing of the output)."""
    fs, root = output.location.fs, output.location.root
    listing = with_retries(lambda: list_folder(fs, root, detail=True), f"cannot list {output.uri}")
    committed = {unit_id_of(path) for path in output.files}
    sizes = {
        unit_id_of(info["name"]): int(info.get("size") or 0)
        for info in listing
        if info["name"].endswith(".parquet")
    }
    return {unit: size for unit, size in sizes.items() if unit in committed}
