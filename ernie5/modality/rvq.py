"""Residual vector quantiser with EMA codebooks and dead-code re-seeding (the audio codec's bottleneck).

Level l quantises the residual left by levels < l to its nearest codeword; the codebooks follow k-means-style
exponential moving averages of the vectors assigned to them (no gradient). A code whose usage EMA falls under
`dead_threshold` is re-seeded with a random residual vector from the current batch, so codebooks do not collapse.
"""

from __future__ import annotations

import paddle
import paddle.nn as nn
import paddle.nn.functional as F


class ResidualVQ(nn.Layer):
    """`levels` codebooks of `codebook_size` x `dim`. Input / output [N, dim] (N = batch x frames)."""

    def __init__(self, dim: int, levels: int, codebook_size: int, decay: float = 0.95, dead_threshold: float = 0.1):
        super().__init__()
        self.dim, self.levels, self.K = dim, levels, codebook_size
        self.decay, self.dead_threshold = decay, dead_threshold
        self.register_buffer("codebooks", paddle.randn([levels, codebook_size, dim]) * 0.1)
        self.register_buffer("usage", paddle.ones([levels, codebook_size]))  # EMA of assignments per step
        self.register_buffer("embed_sum", self.codebooks.clone())
        self.register_buffer("initialised", paddle.zeros([1]))

    def nearest(self, r_ND: paddle.Tensor, level: int) -> paddle.Tensor:
        cb = self.codebooks[level]
        d = (r_ND * r_ND).sum(1, keepdim=True) - 2 * r_ND @ cb.T + (cb * cb).sum(1).unsqueeze(0)
        return d.argmin(axis=1)

    def forward(self, z_ND: paddle.Tensor):
        """Returns (straight-through quantised [N, dim], codes [N, levels] int64, per-level quantised list,
        residual norms list: mean ||r|| before each level and after the last)."""
        if self.training and float(self.initialised[0]) == 0:
            self._init_from(z_ND.detach())
        r = z_ND.detach()
        total = paddle.zeros_like(r)
        codes, quantised, norms = [], [], []
        for level in range(self.levels):
            norms.append(float(paddle.linalg.norm(r, axis=1).mean()))
            idx = self.nearest(r, level)
            q = paddle.gather(self.codebooks[level], idx)
            if self.training:
                self._ema_update(level, r, idx)
            codes.append(idx)
            quantised.append(q)
            total = total + q
            r = r - q
        norms.append(float(paddle.linalg.norm(r, axis=1).mean()))
        z_q = z_ND + (total - z_ND).detach()
        return z_q, paddle.stack(codes, axis=1), quantised, norms

    def decode(self, codes_NL: paddle.Tensor) -> paddle.Tensor:
        """Sum of the chosen codewords: [N, levels] -> [N, dim]."""
        out = None
        for level in range(codes_NL.shape[1]):
            q = paddle.gather(self.codebooks[level], codes_NL[:, level])
            out = q if out is None else out + q
        return out

    @paddle.no_grad()
    def _init_from(self, z_ND):
        """First batch: seed every level's codebook from (residual) batch vectors rather than noise."""
        r = z_ND
        for level in range(self.levels):
            pick = paddle.randint(0, r.shape[0], [self.K])
            cb = paddle.gather(r, pick) + 1e-3 * paddle.randn([self.K, self.dim])
            self.codebooks[level] = cb
            self.embed_sum[level] = cb
            r = r - paddle.gather(cb, self.nearest(r, level))
        self.initialised[0] = 1.0

    @paddle.no_grad()
    def _ema_update(self, level: int, r_ND, idx_N):
        onehot = F.one_hot(idx_N, self.K).astype("float32")  # [N, K]
        counts = onehot.sum(0)
        sums = onehot.T @ r_ND
        self.usage[level] = self.decay * self.usage[level] + (1 - self.decay) * counts
        self.embed_sum[level] = self.decay * self.embed_sum[level] + (1 - self.decay) * sums
        n = self.usage[level].sum()
        smoothed = (self.usage[level] + 1e-5) / (n + self.K * 1e-5) * n  # Laplace smoothing
        self.codebooks[level] = self.embed_sum[level] / smoothed.unsqueeze(1)
        self.reseed_dead(level, r_ND)

    @paddle.no_grad()
    def reseed_dead(self, level: int, r_ND) -> int:
        """Replace codes whose usage EMA is below the threshold by random batch vectors; returns how many."""
        dead = (self.usage[level] < self.dead_threshold).numpy().nonzero()[0]
        if len(dead) == 0:
            return 0
        pick = paddle.randint(0, r_ND.shape[0], [len(dead)])
        fresh = paddle.gather(r_ND, pick) + 1e-3 * paddle.randn([len(dead), self.dim])
        cb, es, us = self.codebooks[level].clone(), self.embed_sum[level].clone(), self.usage[level].clone()
        ids = paddle.to_tensor(dead, dtype="int64")
        cb = paddle.scatter(cb, ids, fresh)
        self.codebooks[level] = cb
        self.embed_sum[level] = paddle.scatter(es, ids, fresh)
        self.usage[level] = paddle.scatter(us, ids, paddle.ones([len(dead)]))
        return len(dead)
