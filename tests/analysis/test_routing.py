"""Routing insight: load metrics with known answers, reading routing.jsonl, and `ernie5 viz routing` end to end."""

import ast
import json
import math

import numpy as np
import pytest

from ernie5.analysis.routing import (iou_matrix, iou_top, load_fractions, modality_report, normalised_entropy,
                                     read_routing, top_experts)
from ernie5.cli import main
from ernie5.errors import UserError
from tests.conftest import REPO, run_cli


# ---- metrics ---------------------------------------------------------------------------------------------------
def test_fractions_and_entropy_known_answers():
    load = np.array([[5, 5, 5, 5], [0, 7, 0, 0], [0, 0, 0, 0], [2, 2, 0, 0]])
    f = load_fractions(load)
    np.testing.assert_allclose(f[0], 0.25)
    np.testing.assert_allclose(f[1], [0, 1, 0, 0])
    np.testing.assert_array_equal(f[2], 0)  # zero row stays zero, no NaN
    ent = normalised_entropy(load)
    np.testing.assert_allclose(ent, [1.0, 0.0, 0.0, 0.5], atol=1e-12)  # two of four equally: log 2 / log 4


def test_top_experts_ties_and_idle():
    assert top_experts([1, 9, 3, 8, 0, 0, 0, 2], 0.25) == {1, 3}
    assert top_experts([5, 5, 5, 0, 0, 0, 0, 0], 0.25) == {0, 1}  # tie -> lower ids
    assert top_experts([0, 0, 0, 0, 0, 0, 4, 0], 0.25) == {6}  # idle experts never enter by id
    assert top_experts([0] * 8) == set()
    assert len(top_experts(np.arange(1, 31), 0.1)) == 3  # ceil(3.0000000000000004) must stay 3
    with pytest.raises(ValueError):
        top_experts([1, 2], 0.0)


def test_iou_identical_disjoint_partial():
    a = np.array([[9, 8, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 9, 8]])
    assert iou_top(a, a * 3).tolist() == [1.0, 1.0]  # identical up to scale
    b = np.array([[1, 1, 9, 8, 1, 1, 1, 1], [9, 8, 1, 1, 1, 1, 1, 1]])
    assert iou_top(a, b).tolist() == [0.0, 0.0]  # disjoint top-2 sets
    c = np.array([[1, 9, 8, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 9, 8, 1]])
    # layer 0: {0,1} vs {1,2} -> 1/3; layer 1: {6,7} vs {5,6} -> 1/3
    np.testing.assert_allclose(iou_top(a, c), [1 / 3, 1 / 3])
    # frac 0.5: layer 0 {0,1,2,3} (ties by id) vs {1,2,0,3} -> 1
    assert iou_top(a, c, frac=0.5)[0] == 1.0
    names, mat = iou_matrix({"image": b, "text": a, "audio": c})
    assert names == ["text", "image", "audio"]
    # image vs audio: layer 0 {2,3} vs {1,2} -> 1/3, layer 1 {0,1} vs {5,6} -> 0; mean 1/6
    np.testing.assert_allclose(mat, [[1, 0, 1 / 3], [0, 1, 1 / 6], [1 / 3, 1 / 6, 1]])


def test_iou_skips_layers_nobody_used():
    a = np.array([[9, 1, 0, 0], [0, 0, 0, 0]])
    assert iou_top(a, a)[0] == 1.0 and math.isnan(iou_top(a, a)[1])
    assert iou_matrix({"x": a})[1][0, 0] == 1.0  # mean over the layers that have data


def test_modality_report_is_json():
    rep = modality_report({"text": [[4, 0], [2, 2]], "image": [[0, 4], [0, 0]]})
    json.dumps(rep, allow_nan=False)
    assert rep["modalities"] == ["text", "image"]
    assert rep["per_modality"]["text"]["entropy"] == [0.0, 1.0]
    assert rep["per_modality"]["text"]["max_over_mean"] == [2.0, 1.0]
    assert rep["per_modality"]["image"]["mean_entropy"] == 0.0
    assert rep["iou"]["matrix"] == [[1.0, 0.0], [0.0, 1.0]]


