"""Validate the Bi-WKV CUDA kernel on a GPU in one run and print the results as tables.

1. builds ``src/bi-wkv`` with torch.utils.cpp_extension into the kernels build layout (``build_local.py``)
   and loads it with ``kernels.get_local_kernel`` (or loads ``--kernel-dir`` as it is);
2. parity of the forward and of all four gradients with the float64 formula and with the PyTorch op, per
   shape and dtype (error = max |got - ref| / max |ref|; limits 1e-4 in float32, 1e-2 in bfloat16);
3. determinism: two backward passes give bit-identical gradients;
4. compute-sanitizer memcheck (and racecheck) on small, odd shapes in every dtype;
5. CUDA-event timings (median of --iters after warm-up) of forward and forward+backward, next to the
   PyTorch op on the same GPU, with the acceptance targets.

    python src/bi-wkv/scripts/validate_gpu.py                # build, then everything (< 8 min on an H100)
    python src/bi-wkv/scripts/validate_gpu.py --kernel-dir D # use an existing build (D/build/<variant>/)
    python src/bi-wkv/scripts/validate_gpu.py --dry-run      # CPU: the PyTorch op stands in for the kernel

Exit status 0 when every check passes.
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
if str(REPO / "src") not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(REPO / "src"))

from rwkvunet.ops.bi_wkv import bi_wkv_torch  # noqa: E402

PARITY_SHAPES = [(2, 64, 32), (2, 196, 48), (24, 784, 576), (24, 196, 960), (4, 4096, 576), (1, 16384, 576)]
TIMING_SHAPES = [(24, 784, 576), (4, 4096, 576), (1, 16384, 576)]
SANITIZER_SHAPES = [(2, 37, 5), (1, 1, 3), (3, 100, 33), (1, 1100, 9)]  # fused and chunked forward
DRY_PARITY_SHAPES = [(2, 64, 32), (1, 37, 5)]
DRY_TIMING_SHAPES = [(2, 64, 32)]
LIMITS = {torch.float32: 1e-4, torch.bfloat16: 1e-2, torch.float16: 1e-2}
TARGETS_MS = {("forward", (24, 784, 576)): 0.08, ("forward+backward", (24, 784, 576)): 0.23}
LONG_RATIO_LIMIT = 1.3  # time at (1,16384,576) / time at (4,4096,576)
GRAD_NAMES = ("w", "u", "k", "v")

BiWKV = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


# ------------------------------------------------------------------------------------------------------
# references


def direct_formula(w, u, k, v, block: int = 256) -> torch.Tensor:
    """The formula as written (T x T weights per batch and channel) in float64, blocked over t."""
    w, u, k, v = (t.double() for t in (w, u, k, v))
    B, T, C = k.shape
    pos = torch.arange(T, device=k.device, dtype=torch.float64)
    out = torch.empty_like(v)
    for s in range(0, T, block):
        t = pos[s : s + block]
        dist = (t[:, None] - pos[None, :]).abs()  # (t, i)
        logw = -(dist[None, :, :, None] - 1) * w + k[:, None, :, :]  # (B, t, i, C)
        own = dist[None, :, :, None] == 0
        logw = torch.where(own, (u + k[:, s : s + block])[:, :, None, :], logw)
        e = torch.exp(logw - logw.amax(dim=2, keepdim=True))
        out[:, s : s + block] = (e * v[:, None]).sum(2) / e.sum(2)
    return out


def run(fn: BiWKV, w, u, k, v, gy):
    """Output and the gradients of (w, u, k, v) for the upstream gradient gy."""
    leaves = [t.detach().clone().requires_grad_() for t in (w, u, k, v)]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, gy)
    return y.detach(), [g.detach() for g in grads]


def float64_reference(w, u, k, v, gy):
    """Exact output and gradients: the linear-time formula and its autograd in float64."""
    return run(bi_wkv_torch, *(t.double() for t in (w, u, k, v, gy)))


def make_inputs(shape, dtype, device, seed: int = 0):
    """w = decay / T, u = first / T with |decay|, |first| <= 10; k in [-20, 20]; v, gy standard normal."""
    B, T, C = shape
    g = torch.Generator(device="cpu").manual_seed(seed + B * 7 + T * 13 + C)
    w = (torch.rand(C, generator=g) * 20 - 10) / T
    u = (torch.rand(C, generator=g) * 20 - 10) / T
    k = torch.rand(B, T, C, generator=g) * 40 - 20
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return w.to(device), u.to(device), k.to(device, dtype), v.to(device, dtype), gy.to(device, dtype)


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.double()
    scale = ref.abs().max().item()
    return (got.double() - ref).abs().max().item() / (scale if scale > 0 else 1.0)


# ------------------------------------------------------------------------------------------------------
# checks


def parity_rows(kernel: BiWKV, shapes, dtypes, device) -> list[list[str]]:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            w, u, k, v, gy = make_inputs(shape, dtype, device)
            y64, g64 = float64_reference(w, u, k, v, gy)
            yk, gk = run(kernel, w, u, k, v, gy)
            yt, gt = run(bi_wkv_torch, w, u, k, v, gy)
            limit = LIMITS[dtype]
            errs64 = [rel_err(yk, y64)] + [rel_err(a, b) for a, b in zip(gk, g64)]
            errs_t = [rel_err(yk, yt)] + [rel_err(a, b) for a, b in zip(gk, gt)]
            torch_errs64 = [rel_err(yt, y64)] + [rel_err(a, b) for a, b in zip(gt, g64)]
            ok = all(math.isfinite(e) and e <= limit for e in errs64)
            if shape[1] <= 256:  # the float64 linear-time formula itself against the direct one
                ok = ok and rel_err(y64, direct_formula(w, u, k, v)) < 1e-10
            for name, e64, et, te in zip(("y",) + tuple("d" + n for n in GRAD_NAMES), errs64, errs_t, torch_errs64):
                rows.append([str(shape), str(dtype).replace("torch.", ""), name, f"{e64:.2e}", f"{et:.2e}",
                             f"{te:.2e}", f"{limit:.0e}", "PASS" if math.isfinite(e64) and e64 <= limit else "FAIL"])
            if not ok:
                rows[-1][-1] = "FAIL"
            del y64, g64, yk, gk, yt, gt
    return rows


def determinism_rows(kernel: BiWKV, shapes, dtypes, device) -> list[list[str]]:
    rows = []
    for shape in shapes:
        for dtype in dtypes:
            w, u, k, v, gy = make_inputs(shape, dtype, device, seed=1)
            y1, g1 = run(kernel, w, u, k, v, gy)
            y2, g2 = run(kernel, w, u, k, v, gy)
            same = [torch.equal(y1, y2)] + [torch.equal(a, b) for a, b in zip(g1, g2)]
            rows.append([str(shape), str(dtype).replace("torch.", ""),
                         " ".join(f"{n}:{'=' if s else '!='}" for n, s in zip(("y",) + GRAD_NAMES, same)),
                         "PASS" if all(same) else "FAIL"])
    return rows


def sanitizer_rows(kernel_dir: Path | None, dry_run: bool) -> list[list[str]]:
    if dry_run or kernel_dir is None:
        return [["memcheck", "-", "skipped (dry run)", "SKIP"]]
    tool = shutil.which("compute-sanitizer") or next(
        (str(p) for p in (Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer",
                          Path("/usr/local/cuda/bin/compute-sanitizer")) if p.exists()), None)
    if tool is None:
        return [["memcheck", "-", "compute-sanitizer not found (CUDA_HOME/bin)", "FAIL"]]
    rows = []
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # one allocation per tensor: exact bounds
    for check in ("memcheck", "racecheck"):
        cmd = [tool, "--tool", check, "--report-api-errors", "no", "--error-exitcode", "3", sys.executable,
               str(Path(__file__).resolve()), "--sanitizer-child", "--kernel-dir", str(kernel_dir)]
        start = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
        except subprocess.TimeoutExpired:
            rows.append([check, "-", "timed out after 150 s", "FAIL"])
            continue
        summary = [line for line in proc.stdout.splitlines() + proc.stderr.splitlines() if "ERROR SUMMARY" in line
                   or "RACECHECK SUMMARY" in line]
        ok = proc.returncode == 0 and "sanitizer child ok" in proc.stdout
        detail = (summary[-1].replace("=========", "").strip() if summary else f"exit {proc.returncode}")
        rows.append([check, ", ".join(str(s) for s in SANITIZER_SHAPES) + " x f32/f16/bf16",
                     f"{detail} ({time.perf_counter() - start:.0f} s)", "PASS" if ok else "FAIL"])
        if not ok:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
    return rows


def sanitizer_child(kernel_dir: Path) -> int:
    kernel = load_kernel(kernel_dir)
    for shape in SANITIZER_SHAPES:
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            w, u, k, v, gy = make_inputs(shape, dtype, "cuda")
            y, grads = run(kernel, w, u, k, v, gy)
            assert torch.isfinite(y).all() and all(torch.isfinite(g).all() for g in grads)
    torch.cuda.synchronize()
    print("sanitizer child ok")
    return 0


def cuda_time_ms(fn: Callable[[], object], iters: int, warmup: int) -> float:
    """Median over `iters` calls of the GPU time between CUDA events around each call."""
    if not torch.cuda.is_available():
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for s, e in zip(starts, ends):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def timing_rows(kernel: BiWKV, shapes, dtypes, device, iters: int, warmup: int) -> tuple[list[list[str]], dict]:
    rows, times = [], {}
    for dtype in dtypes:
        for shape in shapes:
            w, u, k, v, gy = make_inputs(shape, dtype, device)
            leaves = [t.clone().requires_grad_() for t in (w, u, k, v)]
            for name, fn in (("kernel", kernel), ("torch op", bi_wkv_torch)):
                with torch.no_grad():
                    fwd = cuda_time_ms(lambda: fn(w, u, k, v), iters, warmup)
                both = cuda_time_ms(lambda: torch.autograd.grad(fn(*leaves), leaves, gy), iters, warmup)
                times[(name, dtype, shape)] = (fwd, both)
            (kf, kb), (tf, tb) = times[("kernel", dtype, shape)], times[("torch op", dtype, shape)]
            verdicts = []
            for what, value in (("forward", kf), ("forward+backward", kb)):
                target = TARGETS_MS.get((what, shape)) if dtype == torch.float32 else None
                if target is not None:
                    verdicts.append(f"{what} <= {target} ms: {'PASS' if value <= target else 'FAIL'}")
            rows.append([str(shape), str(dtype).replace("torch.", ""), f"{kf:.4f}", f"{kb:.4f}", f"{tf:.4f}",
                         f"{tb:.4f}", f"{tf / kf:.1f}x / {tb / kb:.1f}x", "; ".join(verdicts) or "-"])
    return rows, times


def long_sequence_rows(times: dict, dtypes) -> list[list[str]]:
    rows = []
    short, long = (4, 4096, 576), (1, 16384, 576)
    for dtype in dtypes:
        if ("kernel", dtype, short) not in times or ("kernel", dtype, long) not in times:
            continue
        for i, what in enumerate(("forward", "forward+backward")):
            ratio = times[("kernel", dtype, long)][i] / times[("kernel", dtype, short)][i]
            rows.append([str(dtype).replace("torch.", ""), what, f"{ratio:.2f}", f"<= {LONG_RATIO_LIMIT}",
                         "PASS" if ratio <= LONG_RATIO_LIMIT else "FAIL"])
    return rows


def integration_rows(kernel_dir: Path | None, kernel: BiWKV, device, dry_run: bool) -> list[list[str]]:
    """rwkvunet's dispatch point picks the kernel for CUDA tensors; torch.compile(fullgraph) traces it."""
    rows = []
    w, u, k, v, gy = make_inputs((2, 100, 48), torch.float32, device)
    if not dry_run and kernel_dir is not None:
        os.environ["RWKVUNET_BI_WKV"] = str(kernel_dir)
        from rwkvunet.ops import kernel_hub
        from rwkvunet.ops.bi_wkv import bi_wkv

        kernel_hub.clear_cache()
        fn = kernel_hub.cuda_bi_wkv()
        same = fn is not None and torch.equal(bi_wkv(w, u, k, v), kernel(w, u, k, v))
        rows.append(["rwkvunet.ops.bi_wkv on CUDA uses the kernel", "PASS" if same else "FAIL"])
    try:
        compiled = torch.compile(kernel, fullgraph=True, backend="aot_eager" if dry_run else "inductor")
        yc, gc = run(compiled, w, u, k, v, gy)
        ye, ge = run(kernel, w, u, k, v, gy)
        err = max([rel_err(yc, ye)] + [rel_err(a, b) for a, b in zip(gc, ge)])
        rows.append([f"torch.compile(fullgraph=True) forward+backward, max error vs eager {err:.1e}",
                     "PASS" if err <= 1e-6 else "FAIL"])
    except Exception as err:  # report, do not stop the other checks
        rows.append([f"torch.compile(fullgraph=True): {type(err).__name__}: {str(err).splitlines()[0][:120]}",
                     "FAIL"])
    return rows


