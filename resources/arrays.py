"""IO manager for per-partition arrays (features, embeddings): one safetensors file per partition."""

from pathlib import Path

import dagster as dg

from gda import arrays, layout


class ArrayIOManager(dg.ConfigurableIOManager):
    root: str  # the artifact root; files go to gda.layout.partition_file

    def _path(self, asset_key: dg.AssetKey, partition: str | None) -> Path:
        return layout.partition_file(Path(self.root), "/".join(asset_key.path), partition)

    def handle_output(self, context: dg.OutputContext, obj: arrays.IdArray) -> None:
        partition = context.partition_key if context.has_partition_key else None
        path = self._path(context.asset_key, partition)
        arrays.save(path, obj)
        context.add_output_metadata(
            {"rows": len(obj.ids), "dim": obj.values.shape[1], "path": dg.MetadataValue.path(str(path))}
        )

    def load_input(self, context: dg.InputContext) -> arrays.IdArray | dict[str, arrays.IdArray]:
        """The same partition of the upstream asset as one array; several (or another partitioning's)
        as a dict by partition key, even when there happens to be a single one."""
        key = context.asset_key
        if not context.has_asset_partitions:
            return arrays.load(self._path(key, None))
        upstream = context.asset_partition_keys
        if context.has_partition_key and upstream == [context.partition_key]:
            return arrays.load(self._path(key, upstream[0]))
        return {p: arrays.load(self._path(key, p)) for p in upstream}
