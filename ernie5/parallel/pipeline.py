"""The 1F1B pipeline schedule over blocking send / recv (Megatron-LM's non-interleaved schedule).

Stage s of P runs min(P - s - 1, M) warm-up forwards, then alternates one forward and one backward, then drains
the remaining backwards; so at most P - s micro-batches' activations are alive on stage s, not M. Every stage
reads the same micro-batches (positions, masks and labels come from the batch); activations [B, S, H] (a
sequence shard under sequence parallelism) go forward and their gradients backward between neighbours.

Every send / recv goes through the 2-rank group of the two neighbours: on the whole-world group gloo matches a
rank's point-to-point messages by a per-process sequence, so a middle stage (which talks to two peers) waits
forever for its second peer's first message (measured with 4 ranks: 0 -> 1 arrives, 1 -> 2 never does).

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
    ranks: tuple = ()  # every stage's global rank, in stage order
    links: dict = field(default_factory=dict)  # neighbour's global rank -> the 2-rank group for send / recv

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


def _send(t: paddle.Tensor, dst: int, links: dict) -> None:
    """Activations and their gradients travel as fp32 (under bf16 AMP too: one buffer type on both ends)."""
    t = t if t.dtype == paddle.float32 else t.astype("float32")
    dist.send(t.contiguous() if hasattr(t, "contiguous") else t, dst=dst, group=links.get(dst))


def _recv(shape: list[int], src: int, links: dict) -> paddle.Tensor:
    buf = paddle.empty(shape, dtype="float32")
    dist.recv(buf, src=src, group=links.get(src))
    return buf


class OneFOneB:
    """Runs one optimizer step's micro-batches through this rank's stage.

    `forward(batch, pipe_in)` returns (output to send, or the loss object on the last stage, aux or None);
    the loss object has `.total` and `.terms`. `shape(batch)`: the activation shape this stage receives."""

    def __init__(self, pipe: PipeGroup, forward: Callable, shape: Callable, accum: int,
                 poison: Callable = lambda loss, mb: loss):
        self.pipe, self.forward, self.shape, self.accum, self.poison = pipe, forward, shape, accum, poison
        self.virtual = 1

    # ---- paired and single exchanges ----------------------------------------------------------------------
    def _exchange(self, send: Optional[paddle.Tensor], peer: int, recv_shape: Optional[list[int]]):
        """Send `send` to and receive a tensor of `recv_shape` from `peer`, in the parity order."""
        got = None
        if self.pipe.stage % 2 == 0:
            if send is not None:
                _send(send, peer, self.pipe.links)
            if recv_shape is not None:
                got = _recv(recv_shape, peer, self.pipe.links)
        else:
            if recv_shape is not None:
                got = _recv(recv_shape, peer, self.pipe.links)
            if send is not None:
                _send(send, peer, self.pipe.links)
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
            out, aux = self.forward(batches[mb], x_in, submodels[mb], 0)
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
                outs, grads = [y], [grad.astype(y.dtype)]
                if aux is not None:
                    outs.append(aux / self.accum)
                    grads.append(paddle.ones_like(aux))
                paddle.autograd.backward(outs, grads)
            return None if x_in is None else x_in.grad

        def recv_prev(mb: int):
            return None if p.first else _recv(self.shape(batches[mb]), p.prev, p.links)
        for mb in range(warmup):
            y = fwd(mb, recv_prev(mb))
            _send(y, p.next, self.pipe.links)
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
                    _send(dx, p.prev, self.pipe.links)
            elif not p.first:
                x = self._exchange(dx, p.prev, self.shape(batches[fwd_mb]))
            else:
                x = None
        for _ in range(warmup):
            g = _recv(self.shape(batches[bwd_mb]), p.next, self.pipe.links)
            dx = bwd(bwd_mb, g)
            bwd_mb += 1
            if not p.first:
                _send(dx, p.prev, self.pipe.links)
        return self._share(results, [0.0 if p.last else r.terms.get("loss_aux", 0.0) for r in results], p.last)

    @paddle.no_grad()
    def forward_only(self, batches: list, value: Callable) -> list[float]:
        """Forward passes only (held-out evaluation), one batch after another through every stage (and
        chunk): `value(loss object)` of each batch, on every stage. Each hand-over is one blocking pair."""
        p, V = self.pipe, self.virtual
        final = p.size * V - 1
        out_values = []
        for batch in batches:
            x = None
            for v in range(final + 1):
                s, c = v % p.size, v // p.size
                if s == p.stage:
                    out, _ = self.forward(batch, x, None, c)
                    if v == final:
                        out_values.append(float(value(out)))
                        break
                    _send(out, p.ranks[(s + 1) % p.size], self.pipe.links)
                elif (s + 1) % p.size == p.stage and v < final:
                    x = _recv(self.shape(batch), p.ranks[s], self.pipe.links)
        shared = paddle.to_tensor(np.array(out_values if p.last else [0.0] * len(batches), np.float64))
        dist.broadcast(shared, src=p.last_rank, group=p.group)
        return shared.numpy().tolist()

    def _share(self, results: list, aux_sum: list, final_here: bool) -> list[MicroResult]:
        """Every stage gets the step's losses: the values and terms of the stage that computed them, plus the
        balancing losses of every earlier stage / chunk (`aux_sum`, summed over the pipeline)."""
        p = self.pipe
        aux = paddle.to_tensor(np.array(aux_sum, np.float64))
        dist.all_reduce(aux, group=p.group)
        payload = json.dumps([[r.value, r.terms] for r in results]).encode() if final_here else b""
        n = paddle.to_tensor(np.array([len(payload)], np.int64))
        dist.broadcast(n, src=p.last_rank, group=p.group)
        buf = paddle.to_tensor(np.frombuffer(payload, np.uint8).copy() if final_here else
                               np.zeros(int(n.item()), np.uint8))
        dist.broadcast(buf, src=p.last_rank, group=p.group)
        shared = json.loads(bytes(buf.numpy().tobytes()).decode())
        out = []
        for (value, terms), extra in zip(shared, aux.numpy().tolist()):
            if extra:
                terms["loss_aux"] = terms.get("loss_aux", 0.0) + extra
            out.append(MicroResult(value + extra, terms))
        return out


# ---- interleaved 1F1B -----------------------------------------------------------------------------------------
def interleaved_order(stage: int, P: int, V: int, M: int) -> list[tuple[str, int, int]]:
    """Megatron's interleaved 1F1B order of (kind "F"/"B", micro-batch, local chunk) on `stage`: forwards go
    through the chunks in groups of P micro-batches, backwards through the chunks in reverse; (P - s - 1) * 2 +
    (V - 1) * P warm-up forwards, then one forward and one backward alternately, then the remaining backwards."""
    total = M * V

    def at(k: int, forward: bool) -> tuple[int, int]:
        c = (k // P) % V
        return (k // (P * V)) * P + k % P, c if forward else V - 1 - c

    warmup = min((P - stage - 1) * 2 + (V - 1) * P, total)
    order = [("F", *at(k, True)) for k in range(warmup)]
    for k in range(total - warmup):
        order += [("F", *at(warmup + k, True)), ("B", *at(k, False))]
    order += [("B", *at(k, False)) for k in range(total - warmup, total)]
    return order


def tick_table(P: int, V: int, M: int) -> list[list[Optional[tuple[str, int, int]]]]:
    """When each stage runs each action: ticks[t][s] is stage s's action at tick t (None: idle). An action runs
    at the first tick after its input arrived (activations and gradients produced at tick t arrive for t + 1)
    and after the stage's previous action; every stage computes the same table."""
    orders = [interleaved_order(s, P, V, M) for s in range(P)]
    pos = [0] * P
    done: dict[tuple[str, int, int], int] = {}  # (kind, micro-batch, virtual stage) -> tick it ran
    last_v = P * V - 1
    ticks = []
    while any(pos[s] < len(orders[s]) for s in range(P)):
        t = len(ticks)
        row: list = [None] * P
        for s in range(P):
            if pos[s] == len(orders[s]):
                continue
            kind, mb, c = orders[s][pos[s]]
            v = c * P + s
            need = (("F", mb, v - 1) if v > 0 else None) if kind == "F" else \
                (("B", mb, v + 1) if v < last_v else ("F", mb, v))
            if need is None or done.get(need, t) < t:
                row[s] = (kind, mb, c)
        for s, action in enumerate(row):
            if action is not None:
                done[(action[0], action[1], action[2] * P + s)] = t
                pos[s] += 1
        if not any(row):
            raise RuntimeError(f"pipeline schedule stalls (P={P}, V={V}, M={M})")
        ticks.append(row)
    return ticks


