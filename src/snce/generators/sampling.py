"""Samplers for both generator families, with classifier-free guidance (CFG) on logits.

CFG (LlamaGen): the conditional and unconditional (null-condition) branches run as one batch of 2B and combine
as ``uncond + (cond - uncond) * cfg_scale`` (``torch.lerp``). ``cfg_scale=None`` runs the conditional branch
only; ``cfg_scale=1`` runs both and gives the conditional logits exactly (a check of the guided path). The null
condition is the null class (class models), the null text (text models), or the null instruction with the same
source (editing models: guidance on the instruction). Text and edit models take a
:class:`~snce.generators.conditions.Conditioning` in place of the labels.

Drawing a token (:func:`sample_logits`). Rows of logits x (..., K), tempered y = x / temperature, optionally
filtered (top-k, then top-p: :func:`filter_logits`), are sampled by inverting the CDF with ONE uniform number u per
row, in two levels so that no O(K) running sum is needed:

    p_i = exp(y_i - max y)              (0 for filtered tokens; float32, one exp2 pass)
    S_b = sum of p over segment b       (segments of L ~ sqrt(K) codes; vectorised float32 sums)
    pick segment b with  C_{b-1} <= u * S < C_b,  C = cumsum(S_b) in float64, S = C_last
    pick code j in b by the float64 cumsum of p over that one segment, with u's remainder rescaled to it
    log p(token) = y_token - max y - log S

Accuracy: each token is drawn with probability (S_b / S) (p_j / sum_b p), i.e. p_j / S up to the float32 rounding
of p_j and S_b (relative errors of order 1e-6, as in any float32 softmax, whatever K and wherever j lies in the
row; the uniform has 53 bits).
A flat float32 cumsum over K codes would instead carry an absolute error of ~2^-24 of the whole row's mass at
every position (enough to distort the many tiny probabilities of a 262,144-code row); the float64 segment-level
cumsum avoids it at no cost. A token with p = 0 (filtered, or exp underflow) is never drawn: the search only
lands on strictly increasing cumulative sums. Every random number comes from ``generator`` (one float64 uniform
per row, drawn before the rows are split into blocks), so a seed fixes the samples whatever the block size.

Cost and memory: about one pass over the logits (max, then sub/scale/exp2 and the segment sums, in a block of
rows that stays in cache) instead of the 6-8 full passes of Gumbel-max (K uniforms, two logs, argmax,
logsumexp). The samplers never hold the (tokens x K) logits: head, guidance and drawing run over blocks of
max(16, 2^18 / K) rows on CPU (1 MiB of float32 logits up to K = 16,384; the head writes into reused buffers,
one per CFG branch) and max(16, 2^26 / K) rows elsewhere (256 MiB); the drawing holds one to three more
buffers of a block's size (p; the tempered logits if temperature != 1; a filter mask if top-k/top-p).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from snce.generators.autoregressive import AutoregressiveTransformer
from snce.generators.conditions import Conditioning, Prefix
from snce.generators.masked_diffusion import SCHEDULES, MaskedDiffusionTransformer, mask_ratio
from snce.generators.transformer import GeneratorModel

# exp(z) = exp2(z * log2(e)): torch's exp2 is ~4x faster than its exp on CPU, and as accurate (1 ulp).
_LOG2E = 1.0 / math.log(2.0)
# Rows per block: at least _MIN_ROWS (so the head matmul reuses each weight row: 64 rows sample 1.6x faster than
# 16 at K = 262,144, docs/benchmarks.md), else _CPU_BLOCK logits on CPU (1 MiB float32: the head's output and the
# draw stay in L2) and _BLOCK elsewhere (256 MiB: few kernel launches).
_MIN_ROWS = 64
_CPU_BLOCK = 1 << 18
_BLOCK = 1 << 26


def _segment(K: int) -> int:
    """Segment length L of the two-level CDF: the power of two nearest sqrt(K) from above (K=16,384: 128)."""
    return 1 << ((K - 1).bit_length() + 1) // 2


def _exp_shifted(y: torch.Tensor, m: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """exp(y - m) through exp2 (in ``out`` when given)."""
    return torch.sub(y, m, out=out).mul_(_LOG2E).exp2_()


def _nucleus_floor(y, m, total, top_p: float, candidates=None) -> torch.Tensor:
    """Least logit (r, 1) inside the top-p nucleus of rows y (r, K), with p = exp(y - m) summing to total (r, 1).

    Token j (in descending order) is kept when the mass before it is < top_p * total. The candidates are
    ``candidates`` (r, c) when given (the top-k values, descending: the nucleus lies within them), else the
    ``topk`` of c = 64, 512, 4096, ... (skipping sizes the missing mass rules out; a full sort past K/4) for the
    rows whose cut is not yet inside their candidates: peaked rows never sort the whole row.
    """
    r, K = y.shape
    limit = total * top_p  # (r, 1) float64
    floor = torch.empty_like(m)
    todo = torch.arange(r, device=y.device)
    k = candidates.shape[-1] if candidates is not None else min(K, 64)
    while True:
        v = candidates if candidates is not None else y[todo].topk(k, dim=-1).values  # descending
        q = _exp_shifted(v, m[todo])
        cum = q.cumsum(-1, dtype=torch.float64)
        before = F.pad(cum[:, :-1], (1, 0))  # mass of the larger candidates
        n = (before < limit[todo]).sum(-1, keepdim=True).clamp_(min=1)  # kept count
        done = (n[:, 0] < k) | (candidates is not None) | (k == K)
        floor[todo[done]] = v.gather(-1, n - 1)[done].to(floor.dtype)
        if bool(done.all()):
            return floor
        # Each missing token weighs at most the smallest candidate's p: a lower bound on the nucleus size.
        need = k + ((limit[todo] - cum[:, -1:]) / q[:, -1:].double())[~done].max().item()
        todo = todo[~done]
        k *= 8
        while k < min(need, K):
            k *= 8
        k = K if k > K // 4 else k


def _filter(y, m, p, top_k: int, top_p: float, mask_buf=None) -> torch.Tensor | None:
    """Top-k, then top-p, on rows y (r, K) whose p = exp(y - m): zeroes p outside and returns the least kept
    logit per row (r, 1) (None when neither filter is on). Tokens tied with the least kept one stay."""
    K = y.shape[-1]
    floor = candidates = None
    if top_k and top_k < K:
        candidates = y.topk(top_k, dim=-1, sorted=top_p < 1.0).values
        floor = candidates[:, -1:] if top_p < 1.0 else candidates.amin(-1, keepdim=True)
        p.mul_(torch.ge(y, floor, out=mask_buf))
    if top_p < 1.0:
        total = p.sum(-1, keepdim=True, dtype=torch.float64)
        floor = _nucleus_floor(y, m, total, top_p, candidates)
        p.mul_(torch.ge(y, floor, out=mask_buf))
    return floor


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits (..., K) outside the top-k and outside the nucleus of mass top_p to -inf (0 / 1.0: off).

    Top-k keeps the k largest logits (and any tied with the k-th). The nucleus is the smallest set of most likely
    remaining tokens whose probability reaches top_p (and any tied with its least likely one); the most likely
    token always stays. :func:`sample_logits` draws from exactly this set.
    """
    K = logits.shape[-1]
    if not ((top_k and top_k < K) or top_p < 1.0):
        return logits
    y = logits.reshape(-1, K)
    m = y.amax(-1, keepdim=True)
    floor = _filter(y, m, _exp_shifted(y, m), top_k, top_p)
    return logits.masked_fill(logits < floor.view(*logits.shape[:-1], 1), -math.inf)


