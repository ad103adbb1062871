// CPU kernels of RWKV-UNet: Bi-WKV and, at the end, the weight gradient of a depthwise convolution.
//
// Bi-WKV on the CPU: fused, one pass right to left and one left to right per (batch, group of channels), the
// channels of a group in SIMD lanes.
//
//   y_t = ( sum_{i!=t} exp(-(|t-i|-1) w + k_i) v_i + exp(u + k_t) v_t )
//       / ( sum_{i!=t} exp(-(|t-i|-1) w + k_i)     + exp(u + k_t) )
//
// The same max-shifted sums as the PyTorch implementation (rwkvunet/ops/bi_wkv.py): every term of a direction
// is scaled by that direction's largest exponent over the sequence, and the causal and anti-causal sums are
// running sums accumulated in float64 (as torch.cumsum accumulates float32). Each output then combines both
// sides relative to the token itself, which reuses the terms' own exponentials (see forward_group). Exact
// while range(k) + |w| (T + 1) + |u| stays within 60, which the caller checks (other inputs go to the
// log-space scan). Fused, it reads k and v twice and writes y once instead of the twenty-odd passes of the
// unfused form.
//
// exp and log are Cephes-style polynomials (about 1 ulp on float32) written so that compilers vectorize the
// channel loops. Float32 in and out; the Python side checks shapes, dtypes and devices.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <vector>

