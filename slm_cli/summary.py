"""`python -m slm_cli.summary FOLDER...`: one table of artifacts, their size and metrics."""

from __future__ import annotations

import sys
from pathlib import Path

from slm_cli.artifacts import read_metadata


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def artifact_rows(folders: list[str]) -> list[dict]:
    rows = []
    for f in folders:
        meta = read_metadata(f)
        m = meta.get("metrics", {})
        rows.append(
            {
                "artifact": f,
                "stage": meta["stage"],
                "params": m.get("params", ""),
                "MB": round(folder_bytes(Path(f)) / 2**20, 2),
                "train loss": m.get("train_loss", ""),
                "val loss": m.get("val_loss", ""),
                "tokens/s": round(m["tokens_per_s"]) if "tokens_per_s" in m else "",
                "parents": ", ".join(p["role"] for p in meta.get("parents", [])) or "-",
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    from slm_cli.ui import console, records_table

    folders = sys.argv[1:] if argv is None else argv
    rows = artifact_rows(folders)
    console.print(records_table("artifacts", rows, list(rows[0]) if rows else ["artifact"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
