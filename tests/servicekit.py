"""Build a small served home without Dagster for the query service tests: two real shards ingested into
DuckDB, features from real encoders, a randomly initialised small embedder, the attribution index over its
training embeddings, a model card, and a few generated queries (stand-ins, not sampled from a model)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import duckdb
import numpy as np
from shardkit import png, write_tar

from gda import tables
from gda.arrays import IdArray
from gda.attribution_index import INDEX_FILE, save_index, update_index
from gda.corpus.ingest import ingest_shard
from gda.corpus.shards import load_images
from gda.embedder import Embedder, EmbedderConfig, save_embedder
from gda.encoders import ImageEncoder, TextEncoder
from gda.home import Home
from gda.index import SearchSettings
from gda.model_card import ModelCard, write_card
from gda.service import EMBEDDER_FOLDER, INDEX_FOLDER

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 180, 60),
    "blue": (40, 60, 220),
    "yellow": (240, 220, 40),
    "black": (10, 10, 10),
    "white": (245, 245, 245),
}
MODEL_VERSION = "model0test01"
# (query id, split, prompt, colour): squares like the corpus' standing in for the diffusion model's samples;
# the service lists the test split's and not the others'.
QUERIES = [
    (101, "test", "a red square icon", "red"),
    (102, "test", "a blue square icon", "blue"),
    (103, "train", "a green square icon", "green"),
]


@dataclass(frozen=True)
class ServedHome:
    home: Home
    model_version: str
    embedder_version: str
    index_version: str
    ids: list[int]  # every training image, id order
    captions: dict[int, str]
    images: dict[int, bytes]  # PNG bytes as stored in the shards
    query_prompts: dict[int, str]  # the generated test queries, query order
    query_images: dict[int, bytes]  # their PNGs


def _members(shard: int) -> list[tuple[str, bytes]]:
    """Six samples per shard, each a square of its own colour and size, with a caption naming both."""
    members = []
    for position, (name, colour) in enumerate(COLOURS.items()):
        key = f"{shard:05d}{position:04d}"
        side = 16 + 4 * position + shard
        meta = {"url": f"https://example.test/{shard}/{name}.png", "license": ["CC0-1.0", "CC-BY-4.0"][position % 2]}
        members += [
            (f"{key}.png", png((side, side), colour)),
            (f"{key}.txt", f"a {name} square, {side} pixels wide, from shard {shard}".encode()),
            (f"{key}.json", json.dumps(meta).encode()),
        ]
    return members


def _add_queries(con: duckdb.DuckDBPyConnection, home: Home) -> tuple[dict[int, str], dict[int, bytes]]:
    """QUERIES in query_prompts and generated_queries, with their PNGs where the asset writes them; returns
    the test split's prompts and PNGs."""
    prompts: dict[int, str] = {}
    images: dict[int, bytes] = {}
    for query_id, split, prompt, colour in QUERIES:
        batch = f"{split}-000"
        data = png((24, 24), COLOURS[colour])
        path = home.artifacts / "generated_queries" / batch / f"{query_id}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        con.execute("INSERT INTO query_prompts VALUES (?, ?, ?, ?, 0, NULL)", [query_id, split, batch, prompt])
        con.execute(
            "INSERT INTO generated_queries VALUES (?, ?, ?, 0, 10, 7.5, 0.0, ?, ?, ?, NULL, NULL, NULL, NULL)",
            [query_id, batch, prompt, MODEL_VERSION, str(path), hashlib.sha256(data).hexdigest()],
        )
        if split == "test":
            prompts[query_id], images[query_id] = prompt, data
    return prompts, images


def build_served_home(root: Path, image_encoder: ImageEncoder, text_encoder: TextEncoder) -> ServedHome:
    """Everything `gda.service.open_engine` reads, under `root`, as the assets would have written it."""
    home = Home(root)
    embedder = Embedder(
        EmbedderConfig(input_dim=image_encoder.dim + text_encoder.dim, image_dim=image_encoder.dim, widths=(32, 16))
    )
    shards: dict[str, IdArray] = {}
    captions: dict[int, str] = {}
    images: dict[int, bytes] = {}
    home.artifacts.mkdir(parents=True)
    with duckdb.connect(str(home.duckdb_path)) as con:
        tables.create_tables(con)
        for number in (0, 1):
            members = _members(number)
            path = write_tar(home.shards / f"{number:05d}.tar", members)
            accepted = ingest_shard(path).accepted
            con.register("accepted", accepted)
            con.execute("INSERT INTO training_images SELECT * FROM accepted")
            con.unregister("accepted")
            ids = accepted["id"].to_list()
            pngs = [data for name, data in members if name.endswith(".png")]
            captions |= dict(zip(ids, accepted["caption"].to_list()))
            images |= dict(zip(ids, pngs))
            features = np.concatenate(
                [
                    image_encoder.encode(load_images(path, accepted["key"].to_list())),
                    text_encoder.encode(accepted["caption"].to_list()),
                ],
                axis=1,
            )
            shards[f"{number:05d}"] = IdArray(np.asarray(ids, dtype=np.int64), embedder.embed_training(features))
        query_prompts, query_images = _add_queries(con, home)
    version = save_embedder(home.artifacts / EMBEDDER_FOLDER, embedder)
    index, _ = update_index(None, version, shards, SearchSettings())
    save_index(home.artifacts / INDEX_FOLDER / INDEX_FILE, index)
    write_card(home.artifacts / "diffusion_model", ModelCard(kind="scratch", weights=".", version=MODEL_VERSION))
    return ServedHome(
        home,
        MODEL_VERSION,
        version,
        index.manifest.version,
        sorted(captions),
        captions,
        images,
        query_prompts,
        query_images,
    )
