"""Build a second real text-classification data set from Debian's ``fortunes``: a fortune's text -> its file.

Each fortune file of the package (``/usr/share/games/fortunes/<category>``, entries separated by a
line holding ``%``) is one class. Only the categories named in ``CATEGORIES`` are used (themes a
reader can tell apart; the grab-bag files ``cookie``, ``fortunes``, ``miscellaneous`` are left out),
fortunes longer than ``--max-chars`` are dropped (mostly ASCII art and long poems), whitespace is
collapsed, and an exact duplicate text is kept once (in its first file). Writes JSONL rows
``{"text", "label"}``, the format ``--data`` reads.

    apt-get install fortunes
    python scripts/build_fortunes.py --out runs/data/fortunes.jsonl

The output is not shipped with the package: it is built where it is used (the benchmark calls
:func:`build` when the file is missing).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

SOURCE = Path("/usr/share/games/fortunes")
CATEGORIES = ("computers", "definitions", "education", "food", "law", "linux", "literature", "love", "men-women",
              "people", "politics", "science", "songs-poems", "sports", "startrek", "work")
DEFAULT_OUT = Path("runs/data/fortunes.jsonl")


def read_fortunes(path: Path) -> list[str]:
    """The entries of one fortune file, each with its whitespace collapsed."""
    text = path.read_text(encoding="utf-8", errors="replace")
    entries = re.split(r"^%\s*$", text, flags=re.MULTILINE)
    return [" ".join(e.split()) for e in entries if e.strip()]


def build(out: Path = DEFAULT_OUT, source: Path = SOURCE, max_chars: int = 300) -> dict[str, int]:
    """Write the data set to ``out``; returns the examples per category."""
    missing = [c for c in CATEGORIES if not (source / c).is_file()]
    if missing:
        raise SystemExit(f"{source}: no fortune file(s) {missing}; install them with: apt-get install fortunes")
    seen: set[str] = set()
    counts: dict[str, int] = {}
    rows = []
    for cat in CATEGORIES:
        for text in read_fortunes(source / cat):
            if len(text) > max_chars or text in seen:
                continue
            seen.add(text)
            rows.append({"text": text, "label": cat})
            counts[cat] = counts.get(cat, 0) + 1
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(out)
    return counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--max-chars", type=int, default=300)
    args = ap.parse_args()
    counts = build(args.out, args.source, args.max_chars)
    print(f"{sum(counts.values())} fortunes in {len(counts)} categories -> {args.out}")
    for cat, n in sorted(counts.items(), key=lambda kv: -kv[1]):
        print(f"  {cat:12s} {n}")


if __name__ == "__main__":
    main()
