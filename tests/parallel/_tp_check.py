"""Run under paddle.distributed.launch (2 or 4 ranks) by test_tensor_parallel.py: one forward / backward of a
tiny text MoE with MTP under the tensor-parallel layout given on the command line, checked against the same
model in one process, computed here on every rank from the same seed and batch.

Checks, each printed as `CHECK <name> <max error>` and asserted:
- the initial TP shards are the one-process weights cut per `tp_shard` (init equality);
- the loss (NTP + MTP + balancing) equals the one-process loss;
- the logits (each rank's vocabulary slice, gathered) equal the one-process logits;
- after `ParallelRuntime.sync_grads`, every parameter's gradient, gathered to its global shape over the TP group
  (and summed over data-parallel ranks by the runtime), equals the one-process gradient of the whole batch;
- the runtime's gradient norm equals the one-process norm;
- `model_state()` on rank 0 holds every global tensor whole.
"""

import os
import sys
from pathlib import Path

import numpy as np
import paddle

from ernie5.env import setup

setup()  # thread settings before paddle loads

from ernie5.runconfig import load_config  # noqa: E402
from ernie5.model.moe import ExpertPlacement  # noqa: E402
from ernie5.model.transformer import build_model, to_tensor_batch  # noqa: E402
from ernie5.parallel.expert_parallel import ExpertParallelDispatcher  # noqa: E402
from ernie5.objectives.text import make_text_batch, text_loss  # noqa: E402
from ernie5.parallel.runtime import ParallelRuntime  # noqa: E402
from ernie5.parallel.topology import init_topology  # noqa: E402
from ernie5.model.tensor_parallel import Shard  # noqa: E402
from ernie5.parallel.tp_state import gather_full, shard_of  # noqa: E402

TOL = 1e-5  # fp32: the TP sums regroup additions (rounding ~1e-7 relative per op, a few dozen ops deep)

UNIFIED = "--unified" in sys.argv  # the unified model (text, image, audio) of tests/objectives/test_unified.py
BF16 = "--bf16" in sys.argv  # emulated bf16 on both models: only the loss is compared (see below)
overrides = [a for a in sys.argv[1:] if a not in ("--unified", "--bf16")]
cfg = load_config(None, overrides)
if UNIFIED:  # its tiny multimodal model: 2 heads / 1 kv head (replicated over TP 2), MTP depth 1, vocab 48
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from tests.objectives.test_unified import make_batch, tiny_cfg  # noqa: E402
    from ernie5.objectives.config import ObjectiveConfig  # noqa: E402
    from ernie5.objectives.unified import UnifiedObjective  # noqa: E402

    cfg.model = tiny_cfg()
    cfg.model.vocab_size, cfg.model.mtp.depth = 48, 1
    cfg.model.moe.aux_loss_coef, cfg.model.moe.z_loss_coef = 0.01, 0.001
topo = init_topology(cfg.parallel)
tp = topo.tp
MTP = cfg.model.mtp.depth

with paddle.utils.unique_name.guard():
    ref = build_model(cfg.model, seed=3)
E = cfg.model.moe.num_experts
placement = (ExpertPlacement(topo.local_experts(E), ExpertParallelDispatcher(E, topo.ep, topo.ep_rank, topo.ep_group,
                                                                            native_alltoall=False))
             if topo.ep > 1 else None)
with paddle.utils.unique_name.guard():
    model = build_model(cfg.model, seed=3, tp=tp, placement=placement)
runtime = ParallelRuntime(model, cfg.optim, topo)
ref_params = dict(ref.named_parameters())


def check(name, got, want, tol=TOL):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    # error relative to the tensor's scale: sums regrouped over ranks differ by rounding relative to the
    # magnitudes summed, not to each (possibly cancelling) element
    # (floored at 1e-4, far below any real gradient here: a key bias's gradient is exactly 0 in exact arithmetic, softmax ignores a shift of all
    # scores, and both runs give rounding noise of ~1e-10 there)
    err = float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-4)) if got.size else 0.0
    print(f"CHECK {name} {err:.2e}", flush=True)
    assert err <= tol, (name, err)


for name, p in model.named_parameters():  # init equality (exact: the same draws, sliced)
    sh = shard_of(p)
    want = ref_params[runtime.to_global[name]].numpy() if sh is None else sh[0].take(ref_params[runtime.to_global[name]].numpy())
    assert np.array_equal(p.numpy(), want), f"init of {name} differs"
print("CHECK init 0", flush=True)

