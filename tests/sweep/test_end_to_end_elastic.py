"""`evaluate: [{mode: elastic}]` end to end with the real trainer and evaluator: a 3-step tiny elastic MoE on the
session's prepared text, its final checkpoint evaluated by `ernie5 eval --mode elastic --batches 2`, the report's
elastic table built from the evaluation's file; a re-run skips everything, and a lost evaluation is redone
without training again."""

import json

from ernie5.runconfig import load_config
from ernie5.sweep.runner import read_marker
from tests.conftest import run_cli, tiny_overrides
from tests.sweep.helpers import write_sweep


def test_sweep_evaluates_the_elastic_grid(tmp_path, text_assets):
    _, tok, shards = text_assets
    cfg = load_config(None, tiny_overrides(tmp_path / "unused", shards, tok) + ["elastic.enabled=true"])
    (tmp_path / "base.yaml").write_text(cfg.to_yaml())
    sweep = write_sweep(tmp_path, """
kind: sweep
config: base.yaml
seeds: [5]
budget: {steps: 3}
evaluate:
  - {mode: elastic, batches: 2}
variants:
  elastic: {}
""")
    out = tmp_path / "out"
    env = {"OMP_NUM_THREADS": "1"}
    r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "evaluate elastic seed 5 (elastic, 2 batches)" in r.stdout and "[1/1] done elastic seed 5" in r.stdout
    run = out / "elastic" / "seed5"
    result = json.loads((run / "eval" / "step_00000003" / "elastic_eval.json").read_text())
    names = [row["submodel"] for row in result["rows"]]
    assert names == ["full", "depth=2", "experts=2", "top_k=1", "depth=2,experts=2,top_k=1"]
    assert read_marker(run)["evaluations"]["elastic"]["status"] == "done"
    report = (out / "report.md").read_text()
    section = report.split("## Elastic sub-models")[1].split("\n## ")[0]
    rows = [ln for ln in section.splitlines() if ln.startswith("| `")]
    assert [ln.split(" | ")[0][3:-1] for ln in rows] == names
    assert f"| {result['rows'][0]['loss']:.4f} |" in rows[0]

    r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env=env)
    assert r.returncode == 0 and "skip elastic seed 5" in r.stdout, r.stdout + r.stderr
    (run / "eval" / "step_00000003" / "elastic_eval.json").unlink()
    r = run_cli("sweep", str(sweep), "--out", str(out), timeout=300, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " start " not in r.stdout and "evaluate elastic seed 5" in r.stdout
    assert (run / "train.log").read_text().count("== attempt") == 1
    assert (out / "report.md").read_text() == report  # the same checkpoint evaluated again: the same numbers
