"""Regularized VQ (Zhang et al., "Regularized Vector Quantization for Tokenized Image Synthesis", CVPR 2023,
arXiv 2303.06424).

Assignment distribution: snce uses the distance softmax p_i = softmax_k(-d(z_i, e_k) / tau), which keeps the
quantizer's geometry equal to SNCE's (the paper predicts it with an encoder head). With k*_i = argmin_k d:

    prior:  P = mean_i h_i,  h_i = onehot(k*_i) - sg(p_i) + p_i   (value: the code histogram)
            L_prior = KL(P || prior) = sum_k P_k log(P_k / prior_k)     (uniform prior: log K - H(P))
    mask:   in training a random ``mask_ratio`` (0.4) of the tokens use a Gumbel sample from p instead of
            k*: h_i = onehot(k~_i) - sg(y_i) + y_i, y_i = softmax((log p_i + g_i) / gumbel_temperature)
    z_q  = h @ E                     value e_k (sampled or argmax); gradient through the softmaxes to z and E
                                     (no identity straight-through path)
    loss = mean((e_k* - sg(z))^2) + beta mean((sg(e_k*) - z)^2) + prior_weight L_prior

Probabilistic contrastive loss (:meth:`RegularizedQuantizer.contrastive_loss`, called by the tokenizer on
images and reconstructions): PatchNCE between VGG-19 features (relu1_2, relu2_2, relu3_3, relu4_3, relu5_3)
of image and reconstruction at the same ``contrastive_locations`` positions, each positive weighted by
w proportional to ||e_sampled - e_argmax||^2 of the token under it (normalised to sum 1), negatives scaled
by 1 / L. The VGG-19 weights come from a local file (a torchvision-layout state dict); without one the loss
is off, with a warning. Not published, so exposed with snce's defaults: tau, gumbel_temperature,
prior_weight, contrastive_weight, contrastive_temperature (0.07) and contrastive_locations (256).

The (N, K) softmaxes are dense here: use this quantizer for codebooks up to ~16k codes (IBQ is the chunked one).
"""

from __future__ import annotations

import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from snce.quantize.base import Quantizer, check_nonnegative, check_positive_int, vq_losses
from snce.quantize.search import block_scores, code_offsets, nearest_code, to_search_space

PRIOR_EPS = 1e-6  # P_k is clamped to this inside the log, so unused codes get a finite pull
VGG19_LAYERS = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    512,
)
VGG19_TAPS = (
    3,
    8,
    13,
    22,
    31,
)  # indices of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 in ``features``


