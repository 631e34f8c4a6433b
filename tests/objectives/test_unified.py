"""The unified objective and model pieces: bitwise head loss, scale-wise mask, bit-flip corruption, audio depth
heads, END targets, isolated routing, posterior weighting and the token-balanced loss."""

import numpy as np
import paddle
import pytest

from ernie5.data.loader import MultimodalLoader
from ernie5.data.sequence import Segment, build_document, pack_documents, special_ids
from ernie5.model.config import ModelConfig, MoEConfig, MultimodalConfig
from ernie5.model.moe import MoELayer
from ernie5.model.transformer import build_model
from ernie5.objectives.config import ObjectiveConfig
from ernie5.objectives.unified import UnifiedObjective, flip_history, make_unified_batch

V = 40  # text vocabulary; specials follow
SP = special_ids(V)
SCALES = [1, 2]
BITS, LEVELS, BOOK = 2, 2, 8


def tiny_cfg(routing="agnostic") -> ModelConfig:
    moe = MoEConfig(num_experts=4, top_k=2, expert_ffn_size=16, layer_start=1, routing=routing,
                    vision_num_experts=3 if routing == "isolated" else 0,
                    vision_expert_ffn_size=24 if routing == "isolated" else 0, vision_top_k=1)
    return ModelConfig(vocab_size=V + 7, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                       ffn_hidden_size=48, max_seq_len=128, rope_theta=100.0, moe=moe,
                       multimodal=MultimodalConfig(enabled=True, visual_bits=BITS, num_scales=2, audio_levels=LEVELS,
                                                   audio_codebook=BOOK, und_cnn_dim=3, und_pix_dim=4, und_patches=16,
                                                   merger_heads=2))


def _image(rng, role="target"):
    codes = [rng.integers(0, 2, (1, s, s, BITS)).astype(np.uint8) for s in SCALES]
    inp = [rng.normal(size=(1, 2, 2, BITS)).astype(np.float32)]
    return Segment("image", role, codes=codes, scale_inputs=inp,
                   frame_latent=rng.normal(size=(1, 2, 2, BITS)).astype(np.float32))


def _docs(rng):
    und = rng.normal(size=(1, 2, 2, 7)).astype(np.float32)  # one 2x2 latent frame: one understanding token
    return [
        build_document([Segment("text", "input", ids=[3, 4]), _image(rng), Segment("text", ids=[5])], V, BITS,
                       LEVELS),
        build_document([Segment("image", "input", und=und), Segment("sep"), Segment("text", ids=[6, 7, 8])], V,
                       BITS, LEVELS),
        build_document([Segment("text", "input", ids=[9]),
                        Segment("audio", audio_codes=rng.integers(0, BOOK, (3, LEVELS)))], V, BITS, LEVELS),
    ]


def make_batch(seed=0, seq_len=48, cfg=None, maps=None, flip=0.0):
    rng = np.random.default_rng(seed)
    packed, _ = pack_documents(_docs(rng), seq_len)
    if packed["und_table"] is None:
        packed["und_table"] = np.zeros((0, 16, 7), np.float32)
    loader = MultimodalLoader(packed, packed["token"].shape[0], seed=0, shuffle=False)
    rows = loader.next()
    b = make_unified_batch(rows, scales=SCALES, audio_end=BOOK, specials=SP, mtp_depth=1,
                           cfg=cfg or ObjectiveConfig(bit_flip_rate=flip), maps=maps, row_keys=[[1, r] for r in range(packed["token"].shape[0])])
    return rows, b


def tensors(b):
    return {k: paddle.to_tensor(v) for k, v in b.items()}


