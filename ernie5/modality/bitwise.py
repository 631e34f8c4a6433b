"""Multi-scale residual **bitwise** quantiser (Infinity / BSQ style) for the vision tokenizer: its codes are
the visual tokens of next-scale prediction (`ernie5.data.sequence`).

A latent grid f [N, d, h, w] (N = batch x frames) is quantised coarse to fine over `scales` (side lengths of the
token grid at each scale, the last equal to the latent side). At scale k the residual r = f - f_hat is
area-downsampled to s_k x s_k; each of its d channels becomes one sign bit b = [r_small > 0], dequantised to
alpha_k * (2b - 1), upsampled back and added to f_hat. A token is the d bits at one grid cell: vocabulary 2^d.
Gradients pass straight through.

Every scale's bits must carry information: a next-scale generator gets the global layout from the coarse scales.
Two choices make that happen (digits-world 4-bit tokenizer, token entropy per scale 1x1 / 2x2 / 4x4 / 8x8: 0.0 /
0.03 / 2.85 / 3.75 bits of 4 before, 3.88 / 3.82 / 3.83 / 3.92 after, held-out PSNR within 0.1-0.3 dB of the
old quantiser trained on the same recipe):
- alpha_k is a statistic, not a trained weight: `magnitude_fraction` (1/2) of the running mean |r| of scale k
  (a buffer updated in training mode before use; a constant at inference). A magnitude trained through the final
  reconstruction stayed near its init (1, 1/2, 1/4 ...), far above the spread of the per-image latent means
  (~0.07): a used 1x1 bit would overshoot, so training parked the coarse residuals on one side of 0 and the
  coarse tokens were constant. The MSE-optimal magnitude (fraction 1) used every bit but cost ~1.4 dB; half a
  step refines more gently and cost nothing.
- The entropy term is E[H(bit)] - gamma * H(E[token]) / d with gamma (`batch_entropy_weight`) 2: at gamma 1 the
  two gradients nearly cancel when all of a scale's bits lean the same way, so nothing re-centres a lopsided
  scale; and the batch entropy is taken over whole tokens (all 2^d codes), not bit by bit, or the d bits of a
  coarse cell learn to flip together.
A per-scale threshold (running median of the residual) was tried instead and dropped: the latent drifted after
the lagging centre and reconstruction lost ~1 dB.

Decoding and the next-scale inputs are **linear in the sign bits, with no constant term**. With S_j = 2 b_j - 1
the [N, d, s_j, s_j] signs of scale j, U_j = bilinear upsampling s_j -> latent side (align_corners False, identity
at the last scale) and D_k = area average latent side -> s_k (identity at the last scale):

    f_hat                    = sum_j alpha_j * U_j(S_j)
    next_scale_inputs()[k-1] = sum_{j<k} alpha_j * D_k(U_j(S_j))          (k = 1 .. K-1)

`alpha(k)` is alpha_k, shape [1] (one magnitude for all bits of a scale).
"""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def _hw(size) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))


def resize(x_NCHW: paddle.Tensor, size) -> paddle.Tensor:
    """Area-average down / bilinear up to `size` (side, or (height, width)); identity when the size matches. An
    axis that shrinks is averaged first, then an axis that grows is interpolated."""
    H, W = _hw(size)
    h, w = x_NCHW.shape[-2:]
    if (h, w) == (H, W):
        return x_NCHW
    if H < h or W < w:
        x_NCHW = F.adaptive_avg_pool2d(x_NCHW, [min(h, H), min(w, W)])
        h, w = x_NCHW.shape[-2:]
    if (h, w) == (H, W):
        return x_NCHW
    return F.interpolate(x_NCHW, size=[H, W], mode="bilinear", align_corners=False)


def scale_schedule(scales: list[int], h: int, w: int) -> list[tuple[int, int]]:
    """Token grids (h_k, w_k) of each scale for an h x w latent: scale k keeps the fraction scales[k] / scales[-1]
    of each side (rounded, at least 1); the last is the latent itself. A square latent of side scales[-1] gives
    the square grids `scales` (a resolution bucket's aspect ratio carries over to every scale)."""
    top = scales[-1]
    out = [(max(1, round(s * h / top)), max(1, round(s * w / top))) for s in scales[:-1]]
    return out + [(h, w)]


