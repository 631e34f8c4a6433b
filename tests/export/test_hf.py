"""HF ERNIE 4.5 interop: exported dirs load in transformers with the same logits; imports reproduce HF logits."""

import json

import numpy as np
import paddle
import pytest

import ernie5
from ernie5.errors import UserError
from ernie5.export import export_hf, import_hf, load_pretrained_state
from ernie5.export.hf_layout import to_hf_tensors
from ernie5.model.transformer import build_model
from ernie5.train.checkpoint import apply_model_state, load_model_weights
from tests.export.tiny import ernie_logits, hf_logits, make_checkpoint, token_ids

SHAPES = {
    # shared expert, dense layer 0, top-2 of 4, GQA 4:2, MTP (exported under mtp names, ignored by transformers)
    "shared_dense_first_gqa_mtp": ["model.mtp.depth=1"],
    # no shared experts, top-1, one kv head (MQA), MoE every second layer, untied output head
    "no_shared_top1_mqa_untied": ["model.moe.num_shared_experts=0", "model.moe.top_k=1", "model.num_kv_heads=1",
                                  "model.moe.layer_start=0", "model.moe.layer_interval=2", "model.num_layers=4",
                                  "model.tie_embeddings=false"],
    # 2 shared, top-3 of 6, no GQA, head_dim != hidden/heads, MoE layers bounded by layer_end, other theta / eps
    "two_shared_top3_mha_headdim": ["model.moe.num_shared_experts=2", "model.moe.num_experts=6", "model.moe.top_k=3",
                                    "model.num_kv_heads=4", "model.head_dim=12", "model.moe.layer_end=1",
                                    "model.rope_theta=10000", "model.rms_norm_eps=1e-6"],
}


@pytest.mark.parametrize("shape", list(SHAPES))
def test_export_matches_transformers_logits(shape, tmp_path, tok_model):
    ckpt, model, cfg = make_checkpoint(tmp_path, tok_model, *SHAPES[shape], seed=len(shape))
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    ids = token_ids(2, 11)
    ours = ernie_logits(model, ids)
    np.testing.assert_allclose(hf_logits(out, ids), ours, atol=1e-4, rtol=0)
    # the correction bias really changes routing here, so the match above checks how HF applies it
    for moe in model.moe_layers():
        moe.router.e_score_correction_bias.set_value(paddle.zeros_like(moe.router.e_score_correction_bias))
    assert np.abs(ernie_logits(model, ids) - ours).max() > 1e-3
    hf = json.loads((out / "config.json").read_text())
    assert hf["architectures"] == ["Ernie4_5_MoeForCausalLM"] and hf["model_type"] == "ernie4_5_moe"
    assert hf["tie_word_embeddings"] == cfg.model.tie_embeddings


def test_export_layout_dtypes_and_roundtrip_import(tmp_path, tok_model):
    from safetensors.numpy import load_file

    ckpt, model, _ = make_checkpoint(tmp_path, tok_model, "model.mtp.depth=1")
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.model", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    t = load_file(str(out / "model.safetensors"))
    router = t["model.layers.1.mlp.gate.weight"]
    assert router.shape == (4, 32) and router.dtype == np.float32
    assert t["model.layers.1.mlp.moe_statics.e_score_correction_bias"].shape == (1, 4)
    assert t["model.layers.0.mlp.gate_proj.weight"].shape == (48, 32)  # [out, in]
    assert t["model.mtp_linear_proj.0.weight"].shape == (32, 64) and "lm_head.weight" not in t
    back = import_hf(str(out), str(tmp_path / "imported"))
    state = load_model_weights(back)
    for k, v in model.state_dict().items():  # lossless both ways, MTP included
        np.testing.assert_array_equal(state[k], v.numpy(), err_msg=k)
    reloaded = ernie5.load_model(str(back))
    assert reloaded.cfg.mtp.depth == 1
    np.testing.assert_array_equal(ernie_logits(reloaded, token_ids(1, 5)), ernie_logits(model, token_ids(1, 5)))


def test_dense_model_exports_as_ernie4_5(tmp_path, tok_model):
    ckpt, model, _ = make_checkpoint(tmp_path, tok_model, "model.moe.num_experts=0", "model.num_kv_heads=1")
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "ernie4_5"
    ids = token_ids(2, 6)
    np.testing.assert_allclose(hf_logits(out, ids, "Ernie4_5ForCausalLM"), ernie_logits(model, ids), atol=1e-4, rtol=0)


