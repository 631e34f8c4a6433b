#!/usr/bin/env python3
"""Check that `ernie5 export-hf` output loads in PaddleFormers' `Ernie4_5_MoeForCausalLM` (CPU) with ernie5's
logits, that PaddleFormers reads the MTP depth from config.json and loads the MTP weights.

    .venv/bin/python scripts/check_paddleformers.py [--venv DIR] [--keep DIR]

PaddleFormers is not a test dependency: paddleformers 1.2.0 requires transformers>=5.0,<5.4 (the test extra pins
5.23) and with its dependencies pulls ~58 packages (datasets, modelscope, librosa, numba, visualdl, ...) and
downgrades numpy, huggingface_hub and tokenizers. So this script runs in a side venv (default
~/.cache/ernie5/paddleformers-venv) layered over the repo's .venv with a .pth file: paddlepaddle 3.3.1 and the rest
come from .venv and are never reinstalled; only PaddleFormers and the few packages importing its ERNIE 4.5 MoE
model needs are installed there, with --no-deps (PF_PACKAGES). Built on first use, then reused.

PaddleFormers' MoE layer dispatches tokens with GPU-only kernels, so its forward is replaced by `cpu_moe_forward`
below, an independent implementation of the same routing on the layer's own loaded parameters. RMSNorm's fused
kernel is GPU-only too; PaddleFormers' config switch `fuse_rms_norm=False` selects its plain implementation.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_VENV = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ernie5" / "paddleformers-venv"
# paddleformers and exactly what importing its ERNIE 4.5 MoE model needs beyond the repo's .venv (transformers,
# huggingface_hub and tokenizers at the versions paddleformers 1.2.0 accepts, shadowing .venv's newer ones)
PF_PACKAGES = ["paddleformers==1.2.0", "transformers==5.3.0", "huggingface_hub==1.33.0", "tokenizers==0.22.2",
               "colorlog==6.12.0", "aistudio-sdk==0.3.9", "psutil==7.2.2", "ml_dtypes==0.7.0", "six==1.17.0",
               "requests==2.34.2", "urllib3==2.8.0", "charset-normalizer==3.5.3", "omegaconf==2.4.0"]
CHILD = "ERNIE5_PADDLEFORMERS_VENV"
# fp32 on both sides with the same GEMM shapes; only the summation order differs (PaddleFormers fuses q/k/v into
# one GEMM, uses its eager attention and its own RMSNorm), which moves fp32 results by a few ulp per op. Over a
# 3-4 layer model that stays ~1e-6 of the logit scale; 1e-5 leaves margin while a mapping error (a transposed or
# swapped weight, a wrong expert, an ignored correction bias) moves logits by >1e-2.
REL_TOL = 1e-5


def ensure_venv(venv: Path) -> Path:
    """The side venv's python, creating the venv and installing PF_PACKAGES unless already done."""
    import site
    import venv as venv_mod

    python = venv / "bin" / "python"
    stamp = venv / ".ernie5-packages"
    if stamp.is_file() and stamp.read_text() == "\n".join(PF_PACKAGES) and python.exists():
        return python
    start = time.time()
    print(f"== building {venv} over {sys.prefix} (one-off)", flush=True)
    venv_mod.create(venv, with_pip=True, clear=True)
    ours = subprocess.run([str(python), "-c", "import site; print(site.getsitepackages()[0])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # the repo venv's packages after the side venv's own: paddle comes from there, never from pip here
    Path(ours, "zz_ernie5_base_venv.pth").write_text(site.getsitepackages()[0] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                    *PF_PACKAGES], check=True)
    stamp.write_text("\n".join(PF_PACKAGES))
    size = sum(f.stat().st_size for f in Path(ours).rglob("*") if f.is_file())
    print(f"== installed {len(PF_PACKAGES)} packages in {time.time() - start:.0f} s, {size / 2**20:.0f} MiB",
          flush=True)
    return python


# --- the CPU stand-in for PaddleFormers' MoE layer ------------------------------------------------------------

def cpu_moe_forward(self, input, token_type_ids=None, use_dense_expert=False):
    """Replaces `Ernie4_5_MoeSparseMoeBlock.forward` (same inputs, same 4-tuple out) on CPU.

    Per token: router logits in fp32 from the layer's gate weight ([H, E]), softmax probabilities, experts chosen
    by top-k of probabilities + e_score_correction_bias, combined with the chosen experts' probabilities (the bias
    only selects) renormalised by max(sum, moe_norm_min), plus the shared experts' output, ungated. No token is
    dropped: the check fails if PaddleFormers' expert capacity would have dropped one.
    """
    import paddle
    import paddle.nn.functional as F

    if self.config.scoring_func != "softmax" or self.multimodal_experts or token_type_ids is not None:
        raise NotImplementedError("stand-in covers the text MoE with softmax gating only")
    shape = input.shape
    x = input.reshape([-1, shape[-1]])
    logits = paddle.matmul(x.astype("float32"), self.gate.weight.astype("float32"))  # [tokens, E]
    probs = F.softmax(logits, axis=-1)
    scores = probs + self.moe_statics.e_score_correction_bias[0] if self.use_correction_bias else probs
    chosen = paddle.topk(scores, k=self.top_k, axis=-1)[1]  # [tokens, k]
    weights = paddle.take_along_axis(probs, chosen, axis=-1)
    if self.gate.norm_gate_logits:
        weights = weights / paddle.clip(weights.sum(-1, keepdim=True), min=self.norm_min)
    capacity = self.gate.get_capacity(x.shape[0])
    out = paddle.zeros_like(x)
    for e, expert in enumerate(self.experts):
        hits = paddle.nonzero(chosen == e)  # [(token, slot)]
        if hits.shape[0] == 0:
            continue
        if hits.shape[0] > capacity:
            raise AssertionError(f"expert {e} gets {hits.shape[0]} tokens, PaddleFormers' capacity is {capacity}")
        token, slot = hits[:, 0], hits[:, 1]
        out = paddle.index_add(out, token, 0, expert(x[token]) * weights[token, slot].unsqueeze(-1).astype(x.dtype))
    if self.shared_experts is not None:
        out = out + self.shared_experts(x)
    return out.reshape(shape), weights, paddle.zeros([1], "float32"), logits


# --- the check -------------------------------------------------------------------------------------------------

# the tests' tiny export (tests/export/tiny.py: tied head, shared expert, dense layer 0, top-2 of 4, GQA) with MTP,
# and a second shape: untied head, no shared expert, top-1, one kv head, MoE every second layer, no MTP.
# Not covered, as PaddleFormers cannot load it: MTP block k where layer k is a MoE layer (depth >= 2 with MoE from
# layer 1, or MoE from layer 0): PaddleFormers builds that block as MoE, ours are dense (export_hf warns).
CASES = {"tiny_tied_mtp1": ["model.mtp.depth=1"],
         "untied_top1_mqa_interval2_mtp0": ["model.moe.num_shared_experts=0", "model.moe.top_k=1",
                                            "model.num_kv_heads=1", "model.moe.layer_start=0",
                                            "model.moe.layer_interval=2", "model.num_layers=4",
                                            "model.tie_embeddings=false"]}


def _tokenizer(root: Path) -> Path:
    """The export tests' 400-piece sentencepiece model (tests/export/conftest.py)."""
    from ernie5.runconfig import load_config
    from ernie5.data.corpus import pydoc_documents
    from ernie5.modality.text_tokenizer import train_text_tokenizer

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(pydoc_documents()[:20] + ["人民日报一九九八年新年献词。"] * 3) + "\n", encoding="utf-8")
    cfg = load_config(None, [f"tokenizer.model_path={root / 'tok.model'}", f"tokenizer.corpus=[{corpus}]",
                             "tokenizer.vocab_size=400", "tokenizer.input_sentence_size=0"])
    return train_text_tokenizer(cfg.tokenizer)