def bits_to_signs(bits: paddle.Tensor) -> paddle.Tensor:
    """{0, 1} -> {-1, +1} (float32)."""
    return bits.astype("float32") * 2.0 - 1.0


def bits_to_ids(bits_ND: paddle.Tensor) -> paddle.Tensor:
    """Pack the last axis of d bits (bit i has weight 2^i) into integer token ids in [0, 2^d)."""
    d = bits_ND.shape[-1]
    weights = paddle.to_tensor([1 << i for i in range(d)], dtype="int64")
    return (bits_ND.astype("int64") * weights).sum(-1)


def ids_to_bits(ids: paddle.Tensor, d: int) -> paddle.Tensor:
    """Inverse of `bits_to_ids`: [...] int -> [..., d] uint8."""
    shifts = paddle.to_tensor([1 << i for i in range(d)], dtype="int64")
    return ((ids.astype("int64").unsqueeze(-1) // shifts) % 2).astype("uint8")


class MultiScaleBitQuantizer(nn.Layer):
    """Residual quantiser over `scales`; `bits` sign bits per token. Codes: one [N, s, s, bits] uint8 per scale.

    `magnitude_fraction`: alpha_k as a fraction of the mean |residual| of scale k; `batch_entropy_weight`: gamma
    of the entropy term; `stat_momentum`: weight of a training batch in the running magnitudes (the first updates
    use a plain running average, 1/n, so a fresh model starts from its data's statistics)."""

    def __init__(self, bits: int, scales: list[int], entropy_temperature: float = 1.0,
                 magnitude_fraction: float = 0.5, batch_entropy_weight: float = 2.0, stat_momentum: float = 0.05):
        super().__init__()
        self.bits, self.scales, self.tau = bits, list(scales), entropy_temperature
        self.fraction, self.gamma, self.momentum = magnitude_fraction, batch_entropy_weight, stat_momentum
        # before any statistics: magnitudes halving per scale (refine rather than overshoot)
        self.register_buffer("magnitude", paddle.to_tensor([[0.5 ** k] for k in range(len(scales))], "float32"))
        self.register_buffer("stat_updates", paddle.zeros([1]))

    def alpha(self, k: int) -> paddle.Tensor:
        """Magnitude alpha_k of scale k: [1]."""
        return self.magnitude[k]

    @paddle.no_grad()
    def _update_magnitude(self, k: int, r_small: paddle.Tensor, m: float) -> None:
        magnitude = self.magnitude.clone()
        target = paddle.clip(self.fraction * r_small.abs().mean(), min=1e-4)  # floor: never divide by 0 below
        magnitude[k] = (1 - m) * magnitude[k] + m * target
        paddle.assign(magnitude, output=self.magnitude)

    def forward(self, f_NDHW: paddle.Tensor):
        """Quantise; returns (straight-through latent, codes per scale, losses dict). In training mode alpha_k is
        updated from this batch before scale k is quantised, so the codes agree with `dequantize` afterwards."""
        size = tuple(f_NDHW.shape[-2:])
        grids = scale_schedule(self.scales, *size)
        f_hat = paddle.zeros_like(f_NDHW)
        codes, ent_sample, ent_batch, err = [], [], [], []
        if self.training:
            with paddle.no_grad():
                paddle.assign(self.stat_updates + 1, output=self.stat_updates)
            m = max(self.momentum, 1.0 / float(self.stat_updates.item()))
        for k, s in enumerate(grids):
            r_small = resize(f_NDHW - f_hat, s)
            if self.training:
                self._update_magnitude(k, r_small.detach(), m)
            bits = (r_small > 0).astype("uint8")
            q_small = bits_to_signs(bits) * self.alpha(k)
            f_hat = f_hat + resize(q_small, size)
            err.append(F.mse_loss(q_small, r_small.detach()).detach())
            codes.append(bits.transpose([0, 2, 3, 1]))  # [N, s, s, d]
            # entropy term (BSQ): confident bits per token, but every token of the vocabulary used over the batch
            p = F.sigmoid(r_small / (self.alpha(k) * self.tau))
            ent_sample.append(_binary_entropy(p).mean())
            ent_batch.append(_batch_token_entropy(p))
        losses = {
            "commit": F.mse_loss(f_NDHW, f_hat.detach()),  # the encoder commits to its quantised value
            "quant_error": paddle.stack(err).mean(),  # mean per-scale quantisation error (a diagnostic)
            "entropy": paddle.stack(ent_sample).mean() - self.gamma * paddle.stack(ent_batch).mean(),
        }
        f_st = f_NDHW + (f_hat - f_NDHW).detach()
        return f_st, codes, losses

    def _scale_latent(self, codes_k: paddle.Tensor, k: int, size) -> paddle.Tensor:
        """alpha_k * U_k(S_k): scale k's contribution on the latent grid `size` ((h, w) or side), [N, d, h, w]."""
        return resize(bits_to_signs(codes_k).transpose([0, 3, 1, 2]) * self.alpha(k), size)

    def dequantize(self, codes: list[paddle.Tensor], size=None, upto: int | None = None) -> paddle.Tensor:
        """Sum of the first `upto` scales (all by default), upsampled to the latent grid: [N, d, h, w]. `size`:
        (h, w) or side; default the last scale's grid (the latent)."""
        size = _hw(size) if size is not None else tuple(codes[-1].shape[1:3])
        upto = len(self.scales) if upto is None else upto
        f_hat = None
        for k in range(upto):
            q = self._scale_latent(codes[k], k, size)
            f_hat = q if f_hat is None else f_hat + q
        if f_hat is None:
            n = codes[0].shape[0]
            return paddle.zeros([n, self.bits, *size])
        return f_hat

    def next_scale_inputs(self, codes: list[paddle.Tensor], size=None) -> list[paddle.Tensor]:
        """Teacher-forcing inputs for scales 1..K-1: accumulated f_hat of scales < k, resized to scale k's grid
        (formula in the module docstring). Returns K-1 tensors [N, h_k, w_k, d] (scale 0 has no latent input:
        the model starts from BOI/SOS). The grids are those of `codes` (any bucket); `size` as in `dequantize`."""
        size = _hw(size) if size is not None else tuple(codes[-1].shape[1:3])
        out, f_hat = [], None
        for k in range(1, len(self.scales)):
            q = self._scale_latent(codes[k - 1], k - 1, size)
            f_hat = q if f_hat is None else f_hat + q
            out.append(resize(f_hat, tuple(codes[k].shape[1:3])).transpose([0, 2, 3, 1]))
        return out


JOINT_ENTROPY_MAX_BITS = 10  # above: a [cells, 2^bits] table is too big, the batch term factorises over bits


def _batch_token_entropy(p_NDHW: paddle.Tensor) -> paddle.Tensor:
    """Entropy per bit (nats) of the batch's mean token distribution, tokens = the d bits of a cell with
    independent probabilities p. Joint over all 2^d codes: per-bit balance alone let the d bits of a coarse cell
    flip together (a 2x2 token carried ~1.8 of its 4 bits); factorised over bits when d > JOINT_ENTROPY_MAX_BITS."""
    d = p_NDHW.shape[1]
    if d > JOINT_ENTROPY_MAX_BITS:
        return _binary_entropy(p_NDHW.mean(axis=[0, 2, 3])).mean()
    p_MD = paddle.clip(p_NDHW.transpose([0, 2, 3, 1]).reshape([-1, d]), 1e-6, 1 - 1e-6)
    codes_CD = paddle.to_tensor([[(c >> i) & 1 for i in range(d)] for c in range(1 << d)], dtype="float32")
    log_q_MC = paddle.log(p_MD) @ codes_CD.T + paddle.log(1 - p_MD) @ (1 - codes_CD).T
    q_C = paddle.clip(paddle.exp(log_q_MC).mean(0), 1e-9, 1.0)
    return -(q_C * paddle.log(q_C)).sum() / d


def _binary_entropy(p: paddle.Tensor) -> paddle.Tensor:
    p = paddle.clip(p, 1e-6, 1 - 1e-6)
    return -(p * paddle.log(p) + (1 - p) * paddle.log(1 - p))
