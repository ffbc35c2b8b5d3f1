// Vectorised float32 kernels for MLX's CPU backend (built at first use by
// s2dit_mlx.kernels.cpu; see s2dit_mlx/kernels/__init__.py for when they run).
//
// The Linux mlx[cpu] wheel evaluates exp, tanh and sigmoid one element at a time
// through out-of-line std::fma calls (~25 ns per element); these kernels compute
// the same functions 16 lanes at a time. Every entry point reads its inputs and writes
// a separate output buffer (a new array the caller just allocated): no input is modified.
//
// s2dit_linear and s2dit_conv3d share a blocked GEMM with a 12x32 AVX-512 micro-kernel
// (about 100 GFLOP/s per core on the CI machine's AMD EPYC, where OpenBLAS reaches 60-95
// on our convolution shapes); the convolution reads its input in place (see below).
//
// Failure: the entry points that allocate (s2dit_linear, s2dit_conv3d, s2dit_attention) return
// 0 on success and S2DIT_FAILED when a work buffer or a thread cannot be had; no exception
// ever crosses into Python (one would abort the process) and a failed call writes nothing the
// caller reads (the Python side then raises). Sizes are checked against the arrays there.
//
// exp(x): Cephes-style range reduction x = n ln2 + r, |r| <= ln2 / 2, a degree-7
// polynomial for e^r and 2^n written straight into the exponent bits; relative
// error ~2e-7 on [-87.3, 88.3] (inputs outside are clamped to those ends).

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <atomic>
#include <mutex>
#include <new>
#include <thread>
#include <utility>
#include <vector>

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

// Softmax of scale * x over each row of a contiguous [rows, cols] buffer into out (scale >
// 0); out may be x itself (the attention kernel's own score buffer).
DISPATCH void s2dit_softmax_rows(const float* x, float* out, int64_t rows, int64_t cols,
                                 float scale) {
  for (int64_t row = 0; row < rows; ++row) {
    const float* a = x + row * cols;
    float* o = out + row * cols;
    vfloat m = splat(-__builtin_inff());
    for (int64_t i = 0; i < cols; i += LANES) {
      int64_t n = cols - i < LANES ? cols - i : LANES;
      m = vmax(m, load(a + i, n, -__builtin_inff()));
    }
    const float top = hmax(m);
    vfloat total = splat(0.0f);
    for (int64_t i = 0; i < cols; i += LANES) {
      int64_t n = cols - i < LANES ? cols - i : LANES;
      vfloat e = vexp((load(a + i, n, -__builtin_inff()) - top) * scale);
      if (n < LANES) {
        for (int64_t j = n; j < LANES; ++j) e[j] = 0.0f;  // padding adds nothing
      }
      total += e;
      store(o + i, e, n);
    }
    const float inv = 1.0f / hsum(total);
    for (int64_t i = 0; i < cols; i += LANES) {
      int64_t n = cols - i < LANES ? cols - i : LANES;
      store(o + i, load(o + i, n, 0.0f) * inv, n);
    }
  }
}

// out = x * sigmoid(x) over count elements.
DISPATCH void s2dit_silu_range(const float* x, float* out, int64_t count) {
  for (int64_t i = 0; i < count; i += LANES) {
    int64_t n = count - i < LANES ? count - i : LANES;
    vfloat v = load(x + i, n, 0.0f);
    store(out + i, v / (1.0f + vexp(-v)), n);
  }
}

// out = GELU(x), tanh approximation: 0.5 x (1 + tanh(y)) = x * sigmoid(2y),
// y = sqrt(2 / pi) (x + 0.044715 x^3).
DISPATCH void s2dit_gelu_tanh_range(const float* x, float* out, int64_t count) {
  for (int64_t i = 0; i < count; i += LANES) {
    int64_t n = count - i < LANES ? count - i : LANES;
    vfloat v = load(x + i, n, 0.0f);
    vfloat z = 1.5957691216057308f * (v + 0.044715f * v * v * v);
    store(out + i, v / (1.0f + vexp(-z)), n);
  }
}

}  // extern "C"

// ---------------------------------------------------------------------------------------
// GEMM and direct convolution: C[M, N] = bias + A[M, K] @ B[N, K]^T, float32, row-major.
//
// The micro-kernel reads A in place through one pointer per row (scalar broadcasts, so A
// is never packed), which lets A be implicit: for a convolution, row m of A for kernel
// tap (dt, dh, dw) is the input pixel under output position m, or a row of zeros in the
// padding. Temporal history frames, zero padding and 2x nearest upsampling are therefore
// all free: nothing is concatenated, padded or unfolded in memory.

