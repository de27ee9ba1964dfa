"""A normal install works: the sdist and wheel carry every shipped config and recipe, and an installed
wheel runs `slm teacher`, `slm cp` and a whole pipeline from a folder outside the checkout.

The wheel goes into a fresh venv that reaches this environment's dependencies (torch, DeepSpeed, ...)
through a .pth line, so nothing is downloaded or reinstalled. A .pth line adds a folder to sys.path
without reading the .pth files inside it, so the checkout's editable-install hook never loads there:
the only slm_cli that venv can import is the wheel's.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import yaml

import slm_cli
from slm_cli.engine.launcher import RENDEZVOUS_VARS
from slm_cli.engine.ops import private_extensions_dir
from tests.stages.helpers import meta

CHECKOUT = Path(slm_cli.__file__).resolve().parent.parent


def _build(tmp_path: Path) -> tuple[Path, Path, Path, Path]:
    """From a copy of the checkout (setuptools writes build/ and *.egg-info where it builds): a wheel built
    in the tree, as `pip install .` does, and an sdist, then a wheel from the unpacked sdist, as
    `python -m build` does. Returns (source copy, in-tree wheel, sdist, wheel from the sdist)."""
    src = tmp_path / "src"
    src.mkdir()
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(CHECKOUT / name, src / name)
    for name in ("slm_cli", "configs", "recipes"):  # slm_cli/configs and slm_cli/recipes stay symlinks
        shutil.copytree(CHECKOUT / name, src / name, symlinks=True, ignore=skip)
    backend = "import sys; from setuptools import build_meta as b; print(getattr(b, sys.argv[1])(sys.argv[2]))"
    in_tree, dist = tmp_path / "in-tree", tmp_path / "dist"
    subprocess.run([sys.executable, "-c", backend, "build_wheel", str(in_tree)], cwd=src, check=True, capture_output=True)
    subprocess.run([sys.executable, "-c", backend, "build_sdist", str(dist)], cwd=src, check=True, capture_output=True)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tar:  # the "data" filter where this Python has it (3.10.12+, 3.11.4+)
        tar.extractall(tmp_path / "unpacked", **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    (unpacked,) = (tmp_path / "unpacked").iterdir()
    subprocess.run([sys.executable, "-c", backend, "build_wheel", str(dist)], cwd=unpacked, check=True, capture_output=True)
    return src, next(in_tree.glob("*.whl")), sdist, next(dist.glob("*.whl"))


def _shipped_yaml(src: Path) -> set[str]:
    return {p.relative_to(src).as_posix() for folder in ("configs", "recipes") for p in (src / folder).rglob("*.yaml")}


def _venv_with(wheel: Path, where: Path) -> Path:
    """A fresh venv holding only the wheel, with this environment's packages reachable through a .pth line."""
    venv = where / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          check=True, capture_output=True, text=True).stdout.strip()
    Path(site, "_slm_test_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, capture_output=True)
    return venv


def _env() -> dict[str, str]:
    drop = {"PYTHONPATH", "SLM_CONFIG_DIR", "SLM_RECIPE_DIR", *RENDEZVOUS_VARS}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    # DeepSpeed's CPU ops as this environment built them (a new venv would otherwise rebuild them, ~2 min)
    env["TORCH_EXTENSIONS_DIR"] = str(private_extensions_dir())
    return env


def _run(venv: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([venv / "bin" / "slm", *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"slm {' '.join(args)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


TINY_DATA = ["data.train_size=64", "data.val_size=16", "data.test_size=8", "train.micro_batch_size=8",
             "train.eval_every=0", "train.eval_batches=1", "train.warmup_steps=1"]


def test_installed_wheel_ships_every_config_and_runs_outside_the_checkout(tmp_path):
    src, in_tree_wheel, sdist, wheel = _build(tmp_path)
    shipped = _shipped_yaml(src)
    assert "configs/teacher.yaml" in shipped and "recipes/quickstart.yaml" in shipped
    with tarfile.open(sdist) as tar:
        in_sdist = {n.split("/", 1)[1].removeprefix("slm_cli/") for n in tar.getnames() if n.endswith(".yaml") and "/slm_cli/" in n}
    assert in_sdist == shipped
    for built in (in_tree_wheel, wheel):
        with zipfile.ZipFile(built) as whl:
            assert {n.removeprefix("slm_cli/") for n in whl.namelist() if n.endswith(".yaml")} == shipped

    venv = _venv_with(wheel, tmp_path)
    work = tmp_path / "work"  # a folder outside the checkout, as a user's project
    work.mkdir()
    probe = ("import os, sys, slm_cli.paths as p; print(p.__file__); print(p.CONFIG_DIR); print(p.RECIPE_DIR)\n"
             "print(*[e for e in sys.path if os.path.isdir(os.path.join(e or '.', 'slm_cli'))], sep='\\n')\n"
             "print('finder' if any('editable' in repr(f) for f in sys.meta_path) else 'no finder')")
    *where, finder = subprocess.run([venv / "bin" / "python", "-c", probe], cwd=work, env=_env(), check=True,
                                    capture_output=True, text=True).stdout.strip().split("\n")
    # the wheel's package, configs and recipes; the only folder on sys.path holding an slm_cli is the venv's
    assert len(where) == 4 and all(Path(w).is_relative_to(venv) for w in where), where
    assert finder == "no finder"  # the checkout's editable-install hook is not loaded

    _run(venv, ["teacher", "model=tiny-llama", "data=arithmetic", *TINY_DATA, "train.max_steps=2", "output_dir=teacher"], work)
    assert meta(work / "teacher")["stage"] == "teacher"
    assert (work / "teacher" / "model.safetensors").is_file()

    # the shipped quickstart, copied and edited down to a few steps per stage, as a user would
    _run(venv, ["cp", "quickstart", "quick.yaml"], work)
    recipe = yaml.safe_load((work / "quick.yaml").read_text())
    assert recipe["output_root"] == "runs/quick"
    for stage in recipe["stages"]:
        steps = [o for o in stage["overrides"] if not o.startswith(("train.max_steps=", "train.micro_batch_size="))]
        if stage["stage"] in ("teacher", "student", "distill"):
            steps += [*TINY_DATA, "train.max_steps=2"]
        stage["overrides"] = steps
    (work / "quick.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    _run(venv, ["run", "--config", "quick.yaml", "report=false"], work)
    stages = {s["name"]: s["stage"] for s in recipe["stages"]}
    assert len(stages) == 7
    for name, stage in stages.items():
        assert meta(work / "runs" / "quick" / name)["stage"] == stage
