"""`slm cp NAME FILE`: write an editable copy of a shipped recipe or stage config (torchtune's `tune cp`).

NAME is a stage config (`teacher`, `distill`, ...: configs/<stage>.yaml), a stage preset
(`teacher/tiny-zero2-offload`) or a pipeline (`quickstart`, `distill/sft_then_on_policy`). The copy
runs as it is: `slm <stage> --config FILE` for a stage config or preset, `slm run --config FILE` for
a pipeline. Its defaults list still names the shipped groups (`model: tiny-llama`, `- /teacher`),
which stay on Hydra's search path. Standard library only, like the dispatcher.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import sys
from pathlib import Path

import yaml

from slm_cli.paths import CONFIG_DIR, RECIPE_DIR

USAGE = "usage: slm cp <recipe or stage config> <file.yaml> [--force]"


def shipped(stages: list[str]) -> dict[str, tuple[Path, str]]:
    """Every name `slm cp` copies -> (the shipped file, the command that runs a copy of it)."""
    from slm_cli.pipeline import is_pipeline

    out = {s: (CONFIG_DIR / f"{s}.yaml", f"slm {s}") for s in stages if (CONFIG_DIR / f"{s}.yaml").is_file()}
    for path in sorted(RECIPE_DIR.rglob("*.yaml")):
        name = path.relative_to(RECIPE_DIR).with_suffix("").as_posix()
        out[name] = (path, "slm run" if is_pipeline(path) else f"slm {path.parent.name}")
    return out


def main(args: list[str], stages: list[str]) -> int:
    force = "--force" in args
    words = [a for a in args if a != "--force"]
    available = shipped(stages)
    if words in ([], ["-h"], ["--help"]):
        print(USAGE)
        print("copies: " + ", ".join(available))
        return 0
    flags = [w for w in words if w.startswith("-")]
    if flags or len(words) != 2:
        return _error(f"{' '.join(flags) + ': unknown option; ' if flags else ''}{USAGE}")
    name, dest = words[0].removesuffix(".yaml"), Path(words[1]).expanduser()
    if name not in available:
        import difflib

        close = difflib.get_close_matches(name, list(available), n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        return _error(f"nothing shipped is called '{name}'.{hint} Copies: {', '.join(available)}.")
    source, command = available[name]
    if dest.is_dir():
        dest = dest / f"{Path(name).name}.yaml"
    if dest.suffix != ".yaml":
        return _error(f"{dest}: the copy's name must end in .yaml (Hydra reads .yaml files); e.g. slm cp {name} my-{Path(name).name}.yaml")
    if dest.exists() and not force:
        return _error(f"{dest} exists; slm cp will not overwrite it. Choose another file, or add --force to replace it.")
    if not dest.parent.is_dir():
        return _error(f"{dest.parent}: no such folder to write {dest.name} into")
    if dest.resolve() == source.resolve():
        return _error(f"{dest} is the shipped file itself; copy it somewhere else")
    text = source.read_text()
    if command == "slm run":
        # the shipped output_root would put the copy's artifacts over the shipped recipe's
        root = f"runs/{dest.stem}"
        if not _plain_yaml(root):  # a name YAML would read differently (a '#', ': '): quote it
            root = json.dumps(root)
        text = re.sub(r"(?m)^output_root:.*$", lambda _: f"output_root: {root}", text, count=1)
    shipped_as = f"configs/{source.name}" if source.parent == CONFIG_DIR else f"recipes/{name}.yaml"
    run = f"{command} --config {shlex.quote(str(dest))}"
    header = f"# Your copy of slm's {shipped_as} (slm cp {name}); edit it, then run it with\n#   {run} [key=value ...]\n"
    tmp = dest.with_name(f".{dest.name}.tmp")
    try:
        tmp.write_text(header + text)
        os.replace(tmp, dest)  # all or nothing: no half-written file under the final name
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        return _error(f"could not write {dest}: {exc.strerror or exc}")
    print(f"wrote {dest} (from {source}); run it with: {run}")
    return 0


def _plain_yaml(value: str) -> bool:
    try:
        return yaml.safe_load(f"x: {value}") == {"x": value}
    except yaml.YAMLError:
        return False


def _error(message: str) -> int:
    print(f"slm cp: {message}", file=sys.stderr)
    return 2