class RegularizedQuantizer(Quantizer):
    """Reg-VQ: prior KL, stochastic (Gumbel) mask, and an optional probabilistic contrastive loss.

    Args:
        dim: D. codebook_size: K. metric: "l2" | "cosine" (unit latents and codes).
        beta: commitment weight (0.25).
        tau: temperature of the distance softmax p = softmax(-d / tau).
        prior_weight: weight of KL(P || prior). prior: (K,) prior probabilities (None: uniform); a buffer.
        mask_ratio: fraction of tokens quantized by Gumbel sampling in training (0.4 in the paper).
        gumbel_temperature: temperature of the Gumbel-softmax relaxation of the sampled tokens.
        contrastive_weight: weight of :meth:`contrastive_loss`. perceptual_weights: path of a local VGG-19
            state dict (torchvision key layout); None turns the contrastive loss off.
        contrastive_temperature: PatchNCE temperature. contrastive_locations: L, positions per image.
        usage_window: batches the reported usage is counted over.
    """

    kind = "regvq"

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        metric: str = "l2",
        beta: float = 0.25,
        tau: float = 1.0,
        prior_weight: float = 0.1,
        prior: torch.Tensor | None = None,
        mask_ratio: float = 0.4,
        gumbel_temperature: float = 1.0,
        contrastive_weight: float = 0.1,
        perceptual_weights: str | None = None,
        contrastive_temperature: float = 0.07,
        contrastive_locations: int = 256,
        usage_window: int = 100,
    ):
        config = dict(
            dim=dim,
            codebook_size=codebook_size,
            metric=metric,
            beta=beta,
            tau=tau,
            prior_weight=prior_weight,
            mask_ratio=mask_ratio,
            gumbel_temperature=gumbel_temperature,
            contrastive_weight=contrastive_weight,
            perceptual_weights=perceptual_weights,
            contrastive_temperature=contrastive_temperature,
            contrastive_locations=contrastive_locations,
        )
        super().__init__(dim, codebook_size, metric, config=config, usage_window=usage_window)
        if metric not in ("l2", "cosine"):
            raise ValueError(
                f"metric must be 'l2' or 'cosine' for RegularizedQuantizer, got {metric!r}"
            )
        self.beta = check_nonnegative(beta, "beta")
        self.prior_weight = check_nonnegative(prior_weight, "prior_weight")
        self.contrastive_weight = check_nonnegative(contrastive_weight, "contrastive_weight")
        for name, value in (
            ("tau", tau),
            ("gumbel_temperature", gumbel_temperature),
            ("contrastive_temperature", contrastive_temperature),
        ):
            if check_nonnegative(value, name) == 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if not (isinstance(mask_ratio, (int, float)) and 0 <= mask_ratio <= 1):
            raise ValueError(f"mask_ratio must be a number in [0, 1], got {mask_ratio!r}")
        self.tau, self.gumbel_temperature = float(tau), float(gumbel_temperature)
        self.mask_ratio = float(mask_ratio)
        self.contrastive_temperature = float(contrastive_temperature)
        self.contrastive_locations = check_positive_int(
            contrastive_locations, "contrastive_locations"
        )

        embed = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        self.embed = nn.Parameter(F.normalize(embed, dim=-1) if metric == "cosine" else embed)
        self.register_buffer("log_prior", _log_prior(prior, codebook_size))
        # The VGG-19 is loaded on the first contrastive_loss call and kept out of the state dict: its weights
        # stay in their file, and a tokenizer loaded for inference never needs it.
        self.perceptual_weights = perceptual_weights
        self._vgg: list[VGG19Features] = []
        if perceptual_weights is None and self.contrastive_weight > 0:
            warnings.warn(
                "RegularizedQuantizer: the probabilistic contrastive loss is off because no perceptual_weights "
                "were given (pass the path of a local VGG-19 state dict to turn it on, or contrastive_weight=0 "
                "to silence this).",
                stacklevel=2,
            )
        self.token_weights: torch.Tensor | None = (
            None  # ||e_sampled - e_argmax||^2, last training batch
        )

    @property
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embed, dim=-1) if self.metric == "cosine" else self.embed

    def quantize(self, z):
        zs = F.normalize(z, dim=-1) if self.metric == "cosine" else z
        codes = self.codebook
        argmax = nearest_code(zs.detach(), codes.detach(), self.metric)
        cs = to_search_space(codes, self.metric)
        log_p = block_scores(
            to_search_space(zs, self.metric),
            cs,
            code_offsets(cs, self.metric),
            self.metric,
            scale=1.0 / self.tau,
        ).log_softmax(dim=-1)  # (N, K)
        p = log_p.exp()
        hard = F.one_hot(argmax, self.codebook_size).to(p.dtype)
        h = hard - p.detach() + p  # straight-through one-hot of the argmax codes
        indices = argmax
        if self.training and self.mask_ratio == 0:
            self.token_weights = torch.zeros(argmax.shape, device=z.device)  # nothing sampled
        if self.training and self.mask_ratio > 0:
            masked = torch.rand(argmax.shape, device=z.device) < self.mask_ratio  # (N,)
            gumbel = -torch.empty_like(log_p).exponential_().log()
            noisy = log_p.detach() + gumbel
            sampled = noisy.argmax(dim=-1)
            y = ((log_p + gumbel) / self.gumbel_temperature).softmax(dim=-1)
            h_sampled = F.one_hot(sampled, self.codebook_size).to(p.dtype) - y.detach() + y
            h = torch.where(masked[:, None], h_sampled, h)
            indices = torch.where(masked, sampled, argmax)
            self.token_weights = (codes[indices] - codes[argmax]).detach().square().sum(-1)  # (N,)
        zq = (h @ codes.float()).to(z.dtype)  # value codes[indices]

        zq_argmax = F.embedding(argmax, codes).to(z.dtype)
        commitment, codebook_loss = vq_losses(zs, zq_argmax)
        post = h.mean(dim=0)  # (K,)
        prior_kl = (post * (post.clamp_min(PRIOR_EPS).log() - self.log_prior)).sum()
        loss = codebook_loss + self.beta * commitment + self.prior_weight * prior_kl
        stats = {
            "commitment": float(commitment.detach()),
            "codebook_loss": float(codebook_loss.detach()),
            "prior_kl": float(prior_kl.detach()),
        }
        # No identity straight-through: z gets gradient through the softmaxes only.
        return zq, indices, loss, stats

    def forward(self, z):
        out = super().forward(z)
        if self.training and self.token_weights is not None:
            self.token_weights = self.token_weights.view(out.indices.shape)  # (B, H, W) or (B, L)
        return out

    def contrastive_loss(self, images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
        """Weighted PatchNCE between VGG-19 features of images and reconstructions, times contrastive_weight.

        images, reconstructions: (B, 3, H, W) in [-1, 1], the batch of the last training forward (its token
        grid gives the positive weights). Returns 0 when the loss is off or no token was sampled away from
        its argmax code.
        """
        if self.perceptual_weights is None or self.contrastive_weight == 0:
            return reconstructions.new_zeros(())
        if images.shape != reconstructions.shape or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(
                f"images and reconstructions must both be (B, 3, H, W), got {tuple(images.shape)} and "
                f"{tuple(reconstructions.shape)}"
            )
        weights = self.token_weights
        if weights is None or weights.dim() != 3 or weights.shape[0] != images.shape[0]:
            raise ValueError(
                "contrastive_loss needs a training forward on (B, D, H, W) latents of the same batch first"
            )
        weights = weights[:, None].float()  # (B, 1, h, w)
        if not self._vgg:
            self._vgg.append(VGG19Features.from_file(self.perceptual_weights))
        vgg = self._vgg[0].to(reconstructions.device)
        with torch.no_grad():
            feats_img = vgg(images)
        feats_rec = vgg(reconstructions)
        total = reconstructions.new_zeros(())
        for f_img, f_rec in zip(feats_img, feats_rec, strict=True):
            total = total + self._patch_nce(f_img, f_rec, weights)
        return self.contrastive_weight * total / len(feats_img)

    def _patch_nce(self, f_img, f_rec, token_weights):
        """One layer: f (B, C, H, W); token_weights (B, 1, h, w) mapped to the layer's grid by nearest pixel."""
        b, c, hgt, wid = f_img.shape
        n_loc = min(self.contrastive_locations, hgt * wid)
        loc = torch.randperm(hgt * wid, device=f_img.device)[:n_loc]
        w = F.interpolate(token_weights, size=(hgt, wid), mode="nearest").flatten(1)[
            :, loc
        ]  # (B, L)
        w_sum = w.sum(dim=1, keepdim=True)
        w = torch.where(w_sum > 0, w / w_sum.clamp_min(1e-12), torch.zeros_like(w))
        q = F.normalize(f_rec.flatten(2)[:, :, loc], dim=1)  # (B, C, L) queries: reconstruction
        k = F.normalize(f_img.flatten(2)[:, :, loc], dim=1)  # (B, C, L) keys: image
        sim = torch.einsum("bci,bcj->bij", q, k) / self.contrastive_temperature  # (B, L, L)
        pos = sim.diagonal(dim1=1, dim2=2)  # (B, L)
        eye = torch.eye(n_loc, dtype=torch.bool, device=sim.device)
        neg = sim.masked_fill(eye, float("-inf")).logsumexp(dim=2) - torch.log(
            torch.tensor(float(n_loc))
        )
        per_loc = torch.logaddexp(pos, neg) - pos  # -log(e^pos / (e^pos + (1/L) sum_neg e^neg))
        return (w * per_loc).sum(dim=1).mean()


class VGG19Features(nn.Module):
    """VGG-19 conv stack (torchvision layout ``features.N``), returning the five tapped ReLU activations."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    def __init__(self):
        super().__init__()
        layers, channels = [], 3
        for v in VGG19_LAYERS:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1), nn.ReLU(inplace=False)]
                channels = v
        self.features = nn.Sequential(*layers[: VGG19_TAPS[-1] + 1])
        self.register_buffer("mean", torch.tensor(self.MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(self.STD).view(1, 3, 1, 1))
        self.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str) -> VGG19Features:
        """Load ``features.*`` weights from a local state-dict file (.pth or .safetensors); never downloads."""
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"perceptual_weights: no file at {path!r} (a local VGG-19 state dict)"
            )
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        model = cls()
        wanted = {
            k: v for k, v in state.items() if k.startswith("features.") and k in model.state_dict()
        }
        missing = [k for k in model.state_dict() if k.startswith("features.") and k not in wanted]
        if missing:
            raise ValueError(
                f"perceptual_weights {path!r} is not a VGG-19 state dict: missing {missing[:3]}..."
            )
        model.load_state_dict(wanted, strict=False)
        return model.eval()

    def train(self, mode: bool = True):
        return super().train(False)  # frozen feature extractor: always eval

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = ((x + 1) / 2 - self.mean) / self.std
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG19_TAPS:
                taps.append(x)
        return taps


def _log_prior(prior: torch.Tensor | None, k: int) -> torch.Tensor:
    if prior is None:
        return torch.full((k,), -torch.log(torch.tensor(float(k))).item())
    if not torch.is_tensor(prior) or prior.shape != (k,) or not bool(torch.isfinite(prior).all()):
        raise ValueError(f"prior must be a finite ({k},) tensor of probabilities, got {prior!r}")
    if bool((prior <= 0).any()) or abs(float(prior.sum()) - 1.0) > 1e-4:
        raise ValueError("prior must be positive and sum to 1")
    return prior.float().log()
