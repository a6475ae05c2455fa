"""The ``gda`` command line.

Commands that materialize assets (``demo``, ``ingest``) hand over to ``gda_assets.runner``, imported only
when such a command runs: the science package itself never imports Dagster.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gda.home import Home
from gda.profiles import PROFILES


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="where everything is written (default: $GDA_HOME or ./.gda)")
    parser.add_argument("--profile", choices=sorted(PROFILES), help="size preset (default: $GDA_PROFILE or demo)")


def _print_reports(reports) -> int:
    print(f"{'shard':>8} {'accepted':>9} {'rejected':>9}  status")
    for report in reports:
        print(f"{report.shard:>8} {report.accepted:>9} {report.rejected:>9}  {'ok' if report.succeeded else 'FAILED'}")
    failed = [r.shard for r in reports if not r.succeeded]
    if failed:
        print(f"{len(failed)} shard run(s) failed: {', '.join(failed)}; open the runs in the UI for the cause", file=sys.stderr)
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
    print(f"home: {home.root}  (open the UI with: gda ui --home {home.root})")
    return status


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gda", description="Fast data attribution for text-to-image models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="run the main job on the embedded default corpus (or --shards)")
    _add_common(demo)
    demo.add_argument("--shards", default=os.environ.get("GDA_SHARDS"), help="use your own img2dataset shards folder")
    demo.add_argument("--retrain", action="store_true", help="train the diffusion model even if a shipped checkpoint fits")
    demo.set_defaults(run=_cmd_demo)

    ingest = commands.add_parser("ingest", help="register and ingest every shard of an img2dataset folder")
    _add_common(ingest)
    ingest.add_argument("--shards", required=True, help="folder of NNNNN.tar (+ NNNNN.parquet) shards")
    ingest.set_defaults(run=_cmd_ingest)

    ui = commands.add_parser("ui", help="open the Dagster UI (dagster dev) on this home")
    _add_common(ui)
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(run=_cmd_ui)

    bench = commands.add_parser("bench", help="run a benchmark: JSON for machines, a table for people")
    _add_common(bench)
    bench.add_argument("name", help="benchmark name, e.g. model")
    bench.add_argument("--json", help="write the result as JSON to this file")
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (FileNotFoundError, ValueError) as error:
        print(f"gda: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
