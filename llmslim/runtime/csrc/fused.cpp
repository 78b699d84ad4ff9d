// The small per-layer steps of the lean forward, each one call instead of three to seven torch
// ops. At batch 1 on a 135M model a decoder layer is ~40 calls from Python, and their dispatch
// costs as much as the layer's arithmetic; these cut it roughly in half. Each row is computed
// alone in a fixed order (batch-invariant by construction), with the roundings of the torch ops
// they replace: the same numbers as transformers' modules up to the order of a float32 sum.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <limits>

namespace llmslim {
namespace {

constexpr int kLanes = 16;

// sum of squares of x[0:n] in float32, over 16 fixed lanes then a fixed sum of the lanes
template <typename T>
float sum_squares(const T* x, int64_t n) {
  float part[kLanes] = {0.f};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const float v = static_cast<float>(x[i + l]);
      part[l] += v * v;
    }
  }
  for (int l = 0; i < n; ++i, ++l) part[l] += static_cast<float>(x[i]) * static_cast<float>(x[i]);
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

}  // namespace

// transformers' RMSNorm over the last dimension. Llama: w * (x * rsqrt(mean(x^2) + eps)).to(dtype),
// the product rounded in the input dtype; Gemma (`gemma`): (x * rsqrt(...) * (1 + w)).to(dtype) in
// float32. `residual` (optional, same shape): x + residual first (rounded to the dtype, as torch's
// add), returned too, so a residual add and the next norm are one call.
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma,
                                 const c10::optional<at::Tensor>& residual) {
  TORCH_CHECK(x.is_contiguous() && weight.is_contiguous() && weight.dim() == 1 && x.size(-1) == weight.size(0),
              "x [..., n] and weight [n], contiguous");
  TORCH_CHECK(x.scalar_type() == weight.scalar_type(), "x and weight differ in dtype");
  const bool add = residual.has_value();
  if (add) TORCH_CHECK(residual->sizes() == x.sizes() && residual->is_contiguous() &&
                       residual->scalar_type() == x.scalar_type(), "residual: x's shape and dtype, contiguous");
  const int64_t n = weight.size(0), rows = x.numel() / n;
  auto out = at::empty_like(x);
  auto sum = add ? at::empty_like(x) : x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    const scalar_t* rp = add ? residual->data_ptr<scalar_t>() : nullptr;
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* sp = sum.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* xr = xp + r * n;
        if (add) {
          scalar_t* s = sp + r * n;
          for (int64_t i = 0; i < n; ++i) s[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) + static_cast<float>(rp[r * n + i]));
          xr = s;
        }
        const float inv = 1.f / std::sqrt(sum_squares(xr, n) / static_cast<float>(n) + static_cast<float>(eps));
        scalar_t* o = op + r * n;
        if (gemma) {
          for (int64_t i = 0; i < n; ++i)
            o[i] = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv * (1.f + static_cast<float>(wp[i])));
        } else {
          for (int64_t i = 0; i < n; ++i) {
            const scalar_t y = static_cast<scalar_t>(static_cast<float>(xr[i]) * inv);
            o[i] = static_cast<scalar_t>(static_cast<float>(wp[i]) * static_cast<float>(y));
          }
        }
      }
    });
  });
  return {out, sum};
}

// The rotary embedding of q and k heads `qk [M, heads, d]` (any row/head strides, d contiguous) by
// `cos`/`sin [M, r]` (sin with its first half negated, r <= d even): the first r dims become
// round(round(x * cos) + roll(x, r/2) * sin), as torch's mul then addcmul; the rest is copied.
// -> a new contiguous [M, heads, d].
at::Tensor rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1, "qk: [M, heads, d] with d contiguous");
  TORCH_CHECK(cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.size(0) == qk.size(0) && cos.is_contiguous() &&
                  sin.is_contiguous(), "cos/sin: contiguous [M, r]");
  TORCH_CHECK(cos.scalar_type() == qk.scalar_type() && sin.scalar_type() == qk.scalar_type(), "dtypes differ");
  const int64_t M = qk.size(0), H = qk.size(1), D = qk.size(2), R = cos.size(1), half = R / 2;
  TORCH_CHECK(R <= D && R % 2 == 0, "rotary size must be even and at most the head size");
  auto out = at::empty({M, H, D}, qk.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qk.scalar_type(), "rope", [&] {
    const scalar_t* src = qk.data_ptr<scalar_t>();
    const scalar_t* cp = cos.data_ptr<scalar_t>();
    const scalar_t* sp = sin.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    const int64_t s0 = qk.stride(0), s1 = qk.stride(1);
    at::parallel_for(0, M * H, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const int64_t m = t / H, h = t % H;
        const scalar_t* x = src + m * s0 + h * s1;
        const scalar_t* c = cp + m * R;
        const scalar_t* s = sp + m * R;
        scalar_t* o = op + t * D;
        for (int64_t i = 0; i < R; ++i) {
          const scalar_t xc = static_cast<scalar_t>(static_cast<float>(x[i]) * static_cast<float>(c[i]));
          const int64_t j = i < half ? i + half : i - half;  // roll by r/2: element i takes x[i - r/2]
          // one fused multiply-add, as torch's vectorized addcmul computes it
          o[i] = static_cast<scalar_t>(std::fma(static_cast<float>(x[j]), static_cast<float>(s[i]), static_cast<float>(xc)));
        }
        for (int64_t i = R; i < D; ++i) o[i] = x[i];
      }
    });
  });
  return out;
}

// SwiGLU's gate: silu(g) * u for `gu [M, 2 * inter]` (g then u, as a fused gate/up product gives
// them), each op rounded to the dtype as torch's silu then mul. -> [M, inter]
at::Tensor silu_mul(const at::Tensor& gu, int64_t inter) {
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) == 2 * inter, "gu: contiguous [M, 2 * inter]");
  const int64_t M = gu.size(0);
  auto out = at::empty({M, inter}, gu.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, gu.scalar_type(), "silu_mul", [&] {
    const scalar_t* src = gu.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* g = src + m * 2 * inter;
        const scalar_t* u = g + inter;
        scalar_t* o = op + m * inter;
        for (int64_t i = 0; i < inter; ++i) {
          const float gf = static_cast<float>(g[i]);
          const scalar_t a = static_cast<scalar_t>(gf / (1.f + std::exp(-gf)));
          o[i] = static_cast<scalar_t>(static_cast<float>(a) * static_cast<float>(u[i]));
        }
      }
    });
  });
  return out;
}

// torch.argmax over the last dimension of `x [M, V]`: the first index of the largest value, a NaN
// counting as larger than everything (the first NaN wins), as torch's. torch's CPU argmax reads a
// 49152-wide bf16 row in ~185 us; one pass for the max and one for its first index take a few.
at::Tensor argmax_rows(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) > 0, "x: contiguous [M, V], V > 0");
  const int64_t M = x.size(0), V = x.size(1);
  auto out = at::empty({M}, x.options().dtype(at::kLong));
  int64_t* op = out.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "argmax_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, 4, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const scalar_t* row = xp + m * V;
        float best = -INFINITY;
        bool nan = false;
        for (int64_t i = 0; i < V; ++i) {  // vectorizes: a max and an unordered test
          const float v = static_cast<float>(row[i]);
          best = v > best ? v : best;
          nan |= v != v;
        }
        int64_t idx = 0;
        for (int64_t i = 0; i < V; ++i) {
          const float v = static_cast<float>(row[i]);
          if (nan ? v != v : v == best) {
            idx = i;
            break;
          }
        }
        op[m] = idx;
      }
    });
  });
  return out;
}

}  // namespace llmslim
