// Small-M matrix products for decoding on CPUs with AVX512-BF16: int4 weights with per-group
// scale and zero (GPTQ, 2-4 bits), and dense bf16 weights (the output head). Batch-invariant by
// construction: every output element is computed by one thread in an order that depends only on
// its own row of x, never on how many rows came with it or how many threads run.
//
// Why not torch's `_weight_int4pack_mm_for_cpu`: on CPUs without AMX it dequantizes the weight
// again for every few rows, so its time grows linearly with the rows (measured on Zen 4: 16 rows
// take 5x one row, 64 rows 21x; eval/inference.md), and its batch-1 speed is below the memory's.
// Here a weight tile is decoded once for up to 8 rows, and the products use VDPBF16PS (two bf16
// products per fp32 lane per instruction).
//
// Int4 layout (`pack_int4` in kernels.py): codes q in [0, 15], the weight is w = (q - 8) s + z
// with s, z the bf16 scale and zero of the (kernel group, output) -- torch's int4 convention, so
// both kernels compute the same weights from the same `scale_zeros`. Bytes are grouped by 16
// outputs and 4 inputs: the 32 bytes of (n / 16, k / 4) hold, at byte 2 (n % 16) + h (h = 0, 1),
// q[n, 4j + h] in the low nibble and q[n, 4j + 2 + h] in the high. Widened to 16 bits each, the 32
// bytes are 16 fp32 lanes of two 16-bit halves; the low nibbles then give every lane the bf16 pair
// (128 + q[n, 4j], 128 + q[n, 4j+1]) and the high nibbles (128 + q[n, 4j+2], 128 + q[n, 4j+3]): a
// bf16 with exponent 2^7 has a mantissa step of 1, so its bits are just 0x4300 | q. Two VDPBF16PS
// operands (64 weights) from one 32-byte load and three bit operations. Then per group
//     sum_k w x = s * sum_k (128 + q) x + (z - 136 s) * sum_k x,
// the second sum (x's group sums) computed once per row in a fixed order.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LLMSLIM_AVX512BF16 1
#endif

namespace llmslim {

bool int4_matmul_available() {
#ifdef LLMSLIM_AVX512BF16
  return true;
#else
  return false;
#endif
}

#ifdef LLMSLIM_AVX512BF16

namespace {

constexpr int kTile = 8;  // rows of x per pass over a weight tile (8 accumulators + 8 sums in zmm registers)

inline __m512 bf16_pairs_to_low(__m512i p) { return _mm512_castsi512_ps(_mm512_slli_epi32(p, 16)); }
inline __m512 bf16_pairs_to_high(__m512i p) {
  return _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u))));
}

