"""gda.corpus.digits: scikit-learn's handwritten digit scans as img2dataset shards that gda ingests whole."""

import io
import json
import tarfile
from pathlib import Path

import duckdb
import numpy as np
from PIL import Image
from sklearn.datasets import load_digits

from gda.cli import main
from gda.corpus.digits import NAMES, build_digits_corpus
from gda.home import Home


def test_the_scans_become_captioned_shards_that_ingest_without_rejections(tmp_path: Path) -> None:
    shards = build_digits_corpus(tmp_path / "a", n_images=30, n_shards=2, resolution=16, seed=3)
    again = build_digits_corpus(tmp_path / "b", n_images=30, n_shards=2, resolution=16, seed=3)
    assert [p.name for p in shards] == ["00000.tar", "00001.tar"]
    assert all(one.read_bytes() == two.read_bytes() for one, two in zip(shards, again, strict=True))

    scans = load_digits().images
    members: dict[str, bytes] = {}
    for shard in shards:
        with tarfile.open(shard) as tar:
            members |= {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    keys = sorted(name[: -len(".png")] for name in members if name.endswith(".png"))
    assert len(keys) == 30
    for key in keys:
        meta = json.loads(members[f"{key}.json"])
        captions = members[f"{key}.txt"].decode().splitlines()
        assert len(captions) == 4 and all(NAMES[meta["digit"]] in c or str(meta["digit"]) in c for c in captions)
        image = np.asarray(Image.open(io.BytesIO(members[f"{key}.png"])).convert("L"), dtype=np.float64)
        assert image.shape == (16, 16)
        # Dark ink on light paper, and the scan it came from: the downscaled image tracks the 8x8 original.
        original = scans[int(meta["url"].rsplit("#", 1)[1])]
        small = np.asarray(Image.fromarray(image.astype(np.uint8)).resize((8, 8), Image.Resampling.BOX), float)
        assert np.corrcoef(small.ravel(), -original.ravel())[0, 1] > 0.9

    home = Home(tmp_path / "home")
    assert main(["ingest", "--home", str(home.root), "--shards", str(shards[0].parent), "--profile", "tiny"]) == 0
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM training_images").fetchone() == (30,)
        assert con.execute("SELECT count(*) FROM rejected_images").fetchone() == (0,)
