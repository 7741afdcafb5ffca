// CPU kernels of the group norm with a per-sample affine and an optional SiLU (vesselfast/ops/group_norm.py):
//   z = (x - mean_g) * rstd_g * scale[b, c] + shift[b, c],   y = silu(z) or z,
// for x in channels_last memory, i.e. per sample a row-major [H*W, C] matrix, so every loop runs over
// contiguous channels. ATen's own group norm is fast on NCHW tensors and slow on channels_last ones (its
// backward 4x, in bfloat16); these kernels let the generator train in channels_last, the layout oneDNN's
// convolutions run without reorders (docs/BENCHMARKS.md, "Generator training step").
//
// Statistics: per (sample, block of rows) the per-channel mean and sum of squared deviations, from two
// passes over the cache-resident block, then combined over blocks and the group's channels in double
// (Chan et al.'s pairwise update) in a fixed order: results do not depend on the thread count.
// Backward: one pass of per-channel sums (sum dz, sum dz * xhat), then one elementwise pass
//   dx = rstd * (scale * dz - mean_g(scale * dz) - xhat * mean_g(scale * dz * xhat)),
// with dz = dy * silu'(z) recomputed from x in the first pass (no activation saved beyond x, mean and rstd)
// and kept in a float32 scratch buffer for the second, which is freed when the backward returns.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "vesselfast/checks.h"

// After the torch headers: lets GCC vectorise the 16-bit conversions of cpu_dtype.h (see there).
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("no-trapping-math")
#endif
#include "vesselfast/cpu_dtype.h"

namespace vesselfast {
namespace {

// exp(v) for v in float range, branch-free so the element loops vectorise (std::exp is a call): Cephes'
// expf (range reduction by ln 2 in two parts, degree-6 polynomial, exponent by bit arithmetic), within
// 2 ulp of expf on [-87, 88]; arguments are clamped there.
__attribute__((always_inline)) inline float exp_vec(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float n = (v * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(v / ln 2)
  const float r = (v - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = (p * r) * r + r + 1.0f;
  const int32_t k = static_cast<int32_t>(n);
  return e * cpu::f32_from_bits(static_cast<uint32_t>(k + 127) << 23);
}

__attribute__((always_inline)) inline float sigmoid_vec(float z) { return 1.0f / (1.0f + exp_vec(-z)); }

// Rows of one block: about 8K elements, at least 16 rows.
inline int64_t block_rows(int64_t channels) { return std::max<int64_t>(16, 8192 / std::max<int64_t>(1, channels)); }

template <typename C, bool Act>
struct Loops {
  using S = typename C::storage;

  // Per-channel mean and sum of squared deviations of rows [0, rows) of x (a [rows, ch] block).
  __attribute__((always_inline)) static inline void stats_body(const S* __restrict x, int64_t rows, int64_t ch,
                                                               float* __restrict mean, float* __restrict m2) {
    for (int64_t c = 0; c < ch; ++c) mean[c] = m2[c] = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const S* __restrict row = x + r * ch;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) mean[c] += C::load(row[c]);
    }
    const float inv = 1.f / static_cast<float>(rows);
    for (int64_t c = 0; c < ch; ++c) mean[c] *= inv;
    for (int64_t r = 0; r < rows; ++r) {
      const S* __restrict row = x + r * ch;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) {
        const float d = C::load(row[c]) - mean[c];
        m2[c] += d * d;
      }
    }
  }

