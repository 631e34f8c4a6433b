// Fused fp32 CPU kernels for the training step (built on first use by ernie5/kernels/__init__.py).
//
// Paddle's CPU elementwise, softmax and cross-entropy kernels run on one thread and each op makes its own pass
// over memory; these kernels do one pass per row on all OpenMP threads. Each has a plain-Paddle definition it is
// tested against (tests/model/test_fused_kernels.py). Tensors are contiguous, row-major, float32 (labels
// int64); leading dimensions are flattened into rows.
//
// Built with -march=native but -ffp-contract=off: no a * b + c is fused into one FMA instruction, so every
// elementwise result made of + - * / sqrt and this file's own exp polynomial is the same bit for bit on every
// x86-64 CPU (with or without FMA, AVX2 or AVX-512). The summations (`omp simd reduction`) may add in another
// order when the vector width differs, and the cross-entropy's one std::log per row comes from glibc, whose
// implementation is picked per CPU at run time (tests/model/test_kernel_variants.py builds a second ISA
// variant and checks both within derived bounds).

#include <cmath>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <limits>
#include <vector>

#include <omp.h>

#include "paddle/extension.h"

namespace {

void check_f32(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu(), name, " must be on CPU");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, name, " must be float32");
}

int64_t last_dim(const paddle::Tensor& t) { return t.shape().back(); }

// exp(x) in plain arithmetic so that loops over it vectorise (libm's expf does not without -ffinite-math-only,
// which would break the -inf handling of masks): x = k ln2 + r, |r| <= ln2 / 2, exp(r) by a degree-6
// polynomial (the classic Cephes expf coefficients, ~1 ulp), 2^k by building the exponent bits. Inputs below
// -87.3 (including -inf) give 0, above 88.3 give exp(88.3) ~ 2.2e38 (finite; 2^k must stay below 2^128);
// NaN stays NaN (and never reaches the float -> int conversion).
inline float exp_approx(float x) {
  const float xc = x != x ? 0.f : (x < -87.3f ? -87.3f : (x > 88.3f ? 88.3f : x));
  const float k = std::floor(xc * 1.44269504088896341f + 0.5f);
  const float r = (xc - k * 0.693359375f) + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e_r = p * r * r + r + 1.f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float two_k;
  std::memcpy(&two_k, &bits, sizeof two_k);
  return x != x ? x : (x < -87.3f ? 0.f : e_r * two_k);
}

inline float sigmoid(float a) { return 1.f / (1.f + exp_approx(-a)); }

}  // namespace

// ---------------------------------------------------------------- RMSNorm
// y = x * r * w, r = 1 / sqrt(mean(x^2) + eps) per row.  Returns y and r [rows].
std::vector<paddle::Tensor> RmsNormForward(const paddle::Tensor& x, const paddle::Tensor& w, float eps) {
  check_f32(x, "x");
  check_f32(w, "weight");
  const int64_t H = w.numel();
  PD_CHECK(last_dim(x) == H, "rms_norm: last dim of x != weight size");
  const int64_t N = x.numel() / H;
  auto y = paddle::empty(x.shape(), x.dtype(), x.place());
  auto r = paddle::empty({N}, x.dtype(), x.place());
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  float* yp = y.data<float>();
  float* rp = r.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* xr = xp + n * H;
    float* yr = yp + n * H;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t j = 0; j < H; ++j) ss += xr[j] * xr[j];
    const float rr = 1.f / std::sqrt(ss / H + eps);
    rp[n] = rr;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) yr[j] = xr[j] * rr * wp[j];
  }
  return {y, r};
}

