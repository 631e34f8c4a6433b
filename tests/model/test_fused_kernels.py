"""The fused CPU kernels (ernie5/kernels/cpu_fused.cc) against the plain-Paddle definitions they replace:
values and gradients, every broadcast and masking case the model uses, and a whole model step with them on
and off."""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from ernie5 import kernels
from ernie5.kernels.fused import HeadCE, MaskedSoftmax, RMSNormFused, RopeFused, SwiGLUFused
from ernie5.model.layers import rms_norm_reference
from ernie5.model.rope import pair_swap_matrix
from ernie5.objectives.parallel_ce import IGNORE


def _leaf(*shape, seed=0, scale=1.0):
    t = paddle.to_tensor((np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32))
    t.stop_gradient = False
    return t


def _check(got, ref, inputs, rtol=1e-5, atol=1e-5, seed=0):
    """Same values, and the same gradients under one random upstream gradient."""
    np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=rtol, atol=atol)
    g = paddle.to_tensor(np.random.default_rng(seed).normal(size=got.shape).astype(np.float32))
    for a, b in zip(paddle.grad(got, inputs, g, retain_graph=True), paddle.grad(ref, inputs, g)):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=rtol, atol=atol)


def test_kernels_build_here():
    """CI and the demo machine have a C++ compiler: the kernels must build (a failed build would silently fall
    back to the slower Paddle ops)."""
    assert kernels.status() == "on", kernels._STATE["error"]
    with kernels.disabled():
        assert not kernels.usable(paddle.ones([2]))
    assert kernels.usable(paddle.ones([2]))
    assert not kernels.usable(paddle.ones([2], dtype="float64"))


def test_rms_norm():
    x, w = _leaf(3, 5, 16, seed=1), _leaf(16, seed=2)
    _check(RMSNormFused.apply(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), [x, w])


def test_swiglu():
    gu = _leaf(2, 7, 2 * 24, seed=3, scale=3.0)
    gate, up = paddle.split(gu, 2, axis=-1)
    _check(SwiGLUFused.apply(gu), F.silu(gate) * up, [gu])


@pytest.mark.parametrize("table_batch", [1, 2])
def test_rope(table_batch):
    B, S, N, D = 2, 5, 3, 8
    x = _leaf(B, S, N, D, seed=4)
    cos = paddle.to_tensor(np.random.default_rng(5).normal(size=(table_batch, S, 1, D)).astype(np.float32))
    ssin = paddle.to_tensor(np.random.default_rng(6).normal(size=(table_batch, S, 1, D)).astype(np.float32))
    ref = x * cos + paddle.matmul(x, pair_swap_matrix(D, x.dtype)) * ssin
    _check(RopeFused.apply(x, cos, ssin), ref, [x])


@pytest.mark.parametrize("mask_batch", [1, 2])
def test_masked_softmax(mask_batch):
    B, M, S, Sk = 2, 3, 4, 6
    scores = _leaf(B, M, S, Sk, seed=7, scale=2.0)
    allowed = np.random.default_rng(8).random((mask_batch, 1, S, Sk)) < 0.6
    allowed[..., 0] = True  # every query sees a key
    mask = paddle.to_tensor(np.where(allowed, 0.0, -np.inf).astype(np.float32))
    _check(MaskedSoftmax.apply(scores, mask), F.softmax(scores + mask, axis=-1), [scores])


def test_masked_softmax_row_without_keys_is_zero():
    mask = paddle.to_tensor(np.array([[[[0.0, -np.inf], [-np.inf, -np.inf]]]], dtype=np.float32))
    probs = MaskedSoftmax.apply(paddle.ones([1, 2, 2, 2]), mask).numpy()
    np.testing.assert_array_equal(probs[:, :, 0], [[[1.0, 0.0]] * 2])
    np.testing.assert_array_equal(probs[:, :, 1], np.zeros((1, 2, 2)))


