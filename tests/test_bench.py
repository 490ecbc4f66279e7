"""Smoke tests of the benchmark runner and the noisy-label example (CPU, tiny sizes).

They run the real entry points in subprocesses (``python -m bench.run``,
``python examples/noisy_labels.py --quick``) and check what they write: the long-format
CSV's columns and rows, the Markdown table, and non-empty PNGs.
"""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

sys.path.insert(0, ROOT)
from bench import cli, labels, memory, peers, run  # noqa: E402
from bench.run import CSV_COLUMNS  # noqa: E402


def _run(args, timeout=180):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable] + args, cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _png_ok(path):
    assert os.path.exists(path), path
    with open(path, "rb") as f:
        head = f.read(8)
    assert head == b"\x89PNG\r\n\x1a\n", path
    assert os.path.getsize(path) > 5000, path


def test_runner_quick_tiny(tmp_path):
    out = tmp_path / "bench"
    # --device cpu: without it a GPU machine would run this on the GPU (the default device)
    p = _run(["-m", "bench.run", "--device", "cpu", "--C", "512", "4096", "--B", "64", "--D", "32",
              "--rounds", "2", "--sweep-C", "512", "--backends", "naive", "chunked", "triton",
              "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "skipped triton" in p.stderr  # never timed on the CPU
    assert "CPU numbers" in p.stdout and "| chunked | expface |" in p.stdout
    with open(out / "results.csv") as f:
        rd = csv.DictReader(f)
        assert rd.fieldnames == CSV_COLUMNS
        rows = list(rd)
    assert all(r["device"].startswith("CPU") for r in rows)
    assert {r["torch"] for r in rows} == {torch.__version__}

    def get(**kw):
        return [r for r in rows if all(r[k] == str(v) for k, v in kw.items())]

    for backend in ("naive", "chunked"):
        for c in (512, 4096):
            for op in ("fwd", "fwd+bwd"):
                med = get(backend=backend, C=c, op=op, metric="time_median")
                assert len(med) == 1 and float(med[0]["value"]) > 0 and med[0]["unit"] == "s"
                p20 = float(get(backend=backend, C=c, op=op, metric="time_p20")[0]["value"])
                p80 = float(get(backend=backend, C=c, op=op, metric="time_p80")[0]["value"])
                assert p20 <= float(med[0]["value"]) <= p80
            mem = get(backend=backend, C=c, op="fwd+bwd", metric="peak_extra_mem")
            assert len(mem) == 1 and mem[0]["unit"] == "bytes" and float(mem[0]["value"]) >= 0
    assert len(get(backend="chunked", C=4096, op="fwd+bwd", metric="time_ratio_vs_naive")) == 1
    # A memory ratio only where the naive loss's CPU reading is above the resolution
    # (B=64, C=4096: ~3.9 MiB; C=512: less, the ratio would divide noise).
    for c in (512, 4096):
        naive = float(get(backend="naive", C=c, op="fwd+bwd", metric="peak_extra_mem")[0]["value"])
        ratio = get(backend="chunked", C=c, op="fwd+bwd", metric="mem_ratio_vs_naive")
        assert len(ratio) == (naive >= memory.CPU_RESOLUTION_BYTES), (c, naive, ratio)
    assert len(get(backend="chunked", C=4096, op="fwd+bwd", metric="mem_ratio_vs_naive")) == 1
    assert len(get(backend="gemm", C=512, op="fwd", metric="time_median")) == 1
    sweep = {r["margin"] for r in get(op="margin_sweep", backend="chunked", metric="time_median")}
    assert sweep == set(peers.ALL_MARGINS)
    for name in ("time_vs_C", "memory_vs_C", "margin_sweep", "margins_psi", "margins_grad"):
        _png_ok(out / f"{name}.png")
    assert (out / "table.md").read_text().startswith("Device: **CPU")


@pytest.mark.parametrize("args, message", [
    (["--B", "0"], "argument --B: expected a positive integer, got '0'"),
    (["--rounds", "0"], "argument --rounds: expected a positive integer, got '0'"),
    (["--C", "1024", "-5"], "argument --C: expected a positive integer, got '-5'"),
    (["--D", "1.5"], "argument --D: expected a positive integer, got '1.5'"),
    (["--sweep-C", "0"], "argument --sweep-C: expected a positive integer, got '0'"),
    (["--s", "-1"], "argument --s: expected a finite number > 0, got '-1'"),
    (["--s", "inf"], "argument --s: expected a finite number > 0, got 'inf'"),
    (["--backends", "chunked", "arcface"], "argument --backends: invalid choice: 'arcface'"),
    (["--margins", "adaface"], "argument --margins: invalid choice: 'adaface'"),
])
def test_runner_refuses_bad_arguments(args, message, capsys):
    """Before: --B 0 and --rounds 0 read as 'not given' and ran the whole default preset
    (224 s, over bench/out/quick); --C 0 and --D -3 ended in a torch traceback."""
    with pytest.raises(SystemExit) as e:
        run.main(args)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_cli_types_refuse_out_of_range_values():
    import argparse
    assert cli.positive_int("3") == 3 and cli.positive_float("0.5") == 0.5
    assert cli.fraction("0.3") == 0.3
    for fn, bad in ((cli.positive_int, ["0", "-1", "2.5", "x"]),
                    (cli.positive_float, ["0", "-1", "nan", "inf", "x"]),
                    (cli.fraction, ["0", "1", "-0.1", "1.5", "nan", "x"])):
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError, match=repr(text)):
                fn(text)


def test_runner_default_device_is_the_gpu_when_there_is_one(monkeypatch):
    """The README quickstart's 'default device'; before, the CPU unless --preset gpu."""
    for cuda, want in ((True, "cuda"), (False, "cpu")):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        assert run.default_device(None) == want
        assert run.default_device("quick") == want and run.default_device("full") == want
        assert run.default_device("gpu") == "cuda" and run.default_device("scale") == "cpu"


def test_report_labels():
    """C is written as 2^k only when it is a power of two (C=100,000 once read '2^16'),
    a time in ms to three significant figures (a 0.7 ms GPU time once read '1')."""
    assert labels.class_count(1 << 17) == "2^17" and labels.class_count(1) == "2^0"
    assert labels.class_count(100_000) == "100,000" and labels.class_count(1000) == "1,000"
    assert labels.class_count(1 << 20, tex=True) == "$2^{20}$"
    assert labels.ms(0.0007) == "0.7" and labels.ms(0.01234) == "12.3"
    assert labels.ms(0.0995) == "99.5" and labels.ms(1.5054) == "1,505"


def test_runner_refuses_cuda_without_gpu(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    p = _run(["-m", "bench.run", "--device", "cuda", "--out", str(tmp_path)], timeout=60)
    assert p.returncode == 2 and "no CUDA device" in p.stderr


def test_scale_preset_tiny(tmp_path):
    """The scale path (one worker per backend, naive need estimated) at a toy size."""
    p = _run(["-m", "bench.run", "--preset", "scale", "--C", "8192", "--B", "8", "--D", "16",
              "--out", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    assert "naive (not run): needs" in p.stdout and "| chunked |" in p.stdout
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert any(r["metric"] == "est_peak_total_mem" and r["backend"] == "naive" for r in rows)
    assert any(r["metric"] == "peak_rss" and r["backend"] == "chunked" for r in rows)
    _png_ok(tmp_path / "scale_memory.png")


def test_cpu_memory_worker_counts_a_known_allocation():
    """The resident-set method sees the naive loss's B×C logits: extra ≥ one logits tensor."""
    b, c, d = 64, 1 << 14, 32
    res = memory.run_cpu_jobs([dict(candidate=n, margin="expface", m=None, s=64.0, B=b, C=c, D=d,
                                    dtype="fp32", op="fwd+bwd", seed=0) for n in ("naive", "chunked")])
    by = {r["candidate"]: r for r in res}
    assert "skipped" not in by["naive"], by["naive"]
    assert by["naive"]["grad_bytes"] == 4 * (b * d + c * d)
    assert by["naive"]["peak_extra"] >= 4 * b * c  # at least one (B, C) fp32 tensor
    assert by["chunked"]["peak_extra"] < by["naive"]["peak_extra"]


def test_noisy_labels_quick(tmp_path):
    p = _run([os.path.join("examples", "noisy_labels.py"), "--quick", "--out", str(tmp_path)], timeout=120)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| expface |" in p.stdout and "| arcface |" in p.stdout
    assert "TAR@FAR=1e-3" in p.stdout
    _png_ok(tmp_path / "noisy_label_angles.png")


def test_host_overhead_script_counts_fewer_ops_with_the_extension_ops():
    """bench/host_overhead.py prints, per backend, the ops and µs of one call with the
    per-row work as extension ops and as PyTorch ops; the ops must be fewer."""
    p = subprocess.run([sys.executable, "bench/host_overhead.py", "--device", "cpu", "--calls", "20",
                        "--backends", "extension"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [r.split("|")[1:-1] for r in p.stdout.splitlines() if r.startswith("| extension")]
    assert [r[1].strip() for r in rows] == ["extension ops", "PyTorch ops"], p.stdout
    fwd_ops = [int(r[2]) for r in rows]
    assert fwd_ops[0] < fwd_ops[1], p.stdout
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows), p.stdout


@pytest.mark.parametrize("args, message", [
    (["--calls", "0"], "argument --calls: expected a positive integer, got '0'"),  # was ZeroDivisionError
    (["--backends", "foo"], "argument --backends: invalid choice: 'foo'"),
])
def test_host_overhead_script_refuses_bad_arguments(args, message, capsys):
    from bench import host_overhead
    with pytest.raises(SystemExit) as e:
        host_overhead.main(["--device", "cpu", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_device_benchmark_scripts_smoke_on_cpu(tmp_path):
    """bench/gpu_bench.py and bench/gpu_profile.py run their logic on CPU (``--device cpu``:
    tiny shapes, the Triton interpreter) and write their tables; every Triton variant's
    error against the chunked primitives is printed and small."""
    env_extra = {"TRITON_INTERPRET": "1"}
    out = tmp_path / "prof"
    p = subprocess.run([sys.executable, "bench/gpu_profile.py", "--device", "cpu", "--B", "8", "--D", "16",
                        "--c-exp", "7", "--parts", "split", "variants", "--out", str(out)],
                       cwd=ROOT, env={**os.environ, **env_extra}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (out / "gpu_profile.md").read_text()
    assert "### split" in md and "### variants" in md
    rows = [r for r in md.splitlines() if r.startswith("| lse_partials") or r.startswith("| grads")]
    assert len(rows) >= 8, md
    errs = [float(r.rstrip(" |").rsplit("|", 1)[1]) for r in rows]
    assert max(errs) < 1e-4, rows
    with open(out / "gpu_profile.csv") as f:
        assert {"part", "what", "metric", "value"} <= set(next(csv.reader(f)))
    out = tmp_path / "bench"
    p = subprocess.run([sys.executable, "bench/gpu_bench.py", "--device", "cpu", "--B", "8", "--D", "16",
                        "--c-exps", "7", "--dtypes", "fp32", "--backends", "naive", "cublas", "chunked",
                        "triton", "extension", "--out", str(out)],
                       cwd=ROOT, env={**os.environ, **env_extra}, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (out / "gpu_bench.md").read_text()
    for name in ("naive", "chunked", "triton", "extension", "cublas"):
        assert f"| {name}" in md, md
