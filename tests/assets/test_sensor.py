"""The shards sensor registers only new shards, whatever its cursor; it launches nothing itself (the assets'
automation conditions materialize a registered shard)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from shardkit import good, write_tar

from gda_assets.corpus import shard_sensor
from gda_assets.partitions import shard_partitions
from resources import CorpusSource


def _evaluate(instance: dg.DagsterInstance, folder: Path, cursor: str | None) -> dg.SensorResult:
    context = dg.build_sensor_context(
        instance=instance, cursor=cursor, resources={"corpus": CorpusSource(shards_dir=str(folder))}
    )
    return shard_sensor(context)


def test_sensor_adds_only_new_shards(tmp_path: Path) -> None:
    for number in (0, 1):
        write_tar(tmp_path / f"{number:05d}.tar", good(f"{number}"))
    (tmp_path / "notes.tar").write_bytes(b"not a shard name")
    with dg.instance_for_test() as instance:
        first = _evaluate(instance, tmp_path, cursor=None)
        assert first.run_requests == []
        assert first.dynamic_partitions_requests[0].partition_keys == ["00000", "00001"]
        instance.add_dynamic_partitions(shard_partitions.name, ["00000", "00001"])

        write_tar(tmp_path / "00002.tar", good("2"))
        # Both a fresh cursor (a reset sensor) and an advanced one see only the shard that is new.
        for cursor in (None, "00001"):
            later = _evaluate(instance, tmp_path, cursor=cursor)
            assert later.dynamic_partitions_requests[0].partition_keys == ["00002"]

        instance.add_dynamic_partitions(shard_partitions.name, ["00002"])
        quiet = _evaluate(instance, tmp_path, cursor="00002")
        assert quiet.run_requests == [] and quiet.dynamic_partitions_requests == []
