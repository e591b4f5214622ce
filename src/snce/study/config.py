"""Configuration of a CE-vs-SNCE study (``snce study --config configs/study/mnist.yaml``).

A study is a grid run with one protocol: for every *setting* (a tokenizer: quantizer and metric) and codebook
size K, one tokenizer is trained; on its tokens, every generator *family* is trained once per *arm* (loss)
and *seed*. Seed s of every arm shares the generator's initial weights, the data order, the masking and the
sampling noise, so arms are compared paired by seed. The arms:

    ce               cross-entropy on the one-hot target (the baseline every arm is compared with)
    ls               uniform label smoothing, epsilon = loss.label_smoothing (0.1, MaskGIT's recipe)
    ls_matched       label smoothing whose target entropy equals the mean entropy of the snce targets
    snce             SNCE at the suggested tau (1x), targets around the code embedding e_y: the pre-registered
                     headline arm (never chosen by the reported metric)
    snce_shuffled    snce's targets with each code's neighbour probabilities moved to a random permutation of
                     the codes (fixed per code): same entropy and true-code mass, no geometry
    snce_latents     SNCE at the suggested tau of the latents, targets around the continuous latent z (the
                     paper's setting)
    snce_tau{s}x     snce at s times the suggested tau (e.g. snce_tau0.5x): the tau sweep, reported apart; a tau
                     is selected on the val split with other sampling seeds, never on the reported metric
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import yaml

from snce.config import Config, ConfigError, apply_override, parse_override
from snce.data import DataConfig
from snce.generators import FAMILIES, PRESETS
from snce.tokenizer import LossConfig as TokenizerLossConfig
from snce.tokenizer import TokenizerConfig, TokenizerRunConfig
from snce.train import TrainConfig
from snce.train.generator import SampleConfig

FIXED_ARMS = ("ce", "ls", "ls_matched", "snce", "snce_shuffled", "snce_latents")
SWEEP_ARM = re.compile(r"snce_tau(?P<scale>[0-9]*\.?[0-9]+)x")


def arm_tau_scale(arm: str) -> float | None:
    """The tau scale of an SNCE-on-codes arm (snce: 1, snce_tau{s}x: s); None for every other arm."""
    if arm == "snce":
        return 1.0
    match = SWEEP_ARM.fullmatch(arm)
    return float(match["scale"]) if match else None


def check_arm(arm: str, key: str = "arms") -> None:
    if arm in FIXED_ARMS:
        return
    scale = arm_tau_scale(arm)
    if scale == 1.0:
        raise ConfigError(key, f"{arm!r} is the arm 'snce' (tau 1x); list it as 'snce'")
    if scale is None or not scale > 0:
        raise ConfigError(
            key,
            f"unknown arm {arm!r}; expected one of {', '.join(FIXED_ARMS)} or snce_tau<s>x (s > 0)",
        )


def _train(**kw) -> TrainConfig:
    return TrainConfig(**{"progress": False, "tensorboard": False, **kw})


@dataclass
class StudyTokenizerModel(TokenizerConfig):
    """A tokenizer model whose quantizer gets its K (and maybe its kind) from each setting: the quantizer
    options are checked per (setting, K), in :meth:`StudyConfig.check_tokenizers`."""

    def check_quantizer(self) -> None:
        pass


@dataclass
class StudyTokenizer(Config):
    """How every tokenizer of the study is trained; a setting's ``quantizer`` and K are merged in per run."""

    model: StudyTokenizerModel = field(
        default_factory=lambda: StudyTokenizerModel(in_channels=1)
    )  # grey
    loss: TokenizerLossConfig = field(default_factory=TokenizerLossConfig)
    train: TrainConfig = field(default_factory=lambda: _train(steps=500, batch_size=64, lr=1e-3))


