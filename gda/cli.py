"""The ``gda`` command line.

Commands that materialize assets (``demo``, ``ingest``) hand over to ``gda_assets.runner``, imported only
when such a command runs: the science package itself never imports Dagster. ``query`` and ``serve`` load the
attribution engine (torch, FAISS, the encoders) only when they run, so the other commands start fast.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from gda.home import Home
from gda.profiles import PROFILES, profile_values


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="where everything is written (default: $GDA_HOME or ./.gda)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="size preset (default: $GDA_PROFILE or demo)")


def _print_reports(reports) -> int:
    print(f"{'shard':>8} {'accepted':>9} {'rejected':>9}  status")
    for report in reports:
        print(f"{report.shard:>8} {report.accepted:>9} {report.rejected:>9}  {'ok' if report.succeeded else 'FAILED'}")
    failed = [r.shard for r in reports if not r.succeeded]
    if failed:
        print(
            f"{len(failed)} shard run(s) failed: {', '.join(failed)}; open the runs in the UI for the cause",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from gda_assets.runner import demo

    home = Home.resolve(args.home)
    shards = Path(args.shards) if args.shards else None
    report = demo(home, profile=args.profile, shards_dir=shards, retrain=args.retrain)
    status = _print_reports(report.shards)
    failed = [batch for batch, ok in report.query_batches.items() if not ok]
    unscored = [batch for batch, ok in report.scored_batches.items() if not ok]
    print(f"query batches: {len(report.query_batches) - len(failed)} of {len(report.query_batches)} generated")
    print(f"teacher: {len(report.scored_batches) - len(unscored)} of {len(report.query_batches)} batches scored")
    if failed or unscored:
        print(f"batch run(s) failed: {', '.join(failed + unscored)}", file=sys.stderr)
        status = 1
    _print_sample_attribution(home, args.profile, shards)
    print(f"\nhome: {home.root}")
    print(f"Dagster UI:    gda ui --home {home.root}     (http://127.0.0.1:3000)")
    print(f"explorer, API: gda serve --home {home.root}  (http://127.0.0.1:8000/, API docs at /docs)")
    return status


def _cmd_counterfactual(args: argparse.Namespace) -> int:
    import duckdb

    from gda import counterfactual
    from gda_assets.runner import counterfactual as run_cells

    home = Home.resolve(args.home)
    outcome = run_cells(home, args.profile, Path(args.shards) if args.shards else None, every_cell=args.all)
    failed = [key for key, ok in outcome.items() if not ok]
    print(f"counterfactual cells run: {len(outcome) - len(failed)} of {len(outcome)} succeeded")
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        rows = con.execute("SELECT * FROM eval_counterfactual").pl()
    if rows.height:
        print(counterfactual.markdown_table(counterfactual.summary(rows)))
    if failed:
        print(f"failed cells: {', '.join(failed)}; open their runs in the UI (gda ui) for the cause", file=sys.stderr)
    return 1 if failed else 0


def _cmd_study(args: argparse.Namespace) -> int:
    import duckdb

    from gda import student_study
    from gda_assets.runner import student_study as run_arms

    home = Home.resolve(args.home)
    shards = Path(args.shards) if args.shards else None
    outcome = run_arms(home, args.profile, shards, every_arm=args.all, arms=args.arm)
    failed = [key for key, ok in outcome.items() if not ok]
    print(f"student study arms run: {len(outcome) - len(failed)} of {len(outcome)} succeeded")
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        rows = con.execute("SELECT * FROM student_study").pl()
    if rows.height:
        print(student_study.markdown_table(rows))
    if failed:
        print(f"failed arms: {', '.join(failed)}; open their runs in the UI (gda ui) for the cause", file=sys.stderr)
    return 1 if failed else 0


def _cmd_report(args: argparse.Namespace) -> int:
    from gda import report

    home = Home.resolve(args.home)
    text = report.render(home.duckdb_path, Path(args.latency))
    if args.readme:
        readme = Path(args.readme)
        readme.write_text(report.embed(readme.read_text(), text))
        print(f"updated the report block of {readme}")
    if args.out:
        Path(args.out).write_text(text + "\n")
        print(f"wrote {args.out}")
    if not (args.readme or args.out):
        print(text)
    return 0


def _audit_query(args: argparse.Namespace) -> tuple[str, list[object]]:
    """The named query in sql/queries.sql that answers the audit question, and its parameters."""
    import hashlib
    from datetime import UTC, datetime

    if args.question == "image":
        if bool(args.image) == bool(args.sha256):
            raise ValueError("gda audit image needs one of --image FILE or --sha256 HEX")
        digest = hashlib.sha256(Path(args.image).read_bytes()).hexdigest() if args.image else args.sha256.lower()
        return "attributions_for_image", [digest]
    if args.question == "prompt":
        return "attributions_for_prompt", [args.prompt]
    if args.question == "sources":
        since = datetime.fromisoformat(args.since) if args.since else datetime(1970, 1, 1)
        until = datetime.fromisoformat(args.until) if args.until else datetime.now(UTC).replace(tzinfo=None)
        return "source_attribution_counts", [since, until]
    return "versions_served", []


def _cmd_audit(args: argparse.Namespace) -> int:
    """Answer an audit question from the attribution log, after moving in the rows still in its write-ahead file
    (when the database is free; a running `gda serve` keeps logging)."""
    import duckdb
    import polars as pl

    from gda.audit import AuditLog
    from sql import named_query

    home = Home.resolve(args.home)
    if not home.duckdb_path.exists():
        raise FileNotFoundError(f"{home.duckdb_path} does not exist: run gda demo (or gda ingest) on this home first")
    name, params = _audit_query(args)
    log = AuditLog.for_home(home, "cli")
    log.move()
    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        rows = con.execute(named_query(name), params).pl()
    if args.format == "json":
        print(rows.write_json())
    elif args.format == "csv":
        print(rows.write_csv(), end="")
    else:
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=60, tbl_hide_dataframe_shape=True):
            print(rows if rows.height else f"no logged answers match ({name})")
    pending = log.pending()
    if pending:
        print(
            f"gda: {pending} answer(s) logged while the database was busy wait in {log.spool}; "
            "they are stored with the next move (gda serve moves them every second, gda audit and gda query too)",
            file=sys.stderr,
        )
    return 0


def _cmd_ingest(args: argparse.Namespace) -> int:
    from gda_assets.runner import ingest

    home = Home.resolve(args.home)
    return _print_reports(ingest(home, Path(args.shards), profile=args.profile))


def _cmd_ui(args: argparse.Namespace) -> int:
    """Replace this process with ``dagster dev`` on the home's instance, bound to loopback."""
    home = Home.resolve(args.home).ensure()
    os.environ["DAGSTER_HOME"] = str(home.dagster_home)
    os.environ["GDA_HOME"] = str(home.root)
    if args.profile:
        os.environ["GDA_PROFILE"] = args.profile
    dagster = Path(sys.executable).with_name("dagster")
    argv = [str(dagster), "dev", "-m", "gda_assets.definitions", "-h", args.host, "-p", str(args.port)]
    os.execv(argv[0], argv)
    return 0  # not reached: execv replaces the process


