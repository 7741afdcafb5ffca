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

// Runs the statement with `C` bound to the codec of a float32 / bfloat16 / float16 tensor's scalar type.
#define VF_FLOAT_TYPES(TYPE, ...)                                                       \
  switch (TYPE) {                                                                       \
    case at::kFloat: { using C = vesselfast::cpu::F32; __VA_ARGS__; break; }            \
    case at::kBFloat16: { using C = vesselfast::cpu::BF16; __VA_ARGS__; break; }        \
    case at::kHalf: { using C = vesselfast::cpu::F16; __VA_ARGS__; break; }             \
    default: TORCH_CHECK(false, "unreachable");                                         \
  }

// ------------------------------------------------------------------------------------------------
// Instruction-set dispatch. The extension is built for the baseline x86-64 ISA (no -march=native:
// wheels must run everywhere); the element loops are also compiled for AVX2 and AVX-512 (function
// target attributes) and picked at run time. -ffp-contract=off holds for every variant (no FMA
// contraction), so all variants compute the same float32 expression; only the order of the loss
// reduction's partial sums differs with the vector width.
// VESSELFAST_CPU_ISA=generic|avx2|avx512 lowers the choice (tests, benchmarks); it never raises it.
// ------------------------------------------------------------------------------------------------
#include <cstdlib>

#include <cstdio>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
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

// Non-temporal (streaming) stores for outputs larger than the last-level cache. Whether they pay is a
// property of the machine, read from it: the call must move more bytes than one instance of the
// last-level cache (Linux sysfs, cpu0's highest cache level: 32 MB on a Zen 4 / Zen 5 CCD; never when
// it cannot be read). glibc's sysconf(_SC_LEVEL3_CACHE_SIZE) is not used: on an EPYC guest it reports
// the whole package's L3 (320 MB), ten times what one core's loads can hit.
// VESSELFAST_STREAM_STORES=0 / 1 forces the choice off / on (tests of both paths, benchmarks).
inline int64_t last_level_cache_bytes() {
  static const int64_t bytes = [] {
    int64_t best = 0;
    int best_level = 0;
    for (int index = 0; index < 16; ++index) {
      char path[96];
      int level = 0;
      std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/level", index);
      if (FILE* f = std::fopen(path, "r")) {
        if (std::fscanf(f, "%d", &level) != 1) level = 0;
        std::fclose(f);
      } else {
        break;
      }
      std::snprintf(path, sizeof path, "/sys/devices/system/cpu/cpu0/cache/index%d/size", index);
      long long size = 0;
      char unit = 0;
      if (FILE* f = std::fopen(path, "r")) {
        if (std::fscanf(f, "%lld%c", &size, &unit) < 1) size = 0;
        std::fclose(f);
      }
      if (unit == 'K') size <<= 10;
      else if (unit == 'M') size <<= 20;
      if (level > best_level && size > 0) best_level = level, best = size;
    }
    return best;
  }();
  return bytes;
}

inline bool stream_stores_pay(int64_t bytes_moved) {
  if (const char* env = std::getenv("VESSELFAST_STREAM_STORES")) {
    if (std::strcmp(env, "0") == 0) return false;
    if (std::strcmp(env, "1") == 0) return true;
  }
  const int64_t llc = last_level_cache_bytes();
  return llc > 0 && bytes_moved > llc;
}

#if VF_X86_DISPATCH
// n a multiple of the vector width, dst 64-byte aligned, src aligned likewise.
VF_TARGET_AVX2 inline void stream_avx2(float* dst, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; j += 8) _mm256_stream_ps(dst + j, _mm256_load_ps(src + j));
}
VF_TARGET_AVX512 inline void stream_avx512(float* dst, const float* src, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) _mm512_stream_ps(dst + j, _mm512_load_ps(src + j));
}

// Fills out[b, e) with K::block(args..., i, n, dst), which writes elements [i, i + n) to dst[0, n): the
// head (up to a 64-byte line of `out`) and the tail straight into `out`, every whole kStreamBlock in
// between into an aligned stack buffer that is then streamed to `out` (no read-for-ownership of the
// output lines). Inline it into a VF_TARGET_* function so that K::block (always_inline) is compiled for
// that instruction set; ends with a store fence, so the parallel region's barrier orders the stores.
constexpr int64_t kStreamBlock = 512;  // 2 KB of float32: stays in L1
template <Isa I, typename K, typename... A>
__attribute__((always_inline)) inline void streamed(float* out, int64_t b, int64_t e, const A&... args) {
  int64_t i = b;
  while (i < e && (reinterpret_cast<uintptr_t>(out + i) & 63) != 0) ++i;
  if (i > b) K::block(args..., b, i - b, out + b);
  alignas(64) float buf[kStreamBlock];
  for (; i + kStreamBlock <= e; i += kStreamBlock) {
    K::block(args..., i, kStreamBlock, buf);
    if constexpr (I == Isa::kAvx512) stream_avx512(out + i, buf, kStreamBlock);
    else stream_avx2(out + i, buf, kStreamBlock);
  }
  if (i < e) K::block(args..., i, e - i, out + i);
  _mm_sfence();
}
#endif

// Subnormal floats as zero (MXCSR's FTZ and DAZ) on this thread while in scope, then the caller's mode
// back. Intel cores take a microcode assist of ~100 cycles for an operation that produces or reads a
// subnormal (AMD's Zen cores handle them in hardware). The group norm's SiLU met one in every vector: the
// compiler turns the exp's clamp into a blend and computes the clamped lane's value, z * sigmoid(-88) =
// z * 6.05e-39, a subnormal, for every lane; on an Intel Xeon with AMX that made the forward 3.3x slower
// (docs/BENCHMARKS.md). Flushing changes only results below 1.2e-38 in magnitude.
struct FlushSubnormals {
#if VF_X86_DISPATCH
  unsigned int saved;
  FlushSubnormals() : saved(_mm_getcsr()) { _mm_setcsr(saved | 0x8040u); }  // FTZ (bit 15), DAZ (bit 6)
  ~FlushSubnormals() { _mm_setcsr(saved); }
#else
  FlushSubnormals() = default;  // elsewhere a no-op (ARM cores handle subnormals in hardware)
#endif
  FlushSubnormals(const FlushSubnormals&) = delete;
  FlushSubnormals& operator=(const FlushSubnormals&) = delete;
};

inline const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "generic");
}

}  // namespace cpu
}  // namespace vesselfast
