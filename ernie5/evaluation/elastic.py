"""`ernie5 eval CKPT --elastic`: held-out loss of the full model and a grid of its sub-models.

Every row runs the same held-out micro-batches through the full model with `submodel=...` (the in-model
sub-network; `extract` reproduces it exactly), so rows differ only in the sub-model. Parameters are counted on
the sub-model's own config. Writes `elastic_eval.json`, `elastic_eval.md` and `elastic_eval.png`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ernie5.elastic.extract import submodel_config
from ernie5.elastic.space import ElasticSpace
from ernie5.elastic.submodel import FULL
from ernie5.errors import UserError
from ernie5.plan import count_parameters


def _held_out_sets(cfg, n: int) -> dict[str, tuple[float, list[dict]]]:
    """Per text source of the run's mixture with held-out rows: (its weight, up to `n` distinct micro-batches from
    the start of its val split, as tensors)."""
    from ernie5.data.loader import PackedLoader
    from ernie5.data.shards import open_split
    from ernie5.model.transformer import to_tensor_batch
    from ernie5.objectives.text import make_text_batch

    sets = {}
    for src in cfg.data.resolved_sources(cfg.tokenizer.corpus):
        split = open_split(src.dir, "val")
        if split.num_tokens <= cfg.data.seq_len:
            continue
        probe = PackedLoader(split, cfg.data.seq_len, 1, cfg.run.seed, shuffle=False, where=f"{src.dir} (val)")
        rows = min(cfg.train.micro_batch_size, probe.num_rows)
        loader = PackedLoader(split, cfg.data.seq_len, rows, cfg.run.seed, shuffle=False)
        count = max(1, min(n, probe.num_rows // rows))
        sets[src.name] = (src.weight, [to_tensor_batch(make_text_batch(*loader.next(), cfg.model.mtp.depth))
                                       for _ in range(count)])
    if not sets:
        raise UserError(cfg.data.dir, "no source has held-out rows (raise data.val_fraction and prepare again)")
    return sets


def _loss(model, batches: list[dict], sub) -> float:
    """Token-weighted next-token loss over `batches`."""
    from ernie5.objectives.text import text_loss

    total = tokens = 0.0
    for batch in batches:
        out = text_loss(model, batch, 0.0, submodel=sub)
        total += out.terms["loss_ntp"] * out.tokens
        tokens += out.tokens
    return total / max(tokens, 1.0)


def _mixture_loss(model, sets: dict, sub) -> dict:
    """{"loss": the mixture's (sources weighted as in training), "loss/<source>": ...}."""
    from ernie5.train.tasks import overall_val_loss

    per = {name: _loss(model, batches, sub) for name, (_, batches) in sets.items()}
    out = {"loss": overall_val_loss(per, {name: w for name, (w, _) in sets.items()})}
    if len(per) > 1:
        out.update({f"loss/{name}": v for name, v in per.items()})
    return out


def evaluate_elastic(ckpt_path: str, out_dir: Optional[str] = None, batches: int = 16,
                     overrides: list[str] = (), grid: bool = True) -> tuple[list[dict], Optional[Path]]:
    """Evaluate the grid and write the table and plot; returns (rows, output dir). `grid=False`: the full model
    only, nothing written (plain `ernie5 eval`)."""
    import paddle

    from ernie5.runconfig import load_config
    from ernie5.train.checkpoint import build_model_from_checkpoint, resolve_checkpoint

    ckpt = resolve_checkpoint(ckpt_path)
    cfg = load_config(ckpt / "config.yaml", list(overrides))
    model = build_model_from_checkpoint(ckpt, cfg)
    subs = ElasticSpace(cfg.elastic, cfg.model, cfg.parallel.expert).grid() if grid else [("full", FULL)]
    sets = _held_out_sets(cfg, batches)
    n_batches = sum(len(b) for _, b in sets.values())
    rows_per_batch = int(next(iter(sets.values()))[1][0]["input_ids"].shape[0])
    rows = []
    with paddle.no_grad():
        for name, sub in subs:
            sub_cfg = submodel_config(cfg.model, sub, for_counting=True)
            pc = count_parameters(sub_cfg)
            rows.append({"submodel": name, "kind": sub.kind, "layers": sub_cfg.num_layers,
                         "experts": cfg.model.moe.num_experts if sub.experts is None else len(sub.experts),
                         "top_k": sub_cfg.moe.top_k if sub_cfg.moe.num_experts else 0,
                         "active_params": pc.active_params, "total_params": pc.total_params,
                         **_mixture_loss(model, sets, sub), "spec": sub.to_dict()})
    if not grid:
        return rows, None
    out = Path(out_dir) if out_dir else _default_out(ckpt)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"checkpoint": str(ckpt), "batches": n_batches, "sources": {n: len(b) for n, (_, b) in sets.items()},
            "tokens_per_row": cfg.data.seq_len, "rows_per_batch": rows_per_batch}
    (out / "elastic_eval.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
    (out / "elastic_eval.md").write_text(markdown_table(rows, f"Elastic eval of `{ckpt}` ({n_batches} held-out "
                                                              f"micro-batches)"))
    plot_loss_vs_active(rows, out / "elastic_eval.png", title=ckpt.parent.parent.name or str(ckpt))
    return rows, out


def _default_out(ckpt: Path) -> Path:
    """<run dir>/eval/<checkpoint name> for a training checkpoint, else <dir>_eval beside it."""
    if ckpt.parent.name == "checkpoints":
        return ckpt.parent.parent / "eval" / ckpt.name
    return ckpt.parent / f"{ckpt.name}_eval"


def markdown_table(rows: list[dict], title: str) -> str:
    full = rows[0]["loss"]
    lines = [f"### {title}", "", "| sub-model | layers | experts | top-k | active params | total params | loss | "
                                 "vs full |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['submodel']} | {r['layers']} | {r['experts']} | {r['top_k']} | {r['active_params']:,} | "
                     f"{r['total_params']:,} | {r['loss']:.4f} | {r['loss'] - full:+.4f} |")
    return "\n".join(lines) + "\n"


def plot_loss_vs_active(rows: list[dict], path: Path, title: str = "") -> None:
    """Scatter of held-out loss against active parameters, one labelled point per sub-model."""
    try:
        import matplotlib
    except ImportError:
        raise UserError("matplotlib", "not installed (pip install matplotlib); needed for the elastic eval plot") \
            from None
    matplotlib.use("Agg")  # files only: no display on training machines
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colors = {"full": "black", "depth": "tab:blue", "width": "tab:orange", "topk": "tab:green"}
    for r in rows:
        x, y = r["active_params"] / 1e6, r["loss"]
        ax.scatter([x], [y], color=colors.get(r["kind"], "tab:red"), zorder=3)
        ax.annotate(r["submodel"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    xs = np.array([r["active_params"] for r in rows]) / 1e6
    ax.set_xlim(xs.min() * 0.95, xs.max() * 1.08)
    ax.set_xlabel("active parameters (M)")
    ax.set_ylabel("held-out next-token loss")
    ax.set_title(f"elastic sub-models: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