namespace {

constexpr int MR = 12, NR = 32;
// Blocks: K in chunks of KC (one kernel tap at a time), MC rows of C per block (its A rows
// stay in L2), B packed NC columns at a time; measured on the CI machine's AMD EPYC.
constexpr int64_t KC = 384, MC = 96, NC = 512;

// Work buffers kept between calls. A fresh vector per call (18 MB of packed B for the Wan
// FFN's down projection) costs a zero fill and its page faults every time. A caller takes a
// buffer for the length of its work and gives it back, so concurrent calls never share one.
class Scratch {
 public:
  explicit Scratch(size_t count) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      if (!free_.empty()) {
        buf_ = std::move(free_.back());
        free_.pop_back();
      }
    }
    if (buf_.size() < count) buf_.resize(count);
  }
  ~Scratch() {
    try {
      std::lock_guard<std::mutex> lock(mutex_);
      free_.push_back(std::move(buf_));
    } catch (...) {
      // No room to keep it: the buffer is simply freed.
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  float* data() { return buf_.data(); }

 private:
  std::vector<float> buf_;
  static inline std::mutex mutex_;
  static inline std::vector<std::vector<float>> free_;
};

// B as the GEMM reads it: element (n, k) is b[n * ld + k], or b[k * ld + n] when `kn`.
struct MatrixB {
  const float* b;
  int64_t ld;
  bool kn;
};

// Columns [n0, n0 + nc) of B into NR-column panels over all K: panel[k][j] (zero columns
// past N).
void pack_b(const MatrixB& B, int64_t K, int64_t n0, int64_t nc, int64_t N, float* out) {
  for (int64_t j0 = 0; j0 < nc; j0 += NR) {
    float* dst = out + j0 * K;
    const int64_t valid = N - (n0 + j0) < NR ? N - (n0 + j0) : NR;
    if (B.kn) {
      for (int64_t k = 0; k < K; ++k) {
        const float* src = B.b + k * B.ld + n0 + j0;
        for (int j = 0; j < NR; ++j) dst[k * NR + j] = j < valid ? src[j] : 0.0f;
      }
      continue;
    }
    for (int j = 0; j < NR; ++j) {
      const float* src = B.b + (n0 + j0 + j) * B.ld;
      for (int64_t k = 0; k < K; ++k) dst[k * NR + j] = j < valid ? src[k] : 0.0f;
    }
  }
}

// c[MR, NR] (row stride ldc) = A rows @ b_panel over kc, plus either c itself (first
// false) or bias[0..NR) (first true; bias may be NULL). A row r is rows[r][0..kc), read in
// place. Only mr x nr of c is written.
__attribute__((target("avx512f"))) void micro_kernel(int64_t kc, const float* const* rows,
                                                     const float* __restrict b, float* c,
                                                     int64_t ldc, int mr, int nr, bool first,
                                                     const float* bias) {
  vfloat acc[MR][2];
  for (int r = 0; r < MR; ++r) {
    acc[r][0] = vfloat{};
    acc[r][1] = vfloat{};
  }
  const float* a[MR];
  for (int r = 0; r < MR; ++r) a[r] = rows[r];
  for (int64_t k = 0; k < kc; ++k) {
    vfloat b0, b1;
    memcpy(&b0, b + k * NR, 64);
    memcpy(&b1, b + k * NR + 16, 64);
#pragma GCC unroll 12
    for (int r = 0; r < MR; ++r) {
      const float s = a[r][k];
      acc[r][0] += s * b0;
      acc[r][1] += s * b1;
    }
  }
  if (mr == MR && nr == NR) {
    vfloat base0 = vfloat{}, base1 = vfloat{};
    if (first && bias) {
      memcpy(&base0, bias, 64);
      memcpy(&base1, bias + 16, 64);
    }
    for (int r = 0; r < MR; ++r) {
      vfloat c0 = base0, c1 = base1;
      if (!first) {
        memcpy(&c0, c + r * ldc, 64);
        memcpy(&c1, c + r * ldc + 16, 64);
      }
      c0 += acc[r][0];
      c1 += acc[r][1];
      memcpy(c + r * ldc, &c0, 64);
      memcpy(c + r * ldc + 16, &c1, 64);
    }
    return;
  }
  for (int r = 0; r < mr; ++r) {
    for (int j = 0; j < nr; ++j) {
      const float base = first ? (bias ? bias[j] : 0.0f) : c[r * ldc + j];
      c[r * ldc + j] = base + acc[r][j / 16][j % 16];
    }
  }
}

// A plain matrix: row m is a + m * lda; one "tap".
struct MatrixRows {
  const float* a;
  int64_t lda, K;
  int64_t taps() const { return 1; }
  int64_t cin() const { return K; }
  const float* row(int64_t m, int64_t) const { return a + m * lda; }
};

// A convolution's implicit im2col. Output position m = (t, y, x) on the [T, Ho, Wo] grid;
// tap (dt, dh, dw) reads frame t + dt at (y + dh - ph, x + dw - pw) of the (upsampled by
// `up`) input, or zeros outside it.
struct ConvRows {
  const float* const* frames;  // T + kt - 1 frames, each [H, W, cin] (NULL: all zeros)
  int64_t h, w, c, up, kt, kh, kw, ph, pw, ho, wo;
  const float* zeros;
  int64_t taps() const { return kt * kh * kw; }
  int64_t cin() const { return c; }
  const float* row(int64_t m, int64_t tap) const {
    const int64_t x = m % wo, y = (m / wo) % ho, t = m / (wo * ho);
    const int64_t dw = tap % kw, dh = (tap / kw) % kh, dt = tap / (kw * kh);
    const int64_t yy = y + dh - ph, xx = x + dw - pw;
    if (yy < 0 || xx < 0 || yy >= h * up || xx >= w * up || !frames[t + dt]) return zeros;
    return frames[t + dt] + ((yy / up) * w + xx / up) * c;
  }
};

// Rows [m_begin, m_end) x columns [0, nc) of C (row stride ldc) = bias + A @ B, with B's
// columns already packed by pack_b (over all of K).
template <class Rows>
void multiply(const Rows& A, const float* packed, const float* bias, float* c, int64_t ldc,
              int64_t m_begin, int64_t m_end, int64_t nc) {
  const int64_t cin = A.cin(), K = A.taps() * cin;
  for (int64_t m0 = m_begin; m0 < m_end; m0 += MC) {
    const int64_t mc = m_end - m0 < MC ? m_end - m0 : MC;
    for (int64_t tap = 0; tap < A.taps(); ++tap) {
      for (int64_t c0 = 0; c0 < cin; c0 += KC) {
        const int64_t kc = cin - c0 < KC ? cin - c0 : KC;
        const float* panel = packed + (tap * cin + c0) * NR;
        for (int64_t j = 0; j < nc; j += NR) {
          const int nr = nc - j < NR ? (int)(nc - j) : NR;
          for (int64_t i = 0; i < mc; i += MR) {
            const int mr = mc - i < MR ? (int)(mc - i) : MR;
            const float* rows[MR];
            for (int r = 0; r < MR; ++r) {
              // Rows past the tile's end repeat its last row (computed, never written).
              rows[r] = A.row(m0 + i + (r < mr ? r : mr - 1), tap) + c0;
            }
            micro_kernel(kc, rows, panel + j * K, c + (m0 + i) * ldc + j, ldc, mr, nr,
                         tap == 0 && c0 == 0, bias ? bias + j : nullptr);
          }
        }
      }
    }
  }
}

// Run work(0..count) on up to `count` threads (the caller's among them); threads block in
// join, never spin. A share whose thread cannot be started runs on the caller's. Returns
// false when any share failed (out of memory): an exception must not leave a thread.
template <class Work>
bool run_shared(int64_t count, const Work& work) {
  std::atomic<bool> failed{false};
  auto guarded = [&](int64_t t) {
    try {
      work(t);
    } catch (...) {
      failed = true;
    }
  };
  std::vector<std::thread> pool;
  int64_t started = 1;  // share 0 is the caller's
  try {
    pool.reserve(count > 1 ? count - 1 : 0);
    for (; started < count; ++started) pool.emplace_back(guarded, started);
  } catch (...) {
    // No more threads (or no memory for them): the caller runs the rest.
  }
  guarded(0);
  for (int64_t t = started; t < count; ++t) guarded(t);
  for (auto& th : pool) th.join();
  return !failed;
}

constexpr int64_t round_up(int64_t n, int64_t to) { return (n + to - 1) / to * to; }

// Items 0..count-1 handed out one at a time to up to `threads` threads (the caller's among
// them). A thread the OS deschedules (another busy process) simply takes fewer items: nobody
// waits for a fixed share of a slow thread, and nobody spins.
template <class Item>
bool parallel_items(int64_t count, int64_t threads, const Item& item) {
  if (threads > count) threads = count;
  if (threads < 1) threads = 1;
  std::atomic<int64_t> next{0};
  return run_shared(threads, [&](int64_t) {
    for (int64_t i = next++; i < count; i = next++) item(i);
  });
}

// C[M, N] = bias + A @ B on up to `threads` threads: B is packed once (NC-column blocks, by
// whichever threads are free), then (MC rows x NC columns) tiles of C go to threads as they
// come free, each tile written by one thread. The packed B (the size of B) is a pooled
// buffer, kept for the next call.
template <class Rows>
bool gemm(const Rows& A, int64_t M, int64_t N, const MatrixB& B, const float* bias, float* c,
          int64_t ldc, int64_t threads) {
  const int64_t K = A.taps() * A.cin();
  const int64_t col_blocks = (N + NC - 1) / NC, row_blocks = (M + MC - 1) / MC;
  try {
    Scratch packed(round_up(N, NR) * K);
    float* p = packed.data();
    const bool ok = parallel_items(col_blocks, threads, [&](int64_t j) {
      const int64_t n0 = j * NC, nc = N - n0 < NC ? N - n0 : NC;
      pack_b(B, K, n0, round_up(nc, NR), N, p + n0 * K);
    });
    return ok && parallel_items(col_blocks * row_blocks, threads, [&](int64_t t) {
      // Column block outermost: consecutive tiles reuse one packed block of B.
      const int64_t n0 = t / row_blocks * NC, m0 = t % row_blocks * MC;
      const int64_t nc = N - n0 < NC ? N - n0 : NC, m1 = M - m0 < MC ? M : m0 + MC;
      multiply(A, p + n0 * K, bias ? bias + n0 : nullptr, c + n0, ldc, m0, m1, nc);
    });
  } catch (...) {
    return false;
  }
}

// Softmax of scale * x over `rows` rows of `cols` values, row stride ld, in place.
void softmax_strided(float* x, int64_t rows, int64_t cols, int64_t ld, float scale) {
  for (int64_t r = 0; r < rows; ++r) s2dit_softmax_rows(x + r * ld, x + r * ld, 1, cols, scale);
}

// An elementwise function over count elements on up to `threads` threads, in chunks.
constexpr int64_t CHUNK = LANES * 4096;

template <class Range>
int elementwise(const float* x, float* out, int64_t count, int64_t threads, Range range) {
  if (count < 0 || threads < 1) return 1;
  const bool ok = parallel_items((count + CHUNK - 1) / CHUNK, threads, [&](int64_t i) {
    const int64_t lo = i * CHUNK;
    range(x + lo, out + lo, count - lo < CHUNK ? count - lo : CHUNK);
  });
  return ok ? 0 : 1;
}

// One (batch, head) of attention: k and v are packed once, then query rows go in tiles of
// `tile`: scores = q k^T into `scores` (row stride ld, kept in cache), softmax(scale *
// scores) in place, out = scores v.
void attention_head(const float* q, int64_t ldq, const float* k, int64_t ldk, const float* v,
                    int64_t ldv, float* out, int64_t ldo, int64_t lq, int64_t lk, int64_t d,
                    float scale, int64_t tile, float* scores, float* packed_k,
                    float* packed_v) {
  const int64_t ld = round_up(lk, 16);  // whole cache lines per score row
  pack_b(MatrixB{k, ldk, false}, d, 0, round_up(lk, NR), lk, packed_k);
  pack_b(MatrixB{v, ldv, true}, lk, 0, round_up(d, NR), d, packed_v);
  for (int64_t i = 0; i < lq; i += tile) {
    const int64_t rows = lq - i < tile ? lq - i : tile;
    multiply(MatrixRows{q + i * ldq, ldq, d}, packed_k, nullptr, scores, ld, 0, rows, lk);
    softmax_strided(scores, rows, lk, ld, scale);
    multiply(MatrixRows{scores, ld, lk}, packed_v, nullptr, out + i * ldo, ldo, 0, rows, d);
  }
}

}  // namespace

