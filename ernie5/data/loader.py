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


class RowLoader:
    """Seeded per-epoch row order, rank sharding and the `position` state; subclasses read and collate rows."""

    def __init__(self, num_rows: int, rows_per_rank: int, seed: int, rank: int, world: int, shuffle: bool):
        self.num_rows, self.B = num_rows, rows_per_rank
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world, shuffle
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

    def next(self):  # subclasses define row(global_row) and collate(rows)
        first = self.position + self.rank * self.B
        rows = [self.row(first + j) for j in range(self.B)]
        self.position += self.B * self.world
        return self.collate(rows)

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class PackedLoader(RowLoader):
    """Rows of packed documents from a memory-mapped split. `next()` -> (tokens [B, S+1], segments [B, S+1])."""

    def __init__(self, split: Split, seq_len: int, rows_per_rank: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, where: str = "data"):
        num_rows = (split.num_tokens - 1) // seq_len
        if num_rows < 1:
            raise UserError(where, f"only {split.num_tokens} tokens: not one row of seq_len {seq_len} + 1")
        super().__init__(num_rows, rows_per_rank, seed, rank, world, shuffle)
        self.split, self.S = split, seq_len

    def row(self, global_row: int) -> tuple[np.ndarray, np.ndarray]:
        return self.split.window(self._row_index(global_row) * self.S, self.S + 1)

    def collate(self, rows: list) -> tuple[np.ndarray, np.ndarray]:
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])


class MultimodalLoader(RowLoader):
    """Packed multimodal rows (`ernie5.data.multimodal_prepare`): `next()` -> {field: [B, S, ...]} plus
    `und_feats` [N, K, F] (the understanding features the rows point to) and `und_index` renumbered into it."""

    def __init__(self, arrays: dict, rows_per_rank: int, seed: int, rank: int = 0, world: int = 1,
                 shuffle: bool = True, where: str = "data"):
        num_rows = int(arrays["token"].shape[0])
        if num_rows < 1:
            raise UserError(where, "no packed rows")
        super().__init__(num_rows, rows_per_rank, seed, rank, world, shuffle)
        self.arrays = arrays

    def row(self, global_row: int) -> dict:
        i = self._row_index(global_row)
        return {k: np.asarray(v[i]) for k, v in self.arrays.items() if k != "und_table"}

    def collate(self, rows: list) -> dict:
        out = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
        idx = out["und_index"]
        used = idx[idx >= 0]
        out["und_feats"] = np.asarray(self.arrays["und_table"][np.sort(used)] if used.size else
                                      np.zeros((0,) + self.arrays["und_table"].shape[1:], np.float32))
        local = np.full_like(idx, -1)
        local[idx >= 0] = np.searchsorted(np.sort(used), idx[idx >= 0])
        out["und_index"] = local
        return out


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
