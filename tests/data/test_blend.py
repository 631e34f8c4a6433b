"""Weighted blending of sources: proportions at every prefix, exact resume, data-parallel sharding, epoch
wrap-around notices, and text rows laid out as unified rows."""

import numpy as np
import pytest

from ernie5.data.blend import BlendedLoader, BlendSchedule
from ernie5.data.loader import PackedLoader
from ernie5.data.shards import Split


@pytest.mark.parametrize("weights", [[0.6, 0.3, 0.1], [1, 1], [5, 0, 2, 1e-3], [0.05] * 8 + [0.6], [1.0]])
def test_every_prefix_holds_each_source_within_one_row_of_its_share(weights):
    sched = BlendSchedule(weights)
    n = 3 * 4096 + 17  # several blocks
    ids = np.array([sched.source_of(r)[0] for r in range(n)])
    w = np.asarray(weights, float) / np.sum(weights)
    onehot = np.eye(len(w), dtype=np.int64)[ids]  # [n, k]
    prefix = np.cumsum(onehot, axis=0)  # rows of each source among rows [0, m], independent of `counts`
    expected = np.arange(1, n + 1)[:, None] * w[None, :]
    assert np.abs(prefix - expected).max() < 1.0
    assert (prefix[:, w == 0] == 0).all()  # a zero-weight source is never drawn
    for m in (0, 1, 4095, 4096, 4097, n):  # the block-snapshot arithmetic agrees with a plain count
        want = prefix[m - 1] if m else np.zeros(len(w), np.int64)
        np.testing.assert_array_equal(sched.counts(m), want)
    for row in (0, 5, 4096, 9000, n - 1):  # the k-th row of a source is that source's own row k
        s, k = BlendSchedule(weights).source_of(row)
        assert s == ids[row] and k == (prefix[row, s] - 1)


def test_a_schedule_started_from_checkpointed_counts_continues_the_one_from_row_zero():
    weights = [0.5, 0.3, 0.2]
    full = BlendSchedule(weights)
    for origin in (0, 1, 4095, 5000, 9000):
        resumed = BlendSchedule(weights, (origin, full.counts(origin).tolist()))
        for row in range(origin, origin + 5000, 7):
            assert resumed.source_of(row) == full.source_of(row)
        np.testing.assert_array_equal(resumed.counts(origin + 4321), full.counts(origin + 4321))
    with pytest.raises(ValueError, match="before this schedule's origin"):
        BlendSchedule(weights, (100, [50, 30, 20])).source_of(99)


def test_bad_weights_are_refused():
    for bad in ([], [0, 0], [1, -1]):
        with pytest.raises(ValueError):
            BlendSchedule(bad)


class _Rows:
    """A source whose row k is (source id, k, epoch-shuffled index): every drawn row names where it came from."""

    def __init__(self, sid, num_rows):
        self.sid, self.num_rows = sid, num_rows

    def row(self, k):
        epoch, i = divmod(k, self.num_rows)
        perm = np.random.default_rng([self.sid, epoch]).permutation(self.num_rows)
        return np.array([self.sid, k, perm[i]])

    def collate(self, rows):
        return np.stack(rows)


def _loader(rows_per_rank=4, rank=0, world=1, notice=None):
    sources = [("web", _Rows(0, 50), 0.6), ("code", _Rows(1, 7), 0.3), ("books", _Rows(2, 30), 0.1)]
    return BlendedLoader(sources, rows_per_rank, rank, world, notice)


def test_resume_mid_epoch_with_three_sources_continues_the_same_stream():
    straight = _loader()
    batches = [straight.next() for _ in range(12)]
    first = _loader()
    for _ in range(5):
        first.next()
    state = first.state_dict()
    assert state["source_rows"] == [int(v) for v in first.schedule.counts(20)]  # 5 x 4 rows
    for saved in (state, {"position": state["position"]}):  # with the counts, and as older checkpoints saved it
        resumed = _loader()
        resumed.load_state_dict(saved)
        np.testing.assert_array_equal(np.concatenate([resumed.next() for _ in range(7)]),
                                      np.concatenate(batches[5:]))
    # each source's rows arrive in order 0, 1, 2, ... (no row skipped or repeated within a source)
    drawn = np.concatenate(batches)
    for sid in range(3):
        ks = drawn[drawn[:, 0] == sid, 1]
        np.testing.assert_array_equal(ks, np.arange(len(ks)))


