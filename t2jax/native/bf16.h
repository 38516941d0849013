// bf16 bit patterns to and from fp32, as XLA converts them.

#ifndef T2JAX_NATIVE_BF16_H_
#define T2JAX_NATIVE_BF16_H_

#include <cstdint>
#include <cstring>

namespace t2jax_native {

// bf16 to fp32: exact, a 16-bit shift.
inline float Widen(uint16_t bits) {
  const uint32_t word = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &word, sizeof(value));
  return value;
}

// fp32 to bf16, rounding to nearest even as XLA's convert does (a NaN stays a quiet NaN).
inline uint16_t Narrow(float value) {
  uint32_t word;
  std::memcpy(&word, &value, sizeof(word));
  const uint32_t rounded = (word + 0x7fff + ((word >> 16) & 1)) >> 16;
  return static_cast<uint16_t>(value != value ? (word >> 16) | 0x40 : rounded);
}

}  // namespace t2jax_native

#endif  // T2JAX_NATIVE_BF16_H_
