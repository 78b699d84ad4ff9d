// One decode step through every layer of a decoder in one call: for M rows (one new token each),
// norm -> q/k/v (-> q/k norms) -> rotary -> write k/v into the cache -> attention -> o (-> norm)
// -> add + norm -> gate/up -> silu or gelu * up -> down (-> norm), per layer, making the same calls
// that runtime/lean.py makes one by one from Python.
//
// Why: at batch 1 on SmolLM2-135M the kernels of a step take ~6 ms and the Python around them
// (~10 calls a layer, each with its slicing, views and allocations) ~3 ms more: a third of the
// step (eval/inference.md). Here those calls cost what a C++ call costs. The arithmetic is the
// same calls on the same tensors in the same order as the Python path, so the result is the same
// bit for bit (tests/runtime/test_decode_step.py); runtime/step.py builds it only where every piece
// of every layer is one of these calls, else lean.py runs its own loop.
#include <torch/extension.h>

#include <vector>

namespace llmslim {

at::Tensor int4_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale_zeros, int64_t kg);
at::Tensor bf16_matmul(const at::Tensor& x, const at::Tensor& weight);
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool gemma,
                                 const c10::optional<at::Tensor>& residual);
at::Tensor rope(const at::Tensor& qk, const at::Tensor& cos, const at::Tensor& sin);
at::Tensor silu_mul(const at::Tensor& gu, int64_t inter);
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& lengths,
                            int64_t window, double scale, double softcap);

// A projection: llmslim's int4 kernel (`w` packed, `sz` scale/zeros, group `kg`) or its bf16 one
// (`w` [N, K]), plus an optional bias added in the output dtype (as Int4Linear.forward adds it).
struct Proj {
  at::Tensor w, sz;
  int64_t kg;  // 0: bf16_matmul
  c10::optional<at::Tensor> bias;

  at::Tensor operator()(const at::Tensor& x) const {
    at::Tensor y = kg ? int4_matmul(x, w, sz, kg) : bf16_matmul(x, w);
    return bias.has_value() ? y + *bias : y;
  }
};

struct Layer {
  at::Tensor norm_in, norm_mlp;  // RMSNorm weights, 1-D, the compute dtype
  double eps;
  Proj qkv, o, gate_up, down;
  int64_t inter, window, rope;  // window 0: full attention; rope: which cos/sin table
  bool gelu;                          // GELU (tanh) x up instead of SiLU x up (Gemma)
  c10::optional<at::Tensor> qk_norm;  // Qwen3, Gemma 3: RMSNorm of q and k per head, [heads + kv_heads, d]
  double qk_eps;
  c10::optional<at::Tensor> post_attn, post_mlp;  // Gemma 2/3: norms of the attention output and the MLP's
  double post_eps;
};

// lean._Norm's torch ops: Llama's w * rms_norm(x in fp32).to(dtype); Gemma's (rms_norm(...) * w).to(dtype)
// with w = 1 + weight in fp32 (made once in Python).
at::Tensor torch_norm(const at::Tensor& x, const at::Tensor& w, double eps, bool gemma) {
  const at::Tensor y = at::rms_norm(x.to(at::kFloat), {x.size(-1)}, c10::nullopt, eps);
  return gemma ? (y * w).to(x.scalar_type()) : w * y.to(x.scalar_type());
}

class DecodeStep {
 public:
  DecodeStep(std::vector<Layer> layers, int64_t heads, int64_t kv_heads, int64_t head_dim, double scale,
             double softcap, bool gemma)
      : layers_(std::move(layers)), nh_(heads), nkv_(kv_heads), d_(head_dim), scale_(scale), cap_(softcap),
        gemma_(gemma) {}

