"""`ernie5 bench`: time full training steps, MFU against an in-process GEMM peak, and where the time goes.

Measurement plan (each part on the same Trainer, built with no callbacks into a temporary directory):
1. warm-up steps, then `steps` timed `train_step()` calls with nothing attached: the headline numbers.
2. GEMM peak right after, same process and threads: a 1024^3 GEMM and the model's own largest GEMM shape.
3. `breakdown_steps` instrumented steps: the trainer's own phase hooks (`Trainer.timer`, see
   `ernie5.train.timing`: data, loss, backward, gradient sync / norm / clip, optimizer and router updates),
   the model's probe (`ernie5.model.probe`: the attention's steps, RoPE, the mask, the head's loss) and
   Paddle's forward hooks on its layers time every phase in place (CPU kernels are synchronous, so the wall time inside a region is that phase's
   work). Times are exclusive (a phase nested in another is subtracted from it); the backward pass is one
   phase because autograd runs after, and outside, every forward; whatever no timer covers is `other`.
4. `--profile`: one step under `paddle.profiler` (op-level host times, grouped by the phase they ran in),
   then an isolated replay of the instrumented regions on the inputs they saw, to split the backward pass
   by phase (see `replay_backward`).
5. `Trainer.train()` with its default callbacks: the loop's own overhead (data, callbacks, logging), timed
   through the trainer's `step` and `data` hooks.
Nothing here replaces a name of the model or trainer code: the probe, the hooks and the trainer's timer
are attached at run time through the interfaces those offer, and detached afterwards.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter, defaultdict
from typing import Any, Callable, Optional

import paddle

from ernie5 import env, kernels
from ernie5.model.probe import NO_PROBE
from ernie5.runconfig import RunConfig
from ernie5.plan import count_parameters
from ernie5.train.perf import gemm_gflops

# Phases in report order. `glue` is residual adds / loss assembly between modules, `other` the step's own
# Python (lr, metrics) plus anything a refactor moved out of reach of the timers. The router bias and
# orthogonal updates are part of the optimizer step, so they count as `optimizer`.
PHASES = ("attention", "router", "dispatch_combine", "experts", "shared_expert", "dense_ffn", "norms_rope",
          "embedding", "head_loss", "glue", "backward", "grad_clip", "optimizer", "data", "other")
_LAYER_PHASES = {"Attention": "attention", "RMSNorm": "norms_rope", "Router": "router",
                 "MoELayer": "dispatch_combine", "Embedding": "embedding", "VocabEmbedding": "embedding", "Block": "glue",
                 "MTPModule": "glue"}


@dataclasses.dataclass
class BenchOptions:
    steps: int = 5  # timed steps (the median is reported)
    warmup: int = 2
    breakdown_steps: int = 2  # instrumented steps for the phase breakdown (0: none)
    overhead_steps: int = 3  # steady-state steps of Trainer.train() for the loop overhead (0: skip)
    profile: bool = False  # op-level profile + backward split by replay
    gemm_seconds: float = 0.5  # per GEMM peak measurement


# ---- GEMM peak (the probe itself is ernie5.train.perf.gemm_gflops, shared with the trainer's mfu) ----------
def largest_gemm(cfg: RunConfig) -> tuple[str, int, int, int]:
    """(name, m, k, n) of the model's biggest single GEMM in one micro-batch (by m*k*n; plain [m,k] x [k,n]
    layout, whatever transposes the model uses)."""
    mc, T = cfg.model, cfg.train.micro_batch_size * cfg.data.seq_len
    H, moe = mc.hidden_size, mc.moe
    cands = [("head", T, H, mc.vocab_size or 1), ("q_proj", T, H, mc.num_heads * mc.dim_head)]
    if any(not mc.is_moe_layer(i) for i in range(mc.num_layers)):
        cands.append(("dense_ffn gate_up", T, H, 2 * mc.ffn_hidden_size))
    if moe.num_experts:
        cands.append(("expert gate_up", max(T * moe.top_k // moe.num_experts, 1), H, 2 * moe.expert_ffn_size))
        if moe.num_shared_experts:
            cands.append(("shared_expert gate_up", T, H, 2 * moe.expert_ffn_size * moe.num_shared_experts))
    return max(cands, key=lambda c: c[1] * c[2] * c[3])


def measure_peak(cfg: RunConfig, seconds: float) -> dict:
    """The MFU denominator: the faster of a 1024^3 GEMM and the model's largest GEMM shape."""
    square = gemm_gflops(1024, 1024, 1024, seconds)
    name, m, k, n = largest_gemm(cfg)
    model = gemm_gflops(m, k, n, seconds)
    return {"square_1024_gflops": square, "model_gemm": {"name": name, "mkn": [m, k, n], "gflops": model},
            "peak_gflops": max(square, model),
            "peak_source": "1024x1024x1024" if square >= model else f"{name} {m}x{k}x{n}"}


