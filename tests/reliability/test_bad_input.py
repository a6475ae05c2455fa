"""Bad input ends in a rejected_images row with its reason, a warning that blocks nothing, or one clear line:
image modes, huge captions, duplicates across shards, a parquet that disagrees with its tar, config errors,
and model files that are pickled or reach outside their folder."""

from __future__ import annotations

import ast
import io
import json
import shutil
import tarfile
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import duckdb
import numpy as np
import polars as pl
import pytest
from PIL import Image
from pydantic import ValidationError
from servicekit import ServedHome
from shardkit import good, png, write_tar

from gda import features, tables
from gda.cli import main
from gda.corpus.ingest import REASONS, IngestLimits, ingest_shard
from gda.corpus.shards import ShardNameError, ShardSample, load_images, shard_file, write_shard
from gda.encoders import EncoderError, EncoderSpec, ImageEncoder, TextEncoder, load_image_encoder
from gda.home import Home
from gda.images import to_rgb
from gda.model_card import ModelCard, weights_dir, write_card
from gda.paths import ModelPathError, model_folder
from gda.profiles import PROFILES, UnknownProfileError

REPO = Path(__file__).resolve().parents[2]
WHITE = (255, 255, 255)


def encoded(image: Image.Image, image_format: str, **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **params)
    return buffer.getvalue()


def palette_with_transparent_red(size: int) -> Image.Image:
    """Palette image whose index 0 is red and transparent, drawn with a green square of index 1."""
    image = Image.new("P", (size, size), 0)
    image.putpalette([255, 0, 0, 0, 160, 0] + [0] * 762)
    image.paste(1, (size // 4, size // 4, 3 * size // 4, 3 * size // 4))
    return image


# Each mode as img2dataset shards hold it: (member extension, bytes, the mode Pillow decodes it to).
MODES: dict[str, tuple[str, bytes, str]] = {
    "cmyk": ("jpg", encoded(Image.new("CMYK", (24, 24), (200, 0, 0, 0)), "JPEG"), "CMYK"),
    "grey16": ("png", encoded(Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16)), "PNG"), "I;16"),
    "palette": ("png", encoded(palette_with_transparent_red(24), "PNG", transparency=0), "P"),
    "rgba": ("png", encoded(Image.new("RGBA", (24, 24), (255, 0, 0, 128)), "PNG"), "RGBA"),
    "grey_alpha": ("png", encoded(Image.new("LA", (24, 24), (90, 0)), "PNG"), "LA"),
    "grey": ("png", encoded(Image.new("L", (24, 24), 90), "PNG"), "L"),
}


def rgb_of(data: bytes) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(to_rgb(Image.open(io.BytesIO(data))))[0, 0])


# -- bad samples in a shard ---------------------------------------------------------------------------------