@dataclass
class StudySetting(Config):
    """One tokenizer kind of the study and what is trained on its tokens.

    name: a short label used in directory names and the report (e.g. "vq", "ibq"): one tokenizer kind, trained
        once per K. Settings may share a name (and quantizer) to run other arms or families on the same
        tokenizers (e.g. the tau sweep for one family only).
    quantizer: with a ``kind``, the quantizer itself (e.g. {kind: ibq}); without, overrides of
        ``tokenizer.model.quantizer`` (e.g. {metric: cosine}). codebook_size comes from K.
    model: overrides of ``tokenizer.model`` other than its quantizer, e.g. {latent_channels: 32} (the code
        dimension: a dot-product quantizer such as IBQ can only ever pick codes on its codebook's convex hull,
        which at 8 dimensions holds about a fifth of 4,096 Gaussian codes).
    families: generator families trained on it. arms: the arms run here (empty: the study's ``loss.arms``).
    """

    name: str = "vq"
    quantizer: dict = field(default_factory=dict)
    model: dict = field(default_factory=dict)
    codebook_sizes: tuple[int, ...] = (1024,)
    families: tuple[str, ...] = ("autoregressive", "masked_diffusion")
    arms: tuple[str, ...] = ()

    def quantizer_config(self, base: dict) -> dict:
        """This setting's quantizer config, given the study's ``tokenizer.model.quantizer``."""
        return dict(self.quantizer) if "kind" in self.quantizer else {**base, **self.quantizer}

    def check(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", self.name):
            raise ConfigError(
                "name", f"must be letters, digits, '_', '-' or '.', got {self.name!r}"
            )
        if not self.codebook_sizes or any(k < 2 for k in self.codebook_sizes):
            raise ConfigError(
                "codebook_sizes", f"expected sizes >= 2, got {list(self.codebook_sizes)}"
            )
        if len(set(self.codebook_sizes)) != len(self.codebook_sizes):
            raise ConfigError(
                "codebook_sizes", f"must be distinct, got {list(self.codebook_sizes)}"
            )
        if not self.families:
            raise ConfigError("families", "needs at least one generator family")
        for f in self.families:
            if f not in FAMILIES:
                raise ConfigError("families", f"expected names from {sorted(FAMILIES)}, got {f!r}")
        allowed = {f.name for f in fields(TokenizerConfig)} - {"quantizer"}
        unknown = sorted(set(self.model) - allowed)
        if unknown:
            raise ConfigError(
                "model",
                f"unknown key {unknown[0]!r}; expected tokenizer model keys: {', '.join(sorted(allowed))}",
            )
        for arm in self.arms:
            check_arm(arm)
        if self.arms and "ce" not in self.arms:
            raise ConfigError(
                "arms", "must include 'ce': every arm is compared with CE, seed by seed"
            )


@dataclass
class StudyGenerator(Config):
    """The generators: every run of a family gets the same architecture and budget.

    preset: a named size (tiny, small, B, L); model: overrides of it (dim, n_layers, dropout, ...). The
    study's schedule is warmup then constant learning rate, so a checkpoint does not depend on the budget.
    """

    preset: str = "tiny"
    model: dict = field(default_factory=dict)
    train: TrainConfig = field(
        default_factory=lambda: _train(steps=400, batch_size=64, lr=1e-3, schedule="constant")
    )

    def check(self) -> None:
        if self.preset not in PRESETS:
            raise ConfigError("preset", f"expected one of {sorted(PRESETS)}, got {self.preset!r}")


@dataclass
class StudyLoss(Config):
    """The arms compared (see the module docstring) and their shared settings.

    topk: keep the k nearest codes in every SNCE arm (null: the full codebook).
    """

    arms: tuple[str, ...] = ("ce", "ls", "ls_matched", "snce", "snce_shuffled")
    label_smoothing: float = 0.1
    topk: int | None = None

    def check(self) -> None:
        if not self.arms or "ce" not in self.arms:
            raise ConfigError(
                "arms", "must include 'ce': every arm is compared with CE, seed by seed"
            )
        for arm in self.arms:
            check_arm(arm)
        if not 0 < self.label_smoothing < 1:
            raise ConfigError("label_smoothing", f"must lie in (0, 1), got {self.label_smoothing}")
        if self.topk is not None and self.topk < 1:
            raise ConfigError("topk", f"must be >= 1 or null, got {self.topk}")


@dataclass
class StudyEval(Config):
    """How runs are measured.

    Every ``every`` generator steps (and at the last step) ``num_samples`` images are sampled (classes
    balanced, the run's test sampling seed) and compared with the held-out *test* split, which neither the
    tokenizer, the generator nor the feature network saw: FID with a ``bootstrap`` interval, KID,
    precision/recall, class consistency, code usage, and the held-out NLL on ``nll_samples`` test images'
    tokens. At the last step the run is also sampled with its *val* seed and compared with the val split
    (``val_fid``): the only number a tau is ever selected by.
    The feature network: Inception-v3 from ``inception_weights`` (or $SNCE_INCEPTION_WEIGHTS), else the
    built-in domain classifier trained on ``feature_images`` training images.
    """

    every: int = 50
    num_samples: int = 2000
    bootstrap: int = 200
    confidence: float = 0.95
    sample: SampleConfig = field(default_factory=SampleConfig)
    inception_weights: str | None = None
    feature_images: int = 10000
    domain_steps: int = 300
    domain_width: int = 32
    nll_samples: int = 2000
    grid_samples: int = 40

    def check(self) -> None:
        for name in (
            "every",
            "nll_samples",
            "grid_samples",
            "feature_images",
            "domain_steps",
            "domain_width",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        if self.num_samples < 8:
            raise ConfigError(
                "num_samples", f"must be >= 8 for FID/KID/precision-recall, got {self.num_samples}"
            )
        if self.bootstrap < 0 or self.bootstrap == 1:
            raise ConfigError("bootstrap", f"must be 0 (no interval) or >= 2, got {self.bootstrap}")
        if not 0 < self.confidence < 1:
            raise ConfigError("confidence", f"must lie in (0, 1), got {self.confidence}")


@dataclass
class StudyConfig(Config):
    """A study: tokenizers per (setting, K), then generators per (family, arm, seed), evaluated over steps.

    seed: the tokenizers' and the feature network's seed. seeds: the generator seeds (>= 3 for intervals
    worth reading; 1 gives numbers but no verdicts). workers: runs trained at once, each in its own process
    with one thread (2 on a 2-core CPU; 1 runs in this process, as under torchrun).
    quick: overrides (dotted key -> value) applied by ``--quick``, for a smoke run of a few minutes.
    """

    out_dir: str = "runs/study"
    seed: int = 0
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"
    workers: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: StudyTokenizer = field(default_factory=StudyTokenizer)
    settings: tuple[StudySetting, ...] = (StudySetting(),)
    generator: StudyGenerator = field(default_factory=StudyGenerator)
    loss: StudyLoss = field(default_factory=StudyLoss)
    eval: StudyEval = field(default_factory=StudyEval)
    quick: dict = field(default_factory=dict)

    def check(self) -> None:
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds", f"expected distinct seeds, got {list(self.seeds)}")
        if self.workers < 1:
            raise ConfigError("workers", f"must be >= 1, got {self.workers}")
        if not self.settings:
            raise ConfigError("settings", "needs at least one tokenizer setting")
        kinds = {}
        for s in self.settings:  # a name is one tokenizer kind: settings may share it to split arms
            kind = (s.quantizer_config(self.tokenizer.model.quantizer), s.model)
            if kinds.setdefault(s.name, kind) != kind:
                raise ConfigError(
                    "settings",
                    f"settings named {s.name!r} have different tokenizers (quantizer, model: {kinds[s.name]} and "
                    f"{kind}); a name is one tokenizer kind: give the other one its own name",
                )
        runs = [
            (s.name, K, f, arm)
            for s in self.settings for K in s.codebook_sizes for f in s.families for arm in self.arms(s)
        ]  # fmt: skip
        repeated = sorted({r for r in runs if runs.count(r) > 1})
        if repeated:
            raise ConfigError(
                "settings",
                f"(name, K, family, arm) {repeated[0]} is planned by two settings; keep one",
            )

        self.check_tokenizers()
        if self.eval.every > self.generator.train.steps:
            raise ConfigError(
                "eval.every",
                f"{self.eval.every} is more than generator.train.steps ({self.generator.train.steps}): runs "
                "would be measured once; the protocol wants >= 8 evaluations per run",
            )

    def tokenizer_run(self, setting: StudySetting, K: int, out_dir: str = "") -> TokenizerRunConfig:
        """The tokenizer run of (setting, K): the study's tokenizer settings with this setting's quantizer."""
        t = self.tokenizer
        quantizer = {**setting.quantizer_config(t.model.quantizer), "codebook_size": K}
        model = TokenizerConfig(**{**asdict(t.model), **setting.model, "quantizer": quantizer})
        train = replace(
            t.train, out_dir=out_dir or t.train.out_dir, seed=self.seed, device=self.device
        )
        return TokenizerRunConfig(data=self.data, model=model, loss=t.loss, train=train)

    def check_tokenizers(self) -> None:
        """Every tokenizer's run checks (data channels and size vs the model) and quantizer options, before any
        work: a bad value stops here, naming the key, not after the first tokenizer has trained."""
        for setting in self.settings:
            for K in setting.codebook_sizes:
                run = self.tokenizer_run(setting, K)
                try:  # validated as `snce tokenizer train` would validate it: model, quantizer, data
                    type(run).from_dict(run.to_dict())
                except ConfigError as e:
                    if e.key.startswith("data."):
                        raise ConfigError(e.key, e.message) from None
                    if e.key.startswith("model.quantizer") and "kind" in setting.quantizer:
                        raise ConfigError(
                            "settings", f"quantizer of setting {setting.name!r}: {e.message}"
                        ) from None
                    raise ConfigError(f"tokenizer.{e.key}", e.message) from None

    def evaluations(self) -> int:
        """Evaluations per run: every ``eval.every`` steps (the last step is always one)."""
        return self.generator.train.steps // self.eval.every

    def arms(self, setting: StudySetting) -> tuple[str, ...]:
        """The arms run on ``setting``'s tokens."""
        return setting.arms or self.loss.arms


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
    return (
        value
        if isinstance(value, str)
        else yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
    )
