// The Python module: one binding per entry point. Kernels take `isa`, the
// mask of instruction sets they may use (isa.h; layers/cpu_features.py
// computes it and layers/cpu_kernels binds it); packing does not depend on it.

#include <pybind11/stl.h>
#include <torch/extension.h>

#include "dispatch.h"

namespace radixserve {
void bind_decoder_stack(pybind11::module_& m);  // decoder_stack.cpp
}  // namespace radixserve

torch::Tensor pack_bf16_weight(const torch::Tensor& weight);
torch::Tensor pack_int_weight(const torch::Tensor& q, const torch::Tensor& scale,
                              const c10::optional<torch::Tensor>& offset, int64_t group_size, int64_t bits);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace radixserve;
  m.def("cpu_features", &cpu_features, "the CPU's instruction-set features, as the CPU reports them (cpuid / hwcaps)");
  m.def("kernel_units", &kernel_units, "which instruction-set unit each kernel runs from under a mask",
        py::arg("isa"));
  m.def("paged_attention", &paged_attention,
        "Causal attention of ragged new tokens over the paged KV cache (CPU)", py::arg("q"), py::arg("k_cache"),
        py::arg("v_cache"), py::arg("req_to_token"), py::arg("req_pool_indices"), py::arg("prefix_lens"),
        py::arg("extend_lens"), py::arg("scale"), py::arg("out"), py::arg("isa"));
  m.def("bf16_gemm_supported", &bf16_gemm_supported, "whether bf16_linear runs under this mask (AVX2 or AVX-512)",
        py::arg("isa"));
  m.def("pack_bf16_weight", &pack_bf16_weight, "[N, K] bf16 -> the layout bf16_linear reads");
  m.def("bf16_linear", &bf16_linear, "x [M, K] bf16 times a packed weight (+ bias) -> [M, N] bf16",
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("out_features"), py::arg("isa"));
  m.def("rms_norm_bf16", &rms_norm_bf16,
        "RMSNorm of bf16 rows, adding the residual first (in place) when given",
        py::arg("x"), py::arg("residual"), py::arg("weight"), py::arg("eps"), py::arg("isa"));
  m.def("qk_norm_rope_store", &qk_norm_rope_store,
        "From fused qkv rows: per-head q/k RMSNorm (optional), rotary, k and v written to the KV cache; "
        "returns the queries",
        py::arg("qkv"), py::arg("q_weight"), py::arg("k_weight"), py::arg("eps"), py::arg("cos"),
        py::arg("signed_sin"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("num_heads"),
        py::arg("num_kv_heads"), py::arg("isa"));
  m.def("silu_and_mul_bf16", &silu_and_mul_bf16, "[T, 2d] = [gate | up] bf16 -> silu(gate) * up, [T, d]",
        py::arg("x"), py::arg("isa"));
  m.def("moe_experts_bf16", &moe_experts_bf16,
        "One or two tokens' routed experts (stacked packed weights), weighted and summed -> [T, H] bf16",
        py::arg("x"), py::arg("topk_ids"), py::arg("topk_weights"), py::arg("w13"), py::arg("w2"),
        py::arg("intermediate"), py::arg("isa"));
  m.def("int_gemm_supported", &int_gemm_supported, "whether int_linear runs under this mask (AVX2 or AVX-512)",
        py::arg("isa"));
  m.def("int_gemm_amx_supported", &amx_int_gemm_usable,
        "whether int_linear can use AMX tiles under this mask (and the OS allows them)", py::arg("isa"));
  m.def("pack_int_weight", &pack_int_weight,
        "q [N, K] int8, scale / offset [N, K / G] fp32 -> the layout int_linear reads (uint8)",
        py::arg("q"), py::arg("scale"), py::arg("offset"), py::arg("group_size"), py::arg("bits"));
  m.def("int_linear", &int_linear,
        "x [M, K] bf16 / fp32 times a packed int8 / int4 weight (+ bias) -> [M, N] in x's dtype; "
        "bf16 x of at least amx_min_rows rows (0: never) on AMX tiles where the mask allows",
        py::arg("x"), py::arg("packed"), py::arg("bias"), py::arg("out_features"), py::arg("group_size"),
        py::arg("bits"), py::arg("has_offset"), py::arg("amx_min_rows"), py::arg("isa"));
  bind_decoder_stack(m);
}
