"""Residual vector quantiser with EMA codebooks and dead-code re-seeding (the audio codec's bottleneck).

Level l quantises the residual left by levels < l to its nearest codeword; the codebooks follow k-means-style
exponential moving averages of the vectors assigned to them (no gradient). A code whose usage EMA falls under
`dead_threshold` x the level's mean usage is re-seeded with a random residual vector from the current batch, so
codebooks do not collapse.
`init_from` seeds all levels by k-means on a large sample first (a codec on little data generalises much better
from codebooks fitted to many frames than from the few a training batch holds).
"""

from __future__ import annotations

import numpy as np
import paddle
import paddle.nn as nn
import paddle.nn.functional as F

_CHUNK = 16384  # rows per distance matmul in k-means (bounds memory at CHUNK x K floats)
_BEAM_CHUNK = 1024  # vectors per beam-search call (bounds memory at CHUNK x beam x K floats)


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
        return _nearest(r_ND, self.codebooks[level])

    def forward(self, z_ND: paddle.Tensor):
        """Returns (straight-through quantised [N, dim], codes [N, levels] int64, per-level quantised list,
        residual norms list: mean ||r|| before each level and after the last)."""
        if self.training and float(self.initialised[0]) == 0:
            self.init_from(z_ND.detach(), iters=0)
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

    @paddle.no_grad()
    def encode(self, z_ND: paddle.Tensor, beam: int = 1) -> paddle.Tensor:
        """Codes [N, levels] without touching the codebooks. beam > 1 keeps the `beam` best partial code
        sequences per vector at every level (lower error than greedy residual search at the same bitrate);
        that search runs in NumPy (`beam_search`): a clip holds a few dozen frames, and the ~30 small Paddle
        ops per level cost more in dispatch than the arithmetic (data preparation spent ~26 ms a clip there)."""
        if beam <= 1:
            r, codes = z_ND, []
            for level in range(self.levels):
                idx = self.nearest(r, level)
                codes.append(idx)
                r = r - paddle.gather(self.codebooks[level], idx)
            return paddle.stack(codes, axis=1)
        z = z_ND.numpy().astype(np.float32, copy=False)
        cbs = self.codebooks.numpy()
        out = [beam_search(z[i:i + _BEAM_CHUNK], cbs, beam) for i in range(0, len(z), _BEAM_CHUNK)]
        return paddle.to_tensor(np.concatenate(out) if out else np.zeros((0, self.levels), np.int64))

    def decode(self, codes_NL: paddle.Tensor) -> paddle.Tensor:
        """Sum of the chosen codewords: [N, levels] -> [N, dim]."""
        out = None
        for level in range(codes_NL.shape[1]):
            q = paddle.gather(self.codebooks[level], codes_NL[:, level])
            out = q if out is None else out + q
        return out

    @paddle.no_grad()
    def init_from(self, z_ND: paddle.Tensor, iters: int = 8) -> list[float]:
        """Seed level after level by k-means (`iters` Lloyd steps from random data vectors; 0 = just the random
        data vectors) on the residual the earlier levels leave. Returns the mean residual norm after each level."""
        r, norms = z_ND.detach(), []
        for level in range(self.levels):
            pick = paddle.randperm(r.shape[0])[:self.K] if r.shape[0] >= self.K else paddle.randint(0, r.shape[0],
                                                                                                      [self.K])
            cb = paddle.gather(r, pick) + 1e-4 * _rms(r) * paddle.randn([self.K, self.dim])
            for _ in range(iters):
                idx = _nearest(r, cb)
                counts = paddle.index_add(paddle.zeros([self.K]), idx, 0, paddle.ones([r.shape[0]]))
                sums = paddle.index_add(paddle.zeros([self.K, self.dim]), idx, 0, r)
                empty = (counts == 0).astype("float32").unsqueeze(1)  # an empty cluster keeps its vector
                cb = sums / counts.clip(min=1).unsqueeze(1) * (1 - empty) + cb * empty
            idx = _nearest(r, cb)
            counts = paddle.index_add(paddle.zeros([self.K]), idx, 0, paddle.ones([r.shape[0]]))
            usage = counts * (self.K / r.shape[0])  # relative usage, mean 1; a code nobody picked starts dead
            self.codebooks[level] = cb
            self.embed_sum[level] = cb * usage.unsqueeze(1)
            self.usage[level] = usage
            r = r - paddle.gather(cb, idx)
            norms.append(float(paddle.linalg.norm(r, axis=1).mean()))
        self.initialised[0] = 1.0
        return norms

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
        """Replace codes whose usage EMA is below `dead_threshold` x the level's mean usage by random batch
        vectors (they restart at mean usage); returns how many."""
        us = self.usage[level]
        mean = float(us.mean())
        dead = (us < self.dead_threshold * mean).numpy().nonzero()[0]
        if len(dead) == 0:
            return 0
        pick = paddle.randint(0, r_ND.shape[0], [len(dead)])
        fresh = paddle.gather(r_ND, pick) + 1e-3 * _rms(r_ND) * paddle.randn([len(dead), self.dim])
        ids = paddle.to_tensor(dead, dtype="int64")
        self.codebooks[level] = paddle.scatter(self.codebooks[level].clone(), ids, fresh)
        self.embed_sum[level] = paddle.scatter(self.embed_sum[level].clone(), ids, fresh * mean)
        self.usage[level] = paddle.scatter(us.clone(), ids, paddle.full([len(dead)], mean))
        return len(dead)


