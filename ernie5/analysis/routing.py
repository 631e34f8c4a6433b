"""How experts specialise under modality-agnostic routing: load statistics per modality (numpy only).

Every modality goes through the same router and experts, so specialisation shows up only in *which* experts each
modality's tokens pick. The inputs are expert-load tables `load_LE`: for each MoE layer (L) the number of routed
token-slots each expert (E) received, summed over a window of steps. The trainer writes them to
`RUN_DIR/routing.jsonl`, one JSON object per log step:

    {"step": 10, "load": [[...E] * L], "max_over_mean": [...L], "entropy": [...L],
     "load_by_modality": {"text": [[...E] * L], "image": ..., "video": ..., "audio": ...}}   # optional

`load_by_modality` holds only the modalities present in that log window.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ernie5.constants import MODALITY_NAMES, NUM_MODALITIES
from ernie5.errors import UserError

# report order (the modality ids' order); anything else (and the "all" fallback) follows
MODALITY_ORDER = tuple(MODALITY_NAMES[m] for m in range(NUM_MODALITIES))


def _as_LE(load_LE, name: str = "load_LE") -> np.ndarray:
    a = np.asarray(load_LE, dtype=np.float64)
    if a.ndim != 2 or a.shape[1] == 0:
        raise ValueError(f"{name}: expected a [layers, experts] table, got shape {a.shape}")
    return a


def load_fractions(load_LE) -> np.ndarray:
    """Each layer's counts normalised to sum 1 -> [L, E]; an all-zero layer stays all zero."""
    a = _as_LE(load_LE)
    total = a.sum(1, keepdims=True)
    return np.divide(a, total, out=np.zeros_like(a), where=total > 0)


def normalised_entropy(load_LE) -> np.ndarray:
    """Entropy of each layer's expert-load distribution / log(E) -> [L].

    1 = uniform over the experts, 0 = one expert takes everything. An all-zero layer gives 0, and so does E = 1
    (there is no choice to spread over).
    """
    p = load_fractions(load_LE)
    E = p.shape[1]
    if E == 1:
        return np.zeros(p.shape[0])
    plogp = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return np.clip(-plogp.sum(1) / math.log(E), 0.0, 1.0)


def max_over_mean(load_LE) -> np.ndarray:
    """Each layer's largest expert load / the mean load -> [L] (1 = balanced, E = one expert); 0 for a zero layer."""
    a = _as_LE(load_LE)
    mean = a.mean(1)
    return np.divide(a.max(1), mean, out=np.zeros_like(mean), where=mean > 0)


def top_experts(load_E, frac: float = 0.25) -> set[int]:
    """The ceil(frac * E) most used experts of one layer.

    Ties are broken by the lower expert id (a stable sort on descending load). Only experts that received some
    load count as used: a layer where fewer than ceil(frac * E) experts were used returns just those, and an
    all-zero layer returns the empty set (otherwise idle experts, e.g. those an elastic sub-model dropped, would
    enter by expert id and fake an overlap).
    """
    load = np.asarray(load_E, dtype=np.float64)
    if load.ndim != 1 or load.size == 0:
        raise ValueError(f"load_E: expected a [experts] vector, got shape {load.shape}")
    if not 0 < frac <= 1:
        raise ValueError(f"frac must be in (0, 1], got {frac}")
    k = max(1, math.ceil(frac * load.size - 1e-9))  # 0.1 * 30 comes out a hair above 3
    order = np.argsort(-load, kind="stable")[:k]
    return {int(e) for e in order if load[e] > 0}


def iou_top(load_a_LE, load_b_LE, frac: float = 0.25) -> np.ndarray:
    """Per layer, intersection over union of the two tables' top-`frac` expert sets -> [L].

    NaN for a layer where both sets are empty (neither table routed anything there); 0 if only one is empty.
    """
    a, b = _as_LE(load_a_LE, "load_a_LE"), _as_LE(load_b_LE, "load_b_LE")
    if a.shape != b.shape:
        raise ValueError(f"load tables differ in shape: {a.shape} vs {b.shape}")
    out = np.empty(a.shape[0])
    for layer in range(a.shape[0]):
        sa, sb = top_experts(a[layer], frac), top_experts(b[layer], frac)
        union = len(sa | sb)
        out[layer] = len(sa & sb) / union if union else math.nan
    return out