@pytest.mark.parametrize("w_is_VH", [False, True])
def test_head_ce_with_ignored_rows_and_row_weights(w_is_VH):
    """Per-row CE of h @ W against F.cross_entropy on the full logits, with an upstream gradient that differs per
    row (the backward folds it into the GEMM operands)."""
    N, H, V = 9, 8, 37
    h = _leaf(N, H, seed=9)
    w = _leaf(*((V, H) if w_is_VH else (H, V)), seed=10)
    labels = paddle.to_tensor(np.array([3, IGNORE, 0, 36, 5, IGNORE, 11, 2, 7]), dtype="int64")
    logits = paddle.matmul(h, w, transpose_y=w_is_VH)
    ref = F.cross_entropy(logits, labels.reshape([-1, 1]), ignore_index=IGNORE, reduction="none").reshape([-1])
    got = HeadCE.apply(h, w, labels, w_is_VH)
    assert float(got[1]) == 0.0 and float(got[5]) == 0.0
    _check(got, ref, [h, w], rtol=1e-5, atol=1e-6)


def test_head_ce_large_logits_no_overflow():
    """logsumexp stays finite for logits far beyond exp's range."""
    h = paddle.to_tensor(np.array([[100.0, -100.0]], dtype=np.float32))
    w = paddle.to_tensor(np.array([[10.0, 0.0, -10.0], [0.0, 1.0, 0.0]], dtype=np.float32))
    loss = HeadCE.apply(h, w, paddle.to_tensor([2], dtype="int64"), False)
    np.testing.assert_allclose(loss.numpy(), [2000.0], rtol=1e-6)


def test_head_ce_rejects_out_of_range_label():
    with pytest.raises(Exception, match="out of range"):
        HeadCE.apply(paddle.ones([2, 3]), paddle.ones([3, 5]), paddle.to_tensor([1, 5], dtype="int64"), False)