def _mtp_pairs(depth: int) -> dict[str, str]:
    """PaddleFormers parameter name -> ernie5 name, for the MTP weights (both in Paddle's [in, out] layout)."""
    pairs = {}
    for k in range(depth):
        pairs.update({f"model.mtp_linear_proj.{k}.weight": f"mtp.{k}.proj.weight",
                      f"model.mtp_emb_norm.{k}.weight": f"mtp.{k}.emb_norm.weight",
                      f"model.mtp_hidden_norm.{k}.weight": f"mtp.{k}.hidden_norm.weight",
                      f"model.mtp_block.{k}.mlp.up_gate_proj.weight": f"mtp.{k}.block.mlp.gate_up.weight",
                      f"model.mtp_block.{k}.mlp.down_proj.weight": f"mtp.{k}.block.mlp.down.weight",
                      f"model.mtp_block.{k}.self_attn.o_proj.weight": f"mtp.{k}.block.attn.o_proj.weight"})
    return pairs


def check_case(name: str, extra: list[str], tok: Path, root: Path) -> dict:
    import numpy as np
    import paddle

    from ernie5.env import strided_kernels
    from ernie5.export import export_hf
    from paddleformers.transformers import AutoConfig
    from paddleformers.transformers.ernie4_5_moe.modeling import Ernie4_5_MoeForCausalLM
    from tests.export.tiny import ernie_logits, make_checkpoint, token_ids

    ckpt, model, cfg = make_checkpoint(root / name, tok, *extra, seed=len(name))
    out = export_hf(str(ckpt), str(root / name / "hf"))
    written = json.loads((out / "config.json").read_text())
    pf_cfg = AutoConfig.from_pretrained(str(out))
    depth = cfg.model.mtp.depth
    assert pf_cfg.num_nextn_predict_layers == depth, (pf_cfg.num_nextn_predict_layers, depth)
    assert str(pf_cfg.dtype).endswith("float32"), pf_cfg.dtype
    pf_cfg.fuse_rms_norm = False  # its fused RMSNorm kernel is GPU-only
    with strided_kernels():  # safetensors' paddle reader needs the view kernels ernie5 turns off
        pf = Ernie4_5_MoeForCausalLM.from_pretrained(str(out), config=pf_cfg, dtype="float32")
    pf.eval()
    theirs_params = dict(pf.named_parameters())
    ours_state = {k: v.numpy() for k, v in model.state_dict().items()}
    mtp = _mtp_pairs(depth)
    for theirs, ours in mtp.items():
        np.testing.assert_array_equal(theirs_params[theirs].numpy(), ours_state[ours], err_msg=theirs)
    n_mtp_params = sum(1 for n in theirs_params if n.startswith("model.mtp_"))

    ids = token_ids(2, 11)
    ours = ernie_logits(model, ids)
    with paddle.no_grad():
        theirs = pf(paddle.to_tensor(ids)).logits.numpy()
    diff = float(np.abs(theirs - ours).max())
    scale = float(np.abs(ours).max())
    # the correction bias must matter for the match to check how PaddleFormers' routing applies it
    for layer in pf.model.layers:
        statics = getattr(layer.mlp, "moe_statics", None)
        if statics is not None:
            statics.e_score_correction_bias.set_value(paddle.zeros_like(statics.e_score_correction_bias))
    with paddle.no_grad():
        bias_effect = float(np.abs(pf(paddle.to_tensor(ids)).logits.numpy() - theirs).max())
    ok = diff <= REL_TOL * scale and bias_effect > 1e-3
    return {"case": name, "num_nextn_predict_layers": written["num_nextn_predict_layers"],
            "torch_dtype": written["torch_dtype"], "pf_mtp_layers": pf_cfg.num_nextn_predict_layers,
            "pf_mtp_params": n_mtp_params, "mtp_weights_equal": len(mtp), "max_abs_diff": diff,
            "rel_diff": diff / scale, "logit_scale": scale, "bias_effect": bias_effect, "ok": ok}


