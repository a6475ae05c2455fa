"""``gda bench teacher``: what the AbU+ teacher costs on a materialized home (run ``gda demo`` first).

Three measurements, each side by side in one run:
1. EK-FAC fit of the home's model on the same items (training images x one fixed draw): ours vs
   kronfluence 1.0.1 (a test-only dependency; skipped with a note when it is not installed), and how far
   their corrected eigenvalues differ.
2. Finite-mode candidate evaluations per second against the plain UNet forward at the same rows per call
   (the finite teacher's ceiling).
3. Seconds per query in both modes on real generated queries (first order both one query at a time and
   batched, the teacher's path, with how far their scores differ), plus the one-off per-image costs (training-side
   gradients for first order, baseline losses for finite), and how the rankings agree: first order vs finite,
   and the teacher against itself with another query-draw seed (its own noise, which caps any student).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import tempfile
import time
import warnings
from typing import Any

import torch

from bench import Setting
from gda import layout
from gda import teacher as science
from gda.agreement import RESEED_OFFSET, agreement
from gda.diffusion.loss import Draws, draw_losses, make_draws
from gda.ekfac import DiffusionItems, fit_diffusion_factors, load_factors, select_modules
from gda.teacher_data import candidate_batch, fit_items, images_and_states, open_teacher, stored_baselines
from gda.unlearning import baseline_losses, finite_scores, query_gradient, training_side, unlearning_step

FIT_IMAGES = 512  # training images (x one draw) for the side-by-side EK-FAC fit
ONE_OFF_IMAGES = 128  # images timed for the per-image one-off costs
FINITE_QUERIES = 4  # queries scored in finite mode (each costs K x 2 flips x scoring draws UNet rows)
RESEEDED_QUERIES = 40  # queries re-scored with other query draws (first order, cheap)
ONE_BY_ONE_QUERIES = 8  # of those, scored one query at a time too: enough for its cost and the equality
TOP = 50
THROUGHPUT_ITEMS = 128  # candidates per round of the evaluation-rate measurement
ROUNDS = 3


def _kronfluence_fit(items: DiffusionItems, which: str) -> tuple[float, Any] | None:
    """kronfluence's own EK-FAC fit of the same loss, items and draws; None when it is not installed."""
    try:
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments
        from kronfluence.task import Task
    except ImportError:
        return None
    from torch.utils.data import TensorDataset

    bundle = items.bundle
    names = list(select_modules(bundle.unet, which))
    draws = make_draws(items.item_ids, list(items.draw_indices), items.seed, bundle.sample_shape, items.timesteps)
    x0 = torch.cat([batch.x0 for batch in items])

    class DiffusionTask(Task):
        # Exactly DiffusionItems.loss_fn with one draw per item, summed over the batch as kronfluence expects.
        def compute_train_loss(self, batch, model, sample=False):  # type: ignore[no-untyped-def]
            x, states, t, noise = batch
            moved = dataclasses.replace(bundle, unet=model)
            return draw_losses(moved, x, states, Draws(t.unsqueeze(1), noise.unsqueeze(1))).sum()

        def compute_measurement(self, batch, model):  # type: ignore[no-untyped-def]
            return self.compute_train_loss(batch, model)

        def get_influence_tracked_modules(self):  # type: ignore[no-untyped-def]
            return names

    task = DiffusionTask()
    model = prepare_model(copy.deepcopy(bundle.unet), task)
    dataset = TensorDataset(x0, items.prompt_states, draws.timesteps[:, 0], draws.noise[:, 0])
    with tempfile.TemporaryDirectory() as out, warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        analyzer = Analyzer(
            "bench", model=model, task=task, cpu=True, disable_tqdm=True, output_dir=out, log_level=logging.WARNING
        )
        started = time.perf_counter()
        analyzer.fit_all_factors(
            "kf",
            dataset,
            per_device_batch_size=items.batch_size,
            factor_args=FactorArguments(strategy="ekfac", use_empirical_fisher=True),
            overwrite_output_dir=True,
        )
        seconds = time.perf_counter() - started
        return seconds, load_factors(analyzer.factors_output_dir("kf"))