def bad_shard(tmp_path: Path) -> Path:
    truncated = png((64, 64))
    huge = io.BytesIO()
    Image.new("1", (20000, 20000)).save(huge, format="PNG")  # a bomb: tiny file, 400 M declared pixels
    members = [
        *good("a"),
        ("b.png", b"not an image at all"),
        ("b.txt", b"caption"),
        ("c.png", truncated[: len(truncated) // 2]),
        ("c.txt", b"caption"),
        ("d.png", png()),  # no caption
        ("e.png", png()),
        ("e.txt", b"\xff\xfe not utf-8"),
        ("f.png", png((2, 2))),
        ("f.txt", b"too small"),
        ("g.png", huge.getvalue()),
        ("g.txt", b"too big"),
        ("h.png", b""),
        ("h.txt", b"zero bytes"),
        ("i.txt", b"caption without image"),
        ("j.png", png()),
        ("j.txt", b"x" * 5000),
        ("k.png", png()),
        ("k.txt", b"ok"),
        ("k.json", b"[1, 2]"),
        ("l.png", png()),
        ("l.txt", b"   \n  "),
        *good("a", "the same key again"),
        *good("m"),
    ]
    return write_tar(tmp_path / "00007.tar", members)


def test_every_bad_kind_is_rejected_with_its_reason(tmp_path: Path) -> None:
    result = ingest_shard(bad_shard(tmp_path), IngestLimits(max_caption_chars=4096))
    reasons = dict(zip(result.rejected["key"].to_list(), result.rejected["reason"].to_list()))
    assert reasons == {
        "b": "undecodable_image",
        "c": "truncated_image",
        "d": "missing_caption",
        "e": "bad_caption_encoding",
        "f": "absurd_size",
        "g": "absurd_size",
        "h": "empty_image",
        "i": "missing_image",
        "j": "caption_too_long",
        "k": "bad_metadata",
        "l": "missing_caption",
    } | {"a": "duplicate_key"}
    # The good samples survive their bad neighbours, with their metadata split into columns.
    accepted = result.accepted
    assert accepted["key"].to_list() == ["a", "m"]
    assert accepted["url"].to_list() == ["https://example.test/a.png", "https://example.test/m.png"]
    assert '"photographer": "tests"' in accepted["extra"][0]
    assert set(result.rejected["reason"]) <= set(REASONS)
    assert result.accepted.schema == tables.polars_schema("training_images")
    assert result.rejected.schema == tables.polars_schema("rejected_images")


def test_truncated_tar_keeps_samples_before_the_damage(tmp_path: Path) -> None:
    full = write_tar(tmp_path / "full.tar", good("a") + good("b") + good("c"))
    with tarfile.open(full) as tar:
        inside_c = next(m.offset_data for m in tar.getmembers() if m.name == "c.png") + 10
    cut = tmp_path / "00001.tar"
    cut.write_bytes(full.read_bytes()[:inside_c])
    result = ingest_shard(cut)
    assert result.read_error is not None
    assert result.accepted["key"].to_list() == ["a", "b"]
    assert result.rejected["reason"].to_list() == ["truncated_tar"]


# -- image modes ---------------------------------------------------------------------------------------------


def test_every_image_mode_is_accepted_and_gives_finite_features(
    tmp_path: Path, tiny_encoders: tuple[ImageEncoder, TextEncoder]
) -> None:
    members = good("plain")
    for key, (ext, data, _) in MODES.items():
        members += [(f"{key}.{ext}", data), (f"{key}.txt", f"an image of mode {key}".encode())]
    shard = write_tar(tmp_path / "00003.tar", members)
    result = ingest_shard(shard)
    assert result.rejected.height == 0
    assert result.accepted["key"].to_list() == ["plain", *MODES]
    assert dict(zip(result.accepted["key"], result.accepted["image_format"])) == {
        "plain": "PNG",
        "cmyk": "JPEG",
        "grey16": "PNG",
        "palette": "PNG",
        "rgba": "PNG",
        "grey_alpha": "PNG",
        "grey": "PNG",
    }
    assert [Image.open(io.BytesIO(data)).mode for _, data, _ in MODES.values()] == [
        mode for _, _, mode in MODES.values()
    ]

    images = load_images(shard, result.accepted["key"].to_list())
    assert {image.mode for image in images} == {"RGB"}
    encoder = tiny_encoders[0]
    array = features.image_features(encoder, result.accepted["id"].to_list(), images)
    assert array.values.shape == (len(MODES) + 1, encoder.dim)
    assert np.isfinite(array.values).all()
    assert array.ids.tolist() == result.accepted["id"].to_list()


def test_alpha_is_composited_on_white_and_16_bit_is_scaled() -> None:
    # Half-transparent red over white; the palette's transparent red index is white, its green square is not.
    assert rgb_of(MODES["rgba"][1]) == (255, 127, 127)
    palette = np.asarray(to_rgb(Image.open(io.BytesIO(MODES["palette"][1]))))
    assert tuple(palette[0, 0]) == WHITE and tuple(palette[12, 12]) == (0, 160, 0)
    assert rgb_of(MODES["grey_alpha"][1]) == WHITE
    # 40000 of 65535 is 155 of 255, where a plain convert("RGB") clips it to white.
    assert rgb_of(MODES["grey16"][1]) == (155, 155, 155)
    assert rgb_of(MODES["grey"][1]) == (90, 90, 90)
    cyan = rgb_of(MODES["cmyk"][1])
    assert cyan[0] < 80 and min(cyan[1:]) > 200


def test_training_and_query_images_get_the_same_features_whatever_their_mode(
    tmp_path: Path, tiny_encoders: tuple[ImageEncoder, TextEncoder]
) -> None:
    """A fully transparent image looks white, so it encodes as white: both when it is read from a shard for
    training and when a query hands the encoder the decoded image itself."""
    encoder = tiny_encoders[0]
    transparent_red = encoded(Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG")
    shard = write_tar(tmp_path / "00004.tar", [("t.png", transparent_red), ("t.txt", b"transparent")])
    white = encoder.encode([Image.new("RGB", (32, 32), WHITE)])
    red = encoder.encode([Image.new("RGB", (32, 32), (255, 0, 0))])
    from_shard = encoder.encode(load_images(shard, ["t"]))
    as_query = encoder.encode([Image.open(io.BytesIO(transparent_red))])
    np.testing.assert_array_equal(from_shard, white)
    np.testing.assert_array_equal(as_query, white)
    assert not np.allclose(white, red)
    grey16 = Image.fromarray(np.full((32, 32), 128 * 257, dtype=np.uint16))
    np.testing.assert_array_equal(encoder.encode([grey16]), encoder.encode([Image.new("L", (32, 32), 128)]))


# -- captions, metadata and shard keys ---------------------------------------------------------------------


def test_a_one_megabyte_caption_is_rejected_and_its_neighbours_kept(tmp_path: Path) -> None:
    caption = ("a very long caption " * 60_000)[: 1 << 20]
    shard = write_tar(
        tmp_path / "00005.tar", good("before") + [("huge.png", png()), ("huge.txt", caption.encode())] + good("after")
    )
    result = ingest_shard(shard)
    assert result.accepted["key"].to_list() == ["before", "after"]
    assert result.rejected.select("key", "reason", "detail").rows() == [
        ("huge", "caption_too_long", f"{1 << 20} characters, limit 4096")
    ]


def test_json_nested_past_the_recursion_limit_is_bad_metadata(tmp_path: Path) -> None:
    deep = [("deep.png", png()), ("deep.txt", b"nested"), ("deep.json", b"[" * 100_000 + b"]" * 100_000)]
    result = ingest_shard(write_tar(tmp_path / "00006.tar", good("ok") + deep))
    assert result.accepted["key"].to_list() == ["ok"]
    assert result.rejected.select("key", "reason").rows() == [("deep", "bad_metadata")]


def test_a_file_that_is_no_tar_ingests_nothing_and_says_why(tmp_path: Path) -> None:
    path = tmp_path / "00008.tar"
    path.write_bytes(b"this is not a tar archive at all" * 40)
    result = ingest_shard(path)
    assert result.accepted.height == 0 and result.rejected.height == 0
    assert result.read_error is not None and "\n" not in result.read_error


def test_a_missing_shard_file_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"shard .*00009.tar does not exist") as raised:
        ingest_shard(tmp_path / "00009.tar")
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize("key", ["../00001", "../../etc/passwd", "00001/..", "", "²"])
def test_a_shard_key_that_is_not_digits_names_no_file(tmp_path: Path, key: str) -> None:
    with pytest.raises(ShardNameError, match="not the digits of a NNNNN.tar"):
        shard_file(tmp_path, key)
    assert shard_file(tmp_path, "00012") == tmp_path / "00012.tar"


# -- duplicates across shards and the parquet beside the tar ------------------------------------------------


def test_the_same_key_and_image_in_two_shards_are_two_training_images(tmp_path: Path) -> None:
    first = ingest_shard(write_tar(tmp_path / "00001.tar", good("a") + good("b")))
    second = ingest_shard(write_tar(tmp_path / "00002.tar", good("a") + good("c")))
    assert first.rejected.height == second.rejected.height == 0
    both = pl.concat([first.accepted, second.accepted])
    assert both["key"].to_list() == ["a", "b", "a", "c"]
    assert both["id"].n_unique() == 4
    # good() draws the same image every time: one picture, four rows, each with its own id.
    assert both["sha256"].n_unique() == 1


def samples(keys: list[str]) -> list[ShardSample]:
    return [
        ShardSample(k, png(colour=(10 * i, 20, 30)), "png", [f"caption of {k}", f"second line of {k}"])
        for i, k in enumerate(keys)
    ]


def test_a_parquet_that_disagrees_with_its_tar_is_reported_and_the_tar_ingested(tmp_path: Path) -> None:
    tar = write_shard(tmp_path, 1, samples(["k0", "k1", "k2", "k3"]))
    listing = pl.read_parquet(tmp_path / "00001.parquet")
    failed = {"key": "k9", "caption": "never downloaded", "url": None, "license": None, "width": None, "height": None}
    failed["status"] = "failed_to_download"
    stray = {**failed, "key": "k8", "caption": "listed but not in the tar", "status": "success"}
    keyless = {**stray, "key": None}
    listing = pl.concat([listing, pl.DataFrame([failed, stray, keyless], schema=listing.schema)])
    listing = listing.filter(pl.col("key").ne_missing("k3")).with_columns(
        pl.when(pl.col("key") == "k1").then(pl.lit("another caption")).otherwise(pl.col("caption")).alias("caption")
    )
    listing.write_parquet(tmp_path / "00001.parquet")
    assert pl.read_parquet(tmp_path / "00001.parquet")["key"].null_count() == 1

    result = ingest_shard(tar)
    assert result.accepted["key"].to_list() == ["k0", "k1", "k2", "k3"]  # the tar is authoritative
    assert result.accepted["caption"].to_list()[1] == "caption of k1"
    parquet = result.parquet
    assert (parquet.only_in_tar, parquet.only_in_parquet, parquet.caption_differs) == (("k3",), ("k8",), ("k1",))
    assert not parquet.agrees and parquet.disagreements == 3
    assert parquet.summary() == (
        "00001.parquet disagrees with the tar, which was ingested as is: keys only in the tar: 1 (first: k3); "
        "keys only in the parquet: 1 (first: k8); captions differ: 1 (first: k1)"
    )


def test_a_shard_without_parquet_or_with_a_broken_one_is_still_ingested(tmp_path: Path) -> None:
    tar = write_shard(tmp_path, 2, samples(["a", "b"]))
    assert ingest_shard(tar).parquet.agrees
    (tmp_path / "00002.parquet").write_bytes(b"not parquet")
    broken = ingest_shard(tar)
    assert broken.accepted.height == 2 and not broken.parquet.agrees
    assert broken.parquet.summary().startswith("00002.parquet could not be compared (ComputeError: ")
    pl.DataFrame({"caption": ["a caption"]}).write_parquet(tmp_path / "00002.parquet")
    assert ingest_shard(tar).parquet.summary() == (
        "00002.parquet could not be compared (it has no key column); the tar was ingested as is"
    )
    (tmp_path / "00002.parquet").unlink()
    alone = ingest_shard(tar)
    assert alone.accepted.height == 2 and alone.parquet.agrees
    assert (
        alone.parquet.summary() == "no parquet beside the tar: nothing to compare (the tar alone is a complete shard)"
    )


@pytest.fixture(scope="module")
def copied_shard_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[Home, dict[str, dg.ExecuteInProcessResult]]]:
    """Shard 00001 (its parquet missing one key) ingested through Dagster, then 00002, a copy of its tar
    under the next number without a parquet: the accident the duplicate warning is for."""
    from gda_assets.corpus import build_training_images
    from gda_assets.factory import build_resources
    from gda_assets.partitions import shard_partitions

    root = tmp_path_factory.mktemp("copied")
    home, shards = Home(root / "home"), root / "shards"
    write_shard(shards, 1, samples(["k0", "k1", "k2"]))
    pl.read_parquet(shards / "00001.parquet").filter(pl.col("key") != "k2").write_parquet(shards / "00001.parquet")
    shutil.copyfile(shards / "00001.tar", shards / "00002.tar")
    resources = build_resources(home, "tiny", shards)
    home.root.mkdir(parents=True)
    runs = {}
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(shard_partitions.name, ["00001", "00002"])
        for shard in ("00001", "00002"):
            runs[shard] = dg.materialize(
                [build_training_images(embedded=False)],
                resources={name: resources[name] for name in ("corpus", "warehouse", "warehouse_io")},
                partition_key=shard,
                instance=instance,
                raise_on_error=False,
            )
        yield home, runs


def checks(run: dg.ExecuteInProcessResult) -> dict[str, dg.AssetCheckEvaluation]:
    return {e.check_name: e for e in run.get_asset_check_evaluations() if e.asset_key == dg.AssetKey("training_images")}


def test_a_copied_shard_is_stored_under_new_ids_and_warned_about(copied_shard_runs) -> None:
    home, runs = copied_shard_runs
    assert all(run.success for run in runs.values())
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        rows = con.execute("SELECT shard, key, id FROM training_images ORDER BY id").fetchall()
    assert [(shard, key) for shard, key, _ in rows] == [(s, k) for s in ("00001", "00002") for k in ("k0", "k1", "k2")]
    assert len({id_ for _, _, id_ in rows}) == 6
    first, second = checks(runs["00001"]), checks(runs["00002"])
    assert first["no_duplicate_images"].passed and first["unique_ids"].passed
    duplicate = second["no_duplicate_images"]
    assert not duplicate.passed and duplicate.severity == dg.AssetCheckSeverity.WARN
    assert duplicate.metadata["violations"].value == 3
    assert second["unique_ids"].passed and second["conforms_to_schema"].passed


def test_the_parquet_disagreement_is_a_warning_and_in_the_metadata(copied_shard_runs) -> None:
    _, runs = copied_shard_runs
    disagreeing, without = checks(runs["00001"])["agrees_with_parquet"], checks(runs["00002"])["agrees_with_parquet"]
    assert not disagreeing.passed and disagreeing.severity == dg.AssetCheckSeverity.WARN
    assert disagreeing.metadata["keys_only_in_tar"].value == 1
    assert "keys only in the tar: 1 (first: k2)" in disagreeing.description
    assert without.passed and without.description.startswith("no parquet beside the tar")
    [materialization] = [
        m
        for m in runs["00001"].asset_materializations_for_node("training_images")
        if m.asset_key == dg.AssetKey("training_images")
    ]
    assert materialization.metadata["parquet_disagreements"].value == 1
    assert materialization.metadata["dagster/row_count"].value == 3


# -- configuration errors -------------------------------------------------------------------------------------


def one_line_failure(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """Run the CLI, which must exit 2 with one ``gda:`` line, the last on stderr (model loading may draw
    progress bars before it) and no traceback; returns that line."""
    assert main(argv) == 2
    error = capsys.readouterr().err
    said = [line for line in error.splitlines() if line.startswith("gda: ")]
    assert said == error.splitlines()[-1:] and "Traceback" not in error, error
    return said[0]


def test_an_unknown_profile_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from gda_assets.factory import build_defs

    monkeypatch.setenv("GDA_PROFILE", "nope")
    image = tmp_path / "query.png"
    image.write_bytes(png())
    line = one_line_failure(
        capsys, ["query", "--home", str(tmp_path), "--image", str(image), "--prompt", "a red square"]
    )
    assert line == "gda: unknown profile 'nope'; choose one of: tiny, demo, sd, demo-large"
    with pytest.raises(UnknownProfileError, match="unknown profile 'nope'"):
        build_defs(home=Home(tmp_path))


@pytest.fixture()
def served_copy(served_home: ServedHome, tmp_path: Path) -> tuple[Home, Path]:
    """A copy of the served home (so nothing here changes the shared one) and a query image."""
    home = Home(shutil.copytree(served_home.home.root, tmp_path / "home"))
    image = tmp_path / "query.png"
    image.write_bytes(served_home.query_images[min(served_home.query_images)])
    return home, image


def query(home: Home, image: Path, *extra: str) -> list[str]:
    return [
        "query",
        "--home",
        str(home.root),
        "--profile",
        "tiny",
        "--image",
        str(image),
        "--prompt",
        "a red square",
        *extra,
    ]


def test_an_embedder_for_other_encoders_is_one_line(served_copy, capsys: pytest.CaptureFixture[str]) -> None:
    from gda.embedder import Embedder, EmbedderConfig, save_embedder
    from gda.service import EMBEDDER_FOLDER

    home, image = served_copy
    shutil.rmtree(home.artifacts / EMBEDDER_FOLDER)
    save_embedder(home.artifacts / EMBEDDER_FOLDER, Embedder(EmbedderConfig(input_dim=100, image_dim=60, widths=(8,))))
    line = one_line_failure(capsys, query(home, image))
    assert line.startswith("gda: the embedder takes 60 image + 40 text features, but the encoders give 1280")


def test_a_query_top_k_below_one_is_one_line(served_copy, capsys: pytest.CaptureFixture[str]) -> None:
    home, image = served_copy
    for top_k in ("0", "-3"):
        line = one_line_failure(capsys, query(home, image, "--top-k", top_k))
        assert line == f"gda: top_k must be an integer from 1 to 12, got {top_k}"


def test_a_missing_encoder_folder_is_one_line(
    served_copy, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    home, image = served_copy
    nowhere = home.root / "no-such-model"
    monkeypatch.setitem(
        PROFILES["tiny"],
        "encoders",
        {**PROFILES["tiny"]["encoders"], "image_backend": "hf", "image_model": str(nowhere)},
    )
    line = one_line_failure(capsys, query(home, image))
    assert line.startswith(f"gda: image model '{nowhere}' not found: not a local folder and not in the HF cache")


def profile_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resource: str, values: dict[str, object]
) -> ValidationError:
    """The error of building the definitions with ``values`` changed in the tiny profile's ``resource``."""
    from gda_assets.factory import build_defs

    monkeypatch.setitem(PROFILES["tiny"], resource, {**PROFILES["tiny"].get(resource, {}), **values})
    with pytest.raises(ValidationError) as raised:
        build_defs(home=Home(tmp_path), profile="tiny")
    return raised.value


@pytest.mark.parametrize(
    ("resource", "field", "value", "location"),
    [
        ("teacher", "k_candidates", 0, ("k_candidates",)),
        ("teacher", "k_candidates", -5, ("k_candidates",)),
        ("student", "top_k", 0, ("top_k",)),
        ("evaluation", "counterfactual_k", [100, 0], ("counterfactual_k", 1)),
    ],
)
def test_a_k_below_one_names_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, resource: str, field: str, value: object, location: tuple
) -> None:
    [problem] = profile_error(monkeypatch, tmp_path, resource, {field: value}).errors()
    assert problem["loc"] == location
    assert problem["msg"] == "Input should be greater than or equal to 1"


def test_a_k_below_one_is_one_line_through_the_cli(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(PROFILES["tiny"], "teacher", {**PROFILES["tiny"]["teacher"], "k_candidates": -5})
    shards = tmp_path / "shards"
    write_tar(shards / "00000.tar", good("a"))
    line = one_line_failure(
        capsys, ["ingest", "--home", str(tmp_path / "home"), "--profile", "tiny", "--shards", str(shards)]
    )
    assert (
        line
        == "gda: invalid TeacherSettings settings: k_candidates: Input should be greater than or equal to 1 (got -5)"
    )


def test_a_missing_model_folder_is_named_when_the_definitions_load(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    nowhere = tmp_path / "no-such-sd"
    error = profile_error(monkeypatch, tmp_path, "diffusion", {"kind": "pretrained", "pretrained_path": str(nowhere)})
    [problem] = error.errors()
    assert problem["loc"] == ("pretrained_path",)
    assert (
        problem["msg"]
        == f"Value error, pretrained_path {nowhere} is not a folder: point the setting at an existing model folder"
    )
    [problem] = profile_error(
        monkeypatch, tmp_path, "diffusion", {"kind": "pretrained", "pretrained_path": None}
    ).errors()
    assert problem["msg"] == "Value error, kind 'pretrained' needs pretrained_path: a local Stable Diffusion folder"


# -- model files ------------------------------------------------------------------------------------------


def python_sources() -> list[Path]:
    return sorted(
        p
        for folder in ("gda", "gda_assets", "resources", "bench", "scripts", "sql")
        for p in (REPO / folder).rglob("*.py")
    )


def keywords(call: ast.Call) -> dict[str, object]:
    return {k.arg: k.value.value for k in call.keywords if isinstance(k.value, ast.Constant)}


def test_no_code_unpickles_weights() -> None:
    """Weights are read as safetensors: a model class's from_pretrained passes use_safetensors=True, the one
    torch.load (EfficientNet-Lite0's packaged .pth) passes weights_only=True, and nothing imports pickle."""
    not_weights = ("Tokenizer", "Processor", "Scheduler", "Config")
    problems, model_loads = [], 0
    for path in python_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
                )
                problems += [
                    f"{where} imports {n}"
                    for n in names
                    if n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle")
                ]
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
                continue
            owner = node.func.value.id if isinstance(node.func.value, ast.Name) else ""
            if node.func.attr == "load" and owner in ("torch", "np", "numpy"):
                required = {
                    "torch": ("weights_only", True),
                    "np": ("allow_pickle", False),
                    "numpy": ("allow_pickle", False),
                }[owner]
                if keywords(node).get(required[0]) is not required[1]:
                    problems.append(f"{where} {owner}.load without {required[0]}={required[1]}")
            if node.func.attr == "from_pretrained" and owner and not owner.endswith(not_weights):
                model_loads += 1
                if keywords(node).get("use_safetensors") is not True:
                    problems.append(f"{where} {owner}.from_pretrained without use_safetensors=True")
    assert model_loads >= 8  # the scan sees the loaders (UNet, VAE, CLIP, ViT, DINOv2, MiniLM, ...)
    assert problems == []


def model_dir(root: Path) -> Path:
    """A folder shaped like a transformers checkpoint (the bytes are never read as weights here)."""
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "vit"}))
    (root / "model.safetensors").write_bytes(b"{}")
    return root