// Rows m0..m0+MT of y for the 16 outputs of block nb.
template <int MT>
void int4_tile(const uint16_t* x, int64_t Kp, const float* xsum, int64_t ng, const uint8_t* w,
               const uint16_t* sz, int64_t Np, int64_t nb, int64_t kg, uint16_t* y, int64_t ldy) {
  const __m512i nib = _mm512_set1_epi32(0x000F000F);
  const __m512i magic = _mm512_set1_epi32(0x43004300);
  const __m512 c136 = _mm512_set1_ps(136.f);
  const uint8_t* wb = w + nb * (Kp / 2) * 16;
  __m512 out[MT];
  for (int m = 0; m < MT; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t t = 0; t < ng; ++t) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    const uint8_t* wt = wb + t * (kg / 2) * 16;
    const uint16_t* xt = x + t * kg;
    for (int64_t j = 0; j < kg / 4; ++j) {  // 32 bytes: inputs 4j..4j+3 of the 16 outputs
      const __m512i d = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(wt + j * 32)));
      const __m512i lo = _mm512_ternarylogic_epi32(d, nib, magic, 0xEA);  // (d & 0xF) | magic per 16 bits
      const __m512i hi = _mm512_ternarylogic_epi32(_mm512_srli_epi16(d, 4), nib, magic, 0xEA);
      for (int m = 0; m < MT; ++m) {
        int32_t p0, p1;  // two 4-byte loads, each a broadcast operand of its VDPBF16PS
        std::memcpy(&p0, xt + m * Kp + 4 * j, sizeof(p0));
        std::memcpy(&p1, xt + m * Kp + 4 * j + 2, sizeof(p1));
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)lo, (__m512bh)_mm512_set1_epi32(p0));
        acc[m] = _mm512_dpbf16_ps(acc[m], (__m512bh)hi, (__m512bh)_mm512_set1_epi32(p1));
      }
    }
    const __m512i p = _mm512_loadu_si512(sz + (t * Np + nb * 16) * 2);  // 16 (scale, zero) bf16 pairs
    const __m512 s = bf16_pairs_to_low(p);
    const __m512 c = _mm512_fnmadd_ps(c136, s, bf16_pairs_to_high(p));  // z - 136 s
    for (int m = 0; m < MT; ++m) {
      out[m] = _mm512_fmadd_ps(s, acc[m], out[m]);
      out[m] = _mm512_fmadd_ps(c, _mm512_set1_ps(xsum[m * ng + t]), out[m]);
    }
  }
  for (int m = 0; m < MT; ++m)  // one rounding to bf16, to nearest even
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + m * ldy + nb * 16), (__m256i)_mm512_cvtneps_pbh(out[m]));
}

using TileFn = void (*)(const uint16_t*, int64_t, const float*, int64_t, const uint8_t*, const uint16_t*, int64_t,
                        int64_t, int64_t, uint16_t*, int64_t);
constexpr TileFn kInt4Tiles[kTile + 1] = {nullptr,        int4_tile<1>, int4_tile<2>, int4_tile<3>, int4_tile<4>,
                                          int4_tile<5>, int4_tile<6>, int4_tile<7>, int4_tile<8>};

// Dense bf16: rows n0..n0+NB of W [N, K] against MT rows of x, each a dot product over K in 32-wide
// chunks (the K % 32 tail by masked loads), then one fixed horizontal sum.
template <int NB, int MT>
void bf16_tile(const uint16_t* x, int64_t K, const uint16_t* W, int64_t n0, at::BFloat16* y, int64_t ldy) {
  __m512 acc[NB][MT];
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MT; ++m) acc[i][m] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_loadu_si512(x + m * K + k);
    for (int i = 0; i < NB; ++i) {
      const __m512i wv = _mm512_loadu_si512(W + (n0 + i) * K + k);
      for (int m = 0; m < MT; ++m)
        acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)wv, (__m512bh)xv[m]);
    }
  }
  if (k < K) {
    const __mmask32 mask = (1u << (K - k)) - 1u;
    __m512i xv[MT];
    for (int m = 0; m < MT; ++m) xv[m] = _mm512_maskz_loadu_epi16(mask, x + m * K + k);
    for (int i = 0; i < NB; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi16(mask, W + (n0 + i) * K + k);
      for (int m = 0; m < MT; ++m)
        acc[i][m] = _mm512_dpbf16_ps(acc[i][m], (__m512bh)wv, (__m512bh)xv[m]);
    }
  }
  for (int i = 0; i < NB; ++i)
    for (int m = 0; m < MT; ++m) y[m * ldy + n0 + i] = at::BFloat16(_mm512_reduce_add_ps(acc[i][m]));
}

constexpr int kDenseRows = 4;  // outputs per pass: 4 independent accumulation chains per row of x

template <int MT>
void bf16_rows(const uint16_t* x, int64_t K, const uint16_t* W, int64_t n_begin, int64_t n_end, at::BFloat16* y,
               int64_t ldy) {
  int64_t n = n_begin;
  for (; n + kDenseRows <= n_end; n += kDenseRows) bf16_tile<kDenseRows, MT>(x, K, W, n, y, ldy);
  for (; n < n_end; ++n) bf16_tile<1, MT>(x, K, W, n, y, ldy);
}

