"""Corpus assets: the embedded demo corpus, and ingestion of every shard into DuckDB."""

from pathlib import Path

import dagster as dg

from gda import layout
from gda.corpus.ingest import IngestResult, ingest_shard
from gda.corpus.shards import list_shards
from gda_assets.checks import Partition, column_schema, table_check_results, table_check_specs
from gda_assets.partitions import ON_NEW_SHARDS, shard_partitions
from resources import CorpusSource, DemoCorpusSource, Warehouse


@dg.asset(
    code_version="1",
    group_name="corpus",
    kinds={"python", "parquet"},
    description="The embedded default corpus: icon glyphs from the qtawesome fonts rendered with colours, "
    "backgrounds, scales and positions, with 2-5 captions each, written as img2dataset shards. "
    "Held-out prompts for query generation are written apart from the shards.",
)
def demo_corpus(
    context: dg.AssetExecutionContext, corpus: CorpusSource, demo_corpus_source: DemoCorpusSource
) -> dg.MaterializeResult:
    from gda.corpus.icons import DemoCorpusSpec, build_demo_corpus

    spec = DemoCorpusSpec(**demo_corpus_source.model_dump(exclude={"heldout_prompts"}))
    heldout = Path(demo_corpus_source.heldout_prompts)
    summary = build_demo_corpus(Path(corpus.shards_dir), spec, heldout_path=heldout)
    keys = [path.stem for path in summary.shards]
    context.instance.add_dynamic_partitions(shard_partitions.name, keys)
    return dg.MaterializeResult(
        metadata={
            "images": summary.n_images,
            "shards": keys,
            "heldout_prompts": summary.n_heldout,
            "heldout_path": dg.MetadataValue.path(str(heldout)),
            "seconds": round(summary.seconds, 2),
        }
    )


PARQUET_CHECK = "agrees_with_parquet"


def _parquet_check(result: IngestResult) -> dg.AssetCheckResult:
    parquet = result.parquet
    return dg.AssetCheckResult(
        check_name=PARQUET_CHECK,
        asset_key=layout.TRAINING_IMAGES,
        passed=parquet.agrees,
        severity=dg.AssetCheckSeverity.WARN,
        description=parquet.summary(),
        metadata={
            "keys_only_in_tar": len(parquet.only_in_tar),
            "keys_only_in_parquet": len(parquet.only_in_parquet),
            "captions_differ": len(parquet.caption_differs),
        },
    )


def build_training_images(embedded: bool) -> dg.AssetsDefinition:
    """Ingest one shard; depends on ``demo_corpus`` only when the embedded corpus is the source."""

    @dg.multi_asset(
        outs={
            table: dg.AssetOut(
                io_manager_key="warehouse_io",
                description=description,
                kinds={"duckdb"},
                metadata={"partition_expr": "shard", "dagster/column_schema": column_schema(table)},
                automation_condition=ON_NEW_SHARDS,
                code_version="1",
            )
            for table, description in (
                (
                    layout.TRAINING_IMAGES,
                    "Accepted training images of a shard: caption(s), source, license, size, sha256.",
                ),
                (
                    layout.REJECTED_IMAGES,
                    "Samples of a shard that could not be used, each with a reason code and detail.",
                ),
            )
        },
        partitions_def=shard_partitions,
        group_name="corpus",
        deps=[layout.DEMO_CORPUS] if embedded else [],
        check_specs=[
            *table_check_specs("training_images"),
            *table_check_specs("rejected_images"),
            dg.AssetCheckSpec(
                PARQUET_CHECK,
                asset=layout.TRAINING_IMAGES,
                description="The shard's NNNNN.parquet lists exactly the tar's samples with their captions (a shard "
                "without one passes). Non-blocking: the tar holds the bytes and is ingested as is either way.",
            ),
        ],
        pool="duckdb",
    )
    def training_images(context: dg.AssetExecutionContext, corpus: CorpusSource, warehouse: Warehouse):
        shard = context.partition_key
        warehouse.ensure_tables()
        result = ingest_shard(corpus.shard_path(shard))
        if result.read_error:
            context.log.warning(f"shard {shard} is damaged ({result.read_error}); samples before it were kept")
        if not result.parquet.agrees:
            context.log.warning(f"shard {shard}: {result.parquet.summary()}")
        context.log.info(f"shard {shard}: {result.accepted.height} accepted, {result.rejected.height} rejected")
        accepted = {
            "dagster/row_count": result.accepted.height,
            "parquet": result.parquet.summary(),
            "parquet_disagreements": result.parquet.disagreements,
        }
        if result.read_error:
            accepted["read_error"] = result.read_error
        yield dg.Output(result.accepted, output_name=layout.TRAINING_IMAGES, metadata=accepted)
        yield dg.Output(
            result.rejected, output_name=layout.REJECTED_IMAGES, metadata={"dagster/row_count": result.rejected.height}
        )
        for table, frame in (("training_images", result.accepted), ("rejected_images", result.rejected)):
            yield from table_check_results(warehouse, table, frame.height, Partition("shard", shard))
        yield _parquet_check(result)

    return training_images


@dg.sensor(
    description="Watches the shards folder and registers new NNNNN.tar files as shard partitions; the "
    "automation sensor then materializes just those partitions (ingest, features, teacher data, embeddings) "
    "and adds them to the index. A shard registered once is never registered again.",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
)
def shard_sensor(context: dg.SensorEvaluationContext, corpus: CorpusSource) -> dg.SensorResult:
    known = set(context.instance.get_dynamic_partitions(shard_partitions.name))
    new = [path.stem for path in list_shards(Path(corpus.shards_dir)) if path.stem not in known]
    if new:
        context.log.info(f"registering new shards {', '.join(new)}")
    return dg.SensorResult(dynamic_partitions_requests=[shard_partitions.build_add_request(new)] if new else [])
