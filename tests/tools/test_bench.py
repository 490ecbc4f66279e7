"""Tests of the tools around the library: the benchmark and the noisy-label example.

They run the real entry points (``python -m bench.run`` and its ``profile`` and ``host``
parts, ``python examples/noisy_labels.py --quick``) on the CPU at tiny sizes and check
what they write: the long-format CSV's columns and rows, the Markdown tables, non-empty
PNGs. No test here bounds a time: timings belong in the benchmark's own reports.
"""

import csv
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, ROOT)
import expface_kernels as ek  # noqa: E402
from bench import cli, labels, memory, peers, run  # noqa: E402
from bench.records import CSV_COLUMNS  # noqa: E402


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


def test_host_part_counts_fewer_ops_with_the_extension_ops(tmp_path):
    """`bench.run host` prints, per backend, the ops and µs of one call with the per-row
    work as extension ops and as PyTorch ops; the ops must be fewer; the CSV is long."""
    p = _run(["-m", "bench.run", "host", "--device", "cpu", "--calls", "20", "--backends", "extension",
              "--out", str(tmp_path)], timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = [r.split("|")[1:-1] for r in p.stdout.splitlines() if r.startswith("| extension")]
    assert [r[1].strip() for r in rows] == ["extension ops", "PyTorch ops"], p.stdout
    fwd_ops = [int(r[2]) for r in rows]
    assert fwd_ops[0] < fwd_ops[1], p.stdout
    assert all(float(r[4]) > 0 and float(r[5]) > 0 for r in rows), p.stdout
    with open(tmp_path / "host_overhead.csv") as f:
        rd = csv.DictReader(f)
        assert rd.fieldnames == CSV_COLUMNS
        ops = {(r["backend"], r["op"]): int(float(r["value"])) for r in rd if r["metric"] == "dispatch_ops"}
    assert ops[("extension (extension ops)", "fwd")] == fwd_ops[0]


@pytest.mark.parametrize("args, message", [
    (["--calls", "0"], "argument --calls: expected a positive integer, got '0'"),  # was ZeroDivisionError
    (["--backends", "foo"], "argument --backends: invalid choice: 'foo'"),
])
def test_host_part_refuses_bad_arguments(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        run.main(["host", "--device", "cpu", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_profile_part_smoke_on_cpu(tmp_path):
    """`bench.run profile` runs its split and variants logic on the CPU (tiny shapes, the
    Triton interpreter) and writes its tables; every Triton variant's error against the
    chunked primitives is printed and small; capacity (GPU only) says it is skipped."""
    out = tmp_path / "prof"
    p = _run(["-m", "bench.run", "profile", "--device", "cpu", "--B", "8", "--D", "16", "--c-exp", "7",
              "--out", str(out)], timeout=600)
    assert p.returncode == 0, p.stdout + p.stderr
    md = (out / "profile.md").read_text()
    assert "### split" in md and "### variants" in md and "capacity: GPU only" in md
    assert "| extension, PyTorch prologue |" in md and "| logits x W^T |" in md
    rows = [r for r in md.splitlines() if r.startswith("| lse_partials") or r.startswith("| grads")]
    assert len(rows) >= 8, md
    errs = [float(r.rstrip(" |").rsplit("|", 1)[1]) for r in rows]
    assert max(errs) < 1e-4, rows
    assert md.count("| 16 MiB |") == 1, md  # the extension's logits-block variants
    with open(out / "profile.csv") as f:
        rd = csv.DictReader(f)
        assert rd.fieldnames == CSV_COLUMNS
        got = {(r["op"], r["backend"], r["metric"]) for r in rd}
    assert ("bwd", "extension", "host_time") in got and ("gemm", "cublas full GEMM", "tflops") in got


def test_sweep_errors_batches_and_mixed_dtypes(tmp_path):
    """The sweep's GPU-preset features on the CPU: several B, the fp16-x/fp32-W pair, the
    loss error against float64 and its ratio to the naive loss's."""
    out = tmp_path / "b"
    p = _run(["-m", "bench.run", "--device", "cpu", "--C", "256", "--B", "8", "16", "--D", "16",
              "--rounds", "1", "--dtypes", "fp32", "fp16-fp32", "--backends", "naive", "chunked",
              "--errors", "--no-sweep", "--no-plots", "--no-memory", "--out", str(out)])
    assert p.returncode == 0, p.stderr[-3000:]
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    errs = {(r["dtype"], r["B"], r["backend"]): float(r["value"]) for r in rows
            if r["metric"] == "rel_err_vs_fp64"}
    assert set(errs) == {(dt, b, n) for dt in ("fp32", "fp16-fp32") for b in ("8", "16")
                         for n in ("naive", "chunked")}
    assert max(errs.values()) < 1e-4, errs
    assert any(r["metric"] == "err_ratio_vs_naive" and r["backend"] == "chunked" for r in rows)
    md = (out / "table.md").read_text()
    assert "**B=16, C=2^8, D=16, fp16-fp32**" in md and "| err / naive |" in md


def test_budget_cut_lists_the_shapes_not_measured(tmp_path, capsys):
    """--budget-s: no shape starts after it; the table names those left out."""
    args = ["--device", "cpu", "--C", "64", "128", "--B", "4", "--D", "8", "--rounds", "1",
            "--backends", "chunked", "--no-plots", "--no-memory", "--no-sweep",
            "--budget-s", "1e-9", "--out", str(tmp_path)]
    assert run.main(args) == 0
    md = (tmp_path / "table.md").read_text()
    assert "B=4, C=2^6, fp32: not measured (time budget)." in md
    assert "B=4, C=2^7, fp32: not measured (time budget)." in md


def test_shape_order_largest_first():
    cfg = {"Cs": [16, 64], "Bs": [2, 4], "dtypes": ["bf16", "fp32"], "largest_first": True}
    assert run.shapes(cfg)[:3] == [("bf16", 2, 64), ("bf16", 4, 64), ("fp32", 2, 64)]
    cfg["largest_first"] = False
    assert run.shapes(cfg)[:3] == [("bf16", 2, 16), ("bf16", 2, 64), ("bf16", 4, 16)]


def test_naive_peer_computes_in_the_inputs_dtype():
    """The naive peer is the eager loss in the inputs' (promoted) dtype: bf16 inputs give
    bf16 logits, fp16 x with an fp32 W gives fp32 -- and it is the library's reference."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=g)
    w = torch.randn(11, 7, generator=g)
    y = torch.randint(0, 11, (5,), generator=g)
    xb, wb = x.bfloat16(), w.bfloat16()
    got = peers.naive_loss(xb, wb, y, "arcface")
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, ek.reference_loss(xb, wb, y, "arcface", compute_dtype=torch.bfloat16))
    mixed = peers.naive_loss(x.half(), w, y)
    assert mixed.dtype == torch.float32
    want = ek.reference_loss(x.half().double(), w.double(), y)
    assert abs(float(mixed) - float(want)) < 1e-5 * abs(float(want))