// gx = r * (g w - xhat * mean(g w xhat)), gw = sum_rows(g * xhat), xhat = x * r.
std::vector<paddle::Tensor> RmsNormBackward(const paddle::Tensor& g, const paddle::Tensor& x,
                                            const paddle::Tensor& w, const paddle::Tensor& r) {
  check_f32(g, "grad");
  check_f32(x, "x");
  const int64_t H = w.numel(), N = x.numel() / H;
  auto gx = paddle::empty(x.shape(), x.dtype(), x.place());
  auto gw = paddle::empty({H}, x.dtype(), x.place());
  const float* gp = g.data<float>();
  const float* xp = x.data<float>();
  const float* wp = w.data<float>();
  const float* rp = r.data<float>();
  float* gxp = gx.data<float>();
  const int T = omp_get_max_threads();
  std::vector<float> partial(static_cast<size_t>(T) * H, 0.f);  // per-thread weight-gradient sums
#pragma omp parallel num_threads(T)
  {
    float* acc = partial.data() + static_cast<size_t>(omp_get_thread_num()) * H;
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      const float* gr = gp + n * H;
      const float* xr = xp + n * H;
      float* out = gxp + n * H;
      const float rr = rp[n];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < H; ++j) dot += gr[j] * wp[j] * xr[j];
      const float c = dot * rr * rr / H;  // xhat * mean(g w xhat) = x * c
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) {
        out[j] = rr * (gr[j] * wp[j] - xr[j] * c);
        acc[j] += gr[j] * xr[j] * rr;
      }
    }
  }
  float* gwp = gw.data<float>();
  for (int64_t j = 0; j < H; ++j) gwp[j] = 0.f;
  for (int t = 0; t < T; ++t)
    for (int64_t j = 0; j < H; ++j) gwp[j] += partial[static_cast<size_t>(t) * H + j];
  return {gx, gw};
}

// ---------------------------------------------------------------- SwiGLU
// gate_up [rows, 2F] (columns :F gate a, F: up b) -> silu(a) * b [rows, F].
std::vector<paddle::Tensor> SwigluForward(const paddle::Tensor& gu) {
  check_f32(gu, "gate_up");
  const int64_t F2 = last_dim(gu), F = F2 / 2, N = gu.numel() / F2;
  PD_CHECK(F2 % 2 == 0, "swiglu: last dim must be even");
  auto shape = gu.shape();
  shape.back() = F;
  auto h = paddle::empty(shape, gu.dtype(), gu.place());
  const float* p = gu.data<float>();
  float* hp = h.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* a = p + n * F2;
    const float* b = a + F;
    float* o = hp + n * F;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) o[j] = a[j] * sigmoid(a[j]) * b[j];
  }
  return {h};
}

// d gate = gh * b * s * (1 + a (1 - s)), d up = gh * a * s, s = sigmoid(a).
std::vector<paddle::Tensor> SwigluBackward(const paddle::Tensor& gu, const paddle::Tensor& gh) {
  check_f32(gh, "grad");
  const int64_t F2 = last_dim(gu), F = F2 / 2, N = gu.numel() / F2;
  auto dgu = paddle::empty(gu.shape(), gu.dtype(), gu.place());
  const float* p = gu.data<float>();
  const float* gp = gh.data<float>();
  float* dp = dgu.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    const float* a = p + n * F2;
    const float* b = a + F;
    const float* g = gp + n * F;
    float* da = dp + n * F2;
    float* db = da + F;
#pragma omp simd
    for (int64_t j = 0; j < F; ++j) {
      const float s = sigmoid(a[j]);
      da[j] = g[j] * b[j] * s * (1.f + a[j] * (1.f - s));
      db[j] = g[j] * a[j] * s;
    }
  }
  return {dgu};
}

// ---------------------------------------------------------------- softmax cross-entropy, in place
// logits [rows, V] -> per-row loss logsumexp(x) - x[label] [rows]; logits are overwritten with the loss's
// gradient softmax(x) - onehot(label). Rows whose label is `ignore_index` get loss 0 and gradient 0.
std::vector<paddle::Tensor> SoftmaxCeInplace(paddle::Tensor& logits, const paddle::Tensor& labels, int64_t ignore_index) {
  check_f32(logits, "logits");
  PD_CHECK(labels.dtype() == paddle::DataType::INT64, "labels must be int64");
  const int64_t V = last_dim(logits), N = logits.numel() / V;
  PD_CHECK(labels.numel() == N, "softmax_ce: one label per logits row");
  auto loss = paddle::empty({N}, logits.dtype(), logits.place());
  float* xp = logits.data<float>();
  const int64_t* lp = labels.data<int64_t>();
  float* op = loss.data<float>();
  int64_t bad = -1;
#pragma omp parallel for schedule(static)
  for (int64_t n = 0; n < N; ++n) {
    float* x = xp + n * V;
    const int64_t lab = lp[n];
    if (lab == ignore_index || lab < 0 || lab >= V) {
      if (lab != ignore_index) {
#pragma omp critical
        bad = lab;
      }
      op[n] = 0.f;
#pragma omp simd
      for (int64_t j = 0; j < V; ++j) x[j] = 0.f;
      continue;
    }
    const float x_lab = x[lab];
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < V; ++j) m = x[j] > m ? x[j] : m;
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < V; ++j) {
      const float e = exp_approx(x[j] - m);
      x[j] = e;
      s += e;
    }
    op[n] = m + std::log(s) - x_lab;
    const float inv = 1.f / s;
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) x[j] *= inv;
    x[lab] -= 1.f;
  }
  PD_CHECK(bad < 0, "softmax_ce: label ", bad, " out of range [0, ", V, ")");
  return {loss};
}

