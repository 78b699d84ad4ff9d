// One new token per row attending to that row's own cached keys: the decode step's attention
// over ragged rows, in one call per layer, batch-invariant by construction.
//
// Row b's keys/values are the last lengths[b] columns of k/v [B, KV, C, D] (the server's
// left-padded batch keeps each row's columns right-aligned; a batch-1 cache is one row whose
// length is C), further cut to the last `window` of them for a sliding-window layer. Every
// (row, kv head) is computed by one thread, start to end, in a fixed order that depends only on
// that row's own length: its result is the same bits whatever else is in the batch, however
// long the other rows are and however many threads run (what vLLM's batch-invariant mode asks of
// its kernels). Nothing reads a padding column, so no mask is needed.
//
// Arithmetic: scores q.k in float32 over D in 16 fixed lanes then a fixed sum of the lanes,
// optional soft-capping tanh(s / cap) * cap (Gemma 2), a softmax in float32 (max subtracted),
// and the weighted sum of values in float32; the output is rounded once to the input dtype.
// On CPUs with AVX512-BF16, bf16 inputs with D a multiple of 32 take the same steps in vector
// instructions: q.k by VDPBF16PS (bf16 products are exact in float32) then the scale, values
// widened to float32 16 at a time.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define LLMSLIM_AVX512BF16 1
#endif

namespace llmslim {
namespace {

constexpr int kLanes = 16;

template <typename T>
inline float dot(const float* q, const T* k, int64_t D) {
  float part[kLanes] = {0.f};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    for (int l = 0; l < kLanes; ++l) part[l] += q[d + l] * static_cast<float>(k[d + l]);
  }
  for (int l = 0; d < D; ++d, ++l) part[l] += q[d] * static_cast<float>(k[d]);
  float s = 0.f;
  for (int l = 0; l < kLanes; ++l) s += part[l];
  return s;
}

// exp(x) for x <= 0 (scores minus their max), as Cephes' expf: x = n ln2 + r, a degree-6
// polynomial for exp(r), 2^n by the exponent bits. Within ~2 ulp of expf, and plain arithmetic,
// so the loop over columns vectorizes (a libm call would not).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);  // exp(-87) ~ 1.6e-38: still a normal float; anything smaller is ~0 anyway
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return y * scale;
}

#ifdef LLMSLIM_AVX512BF16
// q.k of one bf16 query and one bf16 key, D a multiple of 32: exact products summed in float32
// over 16 lanes (pairs), then one fixed horizontal sum.
inline float dot_bf16(const at::BFloat16* q, const at::BFloat16* k, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  for (int64_t d = 0; d < D; d += 32)
    acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(q + d), (__m512bh)_mm512_loadu_si512(k + d));
  return _mm512_reduce_add_ps(acc);
}

// a[0:D] += w * v[0:D] with v bf16 widened to float32, D a multiple of 16.
inline void axpy_bf16(float* a, float w, const at::BFloat16* v, int64_t D) {
  const __m512 wv = _mm512_set1_ps(w);
  for (int64_t d = 0; d < D; d += 16) {
    const __m512i h = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + d)));
    const __m512 vf = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
    _mm512_storeu_ps(a + d, _mm512_fmadd_ps(wv, vf, _mm512_loadu_ps(a + d)));
  }
}
#endif

template <typename T>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const int64_t* lengths,
            int64_t window, float scale, float cap, at::Tensor& out) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t KV = k.size(1), C = k.size(2), group = H / KV;
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), ks2 = k.stride(2);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1), vs2 = v.stride(2);

#ifdef LLMSLIM_AVX512BF16
  const bool vector_path = std::is_same_v<T, at::BFloat16> && D % 32 == 0;