def test_tiny_model_step_same_with_and_without_fused_kernels():
    """A small MoE (text loss, MTP) gives the same loss and parameter gradients with the fused kernels and with
    Paddle's own ops."""
    from ernie5.runconfig import load_config
    from ernie5.model.transformer import UnifiedModel
    from ernie5.objectives.text import make_text_batch, text_loss

    cfg = load_config(None, ["model.vocab_size=97", "model.hidden_size=32", "model.num_layers=3",
                             "model.num_heads=4", "model.num_kv_heads=2", "model.ffn_hidden_size=64",
                             "model.moe.num_experts=4", "model.moe.top_k=2", "model.moe.expert_ffn_size=32",
                             "model.moe.num_shared_experts=1", "model.moe.layer_start=1", "model.mtp.depth=1"])
    paddle.seed(0)
    model = UnifiedModel(cfg.model)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 97, size=(2, 17))
    segments = np.repeat([[0] * 9 + [1] * 8], 2, axis=0)
    batch = {k: paddle.to_tensor(v) for k, v in make_text_batch(tokens, segments, 1).items()}

    def step():
        model.clear_gradients()
        out = text_loss(model, batch, mtp_weight=0.3)
        out.total.backward()
        return float(out.total), {p.name: p.grad.numpy().copy() for p in model.parameters() if p.grad is not None}

    loss_fused, grads_fused = step()
    with kernels.disabled():
        loss_ref, grads_ref = step()
    assert abs(loss_fused - loss_ref) < 1e-5
    assert grads_fused.keys() == grads_ref.keys() and len(grads_ref) > 10
    for name in grads_ref:
        np.testing.assert_allclose(grads_fused[name], grads_ref[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_sum_squares_over_many_tensors():
    xs = [paddle.randn([300]), paddle.randn([70000, 2]), paddle.randn([1])]  # several 64K-element pieces
    want = sum(float((x.numpy().astype(np.float64) ** 2).sum()) for x in xs)
    assert abs(kernels.ops().e5_sum_squares(xs).item() - want) <= 1e-6 * want


U = 2.0 ** -24  # float32 unit roundoff: a rounded operation is off by at most U relative (round to nearest)
TINY = 2.0 ** -150  # ... plus at most this absolute when the result is subnormal
B1, B2, EPS, COEFF = 0.9, 0.999, 1e-8, 0.1


def _has_avx512f() -> bool:
    """Paddle's CPU Adam / AdamW pick their JIT kernel on exactly this CPU flag."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        return False


class _AdamWReference:
    """AdamW for one parameter in float64 (no rounding worth counting) from the float32 values of the
    hyperparameters, together with a bound on how far any float32 evaluation of the same formula can be from it
    (first-order error analysis; the updated quantities are A = b1|m| + (1-b1)|g s|, v, d = sqrt(v) + e,
    r = m / d):

      g s (clip scale)  one rounding                                 -> U on the gradient term
      m' = b1 m + (1-b1) g s     <= 3 roundings per term             -> |dm'| <= b1 |dm| + 3 U A
      v' = b2 v + (1-b2) (g s)^2 <= 5 roundings on the g term, all terms >= 0
                                                                     -> |dv'| <= b2 |dv| + 5 U v'
      s_t = lr sqrt(1 - b2^t) / (1 - b1^t): 1 - b^t is exact (Sterbenz: b^t in [1/2, 1], true for the first 6
                steps, all this test takes), sqrt, divide, multiply: 3 roundings
      e_t = eps sqrt(1 - b2^t): 2 roundings
      sqrt(v'): |d sqrt| <= |dv'| / (sqrt(v') + sqrt(v' - |dv'|)) and <= sqrt(|dv'|), plus its own rounding
      d = sqrt(v') + e_t: U sqrt(v') + 2 U e_t + U d                 -> |dd| <= |d sqrt| + 3 U d
      r = m' / d: |dr| <= |dm'| / d + |r| (|dd| / d + U)
      upd = s_t r: s_t's 3 roundings and the product's              -> |d upd| <= s_t |dr| + 4 U s_t |r|
      p' = p - (lr coeff) p - upd: 2 roundings of the product, 1 per difference
                                  -> |dp'| <= |dp| + 2 U lr c |p| + U |p - lr c p| + |d upd| + U |p'|
    Errors of earlier steps enter with factors b1, b2, (1 - lr c) <= 1 (gradients are fixed, they do not depend
    on the parameters). Each operation's subnormal absolute error (TINY) is added too. Fused multiply-adds (Paddle's
    AVX-512 kernel) and evaluating the last line in double (Paddle's portable loop, the fused kernel) only remove
    roundings, so one bound holds for all of them. Second-order terms (products of the relative errors above,
    < 1e-12 relative) and the float64 reference's own rounding are covered by the factor 1.01 and 2^-50 |p|."""

    def __init__(self, p0: np.ndarray):
        self.p = p0.astype(np.float64)
        self.m = np.zeros_like(self.p)
        self.v = np.zeros_like(self.p)
        self.ep = np.zeros_like(self.p)  # error bounds of p, m, v
        self.em = np.zeros_like(self.p)
        self.ev = np.zeros_like(self.p)
        self.b1p, self.b2p = np.float32(B1), np.float32(B2)  # the state's float32 beta powers: part of the input

    def step(self, g: np.ndarray, scale: float, lr32: np.float32, decay: bool):
        f = lambda x: float(np.float32(x))  # noqa: E731  (the float32 value a kernel uses)
        b1, b2, eps, c, lr = f(B1), f(B2), f(EPS), f(COEFF), float(lr32)
        gs = g.astype(np.float64) * scale
        a = b1 * np.abs(self.m) + (1 - b1) * np.abs(gs)
        self.m = b1 * self.m + (1 - b1) * gs
        self.v = b2 * self.v + (1 - b2) * gs * gs
        self.em = b1 * self.em + 3 * U * a + 3 * TINY
        self.ev = b2 * self.ev + 5 * U * self.v + 5 * TINY
        s = lr * np.sqrt(1 - float(self.b2p)) / (1 - float(self.b1p))
        e = eps * np.sqrt(1 - float(self.b2p))
        sv = np.sqrt(self.v)
        dsqrt = np.minimum(self.ev / (sv + np.sqrt(np.maximum(self.v - self.ev, 0.0)) + 1e-300), np.sqrt(self.ev))
        d = sv + e
        r = self.m / d
        dd = dsqrt + 3 * U * d + 2 * TINY
        dr = self.em / d + np.abs(r) * (dd / d + U)
        dupd = s * dr + 4 * U * s * np.abs(r) + TINY
        p_dec = self.p * (1 - lr * c) if decay else self.p
        dp_dec = 2 * U * lr * c * np.abs(self.p) + U * np.abs(p_dec) + 2 * TINY if decay else 0.0
        self.p = p_dec - s * r
        self.ep = self.ep + dp_dec + dupd + U * np.abs(self.p) + TINY
        self.b1p, self.b2p = np.float32(self.b1p * np.float32(B1)), np.float32(self.b2p * np.float32(B2))

    def bounds(self):
        """(p, m, v) in float64 and their error bounds."""
        slack = lambda x, ex: 1.01 * ex + 2.0 ** -50 * np.abs(x)  # noqa: E731
        return (self.p, slack(self.p, self.ep)), (self.m, slack(self.m, self.em)), (self.v, slack(self.v, self.ev))


def _fma(a, b, c):
    """float32 fused multiply-add: exact product and sum in float64 (a float32 product is exact there), rounded
    to float32 (twice, which can miss correct rounding in a tie but stays within U (1 + 2^-29))."""
    return (np.float64(a) * np.asarray(b, np.float64) + np.asarray(c, np.float64)).astype(np.float32)


def _paddle_avx512_adamw(p, m, v, g, b1p, b2p, lr32, decay):
    """Paddle's AdamW / Adam JIT kernel for AVX-512 CPUs (paddle/phi/kernels/funcs/jit/gen/adamw.cc, adam.cc), in
    NumPy float32: the same scalars as its portable loop, then
    p~ = fnmadd(lr coeff, p, p); m = fma(b1, m, (1-b1) g); v = fma(b2, v, (1-b2) (g g));
    p = fma(-s, m / (sqrt(v) + e), p~), all in float."""
    f32 = np.float32
    s = f32(lr32 * f32(np.sqrt(f32(1) - b2p) / (f32(1) - b1p)))
    e = f32(f32(EPS) * np.sqrt(f32(1) - b2p))
    pt = _fma(-f32(lr32 * f32(COEFF)), p, p) if decay else p
    m = _fma(f32(B1), m, (f32(1) - f32(B1)) * g)
    v = _fma(f32(B2), v, (f32(1) - f32(B2)) * (g * g))
    return _fma(-s, m / (np.sqrt(v) + e), pt), m, v


def _adamw_gradients(shapes, steps, seed=21):
    """Fixed gradients per step and parameter, over a wide range: magnitudes log-normal around 1e-3 (some near
    1e-9, where sqrt(v) is comparable to eps sqrt(1 - b2^t) and eps placement decides the step), signs that flip
    between steps (m nearly cancels: large relative error there), and exact zeros."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        gs = []
        for shape in shapes:
            g = rng.normal(size=shape) * np.exp(rng.normal(size=shape) * 3.0) * 1e-3
            tiny = rng.random(shape) < 0.05
            g[tiny] = rng.normal(size=int(tiny.sum())) * 1e-9
            g[rng.random(shape) < 0.02] = 0.0
            gs.append(g.astype(np.float32))
        out.append(gs)
    return out


def test_fused_adamw_equals_paddle_adamw():
    """Four steps of FusedAdamW (one multi-tensor kernel, clipping folded in as grad_scale) and of Paddle's AdamW
    (gradients pre-scaled) against a float64 NumPy AdamW with per-element error bounds (`_AdamWReference`):
    per-parameter LR ratio, decay on some parameters only, a parameter without a gradient in one step (its beta
    powers fall behind), changing LR. Parameters, moments and beta powers.

    The gradients are fixed arrays (backward of sum(p * G) gives exactly G), not recomputed by the network: with
    recomputed gradients, a last-bit difference after one step changes the next gradients, and Adam divides each
    update by that element's RMS gradient, so the difference grows (a replay with Paddle's AVX-512 formula reached
    3e-6 after four steps, outside any bound on the optimizer's own rounding: that is what failed on AVX-512).

    Both implementations must be within the bound B of the float64 reference, hence within 2 B of each other
    (whatever the ISA: on AVX-512 Paddle runs a float32 FMA kernel, replayed here in NumPy against the same
    bound). Without AVX-512 Paddle runs its portable loop, whose operations the fused kernel repeats: there the
    two must agree bit for bit (they did not before: other association of the bias correction, multiply-adds
    contracted by -march=native, the last line in float instead of double)."""
    from ernie5.optim.adamw import FusedAdamW

    lr_ratio = {2: 0.5}  # LayerNorm weight
    decay_of = lambda name: name.startswith("linear") and ".w_" in name  # noqa: E731
    steps = 4

    def build():
        paddle.seed(0)
        net = paddle.nn.Sequential(paddle.nn.Linear(8, 300), paddle.nn.LayerNorm(300), paddle.nn.Linear(300, 700))
        for i, ratio in lr_ratio.items():
            net.parameters()[i].optimize_attr["learning_rate"] = ratio
        return net

    params0 = [p.numpy() for p in build().parameters()]
    grads = _adamw_gradients([p.shape for p in params0], steps)
    skipped = {(1, 5)}  # (step, parameter): no gradient, AdamW leaves it alone
    scales = [0.5 if i % 2 == 0 else 1.0 for i in range(steps)]
    lrs = [1e-2 * (i + 1) for i in range(steps)]

    def run(fused):
        net = build()
        params = net.parameters()
        cls = FusedAdamW if fused else paddle.optimizer.AdamW
        opt = cls(learning_rate=1e-2, parameters=params, weight_decay=COEFF, apply_decay_param_fun=decay_of)
        for i in range(steps):
            g = grads[i] if fused else [x * np.float32(scales[i]) for x in grads[i]]  # Paddle: pre-scaled
            paddle.add_n([(p * paddle.to_tensor(gk)).sum() for p, gk in zip(params, g)]).backward()
            for k, p in enumerate(params):
                if (i, k) in skipped:
                    p.clear_gradient(False)
            if fused:
                opt.grad_scale = scales[i]
            opt.set_lr(lrs[i])
            opt.step()
            opt.clear_grad()
        state = opt.state_dict()
        # accumulator keys are "<param name>_<accumulator>"; parameter names differ between the runs
        by_param = {(k, key[len(p.name) + 1:]): state[key].numpy() for k, p in enumerate(params)
                    for key in state if key.startswith(p.name + "_")}
        return [p.numpy() for p in params], by_param, [p.name for p in params]

    (p_fused, s_fused, names), (p_paddle, s_paddle, _) = run(True), run(False)
    with kernels.disabled():  # FusedAdamW where the kernel cannot run (GPU, no compiler): Paddle's op per parameter
        p_fallback, _, _ = run(True)

    refs = [_AdamWReference(p) for p in params0]
    jit = [[p.copy(), np.zeros_like(p), np.zeros_like(p), np.float32(B1), np.float32(B2)] for p in params0]
    for i in range(steps):
        for k, (ref, st) in enumerate(zip(refs, jit)):
            if (i, k) in skipped:
                continue
            lr32 = np.float32(lrs[i] * lr_ratio.get(k, 1.0))
            decay = decay_of(names[k])
            ref.step(grads[i][k], scales[i], lr32, decay)
            g = grads[i][k] * np.float32(scales[i])
            st[:3] = _paddle_avx512_adamw(*st[:3], g, st[3], st[4], lr32, decay)
            st[3], st[4] = np.float32(st[3] * np.float32(B1)), np.float32(st[4] * np.float32(B2))

    assert s_fused.keys() == s_paddle.keys() and len(s_paddle) == 6 * 4  # moments and beta powers of 6 params
    worst = 0.0
    for k, ref in enumerate(refs):
        (p_ref, bp), (m_ref, bm), (v_ref, bv) = ref.bounds()
        outputs = {"fused": (p_fused[k], s_fused[(k, "moment1_0")], s_fused[(k, "moment2_0")]),
                   "paddle": (p_paddle[k], s_paddle[(k, "moment1_0")], s_paddle[(k, "moment2_0")]),
                   "paddle-avx512 (replay)": tuple(jit[k][:3])}
        for who, (p, m, v) in outputs.items():
            for what, got, want, bound in (("param", p, p_ref, bp), ("moment1", m, m_ref, bm),
                                           ("moment2", v, v_ref, bv)):
                err = np.abs(got.astype(np.float64) - want)
                assert (err <= bound).all(), f"{who} {what} {names[k]}: error {err.max():.3g}, worst / bound " \
                                             f"{(err / np.maximum(bound, 1e-300)).max():.3g}"
            worst = max(worst, float((np.abs(p.astype(np.float64) - p_ref) / np.maximum(bp, 1e-300)).max()))
        # fused against Paddle whatever path Paddle took: each within B of the reference
        assert (np.abs(p_fused[k].astype(np.float64) - p_paddle[k]) <= 2 * bp).all(), names[k]
        for acc in ("beta1_pow_acc_0", "beta2_pow_acc_0"):  # float32 products, the same in every implementation
            want = ref.b1p if acc.startswith("beta1") else ref.b2p
            assert s_fused[(k, acc)][0] == s_paddle[(k, acc)][0] == want, (names[k], acc)
        np.testing.assert_array_equal(p_fallback[k], p_paddle[k])  # the fallback is Paddle's own op
    assert worst > 0.01  # the bound is not vacuous: some element uses more than 1 % of it
    assert s_paddle[(5, "beta1_pow_acc_0")][0] > s_paddle[(4, "beta1_pow_acc_0")][0]  # the skipped step shows
    if not _has_avx512f():  # Paddle's portable loop: the fused kernel repeats it operation for operation
        for k in range(len(names)):
            np.testing.assert_array_equal(p_fused[k], p_paddle[k], err_msg=names[k])
            for acc in ("moment1_0", "moment2_0"):
                np.testing.assert_array_equal(s_fused[(k, acc)], s_paddle[(k, acc)], err_msg=f"{names[k]} {acc}")


def test_failed_build_falls_back_with_one_line(tmp_path):
    """No working compiler: one warning line naming the build log, status 'failed', and the model still runs on
    Paddle's ops. ERNIE5_FUSED_KERNELS=0: 'off', silently."""
    import os
    import subprocess
    import sys

    code = ("from ernie5.env import setup\nsetup()\nimport paddle\nfrom ernie5 import kernels\nfrom ernie5.model.layers import RMSNorm\n"
            "y = RMSNorm(8, 1e-6)(paddle.ones([2, 8]))\nprint(kernels.status(), round(float(y.sum()), 3))\n")
    env = dict(os.environ, CC="/bin/false", CXX="/bin/false", ERNIE5_KERNEL_CACHE=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["failed", "16.0"]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "fused CPU kernels unavailable" in lines[0] and "build.log" in lines[0], lines
    env = dict(os.environ, ERNIE5_FUSED_KERNELS="0", ERNIE5_KERNEL_CACHE=str(tmp_path / "unused"))
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.split() == ["off", "16.0"] and not proc.stderr.strip()
    assert not (tmp_path / "unused").exists()


def test_moe_combine():
    """The fused gather + weighted sum over slots against the Paddle ops it replaces (the router weights get their
    gradient too)."""
    from ernie5.kernels.fused import Combine

    T, K, H = 7, 2, 16
    y = _leaf(T * K, H, seed=11)
    w = _leaf(T, K, seed=12)
    order = paddle.to_tensor(np.random.default_rng(13).permutation(T * K), dtype="int64")
    inv = paddle.argsort(order)
    ref = (paddle.gather(y, inv).reshape([T, K, H]) * w.unsqueeze(-1)).sum(axis=1)
    _check(Combine.apply(y, inv, w), ref, [y, w])


def test_frozen_inputs_and_partial_grads():
    """A frozen input gets no gradient (Paddle rejects one), the others are unchanged. (`paddle.grad` over a
    subset of a PyLayer's inputs is a Paddle limitation for every PyLayer and is not covered.)"""
    from ernie5.kernels.fused import Combine
    from ernie5.model.layers import RMSNormFunction

    h, w = _leaf(5, 8, seed=14), _leaf(8, 11, seed=15)
    labels = paddle.to_tensor([1, 2, 3, IGNORE, 10], dtype="int64")
    HeadCE.apply(h, w, labels, False).sum().backward()
    ref_h = h.grad.numpy().copy()
    h.clear_gradient()
    w.clear_gradient(False)
    w.stop_gradient = True
    HeadCE.apply(h, w, labels, False).sum().backward()
    np.testing.assert_allclose(h.grad.numpy(), ref_h, rtol=1e-6)
    assert w.grad is None
    x, g = _leaf(3, 8, seed=16), _leaf(8, seed=17)
    g.stop_gradient = True  # a frozen norm weight
    (ref,) = paddle.grad(rms_norm_reference(x, g, 1e-6).sum(), [x])
    for fn in (RMSNormFused.apply, RMSNormFunction.apply):
        x.clear_gradient()
        fn(x, g, 1e-6).sum().backward()
        np.testing.assert_allclose(x.grad.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)
        assert g.grad is None
    y, cw = _leaf(6, 4, seed=18), _leaf(3, 2, seed=19)
    cw.stop_gradient = True
    Combine.apply(y, paddle.to_tensor([5, 0, 3, 1, 4, 2], dtype="int64"), cw).sum().backward()
    assert y.grad is not None and cw.grad is None


def test_fused_adamw_grad_scale_with_parameter_groups():
    """Parameter groups go through Paddle's op per parameter; grad_scale still applies there (once)."""
    from ernie5.optim.adamw import FusedAdamW

    def run(scale_first):
        paddle.seed(1)
        net = paddle.nn.Linear(4, 3)
        opt = FusedAdamW(learning_rate=0.1, parameters=[{"params": net.parameters()}], epsilon=1.0)
        (net(paddle.ones([2, 4])) ** 2).sum().backward()
        if scale_first:
            with paddle.no_grad():
                for p in net.parameters():
                    p.grad.scale_(0.25)
        else:
            opt.grad_scale = 0.25
        opt.step()
        return [p.numpy() for p in net.parameters()]

    for a, b in zip(run(False), run(True)):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_kernel_edge_values():
    """exp at the ends of float range (softmax of huge spreads stays finite and exact), NaN propagation through
    the attention softmax."""
    x = paddle.to_tensor(np.array([[0.0, 88.35, -1e30, -np.inf, 50.0]], dtype=np.float32))
    got = MaskedSoftmax.apply(x.reshape([1, 1, 1, 5]), paddle.zeros([1, 1, 1, 5])).numpy().ravel()
    # Paddle's CPU softmax clips x - max at -64 (exp = 1.6e-28 where the exact value is ~0); the kernel does not
    np.testing.assert_allclose(got, F.softmax(x, axis=-1).numpy().ravel(), rtol=1e-5, atol=1e-27)
    assert got[2] == got[3] == 0.0 and got[1] == pytest.approx(1.0)
    gu = paddle.to_tensor(np.array([[-100.0, 100.0, 1.0, 1.0]], dtype=np.float32))  # silu(-100), silu(100)
    np.testing.assert_allclose(SwiGLUFused.apply(gu).numpy(), [[-100.0 / (1 + np.exp(100.0)), 100.0]], rtol=1e-5,
                               atol=1e-30)  # exp saturates at exp(88.3): silu(-100) ~ -4e-37, not -4e-42
    nan_row = paddle.to_tensor(np.array([[[[np.nan, 1.0], [np.nan, np.nan]]]], dtype=np.float32))
    probs = MaskedSoftmax.apply(nan_row, paddle.zeros([1, 1, 2, 2])).numpy()
    assert np.isnan(probs).all()  # a NaN score is never hidden as a probability
