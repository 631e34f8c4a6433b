"""`ernie5 compare`: run directories -> DIR/report.md (+ report.json and PNG plots).

The report is deterministic: the same run directories give the same report.md byte for byte (variants in the
order given, seeds sorted, fixed number formats, no timestamps; the statistics involve no randomness).

Only finished runs enter the statistics, the same way for a sweep dir and for plain run dirs: a sweep dir's runs
whose marker does not say done are left out (a note names them), and a run whose metrics.jsonl has not reached its
config's `train.max_steps` is left out too (a note, and the runs table lists it as unfinished).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ernie5.errors import UserError
from ernie5.sweep.collect import TAIL, Group, RunResult, group_runs, read_run, size_with
from ernie5.sweep.curves import plot_curves, plot_ladder
from ernie5.sweep.ladder import fit_power_law, next_compute_by_ratio
from ernie5.sweep.runner import read_marker
from ernie5.sweep.stats import fmt, mean_std, paired, welch

SWEEP_FILE = "sweep.json"  # written by `ernie5 sweep` into its output dir


@dataclass
class LadderOptions:
    """Fit loss against compute; `next` = overrides on the last rung for the size to predict (None: one more
    step of the ladder's ratio)."""

    next: Optional[list[str]] = None


def _read_sweep_info(path: Path) -> tuple[str, list[str], Optional[list[str]], Optional[list[str]]]:
    """(title, run dirs relative to the sweep dir, ladder `next` or None without a ladder, declared variants) from
    a sweep's sweep.json; UserError naming the file when it is unreadable or not what `ernie5 sweep` writes."""
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
        title = f"sweep `{info['name']}` ({info['sweep_file']})"
        runs = info["runs"]
        if not isinstance(runs, list) or not all(isinstance(r, str) for r in runs):
            raise TypeError(f"`runs` is {runs!r}, expected a list of run dirs")
        ladder = info.get("ladder")
        nxt = None if ladder is None else [str(x) for x in (ladder.get("next") or [])]
        variants = info.get("variants")
        variants = None if variants is None else [str(v) for v in variants]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(str(path), f"unreadable ({type(e).__name__}: {e}); run `ernie5 sweep` again to rewrite "
                                   "it") from None
    return title, runs, nxt, variants


# ---- which runs -------------------------------------------------------------------------------------------
def resolve_targets(targets: list[str]) -> tuple[list[str], Optional[LadderOptions], list[str], str, list[str]]:
    """Run dirs (in order), ladder options, notes, a title and the variants the sweeps declared from RUN /
    SWEEP_DIR arguments. A sweep dir (with sweep.json) stands for its finished runs in the sweep's order; its ladder
    settings apply."""
    runs, notes, ladder, title, declared = [], [], None, "runs", []
    for t in targets:
        p = Path(t)
        if (p / SWEEP_FILE).is_file():
            title, rels, nxt, variants = _read_sweep_info(p / SWEEP_FILE)
            if nxt is not None:
                ladder = LadderOptions(next=nxt or None)
            declared += [v for v in variants or [] if v not in declared]
            for rel in rels:
                run_dir = str(p / rel)
                marker = read_marker(run_dir)
                if marker is not None and marker.get("status") == "done":
                    runs.append(run_dir)
                else:
                    status = "missing" if marker is None else marker.get("status")
                    notes.append(f"left out {run_dir}: not finished ({status})")
        elif (p / "metrics.jsonl").is_file():
            runs.append(str(p))
        else:
            raise UserError(t, "neither a run directory (metrics.jsonl) nor a sweep directory (sweep.json)")
    if not runs:
        raise UserError(" ".join(targets), "no finished runs to compare")
    return runs, ladder, notes, title, declared


# ---- formatting -------------------------------------------------------------------------------------------
def _ms(values: list[float], digits: int = 4) -> str:
    if not values:
        return "-"
    m, s = mean_std(values)
    return fmt(m, digits) if s is None else f"{fmt(m, digits)} ± {fmt(s, digits)}"


def _count(n: float) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{int(n):,}"


def _table(head: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows]


def _metric_keys(groups: list[Group], section: str) -> list[str]:
    keys = sorted({k for g in groups for r in g.runs for k in getattr(r, section)})
    if section == "train":  # the total first, then the terms
        keys = [k for k in keys if k == "loss"] + [k for k in keys if k != "loss"]
    else:
        sources = [k for k in keys if k != "val_loss"]
        if len(sources) == 1:  # one source: the overall held-out loss is that source's
            sources = []
        keys = [k for k in keys if k == "val_loss"] + sources
    return keys


def _label(section: str, key: str) -> str:
    if section == "heldout":
        return "held-out loss" if key == "val_loss" else f"held-out {key.split('/', 1)[1]}"
    return "train loss" if key == "loss" else f"train {key[len('loss_'):]}"


# ---- sections ---------------------------------------------------------------------------------------------
def _main_table(groups: list[Group]) -> list[str]:
    base = groups[0]
    head = ["variant", "seeds", "train loss", "held-out loss", f"Δ held-out vs {base.variant} [95% CI] (Welch)",
            "tokens/s (median)", "params total / active"]
    rows = []
    for g in groups:
        delta = "baseline"
        if g is not base:
            a, b = base.values("heldout", "val_loss"), g.values("heldout", "val_loss")
            delta = welch(a, b).text() if a and b else "n/a (no held-out loss)"
        tps = [r.tokens_per_s for r in g.runs if r.tokens_per_s is not None]
        r0 = g.runs[0]
        rows.append([g.variant, ", ".join(str(r.seed) for r in g.runs), _ms(g.values("train", "loss")),
                     _ms(g.values("heldout", "val_loss")), delta, _ms(tps, 0) if tps else "-",
                     f"{_count(r0.total_params)} / {_count(r0.active_params)}"])
    return _table(head, rows)


def _detail_table(groups: list[Group]) -> list[str]:
    cols = [("heldout", k) for k in _metric_keys(groups, "heldout")] + \
           [("train", k) for k in _metric_keys(groups, "train")]
    rows = [[g.variant] + [_ms(g.values(s, k)) for s, k in cols] for g in groups]
    return _table(["variant"] + [_label(s, k) for s, k in cols], rows)


def _differences(groups: list[Group]) -> list[str]:
    base = groups[0]
    rows = []
    for g in groups[1:]:
        for section in ("heldout", "train"):
            for key in _metric_keys(groups, section):
                a, b = base.values(section, key), g.values(section, key)
                if a and b:
                    rows.append([g.variant, _label(section, key), welch(a, b).text(),
                                 paired(base.by_seed(section, key), g.by_seed(section, key)).text()])
    if not rows:
        return []
    return [f"Every metric against the baseline `{base.variant}`: difference of seed means (variant - baseline) "
            "with Welch's 95% interval and two-sided p, and the paired test over the seeds both ran (the mean of "
            "the per-seed differences; t with n - 1 degrees of freedom). A seed fixes the initialisation and the "
            "data order, so the paired test removes the noise both variants share.", ""] + \
        _table(["variant", "metric", "Δ Welch [95% CI] p", "Δ paired by seed [95% CI] p"], rows)


def _routing_table(groups: list[Group]) -> list[str]:
    with_routing = [g for g in groups if all(r.routing for r in g.runs)]
    if not with_routing:
        return []
    mods = []
    for g in with_routing:
        for r in g.runs:
            mods += [m for m in r.routing["modalities"] if m not in mods]
    pairs = [(a, b) for i, a in enumerate(mods) for b in mods[i + 1:]]
    head = ["variant"] + [f"entropy {m}" for m in mods] + [f"max/mean {m}" for m in mods] + \
           [f"IoU {a}/{b}" for a, b in pairs]
    rows = []
    for g in with_routing:
        row = [g.variant]
        for field in ("mean_entropy", "mean_max_over_mean"):
            for m in mods:
                vals = [r.routing["per_modality"][m][field] for r in g.runs if m in r.routing["per_modality"]]
                row.append(_ms([v for v in vals if v is not None], 3))
        for a, b in pairs:
            vals = []
            for r in g.runs:
                names = r.routing["iou"]["names"]
                if a in names and b in names:
                    v = r.routing["iou"]["matrix"][names.index(a)][names.index(b)]
                    if v is not None:
                        vals.append(v)
            row.append(_ms(vals, 3))
        rows.append(row)
    frac = with_routing[0].runs[0].routing["top_frac"]
    return ["Expert load over the whole run (`ernie5.analysis.routing`): normalised load entropy (1 = balanced) and "
            f"max / mean load per modality, averaged over MoE layers; IoU of the top-{frac:.0%} expert sets between "
            "two modalities (0 = disjoint), averaged over layers; mean ± std over seeds. A run without per-modality "
            "loads shows one `all` column.", ""] + _table(head, rows)


def _elastic_section(groups: list[Group]) -> tuple[list[str], dict]:
    """One row per sub-model (grid order) of the runs' final-checkpoint elastic evaluations: per variant the
    held-out loss over seeds, per other variant its difference from the baseline (Welch and paired)."""
    evaluated = [g for g in groups if any(r.elastic for r in g.runs)]
    if not evaluated:
        return [], {}
    names: list[str] = []  # the grid's order, sub-models first seen in later variants appended
    for g in evaluated:
        for r in g.runs:
            for row in (r.elastic or {}).get("rows", []):
                if row["submodel"] not in names:
                    names.append(row["submodel"])

    def by_seed(g: Group, name: str) -> dict[int, float]:
        return {r.seed: row["loss"] for r in g.runs if r.elastic for row in r.elastic["rows"]
                if row["submodel"] == name}

    def active(name: str) -> str:
        counts = []
        for g in evaluated:
            for r in g.runs:
                counts += [row["active_params"] for row in (r.elastic or {}).get("rows", [])
                           if row["submodel"] == name and row["active_params"] not in counts]
        return " / ".join(_count(c) for c in counts)

    base = groups[0]
    others = [g for g in evaluated if g is not base]
    head = ["sub-model", "active params"] + [f"{g.variant}" for g in evaluated]
    for g in others:
        head += [f"Δ {g.variant} vs {base.variant} (Welch) [95% CI] p", f"Δ {g.variant} (paired by seed) [95% CI] p"]
    rows, table = [], {}
    for name in names:
        row = [f"`{name}`", active(name)]
        for g in evaluated:  # variant -> sub-model -> seed -> loss
            table.setdefault(g.variant, {})[name] = {str(s): v for s, v in sorted(by_seed(g, name).items())}
        row += [_ms([v for _, v in sorted(by_seed(g, name).items())]) for g in evaluated]
        a = by_seed(base, name)
        for g in others:
            b = by_seed(g, name)
            if a and b:
                row += [welch([a[s] for s in sorted(a)], [b[s] for s in sorted(b)]).text(), paired(a, b).text()]
            else:
                row += ["n/a (no evaluation on one side)"] * 2
        rows.append(row)
    batches = sorted({r.elastic.get("batches") for g in evaluated for r in g.runs if r.elastic},
                     key=lambda x: (x is None, x))
    over = " / ".join("?" if b is None else str(b) for b in batches)
    lines = [f"Held-out loss of each sub-model of the final checkpoint (`ernie5 eval CKPT --mode elastic`, "
             f"`eval/step_<max_steps>/elastic_eval.json`; every sub-model on the same {over} held-out "
             "micro-batches), mean ± std over seeds, in the grid's order (full model, depth cuts, expert subsets, "
             "smaller top-k, the smallest combined cut)."
             + (f" Δ: variant - `{base.variant}` on the same sub-model, Welch's 95% interval and two-sided p, and the "
                "paired test over the seeds both ran." if others else "")
             + " Active parameters: one text token, counted on the sub-model's own config.", ""]
    missing = [f"{r.variant} seed {r.seed}" for g in groups for r in g.runs if not r.elastic]
    if missing:
        lines += [f"Without an elastic evaluation (left out here): {', '.join(missing)}.", ""]
    return lines + _table(head, rows), {"submodels": names, "loss": table}


def _ladder_section(groups: list[Group], opts: LadderOptions, out: Path,
                    missing: list[str] = ()) -> tuple[list[str], dict]:
    """The fit over the rungs with finished runs; the next-size prediction only when every rung (`missing`: the
    rungs without a finished run) is there, since `next` builds on the last rung and the ratio on the last two."""
    key = "val_loss" if all(g.values("heldout", "val_loss") for g in groups) else "loss"
    section = "heldout" if key == "val_loss" else "train"
    names = [g.variant for g in groups]
    computes = []
    for g in groups:
        cs = sorted({r.compute for r in g.runs})
        if len(cs) != 1:
            raise UserError(g.variant, f"seeds of one ladder rung differ in compute {cs}")
        computes.append(cs[0])
    losses = [mean_std(g.values(section, key))[0] for g in groups]
    if len(groups) < 2 or len(set(computes)) < 2:
        return [f"A ladder fit needs at least 2 sizes with different compute, got {len(groups)}."], {}
    fit = fit_power_law(computes, losses)
    last = groups[-1].runs[-1]
    c_next = pred = interval = None
    how = ""
    if missing:  # no prediction (see the docstring)
        pass
    elif opts.next:
        fpt, tokens, total, active = size_with(last.run_dir, opts.next)
        c_next = fpt * tokens
        how = (f"`ladder.next` ({', '.join(opts.next)}) on top of `{last.variant}`: {_count(total)} total / "
               f"{_count(active)} active params, {fpt:.4g} FLOPs/token x {tokens:,} tokens")
    else:
        c_next = next_compute_by_ratio(computes)
        how = "one more step of the ladder's last compute ratio (C_last² / C_previous)"
    if c_next is not None:
        pred, interval = fit.predict(c_next), fit.predict_interval(c_next)
    rows = [[g.variant, _count(g.runs[0].total_params), _count(g.runs[0].active_params),
             f"{g.runs[0].flops_per_token:.4g}", f"{g.runs[0].tokens:,}", f"{c:.4g}", _ms(g.values(section, key))]
            for g, c in zip(groups, computes)]
    lines = [f"Loss: final {_label(section, key)} (mean over seeds). Compute C: planner training FLOPs per token x "
             "tokens trained. Fit: least squares of log L on log C (`ernie5.sweep.ladder`).", ""]
    lines += _table(["rung", "params total", "params active", "FLOPs/token", "tokens", "compute C (FLOPs)",
                     _label(section, key)], rows)
    if fit.b_lo is not None:
        b_text = (f"**b = {fit.b:.4f}**, 95% interval [{fit.b_lo:.4f}, {fit.b_hi:.4f}] (t with {fit.n - 2} degree"
                  f"{'s' if fit.n != 3 else ''} of freedom, SE {fit.se_b:.4f})")
    else:
        b_text = f"**b = {fit.b:.4f}** (2 points: an exact fit, no interval)"
    if missing:
        next_text = (f"Next size up: no prediction: rung(s) {', '.join(f'`{v}`' for v in missing)} have no finished "
                     "run (the prediction builds on the last rungs; finish them and compare again).")
    else:
        pred_text = f"{pred:.4f}" + (f" (95% prediction interval [{interval[0]:.4f}, {interval[1]:.4f}])"
                                     if interval else "")
        next_text = f"Next size up: {how}; C = {c_next:.4g} FLOPs -> predicted {_label(section, key)} {pred_text}."
    lines += ["", f"Fit: L(C) = {fit.a:.4g} · C^(-b), {b_text}, R² = {fit.r2:.4f}.", "", next_text, "",
              "![ladder](ladder_fit.png)"]
    plot_ladder(names, computes, losses, fit, None if missing else (c_next, pred, interval), out / "ladder_fit.png")
    summary = {"loss_key": key, "a": fit.a, "b": fit.b, "b_interval": [fit.b_lo, fit.b_hi], "r2": fit.r2,
               "compute": computes, "loss": losses, "next_compute": c_next, "next_loss": pred,
               "next_interval": list(interval) if interval else None, "missing_rungs": list(missing)}
    return lines, summary


def _runs_table(results: list[RunResult]) -> list[str]:
    rows = []
    for r in results:
        steps = f"{r.last_step}" + ("" if r.finished else f" of {r.max_steps} (unfinished, left out)")
        val = r.heldout.get("val_loss")
        rows.append([r.variant, str(r.seed), f"`{r.run_dir}`", steps, f"{r.train.get('loss', math.nan):.4f}",
                     "-" if val is None else f"{val:.4f}",
                     "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f}",
                     "-" if r.wall_s is None else f"{r.wall_s:.0f}"])
    return _table(["variant", "seed", "run dir", "steps", "train loss", "held-out loss", "tokens/s", "wall s"], rows)


# ---- the report -------------------------------------------------------------------------------------------
def compare(targets: list[str], out, ladder: Optional[LadderOptions] = None, tail: int = TAIL) -> Path:
    """Write OUT/report.md, OUT/report.json and the PNGs for RUN / SWEEP_DIR `targets`; returns report.md."""
    run_dirs, sweep_ladder, notes, title, declared = resolve_targets(list(targets))
    if sweep_ladder is not None and (ladder is None or not ladder.next):
        ladder = sweep_ladder  # `--ladder` alone: the sweep's own settings (its `ladder.next`)
    results = [read_run(d, tail) for d in run_dirs]
    for r in results:
        if not r.finished:
            notes.append(f"left out {r.run_dir}: not finished (step {r.last_step} of {r.max_steps})")
    finished = [r for r in results if r.finished]
    if not finished:
        raise UserError(" ".join(targets), "no finished runs to compare")
    groups = group_runs(finished)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"# Comparison of {title}", "",
             f"{len(groups)} variant(s), {len(finished)} run(s); the baseline is the first variant, "
             f"`{groups[0].variant}`. Values are mean ± sample std over seeds.", ""]
    lines += [f"- {n}" for n in notes] + ([""] if notes else [])
    lines += ["## Final losses", ""] + _main_table(groups) + [""]
    lines += ["## Per source and per term", "",
              "Held-out loss per data source (with one source it is the overall held-out loss), and train loss per "
              "logged term (for unified runs `text`, `visual`, `audio` are the per-modality losses). The trainer "
              "does not log held-out loss per modality, so there is no held-out per-modality column.", ""]
    lines += _detail_table(groups) + [""]
    diff = _differences(groups)
    if diff:
        lines += ["## Differences from the baseline", ""] + diff + [""]
    routing = _routing_table(groups)
    if routing:
        lines += ["## Routing", ""] + routing + [""]
    summary: dict = {"variants": [g.variant for g in groups]}
    elastic, elastic_summary = _elastic_section(groups)
    if elastic:
        lines += ["## Elastic sub-models", ""] + elastic + [""]
        summary["elastic"] = elastic_summary
    if ladder is not None:
        rungs = declared + [r.variant for r in results if r.variant not in declared]
        have = {g.variant for g in groups}
        ladder_lines, summary["ladder"] = _ladder_section(groups, ladder, out, [v for v in rungs if v not in have])
        lines += ["## Scaling ladder", ""] + ladder_lines + [""]
    lines += ["## Curves", ""]
    for key, name, what in (("loss", "loss_curves.png", "train loss"), ("val_loss", "heldout_curves.png",
                                                                        "held-out loss")):
        if plot_curves(groups, key, what, out / name):
            lines += [f"![{what}]({name})", ""]
    lines += ["## Runs", ""] + _runs_table(results) + [""]
    lines += ["## Definitions", "",
              f"- final train loss (and each term): mean of the last {tail} logged values; final held-out loss: the "
              "last held-out evaluation (the same held-out batches every time).",
              "- Δ: mean(variant) - mean(baseline) over seeds with Welch's t-test (95% interval from t with "
              "Welch-Satterthwaite degrees of freedom, two-sided p); `n/a` with fewer than 2 seeds on a side.",
              "- tokens/s: median over logged steps; parameters from the planner (active: one text token).", ""]
    summary["runs"] = [{"variant": r.variant, "seed": r.seed, "run_dir": r.run_dir, "train": r.train,
                        "heldout": r.heldout, "tokens_per_s": r.tokens_per_s, "total_params": r.total_params,
                        "active_params": r.active_params, "compute": r.compute,
                        "elastic": None if r.elastic is None else {row["submodel"]: row["loss"]
                                                                   for row in r.elastic["rows"]}}
                       for r in finished]
    (out / "report.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path
