"""The `emamba` entry point: models, flops and benchmark subcommands."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from emamba import cli
from emamba.flops import model_flops
from emamba.ops import cpu_gemm, scan_cpu

# The paper's GMACs at 224 (Linear + Conv MACs): ours are within 0.5% (see README, "FLOPs").
PAPER_GMACS = {"emamba_s": 2.45, "emamba_b": 4.19, "emamba_l": 7.58}


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def test_help_and_unknown_command(capsys):
    assert cli.main([]) == 2
    assert "forecast" in capsys.readouterr().out
    assert cli.main(["--help"]) == 0
    assert cli.main(["nope"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_models_lists_every_variant(capsys):
    assert cli.main(["models"]) == 0
    out = capsys.readouterr().out
    for name, params in [("emamba_s", "15.31"), ("emamba_l_mlp", "66.76"), ("emamba_tiny", "1.34")]:
        assert name in out and params in out


def test_flops_json_keys(capsys):
    assert cli.main(["flops", "emamba_s", "--json"]) == 0
    row = last_json(capsys.readouterr().out)
    assert set(row) >= {"params", "gmacs_paper", "gflops_full"}
    assert row["params"] == 15309104
    assert row["gflops_full"] > 2 * row["gmacs_paper"]


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_paper_convention_gmacs_close_to_the_paper(name):
    gmacs = model_flops(name).macs_paper / 1e9
    assert abs(gmacs - PAPER_GMACS[name]) / PAPER_GMACS[name] < 0.005, gmacs


@pytest.mark.parametrize("bidirectional", [False, True])
def test_mamba_mixer_macs_by_hand(bidirectional):
    # Every projection counts, dt_proj included: it runs through F.linear (its bias feeds the scan), so no
    # Linear hook sees it. The conv1d runs over the causal padding: L + d_conv - 1 outputs.
    from emamba.flops import count_flops
    from emamba.layers import MambaMixer

    dim, length, n, d_conv = 32, 10, 8, 4
    mixer = MambaMixer(dim, d_state=n, d_conv=d_conv, expand=2, bidirectional=bidirectional, backend="reference")
    d_inner, rank = 2 * dim, mixer.dt_rank
    per_branch = (length + d_conv - 1) * d_inner * d_conv + length * d_inner * (rank + 2 * n) + length * rank * d_inner
    expected = length * dim * 2 * d_inner + length * d_inner * dim + (2 if bidirectional else 1) * per_branch
    assert count_flops(mixer, (length, dim)).macs_paper == expected


def test_full_flops_count_the_scan_and_ffts():
    count = model_flops("emamba_tiny", 64)
    assert count.breakdown["selective_scan"] > 0 and count.breakdown["fft"] > 0
    assert count.flops_full == sum(count.breakdown.values())
    mlp = model_flops("emamba_s_mlp", 64)
    assert "fft" not in mlp.breakdown


def test_flops_rejects_unknown_model():
    with pytest.raises(SystemExit):
        cli.main(["flops", "resnet50"])


def test_benchmark_times_are_taken_before_the_memory_measurement(monkeypatch, capsys):
    # Measuring CPU peak memory switches glibc to handing freed memory back to the OS; steps timed after
    # that page-fault on every large allocation (it once inflated the reference scan's times 100x), so the
    # peak must come from an extra step after all timed ones.
    import emamba.memory
    from emamba.models import EMamba

    events = []
    real_reset = emamba.memory.reset_peak
    monkeypatch.setattr(emamba.memory, "reset_peak", lambda *a: events.append("reset") or real_reset(*a))
    hook = torch.nn.modules.module.register_module_forward_pre_hook(
        # real steps only: the GMACs count runs one more forward on the meta device
        lambda mod, args: events.append("step") if isinstance(mod, EMamba) and not args[0].is_meta else None)
    try:
        argv = ["benchmark", "--model", "emamba_tiny", "--bench", "infer", "--batch-size", "1", "--img-size", "32",
                "--num-warm-iter", "1", "--num-bench-iter", "3", "--json"]
        assert cli.main(argv) == 0
    finally:
        hook.remove()
    assert events == ["step"] * 4 + ["reset", "step"]
    assert len(last_json(capsys.readouterr().out)["step_ms_all"]) == 3


@pytest.mark.parametrize("bench", ["infer", "train"])
def test_benchmark_json_last_line(capsys, bench):
    argv = ["benchmark", "--model", "emamba_tiny", "--bench", bench, "--batch-size", "2", "--img-size", "64",
            "--num-warm-iter", "1", "--num-bench-iter", "2", "--json"]
    assert cli.main(argv) == 0
    row = last_json(capsys.readouterr().out)
    assert {"samples_per_sec", "step_ms", "peak_mem_mb", "backend", "params", "gmacs_paper"} <= set(row)
    assert row["samples_per_sec"] > 0 and row["backend"] in ("cpu", "torch")
    assert row["cpu_model"] and row["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    if row["backend"] == "cpu":  # the fused kernel's code path is recorded: speeds differ between the two
        assert row["scan_kernel"] == scan_cpu.kernel_variant() and row["scan_kernel"] in ("avx512", "avx2", "generic")
    else:
        assert row["scan_kernel"] is None
    # the projections' GEMM engine: oneDNN only for fp32 eager inference (where the automatic choice allows it)
    expected = cpu_gemm() if bench == "infer" and row["backend"] == "cpu" else "blas"
    assert row["projection_gemm"] == expected


def test_benchmark_reference_backend_and_amp(capsys):
    argv = ["benchmark", "--model", "emamba_tiny", "--bench", "train", "--batch-size", "2", "--img-size", "32",
            "--backend", "reference", "--amp", "bf16", "--num-warm-iter", "1", "--num-bench-iter", "1", "--json"]
    assert cli.main(argv) == 0
    row = last_json(capsys.readouterr().out)
    assert row["backend"] == "reference" and row["scan_kernel"] is None and row["projection_gemm"] == "blas"


def test_benchmark_rejects_bad_sizes():
    with pytest.raises(ValueError, match="multiples of 32"):
        cli.main(["benchmark", "--model", "emamba_tiny", "--img-size", "100"])


def test_console_script_runs():
    out = subprocess.run([sys.executable, "-m", "emamba.cli", "models"], capture_output=True, text=True, check=True)
    assert "emamba_b_mlp" in out.stdout