namespace {

constexpr int GROUP = 16;         // channels walked together (one AVX-512 vector of floats, two of doubles)
constexpr float NEG = -1e30f;     // log-scale of an empty sum: finite, so NEG - NEG == 0 (exp gives 0)

inline float exp_f32(float x) {
  // exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln(2) / 2; Cephes' expf polynomial for exp(r).
  x = std::min(std::max(x, -88.0f), 88.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // n = -127 (x <= -88) gives 0
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

inline float log_f32(float x) {
  // log(x) for x > 0: x = 2^e * f with f in [sqrt(1/2), sqrt(2)), log f by Cephes' logf polynomial.
  int32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  int32_t e = ((bits >> 23) & 0xff) - 126;
  bits = (bits & 0x807fffff) | 0x3f000000;  // f in [0.5, 1)
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  const bool small = f < 0.707106781186547524f;
  e = small ? e - 1 : e;
  f = small ? f + f - 1.0f : f - 1.0f;
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  float y = f * z * p;
  const float fe = static_cast<float>(e);
  y += -2.12194440e-4f * fe;
  y += -0.5f * z;
  return f + y + 0.693359375f * fe;
}

inline double exp_f64(double x) {
  // 2^n * exp(r), |r| <= ln(2) / 2, exp(r) by its Taylor polynomial to r^10 (relative error below 1e-12, far
  // below float32's resolution; no division); 0 below -708 (empty sums).
  const bool tiny = x < -708.0;
  x = std::min(std::max(x, -708.0), 709.0);
  const double n = std::nearbyint(x * 1.4426950408889634074);
  double r = x - n * 6.93145751953125e-1;
  r = r - n * 1.42860682030941723212e-6;
  double p = 1.0 / 3628800.0;
  p = p * r + 1.0 / 362880.0;
  p = p * r + 1.0 / 40320.0;
  p = p * r + 1.0 / 5040.0;
  p = p * r + 1.0 / 720.0;
  p = p * r + 1.0 / 120.0;
  p = p * r + 1.0 / 24.0;
  p = p * r + 1.0 / 6.0;
  p = p * r + 0.5;
  p = p * r + 1.0;
  p = p * r + 1.0;
  const int64_t bits = (static_cast<int64_t>(n) + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return tiny ? 0.0 : p * scale;
}

// One step of a walk: decay the sums (a, b) * exp(m) by exp(-w), add a token of log-weight lam and values x, z,
// and rescale to the new largest exponent (RWKV's running maximum: exact for any finite input). In float64, so
// that rounding does not build up over long sequences.
inline void push(double& m, double& a, double& b, double w, double lam, double x, double z) {
  const double moved = m - w;
  const double top = std::max(moved, lam);
  const double d = exp_f64(-std::abs(moved - lam));
  const bool old_on_top = moved >= lam;
  const double c_old = old_on_top ? 1.0 : d;
  const double c_new = old_on_top ? d : 1.0;
  a = a * c_old + x * c_new;
  b = b * c_old + z * c_new;
  m = top;
}

struct Group {
  int64_t b, c0;
  int n;  // channels in this group
};

template <typename F>
void for_each_group(int64_t B, int64_t C, F&& f) {
  const int64_t groups_per_batch = (C + GROUP - 1) / GROUP;
  at::parallel_for(0, B * groups_per_batch, 1, [&](int64_t begin, int64_t end) {
    for (int64_t g = begin; g < end; ++g) {
      const int64_t b = g / groups_per_batch, c0 = (g % groups_per_batch) * GROUP;
      f(Group{b, c0, static_cast<int>(std::min<int64_t>(GROUP, C - c0))});
    }
  });
}

void check(const torch::Tensor& w, const torch::Tensor& u, const torch::Tensor& k, const torch::Tensor& v) {
  TORCH_CHECK(k.device().is_cpu() && v.device().is_cpu() && w.device().is_cpu() && u.device().is_cpu(),
              "bi_wkv_cpu: w, u, k, v must be CPU tensors");
  TORCH_CHECK(k.dim() == 3 && v.sizes() == k.sizes(), "bi_wkv_cpu: k and v must both be (B, T, C)");
  TORCH_CHECK(w.dim() == 1 && u.dim() == 1 && w.size(0) == k.size(2) && u.size(0) == k.size(2),
              "bi_wkv_cpu: w and u must be (C,)");
  for (const auto* t : {&w, &u, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat, "bi_wkv_cpu: float32 tensors only");
    TORCH_CHECK(t->is_contiguous(), "bi_wkv_cpu: contiguous tensors only");
  }
}

// One (batch, channel group): y and, with WITH_LOG_D, log D.
template <bool WITH_LOG_D>
void forward_group(const Group& g, int64_t T, int64_t C, const float* wp, const float* up, const float* kp,
                   const float* vp, float* yp, float* dp, std::vector<float>& right) {
  const int n = g.n;
  const int64_t base = g.b * T * C + g.c0;
  float w[GROUP], u[GROUP], mf[GROUP], mb[GROUP];
  for (int c = 0; c < GROUP; ++c) {
    w[c] = c < n ? wp[g.c0 + c] : 0.0f;
    u[c] = c < n ? up[g.c0 + c] : 0.0f;
    mf[c] = mb[c] = NEG;
  }
  // the largest exponent of each direction: k_i + i w (causal), k_i + (T - 1 - i) w (anti-causal)
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = kp + base + t * C;
    const float tf = static_cast<float>(t), rf = static_cast<float>(T - 1 - t);
#pragma omp simd
    for (int c = 0; c < n; ++c) {
      mf[c] = std::max(mf[c], kt[c] + tf * w[c]);
      mb[c] = std::max(mb[c], kt[c] + rf * w[c]);
    }
  }
  // Every sum is taken relative to the token itself, exp(u + k_t): a term i of the causal side weighs
  // exp(k_i - k_t - (t - 1 - i) w - u) = g e_f(i) / e_f(t), with e_f(i) = exp(k_i + i w - m_f) the max-shifted
  // term the running sum adds anyway and g = exp(w - u); the anti-causal side alike with e_b. So
  //   y_t = (v_t + g (N_f / e_f(t) + N_b / e_b(t))) / (1 + g (D_f / e_f(t) + D_b / e_b(t))),
  // two exponentials per token and channel instead of five. Under the caller's span check every ratio is at
  // most exp(60), so the denominator stays far inside float32, and each side enters the output as its share of
  // the denominator times its numerator, which is bounded by max |v|.
  float gw[GROUP];
  for (int c = 0; c < GROUP; ++c) gw[c] = exp_f32(w[c] - u[c]);
  // anti-causal sums over i > t, right to left: kept per token as (numerator, denominator, g / e_b(t))
  double na[GROUP], da[GROUP];
  for (int c = 0; c < GROUP; ++c) na[c] = da[c] = 0.0;
  right.resize(static_cast<size_t>(T) * 3 * GROUP);
  for (int64_t t = T - 1; t >= 0; --t) {
    const float* kt = kp + base + t * C;
    const float* vt = vp + base + t * C;
    float* r = right.data() + t * 3 * GROUP;
    const float rf = static_cast<float>(T - 1 - t);
#pragma omp simd
    for (int c = 0; c < n; ++c) {
      const float e = exp_f32(kt[c] + rf * w[c] - mb[c]);
      r[c] = static_cast<float>(na[c]);
      r[GROUP + c] = static_cast<float>(da[c]);
      r[2 * GROUP + c] = gw[c] / e;
      na[c] += static_cast<double>(e * vt[c]);
      da[c] += static_cast<double>(e);
    }
  }
  // causal sums over i < t, left to right, combined with the anti-causal ones and the token itself
  double nc[GROUP], dc[GROUP];
  for (int c = 0; c < GROUP; ++c) nc[c] = dc[c] = 0.0;
  for (int64_t t = 0; t < T; ++t) {
    const float* kt = kp + base + t * C;
    const float* vt = vp + base + t * C;
    const float* r = right.data() + t * 3 * GROUP;
    float* yt = yp + base + t * C;
    float* dt = WITH_LOG_D ? dp + base + t * C : nullptr;
    const float tf = static_cast<float>(t);
#pragma omp simd
    for (int c = 0; c < n; ++c) {
      const float e = exp_f32(kt[c] + tf * w[c] - mf[c]);
      const float sf = gw[c] / e, sb = r[2 * GROUP + c];
      const float den = 1.0f + sf * static_cast<float>(dc[c]) + sb * r[GROUP + c];
      const float inv = 1.0f / den;
      // each side's share (sf / den) N_f stays within max |v| (N_f <= D_f max |v|), so nothing overflows
      yt[c] = inv * vt[c] + (sf * inv) * static_cast<float>(nc[c]) + (sb * inv) * r[c];
      if constexpr (WITH_LOG_D) dt[c] = (u[c] + kt[c]) + log_f32(den);
      nc[c] += static_cast<double>(e * vt[c]);
      dc[c] += static_cast<double>(e);
    }
  }
}

}  // namespace

// y (B, T, C) and, with ``with_log_d``, log D (B, T, C), D_t the denominator of y_t.
std::vector<torch::Tensor> bi_wkv_forward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                          bool with_log_d) {
  check(w, u, k, v);
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto y = torch::empty_like(k);
  auto log_d = with_log_d ? torch::empty_like(k) : torch::empty({0}, k.options());
  if (T == 0 || B == 0 || C == 0) return {y, log_d};
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>();
  const float *kp = k.data_ptr<float>(), *vp = v.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *dp = with_log_d ? log_d.data_ptr<float>() : nullptr;
  for_each_group(B, C, [&](const Group& g) {
    thread_local std::vector<float> right;
    if (with_log_d)
      forward_group<true>(g, T, C, wp, up, kp, vp, yp, dp, right);
    else
      forward_group<false>(g, T, C, wp, up, kp, vp, yp, dp, right);
  });
  return {y, log_d};
}

namespace {

// Gradients of one (batch, channel group); dw and du are this group's sums over the tokens.
void backward_group(const Group& g, int64_t T, int64_t C, const float* wp, const float* up, const float* kp,
                    const float* vp, const float* yp, const float* lp, const float* gp, float* dkp, float* dvp,
                    float* dwp, float* dup, std::vector<double>& right) {
  const int n = g.n;
  const int64_t base = g.b * T * C + g.c0;
  double w[GROUP];
  float u[GROUP];
  // walks: (k; v, 1) of the forward sums and (lambda = -log D; g, -g y) of the gradient sums
  double km[GROUP], ka[GROUP], kb[GROUP], gm[GROUP], ga[GROUP], gb[GROUP];
  for (int c = 0; c < GROUP; ++c) {
    w[c] = c < n ? wp[g.c0 + c] : 0.0;
    u[c] = c < n ? up[g.c0 + c] : 0.0f;
    km[c] = gm[c] = NEG;
    ka[c] = kb[c] = ga[c] = gb[c] = 0.0;
  }
  right.resize(static_cast<size_t>(T) * 6 * GROUP);
  for (int64_t t = T - 1; t >= 0; --t) {  // anti-causal sums over i > t, kept per token
    const int64_t o = base + t * C;
    double* r = right.data() + t * 6 * GROUP;
#pragma omp simd
    for (int c = 0; c < n; ++c) {
      r[c] = km[c];
      r[GROUP + c] = ka[c];
      r[2 * GROUP + c] = kb[c];
      r[3 * GROUP + c] = gm[c];
      r[4 * GROUP + c] = ga[c];
      r[5 * GROUP + c] = gb[c];
      const double gt = gp[o + c];
      push(km[c], ka[c], kb[c], w[c], kp[o + c], vp[o + c], 1.0);
      push(gm[c], ga[c], gb[c], w[c], -static_cast<double>(lp[o + c]), gt, -gt * yp[o + c]);
    }
  }
  for (int c = 0; c < GROUP; ++c) {
    km[c] = gm[c] = NEG;
    ka[c] = kb[c] = ga[c] = gb[c] = 0.0;
  }
  double dw[GROUP], du[GROUP];
  for (int c = 0; c < GROUP; ++c) dw[c] = du[c] = 0.0;
  for (int64_t t = 0; t < T; ++t) {  // causal sums over i < t, combined with the anti-causal ones
    const int64_t o = base + t * C;
    const double* r = right.data() + t * 6 * GROUP;
#pragma omp simd
    for (int c = 0; c < n; ++c) {
      const double kt = kp[o + c], vt = vp[o + c], gt = gp[o + c], yt = yp[o + c], lam = -static_cast<double>(lp[o + c]);
      // dv_t = e^k_t (sum_{i != t} e^{-(|t-i|-1) w} p_i + e^u p_t), p_i = g_i / D_i; q_i = -g_i y_i / D_i
      const double sf = exp_f64(kt + gm[c]), sb = exp_f64(kt + r[3 * GROUP + c]), ss = exp_f64(u[c] + kt + lam);
      const double dv = sf * ga[c] + sb * r[4 * GROUP + c] + ss * gt;
      dvp[o + c] = static_cast<float>(dv);
      dkp[o + c] = static_cast<float>(vt * dv + sf * gb[c] + sb * r[5 * GROUP + c] - ss * gt * yt);
      du[c] += ss * (gt * vt - gt * yt);
      // dw: pairs (i, j) on either side of t, through the forward sums of one side and the gradient sums of
      // the other: -e^{-w} (a_t P>_t + b_t Q>_t + c_t P<_t + d_t Q<_t)
      const double e1 = exp_f64(km[c] + r[3 * GROUP + c] - w[c]);  // causal forward x anti-causal gradient
      const double e2 = exp_f64(r[c] + gm[c] - w[c]);              // anti-causal forward x causal gradient
      dw[c] -= e1 * (ka[c] * r[4 * GROUP + c] + kb[c] * r[5 * GROUP + c])
             + e2 * (r[GROUP + c] * ga[c] + r[2 * GROUP + c] * gb[c]);
      push(km[c], ka[c], kb[c], w[c], kt, vt, 1.0);
      push(gm[c], ga[c], gb[c], w[c], lam, gt, -gt * yt);
    }
  }
  for (int c = 0; c < n; ++c) {
    dwp[g.b * C + g.c0 + c] = static_cast<float>(dw[c]);
    dup[g.b * C + g.c0 + c] = static_cast<float>(du[c]);
  }
}

}  // namespace

// dw (B, C), du (B, C) (per batch: the caller sums them), dk, dv (B, T, C), from the forward's y and log D and the
// output gradient g.
std::vector<torch::Tensor> bi_wkv_backward(torch::Tensor w, torch::Tensor u, torch::Tensor k, torch::Tensor v,
                                           torch::Tensor y, torch::Tensor log_d, torch::Tensor grad) {
  check(w, u, k, v);
  TORCH_CHECK(y.sizes() == k.sizes() && log_d.sizes() == k.sizes() && grad.sizes() == k.sizes(),
              "bi_wkv_cpu: y, log D and the gradient must be (B, T, C) like k");
  for (const auto* t : {&y, &log_d, &grad}) {
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "bi_wkv_cpu: contiguous float32 CPU tensors only");
  }
  const int64_t B = k.size(0), T = k.size(1), C = k.size(2);
  auto dk = torch::zeros_like(k), dv = torch::zeros_like(v);
  auto dw = torch::zeros({B, C}, k.options()), du = torch::zeros({B, C}, k.options());
  if (T == 0 || B == 0 || C == 0) return {dw, du, dk, dv};
  const float *wp = w.data_ptr<float>(), *up = u.data_ptr<float>(), *kp = k.data_ptr<float>();
  const float *vp = v.data_ptr<float>(), *yp = y.data_ptr<float>(), *lp = log_d.data_ptr<float>();
  const float* gp = grad.data_ptr<float>();
  float *dkp = dk.data_ptr<float>(), *dvp = dv.data_ptr<float>();
  float *dwp = dw.data_ptr<float>(), *dup = du.data_ptr<float>();
  for_each_group(B, C, [&](const Group& g) {
    thread_local std::vector<double> right;
    backward_group(g, T, C, wp, up, kp, vp, yp, lp, gp, dkp, dvp, dwp, dup, right);
  });
  return {dw, du, dk, dv};
}

