// A Llama-family decoder's layers in one call from Python (CPU).
//
// Why: at batch 1 every layer is ~9 native kernel calls, and reaching each
// one from the model's modules (module call, linear method, kernel wrapper,
// argument conversion) costs ~10 µs: on the small demo model ~1.4 ms of a
// ~8 ms decode step, with the second OpenMP thread idle throughout. Here the
// same kernels (dispatch.cpp) run back to back from C++ in the modules'
// order, with the modules' roundings, so the result is bit-identical to the
// Python path (model_executor/cpu_decoder_stack.py decides when it applies).
//
// Per layer, as model_executor/models/blocks.py's DecoderLayer:
//   residual += hidden; hidden = rms_norm(residual)        (layer 0: no add)
//   q = qk_norm_rope_store(qkv_proj(hidden))                (K/V into the cache)
//   hidden = o_proj(paged_attention(q))
//   residual += hidden; hidden = rms_norm(residual)
//   hidden = down_proj(silu_and_mul(gate_up_proj(hidden)))

#include <pybind11/stl.h>
#include <torch/extension.h>

#include <tuple>
#include <vector>

#include "dispatch.h"

namespace radixserve {

// One projection as a native kernel runs it: the streaming bf16 GEMM
// (bits 16) or the weight-only int GEMM (bits 8 / 4).
struct NativeLinear {
  torch::Tensor packed;
  int64_t out_features = 0;
  int64_t bits = 16;
  int64_t group_size = 0;
  bool has_offset = false;
  int64_t amx_min_rows = 0;

  // A column-parallel layer hands its bias to the kernel (added in fp32
  // before rounding); a row-parallel one adds it afterwards in bf16, as the
  // modules do (RowParallelLinear.forward).
  torch::Tensor operator()(const torch::Tensor& x, const c10::optional<torch::Tensor>& bias, int64_t isa) const {
    if (bits == 16) return bf16_linear(x, packed, bias, out_features, isa);
    return int_linear(x, packed, bias, out_features, group_size, bits, has_offset, amx_min_rows, isa);
  }
};

struct DecoderLayerWeights {
  torch::Tensor input_norm, post_norm;
  c10::optional<torch::Tensor> q_norm, k_norm;  // Qwen3's per-head norms, or none
  NativeLinear qkv, o, gate_up, down;
  c10::optional<torch::Tensor> qkv_bias, o_bias, gate_up_bias, down_bias;
  double norm_eps = 1e-6;
  double qk_norm_eps = 0.0;
};

class DecoderStack {
 public:
  DecoderStack(std::vector<DecoderLayerWeights> layers, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
               double scale)
      : layers_(std::move(layers)), heads_(num_heads), kv_heads_(num_kv_heads), head_dim_(head_dim), scale_(scale) {
    TORCH_CHECK(!layers_.empty(), "a decoder stack needs layers");
  }

  // hidden [T, H] bf16 (the embeddings; updated in place as layer 0's
  // residual, as in the modules); cos / signed_sin [T, D]; slots [T] the
  // step's KV slots; k_caches / v_caches one [slots, Hkv, D] buffer per
  // layer; the attention metadata as layers/attention/cpu_backend.py keeps
  // it. Returns (hidden, residual) after the last layer, before the final norm.
  std::tuple<torch::Tensor, torch::Tensor> forward(
      torch::Tensor hidden, const torch::Tensor& cos, const torch::Tensor& signed_sin, const torch::Tensor& slots,
      const std::vector<torch::Tensor>& k_caches, const std::vector<torch::Tensor>& v_caches,
      const torch::Tensor& req_to_token, const torch::Tensor& rows, const torch::Tensor& prefix_lens,
      const torch::Tensor& extend_lens, int64_t isa) const {
    TORCH_CHECK(k_caches.size() == layers_.size() && v_caches.size() == layers_.size(),
                "one K and one V cache per layer");
    const int64_t tokens = hidden.size(0);
    torch::Tensor residual;
    for (size_t i = 0; i < layers_.size(); ++i) {
      const DecoderLayerWeights& layer = layers_[i];
      if (i == 0) {
        residual = hidden;
        hidden = rms_norm_bf16(hidden, c10::nullopt, layer.input_norm, layer.norm_eps, isa);
      } else {
        hidden = rms_norm_bf16(hidden, residual, layer.input_norm, layer.norm_eps, isa);
      }
      hidden = attention(layer, hidden, cos, signed_sin, slots, k_caches[i], v_caches[i], req_to_token, rows,
                         prefix_lens, extend_lens, tokens, isa);
      hidden = rms_norm_bf16(hidden, residual, layer.post_norm, layer.norm_eps, isa);
      const auto act = silu_and_mul_bf16(layer.gate_up(hidden, layer.gate_up_bias, isa), isa);
      hidden = layer.down(act, c10::nullopt, isa);
      if (layer.down_bias.has_value()) hidden = hidden + *layer.down_bias;
    }
    return {hidden, residual};
  }

