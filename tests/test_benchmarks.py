"""benchmarks/scan.py end to end on the smallest shape: its JSON rows and the exp floor."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from emamba.ops import scan_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_scan_benchmark():
    spec = importlib.util.spec_from_file_location("bench_scan", os.path.join(ROOT, "benchmarks", "scan.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not scan_cpu.is_available()[0], reason="fused CPU scan kernel unavailable")
def test_scan_benchmark_rows_and_exp_floor(tmp_path, capsys):
    bench = load_scan_benchmark()
    out = tmp_path / "scan.json"
    assert bench.main(["--shapes", "ts", "--backends", "cpu", "reference", "--modes", "fwd", "--repeats", "1",
                       "--json", str(out)]) == 0
    rows = {r["backend"]: r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {"cpu", "reference"}
    batch, length, d, n = bench.SHAPES["ts"]
    for r in rows.values():
        assert r["exps_per_s"] > 0 and r["median_s"] > 0
        assert r["exp_floor_s"] == pytest.approx(batch * d * length * n / r["exps_per_s"])
        # both backends evaluate the batch * d * L * n decays, neither faster than the kernel's decay loop alone
        assert 0 < r["exp_floor_fraction"] < 1
    assert rows["cpu"]["speedup_vs_reference"] == pytest.approx(rows["reference"]["median_s"] / rows["cpu"]["median_s"])
    assert "exp floor" in capsys.readouterr().out