rng = np.random.default_rng(7)
S = 16
tokens = rng.integers(0, cfg.model.vocab_size, (2 * topo.dp, S + 1))
if UNIFIED:
    assert topo.dp == 1
    objectives = {id(m): UnifiedObjective(ObjectiveConfig(), 0.3, 48) for m in (ref, model)}
    full_batch = batch = to_tensor_batch(make_batch()[1])

    def loss_of(m, b):
        return objectives[id(m)].loss(m, b)
else:
    segments = np.repeat((np.arange(S + 1) >= 11).astype(np.int64)[None], 2 * topo.dp, 0)  # 2 documents per row
    mine = slice(2 * topo.dp_rank, 2 * topo.dp_rank + 2)
    full_batch = to_tensor_batch(make_text_batch(tokens, segments, MTP))
    batch = to_tensor_batch(make_text_batch(tokens[mine], segments[mine], MTP))

    def loss_of(m, b):
        return text_loss(m, b, cfg.model.mtp.loss_weight)

if BF16:
    # bf16 rounds every GEMM's operands and output; under TP a row-parallel GEMM rounds each rank's partial sum
    # and the vocab-parallel head keeps its logits fp32, so the runs are not equal: each rounding moves a value by
    # at most u = 2^-8 relative, and the loss (~ln V) by a few u relative. Checked: the TP loss is within 4u of
    # the one-process bf16 loss, and bf16 really ran (the TP loss moved from its fp32 value).
    from ernie5.model.mixed_precision import enable_bf16  # noqa: E402

    model.train()
    fp32_loss = float(loss_of(model, batch).total)
    for m in (ref, model):
        enable_bf16(m, cfg.precision)
    ref.train()
    want = float(loss_of(ref, batch).total)
    got = float(loss_of(model, batch).total)
    print(f"CHECK bf16_loss {abs(got - want) / abs(want):.2e} (fp32 {fp32_loss:.6f} bf16 {got:.6f})", flush=True)
    assert abs(got - want) <= 4 * 2 ** -8 * abs(want) and got != fp32_loss, (got, want, fp32_loss)
    print("TP_CHECK_DONE", flush=True)
    sys.exit(0)

ref.train()
loss_of(ref, full_batch).total.backward()
model.train()
loss = loss_of(model, batch)
loss.total.backward()
runtime.sync_grads()

# the loss of this rank's rows: the one-process loss of those rows (a second reference pass, no backward)
ref_part = loss_of(ref, batch)
check("loss", float(loss.total), float(ref_part.total))
for k in ref_part.terms:
    check(f"loss.{k}", loss.terms[k], ref_part.terms[k])

# data-parallel ranks average their gradients: the one-process reference is the mean of the rows' losses
# = the loss of the whole batch for NTP/MTP with equal token counts per rank (identical row layouts here)
for name, p in model.named_parameters():
    want = ref_params[runtime.to_global[name]].grad
    if p.grad is None:
        assert want is None or not np.any(want.numpy()), f"{name}: no TP gradient but a reference one"
        continue
    g = p.grad
    sh = shard_of(p)
    if sh is not None:
        g = gather_full(g, sh[0], sh[1], tp)
    check(f"grad.{name}", g.numpy(), want.numpy(), tol=TOL if topo.dp == 1 else 1e-4)

ref_norm = float(np.sqrt(sum(float((p.grad.astype("float64") ** 2).sum()) for p in ref.parameters()
                             if p.grad is not None)))
check("grad_norm", runtime.grad_norm(), ref_norm, tol=TOL if topo.dp == 1 else 1e-4)

model.eval()
ref.eval()
ids = paddle.to_tensor(tokens[:, :S])
logits = model(ids)
full = gather_full(logits, Shard(axis=2, shards=tp.degree, index=tp.rank), [*logits.shape[:2], cfg.model.vocab_size],
                   tp) if tp.active else logits
check("logits", full.numpy(), ref(ids).numpy())

state = runtime.model_state()
if topo.is_main:
    ref_state = ref.state_dict()
    for k, v in ref_state.items():
        if topo.ep > 1 and ".experts." in k:
            continue  # experts of other slices are written by their own ranks
        assert k in state and list(state[k].shape) == list(v.shape), f"model_state lacks {k} whole"
    print("CHECK model_state 0", flush=True)
print("TP_CHECK_DONE", flush=True)
# Every rank is done before any tears down, and none runs the interpreter's teardown of Paddle's gloo groups: once,
# under pytest-xdist load, a rank died there (launcher exit 245) after both ranks had printed TP_CHECK_DONE.
topo.barrier()
sys.stdout.flush()
sys.stderr.flush()
os._exit(0)