# ------------------------------------------------------------------------------------------------------
# table output


def format_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    line = "| " + " | ".join(h.ljust(w) for h, w in zip(header, widths)) + " |"
    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    body = ["| " + " | ".join(str(c).ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join([f"\n### {title}\n", line, rule, *body])


def load_kernel(kernel_dir: Path) -> BiWKV:
    import kernels

    return kernels.get_local_kernel(Path(kernel_dir)).bi_wkv


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kernel-dir", type=Path, default=None,
                        help="an existing kernel folder (holding build/<variant>/); default: build one")
    parser.add_argument("--out", type=Path, default=None, help="where to build (default: a temporary folder)")
    parser.add_argument("--arch", default=None, help="TORCH_CUDA_ARCH_LIST for the build (default: this GPU's)")
    parser.add_argument("--iters", type=int, default=30, help="timed calls per measurement (>= 20)")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--skip-sanitizer", action="store_true")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU, no build: the PyTorch op stands in for the kernel on small CPU shapes")
    parser.add_argument("--sanitizer-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.iters < 20:
        parser.error("--iters must be at least 20")
    if args.sanitizer_child and args.kernel_dir is None:
        parser.error("--sanitizer-child needs --kernel-dir")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.sanitizer_child:
        return sanitizer_child(args.kernel_dir)
    t_start = time.perf_counter()
    if args.dry_run:
        device, kernel, kernel_dir = "cpu", bi_wkv_torch, None
        parity_shapes, timing_shapes, dtypes = DRY_PARITY_SHAPES, DRY_TIMING_SHAPES, (torch.float32, torch.bfloat16)
        print("dry run: the PyTorch op stands in for the kernel, on the CPU")
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run on a GPU machine, or use --dry-run", file=sys.stderr)
            return 2
        device = "cuda"
        parity_shapes, timing_shapes, dtypes = PARITY_SHAPES, TIMING_SHAPES, (torch.float32, torch.bfloat16)
        kernel_dir = args.kernel_dir
        if kernel_dir is None:
            sys.path.insert(0, str(HERE))
            import build_local

            kernel_dir = args.out or Path(tempfile.mkdtemp(prefix="bi_wkv_build_"))
            arch = args.arch or "{}.{}".format(*torch.cuda.get_device_capability())
            start = time.perf_counter()
            variant = build_local.build(kernel_dir, arch=arch)
            print(f"built {variant} in {time.perf_counter() - start:.0f} s")
        kernel = load_kernel(kernel_dir)
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}")

    failed = False

    def show(title, header, rows, verdict_col=-1):
        nonlocal failed
        print(format_table(title, header, rows), flush=True)
        failed |= any(row[verdict_col] == "FAIL" for row in rows)

    show("Parity (error = max|got - ref| / max|ref|)",
         ["shape (B,T,C)", "dtype", "output", "vs float64", "vs torch op", "torch op vs float64", "limit", ""],
         parity_rows(kernel, parity_shapes, dtypes, device))
    show("Determinism (two backward passes)", ["shape", "dtype", "bit-identical", ""],
         determinism_rows(kernel, parity_shapes[:3], dtypes, device))
    if not args.skip_sanitizer:
        show("compute-sanitizer", ["tool", "shapes", "result", ""], sanitizer_rows(kernel_dir, args.dry_run))
    show("torch integration", ["check", ""], integration_rows(kernel_dir, kernel, device, args.dry_run))
    rows, times = timing_rows(kernel, timing_shapes, dtypes, device, args.iters, args.warmup)
    print(format_table(f"Timings, ms (CUDA events, median of {args.iters} after {args.warmup} warm-up calls)",
                       ["shape", "dtype", "kernel fwd", "kernel fwd+bwd", "torch fwd", "torch fwd+bwd", "speed-up",
                        "targets"], rows), flush=True)
    failed |= any("FAIL" in row[-1] for row in rows)
    show("Long sequences: time(1,16384,576) / time(4,4096,576)", ["dtype", "pass", "ratio", "limit", ""],
         long_sequence_rows(times, dtypes))
    print(f"\n{'FAILED' if failed else 'ALL PASSED'} in {time.perf_counter() - t_start:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