// ---------------------------------------------------------------- masked softmax (attention)
// scores [B, M, S, Sk] + mask [Bm, 1, S, Sk] (Bm = 1 or B, broadcast over the M heads) -> softmax over Sk.
// A row whose keys are all masked gives zeros.
std::vector<paddle::Tensor> MaskedSoftmaxForward(const paddle::Tensor& scores, const paddle::Tensor& mask) {
  check_f32(scores, "scores");
  check_f32(mask, "mask");
  const auto& ss = scores.shape();
  const auto& ms = mask.shape();
  PD_CHECK(ss.size() == 4 && ms.size() == 4, "masked_softmax: scores and mask must be 4-D");
  const int64_t B = ss[0], M = ss[1], S = ss[2], Sk = ss[3];
  PD_CHECK((ms[0] == B || ms[0] == 1) && ms[1] == 1 && ms[2] == S && ms[3] == Sk, "masked_softmax: mask shape");
  const bool mask_batched = ms[0] == B;
  auto probs = paddle::empty(ss, scores.dtype(), scores.place());
  const float* xp = scores.data<float>();
  const float* mp = mask.data<float>();
  float* pp = probs.data<float>();
  const int64_t rows = B * M * S;
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const int64_t b = row / (M * S), i = row % S;
    const float* x = xp + row * Sk;
    const float* mk = mp + ((mask_batched ? b : 0) * S + i) * Sk;
    float* p = pp + row * Sk;
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t j = 0; j < Sk; ++j) {
      p[j] = x[j] + mk[j];
      m = p[j] > m ? p[j] : m;
    }
    if (m == -std::numeric_limits<float>::infinity()) {  // no visible key: zeros (a NaN score stays NaN)
      for (int64_t j = 0; j < Sk; ++j) p[j] = p[j] != p[j] ? p[j] : 0.f;
      continue;
    }
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < Sk; ++j) {
      const float e = exp_approx(p[j] - m);
      p[j] = e;
      s += e;
    }
    const float inv = 1.f / s;
#pragma omp simd
    for (int64_t j = 0; j < Sk; ++j) p[j] *= inv;
  }
  return {probs};
}

// d scores = p * (dp - sum_j p_j dp_j) per row.
std::vector<paddle::Tensor> SoftmaxBackward(const paddle::Tensor& probs, const paddle::Tensor& dprobs) {
  check_f32(dprobs, "grad");
  const int64_t Sk = last_dim(probs), rows = probs.numel() / Sk;
  auto ds = paddle::empty(probs.shape(), probs.dtype(), probs.place());
  const float* pp = probs.data<float>();
  const float* gp = dprobs.data<float>();
  float* dp = ds.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t row = 0; row < rows; ++row) {
    const float* p = pp + row * Sk;
    const float* g = gp + row * Sk;
    float* d = dp + row * Sk;
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t j = 0; j < Sk; ++j) dot += p[j] * g[j];
#pragma omp simd
    for (int64_t j = 0; j < Sk; ++j) d[j] = p[j] * (g[j] - dot);
  }
  return {ds};
}

