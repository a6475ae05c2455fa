"""Build shards by hand for tests: good samples and every kind of bad one, written member by member."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

from PIL import Image


def png(size: tuple[int, int] = (16, 16), colour: tuple[int, int, int] = (200, 30, 30), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour if mode == "RGB" else 0).save(buffer, format="PNG")
    return buffer.getvalue()


def good(key: str, caption: str = "a red square icon on a white background") -> list[tuple[str, bytes]]:
    meta = {"url": f"https://example.test/{key}.png", "license": "CC0-1.0", "photographer": "tests"}
    return [(f"{key}.png", png()), (f"{key}.txt", caption.encode()), (f"{key}.json", json.dumps(meta).encode())]


def write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path