# ---- phase timers ------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Capture:
    """A region's first call in a step: enough to replay it in isolation."""

    fn: Callable
    args: tuple
    kwargs: dict
    phase: str
    parent: Optional[str]


def _detached(x):
    """Same data, cut from the graph; float tensors that needed a gradient become leaves that need one."""
    if isinstance(x, paddle.Tensor):
        d = x.detach()
        d.stop_gradient = x.stop_gradient
        if getattr(x, "key_spans", None) is not None:  # an attention mask's tiles (`ernie5.model.attention`)
            d.key_spans = x.key_spans
        return d
    if isinstance(x, (list, tuple)):
        return type(x)(_detached(v) for v in x)
    if isinstance(x, dict):
        return {k: _detached(v) for k, v in x.items()}
    return x


def _tensors(x):
    if isinstance(x, paddle.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)
    elif dataclasses.is_dataclass(x) and not isinstance(x, type):
        for f in dataclasses.fields(x):
            yield from _tensors(getattr(x, f.name))


class PhaseTimer:
    """Nested regions -> exclusive seconds per phase; optionally profiler ranges and first-call captures.

    A region's key names the call site: `layers.1.attn:qkv` for a layer method, `<enclosing key>/apply_rope`
    for a probed function (so one function called from many layers gets one key per caller).
    """

    def __init__(self, record_events: bool = False, capture: bool = False):
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: Counter = Counter()
        self.captures: dict[str, Capture] = {}
        self.record_events, self.capture = record_events, capture
        self._stack: list[list] = []  # [phase, key, start, child seconds, profiler event]

    def enter(self, phase: str, key: str, fn=None, args=(), kwargs=None, scoped: bool = False) -> None:
        parent = self._stack[-1][1] if self._stack else None
        if scoped and parent is not None:
            key = f"{parent}/{key}"
        if self.capture and fn is not None and key not in self.captures:
            self.captures[key] = Capture(fn, _detached(tuple(args)), _detached(kwargs or {}), phase, parent)
        self.calls[key] += 1
        event = None
        if self.record_events:
            event = paddle.profiler.RecordEvent(f"bench/{phase}")
            event.begin()
        self._stack.append([phase, key, time.perf_counter(), 0.0, event])

    def exit(self) -> None:
        phase, _, start, child, event = self._stack.pop()
        elapsed = time.perf_counter() - start
        if event is not None:
            event.end()
        self.exclusive[phase] += elapsed - child
        if self._stack:
            self._stack[-1][3] += elapsed


def layer_phases(model) -> dict[str, str]:
    """Phase of every sublayer that has one (path -> phase).

    By class for the model's building blocks; under a MoE layer, anything below an attribute named
    `*shared*` / `*expert*` is shared / routed experts (so a batched expert module still lands there);
    any other sublayer takes its parent's phase (`attn.o_proj` is attention even when called directly).
    """
    phases: dict[str, str] = {}
    moe_paths: list[str] = []
    for path, layer in model.named_sublayers():  # parents come before their children
        cls = type(layer).__name__
        parent = path.rpartition(".")[0]
        moe = next((p for p in moe_paths if path.startswith(p + ".")), None)
        attr = path[len(moe) + 1:].split(".")[0] if moe else ""
        if cls in _LAYER_PHASES:
            phase = _LAYER_PHASES[cls]
        elif "shared" in attr:
            phase = "shared_expert"
        elif "expert" in attr:
            phase = "experts"
        elif cls in ("SwiGLU", "ParallelSwiGLU"):
            phase = "dense_ffn"
        else:
            phase = phases.get(parent)
        if cls == "MoELayer":
            moe_paths.append(path)
        if phase is not None:
            phases[path] = phase
    return phases