# ---- reading a run dir ---------------------------------------------------------------------------------------
def _write_run(root, steps=4, modal=True, L=3, E=8):
    """A synthetic run dir: text prefers experts 0-1, image 2-3, video shares with image, audio 6-7."""
    rng = np.random.default_rng(0)
    prefs = {"text": [0, 1], "image": [2, 3], "video": [2, 4], "audio": [6, 7]}
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "routing.jsonl", "w") as fr, open(root / "metrics.jsonl", "w") as fm:
        for s in range(1, steps + 1):
            mods = {}
            for m, fav in prefs.items():
                t = rng.integers(0, 5, size=(L, E))
                t[:, fav] += 40
                mods[m] = t
            total = sum(mods.values())
            rec = {"step": s * 5, "load": total.tolist(), "max_over_mean": [1.0] * L, "entropy": [0.9] * L}
            if modal:
                rec["load_by_modality"] = {m: t.tolist() for m, t in mods.items()}
            fr.write(json.dumps(rec) + "\n")
            met = {"step": s * 5, "loss": 9.0 - s, "loss_text": 5.0 - s / 2, "loss_visual": 3.0 - s / 3,
                   "loss_audio": 2.0 - s / 4, "lr": 1e-3}
            if s % 2 == 0:
                met["val_loss"] = 9.2 - s
            fm.write(json.dumps(met) + "\n")
    return root


def test_read_routing_sums_and_skips_half_written_line(tmp_path):
    run = _write_run(tmp_path / "run", steps=3)
    lines = (run / "routing.jsonl").read_text().splitlines()
    full = read_routing(run)
    assert list(full) == ["text", "image", "video", "audio"]
    want = sum(np.array(json.loads(s)["load_by_modality"]["text"]) for s in lines)
    np.testing.assert_array_equal(full["text"], want)
    last = read_routing(run, last=1)
    np.testing.assert_array_equal(last["audio"], json.loads(lines[-1])["load_by_modality"]["audio"])
    with open(run / "routing.jsonl", "a") as f:
        f.write(lines[0][: len(lines[0]) // 2])  # a crash mid-write
    np.testing.assert_array_equal(read_routing(run)["text"], want)
    # a corrupt line that is not the last one is an error naming the line
    (run / "routing.jsonl").write_text(lines[0] + "\n{oops\n" + lines[1] + "\n")
    with pytest.raises(UserError, match=r"routing.jsonl:2"):
        read_routing(run)


def test_read_routing_fallback_and_errors(tmp_path):
    run = _write_run(tmp_path / "text_only", steps=2, modal=False)
    loads = read_routing(run)
    assert list(loads) == ["all"] and loads["all"].shape == (3, 8)
    with pytest.raises(UserError, match="no such run directory"):
        read_routing(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="routing.jsonl: not found"):
        read_routing(tmp_path / "empty")
    bad = tmp_path / "shape"
    bad.mkdir()
    (bad / "routing.jsonl").write_text('{"step": 1, "load": [[1, 2]]}\n{"step": 2, "load": [[1, 2, 3]]}\n')
    with pytest.raises(UserError, match="shape"):
        read_routing(bad)


# ---- CLI -------------------------------------------------------------------------------------------------------
def test_cli_viz_routing_writes_plots(tmp_path, capsys):
    run = _write_run(tmp_path / "run")
    assert main(["viz", "routing", str(run)]) == 0
    out = capsys.readouterr().out
    plots = run / "plots"
    for name in ("routing_heatmap.png", "routing_iou.png", "loss_by_modality.png"):
        p = plots / name
        assert str(p) in out
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and p.stat().st_size > 5000
    summary = json.loads((plots / "routing_summary.json").read_text())
    assert summary["modalities"] == ["text", "image", "video", "audio"]
    iou = dict(zip(summary["iou"]["names"], summary["iou"]["matrix"][0]))
    assert iou["text"] == 1.0 and iou["image"] == 0.0
    assert summary["iou"]["matrix"][1][2] == pytest.approx(1 / 3, abs=1e-4)  # image {2,3} vs video {2,4}
    assert "modality" in out and "video" in out
    other = tmp_path / "elsewhere"
    assert main(["viz", "routing", str(run), "--out", str(other), "--last", "1"]) == 0
    assert (other / "routing_iou.png").exists()


def test_cli_viz_missing_run_dir_is_one_line(tmp_path):
    r = run_cli("viz", "routing", str(tmp_path / "nope"), timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such run directory"]


def test_analysis_is_numpy_only():
    """No paddle import in the analysis modules (the `ernie5` package itself loads paddle for its thread setup),
    and matplotlib only when a plot is drawn."""
    for name in ("routing.py", "plots.py"):
        tree = ast.parse((REPO / "ernie5" / "analysis" / name).read_text())
        top = [a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names]
        top += [n.module for n in tree.body if isinstance(n, ast.ImportFrom)]
        every = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
        every += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
        assert not [m for m in every if m.split(".")[0] == "paddle"], name
        assert not [m for m in top if m.split(".")[0] == "matplotlib"], name