def run_checks(keep: str | None) -> int:
    sys.path.insert(0, str(ROOT))
    from ernie5.env import setup

    setup()  # thread settings before paddle loads
    import paddleformers
    from paddleformers.transformers.ernie4_5_moe.modeling import Ernie4_5_MoeSparseMoeBlock
    from paddleformers.utils.log import logger

    logger.set_level("WARNING")

    Ernie4_5_MoeSparseMoeBlock.forward = cpu_moe_forward
    import paddle

    print(f"== paddleformers {paddleformers.__version__}, paddle {paddle.__version__} ({paddle.__file__})")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="ernie5_pf_"))
    root.mkdir(parents=True, exist_ok=True)
    tok = _tokenizer(root)
    results = [check_case(name, extra, tok, root) for name, extra in CASES.items()]
    for r in results:
        print(json.dumps(r))
    bad = [r["case"] for r in results if not r["ok"]]
    print("== FAILED: " + ", ".join(bad) if bad else
          f"== OK: {len(results)} exports load in PaddleFormers with ernie5's logits (max rel diff "
          f"{max(r['rel_diff'] for r in results):.1e} <= {REL_TOL:.0e})")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"side venv (default {DEFAULT_VENV})")
    ap.add_argument("--keep", help="write the checkpoints and exports here (default: a temp dir)")
    args = ap.parse_args(argv)
    if os.environ.get(CHILD) != "1":
        python = ensure_venv(args.venv)
        env = {**os.environ, CHILD: "1", "PYTHONPATH": str(ROOT)}
        return subprocess.run([str(python), __file__, *(argv if argv is not None else sys.argv[1:])],
                              env=env).returncode
    return run_checks(args.keep)


if __name__ == "__main__":
    sys.exit(main())