// ---------------------------------------------------------------- interleaved RoPE
// x [B, S, N, D], cos / signed sin [Bt, S, 1, D] (Bt = 1 or B, broadcast over the N heads):
// y = x * cos + swap_pairs(x) * ssin, swap_pairs exchanging channels 2i and 2i+1.
// transpose = true applies the adjoint (the backward): dx = g * cos + swap_pairs(g * ssin).
std::vector<paddle::Tensor> RopeForward(const paddle::Tensor& x, const paddle::Tensor& cos,
                                        const paddle::Tensor& ssin, bool transpose) {
  check_f32(x, "x");
  check_f32(cos, "cos");
  check_f32(ssin, "sin");
  const auto& xs = x.shape();
  const auto& ts = cos.shape();
  PD_CHECK(xs.size() == 4 && ts.size() == 4, "rope: x and tables must be 4-D");
  const int64_t B = xs[0], S = xs[1], N = xs[2], D = xs[3];
  PD_CHECK(D % 2 == 0, "rope: head_dim must be even");
  PD_CHECK((ts[0] == B || ts[0] == 1) && ts[1] == S && ts[2] == 1 && ts[3] == D, "rope: table shape");
  PD_CHECK(ssin.shape() == ts, "rope: cos and sin tables differ in shape");
  const bool table_batched = ts[0] == B;
  auto y = paddle::empty(xs, x.dtype(), x.place());
  const float* xp = x.data<float>();
  const float* cp = cos.data<float>();
  const float* sp = ssin.data<float>();
  float* yp = y.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t bs = 0; bs < B * S; ++bs) {
    const int64_t b = bs / S, s = bs % S;
    const int64_t t = ((table_batched ? b : 0) * S + s) * D;
    const float* c = cp + t;
    const float* sn = sp + t;
    for (int64_t h = 0; h < N; ++h) {
      const float* xi = xp + (bs * N + h) * D;
      float* yo = yp + (bs * N + h) * D;
      if (!transpose) {
        for (int64_t j = 0; j < D; j += 2) {
          yo[j] = xi[j] * c[j] + xi[j + 1] * sn[j];
          yo[j + 1] = xi[j + 1] * c[j + 1] + xi[j] * sn[j + 1];
        }
      } else {
        for (int64_t j = 0; j < D; j += 2) {
          yo[j] = xi[j] * c[j] + xi[j + 1] * sn[j + 1];
          yo[j + 1] = xi[j + 1] * c[j + 1] + xi[j] * sn[j];
        }
      }
    }
  }
  return {y};
}

// ---------------------------------------------------------------- MoE combine
// y_sorted [N, H] (expert outputs in expert order), inv [N = T*K] (row of (token t, slot k) in y_sorted),
// w [T, K] combine weights -> out [T, H] = sum_k w[t, k] * y_sorted[inv[t K + k]].
std::vector<paddle::Tensor> CombineForward(const paddle::Tensor& y, const paddle::Tensor& inv, const paddle::Tensor& w) {
  check_f32(y, "expert outputs");
  check_f32(w, "combine weights");
  PD_CHECK(inv.dtype() == paddle::DataType::INT64, "combine: index must be int64");
  const int64_t H = last_dim(y), N = y.numel() / H, T = w.shape()[0], K = w.shape()[1];
  PD_CHECK(T * K == N && inv.numel() == N, "combine: need T*K expert rows and indices");
  auto out = paddle::empty({T, H}, y.dtype(), y.place());
  const float* yp = y.data<float>();
  const int64_t* ip = inv.data<int64_t>();
  const float* wp = w.data<float>();
  float* op = out.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    float* o = op + t * H;
    for (int64_t j = 0; j < H; ++j) o[j] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float* yr = yp + ip[t * K + k] * H;
      const float wk = wp[t * K + k];
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) o[j] += wk * yr[j];
    }
  }
  return {out};
}

// d y_sorted[inv[t K + k]] = w[t, k] g[t] (each row written once: inv is a permutation), d w[t, k] = g[t] . y.
std::vector<paddle::Tensor> CombineBackward(const paddle::Tensor& g, const paddle::Tensor& y, const paddle::Tensor& inv,
                                            const paddle::Tensor& w) {
  check_f32(g, "grad");
  const int64_t H = last_dim(y), T = w.shape()[0], K = w.shape()[1];
  auto dy = paddle::empty(y.shape(), y.dtype(), y.place());
  auto dw = paddle::empty(w.shape(), w.dtype(), w.place());
  const float* gp = g.data<float>();
  const float* yp = y.data<float>();
  const int64_t* ip = inv.data<int64_t>();
  const float* wp = w.data<float>();
  float* dyp = dy.data<float>();
  float* dwp = dw.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t t = 0; t < T; ++t) {
    const float* gr = gp + t * H;
    for (int64_t k = 0; k < K; ++k) {
      const int64_t row = ip[t * K + k];
      const float* yr = yp + row * H;
      float* d = dyp + row * H;
      const float wk = wp[t * K + k];
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int64_t j = 0; j < H; ++j) {
        d[j] = wk * gr[j];
        dot += gr[j] * yr[j];
      }
      dwp[t * K + k] = dot;
    }
  }
  return {dy, dw};
}

