"""The shared training loop (tokenizer and generators), its checkpoints, DDP helpers and image grids."""

from snce.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from snce.train.distributed import DistInfo, cleanup_distributed, init_distributed
from snce.train.images import image_grid, save_image_grid
from snce.train.loop import (
    Callback,
    ImageCallback,
    StepSampler,
    TrainConfig,
    Trainer,
    to_device,
    unwrap,
)

__all__ = [
    "Callback",
    "DistInfo",
    "ImageCallback",
    "StepSampler",
    "TrainConfig",
    "Trainer",
    "cleanup_distributed",
    "image_grid",
    "init_distributed",
    "latest_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "save_image_grid",
    "to_device",
    "unwrap",
]
