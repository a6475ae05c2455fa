"""The attribution index: adding a shard equals rebuilding, what forces a rebuild, atomic saves, clear errors."""

from __future__ import annotations

from pathlib import Path

import faiss
import numpy as np
import pytest

import gda.attribution_index as attribution_index
from gda.arrays import IdArray
from gda.arrays import save as save_array
from gda.attribution_index import load_index, refresh_index, save_index, search, update_index
from gda.corpus.shards import image_id
from gda.index import SearchSettings

DIM = 16
EXACT = SearchSettings()
IVF = SearchSettings(ivf_above=150, nlist=4, nprobe=4)  # nprobe = nlist: every list probed, so results are exact


def unit(rng: np.random.Generator, rows: int) -> np.ndarray:
    vectors = rng.normal(size=(rows, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def shard(number: int, rows: int, seed: int | None = None) -> IdArray:
    rng = np.random.default_rng(number if seed is None else seed)
    return IdArray(np.array([image_id(number, i) for i in range(rows)], dtype=np.int64), unit(rng, rows))


def queries(n: int = 8) -> np.ndarray:
    return unit(np.random.default_rng(99), n)


def assert_same_answers(
    a: attribution_index.AttributionIndex, b: attribution_index.AttributionIndex, k: int = 10
) -> None:
    ids_a, scores_a = search(a, queries(), k)
    ids_b, scores_b = search(b, queries(), k)
    np.testing.assert_array_equal(ids_a, ids_b)
    np.testing.assert_allclose(scores_a, scores_b, rtol=0, atol=1e-6)


def test_adding_a_shard_answers_as_a_rebuild_does() -> None:
    first = {"00000": shard(0, 40), "00001": shard(1, 30)}
    index, action = update_index(None, "emb1", first, EXACT)
    assert action == "built"
    assert (index.manifest.kind, index.manifest.count, index.manifest.dim) == ("flat", 70, DIM)
    everything = {**first, "00002": shard(2, 25)}
    added, action = update_index(index, "emb1", everything, EXACT)
    assert action == "added 1 shards"
    assert index.faiss_index.ntotal == 70  # the current index is left as it was
    rebuilt, _ = update_index(None, "emb1", everything, EXACT)
    assert added.manifest.shards == rebuilt.manifest.shards and added.manifest.count == rebuilt.manifest.count == 95
    assert_same_answers(added, rebuilt)
    ids, _ = search(added, shard(2, 25).values[:3], 1)
    assert ids[:, 0].tolist() == shard(2, 25).ids[:3].tolist()  # each new vector finds itself


def test_the_same_shards_leave_the_index_unchanged() -> None:
    shards = {"00000": shard(0, 40)}
    index, _ = update_index(None, "emb1", shards, EXACT)
    again, action = update_index(index, "emb1", {"00000": shard(0, 40)}, EXACT)
    assert action == "unchanged" and again is index


def test_a_new_embedder_version_rebuilds() -> None:
    shards = {"00000": shard(0, 40)}
    index, _ = update_index(None, "emb1", shards, EXACT)
    rebuilt, action = update_index(index, "emb2", shards, EXACT)
    assert action == "rebuilt: embedder version emb1 -> emb2"
    assert rebuilt.manifest.embedder_version == "emb2" and rebuilt.manifest.version != index.manifest.version


def test_a_removed_or_changed_shard_rebuilds() -> None:
    shards = {"00000": shard(0, 40), "00001": shard(1, 30)}
    index, _ = update_index(None, "emb1", shards, EXACT)
    fewer, action = update_index(index, "emb1", {"00000": shards["00000"]}, EXACT)
    assert action == "rebuilt: shard(s) removed: 00001"
    assert fewer.manifest.count == 40 and set(fewer.manifest.shards) == {"00000"}
    assert_same_answers(fewer, update_index(None, "emb1", {"00000": shards["00000"]}, EXACT)[0])
    changed, action = update_index(index, "emb1", {**shards, "00001": shard(1, 30, seed=7)}, EXACT)
    assert action == "rebuilt: shard(s) changed: 00001"
    assert changed.manifest.shards["00001"].content_hash != index.manifest.shards["00001"].content_hash


def test_crossing_ivf_above_rebuilds_as_ivf_and_ivf_grows_by_adding() -> None:
    small = {"00000": shard(0, 100)}
    index, _ = update_index(None, "emb1", small, IVF)
    assert index.manifest.kind == "flat"
    crossed, action = update_index(index, "emb1", {**small, "00001": shard(1, 100)}, IVF)
    assert action.startswith("rebuilt: 200 rows with ivf_above=150, pq_above=20000000 call for a ivf index")
    assert crossed.manifest.kind == "ivf"
    grown, action = update_index(crossed, "emb1", {**small, "00001": shard(1, 100), "00002": shard(2, 60)}, IVF)
    assert action == "added 1 shards" and grown.manifest.kind == "ivf" and grown.manifest.count == 260
    exact, _ = update_index(None, "emb1", {**small, "00001": shard(1, 100), "00002": shard(2, 60)}, EXACT)
    assert_same_answers(grown, exact)


def test_crossing_pq_above_rebuilds_with_pq_codes_that_still_find_the_nearest() -> None:
    pq = SearchSettings(ivf_above=50, pq_above=400, nlist=4, nprobe=4, pq_bytes=8)
    small = {"00000": shard(0, 300)}
    index, _ = update_index(None, "emb1", small, pq)
    assert index.manifest.kind == "ivf"
    everything = {**small, "00001": shard(1, 300)}
    crossed, action = update_index(index, "emb1", everything, pq)
    assert action.startswith("rebuilt: 600 rows with ivf_above=50, pq_above=400 call for a ivfpq index")
    assert crossed.manifest.kind == "ivfpq" and crossed.faiss_index.ntotal == 600
    assert faiss.extract_index_ivf(crossed.faiss_index).code_size == 8  # 8 bytes a vector instead of 64
    exact, _ = update_index(None, "emb1", everything, EXACT)
    approximate_ids, _ = search(crossed, queries(), 10)
    exact_ids, _ = search(exact, queries(), 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(approximate_ids.tolist(), exact_ids.tolist())])
    assert overlap >= 0.6, overlap  # 8-byte codes of 16-d vectors: close, not exact


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    index, _ = update_index(None, "emb1", {"00000": shard(0, 40), "00001": shard(1, 30)}, EXACT)
    path = tmp_path / "attribution_index" / "index.safetensors"
    save_index(path, index)
    loaded = load_index(path)
    assert loaded.manifest == index.manifest
    assert_same_answers(loaded, index)
    assert [p.name for p in path.parent.iterdir()] == ["index.safetensors"]


def test_an_interrupted_save_leaves_the_old_index_readable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "index.safetensors"
    old, _ = update_index(None, "emb1", {"00000": shard(0, 40)}, EXACT)
    save_index(path, old)
    new, _ = update_index(old, "emb1", {"00000": shard(0, 40), "00001": shard(1, 30)}, EXACT)

    def crash_midway(tensors: dict, filename: str, metadata: dict) -> None:
        Path(filename).write_bytes(b"half an index")
        raise OSError("disk full")

    monkeypatch.setattr(attribution_index, "save_file", crash_midway)
    with pytest.raises(OSError, match="disk full"):
        save_index(path, new)
    assert load_index(path).manifest == old.manifest
    assert [p.name for p in tmp_path.iterdir()] == ["index.safetensors"]


def embedded(number: int, rows: int, version: str = "emb1") -> IdArray:
    """A shard as training_embeddings stores it: with the embedder version that made it."""
    plain = shard(number, rows)
    return IdArray(plain.ids, plain.values, metadata={"embedder_version": version})


def test_refresh_adds_to_the_saved_index_and_refuses_embeddings_of_another_embedder(tmp_path: Path) -> None:
    path = tmp_path / "attribution_index" / "index.safetensors"
    first = refresh_index(path, "emb1", {"00000": embedded(0, 40)}, EXACT)
    assert (first.action, first.embedded, first.complete) == ("built", 40, True)
    both = {"00000": embedded(0, 40), "00001": embedded(1, 30)}
    second = refresh_index(path, "emb1", both, EXACT)
    assert (second.action, second.embedded, second.complete) == ("added 1 shards", 70, True)
    assert load_index(path).manifest == second.index.manifest
    with pytest.raises(ValueError, match="shards 00001 come from another embedder version"):
        refresh_index(path, "emb1", {**both, "00001": embedded(1, 30, "emb0")}, EXACT)
    assert load_index(path).manifest == second.index.manifest


def test_errors_are_one_line(tmp_path: Path) -> None:
    wide = IdArray(np.array([image_id(1, 0)], dtype=np.int64), np.ones((1, DIM + 1), dtype=np.float32))
    with pytest.raises(ValueError, match=r"differ in width: shard 00000 has 16, but \{'00001': 17\}"):
        update_index(None, "emb1", {"00000": shard(0, 5), "00001": wide}, EXACT)
    with pytest.raises(ValueError, match="occur in more than one row"):
        update_index(None, "emb1", {"00000": shard(0, 5), "copy": shard(0, 5)}, EXACT)
    with pytest.raises(ValueError, match="materialize training_embeddings"):
        update_index(None, "emb1", {}, EXACT)
    index, _ = update_index(None, "emb1", {"00000": shard(0, 5)}, EXACT)
    with pytest.raises(ValueError, match=r"shape \(1, 8\) do not match the index width 16"):
        search(index, np.ones((1, 8), dtype=np.float32), 3)

    not_an_index = tmp_path / "other.safetensors"  # a safetensors file, but without a manifest
    save_array(not_an_index, shard(0, 5))
    with pytest.raises(ValueError, match="not a valid attribution index") as raised:
        load_index(not_an_index)
    assert "\n" not in str(raised.value)

    tampered = tmp_path / "tampered.safetensors"
    save_index(tampered, index)
    data = tampered.read_bytes()
    assert data.count(b'\\"emb1\\"') == 1  # the manifest, as JSON inside the header's JSON
    tampered.write_bytes(data.replace(b'\\"emb1\\"', b'\\"emb2\\"'))
    with pytest.raises(ValueError, match="does not hash to its manifest version"):
        load_index(tampered)


REFINED = SearchSettings(ivf_above=0, pq_above=0, nlist=4, nprobe=4, pq_bytes=4, refine="sq8", refine_factor=16)
UNREFINED = SearchSettings(ivf_above=0, pq_above=0, nlist=4, nprobe=4, pq_bytes=4, refine="none")


def recall_at_10(index: attribution_index.AttributionIndex, shards: dict[str, IdArray]) -> float:
    """Overlap of the index's top 10 with a brute-force numpy top 10 of the same vectors."""
    ids = np.concatenate([s.ids for s in shards.values()])
    vectors = np.concatenate([s.values for s in shards.values()])
    exact = ids[np.argsort(-(queries() @ vectors.T), axis=1)[:, :10]]
    found, _ = search(index, queries(), 10)
    return float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found.tolist(), exact.tolist())]))