# trainer phase (ernie5.train.timing) -> bench phase; only the loss is captured for the --profile replay
_TRAINER_PHASES = {"data": "data", "loss": "glue", "backward": "backward", "sync": "grad_clip",
                   "grad_norm": "grad_clip", "clip": "grad_clip", "optimizer": "optimizer", "algorithm": "optimizer"}
_REPLAYABLE_TRAINER_PHASES = ("loss",)


class TrainerPhases:
    """The trainer's step timer (`Trainer.timer`) feeding a PhaseTimer: each trainer phase becomes a region
    `trainer.<phase>` of the matching bench phase (`other` for bookkeeping phases)."""

    def __init__(self, timer: PhaseTimer):
        self.timer = timer

    def run(self, phase: str, fn: Callable, *args, **kwargs):
        replay = fn if phase in _REPLAYABLE_TRAINER_PHASES else None
        self.timer.enter(_TRAINER_PHASES.get(phase, "other"), f"trainer.{phase}", replay, args, kwargs)
        try:
            return fn(*args, **kwargs)
        finally:
            self.timer.exit()


# the model's probed function calls (ernie5.model.probe) that every text step reaches
_PROBED_FUNCTIONS = ("rope_cos_sin", "group_mask", "apply_rope", "head_ce")


class ModelPhases:
    """The model's probe (`UnifiedModel.set_probe`, see `ernie5.model.probe`) and forward hooks feeding a
    PhaseTimer.

    A layer's own step (a bound method of a sublayer, like `attn.qkv`, and every sublayer's forward through
    Paddle's forward pre / post hooks) is region `<path>:<method>` of the phase `layer_phases` gives that
    path; a function the model runs through its probe (`apply_rope`, ...) is region `<enclosing key>/<name>`
    of the phase the call site names. Every region is captured for the --profile replay.
    """

    def __init__(self, timer: PhaseTimer, model):
        self.timer = timer
        self.phases = layer_phases(model)
        self.paths = {id(layer): path for path, layer in model.named_sublayers() if path in self.phases}
        self.reached: set[str] = set()  # probed function names that ran

    def run(self, phase: str, key: str, fn: Callable, *args, **kwargs):
        path = self.paths.get(id(getattr(fn, "__self__", None)))
        if path is not None:
            self.timer.enter(self.phases[path], f"{path}:{key}", fn, args, kwargs)
        else:
            self.reached.add(key)
            self.timer.enter(phase, key, fn, args, kwargs, scoped=True)
        try:
            return fn(*args, **kwargs)
        finally:
            self.timer.exit()

    def hook_forwards(self, model) -> list:
        """Forward pre / post hooks on every sublayer with a phase; returns their handles (`.remove()`)."""
        handles = []
        for path, layer in model.named_sublayers():
            if path not in self.phases:
                continue
            phase, key = self.phases[path], f"{path}:forward"

            def enter(layer, args, kwargs, phase=phase, key=key):
                self.timer.enter(phase, key, layer.forward, args, kwargs)

            def exit_(layer, args, output):
                self.timer.exit()

            handles.append(layer.register_forward_pre_hook(enter, with_kwargs=True))
            handles.append(layer.register_forward_post_hook(exit_, always_call=True))  # also when forward raises
        return handles


@contextlib.contextmanager
def instrument(tr, timer: PhaseTimer):
    """Attach `timer` to the trainer's and the model's hooks; everything is detached on exit.

    Trainer: its `timer` hook (data, loss, backward, gradient sync / norm / clip, optimizer). Model: its probe
    (the attention's q/k/v and core steps, RoPE tables and rotation, the attention mask, the text head's loss)
    and forward hooks on its layers (`ModelPhases`). Yields a list that, on exit, holds the probed functions no
    step reached (a call site no longer probed: its time then shows up in the enclosing phase).
    """
    model = tr.model
    probe = ModelPhases(timer, model)
    missing: list[str] = []
    handles = probe.hook_forwards(model)
    model.set_probe(probe)
    previous, tr.timer = tr.timer, TrainerPhases(timer)
    try:
        yield missing
    finally:
        tr.timer = previous
        model.set_probe(NO_PROBE)
        for handle in handles:
            handle.remove()
        missing += [name for name in _PROBED_FUNCTIONS if name not in probe.reached]


