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

    The rule depends only on (n, counts), so the schedule can start anywhere: `origin` = (rows, their counts per
    source) (a resumed loader passes its checkpointed counts instead of replaying from row 0). Rows are computed
    in blocks of 4096 with a count snapshot per block; only a few blocks are kept (the loader reads forward).
    """

    _KEEP = 4  # blocks of source ids kept in memory

    def __init__(self, weights: list[float], origin: Optional[tuple[int, list[int]]] = None):
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or len(w) == 0 or (w < 0).any() or w.sum() <= 0 or len(w) > np.iinfo(np.uint16).max:
            raise ValueError(f"blend weights must be >= 0 with a positive sum (at most 65535), got {weights}")
        self.w = w / w.sum()
        self.live = [s for s in range(len(w)) if self.w[s] > 0]
        self.k = len(self.live)
        self.d = 1.0 / (2 * self.k - 2) if self.k > 1 else 0.0
        rows, counts = origin if origin is not None else (0, [0] * len(w))
        self.origin = int(rows)
        self.snapshots = [np.asarray(counts, np.int64)]  # counts before block b (rows origin + b * _BLOCK)
        self._blocks: dict[int, np.ndarray] = {}

    def _block(self, b: int) -> np.ndarray:
        """Source ids (uint16 [_BLOCK]) of rows origin + b * _BLOCK ..."""
        if b in self._blocks:
            return self._blocks[b]
        while len(self.snapshots) <= b:  # snapshots of the blocks before b (computed once, in order)
            last = len(self.snapshots) - 1
            ids = self._compute(last)
            self.snapshots.append(self.snapshots[last] + np.bincount(ids, minlength=len(self.w)))
            self._keep(last, ids)
        ids = self._compute(b)
        self._keep(b, ids)
        return ids

    def _keep(self, b: int, ids: np.ndarray) -> None:
        self._blocks[b] = ids
        while len(self._blocks) > self._KEEP:
            del self._blocks[min(self._blocks)]

    def _compute(self, b: int) -> np.ndarray:
        if self.k == 1:
            return np.full(_BLOCK, self.live[0], np.uint16)
        n0 = self.origin + b * _BLOCK
        w, d, live = self.w.tolist(), self.d, self.live
        c = self.snapshots[b].tolist()
        block = np.empty(_BLOCK, np.uint16)
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
        return block

    def _locate(self, row: int) -> tuple[int, int]:
        if row < self.origin:
            raise ValueError(f"row {row} is before this schedule's origin {self.origin} (rows are read forward)")
        return divmod(row - self.origin, _BLOCK)

    def source_of(self, row: int) -> tuple[int, int]:
        """(source, how many rows of that source come before `row`) for global row `row` (0-based)."""
        b, i = self._locate(row)
        ids = self._block(b)
        s = int(ids[i])
        return s, int(self.snapshots[b][s] + np.count_nonzero(ids[:i] == s))

    def counts(self, rows: int) -> np.ndarray:
        """int64 [sources]: rows of each source among global rows [0, rows)."""
        b, i = self._locate(rows)
        ids = self._block(b)
        return self.snapshots[b] + np.bincount(ids[:i], minlength=len(self.w))


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

    def state_dict(self) -> dict:
        return {"position": self.position, "source_rows": self.schedule.counts(self.position).tolist()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if "source_rows" in state:  # start the schedule at the checkpoint (no replay from row 0)
            self.schedule = BlendSchedule(self.schedule.w.tolist(), (self.position, state["source_rows"]))
        self._epochs_told = np.maximum(self._epochs_told, self.epochs())  # told before the checkpoint