// ---------------------------------------------------------------- multi-tensor: gradient norm and AdamW
namespace {
struct Chunk {
  int64_t tensor, begin, end;
};

// Every tensor cut into pieces of at most 64K elements, so that many small tensors and a few large ones spread
// evenly over the threads in one parallel loop.
std::vector<Chunk> chunks_of(const std::vector<paddle::Tensor>& ts) {
  const int64_t piece = 1 << 16;
  std::vector<Chunk> out;
  for (size_t t = 0; t < ts.size(); ++t)
    for (int64_t b = 0; b < ts[t].numel(); b += piece)
      out.push_back({static_cast<int64_t>(t), b, std::min(ts[t].numel(), b + piece)});
  return out;
}
}  // namespace

// sum over all tensors of sum(x^2), accumulated in double: [1] float64.
std::vector<paddle::Tensor> SumSquares(const std::vector<paddle::Tensor>& xs) {
  for (const auto& x : xs) check_f32(x, "gradient");
  const auto chunks = chunks_of(xs);
  std::vector<double> part(chunks.size(), 0.0);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks.size(); ++c) {
    const float* x = xs[chunks[c].tensor].data<float>();
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = chunks[c].begin; i < chunks[c].end; ++i) s += static_cast<double>(x[i]) * x[i];
    part[c] = s;
  }
  double total = 0.0;  // fixed order: the same bits whatever the thread count
  for (double s : part) total += s;
  auto out = paddle::empty({1}, paddle::DataType::FLOAT64, paddle::CPUPlace());
  *out.data<double>() = total;
  return {out};
}