def timed_step(tr, timer: Optional[PhaseTimer] = None) -> float:
    """Wall seconds of one `train_step()`; with a timer, the step itself is the root region (`other`)."""
    start = time.perf_counter()
    if timer is None:
        tr.train_step()
    else:
        timer.enter("other", "train_step")
        try:
            tr.train_step()
        finally:
            timer.exit()
    return time.perf_counter() - start


def breakdown(tr, steps: int) -> dict:
    """Mean seconds per phase over `steps` instrumented steps; `other` is the uncovered remainder."""
    timer = PhaseTimer()
    with instrument(tr, timer) as missing:
        walls = [timed_step(tr, timer) for _ in range(steps)]
    step_s = sum(walls) / steps
    per_phase = {p: timer.exclusive.get(p, 0.0) / steps for p in PHASES}
    return {"step_s": step_s, "seconds": per_phase, "fractions": {p: s / step_s for p, s in per_phase.items()},
            "missing": missing}


# ---- --profile: op table and backward split ----------------------------------------------------------------
def _op_name(name: str) -> str:
    """'matmul dygraph' -> 'matmul'; 'Global_MatmulGradNode' -> 'MatmulGradNode'."""
    return name.removeprefix("Global_").removesuffix(" dygraph")


def op_table(result, step_s: float, top: int = 25) -> list[dict]:
    """Host time of top-level operators (forward kernels, backward grad nodes, optimizer kernels), keyed by
    the innermost bench phase they ran in, from a `paddle.profiler` result."""
    from paddle.profiler.profiler_statistic import TracerEventType

    acc: dict[tuple[str, str], list] = defaultdict(lambda: [0, 0.0])

    def walk(node, phase):
        for child in node.children_node:
            if child.type == TracerEventType.PythonUserDefined and child.name.startswith("bench/"):
                walk(child, child.name[len("bench/"):])
            elif child.type == TracerEventType.Operator:
                item = acc[(phase, _op_name(child.name))]  # outermost operator only: no double counting
                item[0] += 1
                item[1] += (child.end_ns - child.start_ns) / 1e9
            else:
                walk(child, phase)

    for root in result.get_data().values():
        walk(root, "other")
    rows = [{"phase": ph, "op": op, "calls": n, "s": s, "fraction": s / step_s} for (ph, op), (n, s) in acc.items()]
    rows.sort(key=lambda r: -r["s"])
    return rows[:top]


def _replay(cap: Capture, reps: int = 2) -> tuple[float, float]:
    """(forward s, backward s) of one captured call run alone: min over `reps` (warm caches, little noise).

    The backward is seeded with ones for every float output that needs a gradient, which computes the same
    grad kernels the real step runs (it may also differentiate an output the real loss ignores).
    """
    fwd, bwd = float("inf"), float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        out = cap.fn(*cap.args, **cap.kwargs)
        fwd = min(fwd, time.perf_counter() - start)
        outs = [t for t in _tensors(out) if not t.stop_gradient and paddle.is_floating_point(t)]
        if not outs:
            return fwd, 0.0
        seeds = [paddle.ones_like(t) for t in outs]
        start = time.perf_counter()
        paddle.autograd.backward(outs, seeds)
        bwd = min(bwd, time.perf_counter() - start)
    return fwd, bwd


def replay_backward(timer: PhaseTimer) -> dict:
    """Forward and backward seconds per phase per step, from replaying captured calls in isolation.

    A region's per-step cost is its replay time x its calls in the step; a phase gets that minus the
    replayed regions nested in it (the same nesting as the forward timers). Only regions whose phase differs
    from their enclosing captured region are replayed (the others cannot change the per-phase totals).
    A region that fails to replay leaves its time inside its parent's phase.
    """
    caps = timer.captures

    def enclosing(key, keep):
        parent = caps[key].parent
        while parent is not None and parent in caps and not keep(parent):
            parent = caps[parent].parent
        return parent if parent in caps else None

    wanted = [k for k in caps if (a := enclosing(k, lambda _: True)) is None or caps[a].phase != caps[k].phase]
    per_step, failed = {}, []
    for key in wanted:
        try:
            per_step[key] = [x * timer.calls[key] for x in _replay(caps[key])]
        except Exception as e:  # inputs that cannot be reused alone (an in-place update, odd kwargs ...)
            failed.append(f"{key}: {type(e).__name__}: {e}"[:200])
    fwd, bwd = defaultdict(float), defaultdict(float)
    for key, (f, b) in per_step.items():
        fwd[caps[key].phase] += f
        bwd[caps[key].phase] += b
        parent = enclosing(key, lambda k: k in per_step)
        if parent is not None:
            fwd[caps[parent].phase] -= f
            bwd[caps[parent].phase] -= b
    return {"backward_s": dict(bwd), "forward_s": dict(fwd), "replayed": len(per_step), "failed": failed}


