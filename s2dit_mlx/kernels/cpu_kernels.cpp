// Vectorised float32 kernels for MLX's CPU backend (built at first use by
// s2dit_mlx.kernels.cpu; see that module for why they exist).
//
// The Linux mlx[cpu] wheel evaluates exp, tanh and sigmoid one element at a time
// through out-of-line std::fma calls (~25 ns per element); these kernels compute
// the same functions 16 lanes at a time and work in place on a buffer that the
// caller owns.
//
// exp(x): Cephes-style range reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial for e^r and 2^n written straight into the exponent bits; relative
// error ~2e-7 on [-87.3, 88.3] (inputs outside are clamped to those ends).

#include <stdint.h>
#include <string.h>

#define LANES 16
typedef float vfloat __attribute__((vector_size(LANES * 4)));
typedef int32_t vint __attribute__((vector_size(LANES * 4)));

// One clone per instruction set; the loader picks the best for this CPU.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define DISPATCH __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define DISPATCH
#endif
#define INLINE static inline __attribute__((always_inline))

INLINE vfloat splat(float a) {
  vfloat v;
  for (int i = 0; i < LANES; ++i) v[i] = a;
  return v;
}

INLINE vfloat vmax(vfloat a, vfloat b) { return a > b ? a : b; }
INLINE vfloat vmin(vfloat a, vfloat b) { return a < b ? a : b; }

INLINE vfloat vexp(vfloat x) {
  x = vmin(vmax(x, splat(-87.3f)), splat(88.3f));
  // Adding 1.5 * 2^23 rounds to the nearest integer (no -ffast-math: it must not fold).
  const vfloat magic = splat(12582912.0f);
  vfloat n = (x * 1.44269504088896341f + magic) - magic;
  vfloat r = x - n * 0.693359375f;  // ln2 split in two so n * hi is exact
  r = r + n * 2.12194440e-4f;
  vfloat p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  vint bits = (__builtin_convertvector(n, vint) + 127) << 23;
  vfloat scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Unaligned loads and stores; a full vector is a fixed-size copy (one instruction), only
// the tail of a row pays for a variable one.
INLINE vfloat load(const float* x, int64_t count, float fill) {
  vfloat v;
  if (count == LANES) {
    memcpy(&v, x, sizeof v);
  } else {
    v = splat(fill);
    memcpy(&v, x, (size_t)count * 4);
  }
  return v;
}

INLINE void store(float* x, vfloat v, int64_t count) {
  if (count == LANES) {
    memcpy(x, &v, sizeof v);
  } else {
    memcpy(x, &v, (size_t)count * 4);
  }
}

INLINE float hmax(vfloat v) {
  float m = v[0];
  for (int i = 1; i < LANES; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

INLINE float hsum(vfloat v) {
  float s = 0.0f;
  for (int i = 0; i < LANES; ++i) s += v[i];
  return s;
}

extern "C" {

// Softmax over each row of a contiguous [rows, cols] buffer, in place.
DISPATCH void s2dit_softmax_rows(float* x, int64_t rows, int64_t cols) {
  for (int64_t row = 0; row < rows; ++row) {
    float* a = x + row * cols;
    vfloat m = splat(-__builtin_inff());
    for (int64_t i = 0; i < cols; i += LANES) {
      int64_t n = cols - i < LANES ? cols - i : LANES;
      m = vmax(m, load(a + i, n, -__builtin_inff()));
    }
    const float top = hmax(m);
    vfloat total = splat(0.0f);
    for (int64_t i = 0; i < cols; i += LANES) {
      int64_t n = cols - i < LANES ? cols - i : LANES;
      vfloat e = vexp(load(a + i, n, -__builtin_inff()) - top);
      if (n < LANES) {
        for (int64_t j = n; j < LANES; ++j) e[j] = 0.0f;  // padding adds nothing
      }
      total += e;
      store(a + i, e, n);
    }
    const float inv = 1.0f / hsum(total);
    for (int64_t i = 0; i < cols; i += LANES) {
      int64_t n = cols - i < LANES ? cols - i : LANES;
      store(a + i, load(a + i, n, 0.0f) * inv, n);
    }
  }
}

// x * sigmoid(x), in place.
DISPATCH void s2dit_silu(float* x, int64_t count) {
  for (int64_t i = 0; i < count; i += LANES) {
    int64_t n = count - i < LANES ? count - i : LANES;
    vfloat v = load(x + i, n, 0.0f);
    store(x + i, v / (1.0f + vexp(-v)), n);
  }
}

// GELU, tanh approximation: 0.5 x (1 + tanh(y)) = x * sigmoid(2y),
// y = sqrt(2 / pi) (x + 0.044715 x^3); in place.
DISPATCH void s2dit_gelu_tanh(float* x, int64_t count) {
  for (int64_t i = 0; i < count; i += LANES) {
    int64_t n = count - i < LANES ? count - i : LANES;
    vfloat v = load(x + i, n, 0.0f);
    vfloat z = 1.5957691216057308f * (v + 0.044715f * v * v * v);
    store(x + i, v / (1.0f + vexp(-z)), n);
  }
}

}  // extern "C"
