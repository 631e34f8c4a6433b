"""Data preparation and blending benchmark (issue 20): streaming `ernie5 data prepare` on a >= 2 GB corpus.

    python benchmarks/data_prepare.py --out /tmp/e5data            # needs `ernie5 data fetch` + the demo tokenizer
    python benchmarks/data_prepare.py --out /tmp/e5data --gb 0.2   # a quick pass

Measures, in one session:
1. the tokenizer's raw encode speed: sentencepiece's batched encode (one thread) of the demo documents in one
   process: the limit a preparation worker can reach;
2. `ernie5 data prepare --workers 1` and `--workers 2` on the corpus (half JSONL files, half Parquet files, the
   demo documents repeated in shuffled order): wall time, tokens/s, tokens/s per worker against (1), the peak RSS
   of the whole process tree (sampled from /proc every 50 ms), and whether the two outputs are identical;
3. the same preparation on a 10x smaller corpus with 2 workers: peak RSS should not grow with the corpus;
4. training steps of the tiny text model fed by 3 blended sources against 1 source (`ernie5 bench`, alternating
   pairs, median step time and the data-loading phase).
Prints a JSON object and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEMO_FILES = [REPO / "data/raw/peoples_daily_1998.txt", REPO / "data/raw/pydoc_topics.txt"]
TOKENIZER = REPO / "tokenizers/demo_text.model"


def demo_documents() -> list[str]:
    docs = []
    for f in DEMO_FILES:
        if not f.is_file():
            sys.exit(f"{f}: missing (run `ernie5 data fetch --out data/raw` and "
                     "`ernie5 tokenizer train configs/tiny_text.yaml` first)")
        docs += [line for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    return docs


def make_corpus(root: Path, gigabytes: float, seed: int = 0) -> dict:
    """Half JSONL (files of up to 256 MB), half Parquet (files of up to 256 MB, row groups of ~32 MB): the demo documents
    repeated, each repetition in a fresh shuffled order. Sizes count document text (UTF-8 bytes)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file_bytes = 256_000_000  # the same file (so unit) sizes at every corpus size: peak memory comparable
    done = root / "corpus.json"
    if done.is_file() and json.loads(done.read_text()).get("file_bytes") == file_bytes \
            and json.loads(done.read_text())["gigabytes"] == gigabytes:
        return json.loads(done.read_text())
    root.mkdir(parents=True, exist_ok=True)
    docs = demo_documents()
    sizes = np.array([len(d.encode("utf-8")) for d in docs])
    rng = np.random.default_rng(seed)
    target = int(gigabytes * 1e9)
    written = {"jsonl": 0, "parquet": 0}
    files = []

    def stream():
        while True:
            for i in rng.permutation(len(docs)):
                yield i

    it = stream()
    for kind in ("jsonl", "parquet"):
        k = 0
        while written[kind] < target // 2:
            path = root / f"{'web' if kind == 'jsonl' else 'books'}-{k:04d}.{kind}"
            batch, nbytes = [], 0
            while nbytes < file_bytes and written[kind] + nbytes < target // 2:
                i = next(it)
                batch.append(docs[i])
                nbytes += int(sizes[i])
            if kind == "jsonl":
                with open(path, "w", encoding="utf-8") as f:
                    for d in batch:
                        f.write(json.dumps({"id": len(files), "text": d}, ensure_ascii=False) + "\n")
            else:
                rows = max(1, int(len(batch) * 32_000_000 / max(nbytes, 1)))
                pq.write_table(pa.table({"content": batch}), path, row_group_size=rows)
            written[kind] += nbytes
            files.append(path.name)
            k += 1
    info = {"gigabytes": gigabytes, "file_bytes": file_bytes, "text_bytes": written, "files": files,
            "disk_bytes": sum((root / f).stat().st_size for f in files)}
    done.write_text(json.dumps(info))
    return info


def raw_encode_speed(limit_bytes: int = 60_000_000) -> dict:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(TOKENIZER))
    docs = demo_documents()
    rng = np.random.default_rng(1)
    sample, n = [], 0
    while n < limit_bytes:
        for i in rng.permutation(len(docs)):
            sample.append(docs[i])
            n += len(docs[i].encode("utf-8"))
    t0 = time.perf_counter()
    tokens = sum(len(ids) for ids in sp.encode(sample, num_threads=1))
    dt = time.perf_counter() - t0
    return {"bytes": n, "tokens": tokens, "seconds": dt, "tokens_per_s": tokens / dt, "mb_per_s": n / dt / 1e6}


