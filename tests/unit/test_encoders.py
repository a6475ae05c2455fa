"""Tests for gda.encoders: packaged demo encoders and `hf` encoders built from tiny local checkpoints."""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hfkit import save_clip_text_model, save_image_model
from PIL import Image, ImageDraw

from gda.encoders import EncoderError, EncoderSpec, load_image_encoder, load_text_encoder
from gda.encoders.runtime import chosen_runtime

PROMPTS = ["a red cat", "a red kitten", "a blue truck", "", "a long prompt " * 20, "x", "two dogs", "sky"]


def scene(size: int) -> Image.Image:
    """A sun over hills, drawn at any resolution (same picture, different rendering)."""
    image = Image.new("RGB", (size, size), (120, 170, 230))
    draw = ImageDraw.Draw(image)
    s = size / 100
    draw.ellipse([60 * s, 10 * s, 85 * s, 35 * s], fill=(250, 210, 40))
    draw.polygon(
        [(0, 100 * s), (0, 60 * s), (40 * s, 45 * s), (100 * s, 70 * s), (100 * s, 100 * s)], fill=(40, 140, 50)
    )
    return image


def checkerboard(size: int) -> Image.Image:
    cells = (np.indices((size, size)) // max(1, size // 8)).sum(axis=0) % 2
    pixels = np.where(cells[..., None] == 1, [230, 30, 30], [20, 20, 20]).astype(np.uint8)
    return Image.fromarray(pixels)


def jpeg(image: Image.Image, quality: int) -> Image.Image:
    from io import BytesIO

    buffer = BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return Image.open(BytesIO(buffer.getvalue()))


def mixed_images() -> list[Image.Image]:
    """Eight images of different sizes and modes (RGB, L, RGBA, P)."""
    rng = np.random.default_rng(0)
    images: list[Image.Image] = [scene(64), checkerboard(48), scene(97).convert("L"), scene(40).convert("RGBA")]
    images.append(checkerboard(70).convert("P"))
    images += [Image.fromarray(rng.integers(0, 256, (33 + i, 51, 3), dtype=np.uint8)) for i in range(3)]
    return images


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def check_features(features: np.ndarray, n: int, dim: int) -> None:
    assert features.shape == (n, dim)
    assert features.dtype == np.float32
    assert np.isfinite(features).all()


# -- packaged demo encoders ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def efficientnet():
    torch.set_num_threads(2)
    return load_image_encoder(EncoderSpec(image_size=128, batch_size=8))


@pytest.fixture(scope="module")
def minilm():
    return load_text_encoder(EncoderSpec(batch_size=8))


def test_efficientnet_features_are_deterministic_and_batch_invariant(efficientnet) -> None:
    images = mixed_images()
    features = efficientnet.encode(images)
    check_features(features, len(images), 1280)
    assert efficientnet.dim == 1280
    np.testing.assert_array_equal(features, efficientnet.encode(images))
    efficientnet.batch_size = 1
    try:
        one_by_one = efficientnet.encode(images, progress=True)
    finally:
        efficientnet.batch_size = 8
    np.testing.assert_allclose(one_by_one, features, atol=1e-5, rtol=0)
    # Different pictures must not collapse onto one feature.
    assert np.ptp(features, axis=0).max() > 1e-2


def test_efficientnet_same_picture_is_closer_than_a_different_picture(efficientnet) -> None:
    original, rerendered, other = efficientnet.encode([scene(256), jpeg(scene(180), quality=40), checkerboard(256)])
    assert cosine(original, rerendered) > cosine(original, other)
    assert cosine(original, rerendered) > cosine(rerendered, other)


def test_efficientnet_version_depends_on_image_size(efficientnet) -> None:
    other = load_image_encoder(EncoderSpec(image_size=96))
    assert other.version != efficientnet.version
    assert len(efficientnet.version) == 12
    assert load_image_encoder(EncoderSpec(image_size=128)).version == efficientnet.version


def test_minilm_embeddings(minilm) -> None:
    features = minilm.encode(PROMPTS)
    check_features(features, len(PROMPTS), 384)
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, atol=1e-5)
    np.testing.assert_array_equal(features, minilm.encode(PROMPTS))
    minilm.batch_size = 1
    try:
        one_by_one = minilm.encode(PROMPTS)
    finally:
        minilm.batch_size = 8
    np.testing.assert_allclose(one_by_one, features, atol=1e-5, rtol=0)
    cat, kitten, truck = features[:3]
    assert cat @ kitten > cat @ truck