def _cmd_bench(args: argparse.Namespace) -> int:
    import bench

    result = bench.run(args.name, Path(args.home or os.environ.get("GDA_HOME", ".gda")), args.profile)
    print(bench.table(result))
    if args.json:
        bench.write_json(result, Path(args.json))
        print(f"wrote {args.json}")
    return 0


def _use_profile_threads(profile: str | None) -> None:
    """Torch's thread count from the profile, as the Dagster compute resource sets it for the assets."""
    import torch

    threads = profile_values(profile)["compute"].get("threads")
    if threads:
        torch.set_num_threads(threads)


def _cmd_query(args: argparse.Namespace) -> int:
    from gda.service import open_engine

    image = Path(args.image).read_bytes()
    _use_profile_threads(args.profile)
    with open_engine(Home.resolve(args.home), args.profile, interface="cli") as engine:
        answer = engine.attribute(image, args.prompt, args.top_k)
    if args.json:
        print(json.dumps(answer.payload(), indent=2))
        return 0
    _print_answer(answer)
    return 0


def _cmd_attribute(args: argparse.Namespace) -> int:
    from gda.backfill import backfill
    from gda.service import open_engine

    _use_profile_threads(args.profile)
    with open_engine(Home.resolve(args.home), args.profile, interface="cli") as engine:
        summary = backfill(engine, Path(args.images), Path(args.prompts), Path(args.out), args.top_k)
    print(f"wrote {args.out}: {summary.answered} of {summary.items} images attributed, {summary.errors} error rows")
    return 0


