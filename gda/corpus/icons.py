"""The embedded demo corpus: icon glyphs from the fonts shipped in ``qtawesome``, rendered with Pillow.

Each image is one glyph in a foreground colour on a background colour, at a scale and a position, with
2–5 captions in a small grammar built from the icon's name, its colours and its layout. Icons are drawn
by family (``attachment``, ``attachment-off``, ``attachment-plus``, ...) so the corpus holds natural
near-duplicates, which is what attribution has to tell apart. Held-out prompts in the same grammar, never
equal to a training caption, are written apart from the shards for later query generation.

Only the font files are read: importing ``qtawesome`` would import Qt.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image, ImageFont

from gda.corpus.palette import COLOUR_NAMES, PALETTE, allowed_backgrounds
from gda.corpus.shards import ShardSample, write_shard

RESOLUTIONS = (16, 32)
SCALES = ("large", "small")
# Large icons fill the canvas and are always centred; only small ones move.
POSITIONS = ("centre", "top-left", "top-right", "bottom-left", "bottom-right")
MAX_VARIANTS_PER_FAMILY = 3
IMAGES_PER_FAMILY = 20
MAX_PER_SHARD = 10_000  # the key holds the index within a shard in four digits

_GLYPH_RENDER_PX = 96  # glyphs are rasterised large, then downsampled: antialiasing at 16 px


@dataclass(frozen=True)
class IconFont:
    name: str  # short id used in meta and URLs
    file_prefix: str  # qtawesome's file name up to the version
    license: str  # of the icon designs


FONTS = (
    IconFont("mdi6", "materialdesignicons6-webfont", "Apache-2.0"),
    IconFont("fa6s", "fontawesome6-solid-webfont", "CC-BY-4.0"),
)


@dataclass(frozen=True)
class DemoCorpusSpec:
    n_images: int
    n_shards: int
    resolution: int
    seed: int
    n_heldout_prompts: int
    n_families: int | None = None  # None: one family per IMAGES_PER_FAMILY images


@dataclass(frozen=True)
class DemoCorpusSummary:
    n_images: int
    shards: list[Path]
    heldout_path: Path
    n_heldout: int
    n_families: int
    n_icons: int
    seconds: float


@dataclass(frozen=True)
class Icon:
    font: IconFont
    family: str
    name: str


@dataclass(frozen=True)
class IconImage:
    """The attributes one image is rendered and captioned from."""

    icon: Icon
    fg: str
    bg: str
    scale: str
    position: str


def _font_dir() -> Path:
    spec = importlib.util.find_spec("qtawesome")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the demo corpus renders the icon fonts of qtawesome: pip install --no-deps qtawesome")
    return Path(spec.submodule_search_locations[0]) / "fonts"


def _font_file(font: IconFont, pattern: str) -> Path:
    matches = sorted(_font_dir().glob(pattern))
    if not matches:
        raise RuntimeError(f"qtawesome has no {pattern} for font {font.name}; reinstall qtawesome")
    return matches[-1]


@functools.cache
def _charmap(font: IconFont) -> dict[str, int]:
    """Icon name to codepoint; qtawesome writes codepoints as hex, with or without ``0x``."""
    raw = json.loads(_font_file(font, f"{font.file_prefix}-charmap-*.json").read_text())
    return {name: int(code, 16) for name, code in raw.items()}


@functools.cache
def _truetype(font: IconFont) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(_font_file(font, f"{font.file_prefix}-[0-9]*.ttf")), _GLYPH_RENDER_PX)


@functools.cache
def glyph_mask(font: IconFont, name: str, box: int) -> np.ndarray:
    """Coverage in [0, 1] of a ``box``×``box`` square with the glyph's ink fitted and centred in it.

    Fitting the ink box rather than the em box makes every icon use the space it is given, which matters
    when it has 8 pixels."""
    mask = _truetype(font).getmask(chr(_charmap(font)[name]), mode="L")
    ink = Image.frombytes("L", mask.size, bytes(mask))
    bbox = ink.getbbox()
    if bbox is None:
        return np.zeros((box, box), dtype=np.float64)
    ink = ink.crop(bbox)
    side = max(ink.size)
    square = Image.new("L", (side, side), 0)
    square.paste(ink, ((side - ink.width) // 2, (side - ink.height) // 2))
    return np.asarray(square.resize((box, box), Image.Resampling.LANCZOS), dtype=np.float64) / 255.0


def _families(font: IconFont) -> dict[str, list[str]]:
    """Families with at least two members: each icon belongs to its shortest hyphen-prefix that is itself
    an icon (``access-point-network-off`` to ``access-point``)."""
    names = set(_charmap(font))
    families: dict[str, list[str]] = {}
    for name in sorted(names):
        parts = name.split("-")
        base = next("-".join(parts[:i]) for i in range(1, len(parts) + 1) if "-".join(parts[:i]) in names)
        families.setdefault(base, []).append(name)
    return {base: members for base, members in families.items() if len(members) >= 2}


def _family_pool() -> list[tuple[IconFont, str, list[str]]]:
    """All families of all fonts. A later font's family is dropped when any of its names is already an
    icon of an earlier font, so an icon name in a caption always means one glyph."""
    pool: list[tuple[IconFont, str, list[str]]] = []
    taken: set[str] = set()
    for font in FONTS:
        for base, members in _families(font).items():
            if not taken.intersection(members):
                pool.append((font, base, members))
        taken.update(_charmap(font))
    return pool


def _choose_icons(rng: np.random.Generator, n_families: int, box: int) -> list[Icon]:
    """The family bases plus up to MAX_VARIANTS_PER_FAMILY variants each, the closest (fewest extra name
    parts) first so that they are near-duplicates rather than distant relatives (``car`` vs ``car-brake-
    alert``). Glyphs that render blank are left out."""
    pool = _family_pool()
    if n_families > len(pool):
        raise ValueError(f"n_families={n_families} but the fonts hold only {len(pool)} icon families")
    icons: list[Icon] = []
    for pick in sorted(rng.choice(len(pool), size=n_families, replace=False)):
        font, base, members = pool[pick]
        variants = [m for m in members if m != base]
        tiebreak = rng.permutation(len(variants))
        ranked = sorted(range(len(variants)), key=lambda i: (variants[i].count("-"), tiebreak[i]))
        chosen = [base] + [variants[i] for i in ranked[:MAX_VARIANTS_PER_FAMILY]]
        icons.extend(Icon(font, base, name) for name in chosen if glyph_mask(font, name, box).any())
    return icons


def _where(image: IconImage) -> str:
    if image.scale == "large":
        return ""
    if image.position == "centre":
        return "in the centre"
    return f"in the {image.position.replace('-', ' ')} corner"


def _words(text: str) -> str:
    return " ".join(text.split())


def _a(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _name(image: IconImage) -> str:
    return image.icon.name.replace("-", " ")


# The caption grammar. The first template is every image's first caption (the parquet's ``caption``).
TEMPLATES: tuple[Callable[[IconImage], str], ...] = (
    lambda i: _words(f"a {i.scale} {i.fg} {_name(i)} icon {_where(i)} on {_a(i.bg)} background"),
    lambda i: f"{_name(i)}, {i.fg} on {i.bg}",
    lambda i: _words(f"a {i.scale} {i.fg} {i.icon.name} symbol {_where(i)}"),
    lambda i: f"{i.fg} {_name(i)} pictogram on {i.bg}, {i.scale}",
    lambda i: f"{_name(i)} icon in {i.fg} against {_a(i.bg)} background",
    lambda i: _words(f"{i.bg} background with a {i.scale} {i.fg} {_name(i)} glyph {_where(i)}"),
)


def captions_for(image: IconImage, rng: np.random.Generator) -> list[str]:
    """2–5 captions: the descriptive first template, then a random choice of the others."""
    n_more = int(rng.integers(1, 5))
    others = rng.choice(np.arange(1, len(TEMPLATES)), size=n_more, replace=False)
    return [TEMPLATES[0](image)] + [TEMPLATES[int(t)](image) for t in others]


def _layout(resolution: int, scale: str, position: str) -> tuple[int, int, int]:
    """(box side, left, top) in pixels; a one-pixel margin per 16 keeps the border pure background."""
    margin = resolution // 16
    if scale == "large":
        box = resolution - 2 * margin
        return box, margin, margin
    box = resolution // 2
    far = resolution - margin - box
    centre = (resolution - box) // 2
    left, top = {
        "centre": (centre, centre),
        "top-left": (margin, margin),
        "top-right": (far, margin),
        "bottom-left": (margin, far),
        "bottom-right": (far, far),
    }[position]
    return box, left, top


def render(image: IconImage, resolution: int) -> np.ndarray:
    """The image as a ``resolution``×``resolution``×3 uint8 array."""
    box, left, top = _layout(resolution, image.scale, image.position)
    fg = np.array(PALETTE[image.fg], dtype=np.float64)
    bg = np.array(PALETTE[image.bg], dtype=np.float64)
    canvas = np.broadcast_to(bg, (resolution, resolution, 3)).copy()
    coverage = glyph_mask(image.icon.font, image.icon.name, box)[:, :, None]
    canvas[top : top + box, left : left + box] = bg * (1.0 - coverage) + fg * coverage
    return np.rint(canvas).astype(np.uint8)


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _url(image: IconImage, resolution: int) -> str:
    return (
        f"https://icons.example/{image.icon.font.name}/{image.icon.name}.png"
        f"?fg={image.fg}&bg={image.bg}&scale={image.scale}&position={image.position}&px={resolution}"
    )


def _attributes(image: IconImage) -> dict[str, str]:
    return {
        "icon": image.icon.name,
        "family": image.icon.family,
        "font": image.icon.font.name,
        "fg": image.fg,
        "bg": image.bg,
        "scale": image.scale,
        "position": image.position,
    }


def _random_look(rng: np.random.Generator, icon: Icon) -> IconImage:
    fg = COLOUR_NAMES[int(rng.integers(len(COLOUR_NAMES)))]
    backgrounds = allowed_backgrounds(fg)
    bg = backgrounds[int(rng.integers(len(backgrounds)))]
    scale = SCALES[int(rng.integers(len(SCALES)))]
    position = "centre" if scale == "large" else POSITIONS[int(rng.integers(len(POSITIONS)))]
    return IconImage(icon, fg, bg, scale, position)


def _looks_per_icon() -> int:
    return len(COLOUR_NAMES) * len(allowed_backgrounds(COLOUR_NAMES[0])) * (1 + len(POSITIONS))


def _sample_images(rng: np.random.Generator, icons: list[Icon], n_images: int) -> list[IconImage]:
    """Every icon equally often (up to one), each time with a look it has not had yet: an exact repeat
    would be a byte-identical image under a second key."""
    if n_images > len(icons) * _looks_per_icon():
        raise ValueError(f"{n_images} images need more than the {len(icons)} icons chosen; raise n_families")
    order: list[int] = []
    while len(order) < n_images:
        order.extend(int(i) for i in rng.permutation(len(icons)))
    seen: set[IconImage] = set()
    images: list[IconImage] = []
    for index in order[:n_images]:
        image = _random_look(rng, icons[index])
        while image in seen:
            image = _random_look(rng, icons[index])
        seen.add(image)
        images.append(image)
    return images


def _heldout_prompts(
    rng: np.random.Generator, images: list[IconImage], training_captions: set[str], n_prompts: int
) -> pl.DataFrame:
    """Prompts for icons that are in the training set, in its grammar, whose text no training caption has."""
    icons = sorted({image.icon for image in images}, key=lambda icon: (icon.font.name, icon.name))
    rows: list[dict[str, object]] = []
    used = set(training_captions)
    attempts_left = 100 * n_prompts + 1000
    while len(rows) < n_prompts:
        if attempts_left == 0:
            raise ValueError(f"found only {len(rows)} of {n_prompts} held-out prompts unlike every training caption")
        attempts_left -= 1
        image = _random_look(rng, icons[int(rng.integers(len(icons)))])
        prompt = TEMPLATES[int(rng.integers(len(TEMPLATES)))](image)
        if prompt in used:
            continue
        used.add(prompt)
        rows.append({"prompt_id": len(rows), "prompt": prompt, **_attributes(image)})
    columns = ("prompt", "icon", "family", "font", "fg", "bg", "scale", "position")
    return pl.DataFrame(rows, schema={"prompt_id": pl.Int64} | {name: pl.String for name in columns})


def _check(spec: DemoCorpusSpec, out_dir: Path, heldout_path: Path) -> None:
    if spec.resolution not in RESOLUTIONS:
        raise ValueError(f"resolution must be one of {RESOLUTIONS}, got {spec.resolution}")
    if not 1 <= spec.n_shards <= spec.n_images:
        raise ValueError(f"need 1 <= n_shards <= n_images, got {spec.n_shards} shards for {spec.n_images} images")
    if -(-spec.n_images // spec.n_shards) > MAX_PER_SHARD:
        raise ValueError(f"at most {MAX_PER_SHARD} images per shard; use more shards")
    if spec.n_heldout_prompts < 0:
        raise ValueError("n_heldout_prompts must be >= 0")
    if spec.n_families is not None and spec.n_families < 1:
        raise ValueError("n_families must be >= 1")
    if heldout_path.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"write the held-out prompts outside the shard folder {out_dir}, not to {heldout_path}")


def build_demo_corpus(out_dir: Path, spec: DemoCorpusSpec, heldout_path: Path) -> DemoCorpusSummary:
    """Write ``spec.n_shards`` shards to ``out_dir`` and the held-out prompts to ``heldout_path`` (a
    parquet file outside ``out_dir``). Byte-identical output for the same spec."""
    out_dir, heldout_path = Path(out_dir), Path(heldout_path)
    _check(spec, out_dir, heldout_path)
    started = time.perf_counter()
    rng = np.random.default_rng(spec.seed)
    n_families = spec.n_families or max(1, spec.n_images // IMAGES_PER_FAMILY)
    small_box = _layout(spec.resolution, "small", "centre")[0]
    icons = _choose_icons(rng, n_families, small_box)
    images = _sample_images(rng, icons, spec.n_images)

    training_captions: set[str] = set()
    shards: list[Path] = []
    bounds = np.linspace(0, spec.n_images, spec.n_shards + 1).round().astype(int)
    for shard in range(spec.n_shards):
        samples: list[ShardSample] = []
        for index, image in enumerate(images[bounds[shard] : bounds[shard + 1]]):
            captions = captions_for(image, rng)
            training_captions.update(captions)
            meta: dict[str, object] = {
                "url": _url(image, spec.resolution),
                "license": image.icon.font.license,
                "width": spec.resolution,
                "height": spec.resolution,
                **_attributes(image),
            }
            pixels = render(image, spec.resolution)
            samples.append(ShardSample(f"{shard:05d}{index:04d}", _png(pixels), "png", captions, meta))
        shards.append(write_shard(out_dir, shard, samples))

    heldout = _heldout_prompts(rng, images, training_captions, spec.n_heldout_prompts)
    heldout_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = heldout_path.with_name(f".{heldout_path.name}.tmp")
    heldout.write_parquet(tmp_path)
    os.replace(tmp_path, heldout_path)
    return DemoCorpusSummary(
        n_images=len(images),
        shards=shards,
        heldout_path=heldout_path,
        n_heldout=heldout.height,
        n_families=len({icon.family for icon in icons}),
        n_icons=len(icons),
        seconds=time.perf_counter() - started,
    )
