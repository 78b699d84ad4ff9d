// The Python module of llmslim's C++ kernels (runtime/ext.py builds it from every .cpp here).
#include <torch/extension.h>

namespace llmslim {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            int64_t window, double scale, double softcap);
bool int4_matmul_available();
at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_zeros, int64_t kg);
at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight);
at::Tensor q8_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scales);
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma,
                                 const c10::optional<at::Tensor>& residual);
at::Tensor rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gu, int64_t inter);
at::Tensor argmax_rows(const at::Tensor& x);
void bind_decode_step(pybind11::module& m);
}  // namespace llmslim

// Every kernel runs without the GIL, as torch's own ops do: the server's HTTP thread keeps
// streaming while the engine thread computes (they only touch tensors, never Python objects).
using NoGil = pybind11::call_guard<pybind11::gil_scoped_release>;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("decode_attention", &llmslim::decode_attention,
        "one query per row against that row's own last keys (batch-invariant)", NoGil());
  m.def("int4_matmul_available", &llmslim::int4_matmul_available,
        "whether int4_matmul, bf16_matmul and q8_matmul were built (AVX512-BF16)");
  m.def("int4_matmul", &llmslim::int4_matmul, "x [M, K] bf16 @ int4 weight (pack_int4 layout) -> [M, N] bf16", NoGil());
  m.def("bf16_matmul", &llmslim::bf16_matmul, "x [M, K] bf16 @ weight [N, K] bf16 ^T -> [M, N] bf16", NoGil());
  m.def("q8_matmul", &llmslim::q8_matmul,
        "x [M, K] bf16 @ 8-bit weight in blocks of 32 (pack_q8 layout) -> [M, N] fp32", NoGil());
  m.def("rms_norm", &llmslim::rms_norm, "transformers' RMSNorm (Llama or Gemma), after an optional residual add",
        pybind11::arg("x"), pybind11::arg("weight"), pybind11::arg("eps"), pybind11::arg("gemma"),
        pybind11::arg("residual") = pybind11::none(), NoGil());
  m.def("rope", &llmslim::rope, "rotary embedding of [M, heads, d] by cos / sign-folded sin [M, r]", NoGil());
  m.def("silu_mul", &llmslim::silu_mul, "silu(g) * u of [M, 2 * inter] -> [M, inter]", NoGil());
  llmslim::bind_decode_step(m);  // DecodeStep and its Layer/Proj: classes, so they live with their code
  m.def("argmax_rows", &llmslim::argmax_rows, "torch.argmax(x, -1) of [M, V] (first max; NaN first)", NoGil());
}
