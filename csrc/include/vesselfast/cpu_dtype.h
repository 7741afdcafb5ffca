// float32 <-> storage conversions for the CPU kernels, written so GCC/Clang vectorise the element loops:
// no calls, no branches (selects only). c10::BFloat16 / c10::Half conversions are correct but contain
// branches (NaN tests, denormal paths) that keep the loops scalar. Results are bit-identical to c10's:
// bfloat16 and float16 round to nearest even; NaN stays NaN (canonical quiet NaN).
// GCC only if-converts the float selects under -fno-trapping-math: the .cpp files that include this set
// it with `#pragma GCC optimize` (it changes no result, only lets the compiler assume FP ops do not trap).
#pragma once
#include <cstdint>
#include <cstring>

namespace vesselfast {
namespace cpu {

inline float f32_from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// Codec: storage type + load (widen to float) + store (narrow from float).
struct F32 {
  using storage = float;
  static float load(float v) { return v; }
  static float store(float v) { return v; }
};

struct BF16 {
  using storage = uint16_t;
  static float load(uint16_t h) { return f32_from_bits(static_cast<uint32_t>(h) << 16); }
  static uint16_t store(float f) {
    const uint32_t u = f32_to_bits(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // round to nearest even
    return static_cast<uint16_t>(f != f ? 0x7fc0u : rounded);
  }
};

// IEEE half, the select-only formulation of FP16 (Maratyszcza/FP16, the one c10 uses).
struct F16 {
  using storage = uint16_t;
  static float load(uint16_t h) {
    const uint32_t w = static_cast<uint32_t>(h) << 16;
    const uint32_t sign = w & 0x80000000u;
    const uint32_t two_w = w + w;
    const float normalized = f32_from_bits((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
    const float denormalized = f32_from_bits((two_w >> 17) | (126u << 23)) - 0.5f;
    const uint32_t bits = two_w < (1u << 27) ? f32_to_bits(denormalized) : f32_to_bits(normalized);
    return f32_from_bits(sign | bits);
  }
  static uint16_t store(float f) {
    const float scale_to_inf = 0x1.0p+112f, scale_to_zero = 0x1.0p-110f;
    const uint32_t w = f32_to_bits(f);
    const float abs_f = f32_from_bits(w & 0x7fffffffu);
    float base = (abs_f * scale_to_inf) * scale_to_zero;
    const uint32_t shl1_w = w + w;
    const uint32_t sign = w & 0x80000000u;
    uint32_t bias = shl1_w & 0xFF000000u;
    bias = bias < 0x71000000u ? 0x71000000u : bias;
    base = f32_from_bits((bias >> 1) + 0x07800000u) + base;
    const uint32_t bits = f32_to_bits(base);
    const uint32_t exp_bits = (bits >> 13) & 0x00007C00u;
    const uint32_t mantissa_bits = bits & 0x00000FFFu;
    const uint32_t nonsign = exp_bits + mantissa_bits;
    return static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
  }
};

}  // namespace cpu
}  // namespace vesselfast

// ------------------------------------------------------------------------------------------------
// Instruction-set dispatch. The extension is built for the baseline x86-64 ISA (no -march=native:
// wheels must run everywhere); the element loops are also compiled for AVX2 and AVX-512 (function
// target attributes) and picked at run time. -ffp-contract=off holds for every variant (no FMA
// contraction), so all variants compute the same float32 expression; only the order of the loss
// reduction's partial sums differs with the vector width.
// VESSELFAST_CPU_ISA=generic|avx2|avx512 lowers the choice (tests, benchmarks); it never raises it.
// ------------------------------------------------------------------------------------------------
#include <cstdlib>

#if defined(__x86_64__) && defined(__GNUC__)
#define VF_X86_DISPATCH 1
#define VF_TARGET_AVX2 __attribute__((target("avx2,f16c")))
#define VF_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,f16c,prefer-vector-width=512")))
#else
#define VF_X86_DISPATCH 0
#endif

namespace vesselfast {
namespace cpu {

enum class Isa : int { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

inline Isa hardware_isa() {
#if VF_X86_DISPATCH
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c")) return Isa::kAvx2;
    return Isa::kGeneric;
  }();
  return isa;
#else
  return Isa::kGeneric;
#endif
}

inline Isa active_isa() {
  Isa isa = hardware_isa();
  if (const char* env = std::getenv("VESSELFAST_CPU_ISA")) {
    Isa want = isa;
    if (std::strcmp(env, "generic") == 0) want = Isa::kGeneric;
    else if (std::strcmp(env, "avx2") == 0) want = Isa::kAvx2;
    else if (std::strcmp(env, "avx512") == 0) want = Isa::kAvx512;
    if (static_cast<int>(want) < static_cast<int>(isa)) isa = want;
  }
  return isa;
}

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "generic");
}

}  // namespace cpu
}  // namespace vesselfast