def profile_step(tr) -> dict:
    """One step under paddle.profiler with phase ranges (op table), then the replay split of the backward."""
    import paddle.profiler as profiler

    timer = PhaseTimer(record_events=True, capture=True)
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU])
    with instrument(tr, timer):
        prof.start()
        wall = timed_step(tr, timer)
        prof.step()
        prof.stop()
    ops = op_table(prof.profiler_result, wall)
    replay = replay_backward(timer)
    for p in tr.model.parameters():  # the replays accumulated into parameter gradients
        p.clear_gradient(False)
    return {"profiled_step_s": wall, "ops": ops, "replay": replay}


def split_backward(brk: dict, replay: dict) -> dict:
    """The breakdown with the in-place backward total spread over phases by the replay; the part of the real
    backward the replay does not account for is `backward_unattributed` (negative if replays ran slower).
    `replay_forward_ratio` (replayed / in-place forward) says how well replays reproduce the real step."""
    seconds = dict(brk["seconds"])
    total_bwd = seconds.pop("backward")
    for phase, s in replay["backward_s"].items():
        seconds[phase] = seconds.get(phase, 0.0) + s
    seconds["backward_unattributed"] = total_bwd - sum(replay["backward_s"].values())
    in_place_fwd = sum(s for p, s in brk["seconds"].items() if p in replay["forward_s"])
    return {"seconds": seconds, "fractions": {p: s / brk["step_s"] for p, s in seconds.items()},
            "replay_forward_ratio": sum(replay["forward_s"].values()) / max(in_place_fwd, 1e-12)}


# ---- the loop's own overhead -------------------------------------------------------------------------------
class _Clock:
    """Last callback: stamps the end of every loop iteration (after all other callbacks)."""

    def __init__(self):
        self.stamps: list[float] = []

    def on_step_end(self, tr, metrics):
        self.stamps.append(time.perf_counter())

    def on_train_end(self, tr):
        pass


class _LoopTimer:
    """The trainer's step timer for `train_overhead`: wall seconds of every step, and of the micro-batch data
    inside each step (an evaluation's batches are callback time: they do not go through the `data` hook)."""

    def __init__(self):
        self.step_s: list[float] = []
        self.data_s: list[float] = []
        self._in_step = False

    def run(self, phase: str, fn: Callable, *args, **kwargs):
        if phase == "step":
            self.data_s.append(0.0)
            self._in_step = True
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            elapsed = time.perf_counter() - start
            if phase == "step":
                self.step_s.append(elapsed)
                self._in_step = False
            elif phase == "data" and self._in_step:
                self.data_s[-1] += elapsed


