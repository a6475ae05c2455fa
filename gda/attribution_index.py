"""The attribution index: a FAISS inner-product index over the training embeddings of every shard, with a
manifest that says what it holds, so that it can be extended shard by shard and refused when stale.

Stored as one safetensors file: the `faiss.serialize_index` bytes as a uint8 tensor and the manifest as JSON
in the file's metadata (safetensors cannot execute code on load), written to a temp name and renamed so a
reader sees the old index or the new one, never half. An IVF-PQ index with a refine stage is too large to
read into RAM: its parts are files beside it, named by its version and written before the manifest that
names them (gda.index_files), and the service maps them.

A new shard is *added* to the existing index; anything that invalidates vectors already in it (another
embedder version, a shard whose content changed or that was removed) rebuilds it, and so does crossing
`SearchSettings.ivf_above` or `pq_above`, because an index cannot change its kind by adding. A rebuild trains
on a sample drawn from every shard and then adds the shards one by one, so it never holds all vectors twice.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import faiss
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from gda import index as faiss_search
from gda import index_files
from gda.arrays import IdArray
from gda.index import SearchSettings

INDEX_FILE = "index.safetensors"
_TENSOR = "faiss_index"
_MANIFEST = "manifest"
_PARTS = "parts"


@dataclass(frozen=True)
class ShardEntry:
    count: int
    content_hash: str  # of the shard's ids and embeddings: a changed shard forces a rebuild


@dataclass(frozen=True)
class Manifest:
    embedder_version: str
    dim: int
    kind: str  # "flat" (exact), "ivf" or "ivfpq" (gda.index.kind_for)
    count: int
    shards: dict[str, ShardEntry]
    # A hash of the serialised FAISS index and every field above: it names exactly what answered a query.
    version: str


@dataclass(frozen=True)
class AttributionIndex:
    faiss_index: faiss.Index  # searchable by training id
    manifest: Manifest


def shard_hash(shard: IdArray) -> str:
    """A hash of a shard's ids and embeddings (shape, dtype and bytes)."""
    digest = hashlib.sha256()
    for array in (
        np.ascontiguousarray(shard.ids, dtype=np.int64),
        np.ascontiguousarray(shard.values, dtype=np.float32),
    ):
        digest.update(str(array.shape).encode())
        digest.update(array.tobytes())
    return digest.hexdigest()[:16]


def _check_shards(shards: Mapping[str, IdArray]) -> int:
    """The common embedding width of `shards`; ValueError if they disagree, repeat ids or hold nothing."""
    if not shards:
        raise ValueError("no training embeddings to index: materialize training_embeddings first")
    dims = {name: shard.values.shape[1] for name, shard in shards.items()}
    first = next(iter(dims))
    odd = {name: width for name, width in dims.items() if width != dims[first]}
    if odd:
        raise ValueError(f"training embeddings differ in width: shard {first} has {dims[first]}, but {odd}")
    ids = np.concatenate([shard.ids for shard in shards.values()])
    if len(ids) == 0:
        raise ValueError("no training embeddings to index: every shard is empty")
    unique, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        raise ValueError(f"training ids occur in more than one row, e.g. {int(unique[counts > 1][0])}")
    return dims[first]


def _version(index: faiss.Index | np.ndarray, fields: Mapping[str, object]) -> str:
    """A hash of the serialised index (its bytes as read from the file, or the index streamed through the
    hash in chunks, never whole: at 10^7 refined vectors they are gigabytes) and ``fields``."""
    digest = hashlib.sha256()
    if isinstance(index, np.ndarray):
        digest.update(index.data)
    else:
        faiss.write_index(index, faiss.PyCallbackIOWriter(lambda chunk: digest.update(chunk) or len(chunk)))
    digest.update(json.dumps(fields, sort_keys=True).encode())
    return digest.hexdigest()[:12]


def _manifest_fields(manifest: Manifest) -> dict[str, object]:
    fields = asdict(manifest)
    del fields["version"]
    return fields


def _versioned(
    index: faiss.Index, embedder_version: str, hashes: Mapping[str, str], counts: Mapping[str, int], dim: int
) -> AttributionIndex:
    entries = {name: ShardEntry(counts[name], hashes[name]) for name in sorted(hashes)}
    manifest = Manifest(embedder_version, dim, faiss_search.kind_of(index), int(index.ntotal), entries, version="")
    version = _version(index, _manifest_fields(manifest))
    return AttributionIndex(index, replace(manifest, version=version))


def _rebuild_reason(
    current: Manifest, embedder_version: str, hashes: Mapping[str, str], total: int, settings: SearchSettings, dim: int
) -> str | None:
    if current.embedder_version != embedder_version:
        return f"embedder version {current.embedder_version} -> {embedder_version}"
    if current.dim != dim:
        return f"embedding width {current.dim} -> {dim}"
    removed = sorted(set(current.shards) - set(hashes))
    if removed:
        return f"shard(s) removed: {', '.join(removed)}"
    changed = [name for name, entry in sorted(current.shards.items()) if hashes[name] != entry.content_hash]
    if changed:
        return f"shard(s) changed: {', '.join(changed)}"
    wanted = faiss_search.kind_for(total, settings)
    if current.kind != wanted:
        return (
            f"{total} rows with ivf_above={settings.ivf_above}, pq_above={settings.pq_above} call for a {wanted} "
            f"index, not {current.kind}"
        )
    return None


