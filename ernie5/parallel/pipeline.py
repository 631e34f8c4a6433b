"""The 1F1B pipeline schedule over blocking send / recv (Megatron-LM's non-interleaved schedule).

Stage s of P runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one backward, then drains
the remaining backwards; so at most P - s micro-batches' activations are alive on stage s, not M. Every stage
reads the same micro-batches (positions, masks and labels come from the batch); activations [B, S, H] (a
sequence shard under sequence parallelism) go forward and their gradients backward between neighbours.

Paired exchanges with one neighbour ("send my output, receive its gradient") are ordered by stage parity: an
even stage sends first, an odd one receives first. Gloo's send returns only when the peer has posted the
matching receive, so two neighbours that both sent first would wait for each other forever; NCCL runs the same
order. (Fleet's own pipeline needs its batched p2p, which times out on gloo.)

The last stage's losses are the step's: after the schedule every stage receives them (broadcast over the
pipeline group) so skip / stop decisions, spike detection and logging agree; balancing losses of the MoE
layers on earlier stages are added to their own backward and summed into the logged total.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import paddle
import paddle.distributed as dist


@dataclass
class PipeGroup:
    """This rank's place in its pipeline: stage index, stage count, neighbours' global ranks, the group."""

    stage: int
    size: int
    prev: Optional[int]
    next: Optional[int]
    group: object
    last_rank: int  # the global rank of this pipeline's last stage (source of the step's losses)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.size - 1


@dataclass
class MicroResult:
    value: float  # the micro-batch's total loss (the last stage's, plus earlier stages' balancing losses)
    terms: dict = field(default_factory=dict)


def _send(t: paddle.Tensor, dst: int) -> None:
    dist.send(t.contiguous() if hasattr(t, "contiguous") else t, dst=dst)


def _recv(shape: list[int], src: int) -> paddle.Tensor:
    buf = paddle.empty(shape, dtype="float32")
    dist.recv(buf, src=src)
    return buf


class OneFOneB:
    """Runs one optimizer step's micro-batches through this rank's stage.

    `forward(batch, pipe_in)` returns (output to send, or the loss object on the last stage, aux or None);
    the loss object has `.total` and `.terms`. `shape(batch)`: the activation shape this stage receives."""

    def __init__(self, pipe: PipeGroup, forward: Callable, shape: Callable, accum: int,
                 poison: Callable = lambda loss, mb: loss):
        self.pipe, self.forward, self.shape, self.accum, self.poison = pipe, forward, shape, accum, poison

    # ---- paired and single exchanges ----------------------------------------------------------------------
    def _exchange(self, send: Optional[paddle.Tensor], peer: int, recv_shape: Optional[list[int]]):
        """Send `send` to and receive a tensor of `recv_shape` from `peer`, in the parity order."""
        got = None
        if self.pipe.stage % 2 == 0:
            if send is not None:
                _send(send, peer)
            if recv_shape is not None:
                got = _recv(recv_shape, peer)
        else:
            if recv_shape is not None:
                got = _recv(recv_shape, peer)
            if send is not None:
                _send(send, peer)
        return got

    def run(self, batches: list, submodels: Optional[list] = None) -> list[MicroResult]:
        """Forward and backward of every micro-batch (gradients accumulate in the parameters), micro-batch i
        through elastic sub-model `submodels[i]` (None: the full model); returns the step's per-micro-batch
        results, the same on every stage."""
        submodels = submodels or [None] * len(batches)
        p, M = self.pipe, len(batches)
        warmup = min(p.size - p.stage - 1, M)
        saved: dict[int, tuple] = {}
        results: list = [None] * M

        def fwd(mb: int, x_in):
            if x_in is not None:
                x_in.stop_gradient = False
            out, aux = self.forward(batches[mb], x_in, submodels[mb])
            if p.last:
                loss = self.poison(out.total, mb)
                saved[mb] = (x_in, loss / self.accum, None, None)
                results[mb] = MicroResult(float(loss), dict(out.terms))
                return None
            saved[mb] = (x_in, out, aux, None)
            results[mb] = MicroResult(0.0, {"loss_aux": float(aux)} if aux is not None else {})
            return out

        def bwd(mb: int, grad):
            x_in, y, aux, _ = saved.pop(mb)
            if p.last:
                y.backward()
            else:
                outs, grads = [y], [grad]
                if aux is not None:
                    outs.append(aux / self.accum)
                    grads.append(paddle.ones_like(aux))
                paddle.autograd.backward(outs, grads)
            return None if x_in is None else x_in.grad

        recv_prev = (lambda mb: _recv(self.shape(batches[mb]), p.prev)) if not p.first else (lambda mb: None)
        for mb in range(warmup):
            y = fwd(mb, recv_prev(mb))
            _send(y, p.next)
        fwd_mb, bwd_mb = warmup, 0
        x = recv_prev(fwd_mb) if M > warmup else None
        for i in range(M - warmup):
            y = fwd(fwd_mb, x)
            shape = self.shape(batches[fwd_mb])
            fwd_mb += 1
            g = self._exchange(y, p.next, shape) if not p.last else None
            dx = bwd(bwd_mb, g)
            bwd_mb += 1
            if i == M - warmup - 1:
                if not p.first:
                    _send(dx, p.prev)
            elif not p.first:
                x = self._exchange(dx, p.prev, self.shape(batches[fwd_mb]))
            else:
                x = None
        for _ in range(warmup):
            g = _recv(self.shape(batches[bwd_mb]), p.next)
            dx = bwd(bwd_mb, g)
            bwd_mb += 1
            if not p.first:
                _send(dx, p.prev)
        return self._share(results)

    @paddle.no_grad()
    def forward_only(self, batches: list, value: Callable) -> list[float]:
        """Forward passes only (held-out evaluation): `value(loss object)` of each batch, on every stage."""
        p = self.pipe
        out_values = []
        for batch in batches:
            x = _recv(self.shape(batch), p.prev) if not p.first else None
            out, _ = self.forward(batch, x)
            if p.last:
                out_values.append(float(value(out)))
            else:
                _send(out, p.next)
        shared = paddle.to_tensor(np.array(out_values if p.last else [0.0] * len(batches), np.float64))
        dist.broadcast(shared, src=p.last_rank, group=p.group)
        return shared.numpy().tolist()

    def _share(self, results: list) -> list[MicroResult]:
        """Every stage gets the step's losses: the last stage's values and terms, plus every stage's balancing
        losses (summed over the pipeline)."""
        p = self.pipe
        aux = paddle.to_tensor(np.array([0.0 if p.last else r.terms.get("loss_aux", 0.0) for r in results],
                                        np.float64))
        dist.all_reduce(aux, group=p.group)
        payload = json.dumps([[r.value, r.terms] for r in results]).encode() if p.last else b""
        n = paddle.to_tensor(np.array([len(payload)], np.int64))
        dist.broadcast(n, src=p.last_rank, group=p.group)
        buf = paddle.to_tensor(np.frombuffer(payload, np.uint8).copy() if p.last else
                               np.zeros(int(n.item()), np.uint8))
        dist.broadcast(buf, src=p.last_rank, group=p.group)
        shared = json.loads(bytes(buf.numpy().tobytes()).decode())
        out = []
        for (value, terms), extra in zip(shared, aux.numpy().tolist()):
            if extra:
                terms["loss_aux"] = terms.get("loss_aux", 0.0) + extra
            out.append(MicroResult(value + extra, terms))
        return out