def test_batch_targets_and_audio_end():
    rows, b = make_batch()
    tok = rows["token"][0]
    # the understanding token and the visual-generation tokens got features / bit targets
    assert (b["und_index"] >= 0).sum() == 1 and b["und_feats"].shape == (1, 16, 7)
    vis = b["vis_weight"][0] > 0
    assert vis.sum() == 5  # scales 1 + 4 of the target image
    # END on level 1 exactly where the next token is EOA inside an audio segment
    eoa = np.nonzero(tok == SP["<eoa>"])[0][0]
    assert b["audio_targets"][0, eoa - 1].tolist() == [BOOK, -100]
    # BOA and frames 1..2 predict the next frame's codes
    boa = np.nonzero(tok == SP["<boa>"])[0][0]
    assert b["audio_targets"][0, boa].tolist() == rows["audio"][0, boa + 1].tolist()
    # MTP depth 1 target at t is the text target of t + 1 within the document
    lab0, lab1 = b["labels_0"][0], b["labels_1"][0]
    same = rows["doc"][0, 1:] == rows["doc"][0, :-1]
    assert np.array_equal(lab1[:-1], np.where(same, lab0[1:], -100))


def test_scale_weights_favour_coarse_scales():
    _, b = make_batch(cfg=ObjectiveConfig(visual_scale_power=1.0))
    w, s = b["vis_weight"][0], b["scale"][0]
    on = w > 0
    assert np.isclose(w[on].mean(), 1.0)
    # power 1: every scale carries the same total weight (1 token at scale 0 weighs as much as 4 at scale 1)
    assert np.isclose(w[on & (s == 0)].sum(), w[on & (s == 1)].sum())


def test_bitwise_head_loss_equals_reference():
    paddle.seed(0)
    model = build_model(tiny_cfg(), seed=0)
    _, b = make_batch(cfg=ObjectiveConfig(visual_scale_power=0.5))
    t = tensors(b)
    out = UnifiedObjective(ObjectiveConfig(visual_scale_power=0.5), 0.3, 48).loss(model, t)
    # reference: weighted mean over visual tokens of the mean over bits of BCE(sigmoid(logit), bit)
    bb = model.backbone(None, t["pos"], t["doc"], embeds_BSH=model.embed_unified(t), groups_BS=t["group"],
                        modality_BS=t["modality"])
    logits = model.io.visual_logits(model.norm(bb.hidden_BSH)).numpy()[0]
    w = b["vis_weight"][0]
    p = 1 / (1 + np.exp(-logits))
    bits = b["vis_bits"][0]
    bce = -(bits * np.log(p) + (1 - bits) * np.log(1 - p)).mean(-1)
    want = (bce * w).sum() / w.sum()
    assert out.terms["loss_visual"] == pytest.approx(want, rel=1e-5)


def test_scale_wise_mask_sees_own_scale_and_nothing_later():
    model = build_model(tiny_cfg(), seed=0)
    model.eval()
    rows, b = make_batch()
    s = b["scale"][0]
    scale0, scale1 = np.nonzero(s == 0)[0], np.nonzero(s == 1)[0]

    def hidden(bb):
        t = tensors(bb)
        return model.backbone(None, t["pos"], t["doc"], embeds_BSH=model.embed_unified(t), groups_BS=t["group"],
                              modality_BS=t["modality"]).hidden_BSH.numpy()[0]

    base = hidden(b)
    later = dict(b, vis_in=b["vis_in"].copy())
    later["vis_in"][0, scale1[0]] += 5.0  # change one token of the last scale
    h = hidden(later)
    assert np.allclose(h[:scale1[0]], base[:scale1[0]], atol=1e-6)  # nothing earlier sees it (scale 0 included)
    assert not np.allclose(h[scale1[1:]], base[scale1[1:]], atol=1e-4)  # its own scale sees it (bidirectional)
    assert np.allclose(h[scale0], base[scale0], atol=1e-6)


