"""Built-in image datasets, rendered scenes with captions and edits, image folders and token shards."""

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
from snce.data.scenes import Scene, SceneCaptions, SceneEdits, SceneObject, Scenes
from snce.data.shards import ShardManifest, ShardWriter, TokenShards

__all__ = [
    "DataConfig",
    "DigitImages",
    "Digits",
    "ImageFolder",
    "Mnist",
    "Photos",
    "Scene",
    "SceneCaptions",
    "SceneEdits",
    "SceneObject",
    "Scenes",
    "ShardManifest",
    "ShardWriter",
    "Shapes",
    "TokenShards",
    "build_dataset",
    "photo_files",
]