  // y = act(x * a + b) over a [rows, ch] block; a, b per channel (the sample's folded affine).
  __attribute__((always_inline)) static inline void apply_body(const S* __restrict x, S* __restrict y, int64_t rows,
                                                               int64_t ch, const float* __restrict a,
                                                               const float* __restrict b) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* __restrict xr = x + r * ch;
      S* __restrict yr = y + r * ch;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) {
        const float z = C::load(xr[c]) * a[c] + b[c];
        yr[c] = C::store(Act ? z * sigmoid_vec(z) : z);
      }
    }
  }

  // dL/dz from dy = dL/dy at z = x * a + b: dy * silu'(z) = dy * s (1 + z (1 - s)), s = sigmoid(z); or dy.
  __attribute__((always_inline)) static inline float grad_z(float dy, float x, float a, float b) {
    if (!Act) return dy;
    const float z = x * a + b;
    const float s = sigmoid_vec(z);
    return dy * (s * (1.f + z * (1.f - s)));
  }

  // dz = dy * act'(z), z = x * a + b; sums per channel of dz and dz * xhat, xhat = x * xr + xm. With the
  // SiLU, dz also goes to dzs (float32, the block's layout), so that the second pass reads it instead of
  // evaluating the sigmoid again (its exp is most of the backward's arithmetic).
  __attribute__((always_inline)) static inline void sums_body(const S* __restrict dy, const S* __restrict x,
                                                              int64_t rows, int64_t ch, const float* __restrict a,
                                                              const float* __restrict b, const float* __restrict xr,
                                                              const float* __restrict xm, float* __restrict sdz,
                                                              float* __restrict sdzx, float* __restrict dzs) {
    for (int64_t c = 0; c < ch; ++c) sdz[c] = sdzx[c] = 0.f;
    for (int64_t r = 0; r < rows; ++r) {
      const S* __restrict dyr = dy + r * ch;
      const S* __restrict xrow = x + r * ch;
      float* __restrict dzr = Act ? dzs + r * ch : nullptr;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) {
        const float xv = C::load(xrow[c]);
        const float dz = grad_z(C::load(dyr[c]), xv, a[c], b[c]);
        if (Act) dzr[c] = dz;
        sdz[c] += dz;
        sdzx[c] += dz * (xv * xr[c] + xm[c]);
      }
    }
  }

  // dx = p * dz + q * x + o per channel (the group's constants folded per channel); dz from dzs (the SiLU's,
  // stored by sums_body) or dy itself.
  __attribute__((always_inline)) static inline void grad_body(const S* __restrict dy, const S* __restrict x,
                                                              S* __restrict dx, int64_t rows, int64_t ch,
                                                              const float* __restrict dzs, const float* __restrict p,
                                                              const float* __restrict q, const float* __restrict o) {
    for (int64_t r = 0; r < rows; ++r) {
      const S* __restrict dyr = dy + r * ch;
      const S* __restrict xrow = x + r * ch;
      const float* __restrict dzr = Act ? dzs + r * ch : nullptr;
      S* __restrict dxr = dx + r * ch;
#pragma omp simd
      for (int64_t c = 0; c < ch; ++c) {
        const float dz = Act ? dzr[c] : C::load(dyr[c]);
        dxr[c] = C::store(p[c] * dz + q[c] * C::load(xrow[c]) + o[c]);
      }
    }
  }

#define VF_GN_VARIANTS(NAME, PARAMS, ARGS)                                                          \
  static void NAME##_generic PARAMS { NAME##_body ARGS; }                                           \
  VF_GN_X86(NAME, PARAMS, ARGS)                                                                     \
  static void NAME(cpu::Isa isa, VF_GN_UNPAREN PARAMS) { VF_GN_DISPATCH(NAME, ARGS) NAME##_generic ARGS; }
#define VF_GN_UNPAREN(...) __VA_ARGS__
#if VF_X86_DISPATCH
#define VF_GN_X86(NAME, PARAMS, ARGS)                                                               \
  VF_TARGET_AVX2 static void NAME##_avx2 PARAMS { NAME##_body ARGS; }                               \
  VF_TARGET_AVX512 static void NAME##_avx512 PARAMS { NAME##_body ARGS; }
#define VF_GN_DISPATCH(NAME, ARGS)                                                                  \
  if (isa == cpu::Isa::kAvx512) return NAME##_avx512 ARGS;                                          \
  if (isa == cpu::Isa::kAvx2) return NAME##_avx2 ARGS;
#else
#define VF_GN_X86(NAME, PARAMS, ARGS)
#define VF_GN_DISPATCH(NAME, ARGS) (void)isa;
#endif
  VF_GN_VARIANTS(stats, (const S* x, int64_t rows, int64_t ch, float* mean, float* m2), (x, rows, ch, mean, m2))
  VF_GN_VARIANTS(apply, (const S* x, S* y, int64_t rows, int64_t ch, const float* a, const float* b),
                 (x, y, rows, ch, a, b))
  VF_GN_VARIANTS(sums,
                 (const S* dy, const S* x, int64_t rows, int64_t ch, const float* a, const float* b, const float* xr,
                  const float* xm, float* sdz, float* sdzx, float* dzs),
                 (dy, x, rows, ch, a, b, xr, xm, sdz, sdzx, dzs))
  VF_GN_VARIANTS(grad,
                 (const S* dy, const S* x, S* dx, int64_t rows, int64_t ch, const float* dzs, const float* p,
                  const float* q, const float* o),
                 (dy, x, dx, rows, ch, dzs, p, q, o))
#undef VF_GN_VARIANTS
#undef VF_GN_UNPAREN
#undef VF_GN_X86
#undef VF_GN_DISPATCH
};

