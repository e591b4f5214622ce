"""VQGAN-style image tokenizer over any snce quantizer: model, losses, training, evaluation, tokenization."""

from snce.tokenizer.discriminator import PatchDiscriminator, hinge_d_loss, hinge_g_loss
from snce.tokenizer.losses import LossConfig, TokenizerObjective, adaptive_weight
from snce.tokenizer.model import Encoded, Tokenizer, TokenizerConfig, TokenizerOutput
from snce.tokenizer.pipeline import (
    TokenizerRunConfig,
    evaluate_tokenizer,
    load_data_config,
    psnr,
    ssim,
    tokenize_dataset,
    train_tokenizer,
)

__all__ = [
    "Encoded",
    "LossConfig",
    "PatchDiscriminator",
    "Tokenizer",
    "TokenizerConfig",
    "TokenizerObjective",
    "TokenizerOutput",
    "TokenizerRunConfig",
    "adaptive_weight",
    "evaluate_tokenizer",
    "hinge_d_loss",
    "hinge_g_loss",
    "load_data_config",
    "psnr",
    "ssim",
    "tokenize_dataset",
    "train_tokenizer",
]