def train_overhead(tr, steps: int) -> dict:
    """Share of `ernie5 train`'s time that is not the model step: data loading, callbacks, logging, loop
    bookkeeping, plus periodic evaluation and checkpoints amortised over their intervals.

    `Trainer.train()` runs with the default callbacks for 1 + N + 1 iterations, N = max(steps, log interval)
    so the window holds a logging step. Evaluation and checkpointing are switched off inside the window (the
    trainer runs on a copy of its config for it) and costed apart: one `evaluate()` call / eval_interval, and
    the final checkpoint (the last iteration's extra time) / checkpoint.interval (or / max_steps when only the
    final one is written). Log lines go to a buffer (their formatting cost is kept).
    """
    t_cfg, c_cfg = tr.cfg.train, tr.cfg.checkpoint
    eval_every, ckpt_every, run_steps = t_cfg.eval_interval, c_cfg.interval, t_cfg.max_steps
    steps = max(steps, t_cfg.log_interval)
    clock, loop_timer = _Clock(), _LoopTimer()
    window = copy.deepcopy(tr.cfg)
    window.train.max_steps, window.train.eval_interval, window.checkpoint.interval = tr.step + steps + 2, 0, 0
    saved = tr.cfg, tr.callbacks, tr.timer
    tr.cfg, tr.callbacks, tr.timer = window, tr.default_callbacks() + [clock], loop_timer
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            tr.train()
            tr.cfg = saved[0]
            eval_s = 0.0
            if eval_every and tr.task.val_loaders:
                start = time.perf_counter()
                tr.evaluate()
                eval_s = time.perf_counter() - start
    finally:
        tr.cfg, tr.callbacks, tr.timer = saved
    step_s, data_s = loop_timer.step_s, loop_timer.data_s
    loops = [b - a for a, b in zip(clock.stamps, clock.stamps[1:])]  # iterations 2 .. steps + 2
    loop, step, data = sum(loops[:steps]), sum(step_s[1:steps + 1]), sum(data_s[1:steps + 1])
    per_step = (loop - step + data) / steps  # data + callbacks + logging + loop
    ckpt_s = loops[-1] - step_s[-1] - (loop - step) / steps  # the final iteration's extra time
    amortised = {"eval_s": eval_s / eval_every if eval_every else 0.0,
                 "checkpoint_s": max(ckpt_s, 0.0) / (ckpt_every or run_steps)}
    extra = sum(amortised.values())
    return {"fraction": (per_step + extra) / (loop / steps + extra), "steady_fraction": per_step * steps / loop,
            "loop_s": loop / steps, "data_s": data / steps, "callbacks_and_loop_s": (loop - step) / steps,
            "steps": steps, "checkpoint_s": ckpt_s, "evaluate_s": eval_s, "amortised": amortised}


# ---- the command -------------------------------------------------------------------------------------------
def _peak_rss_mb() -> float:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / 1024 if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


def run_bench(cfg: RunConfig, opts: Optional[BenchOptions] = None) -> dict:
    """Build a callback-free Trainer in a temporary directory and measure it (see the module docstring).

    Runs on a copy of `cfg` with output_dir a temporary directory and no resume: the bench never touches the
    run's directory. (Callbacks only observe: the trainer trains the same algorithm without them.)
    """
    from ernie5.train.trainer import Trainer

    opts = opts or BenchOptions()
    with tempfile.TemporaryDirectory(prefix="ernie5-bench-") as tmp:
        cfg = copy.deepcopy(cfg)
        cfg.run.output_dir, cfg.checkpoint.resume = tmp, False
        tr = Trainer(cfg, callbacks=[], quiet=True)
        cfg = tr.cfg  # resolved: vocabulary size from the data
        tr.peak_gflops = float("inf")  # the trainer's own mfu metric is not used here (and never re-probes); the real peak is measured below
        tr.model.train()
        for _ in range(opts.warmup):
            timed_step(tr)
        walls = [timed_step(tr) for _ in range(opts.steps)]
        rss_mb = _peak_rss_mb()  # before the GEMM test buffers and the train() run
        peak = measure_peak(cfg, opts.gemm_seconds)
        brk = breakdown(tr, opts.breakdown_steps) if opts.breakdown_steps else None
        prof = profile_step(tr) if opts.profile else None
        over = train_overhead(tr, opts.overhead_steps) if opts.overhead_steps else None

    tokens = cfg.train.grad_accum_steps * cfg.train.micro_batch_size * cfg.data.seq_len * tr.world
    step_s = statistics.median(walls)
    fpt = tr.flops_per_token
    achieved = tokens / step_s * fpt / 1e9
    pc = count_parameters(cfg.model)
    out: dict[str, Any] = {
        "step_s": step_s, "tokens_per_s": tokens / step_s, "mfu": achieved / peak["peak_gflops"],
        "gemm_gflops": peak["peak_gflops"], "achieved_gflops": achieved, "flops_per_token": fpt,
        "tokens_per_step": tokens, "step_s_all": walls, "steps": opts.steps, "warmup": opts.warmup,
        "gemm": peak, "peak_rss_mb": rss_mb, "total_params": pc.total_params, "active_params": pc.active_params,
        "threads": os.environ.get("OMP_NUM_THREADS"), "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
        "malloc_retained": env.MALLOC_RETAINED,
        "fused_kernels": kernels.status() if paddle.get_device() == "cpu" else "n/a (not CPU)",
    }
    if brk is not None:
        out.update(breakdown=brk["fractions"], breakdown_s=brk["seconds"], breakdown_step_s=brk["step_s"],
                   breakdown_steps=opts.breakdown_steps, uninstrumented=brk["missing"])
    if prof is not None:
        if brk is not None:
            prof["breakdown_split"] = split_backward(brk, prof["replay"])
        out["profile"] = prof
    if over is not None:
        out["train_overhead_fraction"] = over["fraction"]
        out["train_overhead"] = over
    return out