def test_sharded_export_loads_in_transformers_and_imports(tmp_path, tok_model):
    ckpt, model, _ = make_checkpoint(tmp_path, tok_model)
    out = export_hf(str(ckpt), str(tmp_path / "hf"), max_shard_bytes=40_000)
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    ids = token_ids(2, 7)
    np.testing.assert_allclose(hf_logits(out, ids), ernie_logits(model, ids), atol=1e-4, rtol=0)
    reloaded = ernie5.load_model(str(import_hf(str(out), str(tmp_path / "imported"))))
    np.testing.assert_array_equal(ernie_logits(reloaded, ids), ernie_logits(model, ids))


def test_import_of_transformers_saved_model_reproduces_its_logits(tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    hf_cfg = transformers.Ernie4_5_MoeConfig(
        vocab_size=97, hidden_size=24, intermediate_size=40, num_hidden_layers=3, num_attention_heads=6,
        num_key_value_heads=2, head_dim=8, moe_intermediate_size=12, moe_k=2, moe_num_experts=5,
        moe_num_shared_experts=1, moe_layer_start_index=1, max_position_embeddings=128, rms_norm_eps=1e-5)
    hf_model = transformers.Ernie4_5_MoeForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # transformers initialises norms to 1 and the bias to 0: make both informative
        for name, p in hf_model.named_parameters():
            if "norm" in name or "e_score_correction_bias" in name:
                p.copy_(torch.empty_like(p).uniform_(-0.3, 0.3) + (1.0 if "norm" in name else 0.0))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    ids = np.random.default_rng(1).integers(0, 97, size=(2, 9))
    with torch.no_grad():
        want = hf_model(torch.from_numpy(ids)).logits.numpy()
    ckpt = import_hf(str(tmp_path / "hf"), str(tmp_path / "ckpt"))
    model = ernie5.load_model(str(ckpt))
    assert [model.cfg.is_moe_layer(i) for i in range(3)] == [False, True, True]
    np.testing.assert_allclose(ernie_logits(model, ids), want, atol=1e-4, rtol=0)
    # model.init_from path: the same weights straight from the HF dir into a model built from a run config
    fresh = build_model(model.cfg, seed=3)
    apply_model_state(fresh, load_pretrained_state(str(tmp_path / "hf"), model.cfg), "hf")
    fresh.eval()
    np.testing.assert_allclose(ernie_logits(fresh, ids), want, atol=1e-4, rtol=0)


def test_load_pretrained_state_names_the_mismatch(tmp_path, tok_model):
    ckpt, _, cfg = make_checkpoint(tmp_path, tok_model)
    assert set(load_pretrained_state(str(tmp_path), cfg.model)) == set(build_model(cfg.model).state_dict())
    cfg.model.moe.num_experts = 8
    with pytest.raises(UserError, match=r"model\.moe\.num_experts: run config has 8, .* have 4"):
        load_pretrained_state(str(ckpt), cfg.model)


def test_exported_tokenizer_matches_sentencepiece(tmp_path, tok_model):
    import sentencepiece as spm
    import transformers

    from ernie5.data.corpus import pydoc_documents

    ckpt, _, _ = make_checkpoint(tmp_path, tok_model)
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    tok = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = spm.SentencePieceProcessor(model_file=str(tok_model))
    texts = ["hello world", "  two  spaces\nand\ttabs ", "ü€ 😀 bytes", "人民日报，今天。", ""] + pydoc_documents()[20:40]
    for text in texts:
        assert tok.encode(text) == sp.encode(text), text[:40]
        assert tok.decode(sp.encode(text)) == sp.decode(sp.encode(text)), text[:40]
    assert tok.eos_token_id == sp.eos_id() and tok.pad_token_id == sp.pad_id()


def test_refuses_what_the_format_cannot_hold(tmp_path, tok_model):
    _, model, cfg = make_checkpoint(tmp_path, tok_model)
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    state["vision_head.weight"] = np.zeros((4, 4), np.float32)
    with pytest.raises(UserError, match="no place for"):
        to_hf_tensors(state, cfg.model, "ckpt")


def test_import_refuses_inconsistent_or_foreign_dirs(tmp_path, tok_model):
    ckpt, _, _ = make_checkpoint(tmp_path, tok_model)
    out = export_hf(str(ckpt), str(tmp_path / "hf"))
    good = json.loads((out / "config.json").read_text())
    bad = {"intermediate_size": (50, r"mlp\.gate_proj\.weight has shape \[48, 32\], config.json implies \[50, 32\]"),
           "model_type": ("llama", "model_type 'llama'"),
           "moe_num_experts": ([4, 4], "modality-isolated"),
           "use_bias": (True, "use_bias")}
    for key, (value, message) in bad.items():
        (out / "config.json").write_text(json.dumps({**good, key: value}))
        with pytest.raises(UserError, match=message):
            import_hf(str(out), str(tmp_path / f"ckpt_{key}"))
        assert not (tmp_path / f"ckpt_{key}").exists()