def test_unknown_backend_is_a_clear_error() -> None:
    with pytest.raises(EncoderError, match="unknown image backend"):
        load_image_encoder(EncoderSpec(image_backend="resnet"))
    with pytest.raises(EncoderError, match="unknown text backend"):
        load_text_encoder(EncoderSpec(text_backend="t5"))


# -- hf encoders from tiny local checkpoints (tests/hfkit.py) ------------------------------------


@pytest.fixture(autouse=True)
def offline(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize(("model_type", "dim"), [("vit", 32), ("dinov2", 32), ("clip_vision_model", 24)])
def test_hf_image_encoder(tmp_path: Path, model_type: str, dim: int) -> None:
    path = save_image_model(tmp_path / model_type, model_type)
    encoder = load_image_encoder(EncoderSpec(image_backend="hf", image_model=str(path), batch_size=8))
    images = mixed_images()
    features = encoder.encode(images)
    check_features(features, len(images), dim)
    assert encoder.dim == dim
    np.testing.assert_array_equal(features, encoder.encode(images))
    encoder.batch_size = 1
    np.testing.assert_allclose(encoder.encode(images), features, atol=1e-5, rtol=0)
    assert np.ptp(features, axis=0).max() > 1e-3


def test_hf_version_follows_weight_bytes(tmp_path: Path) -> None:
    path = save_image_model(tmp_path / "vit", "vit", seed=0)
    spec = EncoderSpec(image_backend="hf", image_model=str(path))
    before = load_image_encoder(spec).version
    # The same bytes in another folder keep the version.
    copy = shutil.copytree(path, tmp_path / "copy")
    assert load_image_encoder(EncoderSpec(image_backend="hf", image_model=str(copy))).version == before
    save_image_model(path, "vit", seed=1)
    assert load_image_encoder(spec).version != before


def test_hf_clip_text_encoder(tmp_path: Path) -> None:
    path = save_clip_text_model(tmp_path / "clip_text")
    encoder = load_text_encoder(EncoderSpec(text_backend="hf", text_model=str(path), batch_size=8))
    features = encoder.encode(PROMPTS)
    check_features(features, len(PROMPTS), 20)
    np.testing.assert_array_equal(features, encoder.encode(PROMPTS))
    encoder.batch_size = 1
    np.testing.assert_allclose(encoder.encode(PROMPTS), features, atol=1e-5, rtol=0)
    assert not np.allclose(features[0], features[2])


# -- runtimes: ONNX Runtime must give eager PyTorch's features ------------------------------------

# Measured: about 2e-6 of the features' scale for EfficientNet-Lite0, 1e-7 for MiniLM.
RUNTIME_TOLERANCE = 1e-4


def _both_runtimes(load, spec: EncoderSpec, items: list) -> tuple[np.ndarray, np.ndarray]:
    eager = load(replace(spec, runtime="eager")).encode(items)
    onnx = load(replace(spec, runtime="onnx")).encode(items)
    return eager, onnx


def _assert_close_to_scale(onnx: np.ndarray, eager: np.ndarray) -> None:
    assert onnx.shape == eager.shape and onnx.dtype == np.float32
    assert np.abs(onnx - eager).max() <= RUNTIME_TOLERANCE * np.abs(eager).max()


@pytest.mark.parametrize("kind", ["efficientnet-lite0", "minilm", "vit", "dinov2", "clip_vision_model", "clip_text"])
def test_onnx_runtime_features_equal_eager_features(tmp_path: Path, kind: str) -> None:
    if kind == "efficientnet-lite0":
        eager, onnx = _both_runtimes(load_image_encoder, EncoderSpec(image_size=64), mixed_images())
    elif kind == "minilm":
        eager, onnx = _both_runtimes(load_text_encoder, EncoderSpec(), [*PROMPTS, "a much longer prompt " * 20])
    elif kind == "clip_text":
        spec = EncoderSpec(text_backend="hf", text_model=str(save_clip_text_model(tmp_path / kind)))
        eager, onnx = _both_runtimes(load_text_encoder, spec, PROMPTS)
    else:
        spec = EncoderSpec(image_backend="hf", image_model=str(save_image_model(tmp_path / kind, kind)))
        eager, onnx = _both_runtimes(load_image_encoder, spec, mixed_images())
    _assert_close_to_scale(onnx, eager)
    assert np.ptp(eager, axis=0).max() > 1e-3  # the inputs differ, so a constant output would not pass


# Measured on these prompts for MiniLM: cosine 0.973 (the empty prompt) to 0.994, mean 0.989.
INT8_MIN_COSINE, INT8_MEAN_COSINE = 0.96, 0.98


@pytest.mark.parametrize("kind", ["minilm", "clip_text"])
def test_int8_text_features_stay_close_to_eager_features(tmp_path: Path, kind: str) -> None:
    spec = EncoderSpec()
    if kind == "clip_text":
        spec = EncoderSpec(text_backend="hf", text_model=str(save_clip_text_model(tmp_path / kind)))
    texts = [*PROMPTS, "a much longer prompt " * 20]
    eager_encoder = load_text_encoder(replace(spec, runtime="eager"))
    int8_encoder = load_text_encoder(replace(spec, text_quantization="int8"))
    eager, int8 = eager_encoder.encode(texts), int8_encoder.encode(texts)
    cosine = (eager * int8).sum(1) / np.linalg.norm(eager, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() >= INT8_MIN_COSINE and cosine.mean() >= INT8_MEAN_COSINE
    assert np.abs(int8 - eager).max() > RUNTIME_TOLERANCE * np.abs(eager).max()  # quantized, not the float graph
    assert int8_encoder.version != eager_encoder.version
    # One text at a time: a text's features do not depend on what it was batched with.
    np.testing.assert_array_equal(int8_encoder.encode(texts[1:2]), int8[1:2])
    np.testing.assert_array_equal(int8_encoder.encode(texts[::-1]), int8[::-1])
    with pytest.raises(ValueError, match="int8 text quantization runs on ONNX Runtime"):
        load_text_encoder(replace(spec, runtime="eager", text_quantization="int8"))


def test_the_onnx_export_is_cached_and_auto_picks_the_runtime(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GDA_CACHE_DIR", str(tmp_path / "cache"))
    spec = EncoderSpec(image_size=32)
    first = load_image_encoder(spec).encode(mixed_images())
    [graph] = (tmp_path / "cache" / "onnx").glob("*.onnx")
    exported_at = graph.stat().st_mtime_ns
    np.testing.assert_array_equal(load_image_encoder(spec).encode(mixed_images()), first)
    assert graph.stat().st_mtime_ns == exported_at  # read back, not exported again
    assert chosen_runtime("auto", "cpu", "float32") == "onnx"
    assert chosen_runtime("auto", "cuda", "float16") == chosen_runtime("auto", "cpu", "bfloat16") == "eager"
    with pytest.raises(ValueError, match="CPU in float32 only"):
        chosen_runtime("onnx", "cuda", "float32")
    with pytest.raises(ValueError, match="runtime must be one of"):
        chosen_runtime("tensorrt", "cpu", "float32")


def test_hf_missing_model_is_a_clear_error(tmp_path: Path) -> None:
    for model in [str(tmp_path / "nowhere"), "someone/not-cached"]:
        with pytest.raises(EncoderError, match="not found.*HF cache") as error:
            load_image_encoder(EncoderSpec(image_backend="hf", image_model=model))
        assert "\n" not in str(error.value)
    with pytest.raises(EncoderError, match="needs a model"):
        load_text_encoder(EncoderSpec(text_backend="hf"))


def test_hf_unsupported_model_type_is_a_clear_error(tmp_path: Path) -> None:
    path = save_image_model(tmp_path / "vit", "vit")
    with pytest.raises(EncoderError, match="model_type 'vit'"):
        load_text_encoder(EncoderSpec(text_backend="hf", text_model=str(path)))