// Geometry of one call: x is [batch, ch, hw] viewed as batch row-major [hw, ch] matrices, cut into
// blocks of `rows` rows; task j covers sample j / nblk, block j % nblk.
struct Shape {
  int64_t batch, ch, hw, groups, rows, nblk;
  Shape(const at::Tensor& x, int64_t g)  // members initialise in declaration order: nblk uses hw and rows
      : batch(x.size(0)), ch(x.size(1)), hw(x.size(2) * x.size(3)), groups(g), rows(block_rows(ch)),
        nblk((hw + rows - 1) / rows) {}
  int64_t rows_of(int64_t blk) const { return std::min(rows, hw - blk * rows); }
  int64_t offset(int64_t j) const { return (j / nblk) * hw * ch + (j % nblk) * rows * ch; }
  int64_t group_size() const { return ch / groups; }
};

template <typename Fn>
void for_each_block(const Shape& s, Fn fn) {
  // Grain: ~32K elements per thread, so small inputs stay on the calling thread.
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / (s.rows * s.ch));
  at::parallel_for(0, s.batch * s.nblk, grain, [&](int64_t begin, int64_t end) {
    const cpu::FlushSubnormals ftz;  // the SiLU's clamped lanes would be subnormal (cpu_dtype.h)
    for (int64_t j = begin; j < end; ++j) fn(j);
  });
}

// Per (sample, channel): the folded affine of the forward, z = x * a + b, from scale, shift, mean, rstd.
void fold_affine(const Shape& s, const float* scale, const float* shift, const float* mean, const float* rstd,
                 std::vector<float>& a, std::vector<float>& b) {
  a.resize(s.batch * s.ch);
  b.resize(s.batch * s.ch);
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t c = 0; c < s.ch; ++c) {
      const int64_t g = n * s.groups + c / s.group_size(), i = n * s.ch + c;
      a[i] = scale[i] * rstd[g];
      b[i] = shift[i] - mean[g] * a[i];
    }
}

template <typename C, bool Act>
void forward(const at::Tensor& x, const float* scale, const float* shift, double eps, const Shape& s, at::Tensor& y,
             float* mean, float* rstd) {
  using T = typename C::storage;
  const T* xp = static_cast<const T*>(x.data_ptr());
  T* yp = static_cast<T*>(y.data_ptr());
  const cpu::Isa isa = cpu::active_isa();
  std::vector<float> bmean(s.batch * s.nblk * s.ch), bm2(s.batch * s.nblk * s.ch);
  for_each_block(s, [&](int64_t j) {
    Loops<C, Act>::stats(isa, xp + s.offset(j), s.rows_of(j % s.nblk), s.ch, &bmean[j * s.ch], &bm2[j * s.ch]);
  });
  // Combine blocks, then the group's channels (Chan et al.), in double and in a fixed order.
  const int64_t gs = s.group_size();
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t g = 0; g < s.groups; ++g) {
      double cnt = 0, mu = 0, m2 = 0;
      for (int64_t c = g * gs; c < (g + 1) * gs; ++c)
        for (int64_t k = 0; k < s.nblk; ++k) {
          const int64_t i = (n * s.nblk + k) * s.ch + c;
          const double nb = static_cast<double>(s.rows_of(k)), tot = cnt + nb, d = bmean[i] - mu;
          mu += d * nb / tot;
          m2 += bm2[i] + d * d * cnt * nb / tot;
          cnt = tot;
        }
      mean[n * s.groups + g] = static_cast<float>(mu);
      rstd[n * s.groups + g] = static_cast<float>(1.0 / std::sqrt(m2 / cnt + eps));
    }
  std::vector<float> a, b;
  fold_affine(s, scale, shift, mean, rstd, a, b);
  for_each_block(s, [&](int64_t j) {
    const int64_t n = j / s.nblk;
    Loops<C, Act>::apply(isa, xp + s.offset(j), yp + s.offset(j), s.rows_of(j % s.nblk), s.ch, &a[n * s.ch],
                         &b[n * s.ch]);
  });
}

