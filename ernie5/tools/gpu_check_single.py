"""The single-device checks of `ernie5.tools.gpu_check`: each runs one GPU path on the device and compares it with
the CPU reference computed here, in the same process, from the same numbers.

With `device="cpu"` the device side runs on CPU too (what the test suite runs): the comparisons, tolerances and
every CPU reference execute for real, and the GPU-only lines (bf16 kernels, FlashMask, native FP8) say SKIP.

Tolerances (stated in each line's detail):
- attention: per output element |dev - ref| <= 2 [max|v| (2 D u_acc m_i + (S + 2) u_acc + u_round) + u_round |ref|]
  with m_i = max over allowed keys j of sum_d |q_id k_jd| / sqrt(D): the first-order error of softmax(q k^T /
  sqrt(D) + mask) v when the score GEMM accumulates with unit roundoff u_acc (a score moves by <= D u_acc m_i,
  a probability by <= 2 max|score error| relative), the softmax / p v sums add (S + 2) u_acc, and the kernel
  stores probabilities and output with unit roundoff u_round; doubled because both sides round. fp32: u_acc =
  u_round = 2^-24 (TF32 off, `gpu_check` sets NVIDIA_TF32_OVERRIDE=0); bf16 (flash attention, FlashMask): the
  inputs are bf16 on both sides, products exact, fp32 accumulation, P and the output stored as bf16: u_acc =
  2^-24, u_round = 2^-8.
- model fp32: the loss within 1e-5 relative, the logits within 1e-5 of their largest magnitude (as the 2-rank
  checks compare: only summation order differs).
- bf16 AMP: |loss_dev - loss_cpu| <= 4 u |loss_cpu|, u = 2^-8, as the TP bf16 check: every rounding moves a value
  by <= u relative and the loss (~ln V) moves by a few u relative (tests/precision/test_bf16.py measured the
  emulation 1e-5 relative from fp32 at step 1); and the device's bf16 loss differs from its fp32 loss (AMP ran).
- FP8 recipe: quantised operands bit for bit (power-of-two scales, the same E4M3 cast); GEMM results within
  2 K 2^-24 max(|A| |B|) (products of E4M3 values are exact in fp32: only the order of the K-term sums differs).
"""

from __future__ import annotations

import contextlib
import math
from types import SimpleNamespace
from typing import Callable, NamedTuple, Optional
from unittest import mock

import numpy as np
import paddle
import paddle.nn.functional as F

from ernie5.data.sequence import Segment, build_document, flashmask_ranges, pack_documents
from ernie5.model import mixed_precision
from ernie5.model.attention import Attention, gqa_attention, group_mask
from ernie5.model.mask import allowed
from ernie5.precision.bf16 import round_bf16

U_FP32, U_BF16 = 2.0 ** -24, 2.0 ** -8


class Result(NamedTuple):
    name: str
    status: str  # PASS | FAIL | SKIP
    detail: str

    def line(self) -> str:
        return f"{self.status} {self.name} {self.detail}"


def verdict(name: str, ok: bool, detail: str) -> Result:
    return Result(name, "PASS" if ok else "FAIL", detail)


