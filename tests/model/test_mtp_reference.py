"""Multi-token prediction against a float64 NumPy model written from the formulas, reading only raw weights.

MTP depth 1 (DeepSeek-V3 / ERNIE 4.5 form): h'_t = Block(W_proj^T [RMSNorm_e(embed(x_{t+1})) ; RMSNorm_h(h_t)]),
then the shared head (final RMSNorm + tied embedding) on h'_t, cross-entropy against token t+2 (IGNORE when
t+2 is past the row or in another document). h_t, the backbone's last hidden state, is computed here too, so the
reference shares no code with the model: its NTP loss is checked first, which validates the NumPy block.
"""

import numpy as np
import paddle

from ernie5.model.config import ModelConfig, MTPConfig
from ernie5.model.transformer import QueryRows, build_model, to_tensor_batch
from ernie5.objectives.text import make_text_batch, text_loss

CFG = ModelConfig(vocab_size=37, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                  rope_theta=10000.0, mtp=MTPConfig(depth=1))  # dense layers only: every block is plain


def rms(x, w, eps=CFG.rms_norm_eps):
    return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w


def rope(x_BSND, pos_BS):
    """Interleaved rotary embedding: channel pair (2i, 2i+1) rotated by pos * theta^(-2i/D). With text positions
    (t = h = w) the model's 3-axis table reduces to this 1-D form."""
    D = x_BSND.shape[-1]
    inv = CFG.rope_theta ** (-np.arange(D // 2) * 2.0 / D)
    ang = pos_BS[:, :, None, None] * inv  # [B, S, 1, D/2]
    c, s = np.cos(ang), np.sin(ang)
    x0, x1 = x_BSND[..., 0::2], x_BSND[..., 1::2]
    out = np.empty_like(x_BSND)
    out[..., 0::2] = x0 * c - x1 * s
    out[..., 1::2] = x1 * c + x0 * s
    return out


def block(P, pre, x_BSH, pos_BS, allowed_BSS):
    """Pre-norm block: x + o(attn(norm(x))), then + down(silu(gate) * up)(norm(x)); GQA, query head n reads kv
    head n // (N / K)."""
    B, S, H = x_BSH.shape
    N, K, D = CFG.num_heads, CFG.num_kv_heads, CFG.dim_head
    h = rms(x_BSH, P[pre + "input_norm.weight"])
    q = rope((h @ P[pre + "attn.q_proj.weight"]).reshape(B, S, N, D), pos_BS)
    k = rope((h @ P[pre + "attn.k_proj.weight"]).reshape(B, S, K, D), pos_BS)
    v = (h @ P[pre + "attn.v_proj.weight"]).reshape(B, S, K, D)
    heads = []
    for n in range(N):
        kv = n // (N // K)
        scores = np.einsum("bid,bjd->bij", q[:, :, n], k[:, :, kv]) / np.sqrt(D)
        scores = np.where(allowed_BSS, scores, -np.inf)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        heads.append(np.einsum("bij,bjd->bid", p, v[:, :, kv]))
    x = x_BSH + np.concatenate(heads, -1) @ P[pre + "attn.o_proj.weight"]
    gu = rms(x, P[pre + "post_attn_norm.weight"]) @ P[pre + "mlp.gate_up.weight"]
    F_ = CFG.ffn_hidden_size
    gate, up = gu[..., :F_], gu[..., F_:]
    return x + (gate / (1 + np.exp(-gate)) * up) @ P[pre + "mlp.down.weight"]


def mean_ce(P, hidden_BSH, target_BS, valid_BS):
    logits = rms(hidden_BSH, P["norm.weight"]) @ P["embed.weight"].T  # shared head, tied to the embedding
    logits = logits - logits.max(-1, keepdims=True)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    picked = np.take_along_axis(logp, np.where(valid_BS, target_BS, 0)[..., None], -1)[..., 0]
    return -picked[valid_BS].mean()


def reference_hidden(P, tokens_BR, seg_BR, swap_concat=False):
    """(backbone hidden h, MTP-1 hidden h1), both [B, S, H], of the NumPy model on rows of R = S + 1 tokens."""
    B, R = tokens_BR.shape
    S = R - 1
    seg = seg_BR[:, :S]
    pos = np.zeros((B, S))
    for b in range(B):  # positions restart at 0 in every document
        for t in range(1, S):
            pos[b, t] = 0 if seg[b, t] != seg[b, t - 1] else pos[b, t - 1] + 1
    allowed = (seg[:, :, None] == seg[:, None, :]) & np.tril(np.ones((S, S), bool))
    E = P["embed.weight"]
    h = E[tokens_BR[:, :S]]
    for i in range(CFG.num_layers):
        h = block(P, f"layers.{i}.", h, pos, allowed)
    e_next = rms(E[tokens_BR[:, 1:S + 1]], P["mtp.0.emb_norm.weight"])  # embed(x_{t+1})
    h_norm = rms(h, P["mtp.0.hidden_norm.weight"])
    cat = np.concatenate([h_norm, e_next] if swap_concat else [e_next, h_norm], -1)
    return h, block(P, "mtp.0.block.", cat @ P["mtp.0.proj.weight"], pos, allowed)


def reference_losses(P, tokens_BR, seg_BR, swap_concat=False):
    """(NTP loss, MTP-1 loss) of the NumPy model on rows of R = S + 1 tokens."""
    B, R = tokens_BR.shape
    S = R - 1
    seg = seg_BR[:, :S]
    h, h1 = reference_hidden(P, tokens_BR, seg_BR, swap_concat)
    ntp = mean_ce(P, h, tokens_BR[:, 1:], seg_BR[:, 1:] == seg)
    # depth 1 at t predicts x_{t+2}: defined for t + 2 <= S, and only inside the document of t
    tgt = np.zeros((B, S), np.int64)
    valid = np.zeros((B, S), bool)
    tgt[:, :S - 1] = tokens_BR[:, 2:]
    valid[:, :S - 1] = seg_BR[:, 2:] == seg_BR[:, :S - 1]
    return ntp, mean_ce(P, h1, tgt, valid)


def randomised_model():
    """The tiny model with weights far from the tiny init, and its weights in float64."""
    model = build_model(CFG, seed=0)
    # weights far from the tiny init (std 0.02) so the logits are O(1) and every piece of the formula shows in
    # the loss: norms' gains differ from 1 and from each other, projections have unit-scale outputs
    rng = np.random.default_rng(5)
    with paddle.no_grad():
        for name, p in model.named_parameters():
            shape = p.shape
            if len(shape) == 1:
                val = 1.0 + 0.5 * rng.standard_normal(shape)
            elif name == "embed.weight":
                val = 0.7 * rng.standard_normal(shape)
            else:
                val = rng.standard_normal(shape) / np.sqrt(shape[0])
            p.set_value(paddle.to_tensor(val.astype(np.float32)))
    return model, {n: p.numpy().astype(np.float64) for n, p in model.named_parameters()}


def test_mtp_loss_equals_an_independent_numpy_reference():
    model, P = randomised_model()
    rng = np.random.default_rng(6)
    tokens = rng.integers(0, CFG.vocab_size, (2, 13))
    seg = np.array([[0] * 5 + [1] * 8, [0] * 13])  # row 0 packs two documents
    model.train()
    out = text_loss(model, to_tensor_batch(make_text_batch(tokens, seg, 1)), mtp_weight=0.5)
    ntp, mtp = reference_losses(P, tokens, seg)
    # fp32 model vs float64 reference: sums over H = 32 and a vocabulary of 37 with O(1) terms round at ~1e-7
    # relative (fp32 unit roundoff 6e-8 times a few accumulations); the losses (~8 here) agree to ~1e-7. rtol
    # 2e-5 leaves two orders of margin and is still ~4000x smaller than what a wrong piece does (the two concat
    # halves swapped moves the MTP loss by ~7%, checked below)
    rtol = 2e-5
    np.testing.assert_allclose(out.terms["loss_ntp"], ntp, rtol=rtol)  # validates the NumPy backbone / block
    np.testing.assert_allclose(out.terms["loss_mtp_1"], mtp, rtol=rtol)
    np.testing.assert_allclose(float(out.total), ntp + 0.5 * mtp, rtol=rtol)
    _, swapped = reference_losses(P, tokens, seg, swap_concat=True)
    assert abs(swapped - mtp) > 100 * rtol * mtp  # the test can tell the concat order apart


def test_mtp_block_on_picked_positions_equals_the_reference_there():
    """`QueryRows`: the MTP block computes queries only at some positions (the unified objective's text
    targets), keys over all. At those positions it must equal the whole block: here the NumPy reference, on
    rows with different counts, one row with none, and the last position of a row (padding repeats it)."""
    model, P = randomised_model()
    rng = np.random.default_rng(7)
    B, S = 3, 12
    tokens = rng.integers(0, CFG.vocab_size, (B, S + 1))
    seg = np.array([[0] * 5 + [1] * 8, [0] * 13, [0] * 7 + [1] * 6])
    _, h1_ref = reference_hidden(P, tokens, seg)
    picked = {0: [1, 4, 5, 11], 1: [], 2: [0, 6]}  # row 1 has none; row 0 ends on its last position
    flat = np.array([b * S + s for b in range(B) for s in picked[b]], np.int64)
    model.eval()
    t = to_tensor_batch(make_text_batch(tokens, seg, 1))
    out = model.backbone(t["input_ids"], t["positions"], t["segment_ids"])
    rows = QueryRows.from_flat(paddle.to_tensor(flat), B, S)
    assert (rows.B, rows.Q) == (B, 4)
    h1 = model.mtp_hidden(1, out.hidden_BSH, model.embed(t["mtp_ids_1"]), out, rows)
    # same tolerance argument as the loss test, on O(1) hidden values: fp32 vs float64 agree to ~1e-6
    np.testing.assert_allclose(h1.numpy(), h1_ref.reshape(B * S, -1)[flat], rtol=1e-4, atol=1e-4)
    wrong = QueryRows.from_flat(paddle.to_tensor(flat + 1), B, S)  # the check can tell positions apart
    assert not np.allclose(model.mtp_hidden(1, out.hidden_BSH, model.embed(t["mtp_ids_1"]), out, wrong).numpy(),
                           h1_ref.reshape(B * S, -1)[flat], atol=1e-2)


def test_mtp_on_picked_positions_has_the_whole_blocks_gradients():
    """Backward through the picked-rows path gives every weight the gradient of the whole block followed by
    the same pick (keys / values of unpicked positions still receive theirs)."""
    model, _ = randomised_model()
    rng = np.random.default_rng(8)
    B, S = 2, 12
    tokens = rng.integers(0, CFG.vocab_size, (B, S + 1))
    seg = np.array([[0] * 5 + [1] * 8, [0] * 13])
    flat = np.array([2, 3, 9, 12 + 7], np.int64)
    t = to_tensor_batch(make_text_batch(tokens, seg, 1))
    w = paddle.to_tensor(rng.standard_normal((len(flat), CFG.hidden_size)).astype(np.float32))
    grads = []
    for use_rows in (False, True):
        out = model.backbone(t["input_ids"], t["positions"], t["segment_ids"])
        emb = model.embed(t["mtp_ids_1"])
        if use_rows:
            h1 = model.mtp_hidden(1, out.hidden_BSH, emb, out, QueryRows.from_flat(paddle.to_tensor(flat), B, S))
        else:
            h1 = paddle.gather(model.mtp_hidden(1, out.hidden_BSH, emb, out).reshape([B * S, -1]),
                               paddle.to_tensor(flat))
        (h1 * w).sum().backward()
        grads.append({n: p.grad.numpy().copy() for n, p in model.named_parameters() if p.grad is not None})
        model.clear_gradients()
    assert grads[0].keys() == grads[1].keys() and any(k.startswith("mtp.0.block.attn.k_proj") for k in grads[0])
    for k in grads[0]:  # one fp32 computation in two association orders: relative to the gradient's scale
        scale = np.abs(grads[0][k]).max() + 1e-12
        np.testing.assert_allclose(grads[1][k] / scale, grads[0][k] / scale, atol=1e-5, err_msg=k)


def test_mtp_loss_with_targets_equals_the_whole_block_path_at_depth_three():
    """`mtp_loss(..., targets=)` (depths 1-2 whole, then picked rows; the last depth's queries only at its
    targets) against `mtp_loss` without targets picking the same rows afterwards: the same losses and
    gradients, with one row that has no last-depth target."""
    from ernie5.objectives.mtp import mtp_loss

    cfg = ModelConfig(vocab_size=37, hidden_size=32, num_layers=1, num_heads=4, num_kv_heads=2, ffn_hidden_size=48,
                      rope_theta=10000.0, mtp=MTPConfig(depth=3))
    model = build_model(cfg, seed=3)
    rng = np.random.default_rng(9)
    B, S = 3, 10
    tokens = rng.integers(0, 37, (B, S + 1))
    seg = np.zeros((B, S + 1), np.int64)
    t = to_tensor_batch(make_text_batch(tokens, seg, 3))
    picked = {1: [0, 3, 12, 25], 2: [1, 2, 15], 3: [4, 5, 6, 27]}  # depth 3: row 1 (positions 10-19) has none
    w = {k: paddle.to_tensor(rng.standard_normal((len(v), 32)).astype(np.float32)) for k, v in picked.items()}
    results = []
    for with_targets in (False, True):
        out = model.backbone(t["input_ids"], t["positions"], t["segment_ids"])
        emb = model.embed(t["input_ids"])
        next_embeds = lambda k: paddle.concat([emb[:, k:], paddle.zeros_like(emb[:, :k])], axis=1)  # noqa: E731
        idx = {k: paddle.to_tensor(np.array(v, np.int64)) for k, v in picked.items()}
        if with_targets:
            loss = mtp_loss(model, out, next_embeds, lambda k, h: (h * w[k]).sum(), 1.0, {}, lambda k: idx[k])
        else:
            loss = mtp_loss(model, out, next_embeds,
                            lambda k, h: (paddle.gather(h.reshape([B * S, -1]), idx[k]) * w[k]).sum(), 1.0, {})
        loss.backward()
        results.append((float(loss), {n: p.grad.numpy().copy() for n, p in model.named_parameters()
                                      if p.grad is not None}))
        model.clear_gradients()
    (l0, g0), (l1, g1) = results
    assert abs(l1 - l0) <= 1e-5 * abs(l0) and g0.keys() == g1.keys()
    for k in g0:  # one fp32 computation in two association orders
        scale = np.abs(g0[k]).max() + 1e-12
        np.testing.assert_allclose(g1[k] / scale, g0[k] / scale, atol=1e-5, err_msg=k)
