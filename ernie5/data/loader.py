"""Deterministic, resumable packed-row loaders, sharded by data-parallel rank.

The token stream is cut into rows of S + 1 tokens (row i starts at i * S, so the last token of a row is the
first input of the next). Row order is a seeded permutation per epoch. The loader's whole state is `position`,
the number of rows handed out over all ranks: micro-step m gives rank r the global rows
[position + r*B, position + (r+1)*B), so DP=2 x B rows sees exactly the rows DP=1 x 2B rows sees.
"""

from __future__ import annotations

import numpy as np

from ernie5.data.shards import Split
from ernie5.errors import UserError


class PackedLoader:
    """Rows of packed documents from a memory-mapped split. `next()` -> (tokens [B, S+1], segments [B, S+1])."""

    def __init__(self, split: Split, seq_len: int, rows_per_rank: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, where: str = "data"):
        self.split, self.S, self.B = split, seq_len, rows_per_rank
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
        self.num_rows = (split.tokens.shape[0] - 1) // seq_len
        if self.num_rows < 1:
            raise UserError(where, f"only {split.tokens.shape[0]} tokens: not one row of seq_len {seq_len} + 1")
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _row_index(self, global_row: int) -> int:
        epoch, i = divmod(global_row, self.num_rows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return int(self._perm[i])

    def row(self, global_row: int) -> tuple[np.ndarray, np.ndarray]:
        start = self._row_index(global_row) * self.S
        tokens = np.asarray(self.split.tokens[start:start + self.S + 1], dtype=np.int64)
        segments = np.searchsorted(self.split.doc_starts, np.arange(start, start + self.S + 1), side="right") - 1
        return tokens, segments.astype(np.int64)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        first = self.position + self.rank * self.B
        rows = [self.row(first + j) for j in range(self.B)]
        self.position += self.B * self.world
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class SyntheticLoader:
    """Uniform random tokens, one document per row, derived from (seed, position): for benchmarks."""

    def __init__(self, vocab_size: int, seq_len: int, rows_per_rank: int, seed: int, rank: int = 0, world: int = 1):
        self.V, self.S, self.B, self.seed, self.rank, self.world = vocab_size, seq_len, rows_per_rank, seed, rank, world
        self.position = 0

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, self.position + self.rank * self.B])
        self.position += self.B * self.world
        return rng.integers(0, self.V, (self.B, self.S + 1)), np.zeros((self.B, self.S + 1), dtype=np.int64)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])
