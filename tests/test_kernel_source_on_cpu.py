"""The CUDA kernels' own source, run on the CPU.

``src/bi-wkv/bi_wkv_cuda/bi_wkv_kernels.cuh`` holds all device code. Here it is compiled with the host C++
compiler under a small emulation of the CUDA execution model (every thread of every block runs; blocks
with ``__syncthreads`` run their threads as std::threads meeting at a barrier; ``__shared__`` arrays are
per-block statics), driven by the same launch sequence as ``bi_wkv.cu``. So the kernels' indexing, chunk
boundaries, scans and gradient formulas are checked against the float64 formula on this machine; only
what is specific to the GPU (speed, memory model) is left to the GPU validation.
"""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from rwkvunet.ops.bi_wkv import bi_wkv_torch

KERNELS = Path(__file__).resolve().parents[1] / "src" / "bi-wkv" / "bi_wkv_cuda" / "bi_wkv_kernels.cuh"

HARNESS = r"""
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <functional>
#include <thread>
#include <vector>

struct Dim3 { unsigned x = 1, y = 1, z = 1; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim, gridDim;
std::barrier<>* block_barrier = nullptr;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() { block_barrier->arrive_and_wait(); }
// The GPU's fast intrinsics flush results below FLT_MIN (2^-126) to zero; so does the emulation, so that
// the kernels are checked with the underflow they meet on the device.
inline float __expf(float x) {
  const float r = std::exp(x);
  return r < 0x1p-126f ? 0.f : r;
}
inline float __logf(float x) { return std::log(x < 0x1p-126f ? 0.f : x); }
using std::min;

#include KERNELS_CUH

using namespace bi_wkv;

// Runs every thread of a grid: one after another, or (with a barrier) each block's threads together.
static void launch(Dim3 grid, Dim3 block, bool sync, const std::function<void()>& kernel) {
  gridDim = grid;
  blockDim = block;
  const unsigned per_block = block.x * block.y * block.z;
  for (unsigned bz = 0; bz < grid.z; ++bz)
    for (unsigned by = 0; by < grid.y; ++by)
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        auto body = [&](unsigned t) {
          blockIdx = {bx, by, bz};
          threadIdx = {t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
          kernel();
        };
        if (!sync) {
          for (unsigned t = 0; t < per_block; ++t) body(t);
          continue;
        }
        std::barrier<> barrier((std::ptrdiff_t)per_block);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (unsigned t = 0; t < per_block; ++t) threads.emplace_back(body, t);
        for (auto& th : threads) th.join();
      }
}

static unsigned blocks(int64_t threads) { return (unsigned)((threads + THREADS - 1) / THREADS); }

static void scan(const float* w, float* planes, int B, int T, int C, int NC) {
  launch({(unsigned)B, (unsigned)((C + SCAN_CHANNELS - 1) / SCAN_CHANNELS), 1}, {SCAN_CHANNELS, SCAN_GROUPS, 2},
         true, [&] { scan_kernel(w, planes, B, T, C, NC); });
}

extern "C" void forward(int B, int T, int C, const float* w, const float* u, const float* k, const float* v,
                        float* y, float* states, int fused, int keep_state) {
  const int NC = (T + CHUNK - 1) / CHUNK;
  if (fused) {  // bi_wkv.cu takes this path when NC <= FUSED_MAX_CHUNKS; states is null without backward
    float* kept = keep_state ? states : nullptr;
    launch({(unsigned)B, (unsigned)((C + SCAN_CHANNELS - 1) / SCAN_CHANNELS), 1}, {SCAN_CHANNELS, (unsigned)NC, 1},
           true, [&] { fused_forward_kernel<float>(w, u, k, v, kept, y, B, T, C, NC); });
    return;
  }
  const Dim3 grid{blocks((int64_t)B * NC * C)}, block{THREADS};
  launch(grid, block, false, [&] { summarize_kernel<float>(w, k, v, states, B, T, C, NC); });
  scan(w, states, B, T, C, NC);
  launch(grid, block, false, [&] { output_kernel<float>(w, u, k, v, states, y, B, T, C, NC); });
}

extern "C" void backward(int B, int T, int C, const float* w, const float* u, const float* k, const float* v,
                         const float* states, const float* gy, float* gw, float* gu, float* gk, float* gv) {
  const int NC = (T + CHUNK - 1) / CHUNK;
  const int64_t plane = (int64_t)B * NC * C;
  std::vector<float> grad_states(6 * plane), partials(2 * plane);
  const Dim3 grid{blocks(plane)}, block{THREADS};
  launch(grid, block, false, [&] {
    grad_summarize_kernel<float>(w, u, k, v, gy, states, grad_states.data(), B, T, C, NC);
  });
  scan(w, grad_states.data(), B, T, C, NC);
  launch(grid, block, false, [&] {
    grad_output_kernel<float>(w, u, k, v, gy, states, grad_states.data(), gk, gv, partials.data(), B, T, C, NC);
  });
  launch({(unsigned)((C + 31) / 32)}, {32, REDUCE_ROWS}, true,
         [&] { reduce_kernel(w, partials.data(), gw, gu, (int64_t)B * NC, C); });
}
"""


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.fail("a C++ compiler (g++) is needed to run the kernel source on the CPU")
    folder = tmp_path_factory.mktemp("bi_wkv_host")
    (folder / "harness.cpp").write_text(HARNESS)
    lib = folder / "libbi_wkv_host.so"
    subprocess.run([compiler, "-std=c++20", "-O1", "-shared", "-fPIC", "-pthread", f'-DKERNELS_CUH="{KERNELS}"',
                    str(folder / "harness.cpp"), "-o", str(lib)], check=True)
    return ctypes.CDLL(str(lib))