// One AdamW step over many parameters, in place. lr_decay [n, 2]: per parameter its learning rate and 1 / 0 for
// decay on / off. Gradients are read times grad_scale (gradient clipping folded in).
// Per parameter: p -= lr * coeff * p (decay on); m = b1 m + (1 - b1) g; v = b2 v + (1 - b2) g^2;
// p -= lr sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps sqrt(1 - b2^t)); then b1^t *= b1, b2^t *= b2.
//
// The operations, their order and their precision are those of Paddle's portable CPU AdamW / Adam loop (the one
// it runs on CPUs without AVX-512): scalars and moments in float, rounded after every operation, and the last
// line (from sqrt(v) on) in double, rounded to float once, because that loop calls the C library's double sqrt.
// The library is compiled with -ffp-contract=off, so no multiply-add is fused whatever the ISA: the result is
// the same, bit for bit, on every x86-64 CPU (elementwise code; vector width does not matter) and equal to that
// Paddle loop. Paddle on an AVX-512 CPU instead runs a JIT kernel doing all of it in float with three fused
// multiply-adds; the two then differ by rounding only (bound in tests/model/test_fused_kernels.py).
void AdamWMulti(std::vector<paddle::Tensor>& params, const std::vector<paddle::Tensor>& grads,
                std::vector<paddle::Tensor>& m1, std::vector<paddle::Tensor>& m2, std::vector<paddle::Tensor>& b1p,
                std::vector<paddle::Tensor>& b2p, const paddle::Tensor& lr_decay, float beta1, float beta2,
                float eps, float coeff, float grad_scale) {
  const size_t n = params.size();
  PD_CHECK(grads.size() == n && m1.size() == n && m2.size() == n && b1p.size() == n && b2p.size() == n,
           "adamw: one gradient, two moments and two beta powers per parameter");
  PD_CHECK(lr_decay.numel() == static_cast<int64_t>(2 * n), "adamw: lr_decay must be [n, 2]");
  for (size_t t = 0; t < n; ++t) {
    check_f32(params[t], "parameter");
    check_f32(grads[t], "gradient");
    check_f32(m1[t], "moment1");
    check_f32(m2[t], "moment2");
    PD_CHECK(grads[t].numel() == params[t].numel() && m1[t].numel() == params[t].numel() &&
             m2[t].numel() == params[t].numel(), "adamw: size mismatch");
  }
  const float* hp = lr_decay.data<float>();
  std::vector<float> step(n), decay(n), eps_t(n);
  for (size_t t = 0; t < n; ++t) {
    const float lr = hp[2 * t], b1t = *b1p[t].data<float>(), b2t = *b2p[t].data<float>();
    decay[t] = hp[2 * t + 1] != 0.f ? lr * coeff : 0.f;
    step[t] = lr * (std::sqrt(1.f - b2t) / (1.f - b1t));  // Paddle's association (it matters in the last bit)
    eps_t[t] = eps * std::sqrt(1.f - b2t);
  }
  const auto chunks = chunks_of(params);
#pragma omp parallel for schedule(static)
  for (size_t c = 0; c < chunks.size(); ++c) {
    const int64_t t = chunks[c].tensor;
    float* p = params[t].data<float>();
    const float* g = grads[t].data<float>();
    float* m = m1[t].data<float>();
    float* v = m2[t].data<float>();
    const float dec = decay[t];
    const bool with_decay = dec != 0.f;  // no decay: p as is (also for an infinite p, where p - 0 p is NaN)
    const double neg_st = -static_cast<double>(step[t]), et = eps_t[t];
#pragma omp simd
    for (int64_t i = chunks[c].begin; i < chunks[c].end; ++i) {
      const float gi = g[i] * grad_scale;
      const float pi = with_decay ? p[i] - dec * p[i] : p[i];
      const float mi = beta1 * m[i] + (1.f - beta1) * gi;
      const float vi = beta2 * v[i] + (1.f - beta2) * gi * gi;
      m[i] = mi;
      v[i] = vi;
      p[i] = static_cast<float>(pi + neg_st * (mi / (std::sqrt(static_cast<double>(vi)) + et)));
    }
  }
  for (size_t t = 0; t < n; ++t) {
    *b1p[t].data<float>() *= beta1;
    *b2p[t].data<float>() *= beta2;
  }
}

// ---------------------------------------------------------------- registration
// Shape / dtype functions (Paddle needs them for ops whose outputs are not one copy of the input's metadata).
namespace {
using Shape = std::vector<int64_t>;
using Shapes = std::vector<Shape>;
using DType = paddle::DataType;
using DTypes = std::vector<DType>;

Shape rows_of(const Shape& x) {
  int64_t n = 1;
  for (size_t i = 0; i + 1 < x.size(); ++i) n *= x[i];
  return {n};
}
Shapes RmsNormShape(const Shape& x, const Shape&, float) { return {x, rows_of(x)}; }
DTypes RmsNormDtype(const DType& x, const DType&) { return {x, x}; }
Shapes RmsNormGradShape(const Shape&, const Shape& x, const Shape& w, const Shape&) { return {x, w}; }
DTypes RmsNormGradDtype(const DType&, const DType& x, const DType&, const DType&) { return {x, x}; }
Shapes SwigluShape(const Shape& gu) {
  Shape s = gu;
  s.back() /= 2;
  return {s};
}
DTypes FirstDtype1(const DType& d) { return {d}; }
Shapes FirstShape2(const Shape& s, const Shape&) { return {s}; }
DTypes FirstDtype2(const DType& d, const DType&) { return {d}; }
Shapes SoftmaxCeShape(const Shape& x, const Shape&, int64_t) { return {x, rows_of(x)}; }
DTypes SoftmaxCeDtype(const DType& x, const DType&) { return {x, x}; }
Shapes RopeShape(const Shape& x, const Shape&, const Shape&, bool) { return {x}; }
DTypes RopeDtype(const DType& d, const DType&, const DType&) { return {d}; }
Shapes CombineShape(const Shape& y, const Shape&, const Shape& w) { return {{w[0], y.back()}}; }
DTypes CombineDtype(const DType& y, const DType&, const DType&) { return {y}; }
Shapes CombineBwdShape(const Shape&, const Shape& y, const Shape&, const Shape& w) { return {y, w}; }
DTypes CombineBwdDtype(const DType&, const DType& y, const DType&, const DType& w) { return {y, w}; }
}  // namespace

