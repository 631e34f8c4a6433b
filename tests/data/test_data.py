"""Shards, packing, determinism, resumability, data-parallel sharding, corrupted input."""

import shutil

import numpy as np
import pytest

from ernie5.data.loader import PackedLoader
from ernie5.data.shards import ConcatSplit, Split, open_split, read_meta
from ernie5.errors import UserError
from ernie5.modality.text_tokenizer import TextTokenizer


def small_split():
    docs = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14], [15], [16, 17, 18, 19]]
    starts, flat = [], []
    for d in docs:
        starts.append(len(flat))
        flat += d + [3]
    return Split(np.array(flat), np.array(starts)), docs


def test_rows_pack_documents_with_eos_and_segments():
    split, _ = small_split()
    loader = PackedLoader(split, seq_len=4, rows_per_rank=1, seed=0, shuffle=False)
    tokens, segs = loader.next()
    np.testing.assert_array_equal(tokens, [[5, 6, 7, 3, 8]])
    np.testing.assert_array_equal(segs, [[0, 0, 0, 0, 1]])
    tokens, segs = loader.next()  # row 1 starts where row 0's inputs ended
    np.testing.assert_array_equal(tokens, [[8, 9, 3, 10, 11]])
    np.testing.assert_array_equal(segs, [[1, 1, 1, 2, 2]])


def test_loader_is_deterministic_resumable_and_dp_consistent():
    split, _ = small_split()
    one = PackedLoader(split, 4, rows_per_rank=2, seed=7)
    full = [one.next()[0] for _ in range(6)]  # crosses epochs (5 rows per epoch)
    again = PackedLoader(split, 4, rows_per_rank=2, seed=7)
    again.next()
    state = again.state_dict()
    resumed = PackedLoader(split, 4, rows_per_rank=2, seed=7)
    resumed.load_state_dict(state)
    np.testing.assert_array_equal(np.concatenate([resumed.next()[0] for _ in range(5)]), np.concatenate(full[1:]))
    ranks = [PackedLoader(split, 4, rows_per_rank=1, seed=7, rank=r, world=2) for r in range(2)]
    for step in range(6):  # DP=2 x 1 row sees exactly what DP=1 x 2 rows sees
        np.testing.assert_array_equal(np.concatenate([r.next()[0] for r in ranks]), full[step])
    n = one.num_rows  # one shuffled epoch is a permutation of the rows
    epoch0 = PackedLoader(split, 4, rows_per_rank=n, seed=7).next()[0]
    assert sorted(map(tuple, epoch0)) == sorted(map(tuple, PackedLoader(split, 4, n, 7, shuffle=False).next()[0]))


def test_unit_pieces_read_as_one_stream():
    split, docs = small_split()
    s = split.doc_starts
    cuts = [0, s[1], s[1], s[2], s[4], split.num_tokens]  # pieces of whole documents, one of them empty
    pieces = [Split(split.tokens[lo:hi], s[(s >= lo) & (s < hi)] - lo) for lo, hi in zip(cuts, cuts[1:])]
    whole = ConcatSplit(pieces)
    assert (whole.num_tokens, whole.num_docs) == (split.num_tokens, split.num_docs)
    for start in range(split.num_tokens):
        for length in (1, 3, 7, 40):
            for a, b in zip(whole.window(start, length), split.window(start, length)):
                np.testing.assert_array_equal(a, b)


def test_shards_round_trip_and_detect_damage(tmp_path, text_assets):
    corpus, _, shards = text_assets
    d = tmp_path / "s"
    shutil.copytree(shards, d)
    meta = read_meta(str(d))
    train, val = open_split(str(d), "train"), open_split(str(d), "val")
    assert (train.num_docs + val.num_docs, meta["vocab_size"], meta["eos_id"]) == (45, 600, 3)
    assert meta["splits"]["train"] == {"tokens": train.num_tokens, "documents": train.num_docs}
    tokens, doc = train.window(0, train.num_tokens)
    assert (tokens == 3).sum() == train.num_docs and tokens[-1] == 3 and doc[-1] == train.num_docs - 1
    f = next(d.glob("units-*")) / "000000.train.tokens.npy"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(UserError, match="000000.train.tokens.npy: shard checksum mismatch"):
        open_split(str(d), "train")
    f.write_bytes(bytes(data[:-3]))
    with pytest.raises(UserError, match="truncated"):
        open_split(str(d), "train")
    with pytest.raises(UserError, match="no prepared shards"):
        open_split(str(tmp_path / "missing"), "train")


def test_tokenizer_byte_fallback_and_bpe_dropout(text_assets):
    _, tok_path, _ = text_assets
    tok = TextTokenizer(str(tok_path))
    text = "def f(x): return x  # ∮ 🙂"  # symbols unseen in training fall back to bytes
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert any(tok.sp.id_to_piece(i).startswith("<0x") for i in ids)
    import sentencepiece as spm

    spm.set_random_generator_seed(0)
    long = "The import statement is used to bind names in the local namespace. " * 4
    samples = {tuple(tok.encode(long, dropout=0.3)) for _ in range(5)}
    assert len(samples) > 1 and all(tok.decode(list(s)) == long for s in samples)
    assert max(len(s) for s in samples) > len(tok.encode(long))  # dropout splits merges into more pieces


def test_missing_tokenizer_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="tokenizer model not found"):
        TextTokenizer(str(tmp_path / "nope.model"))
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(UserError, match="not a readable sentencepiece model"):
        TextTokenizer(str(bad))
