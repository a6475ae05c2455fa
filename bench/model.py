"""``gda bench model``: how fast the diffusion model trains and how fast its loss is evaluated (the
teacher's inner loop) against the plain UNet forward at the same batch, the ceiling for the teacher;
plus DDIM time per image and, when the home holds generated queries, how well they follow their prompts.
"""

from __future__ import annotations

import copy
import time
from typing import Any

import duckdb
import torch

from bench import Setting
from gda.diffusion import ScratchModelConfig, build_from_scratch, evaluate_loss, sample, train
from gda.home import Home
from gda.model_card import read_card
from gda.profiles import profile_values
from gda.registry import open_model
from resources.diffusion import SamplingSettings

BATCH = 64
TRAIN_STEPS = 30
WARMUP_STEPS = 5
LOSS_ITEMS = 640
SAMPLE_IMAGES = 4


def _bundle(home: Home, profile: str):
    folder = home.artifacts / "diffusion_model"
    if (folder / "model_card.json").exists() and read_card(folder).kind == "scratch":
        return open_model(folder, "cpu")[0], "home"
    values = profile_values(profile)["diffusion"]
    return build_from_scratch(ScratchModelConfig(**values.get("model", {}))), "profile config (untrained)"


def _steady_train_seconds(bundle, images: torch.Tensor, captions: list[list[str]], steps: int) -> float:
    """Seconds per step with the one-off caption encoding taken out (difference of two run lengths)."""
    short = train(copy.deepcopy(bundle), images, captions, steps=WARMUP_STEPS, batch_size=BATCH, log_every=WARMUP_STEPS)
    long = train(copy.deepcopy(bundle), images, captions, steps=steps, batch_size=BATCH, log_every=steps)
    return (long.seconds - short.seconds) / (steps - WARMUP_STEPS)


def _colour_accuracy(home: Home) -> dict[str, Any] | None:
    if not home.duckdb_path.exists():
        return None
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        tables = {row[0] for row in con.execute("SELECT table_name FROM duckdb_tables()").fetchall()}
        if "generated_queries" not in tables:
            return None
        row = con.execute(
            "SELECT count(*), avg((fg_detected = fg_expected)::INT), avg((bg_detected = bg_expected)::INT), "
            "avg((fg_detected = fg_expected AND bg_detected = bg_expected)::INT) "
            "FROM generated_queries WHERE fg_expected IS NOT NULL"
        ).fetchone()
    if not row[0]:
        return None
    return {"n_queries": row[0], "fg_accuracy": row[1], "bg_accuracy": row[2], "both_accuracy": row[3], "chance": 0.125}


def run(setting: Setting) -> dict[str, Any]:
    home, profile, values = setting.home, setting.profile, setting.values
    bundle, source = _bundle(home, profile)
    generator = torch.Generator().manual_seed(0)
    c, h, w = bundle.sample_shape
    images = torch.rand(BATCH * 4, 3, h, w, generator=generator) * 2 - 1
    captions = [[f"a {colour} icon number {i}"] for i, colour in zip(range(BATCH * 4), ["red", "blue"] * BATCH * 2)]

    step_seconds = _steady_train_seconds(bundle, images, captions, TRAIN_STEPS)

    states = bundle.text.encode_prompts([caption[0] for caption in captions[:BATCH]]).repeat(LOSS_ITEMS // BATCH, 1, 1)
    x0 = torch.rand(LOSS_ITEMS, c, h, w, generator=generator) * 2 - 1
    started = time.perf_counter()
    evaluate_loss(bundle, x0, states, list(range(LOSS_ITEMS)), [0], seed=1, batch_size=BATCH)
    loss_rate = LOSS_ITEMS / (time.perf_counter() - started)

    timesteps = torch.full((BATCH,), 500)
    with torch.no_grad():
        started = time.perf_counter()
        for start in range(0, LOSS_ITEMS, BATCH):
            bundle.unet(x0[start : start + BATCH], timesteps, encoder_hidden_states=states[start : start + BATCH])
        forward_rate = LOSS_ITEMS / (time.perf_counter() - started)

    sampling = SamplingSettings(**values["diffusion"].get("sampling", {}))
    started = time.perf_counter()
    sample(bundle, ["a red icon"] * SAMPLE_IMAGES, list(range(SAMPLE_IMAGES)), **sampling.model_dump())
    ddim_seconds = (time.perf_counter() - started) / SAMPLE_IMAGES

    result: dict[str, Any] = {
        **setting.header("model"),
        "model_source": source,
        "parameters": sum(p.numel() for p in bundle.unet.parameters()),
        "sample_shape": [c, h, w],
        "batch_size": BATCH,
        "train_images_per_s": BATCH / step_seconds,
        "loss_eval_items_per_s": loss_rate,
        "unet_forward_items_per_s": forward_rate,
        "loss_eval_over_forward": loss_rate / forward_rate,
        "ddim_seconds_per_image": ddim_seconds,
        "ddim_steps": sampling.steps,
        "prompt_following": _colour_accuracy(home),
    }
    result["table"] = [
        ["train throughput", f"{result['train_images_per_s']:.0f}", f"images/s (batch {BATCH})"],
        ["loss evaluation", f"{loss_rate:.0f}", "items/s"],
        ["plain UNet forward", f"{forward_rate:.0f}", "items/s"],
        ["loss / forward", f"{result['loss_eval_over_forward']:.2f}", "(ceiling 1.0)"],
        ["DDIM per image", f"{ddim_seconds:.2f}", f"s ({result['ddim_steps']} steps, guided)"],
    ]
    if result["prompt_following"]:
        colours = result["prompt_following"]
        result["table"] += [
            [
                "foreground colour accuracy",
                f"{colours['fg_accuracy']:.3f}",
                f"of {colours['n_queries']} queries (chance 0.125)",
            ],
            [
                "background colour accuracy",
                f"{colours['bg_accuracy']:.3f}",
                f"of {colours['n_queries']} queries (chance 0.125)",
            ],
        ]
    return result