def _mean_finite(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def ordered_names(names) -> list[str]:
    """text, image, video, audio first (those present), then the rest sorted."""
    names = list(names)
    return [m for m in MODALITY_ORDER if m in names] + sorted(n for n in names if n not in MODALITY_ORDER)


def iou_matrix(loads: dict, frac: float = 0.25) -> tuple[list[str], np.ndarray]:
    """(names, [M, M] top-set IoU averaged over layers) for every pair of load tables; layers where both are
    empty are left out of the mean (NaN if that is every layer)."""
    names = ordered_names(loads)
    M = len(names)
    mat = np.full((M, M), math.nan)
    for i in range(M):
        for j in range(i, M):
            mat[i, j] = mat[j, i] = _mean_finite(iou_top(loads[names[i]], loads[names[j]], frac))
    return names, mat


def _json_floats(x, ndigits: int = 4):
    """Nested lists of rounded floats with NaN -> None (strict JSON)."""
    if isinstance(x, np.ndarray):
        x = x.tolist()
    if isinstance(x, list):
        return [_json_floats(v, ndigits) for v in x]
    x = float(x)
    return round(x, ndigits) if math.isfinite(x) else None


def modality_report(loads: dict, frac: float = 0.25) -> dict:
    """A JSON-serialisable summary: per modality the routed slots, per-layer normalised entropy, max/mean load and
    top experts, plus the top-`frac` IoU matrix between modalities (NaN written as null)."""
    if not loads:
        raise ValueError("modality_report: no load tables")
    tables = {k: _as_LE(v, f"loads[{k!r}]") for k, v in loads.items()}
    shapes = {v.shape for v in tables.values()}
    if len(shapes) != 1:
        raise ValueError(f"load tables differ in shape: {sorted(shapes)}")
    (L, E), = shapes
    names, mat = iou_matrix(tables, frac)
    per = {}
    for name in names:
        a = tables[name]
        ent = normalised_entropy(a)
        per[name] = {
            "routed_slots": int(round(a.sum())),
            "entropy": _json_floats(ent),
            "mean_entropy": _json_floats(_mean_finite(ent[a.sum(1) > 0]) if a.any() else 0.0),
            "max_over_mean": _json_floats(max_over_mean(a)),
            "mean_max_over_mean": _json_floats(max_over_mean(a).mean()),
            "top_experts": [sorted(top_experts(row, frac)) for row in a],
        }
    return {"modalities": names, "num_layers": L, "num_experts": E, "top_frac": frac, "per_modality": per,
            "iou": {"names": names, "matrix": _json_floats(mat)}}


def format_report(report: dict) -> str:
    """A short text table: modality, mean entropy, mean max/mean load and its row of the IoU matrix."""
    names = report["modalities"]
    w = max(8, *(len(n) for n in names))
    head = f"{'modality':<{w}}  {'entropy':>7}  {'max/mean':>8}  " + "  ".join(f"{'IoU ' + n:>{max(8, len(n) + 4)}}"
                                                                         for n in names)
    lines = [head]
    for i, n in enumerate(names):
        p = report["per_modality"][n]
        ious = "  ".join(f"{'-' if v is None else f'{v:.2f}':>{max(8, len(names[j]) + 4)}}"
                         for j, v in enumerate(report["iou"]["matrix"][i]))
        lines.append(f"{n:<{w}}  {p['mean_entropy']:>7.3f}  {p['mean_max_over_mean']:>8.2f}  {ious}")
    return "\n".join(lines) + "\n"


# ---- reading a run directory ---------------------------------------------------------------------------------
def read_jsonl(path: Path) -> list[tuple[int, dict]]:
    """(line number, object) for every line of a log written one JSON object per line.

    Blank lines are skipped, and so is a corrupt *last* line (a write cut short by a crash or a reader racing the
    trainer); a corrupt line anywhere else is a UserError naming the line.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        raise UserError(str(path), "not found") from None
    except IsADirectoryError:
        raise UserError(str(path), "is a directory, expected a .jsonl file") from None
    lines = [(n, s) for n, s in enumerate(text.splitlines(), 1) if s.strip()]
    out = []
    for i, (n, s) in enumerate(lines):
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break  # half-written last line
            raise UserError(f"{path}:{n}", f"corrupt line (not JSON: {e.msg})") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path}:{n}", f"expected a JSON object, got {type(obj).__name__}")
        out.append((n, obj))
    return out


def _table(value, where: str) -> np.ndarray:
    try:
        a = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise UserError(where, "expected a [layers][experts] table of counts") from None
    if a.ndim != 2 or a.size == 0:
        raise UserError(where, f"expected a [layers][experts] table of counts, got shape {a.shape}")
    if not np.isfinite(a).all() or (a < 0).any():
        raise UserError(where, "counts must be finite and >= 0")
    return a


def _check_dir(run_dir) -> Path:
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(str(run_dir), "no such run directory")
    if not run_dir.is_dir():
        raise UserError(str(run_dir), "not a directory (expected a run directory)")
    return run_dir


def read_routing(run_dir, last: int | None = None) -> dict[str, np.ndarray]:
    """Expert loads of a run, {modality: [L, E] counts}, summed over routing.jsonl (or its `last` records).

    Uses the "load_by_modality" tables of the records that have them; a run without any (text-only, or written
    before they existed) gives {"all": sum of "load"}.
    """
    run_dir = _check_dir(run_dir)
    path = run_dir / "routing.jsonl"
    if not path.exists():
        raise UserError(str(path), "not found (the model has no MoE layers, or the run has not logged a step yet)")
    if last is not None and last < 1:
        raise UserError("--last", f"must be >= 1, got {last}")
    records = read_jsonl(path)
    if not records:
        raise UserError(str(path), "no routing records yet")
    if last is not None:
        records = records[-last:]
    by_mod: dict[str, np.ndarray] = {}
    total = None
    shape = None
    for n, rec in records:
        if "load" not in rec:
            raise UserError(f"{path}:{n}", 'no "load" table')
        tables = {"": _table(rec["load"], f"{path}:{n}: load")}
        mods = rec.get("load_by_modality") or {}
        if not isinstance(mods, dict):
            raise UserError(f"{path}:{n}", '"load_by_modality" must be an object {modality: [layers][experts]}')
        for m, v in mods.items():
            tables[m] = _table(v, f"{path}:{n}: load_by_modality.{m}")
        for m, a in tables.items():
            if shape is None:
                shape = a.shape
            elif a.shape != shape:
                what = "load" if m == "" else f"load_by_modality.{m}"
                raise UserError(f"{path}:{n}", f"{what} has shape {list(a.shape)}, earlier records {list(shape)} "
                                               "(a run dir reused with another model?)")
            if m == "":
                total = a if total is None else total + a
            else:
                by_mod[m] = by_mod[m] + a if m in by_mod else a
    if by_mod:
        return {m: by_mod[m] for m in ordered_names(by_mod)}
    return {"all": total}


def read_metrics(run_dir) -> list[dict]:
    """The records of RUN_DIR/metrics.jsonl (a half-written last line is skipped)."""
    run_dir = _check_dir(run_dir)
    return [rec for _, rec in read_jsonl(run_dir / "metrics.jsonl")]