def _phase_table(seconds: dict, fractions: dict, indent: str = "  ") -> list[str]:
    rows = sorted(seconds, key=lambda p: -seconds[p])
    return [f"{indent}{p:<22}{seconds[p]:>9.4f} s {100 * fractions[p]:>7.1f}%" for p in rows
            if abs(fractions[p]) >= 0.0005]


def format_report(r: dict, title: str = "") -> str:
    """The human-readable form of `run_bench`'s result."""
    g = r["gemm"]
    mg = g["model_gemm"]
    walls = r["step_s_all"]
    lines = [
        f"ernie5 bench {title}".rstrip(),
        f"  {r['steps']} timed steps after {r['warmup']} warm-up; OMP_NUM_THREADS={r['threads']}"
        f" MKL_DEBUG_CPU_TYPE={r['mkl_debug_cpu_type']} freed memory retained={r['malloc_retained']}"
        f" fused CPU kernels={r.get('fused_kernels', '?')}",
        f"  model            {r['total_params'] / 1e6:.2f}M params, {r['active_params'] / 1e6:.2f}M active; "
        f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token (plan formula); {r['tokens_per_step']} tokens/step",
        f"  step             {r['step_s']:.4f} s median (min {min(walls):.4f}, max {max(walls):.4f})",
        f"  throughput       {r['tokens_per_s']:.0f} tokens/s = {r['achieved_gflops']:.1f} GFLOP/s",
        f"  GEMM peak        {r['gemm_gflops']:.1f} GFLOP/s from {g['peak_source']} (1024^3: "
        f"{g['square_1024_gflops']:.1f}; {mg['name']} {'x'.join(map(str, mg['mkn']))}: {mg['gflops']:.1f})",
        f"  MFU              {r['mfu']:.3f}",
        f"  peak RSS         {r['peak_rss_mb']:.0f} MB",
    ]
    if "train_overhead" in r:
        o = r["train_overhead"]
        am = o["amortised"]
        lines.append(f"  train() overhead {100 * o['fraction']:.1f}% (per step: data {1000 * o['data_s']:.1f} ms + "
                     f"callbacks/logging/loop {1000 * o['callbacks_and_loop_s']:.1f} ms of {o['loop_s']:.3f} s over "
                     f"{o['steps']} steps; amortised eval {1000 * am['eval_s']:.1f} ms + checkpoint "
                     f"{1000 * am['checkpoint_s']:.1f} ms; one checkpoint {o['checkpoint_s']:.2f} s)")
    if "breakdown" in r:
        lines.append(f"breakdown ({r['breakdown_steps']} instrumented steps, {r['breakdown_step_s']:.4f} s/step; "
                     "forward phases timed in place, backward one phase, exclusive times):")
        lines += _phase_table(r["breakdown_s"], r["breakdown"])
        if r["uninstrumented"]:
            lines.append(f"  (probed calls no step reached, their time is in the enclosing phase: "
                         f"{', '.join(r['uninstrumented'])})")
    p = r.get("profile")
    if p and "breakdown_split" in p:
        s = p["breakdown_split"]
        lines.append("breakdown with the backward spread over phases by isolated replay (--profile; replayed "
                     f"forward = {s['replay_forward_ratio']:.2f} x in place):")
        lines += _phase_table(s["seconds"], s["fractions"])
        if p["replay"]["failed"]:
            lines.append(f"  (replay failed: {', '.join(p['replay']['failed'])})")
    if p:
        lines.append(f"top operators (one profiled step, {p['profiled_step_s']:.4f} s; host time incl. profiler "
                     "overhead; phase = where the op ran, GradNodes run in `backward`):")
        for o in p["ops"]:
            lines.append(f"  {o['phase']:<18}{o['op']:<34}{o['calls']:>6}x {o['s']:>9.4f} s "
                         f"{100 * o['fraction']:>6.1f}%")
    return "\n".join(lines)
