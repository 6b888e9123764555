// Adan's step over compact state on the CPU, one pass per element: the same expressions as
// adan.kernels.compact (the eager path), in the same order, with the same bits.
//
// Built by adan.kernels.cpu_native for one variant at a time:
//   ADAN_P, ADAN_G, ADAN_B  parameter, gradient and float-buffer element types (codes below)
//   ADAN_FMT                0 float buffers of type ADAN_B, 1 bfloat16 rounded stochastically,
//                           2 the 8-bit block codes (adan.numeric.codes)
//   the codes' constants (ADAN_S_*, ADAN_U_*: signed and unsigned codes) from MxCode.
// Compiled with -ffp-contract=off and without -ffast-math: every float operation is IEEE's,
// rounded once, as torch's eager kernels round it.

#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <type_traits>
#include <vector>

namespace {

// Element types by code: 0 float, 1 bfloat16 (its bits), 2 float16 (its bits: converted by
// integer operations, which the compiler vectorises where it does not vectorise _Float16's
// conversions), 3 double.
template <int C> struct Type;
template <> struct Type<0> { using T = float; };
template <> struct Type<1> { using T = uint16_t; };
template <> struct Type<2> { using T = uint16_t; };
template <> struct Type<3> { using T = double; };

using P = Type<ADAN_P>::T;
using G = Type<ADAN_G>::T;
using B = Type<ADAN_B>::T;
using W = float;  // the work type (float64 parameters take the eager path)

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

// float16 to float, exactly: the exponent and mantissa moved to a float's place, times
// 2**112 (a float16 subnormal is then a float subnormal times a power of two); infinity and
// NaN keep their bits.
inline float half_to_float(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t rest = static_cast<uint32_t>(h & 0x7fffu) << 13;
  float finite = bits_to_float(rest) * 0x1p112f;
  uint32_t bits = rest >= (0x7c00u << 13) ? rest | 0x7f800000u : float_to_bits(finite);
  return bits_to_float(bits | sign);
}

// float to float16, rounded to nearest even as torch rounds it (NaN to 0x7e00 and its sign):
// below float16's normal range by adding 0.5 (the float addition rounds at float16's last
// subnormal bit), above it by adding half a unit less one, plus the kept mantissa's last bit.
inline uint16_t float_to_half(float f) {
  uint32_t x = float_to_bits(f);
  uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  uint32_t sub = float_to_bits(bits_to_float(x) + 0.5f) - 0x3f000000u;
  uint32_t normal = (x + 0xc8000fffu + ((x >> 13) & 1u)) >> 13;  // exponent - 112, rounded
  uint32_t h = x < 0x38800000u ? sub : normal;
  h = x >= 0x47800000u ? 0x7c00u : h;  // too large: infinity
  h = x > 0x7f800000u ? 0x7e00u : h;
  return static_cast<uint16_t>(h | sign);
}

// Loads widen exactly, but double to float (rounded to nearest, as torch's .to() rounds).
template <int C> inline W load(typename Type<C>::T x) {
  if constexpr (C == 1) {
    return static_cast<W>(bits_to_float(static_cast<uint32_t>(x) << 16));
  } else if constexpr (C == 2) {
    return half_to_float(x);
  } else {
    return static_cast<W>(x);
  }
}

// torch's float to bfloat16: round to nearest even, NaN to the quiet NaN 0x7fc0.
inline uint16_t bf16_nearest(float f) {
  uint32_t u = float_to_bits(f);
  if (f != f) return 0x7fc0;
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

template <int C> inline typename Type<C>::T store(W x) {
  if constexpr (C == 1) {
    return bf16_nearest(static_cast<float>(x));
  } else if constexpr (C == 2) {
    return float_to_half(x);
  } else {
    return static_cast<typename Type<C>::T>(x);
  }
}

// adan.numeric.codes.mix32 on 32-bit words (the int64 original keeps the low 32 bits).
inline uint32_t mix32(uint32_t x) {
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  x = ((x >> 16) ^ x) * 0x45D9F3Bu;
  return (x >> 16) ^ x;
}

// adan.kernels.compact.rounded_sqrt: the correctly rounded square root, which the processor's
// float32 instruction computes (equal to rounding the float64 root, as the eager path does).
inline W rounded_sqrt(W x) { return std::sqrt(x); }

// Positions in the scalar vector (adan.kernels.compact).
enum { FACTOR, B1, OMB1, B2, OMB2, B3, OMB3, IBC1, B2BC2, IBC3, EPS, KEEP, LR, FIRST, STEP };

struct Args {
  P* p;
  const G* g;
  void* buf[4];
  uint8_t* scale[4];
  W s[15];
  uint32_t key[3];  // each noise word's key: mix32((seed ^ mix32(step)) + word * GOLDEN)
  int64_t numel;
};

// Noise word ``key`` of the element at index ``i`` modulo 2**32
// (adan.kernels.compact.noise_word).
inline uint32_t noise(uint32_t key, uint32_t i) { return mix32(i + key); }

// One element's update from decoded values (adan.kernels.compact.adan_update).
struct Moments {
  W p, m, v, n, g;
};

inline Moments update(const W* s, W p, W g, W m, W v, W n, W prev) {
  g = g * s[FACTOR];
  prev = s[FIRST] > 0 ? g : prev;  // g_0 := g_1
  W diff = g - prev;
  m = m * s[B1] + g * s[OMB1];
  v = v * s[B2] + diff * s[OMB2];
  W nesterov = g + diff * s[B2];
  n = n * s[B3] + nesterov * nesterov * s[OMB3];
  W denom = rounded_sqrt(n) * s[IBC3] + s[EPS];
  W u = (m * s[IBC1] + v * s[B2BC2]) / denom;
  return {p * s[KEEP] - u * s[LR], m, v, n, g};
}

// adan.numeric.codes.round_to_bf16 with noise: add 16 random bits to the dropped ones, cut.
inline float round_bf16(W x, uint32_t noise16) {
  return bits_to_float((float_to_bits(static_cast<float>(x)) + noise16) & 0xffff0000u);
}

// The parameter's new value: bfloat16 rounded with noise word 2 (``word``) if ``ROUND_P``.
template <bool ROUND_P>
inline P store_param(W x, uint32_t word) {
  if constexpr (ROUND_P) {
    return static_cast<P>(float_to_bits(round_bf16(x, word & 0xffffu)) >> 16);
  } else {
    return store<ADAN_P>(x);
  }
}

// Elements a thread takes at a time: their noise words are hashed in a loop of their own.
constexpr int CHUNK = 64;

#if ADAN_FMT != 2

// Float buffers, or bfloat16 rounded with noise words 0 and 1: element by element.
using S = std::conditional_t<ADAN_FMT == 1, uint16_t, B>;
constexpr int SC = ADAN_FMT == 1 ? 1 : ADAN_B;

template <bool ROUND_P>
void chunk(const Args& a, int64_t i0, int len) {
  alignas(64) uint32_t w0[CHUNK], w1[CHUNK], w2[CHUNK];
  const uint32_t base = static_cast<uint32_t>(i0);
  if constexpr (ADAN_FMT == 1) {
    for (int j = 0; j < CHUNK; j++) w0[j] = noise(a.key[0], base + j);
    for (int j = 0; j < CHUNK; j++) w1[j] = noise(a.key[1], base + j);
  }
  if constexpr (ROUND_P) {
    for (int j = 0; j < CHUNK; j++) w2[j] = noise(a.key[2], base + j);
  }
  S* __restrict m = static_cast<S*>(a.buf[0]) + i0;
  S* __restrict v = static_cast<S*>(a.buf[1]) + i0;
  S* __restrict n = static_cast<S*>(a.buf[2]) + i0;
  S* __restrict prev = static_cast<S*>(a.buf[3]) + i0;
  P* __restrict p = a.p + i0;
  const G* __restrict g = a.g + i0;
#pragma GCC ivdep  // the tensors do not overlap (each is its own allocation)
  for (int j = 0; j < len; j++) {
    Moments x = update(a.s, load<ADAN_P>(p[j]), load<ADAN_G>(g[j]), load<SC>(m[j]),
                       load<SC>(v[j]), load<SC>(n[j]), load<SC>(prev[j]));
    if constexpr (ADAN_FMT == 1) {
      m[j] = static_cast<uint16_t>(float_to_bits(round_bf16(x.m, w0[j] & 0xffffu)) >> 16);
      v[j] = static_cast<uint16_t>(float_to_bits(round_bf16(x.v, w0[j] >> 16)) >> 16);
      n[j] = static_cast<uint16_t>(float_to_bits(round_bf16(x.n, w1[j] & 0xffffu)) >> 16);
      prev[j] = static_cast<uint16_t>(float_to_bits(round_bf16(x.g, w1[j] >> 16)) >> 16);
    } else {
      m[j] = store<SC>(x.m);
      v[j] = store<SC>(x.v);
      n[j] = store<SC>(x.n);
      prev[j] = store<SC>(x.g);
    }
    p[j] = store_param<ROUND_P>(x.p, ROUND_P ? w2[j] : 0u);
  }
}

template <bool ROUND_P>
void run(const Args& a, int64_t lo, int64_t hi) {
  for (int64_t i = lo; i < hi; i += CHUNK) {
    chunk<ROUND_P>(a, i, hi - i < CHUNK ? static_cast<int>(hi - i) : CHUNK);
  }
}

constexpr int64_t GRAIN = CHUNK;  // threads split the elements at cache lines

// Elements the step visits.
inline int64_t extent(int64_t numel) { return numel; }

#else

// The 8-bit block codes: blocks of 32, each decoded, updated and encoded in local arrays
// (vector registers and the L1 cache).
constexpr int BLOCK = 32;
constexpr int64_t GRAIN = BLOCK;

// Elements the step visits: every block with a scale byte (the last may be empty).
inline int64_t extent(int64_t numel) { return (numel / BLOCK + 1) * BLOCK; }

struct Code {
  int32_t bias, lowest, bump, reserved;
  uint32_t nearest, noise_offset;
};

constexpr Code SIGNED = {ADAN_S_BIAS, ADAN_S_LOWEST, ADAN_S_BUMP, ADAN_S_RESERVED,
                         ADAN_S_NEAREST, ADAN_S_NOISE_OFFSET};
constexpr Code UNSIGNED = {ADAN_U_BIAS, ADAN_U_LOWEST, ADAN_U_BUMP, ADAN_U_RESERVED,
                           ADAN_U_NEAREST, ADAN_U_NOISE_OFFSET};

// 2**e as a float, from its bits (e within float's normal range).
inline float pow2(int32_t e) { return bits_to_float(static_cast<uint32_t>(e + 127) << 23); }

// adan.numeric.codes.mx_decode_rows for one block.
template <bool SIGN>
inline void decode(const void* codes, uint8_t scale, W* out) {
  constexpr Code c = SIGN ? SIGNED : UNSIGNED;
  const float factor = pow2(scale - c.bias);
  for (int j = 0; j < BLOCK; j++) {
    uint32_t k = static_cast<const uint8_t*>(codes)[j];
    float value;
    // The code's bits at a float's bit 20, times a power of two, exactly (a subnormal code
    // is a float subnormal times a power of two): E4M3 (0x7F NaN) times 2**120; n, a
    // float16's top byte (0xF8 +inf), times 2**112.
    if constexpr (SIGN) {  // the byte at the top, moved down 4 keeping the sign: bit 20 up
      int32_t top = static_cast<int32_t>(k << 24) >> 4;
      value = bits_to_float(static_cast<uint32_t>(top) & 0x87ffffffu) * 0x1p120f;
      value = std::fabs(value) > 448.0f ? NAN : value;  // 0x7F and 0xFF decode to 480
    } else {
      value = bits_to_float(k << 20) * 0x1p112f;
      value = k >= 0xf8u ? INFINITY : value;
    }
    out[j] = value * factor;
  }
}

// E4M3's magnitude code of a float's magnitude bits ``a`` in E4M3's normal range (2**-6 and
// up, at most 448 plus half a code gap), rounded to nearest even as torch's float8_e4m3fn
// conversion and a GPU's cvt round it: the exponent rebiased from float's 127 to E4M3's 7
// in the same addition.
inline uint32_t e4m3_normal(uint32_t a) {
  return (a + (0x7ffffu - (120u << 23)) + ((a >> 20) & 1u)) >> 20;
}

// The same below E4M3's normal range: adding 2**23 to |y| * 2**9 rounds at E4M3's last
// subnormal bit.
inline uint32_t e4m3_subnormal(uint32_t a) {
  return float_to_bits(bits_to_float(a) * 512.0f + 0x1p23f) - 0x4b000000u;
}

// adan.numeric.codes.mx_encode_rows for one block; ``word`` the elements' noise words and
// ``part`` which 10 bits of them (-1: round to nearest). Returns the scale byte.
template <bool SIGN>
inline uint8_t encode(const W* x, const uint32_t* word, int part, void* codes) {
  constexpr Code c = SIGN ? SIGNED : UNSIGNED;
  // The largest finite magnitude's bits: the largest of all, unless that is not finite (rare:
  // then again without the non-finite ones).
  uint32_t top = 0;
  for (int j = 0; j < BLOCK; j++) {
    uint32_t bits = float_to_bits(x[j]) & 0x7fffffffu;
    top = bits > top ? bits : top;
  }
  if (top >= 0x7f800000u) {
    top = 0;
    for (int j = 0; j < BLOCK; j++) {
      uint32_t bits = float_to_bits(x[j]) & 0x7fffffffu;
      top = bits > top && bits < 0x7f800000u ? bits : top;
    }
  }
  int32_t s = static_cast<int32_t>(top + c.bump) >> 23;
  s = s < c.lowest ? c.lowest : s;
  if constexpr (SIGN) {
    const float up = pow2(c.bias - s);
    for (int j = 0; j < BLOCK; j++) {
      uint32_t y = float_to_bits(x[j] * up);  // finite where x is (it is at most 448)
      uint32_t a = y & 0x7fffffffu;
      bool finite = a < 0x7f800000u;
      uint32_t mag;
      if (part >= 0) {  // stochastically, but zero below E4M3's normal range
        uint32_t add = (((word[j] >> (10 * part)) & 0x3ffu) << 10) + c.noise_offset;
        mag = a >= 0x3c800000u ? e4m3_normal(a + add) : 0u;
      } else {
        mag = a >= 0x3c800000u ? e4m3_normal(a) : e4m3_subnormal(a);
      }
      uint32_t code = finite ? mag | ((y >> 24) & 0x80u) : static_cast<uint32_t>(c.reserved);
      static_cast<uint8_t*>(codes)[j] = static_cast<uint8_t>(code);
    }
  } else {
    // |x| * 2**(30 - s) in two exact steps: then the code is its bits shifted right by 20,
    // the subnormal codes being float subnormals (as the Triton kernel computes it).
    const float down = pow2(c.bias - 6 - s);
    for (int j = 0; j < BLOCK; j++) {
      uint32_t bits = float_to_bits(x[j]) & 0x7fffffffu;
      bool finite = bits < 0x7f800000u;
      float t = bits_to_float(bits) * down;  // a non-finite element's code is replaced below
      uint32_t y = float_to_bits(t * 0x1p-106f);
      uint32_t add = part < 0 ? c.nearest
                              : (((word[j] >> (10 * part)) & 0x3ffu) << 10) + c.noise_offset;
      int32_t k = static_cast<int32_t>((y + add) >> 20);
      int32_t positive = x[j] > 0;
      int32_t code = finite ? (k > positive ? k : positive) : c.reserved;
      static_cast<uint8_t*>(codes)[j] = static_cast<uint8_t>(code);
    }
  }
  return static_cast<uint8_t>(s);
}

// One block of 32 elements at ``p``, ``g`` and the codes ``c``, with scale bytes ``scale``
// (block ``b`` of the tensor: its elements' noise follows their index in the tensor).
template <bool ROUND_P>
inline void step_block(const Args& a, int64_t b, P* p, const G* g, int8_t* const* c,
                       uint8_t* const* scale) {
  alignas(64) W q[4][BLOCK], out[BLOCK];
  alignas(64) uint32_t word[BLOCK], w2[BLOCK];
  decode<true>(c[0], *scale[0], q[0]);
  decode<true>(c[1], *scale[1], q[1]);
  decode<false>(c[2], *scale[2], q[2]);
  decode<true>(c[3], *scale[3], q[3]);
  const uint32_t base = static_cast<uint32_t>(b * BLOCK);
  for (int j = 0; j < BLOCK; j++) word[j] = noise(a.key[0], base + j);
  if constexpr (ROUND_P) {
    for (int j = 0; j < BLOCK; j++) w2[j] = noise(a.key[2], base + j);
  }
  for (int j = 0; j < BLOCK; j++) {
    Moments x = update(a.s, load<ADAN_P>(p[j]), load<ADAN_G>(g[j]), q[0][j], q[1][j],
                       q[2][j], q[3][j]);
    out[j] = x.p;
    q[0][j] = x.m;
    q[1][j] = x.v;
    q[2][j] = x.n;
    q[3][j] = x.g;
  }
  *scale[0] = encode<true>(q[0], word, 0, c[0]);
  *scale[1] = encode<true>(q[1], word, 1, c[1]);
  *scale[2] = encode<false>(q[2], word, 2, c[2]);
  *scale[3] = encode<true>(q[3], word, -1, c[3]);
  for (int j = 0; j < BLOCK; j++) p[j] = store_param<ROUND_P>(out[j], ROUND_P ? w2[j] : 0u);
}

template <bool ROUND_P>
void run(const Args& a, int64_t lo, int64_t hi) {
  for (int64_t b = lo / BLOCK; b * BLOCK < hi; b++) {
    const int64_t base = b * BLOCK;
    const int64_t count = a.numel - base < BLOCK ? a.numel - base : BLOCK;
    uint8_t* scale[4] = {a.scale[0] + b, a.scale[1] + b, a.scale[2] + b, a.scale[3] + b};
    int8_t* c[4];
    for (int k = 0; k < 4; k++) c[k] = static_cast<int8_t*>(a.buf[k]) + base;
    if (count == BLOCK) {
      step_block<ROUND_P>(a, b, a.p + base, a.g + base, c, scale);
      continue;
    }
    // The last block, zero-padded as adan.numeric.codes.mx_rows pads (the padding's new
    // values are zero or not finite, so it changes no scale), and the tensor's part written
    // back.
    P p[BLOCK] = {};
    G g[BLOCK] = {};
    int8_t codes[4][BLOCK] = {};
    int8_t* padded[4] = {codes[0], codes[1], codes[2], codes[3]};
    if (count > 0) {
      std::memcpy(p, a.p + base, count * sizeof(P));
      std::memcpy(g, a.g + base, count * sizeof(G));
      for (int k = 0; k < 4; k++) std::memcpy(codes[k], c[k], count);
    }
    step_block<ROUND_P>(a, b, p, g, padded, scale);
    if (count > 0) {
      std::memcpy(a.p + base, p, count * sizeof(P));
      for (int k = 0; k < 4; k++) std::memcpy(c[k], codes[k], count);
    }
  }
}

#endif

}  // namespace

extern "C" {

// The variant's identity, checked by the loader against what it asked for.
int adan_native_variant() {
  return ADAN_P | ADAN_G << 4 | ADAN_B << 8 | ADAN_FMT << 12;
}

// One step of one tensor of ``numel`` elements in place. ``buffers``: m, v, n, prev;
// ``scales``: their scale bytes (8-bit state; ``numel / 32 + 1`` each) or nulls; ``s``: the
// scalar vector; ``seed``: the state's int64 seed. Splits the work over ``threads`` threads.
// With ``may_skip`` a non-finite gradient factor writes nothing.
void adan_native_step(void* p, const void* g, void* m, void* v, void* n, void* prev,
                      uint8_t* sm, uint8_t* sv, uint8_t* sn, uint8_t* sprev, const void* s,
                      const int64_t* seed, int64_t numel, int stochastic_param, int may_skip,
                      int threads) {
  Args a;
  a.p = static_cast<P*>(p);
  a.g = static_cast<const G*>(g);
  void* bufs[4] = {m, v, n, prev};
  uint8_t* scales[4] = {sm, sv, sn, sprev};
  for (int k = 0; k < 4; k++) {
    a.buf[k] = bufs[k];
    a.scale[k] = scales[k];
  }
  std::memcpy(a.s, s, sizeof(a.s));
  if (may_skip && !std::isfinite(a.s[FACTOR])) return;
  a.numel = numel;
  // adan.kernels.compact.noise_word: key = seed ^ mix32(step), then per word w
  // mix32(key + w * GOLDEN), all modulo 2**32.
  uint32_t step = static_cast<uint32_t>(static_cast<int64_t>(a.s[STEP]));
  uint32_t key = static_cast<uint32_t>(*seed) ^ mix32(step);
  for (uint32_t w = 0; w < 3; w++) a.key[w] = mix32(key + w * 0x9E3779B9u);
  const int64_t end = extent(numel);
  // bfloat16 parameters rounded stochastically take noise word 2.
  auto* body = ADAN_P == 1 && stochastic_param ? run<true> : run<false>;
  if (threads <= 1 || end < 2 * GRAIN) {
    body(a, 0, end);
    return;
  }
  const int64_t units = (end + GRAIN - 1) / GRAIN;
  const int64_t per = (units + threads - 1) / threads;
#ifdef _OPENMP
  // torch's own OpenMP runtime (libgomp.so.1, already loaded by torch, is the one this
  // library links to): its workers, which spin a while after each of torch's parallel ops,
  // take the parts, rather than threads of ours competing with them for the cores.
#pragma omp parallel for num_threads(threads) schedule(static, 1)
  for (int t = 0; t < threads; t++) {
    const int64_t lo = t * per * GRAIN, hi = (t + 1) * per * GRAIN;
    if (lo < end) body(a, lo, hi < end ? hi : end);
  }
#else
  std::vector<std::thread> pool;
  for (int t = 1; t < threads && t * per < units; t++) {
    const int64_t lo = t * per * GRAIN, hi = (t + 1) * per * GRAIN;
    try {
      pool.emplace_back(body, std::cref(a), lo, hi < end ? hi : end);
    } catch (...) {  // no thread to be had: this one does that part too
      body(a, lo, hi < end ? hi : end);
    }
  }
  body(a, 0, per * GRAIN < end ? per * GRAIN : end);
  for (auto& th : pool) th.join();
#endif
}

}  // extern "C"
