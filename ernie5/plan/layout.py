"""Pipeline layout: how many consecutive layers each pipeline chunk holds.

`parallel.pipeline_layout` gives the layers per chunk explicitly (P x V numbers summing to num_layers; chunk c
runs on stage c % P). Without it, `parallel.pipeline_balance` decides: `even` (the default) splits the layer
count as evenly as possible, extra layers late; `compute` balances the planner's cost model: a layer costs its training
FLOPs per token (6 x its active matmul parameters + its attention scores: a MoE layer costs its top-k and shared
experts, a dense layer its FFN), the first chunk adds nothing for the embedding lookup, and the last chunk adds
the output head and the MTP depths (each a dense block plus the head again). Among the contiguous splits with
the smallest most expensive chunk, the even one is taken when it is among them, else the one with the latest
boundaries (stage 0 keeps the most micro-batches in flight under 1F1B).

Why `even` is the default: balancing compute moves layers onto the early stages, which under 1F1B also hold the
most micro-batches' activations; for the 300B reference layout that takes the worst stage from 71 GB to 82 GB
(over an 80 GB device). A cost model that weighs memory against the bubble is future work; `ernie5 plan` shows
both figures for either setting.
"""

from __future__ import annotations

from typing import Optional

from ernie5.model.pipeline import even_sizes
from ernie5.plan.params import _mtp_depth_params, layer_params


def layer_costs(cfg, seq_len: int) -> list[float]:
    """Training FLOPs per token of each layer (`cfg`: a ModelConfig)."""
    attention = 12 * seq_len * cfg.num_heads * cfg.dim_head
    return [6.0 * layer_params(cfg, i).active_params + attention for i in range(cfg.num_layers)]


def _head_cost(cfg, seq_len: int) -> float:
    head = 6.0 * cfg.hidden_size * cfg.vocab_size if cfg.vocab_size else 0.0
    depth = 6.0 * _mtp_depth_params(cfg) + 12 * seq_len * cfg.num_heads * cfg.dim_head
    return head * (1 + cfg.mtp.depth) + depth * cfg.mtp.depth


def balanced_sizes(costs: list[float], chunks: int, last_extra: float = 0.0) -> list[int]:
    """Layers per chunk minimising the most expensive chunk (contiguous, at least one layer each)."""
    L = len(costs)
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + c)

    def cost(a: int, b: int, last: bool) -> float:  # layers [a, b)
        return prefix[b] - prefix[a] + (last_extra if last else 0.0)

    # best[j][i]: the smallest possible maximum over the first j chunks holding layers [0, i)
    inf = float("inf")
    best = [[inf] * (L + 1) for _ in range(chunks + 1)]
    best[0][0] = 0.0
    for j in range(1, chunks + 1):
        for i in range(j, L - (chunks - j) + 1):
            best[j][i] = min(max(best[j - 1][k], cost(k, i, j == chunks and i == L)) for k in range(j - 1, i))
    target = best[chunks][L] * (1 + 1e-12)
    even = even_sizes(L, chunks)
    if max(cost(sum(even[:c]), sum(even[:c + 1]), c == chunks - 1) for c in range(chunks)) <= target:
        return even
    # otherwise the feasible split (every chunk's cost <= target) that puts the boundaries as late as possible
    sizes, end = [], L
    for j in range(chunks, 0, -1):
        start = next(k for k in range(j - 1, end) if best[j - 1][k] <= target
                     and cost(k, end, j == chunks) <= target)
        sizes.append(end - start)
        end = start
    return sizes[::-1]


def chunk_sizes(run_cfg) -> Optional[list[int]]:
    """Layers per pipeline chunk (P x virtual_pipeline of them) for a run config; None without a pipeline."""
    m, p = run_cfg.model, run_cfg.parallel
    chunks = p.pipeline * p.virtual_pipeline
    if p.pipeline == 1:
        return None
    if p.pipeline_layout is not None:  # checked against the model by RunConfig.validate
        return list(p.pipeline_layout)
    if p.pipeline_balance == "even":
        return even_sizes(m.num_layers, chunks)
    seq = run_cfg.data.seq_len
    return balanced_sizes(layer_costs(m, seq), chunks, _head_cost(m, seq))