def test_the_refine_stage_restores_the_recall_the_pq_codes_lose() -> None:
    shards = {"00000": shard(0, 600), "00001": shard(1, 600)}
    refined, _ = update_index(None, "emb1", shards, REFINED)
    unrefined, _ = update_index(None, "emb1", shards, UNREFINED)
    assert refined.manifest.kind == unrefined.manifest.kind == "ivfpq"
    # 4-byte codes of 16-d vectors lose most of the order; 1-byte-a-dimension copies keep nearly all of it.
    assert recall_at_10(unrefined, shards) < 0.7 < 0.95 <= recall_at_10(refined, shards)


def test_a_refined_index_is_saved_in_parts_and_searched_from_mapped_files(tmp_path: Path) -> None:
    path = tmp_path / "attribution_index" / "index.safetensors"
    first = refresh_index(path, "emb1", {"00000": embedded(0, 600)}, REFINED).index
    stem = f"index-{first.manifest.version}"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["index.safetensors", f"{stem}.ids", f"{stem}.base", f"{stem}.refine"]
    )
    assert path.stat().st_size < 4096  # the manifest only: the vectors are in the parts
    mapped = load_index(path)
    assert mapped.manifest == first.manifest
    assert_same_answers(mapped, first)

    both = {"00000": embedded(0, 600), "00001": embedded(1, 600)}
    second = refresh_index(path, "emb1", both, REFINED)
    assert (second.action, second.complete) == ("added 1 shards", True)
    new_stem = f"index-{second.index.manifest.version}"
    assert sorted(p.name for p in path.parent.iterdir()) == sorted(
        ["index.safetensors", f"{new_stem}.ids", f"{new_stem}.base", f"{new_stem}.refine"]
    )
    reloaded = load_index(path)
    assert_same_answers(reloaded, second.index)
    assert recall_at_10(reloaded, both) >= 0.95

    (path.parent / f"{new_stem}.refine").write_bytes(b"cut short")
    with pytest.raises(ValueError, match=rf"not a valid attribution index .*{new_stem}.refine is 9 bytes, not \d+"):
        load_index(path)