template <typename C, bool Act>
void backward(const at::Tensor& dy, const at::Tensor& x, const float* scale, const float* shift, const float* mean,
              const float* rstd, const Shape& s, at::Tensor& dx, float* dscale, float* dshift) {
  using T = typename C::storage;
  const T* dyp = static_cast<const T*>(dy.data_ptr());
  const T* xp = static_cast<const T*>(x.data_ptr());
  T* dxp = static_cast<T*>(dx.data_ptr());
  const cpu::Isa isa = cpu::active_isa();
  const int64_t gs = s.group_size();
  std::vector<float> a, b;
  fold_affine(s, scale, shift, mean, rstd, a, b);
  // xhat = x * xr + xm per channel.
  std::vector<float> xr(s.batch * s.ch), xm(s.batch * s.ch);
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t c = 0; c < s.ch; ++c) {
      const int64_t g = n * s.groups + c / gs;
      xr[n * s.ch + c] = rstd[g];
      xm[n * s.ch + c] = -mean[g] * rstd[g];
    }
  std::vector<float> bdz(s.batch * s.nblk * s.ch), bdzx(s.batch * s.nblk * s.ch);
  // dL/dz between the two passes (SiLU only): float32, x's layout, freed on return.
  const at::Tensor dz = Act ? at::empty({x.numel()}, x.options().dtype(at::kFloat)) : at::Tensor();
  float* dzp = Act ? dz.data_ptr<float>() : nullptr;
  for_each_block(s, [&](int64_t j) {
    const int64_t n = j / s.nblk;
    Loops<C, Act>::sums(isa, dyp + s.offset(j), xp + s.offset(j), s.rows_of(j % s.nblk), s.ch, &a[n * s.ch],
                        &b[n * s.ch], &xr[n * s.ch], &xm[n * s.ch], &bdz[j * s.ch], &bdzx[j * s.ch],
                        Act ? dzp + s.offset(j) : nullptr);
  });
  // dshift = sum dz, dscale = sum dz * xhat (double over blocks); per group
  // c1 = mean(scale * dz), c2 = mean(scale * dz * xhat); dx = rstd * (scale * dz - c1 - xhat * c2).
  std::vector<float> p(s.batch * s.ch), q(s.batch * s.ch), o(s.batch * s.ch);
  const double count = static_cast<double>(gs * s.hw);
  for (int64_t n = 0; n < s.batch; ++n)
    for (int64_t g = 0; g < s.groups; ++g) {
      double c1 = 0, c2 = 0;
      for (int64_t c = g * gs; c < (g + 1) * gs; ++c) {
        double sz = 0, szx = 0;
        for (int64_t k = 0; k < s.nblk; ++k) {
          sz += bdz[(n * s.nblk + k) * s.ch + c];
          szx += bdzx[(n * s.nblk + k) * s.ch + c];
        }
        dshift[n * s.ch + c] = static_cast<float>(sz);
        dscale[n * s.ch + c] = static_cast<float>(szx);
        c1 += scale[n * s.ch + c] * sz;
        c2 += scale[n * s.ch + c] * szx;
      }
      c1 /= count;
      c2 /= count;
      const double r = rstd[n * s.groups + g], mu = mean[n * s.groups + g];
      for (int64_t c = g * gs; c < (g + 1) * gs; ++c) {
        // rstd * (scale dz - c1 - (x - mu) rstd c2) = (rstd scale) dz + (-rstd^2 c2) x + rstd (mu rstd c2 - c1)
        p[n * s.ch + c] = static_cast<float>(r * scale[n * s.ch + c]);
        q[n * s.ch + c] = static_cast<float>(-r * r * c2);
        o[n * s.ch + c] = static_cast<float>(r * (mu * r * c2 - c1));
      }
    }
  for_each_block(s, [&](int64_t j) {
    const int64_t n = j / s.nblk;
    Loops<C, Act>::grad(isa, dyp + s.offset(j), xp + s.offset(j), dxp + s.offset(j), s.rows_of(j % s.nblk), s.ch,
                        Act ? dzp + s.offset(j) : nullptr, &p[n * s.ch], &q[n * s.ch], &o[n * s.ch]);
  });
}

