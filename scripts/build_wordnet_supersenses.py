"""Build the built-in WordNet 3.0 noun-supersense data file from Debian's ``wordnet-base``.

Each noun synset becomes one row ``text`` (its gloss) -> ``label`` (its lexicographer
file, e.g. ``noun.animal``). The output is a gzip'd JSONL file shipped inside the package
together with WordNet's licence notice, so no apt step is needed at run time.

    apt-get install wordnet-base
    python scripts/build_wordnet_supersenses.py            # writes edge_runtime/data/...
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import re
import sys
from pathlib import Path

# WordNet's lexicographer files for nouns: file number -> name (lexnames(5WN)).
NOUN_LEXNAMES = {
    3: "noun.Tops", 4: "noun.act", 5: "noun.animal", 6: "noun.artifact", 7: "noun.attribute",
    8: "noun.body", 9: "noun.cognition", 10: "noun.communication", 11: "noun.event",
    12: "noun.feeling", 13: "noun.food", 14: "noun.group", 15: "noun.location",
    16: "noun.motive", 17: "noun.object", 18: "noun.person", 19: "noun.phenomenon",
    20: "noun.plant", 21: "noun.possession", 22: "noun.process", 23: "noun.quantity",
    24: "noun.relation", 25: "noun.shape", 26: "noun.state", 27: "noun.substance",
    28: "noun.time",
}
REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "edge_runtime" / "data" / "wordnet_noun_supersenses.jsonl.gz"


def parse_data_line(line: str, lineno: int) -> dict | None:
    """Parse one ``data.noun`` line; returns None for the licence header lines."""
    if line.startswith("  "):
        return None
    head, sep, gloss = line.partition(" | ")
    if not sep:
        raise ValueError(f"data.noun line {lineno}: no ' | ' gloss separator")
    fields = head.split()
    offset, lex_filenum, ss_type, w_cnt = fields[0], int(fields[1]), fields[2], int(fields[3], 16)
    if ss_type != "n" or lex_filenum not in NOUN_LEXNAMES:
        raise ValueError(f"data.noun line {lineno}: unexpected ss_type={ss_type!r} lex_filenum={lex_filenum}")
    lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(w_cnt)]
    lemmas = [re.sub(r"\([a-z]+\)$", "", w) for w in lemmas]  # drop adjective markers like (a)
    return {"id": offset, "text": gloss.strip(), "label": NOUN_LEXNAMES[lex_filenum], "lemmas": lemmas}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--wordnet", default="/usr/share/wordnet/data.noun", help="path to data.noun")
    ap.add_argument("--licence", default="/usr/share/doc/wordnet-base/copyright")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    rows = []
    with open(args.wordnet, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            row = parse_data_line(line.rstrip("\n"), lineno)
            if row is not None:
                rows.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    # mtime=0 keeps the gzip bytes reproducible from one build to the next.
    with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as gz:
        for row in rows:
            gz.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))
    os.replace(tmp, args.out)
    licence = Path(args.licence).read_text(encoding="utf-8")
    notice = licence.split("Files: debian/*")[0]
    (args.out.parent / "WORDNET_LICENSE.txt").write_text(
        "The file wordnet_noun_supersenses.jsonl.gz is derived from WordNet 3.0\n"
        "(Debian package wordnet-base, /usr/share/wordnet/data.noun).\n\n" + notice,
        encoding="utf-8",
    )
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    print(f"wrote {len(rows)} synsets in {len(counts)} classes to {args.out} "
          f"({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