extern "C" {

#define S2DIT_FAILED 1

// out = SiLU(x), out = GELU-tanh(x), and out = the softmax of each of `rows` rows of `cols`
// values of x: separate buffers, on up to `threads` threads. 0, or S2DIT_FAILED.
int s2dit_silu(const float* x, float* out, int64_t count, int64_t threads) {
  return elementwise(x, out, count, threads, s2dit_silu_range);
}

int s2dit_gelu_tanh(const float* x, float* out, int64_t count, int64_t threads) {
  return elementwise(x, out, count, threads, s2dit_gelu_tanh_range);
}

int s2dit_softmax(const float* x, float* out, int64_t rows, int64_t cols, int64_t threads) {
  if (rows < 0 || cols < 1 || threads < 1) return S2DIT_FAILED;
  const int64_t per = cols < CHUNK ? CHUNK / cols : 1;  // rows per item
  const bool ok = parallel_items((rows + per - 1) / per, threads, [&](int64_t i) {
    const int64_t lo = i * per, n = rows - lo < per ? rows - lo : per;
    s2dit_softmax_rows(x + lo * cols, out + lo * cols, n, cols, 1.0f);
  });
  return ok ? 0 : S2DIT_FAILED;
}

// Whether this CPU runs the GEMM's micro-kernel (AVX-512F).
int s2dit_gemm_supported(void) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") ? 1 : 0;
#else
  return 0;
#endif
}

