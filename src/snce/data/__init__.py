"""Built-in image datasets, image folders and token shards."""

from snce.data.images import (
    DataConfig,
    DigitImages,
    Digits,
    ImageFolder,
    Mnist,
    Photos,
    Shapes,
    build_dataset,
    photo_files,
)
from snce.data.shards import ShardManifest, ShardWriter, TokenShards

__all__ = [
    "DataConfig",
    "DigitImages",
    "Digits",
    "ImageFolder",
    "Mnist",
    "Photos",
    "ShardManifest",
    "ShardWriter",
    "Shapes",
    "TokenShards",
    "build_dataset",
    "photo_files",
]
