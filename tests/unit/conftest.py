"""Fixtures of the query service tests: the tiny profile's encoders and a served home built with them."""

from __future__ import annotations

import pytest

from gda.encoders import EncoderSpec, ImageEncoder, TextEncoder, load_image_encoder, load_text_encoder
from gda.profiles import profile_values
from servicekit import ServedHome, build_served_home


@pytest.fixture(scope="session")
def tiny_encoders() -> tuple[ImageEncoder, TextEncoder]:
    spec = EncoderSpec(**profile_values("tiny")["encoders"])
    return load_image_encoder(spec), load_text_encoder(spec)


@pytest.fixture(scope="session")
def served_home(tmp_path_factory: pytest.TempPathFactory, tiny_encoders: tuple[ImageEncoder, TextEncoder]) -> ServedHome:
    return build_served_home(tmp_path_factory.mktemp("served_home"), *tiny_encoders)