def guarded(name: str, fn: Callable[[], Result]) -> Result:
    """fn(), or a FAIL line naming the error: a path that raises on this device fails, the other paths still run."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- reported, not swallowed
        msg = str(e).strip().splitlines()
        return Result(name, "FAIL", f"raised {type(e).__name__}: {msg[-1][:300] if msg else ''}")


def is_gpu(device: str) -> bool:
    return not device.startswith("cpu")


@contextlib.contextmanager
def on_device(device: str):
    """Create tensors and parameters on `device` ("cpu", "gpu:0") inside the block."""
    old = paddle.get_device()
    paddle.set_device(device)
    try:
        yield
    finally:
        paddle.set_device(old)


# -- attention ------------------------------------------------------------------------------------------------------
B, N, KV, D = 2, 4, 2, 32  # two rows, 4 query heads over 2 kv heads (GQA), head dim 32


def attention_masks() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """(doc, group) int64 [B, S] per mask: packed documents (groups numbered by position: document-causal) and the
    scale-wise mask of a packed row with text, a two-frame video of scales 1x1 and 2x2 (each frame closed by its one-position context group), text, and a second
    document (built by `ernie5.data.sequence`, the layout of tests/data/test_scale_mask.py)."""
    S = 19
    doc = np.stack([np.repeat([0, 1, 2], [6, 7, 6]), np.repeat([0, 1], [11, 8])]).astype(np.int64)
    packed = (doc, np.repeat(np.arange(S, dtype=np.int64)[None], B, 0))
    rng = np.random.default_rng(0)
    codes = [rng.integers(0, 2, (2, s, s, 2)).astype(np.uint8) for s in (1, 2)]
    video = Segment("video", "target", codes=codes, scale_inputs=[rng.normal(size=(2, 2, 2, 2)).astype(np.float32)],
                    frame_latent=rng.normal(size=(2, 2, 2, 2)).astype(np.float32))
    a = build_document([Segment("text", ids=[5]), video, Segment("text", ids=[6, 7])], 100, bits=2)
    b = build_document([Segment("text", ids=[8, 9])], 100, bits=2)
    row, dropped = pack_documents([a, b], S)
    assert dropped == 0
    scale = (np.repeat(row["doc"].astype(np.int64), B, 0), np.repeat(row["group"].astype(np.int64), B, 0))
    return {"packed-doc": packed, "scale-wise": scale}


def attention_bound(q, k, v, ref, allowed_BSS, u_acc: float, u_round: float) -> np.ndarray:
    """The per-element tolerance of the module docstring, [B, S, N * D] like the outputs."""
    q, k, v = (np.abs(t.astype(np.float64)) for t in (q, k, v))
    Bq, S, Nq, Dq = q.shape
    kk = np.repeat(k, Nq // k.shape[2], axis=2)  # query head n reads kv head n // (N / K)
    qk = np.einsum("bind,bjnd->bnij", q, kk) / math.sqrt(Dq)
    m = np.where(allowed_BSS[:, None], qk, 0.0).max(-1)  # [B, N, S]
    row = v.max() * (2 * Dq * u_acc * m + (S + 2) * u_acc + u_round)
    row = np.repeat(row.transpose(0, 2, 1)[..., None], Dq, axis=-1).reshape(Bq, S, Nq * Dq)
    return 2 * (row + u_round * np.abs(ref))


def _compare_attention(name, got, ref, inputs, allowed_BSS, u_acc, u_round, label) -> Result:
    bound = attention_bound(*inputs, ref, allowed_BSS, u_acc, u_round)
    err = np.abs(got.astype(np.float64) - ref)
    ok = bool(np.isfinite(got).all() and (err <= bound).all())
    return verdict(name, ok, f"{label}: max err {err.max():.2e}, max err/bound {(err / bound).max():.2g} "
                             f"(u_acc 2^{round(math.log2(u_acc))}, u_round 2^{round(math.log2(u_round))})")


def default_core(q, k, v, mask):
    """`Attention.core` (scaled_dot_product_attention on accelerators, gqa_attention on CPU) as the model calls it."""
    return Attention.core(SimpleNamespace(num_heads=q.shape[2], head_dim=q.shape[3]), q, k, v, mask)


def check_attention(device: str, core: Optional[Callable] = None) -> list[Result]:
    """Attention.core on the device (fp32, and bf16 under AMP on GPUs) and FlashMask (GPUs whose Paddle has it)
    against `gqa_attention` on CPU, for the packed-document and the scale-wise mask."""
    core = core or default_core
    rng = np.random.default_rng(1)
    out = []
    for mask_name, (doc, grp) in attention_masks().items():
        S = doc.shape[1]
        q = rng.standard_normal((B, S, N, D)).astype(np.float32)
        k = rng.standard_normal((B, S, KV, D)).astype(np.float32)
        v = rng.standard_normal((B, S, KV, D)).astype(np.float32)
        ok_BSS = allowed(doc, grp, doc, grp)

        def reference(q, k, v):
            with on_device("cpu"):
                mask = group_mask(paddle.to_tensor(doc), paddle.to_tensor(grp))  # the CPU (NumPy) mask path
                return gqa_attention(*(paddle.to_tensor(t) for t in (q, k, v)), mask).numpy().astype(np.float64)

        def fp32(name=f"attention[{mask_name}]"):
            ref = reference(q, k, v)
            with on_device(device):  # the mask built where the ids live, as the model does
                mask = group_mask(paddle.to_tensor(doc), paddle.to_tensor(grp))
                got = core(*(paddle.to_tensor(t) for t in (q, k, v)), mask).numpy()
            return _compare_attention(name, got, ref, (q, k, v), ok_BSS, U_FP32, U_FP32,
                                      f"Attention.core fp32 on {device} vs gqa_attention on CPU")
        out.append(guarded(f"attention[{mask_name}]", fp32))

        # bf16: the same bf16 inputs on both sides (reference in fp32 on CPU)
        qb, kb, vb = (round_bf16(paddle.to_tensor(t, place=paddle.CPUPlace())).numpy() for t in (q, k, v))
        ref_b = reference(qb, kb, vb)
        if not is_gpu(device):
            out.append(Result(f"attention-bf16[{mask_name}]", "SKIP", "bf16 attention kernels need a GPU (CPU bf16 "
                              "GEMMs raise; the CPU emulation keeps the attention core fp32)"))
        else:
            def bf16(name=f"attention-bf16[{mask_name}]"):
                with on_device(device), paddle.amp.auto_cast(enable=True, level="O2", dtype="bfloat16"):
                    mask = group_mask(paddle.to_tensor(doc), paddle.to_tensor(grp))  # fp32, as the model's
                    qt, kt, vt = (paddle.to_tensor(t).astype("bfloat16") for t in (qb, kb, vb))
                    got = core(qt, kt, vt, mask).astype("float32").numpy()
                return _compare_attention(name, got, ref_b, (qb, kb, vb), ok_BSS, U_FP32, U_BF16,
                                          f"Attention.core bf16 under AMP on {device} vs fp32 on CPU")
            out.append(guarded(f"attention-bf16[{mask_name}]", bf16))

        if not (is_gpu(device) and hasattr(F, "flashmask_attention")):
            why = "not available: flashmask_attention is a GPU kernel" if hasattr(F, "flashmask_attention") else \
                "not available: this Paddle has no paddle.nn.functional.flashmask_attention"
            out.append(Result(f"flashmask[{mask_name}]", "SKIP", why))
        else:
            def flashmask(name=f"flashmask[{mask_name}]"):
                with on_device(device):
                    ranges = paddle.to_tensor(flashmask_ranges(doc, grp))  # [B, 1, S, 2] LTS / UTE, causal=False
                    qt, kt, vt = (paddle.to_tensor(t).astype("bfloat16") for t in (qb, kb, vb))
                    got = F.flashmask_attention(qt, kt, vt, ranges, causal=False)
                    got = got.astype("float32").reshape([B, S, N * D]).numpy()
                return _compare_attention(name, got, ref_b, (qb, kb, vb), ok_BSS, U_FP32, U_BF16,
                                          f"flashmask_attention bf16 (start/end rows) on {device} vs fp32 on CPU")
            out.append(guarded(f"flashmask[{mask_name}]", flashmask))
    return out


# -- the tiny text model: fp32 and bf16 AMP ---------------------------------------------------------------------------
MODEL = ["model.vocab_size=96", "model.hidden_size=32", "model.num_layers=3", "model.num_heads=4",
         "model.num_kv_heads=2", "model.ffn_hidden_size=48", "model.moe.num_experts=4", "model.moe.top_k=2",
         "model.moe.expert_ffn_size=16", "model.moe.num_shared_experts=1", "model.moe.layer_start=1",
         "model.mtp.depth=1", "data.seq_len=16", "precision.dtype=bf16"]


def emulate_bf16(model, cfg) -> int:
    """`enable_bf16`'s CPU emulation whatever the build (a CUDA build's enable_bf16 takes AMP O2 instead)."""
    with mock.patch.object(mixed_precision.paddle, "is_compiled_with_cuda", lambda: False):
        return mixed_precision.enable_bf16(model, cfg)


def _forward(model, batch_np, cfg, device, amp: bool):
    """(loss, logits) of one forward pass on `device`, no gradients; `amp`: inside the trainer's autocast."""
    from ernie5.model.transformer import to_tensor_batch
    from ernie5.objectives.text import text_loss

    with on_device(device), paddle.no_grad():
        batch = to_tensor_batch(batch_np)
        ctx = mixed_precision.autocast(cfg.precision) if amp else contextlib.nullcontext()
        with ctx:
            loss = float(text_loss(model, batch, cfg.model.mtp.loss_weight).total)
            logits = model(batch["input_ids"]).astype("float32").numpy()
    return loss, logits


