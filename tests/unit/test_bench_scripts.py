"""Every bench/ script at least compiles: the benchmarks are not run by the suite, and a bulk rename once
left bench/quantize.py with a syntax error (`def run_scheme(model.name_or_path: str, ...)`) that nothing caught."""

import warnings
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.mark.parametrize("script", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_script_compiles(script):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a SyntaxWarning too: bench/headline.py once called a string (a missing +)
        compile(script.read_text(), str(script), "exec")