// ---- The weight gradient of a depthwise convolution -------------------------------------------------------
//
//   dW[c, i, j] = sum_{b, oy, ox} g[b, oy, ox, c] * x[b, sh oy + i - ph, sw ox + j - pw, c]   (zero outside x)
//
// on channels-last float32 maps (x as (B, H, W, C), g as (B, Ho, Wo, C)). oneDNN computes this as a convolution
// with the whole gradient map as its kernel, at a small fraction of the machine's speed; here every output row
// adds its products to per-tap accumulators with the channels in SIMD lanes. The rows are split into at most 64
// fixed parts, each summed in float32 into its own accumulators, and the parts are added in float64 in a fixed
// order: the result does not depend on the number of threads.
torch::Tensor depthwise_weight_grad(torch::Tensor x, torch::Tensor g, int64_t kh, int64_t kw, int64_t sh,
                                    int64_t sw, int64_t ph, int64_t pw) {
  TORCH_CHECK(x.dim() == 4 && g.dim() == 4 && x.is_contiguous() && g.is_contiguous(),
              "depthwise_weight_grad: contiguous (B, H, W, C) maps expected");
  TORCH_CHECK(x.scalar_type() == at::kFloat && g.scalar_type() == at::kFloat, "depthwise_weight_grad: float32");
  const int64_t B = x.size(0), H = x.size(1), W = x.size(2), C = x.size(3);
  const int64_t Ho = g.size(1), Wo = g.size(2);
  TORCH_CHECK(g.size(0) == B && g.size(3) == C, "depthwise_weight_grad: x and g do not match");
  const int64_t rows = B * Ho, K = kh * kw;
  const int64_t parts = std::max<int64_t>(1, std::min<int64_t>(rows, 64));
  auto partial = torch::zeros({parts, K, C}, x.options());
  const float* xp = x.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* pp = partial.data_ptr<float>();
  at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
    for (int64_t part = begin; part < end; ++part) {
      float* acc = pp + part * K * C;
      const int64_t r0 = rows * part / parts, r1 = rows * (part + 1) / parts;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / Ho, oy = r % Ho;
        const float* grow = gp + (b * Ho + oy) * Wo * C;
        for (int64_t i = 0; i < kh; ++i) {
          const int64_t iy = sh * oy + i - ph;
          if (iy < 0 || iy >= H) continue;
          const float* xrow = xp + (b * H + iy) * W * C;
          for (int64_t j = 0; j < kw; ++j) {
            // the outputs whose input column sw ox + j - pw lies in [0, W)
            const int64_t lo = pw - j > 0 ? (pw - j + sw - 1) / sw : 0;
            const int64_t last = W - 1 - j + pw;
            if (last < 0) continue;
            const int64_t hi = std::min<int64_t>(Wo, last / sw + 1);
            float* a = acc + (i * kw + j) * C;
            for (int64_t ox = lo; ox < hi; ++ox) {
              const float* xv = xrow + (sw * ox + j - pw) * C;
              const float* gv = grow + ox * C;
#pragma omp simd
              for (int64_t c = 0; c < C; ++c) a[c] += gv[c] * xv[c];
            }
          }
        }
      }
    }
  });
  return partial.to(at::kDouble).sum(0).to(at::kFloat);  // (K, C)
}

// How many of torch's threads at::parallel_for gives n tasks here: a build without OpenMP runs them all on one.
int64_t parallel_threads(int64_t n) {
  std::vector<int> seen(static_cast<size_t>(std::max(1, at::get_num_threads())) + 1, 0);
  at::parallel_for(0, n, 1, [&](int64_t, int64_t) {
    const int t = at::get_thread_num();
    if (t >= 0 && t < static_cast<int>(seen.size())) seen[t] = 1;
  });
  return std::accumulate(seen.begin(), seen.end(), int64_t{0});
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, mod) {
  mod.def("depthwise_weight_grad", &depthwise_weight_grad,
          "weight gradient of a depthwise convolution on channels-last float32 maps: (kh * kw, C)");
  mod.def("parallel_threads", &parallel_threads, "threads at::parallel_for uses for n tasks (a build check)");
  mod.def("forward", &bi_wkv_forward, "Bi-WKV forward on the CPU (float32): y and, if asked, log D");
  mod.def("backward", &bi_wkv_backward, "Bi-WKV backward on the CPU (float32): dw, du (per batch), dk, dv");
}