PD_BUILD_OP(e5_rms_norm)
    .Inputs({"X", "W"})
    .Outputs({"Y", "R"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(RmsNormForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormDtype));

PD_BUILD_OP(e5_rms_norm_bwd)
    .Inputs({"G", "X", "W", "R"})
    .Outputs({"GX", "GW"})
    .SetKernelFn(PD_KERNEL(RmsNormBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(RmsNormGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RmsNormGradDtype));

PD_BUILD_OP(e5_swiglu)
    .Inputs({"GU"})
    .Outputs({"H"})
    .SetKernelFn(PD_KERNEL(SwigluForward))
    .SetInferShapeFn(PD_INFER_SHAPE(SwigluShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype1));

PD_BUILD_OP(e5_swiglu_bwd)
    .Inputs({"GU", "GH"})
    .Outputs({"DGU"})
    .SetKernelFn(PD_KERNEL(SwigluBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_OP(e5_softmax_ce_inplace)
    .Inputs({"Logits", "Labels"})
    .Outputs({"LogitsOut", "Loss"})
    .Attrs({"ignore_index: int64_t"})
    .SetInplaceMap({{"Logits", "LogitsOut"}})
    .SetKernelFn(PD_KERNEL(SoftmaxCeInplace))
    .SetInferShapeFn(PD_INFER_SHAPE(SoftmaxCeShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(SoftmaxCeDtype));

PD_BUILD_OP(e5_masked_softmax)
    .Inputs({"Scores", "Mask"})
    .Outputs({"Probs"})
    .SetKernelFn(PD_KERNEL(MaskedSoftmaxForward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_OP(e5_softmax_bwd)
    .Inputs({"Probs", "GProbs"})
    .Outputs({"GScores"})
    .SetKernelFn(PD_KERNEL(SoftmaxBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(FirstShape2))
    .SetInferDtypeFn(PD_INFER_DTYPE(FirstDtype2));

PD_BUILD_OP(e5_rope)
    .Inputs({"X", "Cos", "Sin"})
    .Outputs({"Y"})
    .Attrs({"transpose: bool"})
    .SetKernelFn(PD_KERNEL(RopeForward))
    .SetInferShapeFn(PD_INFER_SHAPE(RopeShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(RopeDtype));

PD_BUILD_OP(e5_sum_squares)
    .Inputs({paddle::Vec("X")})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(SumSquares));

PD_BUILD_OP(e5_adamw_multi)
    .Inputs({paddle::Vec("Param"), paddle::Vec("Grad"), paddle::Vec("Moment1"), paddle::Vec("Moment2"),
             paddle::Vec("Beta1Pow"), paddle::Vec("Beta2Pow"), "LrDecay"})
    .Outputs({paddle::Vec("ParamOut"), paddle::Vec("Moment1Out"), paddle::Vec("Moment2Out"),
              paddle::Vec("Beta1PowOut"), paddle::Vec("Beta2PowOut")})
    .Attrs({"beta1: float", "beta2: float", "epsilon: float", "coeff: float", "grad_scale: float"})
    .SetInplaceMap({{paddle::Vec("Param"), paddle::Vec("ParamOut")},
                    {paddle::Vec("Moment1"), paddle::Vec("Moment1Out")},
                    {paddle::Vec("Moment2"), paddle::Vec("Moment2Out")},
                    {paddle::Vec("Beta1Pow"), paddle::Vec("Beta1PowOut")},
                    {paddle::Vec("Beta2Pow"), paddle::Vec("Beta2PowOut")}})
    .SetKernelFn(PD_KERNEL(AdamWMulti));

PD_BUILD_OP(e5_combine)
    .Inputs({"Y", "Inv", "W"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(CombineForward))
    .SetInferShapeFn(PD_INFER_SHAPE(CombineShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(CombineDtype));

PD_BUILD_OP(e5_combine_bwd)
    .Inputs({"G", "Y", "Inv", "W"})
    .Outputs({"DY", "DW"})
    .SetKernelFn(PD_KERNEL(CombineBackward))
    .SetInferShapeFn(PD_INFER_SHAPE(CombineBwdShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(CombineBwdDtype));