def check_model(device: str) -> list[Result]:
    """One forward loss of a tiny text MoE with MTP (tied head, shared experts, balancing loss) on the device
    against CPU: fp32 (`model-fp32`), then bf16 under the trainer's `enable_bf16` + `autocast` (AMP O2 on GPU
    builds) against the CPU emulation of `enable_bf16` (`bf16-amp`)."""
    from ernie5.model.transformer import build_model
    from ernie5.objectives.text import make_text_batch
    from ernie5.runconfig import load_config

    cfg = load_config(None, MODEL + ["model.moe.aux_loss_coef=0.01"])
    rng = np.random.default_rng(7)
    tokens = rng.integers(0, cfg.model.vocab_size, (2, 17))
    segments = np.repeat((np.arange(17) >= 11).astype(np.int64)[None], 2, 0)  # 2 documents per row
    batch_np = make_text_batch(tokens, segments, cfg.model.mtp.depth)

    def models():
        with on_device("cpu"), paddle.utils.unique_name.guard():
            ref = build_model(cfg.model, seed=3)
        with on_device(device), paddle.utils.unique_name.guard():
            dev = build_model(cfg.model, seed=3)  # GPU generators draw differently: copy the CPU weights
            dev.set_state_dict({k: v.numpy() for k, v in ref.state_dict().items()})
        ref.train(), dev.train()
        return ref, dev

    seen = {}

    def fp32():
        ref, dev = models()
        loss_ref, logits_ref = _forward(ref, batch_np, cfg, "cpu", amp=False)
        loss32, logits32 = seen["fp32"] = _forward(dev, batch_np, cfg, device, amp=False)
        rel = abs(loss32 - loss_ref) / abs(loss_ref)
        lerr = float(np.abs(logits32 - logits_ref).max() / np.abs(logits_ref).max())
        return verdict("model-fp32", rel <= 1e-5 and lerr <= 1e-5,
                       f"tiny text MoE forward on {device} vs CPU: loss {loss32:.6f} vs {loss_ref:.6f} (rel {rel:.1e} "
                       f"<= 1e-5), logits scale-rel err {lerr:.1e} <= 1e-5")

    out = [guarded("model-fp32", fp32)]
    out.append(guarded("bf16-amp", lambda: _bf16_amp(device, cfg, batch_np, models, seen)))
    return out


