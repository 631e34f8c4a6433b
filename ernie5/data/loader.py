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


class RowStream:
    """Rank sharding and the `position` state; subclasses define `row(global_row)` and `collate(rows)`."""

    def __init__(self, rows_per_rank: int, rank: int, world: int):
        self.B, self.rank, self.world = rows_per_rank, rank, world
        self.position = 0

    def next(self):
        first = self.position + self.rank * self.B
        rows = [self.row(first + j) for j in range(self.B)]
        self.position += self.B * self.world
        self.after_next()
        return self.collate(rows)

    def after_next(self) -> None:
        pass

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


class RowLoader(RowStream):
    """A fixed set of `num_rows` rows in a seeded order per epoch (`seed`: an int or a list of ints)."""

    def __init__(self, num_rows: int, rows_per_rank: int, seed, rank: int, world: int, shuffle: bool):
        super().__init__(rows_per_rank, rank, world)
        self.num_rows, self.shuffle = num_rows, shuffle
        self.seed = list(seed) if isinstance(seed, (list, tuple)) else [seed]
        self._perm_epoch, self._perm = -1, None

    def _row_index(self, global_row: int) -> int:
        epoch, i = divmod(global_row, self.num_rows)
        if not self.shuffle:
            return i
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([*self.seed, epoch]).permutation(self.num_rows)
            self._perm_epoch = epoch
        return int(self._perm[i])


class PackedLoader(RowLoader):
    """Rows of packed documents from a memory-mapped split. `next()` -> (tokens [B, S+1], segments [B, S+1])."""

    def __init__(self, split: Split, seq_len: int, rows_per_rank: int, seed, rank: int = 0, world: int = 1,
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


def collate_unified(rows: list[dict]) -> dict:
    """Stack unified rows into {field: [B, S, ...]}, their understanding features into `und_feats` [N, K, F]
    and each row's `und_index` shifted to point into it."""
    out = {k: np.stack([r[k] for r in rows]) for k in rows[0] if k != "und_feats"}
    sizes = np.array([len(r["und_feats"]) for r in rows])
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int32)
    idx = out["und_index"]
    out["und_index"] = np.where(idx >= 0, idx + offsets[:, None], -1).astype(idx.dtype)
    out["und_feats"] = np.concatenate([r["und_feats"] for r in rows]).astype(np.float32)
    return out


class MultimodalLoader(RowLoader):
    """Packed multimodal rows (`ernie5.data.multimodal_prepare`): `next()` -> {field: [B, S, ...]} plus
    `und_feats` [N, K, F] (the understanding features the rows point to) and `und_index` pointing into it."""

    def __init__(self, arrays: dict, rows_per_rank: int, seed, rank: int = 0, world: int = 1,
                 shuffle: bool = True, where: str = "data"):
        num_rows = int(arrays["token"].shape[0])
        if num_rows < 1:
            raise UserError(where, "no packed rows")
        super().__init__(num_rows, rows_per_rank, seed, rank, world, shuffle)
        self.arrays = arrays

    def row(self, global_row: int) -> dict:
        """One row's fields, with its own understanding features (`und_feats` [m, K, F], `und_index` 0..m-1)."""
        i = self._row_index(global_row)
        r = {k: np.asarray(v[i]) for k, v in self.arrays.items() if k != "und_table"}
        idx = r["und_index"]
        has = idx >= 0
        r["und_feats"] = np.asarray(self.arrays["und_table"][idx[has]], np.float32)
        r["und_index"] = np.where(has, np.cumsum(has) - 1, -1).astype(idx.dtype)
        return r

    def collate(self, rows: list) -> dict:
        return collate_unified(rows)


class UnifiedTextLoader(PackedLoader):
    """A text source's packed rows in the unified row layout (`sequence.text_row`), to blend with multimodal
    sources. `und_shape`: (K, F) of the understanding features (a text row has none)."""

    def __init__(self, split: Split, seq_len: int, rows_per_rank: int, seed, bits: int, levels: int,
                 und_shape: tuple[int, int], **kw):
        super().__init__(split, seq_len, rows_per_rank, seed, **kw)
        self.bits, self.levels, self.und_shape = bits, levels, tuple(und_shape)

    def row(self, global_row: int) -> dict:
        from ernie5.data.sequence import text_row

        r = text_row(*super().row(global_row), self.bits, self.levels)
        r["und_feats"] = np.zeros((0,) + self.und_shape, np.float32)
        return r

    def collate(self, rows: list) -> dict:
        return collate_unified(rows)


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
