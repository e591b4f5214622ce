"""Training objectives of both generator families, with a switchable token loss: CE, label smoothing or SNCE.

Every loss goes through a fused linear path (``snce.functional``): the model's hidden states and head weight
go in, and the (tokens x K) logits are never held at once (only row blocks of them).

    kind               per-token target                                     function
    "ce"               one-hot(y)                                           fused_linear_cross_entropy
    "label_smoothing"  (1 - eps) one-hot(y) + eps / K                       fused_linear_cross_entropy
    "snce"             q_k = softmax_k(-d(z, e_k) / tau) over the codebook  fused_linear_snce_loss

SNCE takes z from the shards' continuous latents (``targets="latents"``) or, for pre-tokenized data, z = e_y
(``targets="codes"``; with ``topk`` the targets come from a NeighborTable built once per run).

Two controls separate SNCE's geometry from its softness. ``shuffle_neighbors`` (with kind "snce") moves each
token's q by a fixed per-code permutation pi_y with pi_y(y) = y (:class:`snce.losses.NeighborShuffle`): the same
mass on y and the same entropy, on codes unrelated to y. Label smoothing matched in entropy to SNCE is kind
"label_smoothing" with ``label_smoothing = smoothing_for_entropy(target_entropy(...), K)``, computed by the
caller (``snce.functional``).

The autoregressive loss covers every token; the masked-diffusion loss covers the masked tokens of a random
corruption (``MaskedDiffusionTransformer.corrupt``), optionally MDLM-weighted.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from snce.config import Config, ConfigError
from snce.functional import fused_linear_cross_entropy, fused_linear_snce_loss, suggest_tau
from snce.generators.autoregressive import AutoregressiveTransformer
from snce.generators.conditions import Conditioning
from snce.generators.masked_diffusion import MaskedDiffusionTransformer
from snce.losses import NeighborShuffle, NeighborTable, sample_neighbors
from snce.quantize.search import METRICS


@dataclass
class LossConfig(Config):
    """The token loss of a generator run.

    kind: "ce" | "label_smoothing" | "snce". label_smoothing: epsilon for kind="label_smoothing".
    tau: SNCE temperature; None -> ``suggest_tau`` of the codebook (median nearest-neighbour gap, lowered
    where needed so the nearest code keeps a fifth of the target).
    tau_scale: multiplies tau (suggested or given): how a study sweeps around the suggested value.
    metric: SNCE distance, None -> the tokenizer's own metric (keep them equal). topk: keep the k nearest codes.
    targets: "codes" (z = e_y, pre-tokenized data) | "latents" (the shards' continuous latents).
    shuffle_neighbors: the "geometry removed" control (kind="snce" only): each token's SNCE target moved by its
    code's fixed permutation, drawn from ``shuffle_seed``.
    memory_budget_mb: size of the loss's per-block (rows x K) buffers.
    """

    kind: Literal["ce", "label_smoothing", "snce"] = "ce"
    label_smoothing: float = 0.1
    tau: float | None = None
    tau_scale: float = 1.0
    metric: str | None = None
    topk: int | None = None
    targets: Literal["codes", "latents"] = "codes"
    shuffle_neighbors: bool = False
    shuffle_seed: int = 0
    memory_budget_mb: int = 256

    def check(self) -> None:
        if not 0.0 <= self.label_smoothing <= 1.0:
            raise ConfigError("label_smoothing", f"must lie in [0, 1], got {self.label_smoothing}")
        if self.tau is not None and not (math.isfinite(self.tau) and self.tau > 0):
            raise ConfigError(
                "tau", f"must be a finite number > 0 or null (suggested), got {self.tau}"
            )
        if not (math.isfinite(self.tau_scale) and self.tau_scale > 0):
            raise ConfigError("tau_scale", f"must be a finite number > 0, got {self.tau_scale}")
        if self.metric is not None and self.metric not in METRICS:
            raise ConfigError(
                "metric", f"must be one of {METRICS} or null (the tokenizer's), got {self.metric!r}"
            )
        if self.topk is not None and self.topk < 1:
            raise ConfigError("topk", f"must be an int >= 1 or null (all codes), got {self.topk}")
        if self.memory_budget_mb < 1:
            raise ConfigError("memory_budget_mb", f"must be >= 1, got {self.memory_budget_mb}")
        if self.shuffle_neighbors and self.kind != "snce":
            raise ConfigError(
                "shuffle_neighbors", f"shuffles SNCE targets: needs kind 'snce', got kind {self.kind!r}"
            )


class TokenLoss:
    """The loss switch, set up once per run: ``loss(hidden, head_weight, target, latents=None, weight=None)``.

    Args:
        config: a :class:`LossConfig`.
        codebook: (K, D) the tokenizer's effective codebook (``quantizer.codebook``); needed for "snce".
        metric: the tokenizer's assignment metric; SNCE uses it unless ``config.metric`` overrides it.
        has_latents: whether the training data carries latents (checked against ``targets="latents"``).
    Attributes ``tau``, ``metric``, ``table`` and ``shuffle`` hold what was resolved (tau after suggestion and
    scaling; ``shuffle`` a NeighborShuffle when ``config.shuffle_neighbors``).
    """

    def __init__(
        self,
        config: LossConfig,
        codebook: torch.Tensor | None = None,
        metric: str | None = None,
        *,
        has_latents: bool = False,
    ):
        if not isinstance(config, LossConfig):
            raise TypeError(f"config must be a LossConfig, got {type(config).__name__}")
        self.config = config
        self.codebook, self.tau, self.metric, self.table, self.shuffle = None, None, None, None, None
        self.memory_budget = config.memory_budget_mb * 2**20
        if config.kind != "snce":
            return
        if not (torch.is_tensor(codebook) and codebook.dim() == 2 and codebook.is_floating_point()):
            raise ValueError(
                "loss kind 'snce' needs the tokenizer's codebook: a floating (K, D) tensor"
            )
        if config.targets == "latents" and not has_latents:
            raise ValueError(
                "loss.targets='latents' needs shards that hold latents (tokenize with latents on), "
                "or use loss.targets='codes'"
            )
        self.metric = config.metric or metric
        if self.metric not in METRICS:
            raise ValueError(
                f"metric must be one of {METRICS} (loss.metric or the tokenizer's), got {self.metric!r}"
            )
        self.codebook = codebook.detach().to(_at_least_fp32(codebook.dtype))
        base = config.tau if config.tau is not None else suggest_tau(self.codebook, self.metric)
        self.tau = float(base) * config.tau_scale
        if config.targets == "codes" and config.topk is not None:
            self.table = NeighborTable.build(self.codebook, config.topk, self.tau, self.metric)
        if config.shuffle_neighbors:
            self.shuffle = NeighborShuffle(self.codebook.shape[0], config.shuffle_seed)

    @property
    def num_codes(self) -> int | None:
        return None if self.codebook is None else self.codebook.shape[0]

    def to(self, device) -> TokenLoss:
        """Move the codebook, the table and the shuffle to ``device`` (in place); returns self."""
        if self.codebook is not None:
            self.codebook = self.codebook.to(device)
        if self.table is not None:
            self.table = self.table.to(device)
        if self.shuffle is not None:
            self.shuffle = self.shuffle.to(device)
        return self

    @torch.no_grad()
    def sample_targets(
        self,
        target: torch.Tensor,
        num_codes: int,
        latents: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """One code per token drawn from the distribution this loss trains towards: target (N,) long -> (N,).

        "ce": the target itself; "label_smoothing": a uniformly random code with probability epsilon, else the
        target; "snce": a draw from q (:func:`snce.losses.sample_neighbors`, shuffled when the loss is). Decoding
        such draws shows what a generator that learned its training target exactly would produce.
        """
        cfg = self.config
        if cfg.kind == "ce":
            return target.clone()
        if cfg.kind == "label_smoothing":
            uniform = torch.randint(
                0, num_codes, target.shape, generator=generator, device=target.device
            )
            smoothed = (
                torch.rand(target.shape, generator=generator, device=target.device)
                < cfg.label_smoothing
            )
            return torch.where(smoothed, uniform, target)
        if self.table is not None:
            index, probs = self.table.lookup(target)  # (N, k)
            drawn = index.gather(1, torch.multinomial(probs, 1, generator=generator))
            drawn = drawn if self.shuffle is None else self.shuffle.permute(drawn, target)
            return drawn[:, 0]
        return sample_neighbors(
            target, self.codebook, tau=self.tau, metric=self.metric,
            latents=latents if cfg.targets == "latents" else None, topk=cfg.topk, shuffle=self.shuffle,
            generator=generator,
        )  # fmt: skip

    def describe(self) -> dict:
        """What the run trains with, for logs and reports."""
        d = {"kind": self.config.kind}
        if self.config.kind == "label_smoothing":
            d["label_smoothing"] = self.config.label_smoothing
        if self.config.kind == "snce":
            d.update(
                tau=self.tau, metric=self.metric, topk=self.config.topk, targets=self.config.targets
            )
        if self.shuffle is not None:  # absent otherwise, so earlier runs' descriptions stay as they were
            d.update(shuffle_neighbors=True, shuffle_seed=self.shuffle.seed)
        return d

    def __call__(
        self, hidden, head_weight, target, latents=None, weight=None, reduction: str = "mean"
    ):
        """hidden (N, H), head_weight (K, H), target (N,) long, latents (N, D) or None, weight (N,) or None."""
        cfg = self.config
        if cfg.kind != "snce":
            smoothing = cfg.label_smoothing if cfg.kind == "label_smoothing" else 0.0
            return fused_linear_cross_entropy(
                hidden,
                head_weight,
                target,
                label_smoothing=smoothing,
                weight=weight,
                reduction=reduction,
                memory_budget=self.memory_budget,
            )
        if self.num_codes != head_weight.shape[0]:
            raise ValueError(
                f"the generator predicts {head_weight.shape[0]} codes but the tokenizer's codebook has {self.num_codes}"
            )
        if cfg.targets == "latents":
            if latents is None:
                raise ValueError("loss.targets='latents' but the batch holds no latents")
            latents = latents.to(_at_least_fp32(latents.dtype))
        else:
            latents = None
        if self.table is not None:
            return fused_linear_snce_loss(
                hidden,
                head_weight,
                target,
                table=self.table,
                shuffle=self.shuffle,
                metric=self.metric,
                weight=weight,
                reduction=reduction,
                memory_budget=self.memory_budget,
            )
        return fused_linear_snce_loss(
            hidden,
            head_weight,
            target,
            codebook=self.codebook,
            latents=latents,
            tau=self.tau,
            metric=self.metric,
            topk=cfg.topk,
            shuffle=self.shuffle,
            weight=weight,
            reduction=reduction,
            memory_budget=self.memory_budget,
        )


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The generator inside a DistributedDataParallel (``.module``) wrapper, or the model itself."""
    return getattr(model, "module", model)


def loss_terms(model, tokens, classes, latents=None, generator=None):
    """Run ``model`` on one batch and return what the token loss needs, for either family.

    ``model`` may be DDP-wrapped: it is called, not bypassed. tokens: (B, h, w) or (B, N) code indices; classes:
    (B,) labels or None, or a :class:`Conditioning` (text / edit models); latents: (B, h, w, D) / (B, N, D) or
    None. ``generator`` drives the masked-diffusion corruption (None: the global RNG). Returns (hidden (M, H),
    head_weight (K, H), target (M,), latents (M, D) or None, weight (M,) or None) over the M tokens that carry a
    loss (all of them for AR, the masked ones otherwise).
    """
    core = unwrap(model)
    B = tokens.shape[0]
    tokens = tokens.reshape(B, -1).long()
    if latents is not None:
        latents = latents.reshape(B, tokens.shape[1], -1)
    if isinstance(core, AutoregressiveTransformer):
        hidden = model(tokens, classes)  # (B, N, H)
        z = None if latents is None else latents.reshape(-1, latents.shape[-1])
        return hidden.reshape(-1, hidden.shape[-1]), core.head_weight, tokens.reshape(-1), z, None
    if isinstance(core, MaskedDiffusionTransformer):
        inputs, masked, weight = core.corrupt(tokens, generator)
        hidden = model(inputs, classes)  # (B, N, H)
        w = None if core.config.weighting == "none" else weight[:, None].expand_as(masked)[masked]
        z = None if latents is None else latents[masked]
        return hidden[masked], core.head_weight, tokens[masked], z, w
    raise TypeError(f"model must be a snce generator, got {type(core).__name__}")


def generator_loss(
    model, tokens, classes, loss: TokenLoss, latents=None, generator=None
) -> torch.Tensor:
    """Mean training loss of one batch (arguments as :func:`loss_terms`)."""
    hidden, head_weight, target, z, w = loss_terms(model, tokens, classes, latents, generator)
    return loss(hidden, head_weight, target, latents=z, weight=w)


@torch.no_grad()
def validation_loss(
    model,
    tokens: torch.Tensor,
    classes: torch.Tensor | None,
    loss: TokenLoss,
    latents: torch.Tensor | None = None,
    *,
    batch_size: int = 256,
    seed: int = 0,
) -> float:
    """Mean per-token loss over a held-out set in eval mode (no dropout, no class dropout).

    The masked-diffusion corruption is drawn from a generator seeded with ``seed``, so checkpoints are compared on
    the same masks. Use a "ce" loss for the hard NLL (nats/token) and an "snce" loss for the soft NLL.
    """
    core = unwrap(model)
    was_training = core.training
    core.eval()
    device = core.head_weight.device
    gen = torch.Generator(device=device).manual_seed(seed)
    total, count = 0.0, 0
    for start in range(0, tokens.shape[0], batch_size):
        sl = slice(start, start + batch_size)
        c = None if classes is None else classes[sl].to(device)
        z = None if latents is None else latents[sl].to(device)
        hidden, head_weight, target, z, w = loss_terms(core, tokens[sl].to(device), c, z, gen)
        total += float(loss(hidden, head_weight, target, latents=z, weight=w, reduction="sum"))
        count += target.numel()
    core.train(was_training)
    return total / max(count, 1)


class GeneratorObjective:
    """``loss_fn(model, batch, step) -> (loss, logs)`` in the form ``snce.train.Trainer`` takes.

    Batches are token-shard items collated: ``{"indices": (B, N), "label": (B,)[, "latents": (B, N, D)]}``;
    labels are used when the model is class-conditional, latents when the loss asks for them. Text models read
    ``"text"`` (B, L, E) and ``"text_mask"`` (B, L) as well, editing models also ``"source"`` (B, N)
    (:meth:`Conditioning.from_batch`).
    """

    def __init__(self, loss: TokenLoss):
        if not isinstance(loss, TokenLoss):
            raise TypeError(f"loss must be a TokenLoss, got {type(loss).__name__}")
        self.loss = loss

    def __call__(self, model, batch: dict, step: int):
        tokens = batch["indices"]
        self.loss.to(tokens.device)
        config = unwrap(model).config
        if config.condition == "class":
            classes = batch["label"] if config.num_classes > 0 else None
        else:
            classes = Conditioning.from_batch(batch, config.condition)
        latents = batch.get("latents") if self.loss.config.targets == "latents" else None
        return generator_loss(model, tokens, classes, self.loss, latents), {}