def _lambda_difference(ours: Any, theirs: Any) -> float:
    worst = 0.0
    for name, mine in ours.modules.items():
        a, b = mine.corrected_eigenvalues(), theirs.modules[name].corrected_eigenvalues()
        worst = max(worst, float((a - b).norm() / b.norm()))
    return worst


def _throughput(
    bundle: Any, modules: Any, step: Any, items: tuple, config: Any, rounds: int = ROUNDS
) -> tuple[float, float, int]:
    """(finite candidate-evaluation rows/s, plain UNet forward rows/s, rows per UNet call): the same items
    scored with the step applied, and bare forwards of as many rows in calls of the same size; best of
    ``rounds`` interleaved rounds, so a busy machine slows both alike."""
    images, states, ids, baseline = items
    timesteps = science.timesteps(config)
    rows_per_call = config.batch_size * 2 * len(timesteps)
    rows = len(ids) * 2 * len(timesteps)
    x = images[:1].expand(rows_per_call, -1, -1, -1).contiguous().to(bundle.device)
    s = states[:1].expand(rows_per_call, -1, -1).contiguous().to(bundle.device)
    t = torch.full((rows_per_call,), 500, device=bundle.device)
    scoring, forward = [], []
    for _ in range(rounds):
        seconds, _ = _timed(
            finite_scores,
            bundle,
            modules,
            step.delta,
            images,
            states,
            ids,
            config.seed,
            baseline,
            timesteps,
            config.batch_size,
        )
        scoring.append(seconds)
        with torch.no_grad():
            started = time.perf_counter()
            for _ in range(rows // rows_per_call):
                bundle.unet(x, t, encoder_hidden_states=s)
            _synchronize()
            forward.append((time.perf_counter() - started) / (rows // rows_per_call * rows_per_call) * rows)
    return rows / min(scoring), rows / min(forward), rows_per_call


def _per_query_first_order(teacher: science.Teacher, batch: science.QueryBatch) -> dict[int, Any]:
    """The teacher's first-order scores one query at a time (one gradient pass, one step, one scoring pass
    per query): the path that batching replaced, for its cost and as the reference it must equal."""
    config, out = teacher.config, {}
    for row, query_id in enumerate(batch.query_ids):
        grad = query_gradient(
            teacher.bundle,
            teacher.modules,
            batch.samples[row],
            batch.prompt_states[row],
            query_id,
            config.query_draws,
            config.seed,
        )
        step = unlearning_step(teacher.factors, grad, config.relative_step, teacher.modules, config.damping_factor)
        out |= teacher.scores([step], science.select_queries(batch, [query_id]), "first_order")
    return out


def _synchronize() -> None:
    """Wait for queued GPU work, so the clock measures it (a no-op on the CPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _timed(fn, *args, **kwargs) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn(*args, **kwargs)
    _synchronize()
    return time.perf_counter() - started, value


def run(setting: Setting) -> dict[str, Any]:
    from gda.registry import open_model
    from gda_assets.factory import build_resources
    from resources import home_store

    home, profile = setting.home, setting.profile
    if (
        not (home.artifacts / layout.TRAINING_GRADIENTS).is_dir()
        or not (home.artifacts / layout.EKFAC_FACTORS).is_dir()
    ):
        raise FileNotFoundError(f"{home.root} has no teacher artifacts; run `gda demo --home {home.root}` first")
    resources = build_resources(home, profile, None)
    store = home_store(resources["artifacts"], resources["warehouse"], resources["corpus"])
    config = resources["teacher"].config()
    bundle, card = open_model(store.folder(layout.DIFFUSION_MODEL), setting.device)
    modules = select_modules(bundle.unet, config.modules)
    fit_rows = store.tables.named("corpus_for_training").head(FIT_IMAGES)
    items = fit_items(bundle, store, fit_rows, config, [0])

    # 1. EK-FAC fit, ours and kronfluence's, on the same items.
    our_fit, ours = _timed(fit_diffusion_factors, items, config.modules)
    # kronfluence is compared on the CPU only (its test-only install has no CUDA build of its helpers).
    kronfluence = _kronfluence_fit(items, config.modules) if setting.device == "cpu" else None
    fit = {"images": len(fit_rows), "draws": 1, "modules": len(modules), "ours_seconds": our_fit}
    if kronfluence is not None:
        fit |= {
            "kronfluence_seconds": kronfluence[0],
            "kronfluence_over_ours": kronfluence[0] / our_fit,
            "lambda_max_relative_difference": _lambda_difference(ours, kronfluence[1]),
        }

    # 3 (set-up). Real queries: the first train batch, with their DINO candidates.
    shards = layout.stored_partitions(home.artifacts, layout.TRAINING_GRADIENTS)
    teacher = open_teacher(bundle, store, config, shards, stored_baselines(store, shards))
    batch_key = [
        key for key in layout.stored_partitions(home.artifacts, layout.GENERATED_QUERIES) if key.startswith("train-")
    ][0]
    batch = candidate_batch(store, batch_key)
    dino = batch.candidates
    batch = science.select_queries(batch, batch.query_ids[:RESEEDED_QUERIES])
    n_queries = len(batch.query_ids)
    k = len(next(iter(dino.values())))
    teacher.side  # noqa: B018 (loading the stored training side is once per run, not per query)

    reference = science.select_queries(batch, batch.query_ids[:ONE_BY_ONE_QUERIES])
    one_by_one_seconds, one_by_one = _timed(_per_query_first_order, teacher, reference)
    delta_seconds, steps = _timed(teacher.deltas, batch)
    first_order_seconds, first_order = _timed(teacher.scores, steps, batch, "first_order")
    batched_difference = max(
        float(abs(first_order[q] - one_by_one[q]).max() / abs(one_by_one[q]).max()) for q in reference.query_ids
    )
    whole = teacher.whole_training_set(batch)
    whole_seconds, _ = _timed(teacher.scores, steps, whole, "first_order")

    # Finite mode on a few queries; baselines are query-independent (stored once per shard by
    # baseline_losses), so they are timed apart, as a one-off cost per image.
    finite_batch = science.select_queries(batch, batch.query_ids[:FINITE_QUERIES])
    prepared, baseline_seconds, n_baselines = {}, 0.0, 0
    for query_id in finite_batch.query_ids:
        ids = finite_batch.candidates[query_id]
        images, states = images_and_states(bundle, store, store.training_rows(ids))
        seconds, baseline = _timed(
            baseline_losses, bundle, images, states, ids, config.seed, science.timesteps(config), config.batch_size
        )
        prepared[query_id] = (images, states, baseline)
        baseline_seconds, n_baselines = baseline_seconds + seconds, n_baselines + len(ids)
    by_ids = {tuple(finite_batch.candidates[q]): value for q, value in prepared.items()}
    finite_seconds, finite = _timed(
        science.finite_scores,
        bundle,
        modules,
        steps[:FINITE_QUERIES],
        finite_batch,
        lambda ids: by_ids[tuple(ids)],
        config,
    )
    side_images = images[:ONE_OFF_IMAGES]
    side_seconds, _ = _timed(
        training_side,
        bundle,
        modules,
        side_images,
        states[:ONE_OFF_IMAGES],
        ids[:ONE_OFF_IMAGES],
        config.seed,
        science.timesteps(config),
        config.batch_size,
    )
    first = finite_batch.query_ids[0]
    first_ids = finite_batch.candidates[first][:THROUGHPUT_ITEMS]
    images, states, baseline = prepared[first]
    evaluation_rate, forward_rate, rows_per_call = _throughput(
        bundle,
        modules,
        steps[0],
        (images[:THROUGHPUT_ITEMS], states[:THROUGHPUT_ITEMS], first_ids, baseline[:THROUGHPUT_ITEMS]),
        config,
    )

    reseed_seconds, reseeded_steps = _timed(teacher.deltas, batch, config.seed + RESEED_OFFSET)
    reseeded = teacher.scores(reseeded_steps, batch, "first_order")
    modes = agreement({q: first_order[q] for q in finite}, finite, TOP).summary()
    noise = agreement(first_order, reseeded, TOP).summary()

    per_query_delta = delta_seconds / n_queries
    result: dict[str, Any] = {
        **setting.header("teacher"),
        "model_version": card.version,
        "training_images": len(teacher.side),
        "k_candidates": k,
        "scoring_draws": len(science.timesteps(config)),
        "query_draws": config.query_draws,
        "ekfac_fit": fit,
        "finite_candidate_evaluations_per_s": evaluation_rate,
        "unet_forward_rows_per_s": forward_rate,
        "finite_over_forward": evaluation_rate / forward_rate,
        "rows_per_unet_call": rows_per_call,
        "seconds_per_query": {
            "first_order_k_one_by_one": one_by_one_seconds / len(reference.query_ids),
            "unlearning_step": per_query_delta,
            "first_order_k": per_query_delta + first_order_seconds / n_queries,
            "first_order_whole_set": per_query_delta + whole_seconds / n_queries,
            "finite_k": per_query_delta + finite_seconds / len(finite_batch.query_ids),
        },
        "batched_vs_one_by_one_max_relative_difference": batched_difference,
        "one_by_one_queries": len(reference.query_ids),
        "one_off_seconds_per_image": {
            "training_side": side_seconds / len(side_images),
            "baseline_losses": baseline_seconds / n_baselines,
        },
        "agreement": {"first_order_vs_finite": modes, "reseeded_query_draws": noise},
    }
    spq = result["seconds_per_query"]
    result["finite_over_first_order"] = spq["finite_k"] / spq["first_order_k"]
    result["table"] = [
        ["EK-FAC fit, ours", f"{our_fit:.1f}", f"s ({fit['images']} images x 1 draw, {fit['modules']} modules)"],
    ]
    if kronfluence is not None:
        result["table"] += [
            [
                "EK-FAC fit, kronfluence 1.0.1",
                f"{fit['kronfluence_seconds']:.1f}",
                f"s ({fit['kronfluence_over_ours']:.1f}x ours)",
            ],
            ["  corrected eigenvalues differ", f"{fit['lambda_max_relative_difference']:.1e}", "max relative"],
        ]
    else:
        result["table"] += [
            ["EK-FAC fit, kronfluence", "n/a", "not installed (pip install --no-deps kronfluence==1.0.1)"]
        ]
    result["table"] += [
        ["finite candidate evaluations", f"{evaluation_rate:.0f}", "UNet rows/s"],
        ["plain UNet forward", f"{forward_rate:.0f}", f"rows/s ({rows_per_call} rows per call)"],
        ["finite / forward", f"{result['finite_over_forward']:.2f}", "(goal >= 0.9)"],
        [
            "first order, one query at a time",
            f"{spq['first_order_k_one_by_one']:.3f}",
            f"s/query ({k} candidates, {len(reference.query_ids)} queries)",
        ],
        [
            "first order, batched",
            f"{spq['first_order_k']:.3f}",
            f"s/query ({n_queries} queries per call; goal <= 0.1)",
        ],
        ["  batched vs one at a time", f"{batched_difference:.1e}", "max relative score difference"],
        ["first order, whole set", f"{spq['first_order_whole_set']:.2f}", f"s/query ({len(teacher.side)} images)"],
        [
            "finite, per query",
            f"{spq['finite_k']:.2f}",
            f"s ({k} candidates; {result['finite_over_first_order']:.0f}x first order)",
        ],
        ["  of which unlearning step", f"{per_query_delta:.3f}", f"s/query ({config.query_draws} query draws)"],
        [
            "one-off training side",
            f"{result['one_off_seconds_per_image']['training_side'] * 1000:.0f}",
            "ms/image (first order)",
        ],
        [
            "one-off baseline losses",
            f"{result['one_off_seconds_per_image']['baseline_losses'] * 1000:.0f}",
            "ms/image (finite)",
        ],
        [
            "first order vs finite",
            f"{modes['spearman_mean']:.3f}",
            f"Spearman, mean of {modes['queries']} queries (min {modes['spearman_min']:.3f})",
        ],
        ["  top-50 overlap", f"{modes['top50_overlap_mean']:.2f}", ""],
        ["another query-draw seed", f"{noise['spearman_mean']:.3f}", f"Spearman, mean of {noise['queries']} queries"],
        ["  top-50 overlap", f"{noise['top50_overlap_mean']:.2f}", "the teacher's own noise"],
    ]
    return result