def _ptr(t: torch.Tensor):
    assert t.dtype == torch.float32 and t.is_contiguous()
    return ctypes.c_void_p(t.data_ptr())


def run_emulated(lib, w, u, k, v, gy, fused=False):
    B, T, C = k.shape
    nc = -(-T // 16)
    assert not fused or nc <= 64
    y, states = torch.full_like(k, float("nan")), torch.full((6, B, nc, C), float("nan"))
    lib.forward(B, T, C, *map(_ptr, (w, u, k, v, y, states)), int(fused), 1)
    gw, gu, gk, gv = (torch.full_like(t, float("nan")) for t in (w, u, k, v))
    lib.backward(B, T, C, *map(_ptr, (w, u, k, v, states, gy, gw, gu, gk, gv)))
    return y, gw, gu, gk, gv


def _inputs(B, T, C, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(C, generator=g) * 20 - 10) / T
    u = (torch.rand(C, generator=g) * 20 - 10) / T
    k = torch.rand(B, T, C, generator=g) * 40 - 20
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return w, u, k, v, gy


# T = 1 and T < CHUNK; a partial last chunk; exactly two chunks; C not a multiple of 8 or 32; more chunks
# than scan groups (NC = 69 > 32, several chunks per group, a partial last group); the fused forward for up
# to 64 chunks (odd chunk counts, the largest), the chunked one beyond
@pytest.mark.parametrize(
    "shape,fused",
    [((1, 1, 3), False), ((2, 5, 3), False), ((2, 37, 5), False), ((1, 32, 40), False), ((1, 1100, 2), False),
     ((1, 1, 3), True), ((2, 37, 5), True), ((1, 100, 9), True), ((2, 1024, 3), True)],
)
def test_cuda_kernel_source_matches_float64_formula(emulated, shape, fused):
    w, u, k, v, gy = _inputs(*shape)
    got = run_emulated(emulated, w, u, k, v, gy, fused)
    leaves = [t.double().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_torch(*leaves)
    want = (ref, *torch.autograd.grad(ref, leaves, gy.double()))
    for name, g, r in zip("y w u k v".split(), got, want):
        assert torch.isfinite(g).all(), name
        err = ((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-6)).item()  # dw = 0 when T = 1
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("fused", [False, True])
def test_cuda_kernel_source_is_deterministic(emulated, fused):
    w, u, k, v, gy = _inputs(3, 70, 9, seed=1)
    first, second = run_emulated(emulated, w, u, k, v, gy, fused), run_emulated(emulated, w, u, k, v, gy, fused)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_fused_forward_without_backward_writes_no_state(emulated):
    """Inference passes a null state pointer: the fused kernel must write y alone, and the same y."""
    w, u, k, v, _ = _inputs(2, 100, 9, seed=3)
    B, T, C = k.shape
    states = torch.full((6, B, 7, C), float("nan"))
    y_kept, y_free = torch.full_like(k, float("nan")), torch.full_like(k, float("nan"))
    emulated.forward(B, T, C, *map(_ptr, (w, u, k, v, y_kept, states)), 1, 1)
    sentinel = torch.full_like(states, 7.0)
    emulated.forward(B, T, C, *map(_ptr, (w, u, k, v, y_free, sentinel)), 1, 0)
    assert torch.equal(y_kept, y_free)
    assert (sentinel == 7.0).all()


def test_fused_and_chunked_forward_agree(emulated):
    w, u, k, v, gy = _inputs(2, 300, 11, seed=2)
    for a, b in zip(run_emulated(emulated, w, u, k, v, gy, True), run_emulated(emulated, w, u, k, v, gy, False)):
        # the two scans combine chunk states in different orders: apart by float32 rounding (dw sums many
        # terms of both signs, so it shows the most)
        assert ((a - b).abs().max() / b.abs().max()).item() < 1e-4


def _extreme_inputs(B, T, C, decay, seed=0):
    """Keys at +-80 (+ noise), bonus from -80 to 80, |w| * T = |decay| (up to 1e4), float32."""
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([1.0, 0.3, 0.05, 1.0][:C]) * decay / T
    u = torch.tensor([0.0, 80.0, -80.0, 5.0][:C])
    k = torch.where(torch.rand(B, T, C, generator=g) > 0.5, 80.0, -80.0) + torch.randn(B, T, C, generator=g)
    v = torch.randn(B, T, C, generator=g)
    gy = torch.randn(B, T, C, generator=g)
    return w, u, k, v, gy


# chunks and scan groups at growth and decay far beyond the old ~80 exponent range, both forward paths
@pytest.mark.parametrize("decay", [120.0, -120.0, 1e3, -1e3, 1e4, -1e4])
@pytest.mark.parametrize("shape,fused", [((2, 37, 4), False), ((1, 100, 4), True), ((1, 1100, 3), False)])
def test_cuda_kernel_source_is_exact_at_extreme_values(emulated, shape, fused, decay):
    """Against the float64 formula of the same float32 inputs. The kernel accumulates in float32, so its
    exponents (up to |w| * T = 1e4 in size) carry float32's resolution: y and the gradients are judged
    against their natural scales (max|v|; sum|g| max|v| for dk, du; times T for dw) with a tolerance of
    64 * eps32 * (1 + |w| T), the forward error a backward-stable float32 evaluation may have."""
    w, u, k, v, gy = _extreme_inputs(*shape, decay)
    got = run_emulated(emulated, w, u, k, v, gy, fused)
    leaves = [t.double().requires_grad_() for t in (w, u, k, v)]
    ref = bi_wkv_torch(*leaves)
    want = (ref, *torch.autograd.grad(ref, leaves, gy.double()))
    T = shape[1]
    gsum, vmax = gy.abs().sum(1).max().item(), v.abs().max().item()
    scales = {"y": vmax, "w": 2 * vmax * gsum * T, "u": 2 * vmax * gsum, "k": 2 * vmax * gsum, "v": gsum}
    tol = 64 * torch.finfo(torch.float32).eps * (1 + abs(decay))
    for name, g, r in zip("y w u k v".split(), got, want):
        assert torch.isfinite(g).all(), name
        err = ((g.double() - r).abs().max() / scales[name]).item()
        assert err < tol, (name, err, tol)