 private:
  torch::Tensor attention(const DecoderLayerWeights& layer, const torch::Tensor& hidden, const torch::Tensor& cos,
                          const torch::Tensor& signed_sin, const torch::Tensor& slots, const torch::Tensor& k_cache,
                          const torch::Tensor& v_cache, const torch::Tensor& req_to_token, const torch::Tensor& rows,
                          const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens, int64_t tokens,
                          int64_t isa) const {
    const auto qkv = layer.qkv(hidden, layer.qkv_bias, isa);
    auto k_heads = k_cache.view({k_cache.size(0), kv_heads_, head_dim_});
    auto v_heads = v_cache.view({v_cache.size(0), kv_heads_, head_dim_});
    const auto q = qk_norm_rope_store(qkv, layer.q_norm, layer.k_norm, layer.qk_norm_eps, cos, signed_sin, k_heads,
                                      v_heads, slots, heads_, kv_heads_, isa);
    const auto queries = q.view({tokens, heads_, head_dim_});
    auto out = torch::empty_like(queries);
    paged_attention(queries, k_cache, v_cache, req_to_token, rows, prefix_lens, extend_lens, scale_, out, isa);
    auto projected = layer.o(out.view({tokens, heads_ * head_dim_}), c10::nullopt, isa);
    if (layer.o_bias.has_value()) projected = projected + *layer.o_bias;
    return projected;
  }

  std::vector<DecoderLayerWeights> layers_;
  int64_t heads_, kv_heads_, head_dim_;
  double scale_;
};

void bind_decoder_stack(pybind11::module_& m) {
  namespace py = pybind11;
  py::class_<NativeLinear>(m, "NativeLinear", "one projection as a native kernel runs it (bits 16: bf16; 8 / 4: int)")
      .def(py::init([](torch::Tensor packed, int64_t out_features, int64_t bits, int64_t group_size, bool has_offset,
                       int64_t amx_min_rows) {
             TORCH_CHECK(bits == 16 || bits == 8 || bits == 4, "bits must be 16, 8 or 4, not ", bits);
             return NativeLinear{std::move(packed), out_features, bits, group_size, has_offset, amx_min_rows};
           }),
           py::arg("packed"), py::arg("out_features"), py::arg("bits"), py::arg("group_size") = 0,
           py::arg("has_offset") = false, py::arg("amx_min_rows") = 0);
  py::class_<DecoderLayerWeights>(m, "DecoderLayerWeights", "one decoder layer's weights for DecoderStack")
      .def(py::init([](torch::Tensor input_norm, torch::Tensor post_norm, c10::optional<torch::Tensor> q_norm,
                       c10::optional<torch::Tensor> k_norm, NativeLinear qkv, NativeLinear o, NativeLinear gate_up,
                       NativeLinear down, c10::optional<torch::Tensor> qkv_bias, c10::optional<torch::Tensor> o_bias,
                       c10::optional<torch::Tensor> gate_up_bias, c10::optional<torch::Tensor> down_bias,
                       double norm_eps, double qk_norm_eps) {
             return DecoderLayerWeights{std::move(input_norm), std::move(post_norm), std::move(q_norm),
                                        std::move(k_norm), std::move(qkv), std::move(o), std::move(gate_up),
                                        std::move(down), std::move(qkv_bias), std::move(o_bias),
                                        std::move(gate_up_bias), std::move(down_bias), norm_eps, qk_norm_eps};
           }),
           py::arg("input_norm"), py::arg("post_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("qkv"),
           py::arg("o"), py::arg("gate_up"), py::arg("down"), py::arg("qkv_bias"), py::arg("o_bias"),
           py::arg("gate_up_bias"), py::arg("down_bias"), py::arg("norm_eps"), py::arg("qk_norm_eps"));
  py::class_<DecoderStack>(m, "DecoderStack", "a Llama-family decoder's layers, run from C++ (decoder_stack.cpp)")
      .def(py::init<std::vector<DecoderLayerWeights>, int64_t, int64_t, int64_t, double>(), py::arg("layers"),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("scale"))
      // No Python objects are touched inside: other threads (the scheduler's
      // receivers) run meanwhile.
      .def("forward", &DecoderStack::forward, py::call_guard<py::gil_scoped_release>(), py::arg("hidden"),
           py::arg("cos"), py::arg("signed_sin"), py::arg("slots"), py::arg("k_caches"), py::arg("v_caches"),
           py::arg("req_to_token"), py::arg("rows"), py::arg("prefix_lens"), py::arg("extend_lens"),
           py::arg("isa"));
}

}  // namespace radixserve
