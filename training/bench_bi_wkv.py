"""CPU benchmark of the Bi-WKV op and the encoders.

Bi-WKV forward and forward+backward time and peak memory for T = 1024 ... 16384 at C = 576 (each time's
ratio to T = 1024 shows how close to linear it grows), then encoder inference latency per variant at
224x224 and 512x512. Every figure comes from this one run; each memory figure from a fresh subprocess.

    python training/bench_bi_wkv.py [--channels 576] [--repeats 5] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

_MEMORY_PROBE = """
import sys, torch
from rwkvunet.ops import bi_wkv
T, C, backward = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
w = torch.zeros(C, requires_grad=backward); u = torch.zeros(C, requires_grad=backward)
k = torch.randn(1, T, C, requires_grad=backward); v = torch.randn(1, T, C, requires_grad=backward)
def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) / 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current size, so the imports' peak does not hide the op's
base = rss("VmRSS:")
y = bi_wkv(w / T, u / T, k, v)
if backward:
    y.sum().backward()
print(rss("VmHWM:") - base)
"""


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def peak_mib(T: int, C: int, backward: bool) -> float:
    out = subprocess.run([sys.executable, "-c", _MEMORY_PROBE, str(T), str(C), "1" if backward else "0"],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def bench_bi_wkv(channels: int, repeats: int, lengths):
    from rwkvunet.ops import bi_wkv

    rows = []
    for T in lengths:
        w = (torch.rand(channels) * 20 - 10) / T
        u = (torch.rand(channels) * 20 - 10) / T
        k = (torch.rand(1, T, channels) * 40 - 20).requires_grad_(True)
        v = torch.randn(1, T, channels, requires_grad=True)
        wg, ug = w.clone().requires_grad_(True), u.clone().requires_grad_(True)

        def forward():
            with torch.no_grad():
                bi_wkv(w, u, k, v)

        def forward_backward():
            bi_wkv(wg, ug, k, v).sum().backward()

        rows.append(dict(T=T, fwd_ms=1e3 * median_time(forward, repeats),
                         fwd_bwd_ms=1e3 * median_time(forward_backward, repeats),
                         fwd_peak_mib=peak_mib(T, channels, False), fwd_bwd_peak_mib=peak_mib(T, channels, True)))
    base = rows[0]
    for r in rows:
        r["fwd_ratio"] = r["fwd_ms"] / base["fwd_ms"]
        r["fwd_bwd_ratio"] = r["fwd_bwd_ms"] / base["fwd_bwd_ms"]
    return rows


def bench_encoders(repeats: int, sizes):
    import timm

    import rwkvunet  # noqa: F401

    rows = []
    for variant in rwkvunet.ENCODER_VARIANTS:
        model = timm.create_model(f"rwkvunet_enc_{variant}", features_only=True).eval()
        for size in sizes:
            x = torch.randn(1, 3, size, size)

            def run():
                with torch.inference_mode():
                    model(x)

            rows.append(dict(variant=variant, size=size, latency_ms=1e3 * median_time(run, repeats)))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    from rwkvunet.errors import whole_number

    p.add_argument("--channels", type=whole_number(1), default=576)
    p.add_argument("--lengths", type=whole_number(1), nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    p.add_argument("--sizes", type=whole_number(16), nargs="+", default=[224, 512])
    p.add_argument("--repeats", type=whole_number(1), default=5)
    p.add_argument("--json", help="also write the figures to this JSON file (an earlier result of this script is "
                                  "replaced, any other file kept)")
    args = p.parse_args(argv)
    if args.json:
        from rwkvunet.commands.bench import check_json_path

        check_json_path(args.json, keys=("bi_wkv", "encoders"), earlier="an earlier result of this script")

    from rwkvunet.ops.cpu_memory import keep_freed_cpu_memory

    # the malloc setting the models apply on their first CPU pass, so the op is timed as they run it
    malloc = keep_freed_cpu_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU, malloc: {malloc}")
    wkv = bench_bi_wkv(args.channels, args.repeats, args.lengths)
    print(f"\nBi-WKV (PyTorch path of rwkvunet.bi_wkv), B=1, C={args.channels}, float32")
    print(f"{'T':>6} {'fwd ms':>9} {'ratio':>6} {'fwd+bwd ms':>11} {'ratio':>6} {'fwd MiB':>8} {'fwd+bwd MiB':>12}")
    for r in wkv:
        print(f"{r['T']:>6} {r['fwd_ms']:>9.1f} {r['fwd_ratio']:>6.2f} {r['fwd_bwd_ms']:>11.1f} "
              f"{r['fwd_bwd_ratio']:>6.2f} {r['fwd_peak_mib']:>8.0f} {r['fwd_bwd_peak_mib']:>12.0f}")
    enc = bench_encoders(args.repeats, args.sizes)
    print("\nEncoder inference latency, batch 1, float32 (features_only)")
    for r in enc:
        print(f"  rwkvunet_enc_{r['variant']} {r['size']}x{r['size']}: {r['latency_ms']:.1f} ms")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bi_wkv": wkv, "encoders": enc}, f, indent=1)
    return 0


if __name__ == "__main__":
    from rwkvunet.errors import run_main

    sys.exit(run_main("bench_bi_wkv.py", main))  # one-line errors; RWKVUNET_DEBUG=1 for tracebacks
