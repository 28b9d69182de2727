"""The MoE benchmark runs end to end (tiny shapes) and prints one row per (E, top-k) with its ratios."""

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_moe_overhead_benchmark_prints_every_row():
    run = subprocess.run([sys.executable, "benchmarks/moe_overhead.py", "--hidden", "16", "--intermediate", "32",
                          "--tokens", "64", "--repeats", "3", "--threads", "1"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "caching allocator" in run.stdout and "1 threads" in run.stdout
    rows = [line.split() for line in run.stdout.splitlines() if re.match(r"\s*[248]\s+[12]\s", line)]
    assert [(r[0], r[1]) for r in rows] == [(e, k) for e in "248" for k in "12"]
    for r in rows:  # three ratios per row, all positive
        ratios = [float(v.rstrip("x")) for v in r if v.endswith("x")]
        assert len(ratios) == 3 and all(v > 0 for v in ratios)
    assert re.search(r"targets .*: (PASS|FAIL)$", run.stdout.strip())