def gumbel_noise(shape, *, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard Gumbel samples -log(-log U), float32 (the masked sampler's confidence noise)."""
    u = torch.rand(shape, device=device, generator=generator).clamp_(1e-20, 1.0 - 1e-7)
    return u.log_().neg_().log_().neg_()


class _Drawer:
    """Inverse-CDF draws for blocks of up to ``rows`` rows of K logits, with buffers reused across blocks.

    Buffers: p (rows, nb * L) float32, zero past K (the padding of the last segment stays 0), and when needed the
    tempered logits and a 0/1 filter mask (rows, K). On CPU, fresh multi-MiB tensors page-fault on every block.
    """

    def __init__(self, rows: int, K: int, device, *, temperature: float, top_k: int, top_p: float):
        self.K, self.L = K, _segment(K)
        self.nb = -(-K // self.L)
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        f32 = dict(dtype=torch.float32, device=device)
        self.p = torch.zeros(rows, self.nb * self.L, **f32)
        self.y = torch.empty(rows, K, **f32) if temperature != 1.0 else None
        self.mask = torch.empty(rows, K, **f32) if 0 < top_k < K or top_p < 1.0 else None

    def __call__(self, x: torch.Tensor, u: torch.Tensor, tokens: torch.Tensor, logp: torch.Tensor):
        """Rows x (r, K) (not modified), uniforms u (r,) float64 in [0, 1) -> tokens (r,), logp (r,) in place."""
        (r, K), L, nb = x.shape, self.L, self.nb
        y = x.float()
        if self.y is not None:
            y = torch.div(y, self.temperature, out=self.y[:r])
        m = y.amax(-1, keepdim=True)  # (r, 1)
        if not bool(torch.isfinite(m).all()):
            raise ValueError(
                "logits must be finite or -inf with at least one finite entry per row; got a row "
                "whose maximum is -inf, inf or nan"
            )
        p = _exp_shifted(y, m, out=self.p[:r, :K])  # (r, K) in [0, 1]; 1 at the max
        _filter(y, m, p, self.top_k, self.top_p, None if self.mask is None else self.mask[:r])
        seg = self.p[:r].view(r, nb, L)
        seg_sum = seg.sum(-1)  # (r, nb) float32
        cdf = seg_sum.cumsum(-1, dtype=torch.float64)  # (r, nb)
        total = cdf[:, -1:].contiguous()  # >= 1: the max has p = 1
        t = u[:, None] * total  # (r, 1) float64 in [0, total]
        # Segment whose cumulative range holds t; never past the last non-empty one (t may round up to total).
        b = torch.searchsorted(cdf, t, right=True).clamp_(max=torch.searchsorted(cdf, total))
        below = torch.where(b > 0, cdf.gather(1, (b - 1).clamp_(min=0)), 0.0)  # cumsum before b
        within = seg.gather(1, b[:, :, None].expand(r, 1, L))[:, 0]  # (r, L) p of that segment
        c = within.cumsum(-1, dtype=torch.float64)
        # t's remainder in the segment, rescaled from the float32 segment sum to the float64 cumsum.
        rem = (t - below) * (c[:, -1:] / seg_sum.gather(1, b).double())
        last = torch.searchsorted(c, c[:, -1:].contiguous())  # the segment's last non-zero p
        j = torch.searchsorted(c, rem, right=True).clamp_(max=last)
        tok = b * L + j  # (r, 1)
        tokens.copy_(tok[:, 0])
        logp.copy_((y.gather(1, tok) - m).double().sub_(total.log())[:, 0])


def _block_rows(K: int, device: torch.device) -> int:
    """Rows per block of K logits (see ``_CPU_BLOCK``)."""
    return max(_MIN_ROWS, (_CPU_BLOCK if device.type == "cpu" else _BLOCK) // K)


def sample_logits(
    logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of logits (..., K) from softmax(filter_logits(logits / temperature, top_k, top_p)).

    Returns (tokens (...,) long, log-probabilities (...,) float32 of the drawn tokens under that tempered,
    filtered distribution). Exact two-level inverse-CDF sampling (see the module docstring); ``logits`` is not
    modified; one float64 uniform per row comes from ``generator``.
    """
    K = logits.shape[-1]
    x = logits.reshape(-1, K)
    R, dev = x.shape[0], x.device
    u = torch.rand(R, dtype=torch.float64, device=dev, generator=generator)
    tokens = torch.empty(R, dtype=torch.long, device=dev)
    logp = torch.empty(R, dtype=torch.float32, device=dev)
    rows = min(R, _block_rows(K, dev))
    if R:
        draw = _Drawer(rows, K, dev, temperature=temperature, top_k=top_k, top_p=top_p)
        for s in range(0, R, rows):
            draw(x[s : s + rows], u[s : s + rows], tokens[s : s + rows], logp[s : s + rows])
    return tokens.view(logits.shape[:-1]), logp.view(logits.shape[:-1])


def guide(logits: torch.Tensor, cfg_scale: float | None) -> torch.Tensor:
    """(2B, ...) logits of [cond; uncond] -> (B, ...) guided logits; (B, ...) unchanged when cfg_scale is None."""
    if cfg_scale is None:
        return logits
    cond, uncond = logits.chunk(2, dim=0)
    # uncond + (cond - uncond) * cfg_scale in one pass; exactly cond at cfg_scale = 1.
    return torch.lerp(uncond, cond, cfg_scale)


def _draw(model: GeneratorModel, hidden, cfg_scale, *, generator, **opts):
    """Head, guidance and drawing for hidden states (R, H) (or (2R, H) = [cond; uncond] with CFG).

    Returns (tokens (R,), log p (R,)). The (R x K) logits are never held: row blocks (see ``_block_rows``) go
    through the head, are guided in place (``torch.lerp``) and drawn from. On CPU the head writes into reused
    block buffers, one per branch (``logits = hidden @ head_weight.T``, as ``model.logits`` computes them);
    elsewhere it is ``model.logits`` (under the caller's autocast, as before).
    """
    R, dev = hidden.shape[0] // (1 if cfg_scale is None else 2), hidden.device
    K = model.config.vocab_size
    u = torch.rand(R, dtype=torch.float64, device=dev, generator=generator)
    tokens = torch.empty(R, dtype=torch.long, device=dev)
    logp = torch.empty(R, dtype=torch.float32, device=dev)
    rows = max(1, min(R, _block_rows(K, dev)))
    draw = _Drawer(rows, K, dev, **opts)
    if dev.type == "cpu":
        w_t = model.head_weight.float().T  # (H, K)
        bufs = torch.empty(2 if cfg_scale is not None else 1, rows, K, device=dev)

        def head(h, i):
            return torch.mm(h.float(), w_t, out=bufs[i, : h.shape[0]])
    else:

        def head(h, i):
            return model.logits(h)

    for s in range(0, R, rows):
        e = min(R, s + rows)
        logits = head(hidden[s:e], 0)  # (e - s, K)
        if cfg_scale is not None:
            logits = head(hidden[R + s : R + e], 1).lerp_(logits, cfg_scale)
        draw(logits, u[s:e], tokens[s:e], logp[s:e])
    return tokens, logp


def _prepare(model, classes, num_samples, cfg_scale, temperature, top_k, top_p, condition=None):
    """Validate sampler arguments; returns (condition, B): for class models labels (B,) or (2B,) with the null
    class appended for CFG; for text / edit models a Prefix of B or 2B rows ([cond; null condition])."""
    if not isinstance(model, GeneratorModel):
        raise TypeError(f"model must be a snce generator, got {type(model).__name__}")
    if isinstance(classes, Conditioning):
        if condition is not None:
            raise ValueError("give the condition once: as the second argument or as condition=")
        classes, condition = None, classes
    if cfg_scale is not None and not (
        isinstance(cfg_scale, int | float) and math.isfinite(cfg_scale)
    ):
        raise ValueError(f"cfg_scale must be a finite number or None, got {cfg_scale!r}")
    if model.config.condition != "class":
        if classes is not None:
            raise ValueError(
                f"a {model.config.condition!r}-conditioned model takes a Conditioning, not classes"
            )
        checked = model.check_condition(condition, num_samples)
        B = checked.batch_size if checked.batch_size is not None else num_samples
        keep = torch.zeros(B, dtype=torch.bool, device=model.head_weight.device)
        labels = model.embed_condition(checked, B, drop=keep)
        if cfg_scale is not None:
            labels = Prefix.cat(labels, model.embed_condition(checked, B, drop=~keep))
    elif condition is not None:
        labels = model.check_condition(condition, num_samples)
    elif classes is None:
        if num_samples is None:
            raise ValueError("give classes (B,) or, for an unconditional model, num_samples")
        labels = model.check_classes(None, num_samples)
    else:
        labels = model.check_classes(classes, num_samples)
    if cfg_scale is not None and model.config.condition == "class":
        if model.config.num_classes == 0:
            raise ValueError(
                "cfg_scale needs a class-conditional model; this one has num_classes=0"
            )
        labels = torch.cat([labels, torch.full_like(labels, model.null_class)])
    if not (isinstance(temperature, int | float) and temperature > 0):
        raise ValueError(f"temperature must be > 0, got {temperature!r}")
    if isinstance(top_k, bool) or not (isinstance(top_k, int) and top_k >= 0):
        raise ValueError(f"top_k must be an int >= 0 (0: off), got {top_k!r}")
    if not (isinstance(top_p, int | float) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1], got {top_p!r}")
    rows = labels.emb.shape[0] if isinstance(labels, Prefix) else labels.shape[0]
    return labels, rows // (1 if cfg_scale is None else 2)


@torch.no_grad()
def sample_autoregressive(
    model: AutoregressiveTransformer,
    classes: torch.Tensor | Conditioning | None = None,
    *,
    condition: Conditioning | None = None,
    num_samples: int | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    use_cache: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Raster-order sampling: classes (B,) (or num_samples for an unconditional model), or a Conditioning
    (text / edit models; ``Conditioning()`` with num_samples: the null condition) -> tokens (B, h, w).

    With a cache the prefix (with its padding mask) runs once, then one token per step."""
    if not isinstance(model, AutoregressiveTransformer):
        raise TypeError(f"model must be an AutoregressiveTransformer, got {type(model).__name__}")
    labels, B = _prepare(
        model, classes, num_samples, cfg_scale, temperature, top_k, top_p, condition
    )
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    was_training = model.training
    model.eval()
    cache = model.new_cache(B if cfg_scale is None else 2 * B) if use_cache else None
    tokens = torch.zeros(B, 0, dtype=torch.long, device=model.head_weight.device)
    for _ in range(model.config.seq_len):
        prefix = tokens if cfg_scale is None else tokens.repeat(2, 1)
        hidden = model.next_hidden(prefix, labels, cache)  # (B or 2B, H)
        nxt, _ = _draw(model, hidden, cfg_scale, generator=generator, **opts)
        tokens = torch.cat([tokens, nxt[:, None]], dim=1)
    model.train(was_training)
    return tokens.view(B, *model.config.grid)


@torch.no_grad()
def sample_masked(
    model: MaskedDiffusionTransformer,
    classes: torch.Tensor | Conditioning | None = None,
    *,
    condition: Conditioning | None = None,
    num_samples: int | None = None,
    steps: int = 8,
    schedule: str | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    choice_temperature: float = 4.5,
    generator: torch.Generator | None = None,
    return_history: bool = False,
):
    """MaskGIT parallel decoding in exactly ``steps`` forward passes.

    Step t of T (ratio = (t+1)/T): draw a token at every masked position, keep already revealed tokens, score
    the new ones by log p(drawn) + choice_temperature * (1 - ratio) * Gumbel, and re-mask the
    mask_len = floor(N * gamma(ratio)) least confident, clipped to [steps left, still masked - 1] (none at the last
    step). Each step therefore reveals at least one token, and revealed tokens never change.

    classes (B,) labels (or num_samples for an unconditional model), or a Conditioning (text / edit models).
    Returns tokens (B, h, w); with return_history also the list of the T states after each step (mask_id where
    still masked).
    """
    if not isinstance(model, MaskedDiffusionTransformer):
        raise TypeError(f"model must be a MaskedDiffusionTransformer, got {type(model).__name__}")
    labels, B = _prepare(
        model, classes, num_samples, cfg_scale, temperature, top_k, top_p, condition
    )
    N = model.config.seq_len
    if isinstance(steps, bool) or not (isinstance(steps, int) and 1 <= steps <= N):
        raise ValueError(
            f"steps must be an int in [1, {N}] (at least one token is revealed per step), got {steps!r}"
        )
    schedule = model.config.schedule if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if not (isinstance(choice_temperature, int | float) and choice_temperature >= 0):
        raise ValueError(f"choice_temperature must be >= 0, got {choice_temperature!r}")
    opts = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    was_training = model.training
    model.eval()
    tokens = torch.full((B, N), model.mask_id, dtype=torch.long, device=model.head_weight.device)
    history = []
    for t in range(steps):
        unknown = tokens == model.mask_id  # (B, N); every row has the same count
        inputs = tokens if cfg_scale is None else tokens.repeat(2, 1)
        hidden = model.hidden(inputs, labels)  # (B or 2B, N, H)
        sel = unknown if cfg_scale is None else unknown.repeat(2, 1)
        # Logits at masked slots only, never all at once: (masked tokens,) draws and their log p.
        drawn, logp = _draw(model, hidden[sel], cfg_scale, generator=generator, **opts)
        sampled = tokens.clone()
        sampled[unknown] = drawn
        if t == steps - 1:
            tokens = sampled
        else:
            ratio = (t + 1) / steps
            n_unknown = int(unknown[0].sum())
            mask_len = int(
                math.floor(
                    N * float(mask_ratio(torch.tensor(ratio, dtype=torch.float64), schedule))
                )
            )
            mask_len = max(
                steps - 1 - t, min(n_unknown - 1, mask_len)
            )  # >= 1 left per remaining step
            confidence = torch.full((B, N), math.inf, device=tokens.device)
            noise = gumbel_noise(logp.shape, device=tokens.device, generator=generator)
            confidence[unknown] = logp + choice_temperature * (1.0 - ratio) * noise
            remask = confidence.argsort(dim=1)[:, :mask_len]  # least confident new tokens
            tokens = sampled.scatter(1, remask, model.mask_id)
        if return_history:
            history.append(tokens.view(B, *model.config.grid).clone())
    model.train(was_training)
    out = tokens.view(B, *model.config.grid)
    return (out, history) if return_history else out


def sample(
    model: GeneratorModel, classes: torch.Tensor | Conditioning | None = None, **kwargs
) -> torch.Tensor:
    """Dispatch to :func:`sample_autoregressive` or :func:`sample_masked` by the model's family.

    classes: (B,) labels for class models, a Conditioning for text / edit models (or ``condition=``)."""
    if isinstance(model, AutoregressiveTransformer):
        return sample_autoregressive(model, classes, **kwargs)
    if isinstance(model, MaskedDiffusionTransformer):
        return sample_masked(model, classes, **kwargs)
    raise TypeError(f"model must be a snce generator, got {type(model).__name__}")