// c[M, N] = bias + a[M, K] (row stride lda) @ b[N, K]^T; bias may be NULL.
int s2dit_linear(int64_t M, int64_t N, int64_t K, const float* a, int64_t lda, const float* b,
                 const float* bias, float* c, int64_t threads) {
  if (M < 0 || N < 1 || K < 1 || lda < K) return S2DIT_FAILED;
  return gemm(MatrixRows{a, lda, K}, M, N, MatrixB{b, K, false}, bias, c, N, threads)
             ? 0
             : S2DIT_FAILED;
}

// Softmax attention over [batch, heads, L, d] operands given by element strides (the last
// axis contiguous): strides[0..11] = q, k, v, out strides of (batch, head, row). Heads are
// spread over threads (a single head runs on one); each keeps a [tile, lk] score buffer.
int s2dit_attention(int64_t batch, int64_t heads, int64_t lq, int64_t lk, int64_t d,
                    const float* q, const float* k, const float* v, float* out,
                    const int64_t* strides, float scale, int64_t tile, int64_t threads) {
  if (batch < 0 || heads < 0 || lq < 0 || lk < 1 || d < 1 || tile < 1) return S2DIT_FAILED;
  const int64_t *sq = strides, *sk = strides + 3, *sv = strides + 6, *so = strides + 9;
  const int64_t pairs = batch * heads;
  if (threads > pairs) threads = pairs;
  if (threads < 1) threads = 1;
  // Heads go to threads as they come free, each thread with its own buffers.
  std::atomic<int64_t> next{0};
  const bool ok = run_shared(threads, [&](int64_t) {
    Scratch scores(tile * round_up(lk, 16));
    Scratch packed_k(round_up(lk, NR) * d), packed_v(round_up(d, NR) * lk);
    for (int64_t p = next++; p < pairs; p = next++) {
      const int64_t b = p / heads, h = p % heads;
      attention_head(q + b * sq[0] + h * sq[1], sq[2], k + b * sk[0] + h * sk[1], sk[2],
                     v + b * sv[0] + h * sv[1], sv[2], out + b * so[0] + h * so[1], so[2], lq,
                     lk, d, scale, tile, scores.data(), packed_k.data(), packed_v.data());
    }
  });
  return ok ? 0 : S2DIT_FAILED;
}