class TreeRSS:
    """Peak summed RSS of a process and all its descendants, sampled from /proc."""

    def __init__(self, pid: int, every_s: float = 0.05):
        self.pid, self.every, self.peak = pid, every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _tree(self) -> list[int]:
        children: dict[int, list[int]] = {}
        for p in os.listdir("/proc"):
            if not p.isdigit():
                continue
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(p))
        out, todo = [], [self.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo += children.get(p, [])
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for p in self._tree():
                try:
                    with open(f"/proc/{p}/status") as f:
                        for line in f:
                            if line.startswith("VmRSS:"):
                                total += int(line.split()[1]) * 1024
                except OSError:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(self.every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def prepare_config(path: Path, corpus: Path, shards: Path, sources: list[tuple[str, str, str, float]]) -> Path:
    import yaml

    cfg = {"kind": "run", "tokenizer": {"model_path": str(TOKENIZER)},
           "data": {"dir": str(shards), "seq_len": 128, "val_fraction": 0.001,
                    "sources": [{"name": n, "paths": [str(corpus / g)], "field": fld, "weight": w}
                                for n, g, fld, w in sources]}}
    path.write_text(yaml.safe_dump(cfg))
    return path


def source_tokens(shards: Path) -> int:
    from ernie5.data.shards import read_meta

    total = 0
    for d in sorted(p for p in shards.iterdir() if p.is_dir()):
        meta = read_meta(str(d))
        total += sum(int(s["tokens"]) for s in meta["splits"].values())
    return total


def tree_digest(shards: Path) -> str:
    """sha256 over every prepared file (names and bytes), in name order: equal digests = identical outputs."""
    import hashlib

    h = hashlib.sha256()
    for f in sorted(p for p in shards.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(shards)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(1 << 22):
                h.update(block)
    return h.hexdigest()


def run_prepare(config: Path, shards: Path, workers: int) -> dict:
    import shutil

    shutil.rmtree(shards, ignore_errors=True)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "ernie5", "data", "prepare", str(config), "--workers",
                             str(workers)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    rss = TreeRSS(proc.pid)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    peak = rss.stop()
    if proc.returncode != 0:
        sys.exit(f"prepare failed ({proc.returncode}): {err.strip()[-2000:]}")
    tokens = source_tokens(shards)
    return {"workers": workers, "seconds": wall, "tokens": tokens, "tokens_per_s": tokens / wall,
            "tokens_per_s_per_worker": tokens / wall / workers, "peak_rss_mb": peak / 2**20,
            "digest": tree_digest(shards)}


def bench_steps(configs: dict[str, Path], pairs: int) -> list[dict]:
    """`ernie5 bench` of each config, alternating, `pairs` times: median step and data-loading seconds."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = []
    for _ in range(pairs):
        for label, cfg in configs.items():
            r = subprocess.run([sys.executable, "-m", "ernie5", "bench", str(cfg), "--steps", "20",
                                "--breakdown-steps", "5", "--overhead-steps", "0", "--json"], cwd=REPO, env=env,
                               capture_output=True, text=True)
            if r.returncode != 0:
                sys.exit(f"bench failed: {r.stderr.strip()[-2000:]}")
            j = json.loads(r.stdout)
            out.append({"label": label, "step_s": j["step_s"], "data_s": j["breakdown_s"].get("data", 0.0)})
    return out


def blend_config(path: Path, shards: Path, sources: list[dict]) -> Path:
    """configs/tiny_text.yaml reading `sources` (prepared into `shards`)."""
    import yaml

    c = yaml.safe_load((REPO / "configs/tiny_text.yaml").read_text())
    c["tokenizer"]["model_path"] = str(TOKENIZER)
    c["data"].update(dir=str(shards), sources=sources)
    path.write_text(yaml.safe_dump(c))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/e5data")
    ap.add_argument("--gb", type=float, default=2.0, help="corpus size in GB of document text")
    ap.add_argument("--pairs", type=int, default=2, help="alternating bench pairs for the blending comparison")
    args = ap.parse_args()
    out = Path(args.out)
    raw_runs = [raw_encode_speed()]  # measured again between and after the preparations: the host drifts
    print("raw encode:", json.dumps(raw_runs[-1]), file=sys.stderr)
    result = {}
    sources = [("web", "web-*.jsonl", "text", 0.5), ("books", "books-*.parquet", "content", 0.5)]
    for tag, gb in (("big", args.gb), ("small", args.gb / 10)):
        corpus = out / f"corpus_{tag}"
        result[f"corpus_{tag}"] = make_corpus(corpus, gb)
        cfg = prepare_config(out / f"{tag}.yaml", corpus, out / f"shards_{tag}", sources)
        for workers in ((1, 2) if tag == "big" else (2,)):
            r = run_prepare(cfg, out / f"shards_{tag}", workers)
            result[f"prepare_{tag}_w{workers}"] = r
            print(f"prepare {tag} workers {workers}:", json.dumps(r), file=sys.stderr)
            if tag == "big":
                raw_runs.append(raw_encode_speed())
                print("raw encode:", json.dumps(raw_runs[-1]), file=sys.stderr)
    result["raw_encode_runs"] = raw_runs
    result["raw_encode"] = sorted(raw_runs, key=lambda r: r["tokens_per_s"])[1]  # the median of three
    big1, big2 = result["prepare_big_w1"], result["prepare_big_w2"]
    result["identical_w1_w2"] = big1["digest"] == big2["digest"]
    raw = result["raw_encode"]["tokens_per_s"]
    result["per_worker_vs_raw"] = {w: result[f"prepare_big_w{w}"]["tokens_per_s_per_worker"] / raw for w in (1, 2)}
    result["rss_small_over_big"] = result["prepare_small_w2"]["peak_rss_mb"] / big2["peak_rss_mb"]
    # blending: the small corpus's JSONL and Parquet sources + the demo text files, against the JSONL one alone
    small, shards = out / "corpus_small", out / "shards_blend"
    web = {"name": "web", "paths": [str(small / "web-*.jsonl")], "weight": 0.5}
    books = {"name": "books", "paths": [str(small / "books-*.parquet")], "field": "content", "weight": 0.3}
    demo = {"name": "demo", "paths": [str(f) for f in DEMO_FILES], "weight": 0.2}
    configs = {"one source": blend_config(out / "blend1.yaml", shards, [web]),
               "three sources": blend_config(out / "blend3.yaml", shards, [web, books, demo])}
    subprocess.run([sys.executable, "-m", "ernie5", "data", "prepare", str(configs["three sources"]), "--workers",
                    "2"], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), check=True, capture_output=True)
    steps = bench_steps(configs, args.pairs)
    result["blend_steps"] = steps
    labels = list(configs)
    med = {k: float(np.median([s["step_s"] for s in steps if s["label"] == k])) for k in labels}
    data = {k: float(np.median([s["data_s"] for s in steps if s["label"] == k])) for k in labels}
    result["blend_median_step_s"], result["blend_median_data_s"] = med, data
    print(json.dumps(result, indent=1))
    raw_list = ", ".join(f"{r['tokens_per_s'] / 1e6:.2f}" for r in raw_runs)
    print(f"\n| measurement | value |\n|---|---|\n"
          f"| raw encode (1 process, 1 thread; median of 3: before, between, after) | {raw / 1e6:.2f} M tokens/s "
          f"({result['raw_encode']['mb_per_s']:.1f} MB/s; runs {raw_list}) |\n"
          f"| prepare {args.gb:g} GB, 1 worker | {big1['tokens_per_s'] / 1e6:.2f} M tokens/s, {big1['seconds']:.0f} s, "
          f"{result['per_worker_vs_raw'][1]:.0%} of raw, peak RSS {big1['peak_rss_mb']:.0f} MB |\n"
          f"| prepare {args.gb:g} GB, 2 workers | {big2['tokens_per_s'] / 1e6:.2f} M tokens/s, {big2['seconds']:.0f} s, "
          f"{result['per_worker_vs_raw'][2]:.0%} of raw per worker, peak RSS {big2['peak_rss_mb']:.0f} MB |\n"
          f"| outputs of 1 and 2 workers identical | {result['identical_w1_w2']} |\n"
          f"| prepare {args.gb / 10:g} GB, 2 workers | peak RSS {result['prepare_small_w2']['peak_rss_mb']:.0f} MB "
          f"({result['rss_small_over_big']:.2f}x the big corpus's) |\n"
          f"| tiny text step, 1 source / 3 blended | {med['one source']:.4f} / {med['three sources']:.4f} s "
          f"(data {data['one source'] * 1e3:.2f} / {data['three sources'] * 1e3:.2f} ms) |")


if __name__ == "__main__":
    main()
