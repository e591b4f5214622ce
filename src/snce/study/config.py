"""Configuration of a CE-vs-SNCE study (``snce study --config configs/study/digits.yaml``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from snce.config import Config, ConfigError, apply_override, parse_override
from snce.data import DataConfig
from snce.generators import FAMILIES, PRESETS
from snce.tokenizer import LossConfig as TokenizerLossConfig
from snce.tokenizer import TokenizerConfig
from snce.train import TrainConfig
from snce.train.generator import SampleConfig


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, **kw})


@dataclass
class StudyTokenizer(Config):
    """How each codebook size's tokenizer is trained; ``model.quantizer.codebook_size`` is set per K."""

    model: TokenizerConfig = field(default_factory=TokenizerConfig)
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    train: TrainConfig = field(default_factory=lambda: _train(steps=500, batch_size=64, lr=1e-3))


@dataclass
class StudyGenerator(Config):
    """The generators compared; every run of a family gets the same architecture, seed and budget.

    preset: a named size (tiny, small, B, L); model: overrides of that preset (dim, n_layers, dropout, ...).
    """

    families: tuple[str, ...] = ("autoregressive", "masked_diffusion")
    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(default_factory=lambda: _train(steps=400, batch_size=64, lr=1e-3))

    def check(self) -> None:
        for f in self.families:
            if f not in FAMILIES:
                raise ConfigError("families", f"expected names from {sorted(FAMILIES)}, got {f!r}")
        if not self.families:
            raise ConfigError("families", "needs at least one generator family")
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"expected one of {sorted(PRESETS)}, got {self.preset!r}")


@dataclass
class StudyLoss(Config):
    """The losses compared: CE, and SNCE at ``suggest_tau`` times each of ``tau_scales``.

    targets "codes": q around the code embedding e_y (pre-tokenized data); "latents": around the encoder's
    continuous latent z (shards store latents). topk: keep the k nearest codes (null: the full codebook).
    """

    tau_scales: tuple[float, ...] = (0.5, 1.0, 2.0)
    targets: str = "codes"
    topk: int | None = None

    def check(self) -> None:
        if not self.tau_scales or any(not s > 0 for s in self.tau_scales):
            raise ConfigError(
                "tau_scales", f"expected positive numbers, got {list(self.tau_scales)}"
            )
        if self.targets not in ("codes", "latents"):
            raise ConfigError("targets", f"expected 'codes' or 'latents', got {self.targets!r}")


@dataclass
class StudyEval(Config):
    """Evaluation every ``every`` generator steps (and at the last step).

    num_samples: images sampled per evaluation (classes cycled 0, 1, ...; the same sampling seed every time),
    with the ``sample`` settings (CFG scale, temperature, masked-diffusion steps).
    inception_weights: a local FID Inception-v3 file (else $SNCE_INCEPTION_WEIGHTS, else the built-in domain
    classifier trained on the real images). nll_samples: held-out token grids for the validation NLL.
    grid_samples: images in each run's final sample grid.
    """

    every: int = 100
    num_samples: int = 300
    sample: SampleConfig = field(default_factory=SampleConfig)
    inception_weights: str | None = None
    domain_steps: int = 300
    domain_width: int = 32
    nll_samples: int = 300
    grid_samples: int = 40
    num_real: int | None = (
        None  # real training images the metrics compare with (evenly spaced); null = all
    )

    def check(self) -> None:
        for name in ("every", "num_samples", "nll_samples", "grid_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_real is not None and self.num_real < 8:
            raise ConfigError("num_real", f"must be >= 8 or null (all), got {self.num_real}")
        if self.num_samples < 8:
            raise ConfigError(
                "num_samples", f"must be >= 8 for FID/KID/precision-recall, got {self.num_samples}"
            )


@dataclass
class StudyConfig(Config):
    """A study: for each K, a tokenizer, then CE and SNCE generators of each family, evaluated over steps.

    quick: overrides (dotted key -> value) applied by ``--quick``, for a smoke run of a few minutes.
    """

    out_dir: str = "runs/study"
    seed: int = 0
    device: str = "auto"
    data: DataConfig = field(default_factory=DataConfig)
    codebook_sizes: tuple[int, ...] = (256, 4096, 16384)
    tokenizer: StudyTokenizer = field(default_factory=StudyTokenizer)
    generator: StudyGenerator = field(default_factory=StudyGenerator)
    loss: StudyLoss = field(default_factory=StudyLoss)
    eval: StudyEval = field(default_factory=StudyEval)
    quick: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.codebook_sizes or any(k < 2 for k in self.codebook_sizes):
            raise ConfigError(
                "codebook_sizes", f"expected sizes >= 2, got {list(self.codebook_sizes)}"
            )
        if len(set(self.codebook_sizes)) != len(self.codebook_sizes):
            raise ConfigError(
                "codebook_sizes", f"must be distinct, got {list(self.codebook_sizes)}"
            )


def load_study_config(path, overrides=(), *, quick: bool = False) -> StudyConfig:
    """YAML file -> (with ``quick``: its ``quick:`` overrides) -> ``--set`` overrides -> StudyConfig.

    Keys and types are checked at each layer, so an error names the key wherever it came from.
    """
    if not Path(path).is_file():
        raise ConfigError("", f"config file {str(path)!r} does not exist")
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError("", f"config file {str(path)!r} must hold a mapping at the top level")
    quick_overrides = data.get("quick") or {}
    if not isinstance(quick_overrides, dict):
        raise ConfigError(
            "quick", f"expected a mapping of dotted keys to values, got {quick_overrides!r}"
        )
    if quick:
        for key, value in quick_overrides.items():
            apply_override(data, StudyConfig, key, _as_text(value))
    for item in overrides:
        apply_override(data, StudyConfig, *parse_override(item))
    return StudyConfig.from_dict(data)


def _as_text(value) -> str:
    """A YAML value back to the text form ``apply_override`` parses."""
    import yaml

    return (
        value
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )
