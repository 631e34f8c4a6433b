"""The fused CPU kernels built for another ISA variant give the native build's results: bit for bit where a
kernel is elementwise (the library is compiled without FMA contraction), within a summation-order bound where it
adds up a row.

The variant, `avx2-nofma` (-march=native -mno-avx512f -mno-fma), differs from the native build on every x86-64
CPU this project targets: on an AVX2+FMA CPU in the FMA instructions the compiler may use, on an AVX-512 CPU also
in the vector width (and so in the order of the `omp simd` reductions). It is built into a temp cache dir (one
extra build, ~12-25 s) and run in a subprocess: Paddle registers custom ops by name, so one process holds one
variant. Run as a script (`python -m tests.model.test_kernel_variants OUT.npz`) this file writes the kernels'
outputs for fixed inputs.
"""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

U = 2.0 ** -24  # float32 unit roundoff
VARIANT = "avx2-nofma"
REPO = Path(__file__).resolve().parents[2]

# elementwise kernels: same operations on the same float32 values, no contraction -> the same bits
BITWISE = ["swiglu", "swiglu_bwd", "rope", "rope_t", "combine", "combine_dy", "adamw_p", "adamw_m", "adamw_v",
           "adamw_b1p", "adamw_b2p", "sm_max_only"]


def kernel_outputs() -> dict:
    """Every kernel of the library on fixed inputs (small: the point is the arithmetic, not the speed), with the
    magnitudes the bounds below need."""
    import paddle

    from ernie5 import kernels

    ops = kernels.ops()
    assert ops is not None, kernels._STATE["error"]
    rng = np.random.default_rng(7)
    t = lambda a: paddle.to_tensor(np.ascontiguousarray(a))  # noqa: E731
    f32 = lambda *shape, scale=1.0: (rng.normal(size=shape) * scale).astype(np.float32)  # noqa: E731
    out = {}
    R, H = 37, 257  # odd sizes: vector remainders on every width
    x, w, g = f32(R, H), f32(H), f32(R, H)
    y, r = ops.e5_rms_norm(t(x), t(w), 1e-6)
    gx, gw = ops.e5_rms_norm_bwd(t(g), t(x), t(w), r)
    out.update(rms_y=y.numpy(), rms_r=r.numpy(), rms_gx=gx.numpy(), rms_gw=gw.numpy(), rms_x=x, rms_w=w, rms_g=g)
    gu, gh = f32(R, 2 * H, scale=4.0), f32(R, H)
    out["swiglu"] = ops.e5_swiglu(t(gu)).numpy()
    out["swiglu_bwd"] = ops.e5_swiglu_bwd(t(gu), t(gh)).numpy()
    V = 1001
    logits = f32(R, V, scale=5.0)
    labels = rng.integers(0, V, size=R)
    labels[3] = -100
    lt = t(logits)
    _, loss = ops.e5_softmax_ce_inplace(lt, t(labels), -100)
    out.update(ce_loss=loss.numpy(), ce_grad=lt.numpy(), ce_logits=logits, ce_labels=labels)
    S, Sk = 9, 131
    scores = f32(2, 3, S, Sk, scale=3.0)
    mask = np.where(rng.random((1, 1, S, Sk)) < 0.7, 0.0, -np.inf).astype(np.float32)
    mask[..., 0] = 0.0
    probs = ops.e5_masked_softmax(t(scores), t(mask))
    dp = f32(2, 3, S, Sk)
    out.update(sm=probs.numpy(), sm_bwd=ops.e5_softmax_bwd(probs, t(dp)).numpy(), sm_dp=dp)
    out["sm_max_only"] = np.isneginf(scores + mask).all(-1)  # rows without keys: none here, the same everywhere
    B, Sq, N, D = 2, 5, 3, 16
    xr, cos, sin = f32(B, Sq, N, D), f32(1, Sq, 1, D), f32(1, Sq, 1, D)
    out["rope"] = ops.e5_rope(t(xr), t(cos), t(sin), False).numpy()
    out["rope_t"] = ops.e5_rope(t(xr), t(cos), t(sin), True).numpy()
    T, K, Hc = 11, 2, 67
    ys, cw, gc = f32(T * K, Hc), f32(T, K), f32(T, Hc)
    inv = rng.permutation(T * K).astype(np.int64)
    out["combine"] = ops.e5_combine(t(ys), t(inv), t(cw)).numpy()
    dy, dw = ops.e5_combine_bwd(t(gc), t(ys), t(inv), t(cw))
    out.update(combine_dy=dy.numpy(), combine_dw=dw.numpy(), combine_g=gc, combine_y=ys, combine_inv=inv)
    xs = [f32(300), f32(70001), f32(1)]
    out["sumsq"] = ops.e5_sum_squares([t(a) for a in xs]).numpy()
    out["sumsq_abs"] = np.array([sum(float((a.astype(np.float64) ** 2).sum()) for a in xs)])
    n = 70001  # AdamW: two steps over two parameters, decay on one, clip scale, tiny and zero gradients
    ps, ms = [f32(n, scale=0.1), f32(513)], [np.zeros(n, np.float32), np.zeros(513, np.float32)]
    vs = [np.zeros(n, np.float32), np.zeros(513, np.float32)]
    b1p = [np.array([0.9], np.float32), np.array([0.9], np.float32)]
    b2p = [np.array([0.999], np.float32), np.array([0.999], np.float32)]
    ts = [[t(a) for a in col] for col in (ps, ms, vs, b1p, b2p)]
    for step in range(2):
        grads = [f32(n, scale=1e-3), f32(513, scale=1e-9)]
        grads[0][::97] = 0.0
        ld = t(np.array([[1e-2 * (step + 1), 1.0], [3e-3, 0.0]], np.float32))
        ops.e5_adamw_multi(ts[0], [t(a) for a in grads], ts[1], ts[2], ts[3], ts[4], ld, 0.9, 0.999, 1e-8, 0.1,
                           0.5)
    for key, col in zip(("adamw_p", "adamw_m", "adamw_v", "adamw_b1p", "adamw_b2p"), ts):
        out[key] = np.concatenate([a.numpy().ravel() for a in col])
    return out