def _print_answer(answer) -> None:
    versions = answer.versions
    print(f"model {versions.model}  embedder {versions.embedder}  index {versions.index}")
    print(f"{'rank':>4} {'train id':>14} {'score':>8}  {'caption':<40}  url")
    for match in answer.results:
        caption = match.caption if len(match.caption) <= 40 else match.caption[:39] + "…"
        print(f"{match.rank:>4} {match.train_id:>14} {match.score:>8.4f}  {caption:<40}  {match.url or '-'}")


def _print_sample_attribution(home: Home, profile: str | None, shards: Path | None) -> None:
    """The demo's last word: the distilled attribution of one generated test query, as `gda query` gives it."""
    import duckdb

    from gda.service import open_engine
    from sql import named_query

    with duckdb.connect(str(home.duckdb_path), read_only=True) as con:
        tests = con.execute(named_query("test_queries")).pl()
    if tests.is_empty():
        return
    query_id, prompt, image_path = tests.select("query_id", "prompt", "image_path").row(0)
    image = home.artifacts / image_path
    with open_engine(home, profile, shards=shards, interface="cli") as engine:
        answer = engine.attribute(image.read_bytes(), prompt, min(5, engine.max_top_k))
    print(f'\nsample attribution of test query {query_id}: "{prompt}" ({image})')
    _print_answer(answer)
    print(f'same from the command line: gda query --home {home.root} --image {image} --prompt "{prompt}" --top-k 5')


