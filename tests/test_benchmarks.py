"""The benchmark scripts end to end at their smallest settings: scan.py (JSON rows, exp floor) and
module_threads.py (every timed module counted once per call)."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest
import torch

from emamba.ops import scan_cpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not scan_cpu.is_available()[0], reason="fused CPU scan kernel unavailable")
def test_scan_benchmark_rows_and_exp_floor(tmp_path, capsys):
    bench = load_benchmark("scan")
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
    # the roofline's FLOP/s is the faster GEMM library's (MKL takes its AVX2 code on AMD CPUs)
    gemms = rows["cpu"]["gemm_flops_per_s"]
    assert "aten" in gemms and rows["cpu"]["flops_per_s"] == pytest.approx(max(gemms.values()))
    assert gemms[rows["cpu"]["gemm_library"]] == rows["cpu"]["flops_per_s"]
    assert "exp floor" in capsys.readouterr().out


def test_scan_benchmark_asks_for_mambapy_up_front(monkeypatch, capsys):
    # without mambapy the pscan column cannot run: one clear error before any timing, not a traceback per shape
    bench = load_benchmark("scan")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(bench.importlib.util, "find_spec",
                        lambda name, *a: None if name == "mambapy" else real_find_spec(name, *a))
    with pytest.raises(SystemExit) as exc:
        bench.main(["--shapes", "ts", "--backends", "cpu", "mambapy", "--modes", "fwd"])
    assert exc.value.code == 2
    assert "pip install mambapy" in capsys.readouterr().err


def test_module_threads_counts_every_call(tmp_path, capsys):
    bench = load_benchmark("module_threads")
    out = tmp_path / "threads.json"
    threads = torch.get_num_threads()
    assert bench.main(["--model", "emamba_tiny", "--batch-size", "1", "--img-size", "64", "--threads", "1", "1",
                       "--rounds", "1", "--repeats", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    counts = {}
    for r in rows:
        counts[r["module"]] = counts.get(r["module"], 0) + r["count"]
        assert r["ms_few"] > 0 and r["ms_many"] > 0
    # emamba_tiny: depths (1, 1, 2, 1) plus the class block; one stem, three downsamples
    assert counts["MambaMixer"] == counts["EinFFT"] == 6
    assert counts["Stem"] == 1 and counts["Downsample"] == 3
    # a stage hands its downsample a channels-last view of its tokens: the captured input keeps it
    assert all(r["channels_last_view"] for r in rows if r["module"] == "Downsample")
    assert "sum over modules" in capsys.readouterr().out
    assert torch.get_num_threads() == threads  # the timing loop's thread counts do not leak out
    with pytest.raises(SystemExit):
        bench.main(["--repeats", "0"])


@pytest.mark.skipif(not scan_cpu.is_available()[0], reason="fused CPU scan kernel unavailable")
def test_interleave_ratios_within_rounds(tmp_path, capsys):
    bench = load_benchmark("interleave")
    out = tmp_path / "ratios.json"
    assert bench.main(["--shapes", "ts", "--backends", "cpu", "reference", "--rounds", "3", "--json", str(out)]) == 0
    (row,) = json.loads(out.read_text())["results"]
    assert row["shape"] == "ts" and row["rounds"] == 3 and row["fast"] == "cpu" and row["baseline"] == "reference"
    assert 0 < row["min_ratio"] <= row["median_ratio"] <= row["max_ratio"]
    assert row["median_s_cpu"] > 0 and row["median_s_reference"] > 0
    assert "per round median" in capsys.readouterr().out


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch build without oneDNN")
def test_onednn_projections_reports_every_recorded_shape(capsys):
    bench = load_benchmark("onednn_projections")
    assert bench.main(["--model", "emamba_tiny", "--batch-size", "2", "--img-size", "32", "--threads", "1",
                       "--gemm-repeats", "1", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("  weight ")]
    assert rows and all("rule takes" in r for r in rows)
    assert any("fold" in r for r in rows)  # the class-token block's L == 1 projections
    assert "ratio per round" in out
