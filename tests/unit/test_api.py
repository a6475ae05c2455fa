"""The HTTP API (with the explorer page and its generated queries) and the `gda query` / `gda serve` commands
over a served home: the same answers both ways, each logged for audit, and every bad request refused with its
status code and a clear message."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import polars as pl
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from servicekit import QUERIES, ServedHome

from gda import cli
from gda.api import MAX_BATCH_ITEMS, create_app
from gda.service import AttributionEngine, GeneratedQuery, open_engine


@pytest.fixture(scope="module")
def engine(served_home: ServedHome) -> Iterator[AttributionEngine]:
    with open_engine(served_home.home, "tiny", interface="http") as engine:
        yield engine


@pytest.fixture(scope="module")
def client(engine: AttributionEngine) -> TestClient:
    return TestClient(create_app(engine))


def post(client: TestClient, image: bytes, prompt: str, top_k: object = None):
    form = {"prompt": prompt} | ({} if top_k is None else {"top_k": str(top_k)})
    return client.post("/attribute", files={"image": ("query.png", image, "image/png")}, data=form)


def audit_rows(served_home: ServedHome, sql: str, params: list) -> list[dict]:
    with duckdb.connect(str(served_home.home.duckdb_path), read_only=True) as con:
        return con.execute(sql, params).pl().to_dicts()


def test_cli_and_http_give_the_same_answer_and_both_are_logged(
    served_home: ServedHome,
    engine: AttributionEngine,
    client: TestClient,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    train_id = served_home.ids[4]
    image_path = tmp_path / "query.png"
    image_path.write_bytes(served_home.images[train_id])
    prompt = "a black square for the cli and http test"
    started = datetime.now(UTC).replace(tzinfo=None)

    argv = [
        "query",
        "--home",
        str(served_home.home.root),
        "--profile",
        "tiny",
        "--image",
        str(image_path),
        "--prompt",
        prompt,
        "--top-k",
        "6",
    ]
    assert cli.main([*argv, "--json"]) == 0
    from_cli = json.loads(capsys.readouterr().out)
    response = post(client, served_home.images[train_id], prompt, 6)
    assert response.status_code == 200, response.text
    from_http = response.json()

    assert [r["train_id"] for r in from_cli["results"]] == [r["train_id"] for r in from_http["results"]]
    assert [r["score"] for r in from_cli["results"]] == pytest.approx(
        [r["score"] for r in from_http["results"]], abs=1e-6
    )
    assert (
        from_cli["versions"]
        == from_http["versions"]
        == {
            "model": served_home.model_version,
            "embedder": served_home.embedder_version,
            "index": served_home.index_version,
        }
    )
    assert from_cli["image_sha256"] == from_http["image_sha256"]
    assert [r["rank"] for r in from_http["results"]] == [1, 2, 3, 4, 5, 6]

    engine.audit.move()  # what the server's mover thread does within a second
    rows = audit_rows(served_home, "SELECT * FROM attribution_log WHERE prompt = ? ORDER BY logged_at", [prompt])
    assert [r["interface"] for r in rows] == ["cli", "http"]
    for row, answer in zip(rows, (from_cli, from_http)):
        assert row["log_id"] == answer["log_id"]
        assert row["train_ids"] == [r["train_id"] for r in answer["results"]]
        assert row["scores"] == pytest.approx([r["score"] for r in answer["results"]])
        assert (row["model_version"], row["embedder_version"], row["index_version"]) == tuple(
            answer["versions"].values()
        )
        assert (row["image_sha256"], row["top_k"]) == (answer["image_sha256"], 6)

    # `gda audit` finds these answers by image, by prompt, by source over a period and by version.
    def audit(*question: str) -> list[dict]:
        assert cli.main(["audit", "--home", str(served_home.home.root), "--format", "json", *question]) == 0
        return json.loads(capsys.readouterr().out)

    by_image = audit("image", "--image", str(image_path))
    assert [(r["rank"], r["train_id"], r["caption"], r["url"]) for r in by_image if r["interface"] == "http"] == [
        (r["rank"], r["train_id"], r["caption"], r["url"]) for r in from_http["results"]
    ]
    assert audit("image", "--sha256", from_http["image_sha256"].upper()) == by_image
    by_prompt = audit("prompt", prompt)
    assert len(by_prompt) == 12 and {r["interface"] for r in by_prompt} == {"cli", "http"}
    sources = audit("sources", "--since", started.isoformat())
    assert sum(s["attributions"] for s in sources) >= 12
    top_url = from_http["results"][0]["url"]
    assert next(s for s in sources if s["url"] == top_url)["best_rank"] == 1
    assert audit("sources", "--since", started.isoformat(), "--until", started.isoformat()) == []
    served = audit("versions")
    assert any(s["index_version"] == served_home.index_version and s["answers"] >= 2 for s in served)
    assert cli.main(["audit", "--home", str(served_home.home.root), "versions"]) == 0
    assert served_home.index_version in capsys.readouterr().out

    assert cli.main(argv) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith(f"model {served_home.model_version}")
    assert table[1].split() == ["rank", "train", "id", "score", "caption", "url"]
    assert table[2].split()[:2] == ["1", str(from_cli["results"][0]["train_id"])]


def test_training_images_and_health(served_home: ServedHome, client: TestClient) -> None:
    train_id = served_home.ids[2]
    body = client.get(f"/training-images/{train_id}").json()
    assert base64.b64decode(body.pop("image_base64")) == served_home.images[train_id]
    assert (
        body["id"] == train_id
        and body["media_type"] == "image/png"
        and body["caption"] == served_home.captions[train_id]
    )
    raw = client.get(f"/training-images/{train_id}/image")
    assert raw.status_code == 200 and raw.content == served_home.images[train_id]
    assert raw.headers["content-type"] == "image/png"
    health = client.get("/health").json()
    assert health == {
        "status": "ok",
        "detail": None,
        "versions": {
            "model": served_home.model_version,
            "embedder": served_home.embedder_version,
            "index": served_home.index_version,
        },
        "indexed": 12,
        "max_top_k": 12,
    }
    assert client.get("/docs").status_code == 200
    assert "/attribute" in client.get("/openapi.json").json()["paths"]


def test_the_explorer_page_and_the_generated_test_queries(
    served_home: ServedHome, engine: AttributionEngine, client: TestClient, tmp_path: Path
) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for part in ('<form id="upload">', 'name="image"', 'name="prompt"', 'name="top_k"', '<form id="pick">'):
        assert part in page.text
    assert "/" not in client.get("/openapi.json").json()["paths"]  # a page for people, not part of the API

    assert client.get("/queries").json() == [
        {"query_id": query_id, "prompt": prompt, "image_url": f"/queries/{query_id}/image"}
        for query_id, prompt in served_home.query_prompts.items()
    ]
    for query_id, data in served_home.query_images.items():
        image = client.get(f"/queries/{query_id}/image")
        assert image.status_code == 200 and image.content == data and image.headers["content-type"] == "image/png"
    train_query = next(query_id for query_id, split, *_ in QUERIES if split == "train")
    for unknown in (train_query, 999):
        answer = client.get(f"/queries/{unknown}/image")
        assert (answer.status_code, answer.json()) == (404, {"detail": f"no generated test query with id {unknown}"})

    parts = (
        engine.embedder,
        engine.index,
        engine.image_encoder,
        engine.text_encoder,
        engine.metadata,
        engine.shards,
        "m",
    )
    with AttributionEngine(*parts) as without_home:
        assert TestClient(create_app(without_home)).get("/queries").json() == []
    gone = GeneratedQuery(7, "a lost query", tmp_path / "gone.png")
    with AttributionEngine(*parts, test_queries=[gone]) as lost:
        answer = TestClient(create_app(lost)).get("/queries/7/image")
        assert (
            answer.status_code == 503
            and "gone.png is missing: re-materialize generated_queries" in answer.json()["detail"]
        )


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (10_000, 10_000)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_bad_requests_get_4xx_with_a_clear_detail(
    served_home: ServedHome, engine: AttributionEngine, client: TestClient
) -> None:
    image = served_home.images[served_home.ids[0]]

    def refused(response, status: int, detail: str) -> None:
        assert response.status_code == status, response.text
        assert detail in json.dumps(response.json()["detail"])

    refused(post(client, b"GIF? no, text", "a red square"), 415, "not a decodable image")
    refused(post(client, bomb(), "a red square"), 413, "image too large to decode")
    refused(post(client, image, ""), 422, "prompt")
    refused(post(client, image, "   "), 422, "prompt is empty")
    refused(post(client, image, "a red square", 0), 422, "top_k must be an integer from 1 to 12, got 0")
    refused(post(client, image, "a red square", 13), 422, "top_k must be an integer from 1 to 12, got 13")
    refused(post(client, image, "a red square", "many"), 422, "top_k")
    refused(client.get("/training-images/12345"), 404, "no training image with id 12345")
    refused(client.get("/training-images/12345/image"), 404, "no training image with id 12345")

    small = TestClient(create_app(engine, max_upload_bytes=2000))
    large = Image.effect_noise((64, 64), 50).convert("RGB")
    buffer = io.BytesIO()
    large.save(buffer, format="PNG")
    assert len(buffer.getvalue()) > 2000
    refused(post(small, buffer.getvalue(), "noise"), 413, "over the upload limit of 2000 bytes")
    boundary = "gdaboundary"
    chunks = [f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="q.png"\r\n\r\n'.encode()]
    chunks += [buffer.getvalue()[i : i + 500] for i in range(0, len(buffer.getvalue()), 500)]
    chunked = small.post(
        "/attribute", content=iter(chunks), headers={"content-type": f"multipart/form-data; boundary={boundary}"}
    )
    refused(chunked, 413, "over the upload limit of 2000 bytes")  # no Content-Length: stopped while reading
    assert post(small, image, "a red square", 2).status_code == 200

    stale = replace(engine.index, manifest=replace(engine.index.manifest, embedder_version="0123456789ab"))
    with AttributionEngine(
        engine.embedder, stale, engine.image_encoder, engine.text_encoder, engine.metadata, engine.shards, "m"
    ) as refusing:
        stale_client = TestClient(create_app(refusing))
        refused(post(stale_client, image, "a red square"), 409, "re-materialize attribution_index")
        assert stale_client.get("/health").json()["status"] == "refusing"


def test_batch_answers_each_item_or_gives_it_its_own_error(
    served_home: ServedHome, engine: AttributionEngine, client: TestClient
) -> None:
    good = [served_home.ids[1], served_home.ids[7]]
    images = [served_home.images[good[0]], b"not an image", served_home.images[good[1]], served_home.images[good[0]]]
    prompts = [served_home.captions[good[0]], "a square", served_home.captions[good[1]], " "]
    response = client.post(
        "/attribute/batch",
        files=[("images", (f"{i}.png", image, "image/png")) for i, image in enumerate(images)],
        data={"prompts": prompts, "top_k": "3"},
    )
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert [item["index"] for item in items] == [0, 1, 2, 3]
    assert [item["error"]["status"] if item["error"] else None for item in items] == [None, 415, None, 422]
    assert "not a decodable image" in items[1]["error"]["detail"] and items[1]["answer"] is None
    for item, train_id in ((items[0], good[0]), (items[2], good[1])):
        alone = post(client, served_home.images[train_id], served_home.captions[train_id], 3).json()
        assert [r["train_id"] for r in item["answer"]["results"]] == [r["train_id"] for r in alone["results"]]
        assert item["answer"]["batch_size"] == 2
    engine.audit.move()
    log_ids = [items[0]["answer"]["log_id"], items[2]["answer"]["log_id"]]
    stored = audit_rows(served_home, "SELECT log_id FROM attribution_log WHERE log_id IN (?, ?)", log_ids)
    assert sorted(row["log_id"] for row in stored) == sorted(log_ids)

    mismatched = client.post(
        "/attribute/batch", files=[("images", ("a.png", images[0], "image/png"))], data={"prompts": ["a", "b"]}
    )
    assert mismatched.status_code == 422 and "one prompt per image" in mismatched.json()["detail"]
    too_many = client.post(
        "/attribute/batch",
        files=[("images", (f"{i}.png", images[0], "image/png")) for i in range(MAX_BATCH_ITEMS + 1)],
        data={"prompts": ["a"] * (MAX_BATCH_ITEMS + 1)},
    )
    assert too_many.status_code == 413 and f"at most {MAX_BATCH_ITEMS}" in too_many.json()["detail"]


def test_attribute_backfills_a_folder_into_parquet_with_a_row_per_item(
    served_home: ServedHome, engine: AttributionEngine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "generated"
    (folder / "sub").mkdir(parents=True)
    ids = served_home.ids[:3]
    (folder / "a.png").write_bytes(served_home.images[ids[0]])
    (folder / "sub" / "b.png").write_bytes(served_home.images[ids[1]])
    (folder / "broken.png").write_bytes(b"truncated")
    names = ["a.png", "missing.png", "sub/b.png", "broken.png", "../outside.png"]
    prompts = [served_home.captions[ids[0]], "x", served_home.captions[ids[1]], "y", "z"]
    (tmp_path / "outside.png").write_bytes(served_home.images[ids[2]])
    pl.DataFrame({"image": names, "prompt": prompts}).write_csv(tmp_path / "prompts.csv")
    out = tmp_path / "answers.parquet"
    argv = ["attribute", "--home", str(served_home.home.root), "--profile", "tiny", "--images", str(folder)]
    argv += ["--prompts", str(tmp_path / "prompts.csv"), "--out", str(out), "--top-k", "4"]
    assert cli.main(argv) == 0
    assert "2 of 5 images attributed, 3 error rows" in capsys.readouterr().out

    rows = pl.read_parquet(out).to_dicts()
    assert [(r["image"], r["prompt"]) for r in rows] == list(zip(names, prompts, strict=True))
    assert [r["error"] is None for r in rows] == [True, False, True, False, False]
    assert "no such file" in rows[1]["error"] and "not a decodable image" in rows[3]["error"]
    assert "outside" in rows[4]["error"] and rows[4]["train_ids"] is None
    for row, train_id in ((rows[0], ids[0]), (rows[2], ids[1])):
        alone = engine.attribute(served_home.images[train_id], served_home.captions[train_id], 4)
        assert row["train_ids"] == [m.train_id for m in alone.results]
        assert row["captions"] == [m.caption for m in alone.results]
    stored = audit_rows(
        served_home,
        "SELECT prompt FROM attribution_log WHERE log_id IN (?, ?) AND interface = 'cli'",
        [rows[0]["log_id"], rows[2]["log_id"]],
    )
    assert sorted(r["prompt"] for r in stored) == sorted([prompts[0], prompts[2]])


def test_the_app_logs_as_http_only(engine: AttributionEngine, served_home: ServedHome) -> None:
    with (
        open_engine(served_home.home, "tiny", interface="cli") as cli_engine,
        pytest.raises(ValueError, match="interface 'http'"),
    ):
        create_app(cli_engine)


def test_cli_errors_are_one_line(served_home: ServedHome, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    image_path = tmp_path / "query.png"
    image_path.write_bytes(served_home.images[served_home.ids[0]])
    common = ["--profile", "tiny", "--image", str(image_path), "--prompt", "a red square"]
    cases = [
        (["query", "--home", str(tmp_path / "nothing"), *common], "materialize attribution_embedder first"),
        (
            ["query", "--home", str(served_home.home.root), *common, "--top-k", "0"],
            "top_k must be an integer from 1 to 12",
        ),
        (
            [
                "query",
                "--home",
                str(served_home.home.root),
                *common[:2],
                "--image",
                str(tmp_path / "missing.png"),
                "--prompt",
                "x",
            ],
            "missing.png",
        ),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2
        last = capsys.readouterr().err.splitlines()[-1]  # after any progress bars of the encoders' loading
        assert last.startswith("gda: ") and message in last


def test_serve_runs_the_app_on_loopback(served_home: ServedHome, monkeypatch: pytest.MonkeyPatch) -> None:
    import uvicorn

    seen = {}

    def fake_run(app, host: str, port: int) -> None:
        seen.update(host=host, port=port, health=TestClient(app).get("/health").json()["status"])
        small = TestClient(app)
        seen["limit"] = small.post(
            "/attribute", files={"image": ("q.png", b"x" * 3 * 2**20, "image/png")}, data={"prompt": "p"}
        ).status_code

    monkeypatch.setattr(uvicorn, "run", fake_run)
    monkeypatch.delenv("GDA_API_TOKEN", raising=False)  # with a token: tests/reliability/test_api_hardening.py
    assert cli.main(["serve", "--home", str(served_home.home.root), "--profile", "tiny", "--max-upload-mb", "2"]) == 0
    assert seen == {"host": "127.0.0.1", "port": 8000, "health": "ok", "limit": 413}