def _within(name, a, b, bound):
    err = np.abs(a.astype(np.float64) - b.astype(np.float64))
    assert (err <= bound).all(), f"{name}: max error {err.max():.3g}, worst / bound {(err / bound).max():.3g}"


def test_isa_variant_matches_native(tmp_path):
    """Reduction kernels: a sum of n float32 terms in any order is within (n-1) U sum|terms| of the exact sum, so
    two orders are within 2 (n-1) U sum|terms|; every later operation rounds once on each side (2 U relative
    more each, at most 8 of them per kernel). Tolerance: 2 (n + 8) U times the magnitude the sum adds up
    (sum|terms|, carried through the kernel's formula), per element. Everything else: equal bits."""
    from ernie5 import kernels

    native = kernel_outputs()
    env = dict(os.environ, ERNIE5_KERNEL_ISA=VARIANT, ERNIE5_KERNEL_CACHE=str(tmp_path / "cache"))
    env.pop("ERNIE5_FUSED_KERNELS", None)
    proc = subprocess.run([sys.executable, "-m", "tests.model.test_kernel_variants", str(tmp_path / "out.npz")],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"kernels on ({kernels.module_name(VARIANT)})" in proc.stdout, proc.stdout
    built = list((tmp_path / "cache").glob(f"*/{kernels.module_name(VARIANT)}/*.so"))
    assert [p.parent.parent.name for p in built] == [kernels.build_key(VARIANT)]  # its own cache key
    assert kernels.build_key(VARIANT) != kernels.build_key("native")
    log = (built[0].parent.parent / "build.log").read_text()
    assert all(flag in log for flag in kernels.cxx_flags(VARIANT)), "the variant's flags reach the compiler"
    other = dict(np.load(tmp_path / "out.npz"))
    assert other.keys() == native.keys()

    for key in BITWISE:
        np.testing.assert_array_equal(other[key], native[key], err_msg=key)

    k = lambda n: 2 * (n + 8) * U  # noqa: E731  (see the docstring)
    x, w, g = native["rms_x"], native["rms_w"], native["rms_g"]
    H = x.shape[1]
    r = native["rms_r"][:, None].astype(np.float64)
    _within("rms_r", other["rms_r"], native["rms_r"], k(H) * native["rms_r"])  # sum of squares: no cancellation
    _within("rms_y", other["rms_y"], native["rms_y"], k(H) * np.abs(native["rms_y"]))
    # gx = r (g w - x c), c = r^2 / H sum_j g w x: the dot product's magnitude is sum |g w x|
    c_abs = r ** 2 / H * np.abs(g * w * x).sum(1, keepdims=True)
    _within("rms_gx", other["rms_gx"], native["rms_gx"], k(H) * r * (np.abs(g * w) + np.abs(x) * c_abs))
    _within("rms_gw", other["rms_gw"], native["rms_gw"], k(x.shape[0]) * (np.abs(g * x) * r).sum(0))
    logits, labels = native["ce_logits"], native["ce_labels"]
    V = logits.shape[1]
    onehot = np.zeros_like(logits)
    rows = np.flatnonzero(labels >= 0)
    onehot[rows, labels[rows]] = 1.0
    p = native["ce_grad"] + onehot  # the softmax (0 in the ignored row)
    _within("ce_grad", other["ce_grad"], native["ce_grad"], k(V) * (p + onehot))
    # loss = max + log(s) - x[label], s = sum exp >= 1 without cancellation: log turns its relative error 2 (V-1) U
    # into an absolute one; the sum of the three terms rounds twice on each side (|log s| <= |loss| + 2 max|x|)
    scale = 3 * np.abs(logits).max(1) + np.abs(native["ce_loss"])
    _within("ce_loss", other["ce_loss"], native["ce_loss"], k(V) + 8 * U * scale)
    Sk = native["sm"].shape[-1]
    _within("sm", other["sm"], native["sm"], k(Sk) * native["sm"])
    sm, dp = native["sm"], native["sm_dp"]
    _within("sm_bwd", other["sm_bwd"], native["sm_bwd"],
            k(Sk) * sm * (np.abs(dp) + (sm * np.abs(dp)).sum(-1, keepdims=True)))
    gc, ys, inv = native["combine_g"], native["combine_y"], native["combine_inv"]
    T, Kc = native["combine_dw"].shape
    mag = np.abs(gc)[:, None, :] * np.abs(ys[inv.reshape(T, Kc)])
    _within("combine_dw", other["combine_dw"], native["combine_dw"], k(gc.shape[1]) * mag.sum(-1))
    n = 70302  # double accumulation: U_double = 2^-53
    _within("sumsq", other["sumsq"], native["sumsq"], 2 * (n + 8) * 2.0 ** -53 * native["sumsq_abs"])


if __name__ == "__main__":
    from ernie5 import kernels as _kernels

    outputs = kernel_outputs()
    np.savez(sys.argv[1], **outputs)
    print(f"kernels {_kernels.status()} ({_kernels.module_name()})")
