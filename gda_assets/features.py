"""Feature assets: frozen image and caption features of every accepted training image, one file per shard."""

import dagster as dg

from gda import features, layout
from gda.arrays import IdArray
from gda.corpus.shards import load_images
from gda_assets.partitions import ON_NEW_SHARDS, shard_partitions
from resources import Compute, CorpusSource, Encoders, Warehouse


def _feature_metadata(array: IdArray) -> dict[str, object]:
    return {
        "encoder": array.metadata["encoder"],
        "dim": int(array.metadata["dim"]),
        "encoder_version": array.metadata["version"],
    }


@dg.asset(
    group_name="features",
    partitions_def=shard_partitions,
    deps=[layout.TRAINING_IMAGES],
    io_manager_key="array_io",
    kinds={"pytorch"},
    pool="gpu",
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    description="Image features (EfficientNet-Lite0 by default; DINO with the hf backend) of a shard's "
    "accepted images, in id order, as one safetensors file.",
)
def image_features(
    context: dg.AssetExecutionContext, compute: Compute, encoders: Encoders, corpus: CorpusSource, warehouse: Warehouse
) -> dg.Output[IdArray]:
    rows = warehouse.named("shard_images", [context.partition_key])
    images = load_images(corpus.shard_path(context.partition_key), rows["key"].to_list())
    array = features.image_features(encoders.image(compute.device, compute.dtype), rows["id"].to_list(), images)
    return dg.Output(array, metadata=_feature_metadata(array))


@dg.asset(
    group_name="features",
    partitions_def=shard_partitions,
    deps=[layout.TRAINING_IMAGES],
    io_manager_key="array_io",
    kinds={"pytorch"},
    pool="gpu",
    automation_condition=ON_NEW_SHARDS,
    code_version="1",
    description="Text features (MiniLM by default; CLIP text with the hf backend) of each accepted image's "
    "first caption, in id order, as one safetensors file.",
)
def text_features(
    context: dg.AssetExecutionContext, compute: Compute, encoders: Encoders, warehouse: Warehouse
) -> dg.Output[IdArray]:
    rows = warehouse.named("shard_images", [context.partition_key])
    array = features.text_features(
        encoders.text(compute.device, compute.dtype), rows["id"].to_list(), rows["caption"].to_list()
    )
    return dg.Output(array, metadata=_feature_metadata(array))
