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
    from ernie5.config.run import load_config
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


def test_fused_adamw_equals_paddle_adamw():
    """Four steps of FusedAdamW (one multi-tensor kernel, clipping folded in as grad_scale) against Paddle's AdamW
    on pre-scaled gradients: per-parameter LR ratio, decay on some parameters only, a parameter without a
    gradient in one step (its beta powers fall behind), changing LR. Parameters and the whole state_dict."""
    from ernie5.train.optim import FusedAdamW

    def run(fused):
        paddle.seed(0)
        net = paddle.nn.Sequential(paddle.nn.Linear(8, 300), paddle.nn.LayerNorm(300), paddle.nn.Linear(300, 700))
        net[1].weight.optimize_attr["learning_rate"] = 0.5
        cls = FusedAdamW if fused else paddle.optimizer.AdamW
        opt = cls(learning_rate=1e-2, parameters=net.parameters(), weight_decay=0.1,
                  apply_decay_param_fun=lambda name: name.startswith("linear") and ".w_" in name)
        x = paddle.randn([4, 8])
        for i in range(4):
            (net(x) ** 2).mean().backward()
            if i == 1:
                net[2].bias.clear_gradient(False)  # no gradient this step: AdamW skips it
            scale = 0.5 if i % 2 == 0 else 1.0
            if fused:
                opt.grad_scale = scale
            else:
                with paddle.no_grad():
                    for p in net.parameters():
                        if p.grad is not None:
                            p.grad.scale_(scale)
            opt.set_lr(1e-2 * (i + 1))
            opt.step()
            opt.clear_grad()
        state = opt.state_dict()
        # accumulator keys are "<param name>_<accumulator>"; parameter names differ between the two runs
        by_param = {(i, k[len(p.name):]): state[k].numpy() for i, p in enumerate(net.parameters())
                    for k in state if k.startswith(p.name + "_")}
        return [p.numpy() for p in net.parameters()], by_param

    (p_fused, s_fused), (p_ref, s_ref) = run(True), run(False)
    with kernels.disabled():  # FusedAdamW where the kernel cannot run (GPU, no compiler): Paddle's op per parameter
        p_fallback, _ = run(True)
    for a, b, c in zip(p_fused, p_ref, p_fallback):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(c, b, rtol=1e-6, atol=1e-7)
    assert s_fused.keys() == s_ref.keys() and len(s_ref) == 6 * 4  # moments and beta powers of 6 parameters
    for key in s_ref:
        np.testing.assert_allclose(s_fused[key], s_ref[key], rtol=1e-4, atol=1e-5 * np.abs(s_ref[key]).max(),
                                   err_msg=str(key))
    assert s_ref[(5, "_beta1_pow_acc_0")][0] > s_ref[(4, "_beta1_pow_acc_0")][0]  # the skipped step shows


def test_failed_build_falls_back_with_one_line(tmp_path):
    """No working compiler: one warning line naming the build log, status 'failed', and the model still runs on
    Paddle's ops. ERNIE5_FUSED_KERNELS=0: 'off', silently."""
    import os
    import subprocess
    import sys

    code = ("import ernie5, paddle\nfrom ernie5 import kernels\nfrom ernie5.model.layers import RMSNorm\n"
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
    from ernie5.train.optim import FusedAdamW

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