def _bf16_amp(device, cfg, batch_np, models, seen) -> Result:
    loss32 = seen["fp32"][0] if "fp32" in seen else _forward(models()[1], batch_np, cfg, device, amp=False)[0]
    ref, dev = models()
    emulate_bf16(ref, cfg.precision)
    if is_gpu(device):
        mixed_precision.enable_bf16(dev, cfg.precision)
    else:
        emulate_bf16(dev, cfg.precision)
    loss_emu, _ = _forward(ref, batch_np, cfg, "cpu", amp=False)
    loss16, _ = _forward(dev, batch_np, cfg, device, amp=True)
    gap, tol = abs(loss16 - loss_emu), 4 * U_BF16 * abs(loss_emu)
    ok = math.isfinite(loss16) and gap <= tol and loss16 != loss32
    how = "AMP O2" if is_gpu(device) and paddle.is_compiled_with_cuda() else "emulated"
    return verdict("bf16-amp", ok, f"bf16 ({how}) loss on {device} {loss16:.6f} vs CPU emulation {loss_emu:.6f}: "
                                   f"gap {gap:.1e} <= 4u|loss| = {tol:.1e}; differs from fp32 {loss32:.6f}: "
                                   f"{loss16 != loss32}")


# -- FP8 --------------------------------------------------------------------------------------------------------------
def check_fp8(device: str) -> list[Result]:
    """The FP8 recipe's linear (every build runs it: quantise -> dequantise -> fp32 GEMM) forward and backward on
    the device against CPU; and whether this device could run native FP8 GEMMs (ernie5 calls none)."""
    from ernie5.precision.config import FP8Config
    from ernie5.precision.fp8 import fake_quant_blocks, fake_quant_tiles, is_native_fp8_available
    from ernie5.precision.fp8_linear import fp8_linear

    cfg = FP8Config()
    M, K, Nout = 64, 256, 96
    rng = np.random.default_rng(5)
    x = rng.standard_normal((M, K)).astype(np.float32)
    w = (rng.standard_normal((K, Nout)) * 0.05).astype(np.float32)
    dy = (rng.standard_normal((M, Nout)) * 0.1).astype(np.float32)

    def run(dev):
        with on_device(dev):
            xt, wt = paddle.to_tensor(x, stop_gradient=False), paddle.to_tensor(w, stop_gradient=False)
            y = fp8_linear(xt, wt, cfg)
            (y * paddle.to_tensor(dy)).sum().backward()
            q = [fake_quant_tiles(paddle.to_tensor(x), cfg.tile).numpy(),
                 fake_quant_blocks(paddle.to_tensor(w), cfg.block).numpy()]
            return y.numpy(), xt.grad.numpy(), wt.grad.numpy(), q

    def recipe():
        return _fp8_verdict(run(device), run("cpu"), x, w, dy, device)

    out = [guarded("fp8-recipe", recipe)]
    if is_native_fp8_available():
        out.append(Result("fp8-native", "SKIP", "this GPU and Paddle could run native FP8 GEMMs "
                          "(fp8_gemm_blockwise, compute capability >= 8.9), but ernie5 calls none: every build runs "
                          "the emulated recipe checked by fp8-recipe"))
    else:
        out.append(Result("fp8-native", "SKIP", "FP8 GEMMs need a CUDA build of Paddle with "
                          "paddle.incubate.nn.functional.fp8_gemm_blockwise on a GPU of compute capability >= 8.9 "
                          "(ernie5.precision.fp8.is_native_fp8_available() is False here)"))
    return out


def _fp8_verdict(dev_run, cpu_run, x, w, dy, device) -> Result:
    (y, dx, dw, q), (y0, dx0, dw0, q0) = dev_run, cpu_run
    exact = all(np.array_equal(a, b) for a, b in zip(q, q0))
    errs = []
    for got, want, a, b in ((y, y0, x, w), (dx, dx0, dy, w.T), (dw, dw0, x.T, dy)):
        k = a.shape[1]  # the contraction length
        scale = (np.abs(a).astype(np.float64) @ np.abs(b)).max() * 1.15 ** 2  # |E4M3(v)| <= (1 + 2^-4) |v| + ...
        errs.append(float(np.abs(got - want).max() / (2 * k * U_FP32 * scale)))
    return verdict("fp8-recipe", exact and max(errs) <= 1,
                   f"E4M3 blockwise linear fwd+bwd on {device} vs CPU: quantised operands bit-equal {exact}; "
                   f"y / dx / dw err/bound {', '.join(f'{e:.2g}' for e in errs)} (bound 2 K 2^-24 max|A||B|)")
