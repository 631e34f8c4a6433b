"""Tokenizer files for an HF export: the sentencepiece model plus an equivalent `tokenizer.json`.

transformers loads ERNIE 4.5 model types with its generic fast tokenizer. Given only `tokenizer.model` it builds
one that drops sentencepiece's dummy prefix ("hello" -> "he"... instead of "▁he"...), so ids would differ from
what ernie5 trained on. We therefore write `tokenizer.json` ourselves from the sentencepiece proto: BPE with
byte fallback, merges ranked by the score of the merged piece (sentencepiece BPE merges the pair whose result
scores highest), and the same normalisation (charsmap, dummy prefix, spaces -> "▁"). Tests check the ids
against sentencepiece.
"""

from __future__ import annotations

import base64
from pathlib import Path

from ernie5.errors import UserError

_META = "\u2581"  # sentencepiece's visible space


def _load_proto(path: Path):
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise UserError(str(path), f"not a sentencepiece model ({type(e).__name__})") from None
    return proto


def _merges(vocab: dict[str, int], scores: dict[str, float], normal: list[str]) -> list[list[str]]:
    """Every (left, right) pair whose concatenation is a normal piece, best-scoring result first."""
    ranked = []
    for piece in normal:
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[piece], vocab[left], vocab[right], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def tokenizer_json(model_path: Path) -> dict:
    """The `tokenizers` JSON for a BPE sentencepiece model (UserError for unigram models or unusual settings)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = _load_proto(model_path)
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if spec.model_type != pb.TrainerSpec.BPE:
        raise UserError(str(model_path), "only BPE sentencepiece models can be exported as tokenizer.json")
    if spec.treat_whitespace_as_suffix or not norm.escape_whitespaces:
        raise UserError(str(model_path), "unsupported sentencepiece whitespace settings for tokenizer.json")
    types = pb.ModelProto.SentencePiece
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    scores = {p.piece: p.score for p in proto.pieces}
    normal = [p.piece for p in proto.pieces if p.type in (types.NORMAL, types.USER_DEFINED)]
    special = [(i, p.piece) for i, p in enumerate(proto.pieces) if p.type in (types.CONTROL, types.UNKNOWN)]
    normalizers = []
    if norm.precompiled_charsmap:
        normalizers.append({"type": "Precompiled",
                            "precompiled_charsmap": base64.b64encode(norm.precompiled_charsmap).decode()})
    if norm.remove_extra_whitespaces:  # sentencepiece trims the ends and collapses runs of spaces
        normalizers += [{"type": "Strip", "strip_left": True, "strip_right": True},
                        {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]
    if norm.add_dummy_prefix:
        normalizers.append({"type": "Prepend", "prepend": _META})
    normalizers.append({"type": "Replace", "pattern": {"String": " "}, "content": _META})
    decoders = [{"type": "Replace", "pattern": {"String": _META}, "content": " "},
                {"type": "ByteFallback"}, {"type": "Fuse"}]
    if norm.add_dummy_prefix:  # sentencepiece drops the dummy prefix's space when decoding
        decoders.append({"type": "Strip", "content": " ", "start": 1, "stop": 0})
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, "content": piece, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i, piece in special],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,  # sentencepiece BPE runs over the whole normalised text; pieces never span "▁x▁"
        "post_processor": None,  # no BOS/EOS added: ernie5 corpora only separate documents with EOS
        "decoder": {"type": "Sequence", "decoders": decoders},
        "model": {"type": "BPE", "dropout": None, "unk_token": spec.unk_piece, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": True, "byte_fallback": bool(spec.byte_fallback),
                  "ignore_merges": False, "vocab": vocab, "merges": _merges(vocab, scores, normal)},
    }


def special_tokens(model_path: Path) -> tuple[dict[str, int], dict[str, str], int]:
    """(pad/bos/eos token ids, pad/bos/eos/unk token strings, number of pieces) of a sentencepiece model."""
    proto = _load_proto(model_path)
    spec = proto.trainer_spec
    ids, tokens = {}, {}
    for name, i in (("pad", spec.pad_id), ("bos", spec.bos_id), ("eos", spec.eos_id), ("unk", spec.unk_id)):
        if 0 <= i < len(proto.pieces):  # -1: trained without that token
            if name != "unk":
                ids[f"{name}_token_id"] = i
            tokens[f"{name}_token"] = proto.pieces[i].piece
    return ids, tokens, len(proto.pieces)


def tokenizer_config(tokens: dict[str, str], max_len: int) -> dict:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json, adding no BOS/EOS."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
            "model_max_length": max_len, "clean_up_tokenization_spaces": False, **tokens}