class _TinyQuant:
    """A linear stand-in for the vision tokenizer's next_scale_inputs (scales 1, 2): bilinear-free, exact."""

    cfg = type("C", (), {"scales": SCALES, "bits": BITS, "latent_side": SCALES[-1]})

    def next_scale_inputs(self, codes):
        c0 = codes[0].numpy().astype(np.float32) * 2 - 1  # [1, 1, 1, 1, d]
        return [paddle.to_tensor(np.broadcast_to(0.7 * c0 + 0.1, (1, 1, 2, 2, BITS)).copy())]

    def quantized_latent(self, codes):
        """[1, d, T=1, 2, 2]: 0.7 x scale 0's signs everywhere + 0.3 x scale 1's signs + 0.1."""
        c0 = codes[0].numpy().astype(np.float32) * 2 - 1  # [1, 1, 1, 1, d]
        c1 = codes[1].numpy().astype(np.float32) * 2 - 1  # [1, 1, 2, 2, d]
        return paddle.to_tensor((0.7 * c0 + 0.3 * c1 + 0.1).transpose(0, 4, 1, 2, 3).copy())


def test_bit_flips_change_inputs_only_and_match_the_tokenizer():
    from ernie5.data.media_tokenize import visual_history_maps

    tq = _TinyQuant()
    maps = visual_history_maps(tq)
    rng = np.random.default_rng(3)
    codes = [rng.integers(0, 2, (1, s, s, BITS)).astype(np.uint8) for s in SCALES]
    tc = [paddle.to_tensor(c[None]) for c in codes]
    inp = [x.numpy()[0] for x in tq.next_scale_inputs(tc)]
    latent = tq.quantized_latent(tc).numpy()[0].transpose(1, 2, 3, 0)  # [T, L, L, d]
    doc = build_document([Segment("text", ids=[1]), Segment("image", codes=codes, scale_inputs=inp,
                                                            frame_latent=latent)], V, BITS)
    packed, _ = pack_documents([doc], 16)
    rows = {k: v for k, v in packed.items() if k != "und_table"}
    start = int(np.nonzero(rows["scale"][0] == 0)[0][0])
    ctx = start + 5  # the frame context position (one 2x2 block of latent cells)
    assert rows["scale"][0, ctx] == len(SCALES)
    # with every bit flipped, the recomputed inputs equal the tokenizer's inputs for the flipped codes: the next
    # scale's from the flipped scale 0, the context's from both flipped scales
    flipped = flip_history(rows, maps, SCALES, rate=1.0, rngs=[np.random.default_rng(0)])
    flip_t = [paddle.to_tensor((1 - c)[None]) for c in codes]
    want = tq.next_scale_inputs(flip_t)[0]
    assert np.allclose(flipped[0, start + 1:start + 5, :BITS], want.numpy().reshape(4, BITS), atol=1e-6)
    assert np.allclose(flipped[0, start + 1:start + 5, BITS:], 0)
    want_ctx = tq.quantized_latent(flip_t).numpy()[0, :, 0].transpose(1, 2, 0).reshape(-1)  # cells (0,0)..(1,1)
    assert np.allclose(flipped[0, ctx], want_ctx, atol=1e-6)
    assert np.allclose(rows["vis_in"][0, start + 1:start + 5, :BITS], inp[0].reshape(4, BITS), atol=1e-6)
    assert np.allclose(rows["vis_in"][0, ctx], latent.reshape(-1), atol=1e-6)
    # targets never change; inputs of the corrupted batch differ from the clean one
    cfg = ObjectiveConfig(bit_flip_rate=0.4)
    loader_rows = dict(rows, und_feats=np.zeros((0, 16, 7), np.float32))
    clean = make_unified_batch(loader_rows, scales=SCALES, audio_end=BOOK, specials=SP, mtp_depth=0,
                               cfg=ObjectiveConfig())
    changed = 0
    for seed in range(6):  # the history is one token of 2 bits: some draws flip nothing
        dirty = make_unified_batch(loader_rows, scales=SCALES, audio_end=BOOK, specials=SP, mtp_depth=0, cfg=cfg,
                                   maps=maps, row_keys=[seed])
        for k in ("vis_bits", "labels_0", "audio_targets", "vis_weight"):
            assert np.array_equal(clean[k], dirty[k]), k
        changed += not np.allclose(clean["vis_in"], dirty["vis_in"])
    assert changed >= 2