#endif
  // A task: one row, one KV head, and a share of its query heads. Each query head is computed by
  // itself, so how the group is shared out changes nothing in the result; it is split only when
  // there are too few (row, KV head) pairs to keep every thread busy (batch 1: 3 pairs, 2 threads).
  int64_t split = 1;
  while (split < group && B * KV * split < 4 * at::get_num_threads()) ++split;
  at::parallel_for(0, B * KV * split, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(group * D), acc(group * D), p;
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / (KV * split), g = task / split % KV, part = task % split;
      const int64_t j0 = part * group / split, gj = (part + 1) * group / split - j0;  // query heads j0..j0+gj
      int64_t n = std::min(lengths[b], C);
      if (window > 0) n = std::min(n, window);
      const int64_t start = C - n;
      p.assign(gj * n, 0.f);
      const T* kb = kp + b * ks0 + g * ks1 + start * ks2;
      const T* qb = qp + b * qs0 + (g * group + j0) * qs1;
      bool done = false;
#ifdef LLMSLIM_AVX512BF16
      if constexpr (std::is_same_v<T, at::BFloat16>) {
        if (vector_path) {
          for (int64_t c = 0; c < n; ++c) {
            for (int64_t j = 0; j < gj; ++j) p[j * n + c] = dot_bf16(qb + j * qs1, kb + c * ks2, D) * scale;
          }
          done = true;
        }
      }
#endif
      if (!done) {
        for (int64_t j = 0; j < gj; ++j) {
          for (int64_t d = 0; d < D; ++d) qf[j * D + d] = static_cast<float>(qb[j * qs1 + d]) * scale;
        }
        for (int64_t c = 0; c < n; ++c) {  // each key read once for the whole group of query heads
          for (int64_t j = 0; j < gj; ++j) p[j * n + c] = dot(qf.data() + j * D, kb + c * ks2, D);
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const T* vb = vp + b * vs0 + g * vs1 + start * vs2;
      for (int64_t j = 0; j < gj; ++j) {
        float* s = p.data() + j * n;
        if (cap > 0.f) {
          for (int64_t c = 0; c < n; ++c) s[c] = std::tanh(s[c] / cap) * cap;
        }
        float m = s[0];
        for (int64_t c = 1; c < n; ++c) m = std::max(m, s[c]);
        for (int64_t c = 0; c < n; ++c) s[c] = exp_nonpositive(s[c] - m);
        float total = 0.f;
        for (int64_t c = 0; c < n; ++c) total += s[c];
        float* a = acc.data() + j * D;
        bool summed = false;
#ifdef LLMSLIM_AVX512BF16
        if constexpr (std::is_same_v<T, at::BFloat16>) {
          if (vector_path) {
            for (int64_t c = 0; c < n; ++c) axpy_bf16(a, s[c], vb + c * vs2, D);
            summed = true;
          }
        }
#endif
        if (!summed) {
          for (int64_t c = 0; c < n; ++c) {
            const T* vr = vb + c * vs2;
            const float w = s[c];
            for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<float>(vr[d]);
          }
        }
        const float inv = 1.f / total;
        T* dst = op + (b * H + g * group + j0 + j) * D;
        for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(a[d] * inv);
      }
    }
  });
}

}  // namespace

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            int64_t window, double scale, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 4 && v.dim() == 4, "q [B, H, D], k/v [B, KV, C, D]");
  TORCH_CHECK(k.sizes() == v.sizes(), "k and v differ in shape");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(2) == k.size(3), "q and k disagree on rows or head size");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && k.scalar_type() == v.scalar_type(), "q, k, v differ in dtype");
  TORCH_CHECK(q.stride(2) == 1 && k.stride(3) == 1 && v.stride(3) == 1, "the head dimension must be contiguous");
  TORCH_CHECK(lengths.scalar_type() == at::kLong && lengths.numel() == q.size(0) && lengths.is_contiguous(),
              "lengths: int64 [B]");
  TORCH_CHECK(k.size(2) > 0, "no cached keys");
  const int64_t* len = lengths.data_ptr<int64_t>();
  for (int64_t b = 0; b < q.size(0); ++b) TORCH_CHECK(len[b] >= 1, "every row attends to at least one key");
  auto out = at::empty({q.size(0), q.size(1), q.size(2)}, q.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "decode_attention", [&] {
    attend<scalar_t>(q, k, v, len, window, static_cast<float>(scale), static_cast<float>(softcap), out);
  });
  return out;
}

}  // namespace llmslim