def test_many_lists_are_found_through_an_hnsw_graph_that_is_saved_and_mapped_with_them(tmp_path: Path) -> None:
    graph = SearchSettings(**{**vars(REFINED), "nlist": 16, "nprobe": 8, "hnsw_lists": 8})
    shards = {"00000": embedded(0, 800), "00001": embedded(1, 800)}
    path = tmp_path / "attribution_index" / "index.safetensors"
    saved = refresh_index(path, "emb1", shards, graph).index
    ivf = faiss.extract_index_ivf(saved.faiss_index)
    assert (ivf.nlist, type(faiss.downcast_index(ivf.quantizer))) == (16, faiss.IndexHNSWFlat)
    flat, _ = update_index(None, "emb1", shards, SearchSettings(**{**vars(graph), "hnsw_lists": 16}))
    assert type(faiss.downcast_index(faiss.extract_index_ivf(flat.faiss_index).quantizer)) is faiss.IndexFlat
    # Half the lists probed: the graph finds lists as good as the flat scan's, so recall stays where it was.
    assert recall_at_10(saved, shards) >= recall_at_10(flat, shards) - 0.05
    assert recall_at_10(saved, shards) >= 0.9
    assert_same_answers(load_index(path), saved)


def test_an_interrupted_save_of_a_refined_index_keeps_the_old_parts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "index.safetensors"
    old = refresh_index(path, "emb1", {"00000": embedded(0, 600)}, REFINED).index
    new, _ = update_index(
        load_index(path, mapped=False), "emb1", {"00000": embedded(0, 600), "00001": embedded(1, 600)}, REFINED
    )

    def crash(tensors: dict, filename: str, metadata: dict) -> None:
        raise OSError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(attribution_index, "save_file", crash)
        with pytest.raises(OSError, match="disk full"):
            save_index(path, new)
    assert_same_answers(load_index(path), old)  # the new parts landed, but no manifest names them
    save_index(path, new)
    assert len(list(tmp_path.glob("index-*"))) == 3  # the next save removes what the killed one left
    assert_same_answers(load_index(path), new)
