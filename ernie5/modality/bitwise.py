"""Multi-scale residual **bitwise** quantiser (Infinity / BSQ style) for the vision tokenizer (SPEC §2).

A latent grid f [N, d, h, w] (N = batch x frames) is quantised coarse to fine over `scales` (side lengths of the
token grid at each scale, the last equal to the latent side). At scale k the residual r = f - f_hat is
area-downsampled to s_k x s_k, each of its d channels becomes one sign bit, the bits are mapped to
+-alpha_k (a learned per-scale magnitude, so later scales refine with smaller steps), upsampled back and added
to f_hat. A token is the d bits at one grid cell: vocabulary 2^d. Gradients pass straight through.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


def resize(x_NCHW: paddle.Tensor, side: int) -> paddle.Tensor:
    """Area-average down / bilinear up to side x side (identity when the size matches)."""
    h = x_NCHW.shape[-1]
    if h == side:
        return x_NCHW
    if side < h:
        return F.adaptive_avg_pool2d(x_NCHW, side)
    return F.interpolate(x_NCHW, size=[side, side], mode="bilinear", align_corners=False)


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
    """Residual quantiser over `scales`; `bits` sign bits per token. Codes: one [N, s, s, bits] uint8 per scale."""

    def __init__(self, bits: int, scales: list[int], entropy_temperature: float = 1.0):
        super().__init__()
        self.bits, self.scales, self.tau = bits, list(scales), entropy_temperature
        # log magnitudes: start halving per scale so a fresh model already refines rather than overshoots
        init = paddle.to_tensor([[-0.69 * k] for k in range(len(scales))], dtype="float32")
        self.log_alpha = self.create_parameter([len(scales), 1], default_initializer=nn.initializer.Assign(init))

    def alpha(self, k: int) -> paddle.Tensor:
        return paddle.exp(self.log_alpha[k])

    def forward(self, f_NDHW: paddle.Tensor):
        """Quantise; returns (straight-through latent, codes per scale, losses dict)."""
        side = f_NDHW.shape[-1]
        f_hat = paddle.zeros_like(f_NDHW)
        codes, ent_sample, ent_batch = [], [], []
        for k, s in enumerate(self.scales):
            r_small = resize(f_NDHW - f_hat, s)
            bits = (r_small > 0).astype("uint8")
            q_small = bits_to_signs(bits).detach() * self.alpha(k)
            f_hat = f_hat + resize(q_small, side)
            codes.append(bits.transpose([0, 2, 3, 1]))  # [N, s, s, d]
            # factorised bit entropy (BSQ): confident bits per token, but each bit used evenly over the batch
            p = F.sigmoid(r_small / (self.alpha(k).detach() * self.tau))
            ent_sample.append(_binary_entropy(p).mean())
            ent_batch.append(_binary_entropy(p.mean(axis=[0, 2, 3])).mean())
        losses = {
            # encoder commits to its quantised value; alphas learn to match the residual magnitudes
            "commit": F.mse_loss(f_NDHW, f_hat.detach()),
            "codebook": F.mse_loss(f_hat, f_NDHW.detach()),
            "entropy": paddle.stack(ent_sample).mean() - paddle.stack(ent_batch).mean(),
        }
        f_st = f_NDHW + (f_hat - f_NDHW).detach()
        return f_st, codes, losses

    def dequantize(self, codes: list[paddle.Tensor], side: int, upto: int | None = None) -> paddle.Tensor:
        """Sum of the first `upto` scales (all by default), upsampled to side x side: [N, d, side, side]."""
        upto = len(self.scales) if upto is None else upto
        f_hat = None
        for k in range(upto):
            q = resize(bits_to_signs(codes[k]).transpose([0, 3, 1, 2]) * self.alpha(k), side)
            f_hat = q if f_hat is None else f_hat + q
        if f_hat is None:
            n = codes[0].shape[0]
            return paddle.zeros([n, self.bits, side, side])
        return f_hat

    def next_scale_inputs(self, codes: list[paddle.Tensor], side: int) -> list[paddle.Tensor]:
        """Teacher-forcing inputs for scales 1..K-1: accumulated f_hat of scales < k, resized to scale k's grid.

        Returns K-1 tensors [N, s_k, s_k, d] (scale 0 has no latent input: the model starts from BOI/SOS).
        """
        out, f_hat = [], None
        for k in range(1, len(self.scales)):
            q = resize(bits_to_signs(codes[k - 1]).transpose([0, 3, 1, 2]) * self.alpha(k - 1), side)
            f_hat = q if f_hat is None else f_hat + q
            out.append(resize(f_hat, self.scales[k]).transpose([0, 2, 3, 1]))
        return out


def _binary_entropy(p: paddle.Tensor) -> paddle.Tensor:
    p = paddle.clip(p, 1e-6, 1 - 1e-6)
    return -(p * paddle.log(p) + (1 - p) * paddle.log(1 - p))
