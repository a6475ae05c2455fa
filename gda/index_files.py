"""An IVF-PQ index with a refine stage, saved as files that the OS pages in instead of one blob read into RAM.

At 10^7 vectors of 768 dimensions the 8-bit copies that re-rank the shortlist are 7.7 GB and the PQ lists
0.6 GB; at LAION-400M they are 317 GB and 26 GB. Saved as three files in one folder:

- ``ids``: the training id of each position (int64, 8 B a vector), read into RAM for the id map;
- ``base``: the OPQ rotation and the IVF-PQ index, whose inverted lists FAISS maps from the file
  (``IO_FLAG_MMAP``);
- ``refine``: the stored copies, mapped as well (``IO_FLAG_MMAP_IFC``). FAISS cannot map both from one file
  (the two flags need different readers), hence two files.

A search pages in the lists it probes and the shortlist's copies: the page cache holds them, and under
memory pressure the kernel drops them instead of the process failing. Each file is written to a temp name
and renamed; they are named by the index version, so the files of the index being replaced stay intact
until the new manifest that names the new ones is in place (gda.attribution_index).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import faiss
import numpy as np

PARTS = ("ids", "base", "refine")


def has_parts(index: faiss.Index) -> bool:
    """Whether ``index`` is an id map over a refine stage, the layout these files hold."""
    outer = faiss.downcast_index(index)
    return isinstance(outer, faiss.IndexIDMap) and isinstance(faiss.downcast_index(outer.index), faiss.IndexRefine)


def _path(folder: Path, stem: str, part: str) -> Path:
    return folder / f"{stem}.{part}"


def write_parts(index: faiss.Index, folder: Path, stem: str) -> dict[str, int]:
    """Write ``index`` (``has_parts``) as the files ``stem.ids``, ``stem.base``, ``stem.refine`` in ``folder``;
    the size of each part in bytes."""
    outer = faiss.downcast_index(index)
    refine = faiss.downcast_index(outer.index)
    sizes = {}
    for part in PARTS:
        path = _path(folder, stem, part)
        tmp = path.with_name(f".{path.name}.tmp")
        try:
            if part == "ids":
                with open(tmp, "wb") as handle:
                    np.save(handle, faiss.vector_to_array(outer.id_map), allow_pickle=False)
            else:
                faiss.write_index(refine.base_index if part == "base" else refine.refine_index, str(tmp))
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        sizes[part] = path.stat().st_size
    return sizes


def read_parts(folder: Path, stem: str, sizes: Mapping[str, int], refine_factor: int, mapped: bool) -> faiss.Index:
    """The index saved by ``write_parts`` (``sizes`` as it returned them): searched from mapped files, or read
    wholly into RAM (``mapped=False``, to add to it). ValueError if a file is missing or its size differs from
    the one recorded: hashing every byte on each load would defeat the mapping."""
    paths = {part: _path(folder, stem, part) for part in PARTS}
    for part, path in paths.items():
        found = path.stat().st_size if path.exists() else None
        if found != sizes[part]:
            raise ValueError(f"{path} is {'missing' if found is None else f'{found} bytes'}, not {sizes[part]} bytes")
    ids = np.load(paths["ids"], allow_pickle=False)
    base = faiss.read_index(str(paths["base"]), faiss.IO_FLAG_MMAP | faiss.IO_FLAG_READ_ONLY if mapped else 0)
    copies = faiss.read_index(str(paths["refine"]), faiss.IO_FLAG_MMAP_IFC if mapped else 0)
    if base.ntotal != len(ids) or copies.ntotal != len(ids):
        raise ValueError(
            f"{folder}: index files of {stem} disagree: {len(ids)} ids, {base.ntotal} codes, {copies.ntotal} copies"
        )
    refine = faiss.IndexRefine(base, copies)
    refine.k_factor = refine_factor
    # An id map only wraps an empty index: wrap it as empty, then give back its size and fill the map.
    refine.ntotal = 0
    outer = faiss.IndexIDMap(refine)
    refine.ntotal = outer.ntotal = len(ids)
    faiss.copy_array_to_vector(np.ascontiguousarray(ids, dtype=np.int64), outer.id_map)
    return outer


def remove_other_parts(folder: Path, keep: str | None) -> None:
    """Delete index files in ``folder`` of every stem but ``keep``: those of replaced indexes, or of a save that
    was killed before its manifest landed. A server that mapped them keeps reading them (the inode lives on)."""
    for part in PARTS:
        for path in folder.glob(f"*.{part}"):
            if path.name != f"{keep}.{part}":
                path.unlink(missing_ok=True)