def update_index(
    current: AttributionIndex | None,
    embedder_version: str,
    shards: Mapping[str, IdArray],
    settings: SearchSettings = SearchSettings(),
) -> tuple[AttributionIndex, str]:
    """The index over every shard in `shards` (name -> training embeddings), and the action taken:
    "built", "added N shards", "unchanged" or "rebuilt: <reason>". `current` is never modified."""
    dim = _check_shards(shards)
    hashes = {name: shard_hash(shard) for name, shard in shards.items()}
    counts = {name: len(shard.ids) for name, shard in shards.items()}
    total = sum(counts.values())
    reason = (
        None if current is None else _rebuild_reason(current.manifest, embedder_version, hashes, total, settings, dim)
    )
    if current is None or reason is not None:
        built = faiss_search.empty(dim, total, _training_sample(shards, total, settings.train_rows), settings)
        for name in sorted(shards):
            faiss_search.add(built, shards[name].ids, shards[name].values)
        return _versioned(
            built, embedder_version, hashes, counts, dim
        ), "built" if current is None else f"rebuilt: {reason}"
    added = sorted(set(shards) - set(current.manifest.shards))
    if not added:
        return current, "unchanged"
    extended = faiss.clone_index(current.faiss_index)
    for name in added:
        faiss_search.add(extended, shards[name].ids, shards[name].values)
    return _versioned(extended, embedder_version, hashes, counts, dim), f"added {len(added)} shards"


def _training_sample(shards: Mapping[str, IdArray], total: int, rows: int) -> np.ndarray:
    """About ``rows`` rows drawn from every shard in proportion to its size."""
    fraction = min(1.0, rows / total)
    parts = []
    for number, name in enumerate(sorted(shards)):
        values = shards[name].values
        take = max(1, round(len(values) * fraction)) if len(values) else 0
        parts.append(faiss_search.training_sample(values, take, seed=number))
    return np.concatenate(parts)


def search(index: AttributionIndex, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(training ids, inner products), each (n_queries, min(k, count)), best first. An IVF index can find
    fewer than k in the lists it probes: missing results have id -1."""
    if query_embeddings.ndim != 2 or query_embeddings.shape[1] != index.manifest.dim:
        raise ValueError(
            f"query embeddings of shape {query_embeddings.shape} do not match the index width {index.manifest.dim}"
        )
    # A copy: gda.index.search normalises float32 queries in place.
    return faiss_search.search(index.faiss_index, np.array(query_embeddings, dtype=np.float32), k)


def save_index(path: Path, index: AttributionIndex) -> None:
    """Write the index and its manifest to `path` via a temp file and rename (its parts first, if it has
    them), then delete the parts of the index it replaced."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    metadata = {_MANIFEST: json.dumps(asdict(index.manifest), sort_keys=True)}
    stem = None
    if index_files.has_parts(index.faiss_index):
        stem = f"index-{index.manifest.version}"
        sizes = index_files.write_parts(index.faiss_index, path.parent, stem)
        refine = faiss_search.refine_stage(index.faiss_index)
        metadata[_PARTS] = json.dumps({"stem": stem, "sizes": sizes, "refine_factor": int(refine.k_factor)})
        serialised = np.zeros(0, dtype=np.uint8)
    else:
        serialised = faiss.serialize_index(index.faiss_index)
    try:
        save_file({_TENSOR: serialised}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    index_files.remove_other_parts(path.parent, keep=stem)


def load_index(path: Path, mapped: bool = True) -> AttributionIndex:
    """The index saved at `path`; ValueError (one line) if the file is not one or does not match its manifest.
    An index saved in parts is searched from its mapped files, or read wholly into RAM with `mapped=False`
    (to add to it); its parts are checked by size, the rest by its version hash."""
    try:
        with safe_open(str(path), framework="numpy") as handle:
            metadata = handle.metadata() or {}
            saved = json.loads(metadata[_MANIFEST])
            serialised = handle.get_tensor(_TENSOR)
        manifest = Manifest(
            **{**saved, "shards": {name: ShardEntry(**entry) for name, entry in saved["shards"].items()}}
        )
        if _PARTS in metadata:
            parts = json.loads(metadata[_PARTS])
            index = index_files.read_parts(path.parent, parts["stem"], parts["sizes"], parts["refine_factor"], mapped)
        else:
            if _version(serialised, _manifest_fields(manifest)) != manifest.version:
                raise ValueError(f"content does not hash to its manifest version {manifest.version}")
            index = faiss.deserialize_index(serialised)
    except FileNotFoundError:
        raise
    except (OSError, KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"{path}: not a valid attribution index ({type(error).__name__}: {error})") from error
    return AttributionIndex(index, manifest)


@dataclass(frozen=True)
class IndexRefresh:
    index: AttributionIndex
    action: str  # update_index's
    embedded: int  # training embeddings given, over every shard
    complete: bool  # the index holds exactly those vectors, from exactly those shards


def refresh_index(
    path: Path, embedder_version: str, shards: Mapping[str, IdArray], settings: SearchSettings
) -> IndexRefresh:
    """`update_index` of the index saved at `path` (if any) with `shards`, saved back to `path`. ValueError if a
    shard was embedded by another embedder version than `embedder_version`: indexing it would mix spaces."""
    stale = sorted(name for name, shard in shards.items() if shard.metadata.get("embedder_version") != embedder_version)
    if stale:
        raise ValueError(
            f"training_embeddings of shards {', '.join(stale)} come from another embedder version; "
            "re-materialize them before the index"
        )
    current = load_index(path, mapped=False) if path.exists() else None
    updated, action = update_index(current, embedder_version, shards, settings)
    save_index(path, updated)
    embedded = sum(len(shard.ids) for shard in shards.values())
    complete = updated.faiss_index.ntotal == updated.manifest.count == embedded and sorted(
        updated.manifest.shards
    ) == sorted(shards)
    return IndexRefresh(updated, action, embedded, complete)
