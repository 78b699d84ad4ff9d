// The output head as 8-bit codes in blocks of 32 inputs, each block with its own fp32 scale: the
// Q8_0 idea of llama.cpp (which stores the head of a Q4_0 model so), with the scale in fp32 rather
// than fp16 so that no block of tiny weights falls into fp16's subnormals.
//
// Why: at batch 1 the head is the largest matrix read per token (SmolLM2-135M: 49152 x 576, a fifth
// of the model); bf16 reads 2 bytes a weight, this 1 + 1/8. Why not torch's `_weight_int8pack_mm`:
// it takes one scale per output row, and per-row int8 doubled the KL that bf16 costs
// (eval/inference.md); 32-wide blocks keep the head within bf16's own error.
//
// Layout (`pack_q8` in kernels.py): codes q in [-127, 127], w = q * s. Bytes are grouped by 16
// outputs and pairs of inputs, w[n / 16][k / 2][n % 16][k % 2], scales s[n / 16][k / 32][n % 16].
// A pair of codes becomes one fp32 lane holding the bf16 pair (q[n,k], q[n,k+1]) -- exact, |q| < 2^8
// -- and VDPBF16PS multiplies it by x's pair (x[k], x[k+1]); each block's sum is scaled once. Every
// output is computed by one thread in an order that depends only on its own row of x: batch
// invariant by construction. The logits come out in fp32 (a bf16 logit near 20 is off by up to 1/16).
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LLMSLIM_AVX512BF16 1
#endif

namespace llmslim {

#ifdef LLMSLIM_AVX512BF16

namespace {

constexpr int kTile = 8;     // rows of x per pass over a weight tile (8 block sums + 8 outputs in zmm registers)
constexpr int kBlock = 32;   // inputs per scale

// Rows 0..MT of y for the 16 outputs of tile nb.
template <int MT>
void q8_tile(const uint16_t* x, int64_t K, const int8_t* w, const float* s, int64_t nb, float* y, int64_t ldy) {
  const int8_t* wb = w + nb * K * 16;
  const float* sb = s + nb * (K / kBlock) * 16;
  __m512 out[MT];
  for (int m = 0; m < MT; ++m) out[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < K / kBlock; ++b) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t j = 0; j < kBlock / 2; ++j) {
      const int8_t* p = wb + (b * kBlock / 2 + j) * 32;  // 16 outputs x (k, k + 1)
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
      const __m512 hi =
          _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 16))));
      const __m512bh wv = _mm512_cvtne2ps_pbh(hi, lo);  // lane i: outputs 0..7 from lo, 8..15 from hi
      const int64_t k = b * kBlock + 2 * j;
      for (int m = 0; m < MT; ++m) {
        int32_t pair;
        std::memcpy(&pair, x + m * K + k, sizeof(pair));
        acc[m] = _mm512_dpbf16_ps(acc[m], wv, (__m512bh)_mm512_set1_epi32(pair));
      }
    }
    const __m512 sv = _mm512_loadu_ps(sb + b * 16);
    for (int m = 0; m < MT; ++m) out[m] = _mm512_fmadd_ps(sv, acc[m], out[m]);
  }
  for (int m = 0; m < MT; ++m) _mm512_storeu_ps(y + m * ldy + nb * 16, out[m]);
}

using TileFn = void (*)(const uint16_t*, int64_t, const int8_t*, const float*, int64_t, float*, int64_t);
constexpr TileFn kTiles[kTile + 1] = {nullptr,    q8_tile<1>, q8_tile<2>, q8_tile<3>, q8_tile<4>,
                                      q8_tile<5>, q8_tile<6>, q8_tile<7>, q8_tile<8>};

}  // namespace

#endif  // LLMSLIM_AVX512BF16

at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales) {
#ifndef LLMSLIM_AVX512BF16
  TORCH_CHECK(false, "llmslim's q8 kernel needs a CPU with AVX512-BF16");
#endif
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(), "x: contiguous bf16 [M, K]");
  TORCH_CHECK(w.dim() == 4 && w.scalar_type() == at::kChar && w.size(2) == 16 && w.size(3) == 2 && w.is_contiguous(),
              "w: int8 [N / 16, K / 2, 16, 2]");
  const int64_t M = x.size(0), K = x.size(1), tiles = w.size(0);
  TORCH_CHECK(w.size(1) * 2 == K && K % 32 == 0, "x has ", K, " columns, the weight ", w.size(1) * 2,
              " (a multiple of 32)");
  TORCH_CHECK(scales.scalar_type() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 &&
                  scales.size(0) == tiles && scales.size(1) == K / 32 && scales.size(2) == 16,
              "scales: contiguous fp32 [N / 16, K / 32, 16]");
  auto y = at::empty({M, tiles * 16}, x.options().dtype(at::kFloat));
#ifdef LLMSLIM_AVX512BF16
  const uint16_t* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const int8_t* wp = w.data_ptr<int8_t>();
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t N = tiles * 16;
  at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
    for (int64_t nb = begin; nb < end; ++nb)
      for (int64_t m0 = 0; m0 < M; m0 += kTile) {
        const int64_t mt = std::min<int64_t>(kTile, M - m0);
        kTiles[mt](xp + m0 * K, K, wp, sp, nb, yp + m0 * N, N);
      }
  });
#endif
  return y;
}

}  // namespace llmslim
