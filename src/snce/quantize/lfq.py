"""Lookup-free quantization (LFQ; Yu et al., "Language Model Beats Diffusion", arXiv 2310.05737), as in
Open-MAGVIT2 (Luo et al., arXiv 2409.04410; TencentARC SEED-Voken).

Each of the D latent channels is quantized to its sign; the code is the bit pattern, channel 0 the least
significant bit. There is nothing to learn and no search:

    c_d = +1 if z_d > 0 else -1        (z_d == 0 -> -1, as the original's ``where(z > 0, 1, -1)``)
    k   = sum_d [z_d > 0] 2^d          K = 2^D codes
    z_q = z + sg(c - z)                straight-through (the original applies it in eval too)
    loss = commitment_weight * mean((z - c)^2)

The implicit codebook (K, D) holds the +-1 vector of every index, in index order. Under the metric
"dot" (score z.c_k) the nearest code is the sign code: z.c_k = sum_d z_d c_kd is largest when every
c_kd has the sign of z_d, so :func:`snce.quantize.nearest_code`, SNCE targets and NeighborTable built
from (``codebook``, ``metric``) reproduce the assignment. Exact ties: a channel with z_d == 0 adds +-0 to
every score, so the codes that differ only there tie exactly, and the search breaks ties towards the
lower index, i.e. bit d = 0, code -1: the original's choice. In float32 the scores are rounded sums, so a
channel with |z_d| below about one ulp of ||z||_1 (~1e-6 relative) can tie with, or lose by rounding to,
the code flipping that bit; the search then may differ from the sign in that bit. ``quantize`` always
uses the signs (the original's rule).

Losses: only the commitment term. Open-MAGVIT2 also trains with an entropy penalty over all 2^D codes
(per-sample entropy minus the entropy of the batch-mean distribution, softmax(2 z.c_k / 0.01)); its batch
term needs an (N, 2^D) softmax, so it is left out here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from snce.quantize.base import Quantizer, check_indices, check_nonnegative, straight_through

MAX_BITS = 24  # K = 2^24: the (K, D) table is 1.6 GB in float32, the usage counts 128 MB


def bits_to_codes(
    indices: torch.Tensor, dim: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Indices (...) -> +-1 code vectors (..., dim): c_d = +1 where bit d of the index is set."""
    bit = torch.arange(dim, device=indices.device)
    return ((indices.long().unsqueeze(-1) >> bit) & 1).to(dtype) * 2 - 1


class LFQuantizer(Quantizer):
    """Sign quantization of D channels to K = 2^D implicit +-1 codes (``metric == "dot"``).

    Args:
        dim: D, the number of bits (1 to 24; Open-MAGVIT2: 18).
        codebook_size: optional; must equal 2 ** dim when given (it is always 2 ** dim).
        commitment_weight: weight of mean((z - sg(c))^2).
        usage_window: batches the reported usage is counted over.
    Shape:
        z: (B, D, H, W) or (B, L, D); see :class:`snce.quantize.base.Quantizer`.
    """

    kind = "lfq"

    def __init__(
        self,
        dim: int,
        *,
        codebook_size: int | None = None,
        commitment_weight: float = 0.25,
        usage_window: int = 100,
    ):
        if isinstance(dim, bool) or not isinstance(dim, int) or not 1 <= dim <= MAX_BITS:
            raise ValueError(
                f"dim (the number of bits) must be an int in [1, {MAX_BITS}], got {dim!r}"
            )
        if codebook_size is not None and codebook_size != 2**dim:
            raise ValueError(
                f"codebook_size must be 2 ** dim = {2**dim} for LFQ (dim={dim}), got {codebook_size!r}"
            )
        config = dict(dim=dim, codebook_size=2**dim, commitment_weight=commitment_weight)
        super().__init__(dim, 2**dim, "dot", config=config, usage_window=usage_window)
        self.commitment_weight = check_nonnegative(commitment_weight, "commitment_weight")
        # 2^d per channel; non-persistent: nothing of LFQ is a weight, checkpoints hold no quantizer key
        self.register_buffer("bit_values", 2 ** torch.arange(dim), persistent=False)
        # the (2^D, D) table: empty until ``codebook`` is first asked for
        self.register_buffer("_codebook", torch.empty(0, dim), persistent=False)

    @property
    def codebook(self) -> torch.Tensor:
        """(2^D, D) +-1 codes in index order, built once (19 MB at D = 18) and then cached."""
        if self._codebook.shape[0] != self.codebook_size:
            # a normal tensor even when first asked for under inference_mode (tokenizing), so that
            # later autograd code (SNCE targets in training) may save it for backward
            with torch.inference_mode(False):
                index = torch.arange(self.codebook_size, device=self._codebook.device)
                self._codebook = bits_to_codes(index, self.dim, self._codebook.dtype)
        return self._codebook

    def quantize(self, z):
        positive = z > 0  # (N, D); z == 0 -> bit 0, code -1
        indices = (positive.long() * self.bit_values).sum(dim=-1)  # (N,) sum_d [z_d > 0] 2^d
        codes = positive.to(z.dtype) * 2 - 1
        commitment = F.mse_loss(z, codes)
        stats = {"commitment": float(commitment.detach())}
        return straight_through(z, codes), indices, self.commitment_weight * commitment, stats

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """Like :meth:`Quantizer.lookup`, from the bits (no table needed)."""
        check_indices(indices, self.codebook_size)
        codes = bits_to_codes(indices, self.dim, self._codebook.dtype)
        return codes.permute(0, 3, 1, 2) if indices.dim() == 3 else codes

    def load_training_state(self, state: dict) -> None:
        self.usage_tracker.load_state_dict(state["usage"], self.bit_values.device)

    def extra_repr(self) -> str:
        return f"bits={self.dim}, codebook_size={self.codebook_size}, metric='dot'"
