"""Weighted blending of several row sources into one deterministic, resumable, rank-sharded stream.

Which source global row g comes from is fixed by the weights alone (`BlendSchedule`): the interleaving keeps
every source's count within 1 of weight x rows at every prefix, so a short run, a resumed run and a long run
all see the mixture they asked for (Megatron's blended datasets do the same with a cached index; the chairman-
assignment rule below is Tijdeman's, whose bound is 1 - 1/(2k - 2) for k sources, tighter than Megatron's greedy
"largest deficit" rule, which can drift past 1).

The k-th row drawn from source s is that source's own row k (its loader shuffles per epoch and wraps around), so
the blended loader's whole state is still `position`, the rows handed out over all ranks: rank r takes global
rows [position + r*B, position + (r+1)*B) as every other loader does.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ernie5.data.loader import RowStream

_BLOCK = 4096  # rows per block of the cached schedule (a per-source count snapshot at every block start)


def source_seed(run_seed: int, index: int, sources: int) -> list[int]:
    """The shuffling seed of source `index` of `sources` (a one-source mixture shuffles as a single corpus)."""
    return [run_seed] if sources == 1 else [run_seed, index]


class BlendSchedule:
    """Source id of every global row for weights `w` (normalised; zero-weight sources are never drawn).

    Row n (1-based) goes to the eligible source with the earliest deadline, where source s is eligible when
    w_s * n - c_s >= d (d = 1 / (2k - 2), k sources with positive weight) and its deadline is
    (c_s + 1 - d) / w_s; c_s counts its rows so far. Then |c_s(n) - w_s * n| <= 1 - d < 1 for every n.
    """

    def __init__(self, weights: list[float]):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0:
            raise ValueError(f"blend weights must be >= 0 with a positive sum, got {weights}")
        self.w = w / w.sum()
        self.k = int((self.w > 0).sum())
        self.d = 1.0 / (2 * self.k - 2) if self.k > 1 else 0.0
        self.ids = np.zeros(0, np.uint8)
        self.snapshots: list[np.ndarray] = []  # counts per source before each block
        self._counts = np.zeros(len(w), np.int64)

    def _extend(self, rows: int) -> None:
        while len(self.ids) < rows:
            self.snapshots.append(self._counts.copy())
            n0 = len(self.ids)
            block = np.empty(_BLOCK, np.uint8)
            w, d = self.w.tolist(), self.d
            c = self._counts.tolist()
            live = [s for s in range(len(w)) if w[s] > 0]
            for i in range(_BLOCK):
                n = n0 + i + 1
                best, due = live[0], float("inf")
                for s in live:
                    if w[s] * n - c[s] >= d - 1e-12:
                        t = (c[s] + 1 - d) / w[s]
                        if t < due:
                            best, due = s, t
                block[i] = best
                c[best] += 1
            self._counts = np.asarray(c, np.int64)
            self.ids = np.concatenate([self.ids, block])

    def source_of(self, row: int) -> tuple[int, int]:
        """(source, how many rows of that source come before `row`) for global row `row` (0-based)."""
        self._extend(row + 1)
        s = int(self.ids[row])
        b = row // _BLOCK
        return s, int(self.snapshots[b][s] + np.count_nonzero(self.ids[b * _BLOCK:row] == s))

    def counts(self, rows: int) -> np.ndarray:
        """int64 [sources]: rows of each source among global rows [0, rows)."""
        if rows <= 0:
            return np.zeros(len(self.w), np.int64)
        self._extend(rows)
        b = (rows - 1) // _BLOCK
        part = np.bincount(self.ids[b * _BLOCK:rows], minlength=len(self.w))
        return self.snapshots[b] + part


class BlendedLoader(RowStream):
    """Rows from several sources by weight. `sources`: (name, row loader, weight); each row loader offers
    `row(k)` (its k-th row, wrapping into a new shuffled epoch after `num_rows`) and `collate(rows)`; the first
    one's `collate` makes the batch. `notice(name, epoch)` is called once when a source starts epoch >= 2."""

    def __init__(self, sources: list[tuple[str, object, float]], rows_per_rank: int, rank: int = 0, world: int = 1,
                 notice: Optional[Callable[[str, int], None]] = None):
        super().__init__(rows_per_rank, rank, world)
        self.names = [n for n, _, _ in sources]
        self.loaders = [loader for _, loader, _ in sources]
        self.schedule = BlendSchedule([w for _, _, w in sources])
        self.notice = notice
        self._epochs_told = np.ones(len(sources), np.int64)

    def row(self, global_row: int):
        s, k = self.schedule.source_of(global_row)
        return self.loaders[s].row(k)

    def collate(self, rows: list):
        return self.loaders[0].collate(rows)

    def after_next(self) -> None:
        epochs = self.epochs()
        for s in np.nonzero(epochs > self._epochs_told)[0]:
            if self.notice is not None:
                self.notice(self.names[s], int(epochs[s]))
        self._epochs_told = np.maximum(self._epochs_told, epochs)

    def epochs(self) -> np.ndarray:
        """int64 [sources]: the epoch (1-based) each source is in after the rows handed out so far."""
        counts = self.schedule.counts(self.position)
        rows = np.array([loader.num_rows for loader in self.loaders], np.int64)
        return np.maximum(counts - 1, 0) // rows + 1

    def rows_seen(self) -> dict[str, int]:
        """Rows drawn from each source so far, over all ranks."""
        return dict(zip(self.names, self.schedule.counts(self.position).tolist()))

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._epochs_told = np.maximum(self._epochs_told, self.epochs())  # told before the checkpoint