// A direct 3D convolution, stride 1, zero padding (ph, pw) in space, none in time:
// frames[t_in] are [h, w, cin] inputs (NULL: zeros; seen `up`x nearest-upsampled), weight is
// [cout, kt, kh, kw, cin], out is [t_in - kt + 1, h*up + 2ph - kh + 1, w*up + 2pw - kw + 1,
// cout] = bias + conv; bias may be NULL.
int s2dit_conv3d(const float* const* frames, int64_t t_in, int64_t h, int64_t w, int64_t cin,
                 int64_t up, int64_t kt, int64_t kh, int64_t kw, int64_t ph, int64_t pw,
                 const float* weight, const float* bias, int64_t cout, float* out,
                 int64_t threads) {
  if (h < 1 || w < 1 || cin < 1 || up < 1 || kt < 1 || kh < 1 || kw < 1 || ph < 0 || pw < 0 ||
      cout < 1 || t_in < kt)
    return S2DIT_FAILED;
  const int64_t ho = h * up + 2 * ph - kh + 1, wo = w * up + 2 * pw - kw + 1;
  if (ho < 1 || wo < 1) return S2DIT_FAILED;
  try {
    std::vector<float> zeros(cin, 0.0f);
    const ConvRows A{frames, h, w, cin, up, kt, kh, kw, ph, pw, ho, wo, zeros.data()};
    const MatrixB B{weight, kt * kh * kw * cin, false};
    return gemm(A, (t_in - kt + 1) * ho * wo, cout, B, bias, out, cout, threads) ? 0
                                                                                  : S2DIT_FAILED;
  } catch (...) {
    return S2DIT_FAILED;
  }
}

}  // extern "C"
