// The Python module of llmslim's C++ kernels (runtime/ext.py builds it from every .cpp here).
#include <torch/extension.h>

namespace llmslim {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            int64_t window, double scale, double softcap);
bool int4_matmul_available();
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_zeros, int64_t kg);
at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight);
}  // namespace llmslim

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &llmslim::decode_attention,
        "one query per row against that row's own last keys (batch-invariant)");
  m.def("int4_matmul_available", &llmslim::int4_matmul_available,
        "whether int4_matmul and bf16_matmul were built (AVX512-BF16)");
  m.def("int4_matmul", &llmslim::int4_matmul, "x [M, K] bf16 @ int4 weight (pack_int4 layout) -> [M, N] bf16");
  m.def("bf16_matmul", &llmslim::bf16_matmul, "x [M, K] bf16 @ weight [N, K] bf16 ^T -> [M, N] bf16");
}