class Interleaved(OneFOneB):
    """Interleaved 1F1B (`parallel.virtual_pipeline` V > 1): each stage holds V chunks of layers and a
    micro-batch visits the stages V times, which cuts the pipeline bubble by V. Run in lock-step ticks
    (`tick_table`): each tick every stage runs at most one action, then the tick's messages are exchanged as
    blocking send / recv pairs in one global order (sender stage), which cannot deadlock whatever the ring's
    length: a pair's two ranks reach it only after every earlier pair has completed."""

    def __init__(self, pipe: PipeGroup, forward: Callable, shape: Callable, accum: int, virtual: int,
                 poison: Callable = lambda loss, mb: loss):
        super().__init__(pipe, forward, shape, accum, poison)
        self.virtual = virtual

    def run(self, batches: list, submodels: Optional[list] = None) -> list[MicroResult]:
        p, V, M = self.pipe, self.virtual, len(batches)
        P = p.size
        final = P * V - 1  # the virtual stage whose output is the loss
        submodels = submodels or [None] * M
        inbox: dict[tuple[str, int, int], paddle.Tensor] = {}  # (kind, micro-batch, local chunk) -> tensor
        saved: dict[tuple[int, int], tuple] = {}
        results = [MicroResult(0.0, {}) for _ in range(M)]
        aux_sum = [0.0] * M  # balancing losses of this rank's chunks before the final one
        for row in tick_table(P, V, M):
            outgoing = None
            if row[p.stage] is not None:
                kind, mb, c = row[p.stage]
                v = c * P + p.stage
                if kind == "F":
                    x_in = inbox.pop(("F", mb, c), None)
                    if x_in is not None:
                        x_in.stop_gradient = False
                    out, aux = self.forward(batches[mb], x_in, submodels[mb], c)
                    if v == final:
                        loss = self.poison(out.total, mb)
                        saved[(mb, c)] = (x_in, loss / self.accum, None)
                        results[mb] = MicroResult(float(loss), dict(out.terms))
                    else:
                        saved[(mb, c)] = (x_in, out, aux)
                        aux_sum[mb] += float(aux) if aux is not None else 0.0
                        outgoing = out
                else:
                    x_in, y, aux = saved.pop((mb, c))
                    if v == final:
                        y.backward()
                    else:
                        outs, grads = [y], [inbox.pop(("B", mb, c)).astype(y.dtype)]
                        if aux is not None:
                            outs.append(aux / self.accum)
                            grads.append(paddle.ones_like(aux))
                        paddle.autograd.backward(outs, grads)
                    outgoing = None if x_in is None else x_in.grad
            for key, tensor in self._exchange_tick(row, batches, outgoing):
                inbox[key] = tensor
        return self._share(results, aux_sum, final_here=p.last)

    def _exchange_tick(self, row: list, batches: list, outgoing):
        """This tick's messages as blocking pairs in stage order; yields what this rank received."""
        p, P, V = self.pipe, self.pipe.size, self.virtual
        for s, action in enumerate(row):
            if action is None:
                continue
            kind, mb, c = action
            v = c * P + s
            if (kind == "F" and v == P * V - 1) or (kind == "B" and v == 0):
                continue  # the loss, or the embedding: nothing to pass on
            to = (s + 1) % P if kind == "F" else (s - 1) % P
            to_chunk = (v + 1 if kind == "F" else v - 1) // P
            if s == p.stage:
                _send(outgoing, p.ranks[to], self.pipe.links)
            elif to == p.stage:
                yield (kind, mb, to_chunk), _recv(self.shape(batches[mb]), p.ranks[s], self.pipe.links)
