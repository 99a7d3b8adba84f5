// The Python module: one binding per kernel; each kernel lives in its own file.

#include <torch/extension.h>

void paged_attention(const torch::Tensor& q, const torch::Tensor& k_cache, const torch::Tensor& v_cache,
                     const torch::Tensor& req_to_token, const torch::Tensor& req_pool_indices,
                     const torch::Tensor& prefix_lens, const torch::Tensor& extend_lens, double scale,
                     torch::Tensor& out);
bool bf16_gemm_supported();
torch::Tensor pack_bf16_weight(const torch::Tensor& weight);
torch::Tensor rms_norm_bf16(const torch::Tensor& x, const c10::optional<torch::Tensor>& residual,
                            const torch::Tensor& weight, double eps);
torch::Tensor bf16_linear(const torch::Tensor& x, const torch::Tensor& packed,
                          const c10::optional<torch::Tensor>& bias, int64_t out_features);
torch::Tensor qk_norm_rope_store(const torch::Tensor& qkv, const c10::optional<torch::Tensor>& q_weight,
                                 const c10::optional<torch::Tensor>& k_weight, double eps,
                                 const torch::Tensor& cos, const torch::Tensor& signed_sin,
                                 torch::Tensor& k_cache, torch::Tensor& v_cache, const torch::Tensor& slots,
                                 int64_t num_heads, int64_t num_kv_heads);
torch::Tensor silu_and_mul_bf16(const torch::Tensor& x);
torch::Tensor moe_experts_bf16(const torch::Tensor& x, const torch::Tensor& topk_ids,
                               const torch::Tensor& topk_weights, const torch::Tensor& w13,
                               const torch::Tensor& w2, int64_t intermediate);
bool int_gemm_supported();
bool int_gemm_amx_supported();
torch::Tensor pack_int_weight(const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t group_size, int64_t bits);
torch::Tensor int_linear(const torch::Tensor& x, const torch::Tensor& packed, const c10::optional<torch::Tensor>& bias,
                         int64_t out_features, int64_t group_size, int64_t bits, bool has_offset, int64_t amx_min_rows);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention,
        "Causal attention of ragged new tokens over the paged KV cache (CPU)");
  m.def("bf16_gemm_supported", &bf16_gemm_supported, "whether bf16_linear was built (AVX512-BF16)");
  m.def("pack_bf16_weight", &pack_bf16_weight, "[N, K] bf16 -> the layout bf16_linear reads");
  m.def("bf16_linear", &bf16_linear, "x [M, K] bf16 times a packed weight (+ bias) -> [M, N] bf16",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("out_features"));
  m.def("rms_norm_bf16", &rms_norm_bf16,
        "RMSNorm of bf16 rows, adding the residual first (in place) when given",
        pybind11::arg("x"), pybind11::arg("residual"), pybind11::arg("weight"), pybind11::arg("eps"));
  m.def("qk_norm_rope_store", &qk_norm_rope_store,
        "From fused qkv rows: per-head q/k RMSNorm (optional), rotary, k and v written to the KV cache; "
        "returns the queries",
        pybind11::arg("qkv"), pybind11::arg("q_weight"), pybind11::arg("k_weight"), pybind11::arg("eps"),
        pybind11::arg("cos"), pybind11::arg("signed_sin"), pybind11::arg("k_cache"), pybind11::arg("v_cache"),
        pybind11::arg("slots"), pybind11::arg("num_heads"), pybind11::arg("num_kv_heads"));
  m.def("silu_and_mul_bf16", &silu_and_mul_bf16, "[T, 2d] = [gate | up] bf16 -> silu(gate) * up, [T, d]");
  m.def("moe_experts_bf16", &moe_experts_bf16,
        "One or two tokens' routed experts (stacked packed weights), weighted and summed -> [T, H] bf16",
        pybind11::arg("x"), pybind11::arg("topk_ids"), pybind11::arg("topk_weights"), pybind11::arg("w13"),
        pybind11::arg("w2"), pybind11::arg("intermediate"));
  m.def("int_gemm_supported", &int_gemm_supported, "whether int_linear was built (AVX-512)");
  m.def("int_gemm_amx_supported", &int_gemm_amx_supported, "whether int_linear can use AMX tiles here");
  m.def("pack_int_weight", &pack_int_weight,
        "q [N, K] int8, scale / offset [N, K / G] fp32 -> the layout int_linear reads (uint8)",
        pybind11::arg("q"), pybind11::arg("scale"), pybind11::arg("offset"), pybind11::arg("group_size"),
        pybind11::arg("bits"));
  m.def("int_linear", &int_linear,
        "x [M, K] bf16 / fp32 times a packed int8 / int4 weight (+ bias) -> [M, N] in x's dtype; "
        "bf16 x of at least amx_min_rows rows (0: never) on AMX tiles",
        pybind11::arg("x"), pybind11::arg("packed"), pybind11::arg("bias"), pybind11::arg("out_features"),
        pybind11::arg("group_size"), pybind11::arg("bits"), pybind11::arg("has_offset"),
        pybind11::arg("amx_min_rows"));
}
