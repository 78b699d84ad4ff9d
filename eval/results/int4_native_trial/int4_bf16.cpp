// Int4 weights x bf16 activations on AVX512-BF16: a GEMV-first kernel for batch-1 decoding.
//
// torch's _weight_int4pack_mm_for_cpu dequantizes every weight to fp32 and multiplies with FMA:
// several instructions per 16 weights, so at batch 1 it is bound by instructions, not memory.
// Here 64 weights take 9: one load and zero-extend, two nibble splits, two table lookups that
// give the bf16 of (q - 8) directly, two activation broadcasts and two vdpbf16ps (each 32 products,
// summed in fp32). The numerics are a bf16 matmul's: bf16 activations, the exact bf16 of each
// weight's (q - 8), fp32 sums, then each group's  scale * sum + zero * sum(x)  in fp32 -- the
// formula of torch's kernel, w = (q - 8) * scale + zero, with its scale_zeros tensor as is.
//
// Layout (pack in llmslim/runtime/kernels.py): output rows in blocks of 16, input columns in steps
// of 4; the 32 bytes of (block b, step t) hold, for row r of the block and j in {0, 1}, byte
// 2r + j = q[r][4t + j] | q[r][4t + 2 + j] << 4. The low nibbles of a step are then, as 32 words,
// the pairs (q[r][4t], q[r][4t + 1]) that vdpbf16ps multiplies with (x[4t], x[4t + 1]) into lane r.
//
// Each output row is computed in the same order whatever the number of rows M in the call (rows
// go in chunks of 4 that share each unpacked step): a row's result never depends on the batch.
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstring>
#include <vector>

namespace {

constexpr int kChunk = 4;  // activation rows that share one unpacked step

inline float bf16_to_float(uint16_t v) {
  uint32_t b = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

void block_rows(const uint8_t* w, const uint16_t* x, const float* xs, const uint16_t* sz, uint16_t* out,
                int64_t rows, int64_t K, int64_t N, int64_t kg, int64_t block, const __m512i T) {
  const int64_t G = K / kg;
  const __m512i low4 = _mm512_set1_epi16(0x0F);
  const __m512i high16 = _mm512_set1_epi32(int32_t(0xFFFF0000u));
  __m512 out16[kChunk];
  for (int m = 0; m < rows; ++m) out16[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512 acc[kChunk];
    for (int m = 0; m < rows; ++m) acc[m] = _mm512_setzero_ps();
    for (int64_t k = g * kg; k < (g + 1) * kg; k += 4) {
      const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k * 8)));
      const __m512bh lo = (__m512bh)_mm512_permutexvar_epi16(_mm512_and_si512(v, low4), T);
      const __m512bh hi = (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(v, 4), T);
      for (int m = 0; m < rows; ++m) {
        const uint16_t* xm = x + m * K + k;
        int32_t x01, x23;
        std::memcpy(&x01, xm, 4);
        std::memcpy(&x23, xm + 2, 4);
        acc[m] = _mm512_dpbf16_ps(acc[m], lo, (__m512bh)_mm512_set1_epi32(x01));
        acc[m] = _mm512_dpbf16_ps(acc[m], hi, (__m512bh)_mm512_set1_epi32(x23));
      }
    }
    // scale_zeros[g, 16 block .. 16 block + 15, 0..1]: 16 (scale, zero) bf16 pairs, 64 bytes.
    const __m512i pairs = _mm512_loadu_si512(sz + (g * N + block * 16) * 2);
    const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
    const __m512 zero = _mm512_castsi512_ps(_mm512_and_si512(pairs, high16));
    for (int m = 0; m < rows; ++m) {
      out16[m] = _mm512_fmadd_ps(acc[m], scale, out16[m]);
      out16[m] = _mm512_fmadd_ps(zero, _mm512_set1_ps(xs[m * G + g]), out16[m]);
    }
  }
  for (int m = 0; m < rows; ++m) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + m * N + block * 16),
                        (__m256i)_mm512_cvtneps_pbh(out16[m]));
  }
}

}  // namespace

// x [M, K] bf16, packed [N/16 * K/4 * 32] uint8, scale_zeros [K/kg, N, 2] bf16 -> [M, N] bf16.
torch::Tensor int4_bf16_mm(const torch::Tensor& x_in, const torch::Tensor& packed, int64_t kg,
                           const torch::Tensor& scale_zeros) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "x: bf16 [M, K]");
  const torch::Tensor x = x_in.contiguous();
  TORCH_CHECK(scale_zeros.dim() == 3 && scale_zeros.scalar_type() == at::kBFloat16 && scale_zeros.is_contiguous(),
              "scale_zeros: contiguous bf16 [K/kg, N, 2]");
  const int64_t M = x.size(0), K = x.size(1), N = scale_zeros.size(1);
  TORCH_CHECK(kg % 4 == 0 && K % kg == 0 && scale_zeros.size(0) == K / kg && N % 16 == 0, "bad shapes");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == N * K / 2, "packed: uint8 [N * K / 2]");
  const int64_t G = K / kg;
  auto out = torch::empty({M, N}, x.options());
  const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
  const auto* szp = reinterpret_cast<const uint16_t*>(scale_zeros.data_ptr<at::BFloat16>());
  const uint8_t* wp = packed.data_ptr<uint8_t>();
  auto* op = reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>());
  // Per row and group, the sum of the activations (fp32, in column order): the zeros' term.
  std::vector<float> xs(M * G);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.f;
      for (int64_t k = g * kg; k < (g + 1) * kg; ++k) s += bf16_to_float(xp[m * K + k]);
      xs[m * G + g] = s;
    }
  alignas(64) uint16_t table[32];
  for (int j = 0; j < 32; ++j) {  // bf16 of (q - 8) for q = 0..15 (exact); the rest is never indexed
    const float f = float((j & 15) - 8);
    uint32_t b;
    std::memcpy(&b, &f, 4);
    table[j] = uint16_t(b >> 16);
  }
  const __m512i T = _mm512_load_si512(table);
  at::parallel_for(0, N / 16, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const uint8_t* w = wp + b * K * 8;  // 16 rows x K columns / 2 per byte
      for (int64_t m0 = 0; m0 < M; m0 += kChunk) {
        const int64_t rows = std::min<int64_t>(kChunk, M - m0);
        block_rows(w, xp + m0 * K, xs.data() + m0 * G, szp, op + m0 * N, rows, K, N, kg, b, T);
      }
    }
  });
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("int4_bf16_mm", &int4_bf16_mm, "int4 weights x bf16 activations (AVX512-BF16)");
}