LOOPBACK_HOSTS = ("127.0.0.1", "::1", "localhost")


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from gda.api import MiB, create_app
    from gda.service import open_engine

    # From the environment, never a flag: a command line is visible to every user of the machine in `ps`.
    token = os.environ.get("GDA_API_TOKEN")
    if token is None and args.host not in LOOPBACK_HOSTS:
        print(
            f"gda: warning: serving on {args.host} without GDA_API_TOKEN: anyone who reaches the port can query "
            "and read the training images; set GDA_API_TOKEN to require a bearer token",
            file=sys.stderr,
        )
    _use_profile_threads(args.profile)
    with open_engine(Home.resolve(args.home), args.profile, interface="http") as engine:
        if engine.refusal is not None:
            print(f"gda: warning: {engine.refusal}; every query is refused until then", file=sys.stderr)
        app = create_app(engine, max_upload_bytes=int(args.max_upload_mb * MiB), token=token)
        uvicorn.run(app, host=args.host, port=args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gda", description="Fast data attribution for text-to-image models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job on the embedded default corpus (or --shards)")
    _add_common(demo)
    demo.add_argument("--shards", default=os.environ.get("GDA_SHARDS"), help="use your own img2dataset shards folder")
    demo.add_argument(
        "--retrain", action="store_true", help="train the diffusion model even if a shipped checkpoint fits"
    )
    demo.set_defaults(run=_cmd_demo)

    ingest = commands.add_parser("ingest", help="register and ingest every shard of an img2dataset folder")
    _add_common(ingest)
    ingest.add_argument("--shards", required=True, help="folder of NNNNN.tar (+ NNNNN.parquet) shards")
    ingest.set_defaults(run=_cmd_ingest)

    counterfactual = commands.add_parser(
        "counterfactual", help="retrain without each method's top-k images and measure the queries' loss change (slow)"
    )
    _add_common(counterfactual)
    counterfactual.add_argument(
        "--shards", default=os.environ.get("GDA_SHARDS"), help="the shards folder the home was built on"
    )
    counterfactual.add_argument(
        "--all", action="store_true", help="rerun every cell, not only those not yet materialized"
    )
    counterfactual.set_defaults(run=_cmd_counterfactual)

    study = commands.add_parser(
        "study", help="train a student per design-study arm from the stored teacher scores and compare them"
    )
    _add_common(study)
    study.add_argument("--shards", default=os.environ.get("GDA_SHARDS"), help="the shards folder the home was built on")
    study.add_argument("--arm", action="append", help="run only this arm (repeatable; default: every arm not yet run)")
    study.add_argument("--all", action="store_true", help="rerun every arm, not only those not yet materialized")
    study.set_defaults(run=_cmd_study)

    audit = commands.add_parser(
        "audit", help="who was credited: answers by image or prompt, sources over a period, versions served"
    )
    _add_common(audit)
    audit.add_argument("--format", choices=("table", "csv", "json"), default="table")
    questions = audit.add_subparsers(dest="question", required=True)
    by_image = questions.add_parser("image", help="every logged answer for a generated image")
    by_image.add_argument("--image", help="the image file as it was queried")
    by_image.add_argument("--sha256", help="or its sha256, as the answer reported it")
    questions.add_parser("prompt", help="every logged answer for a prompt (exact text)").add_argument("prompt")
    sources = questions.add_parser("sources", help="how often each source (url, license) was credited")
    sources.add_argument("--since", help="UTC ISO time, inclusive (default: the beginning)")
    sources.add_argument("--until", help="UTC ISO time, exclusive (default: now)")
    questions.add_parser("versions", help="which model, embedder and index versions answered, and when")
    audit.set_defaults(run=_cmd_audit)

    report = commands.add_parser("report", help="the latest mAP, counterfactual and latency figures as markdown")
    _add_common(report)
    report.add_argument(
        "--latency",
        default=str(Path(__file__).resolve().parents[1] / "bench" / "results" / "latency.json"),
        help="latency benchmark JSON (default: the committed bench/results/latency.json)",
    )
    report.add_argument("--out", help="write the markdown to this file instead of printing it")
    report.add_argument("--readme", help="replace the report block of this README with it")
    report.set_defaults(run=_cmd_report)

    ui = commands.add_parser("ui", help="open the Dagster UI (dagster dev) on this home")
    _add_common(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(run=_cmd_ui)

    query = commands.add_parser("query", help="the training images that most influenced a generated image")
    _add_common(query)
    query.add_argument("--image", required=True, help="the generated image file")
    query.add_argument("--prompt", required=True, help="the prompt it was generated from")
    query.add_argument("--top-k", type=int, default=10, help="how many training images (default 10)")
    query.add_argument("--json", action="store_true", help="print the answer as JSON")
    query.set_defaults(run=_cmd_query)

    attribute = commands.add_parser(
        "attribute", help="a backfill: attribute a folder of generated images with their prompts into a Parquet file"
    )
    _add_common(attribute)
    attribute.add_argument("--images", required=True, help="the folder of generated images")
    attribute.add_argument(
        "--prompts", required=True, help="CSV, JSON lines or Parquet with columns image (path in the folder), prompt"
    )
    attribute.add_argument("--out", required=True, help="the Parquet file to write, one row per image")
    attribute.add_argument("--top-k", type=int, default=10, help="how many training images per image (default 10)")
    attribute.set_defaults(run=_cmd_attribute)

    serve = commands.add_parser(
        "serve",
        help="serve attribution queries over HTTP (explorer page at /, OpenAPI docs at /docs)",
        epilog="Set GDA_API_TOKEN to require it as a bearer token (Authorization: Bearer TOKEN) on every API call.",
    )
    _add_common(serve)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--max-upload-mb", type=float, default=10.0, help="largest request body accepted (default 10)")
    serve.set_defaults(run=_cmd_serve)

    bench = commands.add_parser("bench", help="run a benchmark: JSON for machines, a table for people")
    _add_common(bench)
    bench.add_argument("name", help="benchmark name, e.g. model")
    bench.add_argument("--json", help="write the result as JSON to this file")
    bench.set_defaults(run=_cmd_bench)
    return parser


def _one_line(error: Exception) -> str:
    """The error as one line; pydantic's (a setting out of range) otherwise spans four per field."""
    from pydantic import ValidationError

    if not isinstance(error, ValidationError):
        return str(error)
    problems = "; ".join(
        f"{'.'.join(map(str, problem['loc'])) or 'settings'}: {problem['msg']} (got {problem['input']!r})"
        for problem in error.errors()
    )
    return f"invalid {error.title} settings: {problems}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError, TimeoutError) as error:
        print(f"gda: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
