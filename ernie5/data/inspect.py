"""`ernie5 data inspect CONFIG|SHARD`: print one packed multimodal row as segments, then position by position."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ernie5.constants import MODALITY_NAMES


def inspect_target(target: str, row: int = 0, split: str = "train", max_positions: int = 64) -> str:
    from ernie5.config.yaml_io import require_kind
    from ernie5.data.multimodal_prepare import load_multimodal_config, open_multimodal_split
    from ernie5.errors import UserError

    shard = target
    if Path(target).is_file():
        require_kind(target, ("multimodal",), "data inspect", also="a shard directory")
        shard = load_multimodal_config(target).out_dir
    meta, a = open_multimodal_split(shard, split)
    if row >= a["token"].shape[0]:
        raise UserError("--row", f"{row} out of range: {split} has {a['token'].shape[0]} rows")
    text = format_row({k: np.asarray(v[row]) for k, v in a.items()}, meta, max_positions,
                      header=f"{shard} {split} row {row}")
    return text + format_samples(row_samples(shard, split, row))


def row_samples(shard: str, split: str, row: int) -> list[dict]:
    """The `{split}.samples.jsonl` records of one row's documents (empty for shards without the file)."""
    import json

    path = Path(shard) / f"{split}.samples.jsonl"
    if not path.is_file():
        return []
    out = []
    with open(path, encoding="utf-8") as f:
        for line in f:  # in row order: stop after the row
            rec = json.loads(line)
            if rec["row"] > row:
                break
            if rec["row"] == row:
                out.append(rec)
    return out


def format_samples(records: list[dict]) -> str:
    """Where each document of a row came from and how its pictures were fitted to their buckets."""
    if not records:
        return ""
    lines = ["  documents:"]
    for r in records:
        lines.append(f"  [{r['offset']:4d}:{r['offset'] + r['length']:4d}) {r['source']}")
        for m in r["media"]:
            sh, sw = m["source_size"]
            lines.append(f"      segment {m['segment']} {m['kind']} ({m['role']}) {sh}x{sw} -> bucket {m['bucket']} "
                         f"({m['mode']} crop {tuple(m['crop_box'])} of {m['resized_size'][0]}x"
                         f"{m['resized_size'][1]}), latent {m['latent'][0]}x{m['latent'][1]}, scales "
                         + " ".join(f"{h}x{w}" for h, w in m["schedule"]))
    return "\n".join(lines) + "\n"


def _token_name(tok: int, modality: int, meta: dict) -> str:
    names = {v: k for k, v in meta["specials"].items()}
    if modality == 0:
        return names.get(tok, str(tok))
    if modality in (1, 2):
        return f"0b{tok:0{meta['bits']}b}"  # bit i of the token is channel i
    return str(tok)


def format_row(r: dict, meta: dict, max_positions: int, header: str = "") -> str:
    """Segments (runs of one document and modality) with their group and position ranges, then a table."""
    lines = [header] if header else []
    S = len(r["token"])
    real = int((r["modality"] >= 0).sum())
    lines.append(f"{S} positions ({real} real, {S - real} padding), {len(np.unique(r['doc'][r['modality'] >= 0]))} "
                 "documents")
    start = 0
    for i in range(1, S + 1):
        if i < S and r["doc"][i] == r["doc"][start] and r["modality"][i] == r["modality"][start]:
            continue
        m = int(r["modality"][start])
        if m == -1:
            lines.append(f"  [{start:4d}:{i:4d}) padding")
            break
        g, p = r["group"][start:i], r["pos"][start:i]
        lm = r["loss_mask"][start:i].sum(0)
        extra = ""
        if m in (1, 2):
            frames = int(r["frame"][start:i].max()) + 1
            K = len(meta["scales"])
            sc = r["scale"][start:i]
            seen = set(int(s) for s in sc)
            fine = sc == K - 1  # the finest scale's grid is the latent grid: its bucket
            grid = (f" grid {len(np.unique(p[fine, 1]))}x{len(np.unique(p[fine, 2]))}" if fine.any() else "")
            extra = (f" frames {frames}{grid} scales {sorted(seen - {K})}"
                     + (" + context group" if K in seen else ""))
            if "und_index" in r and (r["und_index"][start:i] >= 0).all():  # continuous understanding inputs
                chunks = len(np.unique(g))  # one group per image, or per chunk of 4 video frames
                extra = (f" {chunks} chunk(s) of 4 frames" if m == 2 else " 1 frame") + \
                    f" understanding: {i - start} merged-patch tokens"
        if m == 0:
            toks = " ".join(_token_name(int(t), 0, meta) for t in r["token"][start:min(i, start + 8)])
            extra = f" tokens [{toks}{' ...' if i - start > 8 else ''}]"
        lines.append(f"  [{start:4d}:{i:4d}) doc {int(r['doc'][start])} {MODALITY_NAMES[m]:5s} groups "
                     f"{int(g.min())}-{int(g.max())} t {p[:, 0].min():g}..{p[:, 0].max():g} h {p[:, 1].min():g}.."
                     f"{p[:, 1].max():g} w {p[:, 2].min():g}..{p[:, 2].max():g} loss(text/vis/audio) "
                     f"{int(lm[0])}/{int(lm[1])}/{int(lm[2])}{extra}")
        start = i
    lines.append(f"  {'i':>4} {'doc':>3} {'mod':5} {'group':>5} {'t':>6} {'h':>6} {'w':>6} {'token':>12} "
                 f"{'target':>8} loss")
    for i in range(min(S, max_positions)):
        m = int(r["modality"][i])
        if m == -1:
            break
        t, h, w = r["pos"][i]
        tok = _token_name(int(r["token"][i]), m, meta)
        if m == 3:
            tok = "/".join(str(int(c)) for c in r["audio"][i])
        loss = "".join("TVA"[k] if r["loss_mask"][i, k] else "." for k in range(3))
        lines.append(f"  {i:4d} {int(r['doc'][i]):3d} {MODALITY_NAMES[m]:5s} {int(r['group'][i]):5d} {t:6.2f} "
                     f"{h:6.2f} {w:6.2f} {tok:>12} {int(r['target'][i]):8d} {loss}")
    return "\n".join(lines) + "\n"