def beam_search(z_ND: np.ndarray, codebooks_LKD: np.ndarray, beam: int) -> np.ndarray:
    """Residual codes [N, L] by beam search: at every level each vector keeps the `beam` partial code sequences
    (paths) whose sum of codewords lies nearest to it; the final pick is the path of least squared error. Ties
    go to the lower (path, code) index, so the codes do not depend on the CPU's sort kernels."""
    N, D = z_ND.shape
    L, K, _ = codebooks_LKD.shape
    rows = np.arange(N)[:, None]
    q_NPD = np.zeros((N, 1, D), np.float32)  # sum of the codewords chosen so far, per path
    codes_NPl = np.zeros((N, 1, 0), np.int64)
    for level in range(L):
        cb_KD = codebooks_LKD[level]
        r_NPD = z_ND[:, None, :] - q_NPD
        d_NPK = (r_NPD * r_NPD).sum(-1, keepdims=True) - 2.0 * (r_NPD @ cb_KD.T) + (cb_KD * cb_KD).sum(1)
        best = _smallest(d_NPK.reshape(N, d_NPK.shape[1] * K), beam)  # [N, width] of the P x K candidates
        path, code = best // K, best % K
        q_NPD = q_NPD[rows, path] + cb_KD[code]
        codes_NPl = np.concatenate([codes_NPl[rows, path], code[..., None]], axis=2)
    err_NP = ((z_ND[:, None, :] - q_NPD) ** 2).sum(-1)
    return codes_NPl[np.arange(N), err_NP.argmin(1)]


def _smallest(x_NM: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k smallest values of each row, ordered by (value, index): the lower index wins a tie,
    also at the k-th place. A linear-time partition per row; a full stable sort only for rows tied there."""
    N, M = x_NM.shape
    if k >= M:
        sel = np.broadcast_to(np.arange(M), (N, M)).copy()
    else:
        sel = np.argpartition(x_NM, k - 1, axis=1)[:, :k]
        kth = np.take_along_axis(x_NM, sel, 1).max(1, keepdims=True)
        tied = (x_NM <= kth).sum(1) > k  # more candidates than places: which ones `argpartition` kept is arbitrary
        if tied.any():
            sel[tied] = np.argsort(x_NM[tied], axis=1, kind="stable")[:, :k]
    order = np.lexsort((sel, np.take_along_axis(x_NM, sel, 1)), axis=1)
    return np.take_along_axis(sel, order, 1)


def _rms(x: paddle.Tensor) -> float:
    return float((x * x).mean()) ** 0.5


def _nearest(r_ND: paddle.Tensor, cb_KD: paddle.Tensor) -> paddle.Tensor:
    """Index of the nearest codeword for each row: argmax of r.c - |c|^2 / 2 (chunked: N may be large)."""
    half_c2 = -0.5 * (cb_KD * cb_KD).sum(1).unsqueeze(0)
    out = [paddle.addmm(half_c2, r_ND[i:i + _CHUNK], cb_KD.T).argmax(axis=1) for i in range(0, r_ND.shape[0], _CHUNK)]
    return out[0] if len(out) == 1 else paddle.concat(out)