void check_inputs(const at::Tensor& x, const at::Tensor& scale, const at::Tensor& shift, int64_t groups) {
  TORCH_CHECK(x.dim() == 4, "vesselfast: group_norm_act takes x [B, C, H, W], got ", x.dim(), " dimensions");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "vesselfast: x must be float32, bfloat16 or float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "vesselfast: x must be channels_last (x.contiguous(memory_format=torch.channels_last))");
  TORCH_CHECK(groups >= 1 && x.size(1) % groups == 0, "vesselfast: ", x.size(1), " channels do not split into ",
              groups, " groups");
  for (const at::Tensor* t : {&scale, &shift})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->dim() == 2 && t->size(0) == x.size(0) &&
                    t->size(1) == x.size(1) && t->device() == x.device(),
                "vesselfast: scale and shift must be contiguous float32 [B, C] tensors on ", x.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_fwd_cpu(const at::Tensor& x, const at::Tensor& scale,
                                                                      const at::Tensor& shift, int64_t groups,
                                                                      double eps, bool silu) {
  check_inputs(x, scale, shift, groups);
  const Shape s(x, groups);
  at::Tensor y = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({s.batch, groups}, f32), rstd = at::empty({s.batch, groups}, f32);
  if (x.numel() == 0) return {y, mean.zero_(), rstd.zero_()};
  const float* sc = scale.data_ptr<float>();
  const float* sh = shift.data_ptr<float>();
  VF_FLOAT_TYPES(x.scalar_type(), {
    if (silu) forward<C, true>(x, sc, sh, eps, s, y, mean.data_ptr<float>(), rstd.data_ptr<float>());
    else forward<C, false>(x, sc, sh, eps, s, y, mean.data_ptr<float>(), rstd.data_ptr<float>());
  })
  return {y, mean, rstd};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> group_norm_act_bwd_cpu(const at::Tensor& grad, const at::Tensor& x,
                                                                      const at::Tensor& scale, const at::Tensor& shift,
                                                                      const at::Tensor& mean, const at::Tensor& rstd,
                                                                      int64_t groups, bool silu) {
  check_inputs(x, scale, shift, groups);
  TORCH_CHECK(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                  grad.is_contiguous(at::MemoryFormat::ChannelsLast),
              "vesselfast: grad must be like x (same shape and dtype, channels_last)");
  const Shape s(x, groups);
  for (const at::Tensor* t : {&mean, &rstd})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == s.batch * groups,
                "vesselfast: mean and rstd must be the forward's float32 [B, groups] tensors");
  at::Tensor dx = at::empty_like(x, x.options(), at::MemoryFormat::ChannelsLast);
  at::Tensor dscale = at::zeros_like(scale), dshift = at::zeros_like(shift);
  if (x.numel() == 0) return {dx, dscale, dshift};
  VF_FLOAT_TYPES(x.scalar_type(), {
    if (silu)
      backward<C, true>(grad, x, scale.data_ptr<float>(), shift.data_ptr<float>(), mean.data_ptr<float>(),
                        rstd.data_ptr<float>(), s, dx, dscale.data_ptr<float>(), dshift.data_ptr<float>());
    else
      backward<C, false>(grad, x, scale.data_ptr<float>(), shift.data_ptr<float>(), mean.data_ptr<float>(),
                         rstd.data_ptr<float>(), s, dx, dscale.data_ptr<float>(), dshift.data_ptr<float>());
  })
  return {dx, dscale, dshift};
}

}  // namespace

TORCH_LIBRARY_IMPL(vesselfast, CPU, m) {
  m.impl("group_norm_act_fwd", &group_norm_act_fwd_cpu);
  m.impl("group_norm_act_bwd", &group_norm_act_bwd_cpu);
}

}  // namespace vesselfast