def test_depth_heads_consume_the_previous_level():
    model = build_model(tiny_cfg(), seed=0)
    paddle.seed(1)
    h = paddle.randn([5, 32])
    codes = paddle.to_tensor(np.random.default_rng(0).integers(0, BOOK, (5, LEVELS)))
    base = [x.numpy() for x in model.io.audio_logits(h, codes)]
    c1 = codes.numpy().copy()
    c1[:, 0] = (c1[:, 0] + 1) % BOOK
    changed = [x.numpy() for x in model.io.audio_logits(h, paddle.to_tensor(c1))]
    assert np.allclose(changed[0], base[0])  # level 1 does not see its own code
    assert not np.allclose(changed[1], base[1])  # level 2 sees level 1's code
    c2 = codes.numpy().copy()
    c2[:, 1] = (c2[:, 1] + 1) % BOOK
    assert all(np.allclose(a.numpy(), b) for a, b in zip(model.io.audio_logits(h, paddle.to_tensor(c2)), base))
    assert base[0].shape[-1] == BOOK + 1 and base[1].shape[-1] == BOOK  # level 1 has END


def test_isolated_routing_keeps_modalities_in_their_groups():
    cfg = tiny_cfg("isolated")
    paddle.seed(0)
    layer = MoELayer(cfg, layer=1)
    layer.train()
    rng = np.random.default_rng(0)
    x = paddle.to_tensor(rng.normal(size=(2, 12, 32)).astype(np.float32))
    mod = paddle.to_tensor(rng.choice([0, 1, 2, 3], size=(2, 12)).astype(np.int64))
    y, _ = layer(x, None, mod)
    counts = layer.modality_counts  # [4, 4 text + 3 vision]
    assert counts[[0, 3], 4:].sum() == 0 and counts[[0, 3], :4].sum() > 0  # text/audio: text experts only
    assert counts[[1, 2], :4].sum() == 0 and counts[[1, 2], 4:].sum() > 0  # image/video: vision experts only
    # a vision token's output is exactly its vision-group routing (+ shared experts: none here)
    m = mod.numpy().reshape(-1)
    i = int(np.nonzero((m == 1) | (m == 2))[0][0])
    xt = x.reshape([-1, 32])[i:i + 1]
    r = layer.vision_router(xt)
    e = int(r.topk_ids_TK.numpy()[0, 0])
    want = layer.vision_experts[e](xt) * r.topk_w_TK[:, :1]
    assert np.allclose(y.reshape([-1, 32])[i].numpy(), want.numpy()[0], atol=1e-5)


def _note_step(obj, micro_batches, applied=True, sum_fn=lambda a: a):
    for values in micro_batches:
        obj._note(values)
    obj.finish_step(applied, sum_fn)


def test_posterior_weighting_over_several_steps_matches_a_hand_computed_ema():
    """Running means by hand (momentum 0.5): step 1 text (8 + 6) / 2 = 7, visual (0.5 + 0.7) / 2 = 0.6, audio 4
    (seeded with the first values); step 2 text 0.5 * 7 + 0.5 * 3 = 5, visual 0.5 * 0.6 + 0.5 * 0.2 = 0.4, audio
    absent (stays 4); step 3 skipped (its 100s change nothing). Weights: fixed x mean(5, 0.4, 4) / running."""
    obj = UnifiedObjective(ObjectiveConfig(modality_weighting="posterior", posterior_momentum=0.5,
                                           visual_weight=2.0), 0.3, 48)
    present = {k: paddle.to_tensor(1.0) for k in ("text", "visual", "audio")}
    assert obj._weights(present) == {"text": 1.0, "visual": 2.0, "audio": 1.0}  # no running mean yet: fixed
    _note_step(obj, [{"text": 8.0, "visual": 0.5, "audio": 4.0}, {"text": 6.0, "visual": 0.7}])
    assert obj.running == pytest.approx({"text": 7.0, "visual": 0.6, "audio": 4.0})
    _note_step(obj, [{"text": 3.0, "visual": 0.2}])
    assert obj.running == pytest.approx({"text": 5.0, "visual": 0.4, "audio": 4.0})
    _note_step(obj, [{"text": 100.0, "visual": 100.0, "audio": 100.0}], applied=False)
    assert obj.running == pytest.approx({"text": 5.0, "visual": 0.4, "audio": 4.0})
    scale = (5.0 + 0.4 + 4.0) / 3
    want = {"text": scale / 5.0, "visual": 2.0 * scale / 0.4, "audio": scale / 4.0}
    got = obj._weights(present)
    assert got == pytest.approx(want)
    # each modality's running value times its (unit-fixed) weight is the same number: one scale for all
    assert got["text"] * 5.0 == pytest.approx(got["audio"] * 4.0) == pytest.approx(scale)
    # a modality absent from a batch is weighed by the others' scale only when present
    assert obj._weights({"text": present["text"]}) == pytest.approx({"text": 1.0})
    obj2 = UnifiedObjective(ObjectiveConfig(), 0.3, 48)
    obj2.load_state_dict(obj.state_dict())
    assert obj2.running == obj.running


