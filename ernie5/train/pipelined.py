"""The trainer's step and evaluation under pipeline parallelism: the task's micro-batches through this rank's
schedule (`ernie5.parallel.pipeline`), with the results every rank agrees on."""

from __future__ import annotations

import math

import numpy as np

from ernie5.model.mixed_precision import autocast
from ernie5.parallel.pipeline import Interleaved, OneFOneB


def schedule(tr, accum: int, poison=None) -> OneFOneB:
    """Trainer `tr`'s 1F1B schedule (interleaved with `parallel.virtual_pipeline` > 1) over `accum`
    micro-batches of its task."""
    cfg, tp, H = tr.cfg, tr.topo.tp, tr.cfg.model.hidden_size

    def shape(batch):  # the activation a stage receives: [B, S, H], a sequence shard under SP
        B, S = tr.task.batch_shape(batch)
        return [B, S // tp.degree if tp.sequence_parallel else S, H]

    def forward(batch, pipe_in, submodel=None, chunk=0):
        with autocast(cfg.precision):
            return tr.task.pipeline_forward(tr.model, batch, pipe_in, submodel, chunk)

    extra = {"poison": poison} if poison else {}
    V = cfg.parallel.virtual_pipeline
    if V > 1:
        return Interleaved(tr.topo.pipe, forward, shape, accum, V, **extra)
    return OneFOneB(tr.topo.pipe, forward, shape, accum, **extra)


def pipeline_micro_batches(tr, accum: int):
    """The step's micro-batches through the schedule: (mean loss, mean terms, None or the skip reason), the
    same on every rank."""
    run, step = tr.timer.run, tr.step + 1
    batches = [run("data", tr.task.batch, tr.task.train_loader) for _ in range(accum)]
    # elastic: the sampler is seeded by (step, micro-batch), so every stage trains the same sub-model
    subs = [tr.elastic.submodel_at(step, mb) if tr.elastic is not None else None for mb in range(accum)]
    sched = schedule(tr, accum, poison=lambda loss, mb: tr.faults.poison_loss(loss, step, mb))
    results = run("loss", sched.run, batches, subs)
    values = [r.value for r in results]
    bad_mb = next((mb for mb, v in enumerate(values) if not math.isfinite(v)), None)
    if tr.topo.any(bad_mb is not None):
        return 0.0, {}, {"reason": "non-finite loss", "micro_batch": bad_mb}
    terms: dict[str, float] = {}
    for mb, r in enumerate(results):
        if tr.elastic is not None:  # counted and recorded as the one-process loop does
            tr.elastic.sample(step, mb)
            tr.elastic.record_loss(r.value)
        for k, v in r.terms.items():
            terms[k] = terms.get(k, 0.0) + v / accum
    return float(np.mean(values)), terms, None


def pipeline_eval(tr, batches: list) -> float:
    """The mean held-out value of `batches` through the pipeline (forward only)."""
    return float(np.mean(schedule(tr, len(batches)).forward_only(batches, tr.task.held_out_value)))