def test_data_parallel_ranks_see_disjoint_rows_whose_union_is_the_one_process_stream():
    one = _loader(rows_per_rank=4)
    ranks = [_loader(rows_per_rank=2, rank=r, world=2) for r in range(2)]
    for _ in range(10):
        parts = [r.next() for r in ranks]
        np.testing.assert_array_equal(np.concatenate(parts), one.next())
        keys = [set(map(tuple, p[:, :2].tolist())) for p in parts]  # (source, k) identifies a drawn row
        assert not keys[0] & keys[1]
    assert ranks[0].rows_seen() == ranks[1].rows_seen() == one.rows_seen()


def test_a_source_that_runs_out_starts_a_new_epoch_and_says_so_once():
    told = []
    loader = _loader(notice=lambda name, epoch: told.append((name, epoch)))
    for _ in range(8):  # 32 rows: ~9.6 from "code" (7 rows) -> its epoch 2 begins
        loader.next()
    assert told == [("code", 2)]
    for _ in range(2):
        loader.next()
    assert told == [("code", 2)]  # not again for the same epoch
    again = []
    resumed = _loader(notice=lambda name, epoch: again.append((name, epoch)))
    resumed.load_state_dict(loader.state_dict())
    resumed.next()
    assert again == []  # told before the checkpoint, not told again after resuming


def test_rows_seen_follow_the_weights():
    loader = _loader(rows_per_rank=10)
    for _ in range(100):
        loader.next()
    seen = loader.rows_seen()
    assert sum(seen.values()) == 1000
    for name, w in (("web", 0.6), ("code", 0.3), ("books", 0.1)):
        assert abs(seen[name] - w * 1000) < 1


def test_blended_text_sources_keep_each_sources_packing():
    """Two real PackedLoaders: every blended row is a row its own source's loader gives at that index."""
    def split(offset):
        docs = [[offset + i, offset + i + 1, 3] for i in range(0, 60, 2)]
        starts = np.cumsum([0] + [len(d) for d in docs[:-1]])
        return Split(np.concatenate(docs), starts)

    a, b = PackedLoader(split(100), 4, 1, [7, 0]), PackedLoader(split(500), 4, 1, [7, 1])
    blended = BlendedLoader([("a", a, 2.0), ("b", b, 1.0)], rows_per_rank=3)
    ref_a, ref_b = PackedLoader(split(100), 4, 1, [7, 0]), PackedLoader(split(500), 4, 1, [7, 1])
    ka = kb = 0
    for _ in range(8):
        tokens, _ = blended.next()
        for row in tokens:
            if row.max() < 500:
                np.testing.assert_array_equal(row, ref_a.row(ka)[0])
                ka += 1
            else:
                np.testing.assert_array_equal(row, ref_b.row(kb)[0])
                kb += 1
    assert (ka, kb) == (16, 8)


def test_text_row_matches_the_unified_document_layout():
    """A packed text row laid out as a unified row equals `build_document` + `_pack_row` of its pieces (the
    reference path multimodal shards take), cut to the row's S positions."""
    from ernie5.data.sequence import FIELDS, Segment, _pack_row, build_document, text_row

    V, bits, levels = 50, 4, 2
    tokens = np.array([11, 12, 3, 20, 21, 22, 3, 30, 31])  # R = 9: two whole documents and one cut short
    docs = np.array([4, 4, 4, 5, 5, 5, 5, 6, 6])
    got = text_row(tokens, docs, bits, levels)
    pieces = [build_document([Segment("text", "target", ids=tokens[docs == d].tolist())], V, bits, levels)
              for d in (4, 5, 6)]
    ref = _pack_row(pieces, len(tokens))
    S = len(tokens) - 1
    for k in FIELDS + ("doc",):
        np.testing.assert_array_equal(got[k], ref[k][:S], err_msg=k)
    assert got["target"][S - 1] == 31 and got["loss_mask"][S - 1, 0] == 1  # the row's extra token is a target