using DenseFn = void (*)(const uint16_t*, int64_t, const uint16_t*, int64_t, int64_t, at::BFloat16*, int64_t);
constexpr int kDenseTile = 4;
constexpr DenseFn kDenseTiles[kDenseTile + 1] = {nullptr, bf16_rows<1>, bf16_rows<2>, bf16_rows<3>, bf16_rows<4>};

}  // namespace

#endif  // LLMSLIM_AVX512BF16

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_zeros, int64_t kg) {
  TORCH_CHECK(int4_matmul_available(), "llmslim's int4 kernel needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  TORCH_CHECK(w.dim() == 3 && w.scalar_type() == at::kByte && w.size(2) == 16 && w.is_contiguous(),
              "w: uint8 [N / 16, K / 2, 16]");
  const int64_t M = x.size(0), Kp = x.size(1), Np = w.size(0) * 16;
  TORCH_CHECK(w.size(1) * 2 == Kp, "x has ", Kp, " columns, the weight ", w.size(1) * 2);
  TORCH_CHECK(kg >= 2 && kg % 2 == 0 && Kp % kg == 0, "the group size must be even and divide K");
  const int64_t ng = Kp / kg;
  TORCH_CHECK(scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous() &&
                  scale_zeros.dim() == 3 && scale_zeros.size(0) == ng && scale_zeros.size(1) == Np &&
                  scale_zeros.size(2) == 2,
              "scale_zeros: contiguous bf16 [K / group, N, 2]");
  auto y = at::empty({M, Np}, x.options());
#ifdef LLMSLIM_AVX512BF16
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  // Each row's group sums of x, in column order: part of the result, so fixed per row.
  std::vector<float> xsum(M * ng);
  for (int64_t m = 0; m < M; ++m) {
    const at::BFloat16* row = x.data_ptr<at::BFloat16>() + m * Kp;
    for (int64_t t = 0; t < ng; ++t) {
      float s = 0.f;
      for (int64_t k = t * kg; k < (t + 1) * kg; ++k) s += static_cast<float>(row[k]);
      xsum[m * ng + t] = s;
    }
  }
  const uint8_t* wp = w.data_ptr<uint8_t>();
  const uint16_t* szp = reinterpret_cast<const uint16_t*>(scale_zeros.data_ptr<at::BFloat16>());
  uint16_t* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
  at::parallel_for(0, Np / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb) {
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int64_t mt = std::min<int64_t>(kTile, M - m0);
        kInt4Tiles[mt](xp + m0 * Kp, Kp, xsum.data() + m0 * ng, ng, wp, szp, Np, nb, kg, yp + m0 * Np, Np);
      }
    }
  });
#endif
  return y;
}

at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(int4_matmul_available(), "llmslim's bf16 kernel needs a CPU with AVX512-BF16");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16 && weight.is_contiguous() &&
                  weight.size(1) == x.size(1),
              "weight: contiguous bf16 [N, K] with K = x's columns");
  const int64_t M = x.size(0), N = weight.size(0);
  [[maybe_unused]] const int64_t K = x.size(1);
  auto y = at::empty({M, N}, x.options());
#ifdef LLMSLIM_AVX512BF16
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(weight.data_ptr<at::BFloat16>());
  at::BFloat16* yp = y.data_ptr<at::BFloat16>();
  // Split the outputs in blocks of 64 so that thread boundaries never cut a 4-output pass: the
  // result does not depend on the thread count.
  const int64_t blocks = (N + 63) / 64;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {  // a block's 64 rows of W stay in cache for every row of x
      const int64_t n0 = b * 64, n1 = std::min(N, n0 + 64);
      for (int64_t m0 = 0; m0 < M; m0 += kDenseTile) {
        const int64_t mt = std::min<int64_t>(kDenseTile, M - m0);
        kDenseTiles[mt](xp + m0 * K, K, wp, n0, n1, yp + m0 * N, N);
      }
    }
  });
#endif
  return y;
}

}  // namespace llmslim