def test_posterior_weighting_ignores_non_finite_values_and_sums_over_ranks():
    obj = UnifiedObjective(ObjectiveConfig(modality_weighting="posterior", posterior_momentum=0.5), 0.3, 48)
    _note_step(obj, [{"text": float("nan"), "visual": 1.0}, {"text": 2.0, "visual": float("inf")}])
    assert obj.running == {"text": 2.0, "visual": 1.0}
    # two ranks: rank 0 saw text 2 and 4, rank 1 saw text 12 -> the step's mean over both is 6
    other_rank = np.zeros((2, 3))
    other_rank[:, 0] = (12.0, 1.0)
    _note_step(obj, [{"text": 2.0}, {"text": 4.0}], sum_fn=lambda a: a + other_rank)
    assert obj.running["text"] == pytest.approx(0.5 * 2.0 + 0.5 * 6.0)


def test_loss_does_not_move_the_running_means():
    paddle.seed(0)
    model = build_model(tiny_cfg(), seed=0)
    obj = UnifiedObjective(ObjectiveConfig(modality_weighting="posterior"), 0.3, 48)
    _, b = make_batch()
    t = tensors(b)
    out = obj.loss(model, t)
    assert obj.running == {}
    obj.finish_step(True)
    assert obj.running == pytest.approx({k: out.terms[f"loss_{k}"] for k in ("text", "visual", "audio")})
    model.eval()
    obj.loss(model, t)  # evaluation notes nothing
    obj.finish_step(True)
    assert obj.running == pytest.approx({k: out.terms[f"loss_{k}"] for k in ("text", "visual", "audio")})


def test_token_balanced_value_is_the_mean_and_gradient_the_sum_over_C():
    obj = UnifiedObjective(ObjectiveConfig(token_balanced=True, token_balance_length=10), 0.3, 48)
    x = paddle.to_tensor([1.0, 2.0, 3.0], stop_gradient=False)
    out = obj._reduce(x * 1.0, paddle.ones([3]), rows=2)
    out.backward()
    assert float(out) == pytest.approx(2.0)
    assert np.allclose(x.grad.numpy(), 1.0 / 20)


def test_tiny_unified_training_lowers_every_modality_loss():
    paddle.seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, seed=0)
    opt = paddle.optimizer.AdamW(3e-3, parameters=model.parameters())
    obj = UnifiedObjective(ObjectiveConfig(), 0.3, 48)
    _, b = make_batch()
    t = tensors(b)
    first = None
    for _ in range(30):
        out = obj.loss(model, t)
        first = first or out.terms
        out.total.backward()
        opt.step()
        opt.clear_grad()
    for k in ("loss_text", "loss_visual", "loss_audio"):
        assert out.terms[k] < 0.7 * first[k], (k, first[k], out.terms[k])
