"""Held-out in-domain text for the SmolLM2 benches: Python's own documentation, split by file.

    apt-get install python3.11-doc     # Debian's package: ~11 MB of reST prose, never seen by slm's tests
    .venv/bin/python bench/pydocs.py --out runs/pydocs

writes `calib.txt` (about 3 in 4 documentation files) and `test.txt` (the rest). A file goes to one
side only, by the first hex digit of the sha256 of its path, so the split never changes and no
paragraph is on both sides: calibrate on `calib.txt`, measure on `test.txt`, and the text the model
is scored on was never used to choose anything.
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

DOCS = Path("/usr/share/doc/python3.11/html/_sources")


def split_docs(docs: Path = DOCS) -> tuple[str, str]:
    """(calibration text, test text) from the .rst.txt sources under `docs`."""
    files = sorted(docs.rglob("*.rst.txt"))
    if not files:
        raise SystemExit(f"no .rst.txt files under {docs}: apt-get install python3.11-doc")
    calib, test = [], []
    for f in files:
        rel = f.relative_to(docs).as_posix()
        side = test if int(hashlib.sha256(rel.encode()).hexdigest()[0], 16) % 4 == 0 else calib
        side.append(f.read_text(encoding="utf-8", errors="replace"))
    return "\n\n".join(calib), "\n\n".join(test)


def write_split(out: str | Path) -> tuple[Path, Path]:
    """Write calib.txt and test.txt into `out` (once; an existing pair is reused) and return their paths."""
    out = Path(out)
    c, t = out / "calib.txt", out / "test.txt"
    if not (c.is_file() and t.is_file()):
        out.mkdir(parents=True, exist_ok=True)
        calib, test = split_docs()
        c.write_text(calib, encoding="utf-8")
        t.write_text(test, encoding="utf-8")
    return c, t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pydocs")
    args = ap.parse_args()
    for p in write_split(args.out):
        print(f"{p}  {p.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
