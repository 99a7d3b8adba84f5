// Scalar numerics the kernels share, written so the compiler vectorises them:
// bf16 <-> fp32 on raw bits (rounding as torch's bf16 cast does, so fused
// kernels round exactly where the unfused torch ops would) and exp.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace radixserve {

inline float widen(uint16_t bits) {
  const uint32_t wide = static_cast<uint32_t>(bits) << 16;
  float out;
  std::memcpy(&out, &wide, sizeof(out));
  return out;
}

inline uint16_t narrow(float value) {  // round to nearest even; NaN stays NaN
  uint32_t bits;
  std::memcpy(&bits, &value, sizeof(bits));
  if ((bits & 0x7F800000u) == 0x7F800000u) return static_cast<uint16_t>((bits >> 16) | ((bits & 0xFFFF) ? 0x40 : 0));
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// One bf16 op: the product / sum of two bf16 values, rounded back to bf16.
inline float round_bf16(float value) { return widen(narrow(value)); }

// exp for x <= 0 (softmax arguments after subtracting the row max), written
// so the compiler vectorises it: x = n ln2 + r, 2^n from the exponent bits,
// e^r from a degree-6 polynomial (relative error ~2e-7 on [-ln2/2, ln2/2]).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.3981999507e-03f;
  p = p * r + 8.3334519073e-03f;
  p = p * r + 4.1665795894e-02f;
  p = p * r + 1.6666665459e-01f;
  p = p * r + 5.0000001201e-01f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

}  // namespace radixserve