def test_a_symlink_out_of_a_model_folder_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "elsewhere" / "secret.safetensors"
    secret.parent.mkdir()
    secret.write_bytes(b"not for the model")
    folder = model_dir(tmp_path / "vit")
    (folder / "model.safetensors").unlink()
    (folder / "model.safetensors").symlink_to(secret)
    with pytest.raises(ModelPathError, match="outside its model folder") as raised:
        load_image_encoder(EncoderSpec(image_backend="hf", image_model=str(folder)))
    assert str(raised.value) == (
        f"image model file 'model.safetensors' resolves to {secret}, outside its model folder {folder}; "
        "refusing to read it"
    )


def test_weights_listed_outside_the_folder_are_refused(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "vit")
    # Enough ".." to climb from any temporary folder to the root.
    passwd = "../" * len(folder.parts) + "etc/passwd"
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"encoder.weight": passwd}}))
    with pytest.raises(ModelPathError) as raised:
        model_folder(folder, "image model")
    assert str(raised.value) == (
        f"image model weights listed in model.safetensors.index.json {passwd!r} resolves to /etc/passwd, "
        f"outside its model folder {folder}; refusing to read it"
    )


def test_a_model_card_naming_weights_outside_its_folder_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "artifacts" / "diffusion_model"
    (folder / "weights").mkdir(parents=True)
    for weights, allowed in (("weights", True), ("../../elsewhere", False), ("/etc", False)):
        card = ModelCard(kind="scratch", weights=weights, version="0")
        write_card(folder, card)
        if allowed:
            assert weights_dir(folder, card) == (folder / "weights").resolve()
        else:
            with pytest.raises(ModelPathError, match=r"model card weights .* outside its model folder"):
                weights_dir(folder, card)


def test_a_cached_hub_snapshot_may_link_into_its_blobs(tmp_path: Path) -> None:
    repository = tmp_path / "hub" / "models--org--vit"
    blob = repository / "blobs" / "0123abcd"
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"{}")
    snapshot = repository / "snapshots" / "rev0"
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(Path("..") / ".." / "blobs" / "0123abcd")
    assert model_folder(snapshot, "image model") == snapshot.resolve()
    (snapshot / "escape.json").symlink_to(tmp_path / "hub")
    with pytest.raises(ModelPathError, match="outside its model folder"):
        model_folder(snapshot, "image model")


def test_pickled_weights_alone_are_refused_before_loading(tmp_path: Path) -> None:
    folder = model_dir(tmp_path / "vit")
    (folder / "model.safetensors").rename(folder / "pytorch_model.bin")
    with pytest.raises(
        EncoderError, match=r"has no \.safetensors weights; pickled \.bin / \.pt weights are never loaded"
    ):
        load_image_encoder(EncoderSpec(image_backend="hf", image_model=str(folder)))