  // x [M, hidden] (the embedded tokens); cos/sin [M, r] per rotary table (sin sign-folded, as
  // lean._rope makes them); lengths [M]: each row's keys after this token. The caches: per layer
  // buffers [R >= M, kv, C, d] whose rows 0..M write column `col` and attend to columns
  // start..col (each row to its last `lengths` of them). -> the residual stream after the last layer.
  at::Tensor operator()(at::Tensor x, const std::vector<at::Tensor>& cos, const std::vector<at::Tensor>& sin,
                        const at::Tensor& lengths, const std::vector<at::Tensor>& k_cache,
                        const std::vector<at::Tensor>& v_cache, int64_t start, int64_t col) const {
    TORCH_CHECK(k_cache.size() == layers_.size() && v_cache.size() == layers_.size(), "one cache per layer");
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x: contiguous [M, hidden]");
    TORCH_CHECK(cos.size() == sin.size(), "cos and sin tables differ in number");
    const int64_t M = x.size(0), nqk = (nh_ + nkv_) * d_;
    c10::optional<at::Tensor> m;  // the last MLP's output, added together with the next norm
    for (size_t i = 0; i < layers_.size(); ++i) {
      const Layer& b = layers_[i];
      TORCH_CHECK(b.rope >= 0 && b.rope < static_cast<int64_t>(cos.size()), "no such rotary table");
      auto hx = rms_norm(x, b.norm_in, b.eps, gemma_, m);
      x = hx[1];
      const at::Tensor qkv = b.qkv(hx[0]);
      at::Tensor qk = qkv.narrow(1, 0, nqk).view({M, nh_ + nkv_, d_});
      if (b.qk_norm.has_value()) qk = torch_norm(qk, *b.qk_norm, b.qk_eps, gemma_);
      qk = rope(qk, cos[b.rope], sin[b.rope]);
      const at::Tensor k = k_cache[i].narrow(0, 0, M), v = v_cache[i].narrow(0, 0, M);
      k.select(2, col).copy_(qk.narrow(1, nh_, nkv_));
      v.select(2, col).copy_(qkv.narrow(1, nqk, nkv_ * d_).view({M, nkv_, d_}));
      const at::Tensor a = decode_attention(qk.narrow(1, 0, nh_), k.narrow(2, start, col + 1 - start),
                                            v.narrow(2, start, col + 1 - start), lengths, b.window, scale_, cap_);
      at::Tensor o = b.o(a.view({M, nh_ * d_}));
      if (b.post_attn.has_value()) o = torch_norm(o, *b.post_attn, b.post_eps, gemma_);
      auto hx2 = rms_norm(x, b.norm_mlp, b.eps, gemma_, o);
      x = hx2[1];
      const at::Tensor gu = b.gate_up(hx2[0]);
      m = b.down(b.gelu ? at::gelu(gu.narrow(1, 0, b.inter), "tanh") * gu.narrow(1, b.inter, b.inter)
                        : silu_mul(gu, b.inter));
      if (b.post_mlp.has_value()) m = torch_norm(*m, *b.post_mlp, b.post_eps, gemma_);
    }
    return m.has_value() ? x + *m : x;
  }

 private:
  std::vector<Layer> layers_;
  int64_t nh_, nkv_, d_;
  double scale_, cap_;
  bool gemma_;
};

void bind_decode_step(pybind11::module& m) {
  namespace py = pybind11;
  py::class_<Proj>(m, "Proj", "a projection of DecodeStep: int4_matmul (kg > 0) or bf16_matmul (kg = 0)")
      .def(py::init<at::Tensor, at::Tensor, int64_t, c10::optional<at::Tensor>>(), py::arg("w"), py::arg("sz"),
           py::arg("kg"), py::arg("bias") = py::none());
  py::class_<Layer>(m, "Layer", "one decoder layer of DecodeStep")
      .def(py::init<at::Tensor, at::Tensor, double, Proj, Proj, Proj, Proj, int64_t, int64_t, int64_t, bool,
                    c10::optional<at::Tensor>, double, c10::optional<at::Tensor>, c10::optional<at::Tensor>, double>(),
           py::arg("norm_in"), py::arg("norm_mlp"), py::arg("eps"), py::arg("qkv"), py::arg("o"), py::arg("gate_up"),
           py::arg("down"), py::arg("inter"), py::arg("window"), py::arg("rope"), py::arg("gelu") = false,
           py::arg("qk_norm") = py::none(), py::arg("qk_eps") = 0.0, py::arg("post_attn") = py::none(),
           py::arg("post_mlp") = py::none(), py::arg("post_eps") = 0.0);
  py::class_<DecodeStep>(m, "DecodeStep", "every layer of a decode step in one call (runtime/lean.py)")
      .def(py::init<std::vector<Layer>, int64_t, int64_t, int64_t, double, double, bool>(), py::arg("layers"),
           py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("scale"), py::arg("softcap"),
           py::arg("gemma"))
      .def("__call__", &DecodeStep::operator(), py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("lengths"),
           py::arg("k_cache"), py::arg("v_cache"), py::arg("start"), py::arg("col"),
           py::call_guard<py::gil_scoped_release>());
}

}  // namespace llmslim
