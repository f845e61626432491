// Winograd F(m x m, 3 x 3) convolution as an XLA FFI handler, with a fused epilogue.
//
// y = pool(relu(conv3x3(x, kernel) + shift)), float32, NHWC, stride 1, any padding.
// Each m x m output tile is (A^T [(G g G^T) . (B^T d B)] A) (Lavin & Gray 2016): the
// 3x3 products become, per tile, (m+2)^2 independent channel matmuls, (m+2)^2 / (9 m^2)
// of the direct multiply-adds (F(2x2): 1/2.25, F(4x4): 1/4). The kernel arrives already
// transformed (U = G g G^T, by auxtl/cpu/winograd.py, with any per-channel scale folded
// in) as [(m+2)^2][ceil(Cout/16)][Cin][16]. Tiles are processed in blocks small
// enough that a block's transformed input stays in cache: input transform, matmuls,
// output transform with shift, ReLU and 2x2 max-pool, written straight to y.
// Blocks are spread over OpenMP threads. auxtl/cpu/winograd.py builds and registers this.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kLanes = 8;    // one vector: 8 floats (AVX2; AVX-512 splits nothing)
constexpr int kCols = 16;    // output channels per matmul column block (2 vectors)
constexpr int kRows = 6;     // tiles per matmul micro-kernel call

typedef float Vec __attribute__((vector_size(kLanes * sizeof(float))));

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof(v)); }
inline float Load1(const float* p) { return *p; }
inline void Store1(float* p, float v) { *p = v; }

// Transform matrices: input B^T (T x T), output A^T (m x T); T = m + 2.
template <int M>
struct Transform;

template <>
struct Transform<2> {
  static constexpr float BT[4][4] = {{1, 0, -1, 0}, {0, 1, 1, 0}, {0, -1, 1, 0}, {0, 1, 0, -1}};
  static constexpr float AT[2][4] = {{1, 1, 1, 0}, {0, 1, -1, -1}};
};

template <>
struct Transform<4> {
  static constexpr float BT[6][6] = {{4, 0, -5, 0, 1, 0},  {0, -4, -4, 1, 1, 0},
                                     {0, 4, -4, -1, 1, 0}, {0, -2, -1, 2, 1, 0},
                                     {0, 2, -1, -2, 1, 0}, {0, 4, 0, -5, 0, 1}};
  static constexpr float AT[4][6] = {{1, 1, 1, 1, 1, 0},
                                     {0, 1, -1, 2, -2, 0},
                                     {0, 1, 1, 4, 4, 0},
                                     {0, 1, -1, 8, -8, 1}};
};

// out[R][C] = sum_k mat[R][k] in[k][C] for one lane type L (a vector or a float); zero
// coefficients are skipped at compile time (the loops are fully unrolled).
template <int R, int K, int C, typename L>
inline void Left(const float (&mat)[R][K], const L (&in)[K][C], L (&out)[R][C]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      L acc = in[0][c] * 0.0f;
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        if (mat[r][k] == 1.0f) acc += in[k][c];
        else if (mat[r][k] == -1.0f) acc -= in[k][c];
        else if (mat[r][k] != 0.0f) acc += mat[r][k] * in[k][c];
      }
      out[r][c] = acc;
    }
  }
}

// out[R][C] = sum_k in[R][k] mat[C][k]  (right multiplication by mat^T).
template <int R, int K, int C, typename L>
inline void Right(const L (&in)[R][K], const float (&mat)[C][K], L (&out)[R][C]) {
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 8
    for (int c = 0; c < C; ++c) {
      L acc = in[r][0] * 0.0f;
#pragma GCC unroll 8
      for (int k = 0; k < K; ++k) {
        if (mat[c][k] == 1.0f) acc += in[r][k];
        else if (mat[c][k] == -1.0f) acc -= in[r][k];
        else if (mat[c][k] != 0.0f) acc += mat[c][k] * in[r][k];
      }
      out[r][c] = acc;
    }
  }
}

struct Shape {
  int64_t n, h, w, c;      // input NHWC
  int64_t o;               // output channels
  int64_t ch, cw;          // convolution output size (before pooling)
  int64_t oh, ow;          // stored output size
  int64_t pad_top, pad_left;
  bool relu, pool;
};

// V[k][t][c] = (B^T d B)[k] for tile t of the block, d the T x T input patch.
template <int M, typename L, int W>
inline void InputTransformLanes(const float* const (&rows)[M + 2][M + 2], int64_t c,
                                float* v, int64_t plane) {
  constexpr int T = M + 2;
  L d[T][T], tmp[T][T], out[T][T];
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < T; ++j) {
      if constexpr (W == 1) d[i][j] = rows[i][j] ? Load1(rows[i][j] + c) : 0.0f;
      else d[i][j] = rows[i][j] ? Load(rows[i][j] + c) : Vec{};
    }
  Left(Transform<M>::BT, d, tmp);
  Right(tmp, Transform<M>::BT, out);
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < T; ++j) {
      if constexpr (W == 1) Store1(v + (i * T + j) * plane + c, out[i][j]);
      else Store(v + (i * T + j) * plane + c, out[i][j]);
    }
}

template <int M>
void InputTransform(const Shape& s, const float* x, int64_t tile, float* v, int64_t plane) {
  constexpr int T = M + 2;
  const int64_t th = (s.ch + M - 1) / M, tw = (s.cw + M - 1) / M;
  const int64_t n = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
  const float* rows[T][T];
  for (int i = 0; i < T; ++i)
    for (int j = 0; j < T; ++j) {
      const int64_t iy = ty * M + i - s.pad_top, ix = tx * M + j - s.pad_left;
      rows[i][j] = (iy >= 0 && iy < s.h && ix >= 0 && ix < s.w)
                       ? x + ((n * s.h + iy) * s.w + ix) * s.c
                       : nullptr;
    }
  int64_t c = 0;
  for (; c + kLanes <= s.c; c += kLanes) InputTransformLanes<M, Vec, kLanes>(rows, c, v, plane);
  for (; c < s.c; ++c) InputTransformLanes<M, float, 1>(rows, c, v, plane);
}

// out[r][0:16] = sum_c a[r][c] b[c][0:16] for R rows of a (stride lda).
template <int R>
inline void Micro(const float* a, int64_t lda, const float* b, int64_t depth, float* out) {
  Vec acc[R][2];
  for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = Vec{};
  for (int64_t c = 0; c < depth; ++c) {
    const Vec b0 = Load(b + c * kCols), b1 = Load(b + c * kCols + kLanes);
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const float av = a[r * lda + c];
      acc[r][0] += av * b0;
      acc[r][1] += av * b1;
    }
  }
  for (int r = 0; r < R; ++r) {
    Store(out + r * kCols, acc[r][0]);
    Store(out + r * kCols + kLanes, acc[r][1]);
  }
}

inline void MicroRows(int rows, const float* a, int64_t lda, const float* b, int64_t depth,
                      float* out) {
  switch (rows) {
    case 6: return Micro<6>(a, lda, b, depth, out);
    case 5: return Micro<5>(a, lda, b, depth, out);
    case 4: return Micro<4>(a, lda, b, depth, out);
    case 3: return Micro<3>(a, lda, b, depth, out);
    case 2: return Micro<2>(a, lda, b, depth, out);
    default: return Micro<1>(a, lda, b, depth, out);
  }
}

// max(a, b) that propagates NaN like XLA's maximum (a plain `a > b ? a : b` drops it).
inline Vec Max(Vec a, Vec b) { return (a > b) | (a != a) ? a : b; }

// Output transform of one tile for 16 channels, epilogue, store.
template <int M>
void OutputTile(const Shape& s, const float* m, int64_t plane, const float* shift, int64_t tile,
                int64_t co, float* y) {
  constexpr int T = M + 2;
  const int64_t th = (s.ch + M - 1) / M, tw = (s.cw + M - 1) / M;
  const int64_t n = tile / (th * tw), ty = tile / tw % th, tx = tile % tw;
  const int64_t width = std::min<int64_t>(kCols, s.o - co);
  for (int half = 0; half < kCols / kLanes; ++half) {
    const int64_t c0 = half * kLanes;
    if (c0 >= width) break;
    Vec in[T][T], tmp[M][T], out[M][M];
    for (int i = 0; i < T; ++i)
      for (int j = 0; j < T; ++j) in[i][j] = Load(m + (i * T + j) * plane + c0);
    Left(Transform<M>::AT, in, tmp);
    Right(tmp, Transform<M>::AT, out);
    Vec bias;
    float lanes[kLanes] = {};
    for (int l = 0; l < kLanes && c0 + l < width; ++l) lanes[l] = shift[co + c0 + l];
    bias = Load(lanes);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < M; ++j) {
        out[i][j] += bias;
        if (s.relu) out[i][j] = Max(out[i][j], Vec{});
      }
    const int64_t count = std::min<int64_t>(kLanes, width - c0);
    auto put = [&](int64_t oy, int64_t ox, Vec value) {
      if (oy >= s.oh || ox >= s.ow) return;
      float* dst = y + ((n * s.oh + oy) * s.ow + ox) * s.o + co + c0;
      if (count == kLanes) {
        Store(dst, value);
      } else {
        float tmp_lanes[kLanes];
        Store(tmp_lanes, value);
        std::memcpy(dst, tmp_lanes, count * sizeof(float));
      }
    };
    if (s.pool) {
      for (int i = 0; i < M; i += 2)
        for (int j = 0; j < M; j += 2) {
          Vec a = out[i][j], b = out[i][j + 1], c = out[i + 1][j], d = out[i + 1][j + 1];
          put((ty * M + i) / 2, (tx * M + j) / 2, Max(Max(a, b), Max(c, d)));
        }
    } else {
      for (int i = 0; i < M; ++i)
        for (int j = 0; j < M; ++j) put(ty * M + i, tx * M + j, out[i][j]);
    }
  }
}

template <int M>
void Run(const Shape& s, const float* x, const float* u, const float* shift, float* y) {
  constexpr int T = M + 2, K = T * T;
  const int64_t th = (s.ch + M - 1) / M, tw = (s.cw + M - 1) / M;
  const int64_t tiles = s.n * th * tw;
  const int64_t col_blocks = (s.o + kCols - 1) / kCols;
  // Tiles per block: the block's transformed input (K x tiles x Cin floats) within
  // ~192 KB, a whole number of micro-kernel rows.
  int64_t block = std::max<int64_t>(kRows, (48 * 1024) / (K * std::max<int64_t>(s.c, 1)));
  block = std::min<int64_t>(block / kRows * kRows, 240);
  block = std::max<int64_t>(block, kRows);
  const int64_t blocks = (tiles + block - 1) / block;
  const int64_t vplane = block * s.c, mplane = block * kCols;
#pragma omp parallel
  {
    std::unique_ptr<float[]> v(new float[K * vplane]), m(new float[K * mplane]);
#pragma omp for schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t first = b * block, count = std::min(block, tiles - first);
      for (int64_t t = 0; t < count; ++t) InputTransform<M>(s, x, first + t, v.get() + t * s.c, vplane);
      for (int64_t cb = 0; cb < col_blocks; ++cb) {
        for (int k = 0; k < K; ++k) {
          const float* bk = u + (k * col_blocks + cb) * s.c * kCols;
          const float* ak = v.get() + k * vplane;
          float* mk = m.get() + k * mplane;
          for (int64_t t = 0; t < count; t += kRows)
            MicroRows(static_cast<int>(std::min<int64_t>(kRows, count - t)), ak + t * s.c, s.c,
                      bk, s.c, mk + t * kCols);
        }
        for (int64_t t = 0; t < count; ++t)
          OutputTile<M>(s, m.get() + t * kCols, mplane, shift, first + t, cb * kCols, y);
      }
    }
  }
}

using F32 = ffi::Buffer<ffi::F32>;

ffi::Error Conv(F32 x, F32 u, F32 shift, ffi::ResultBuffer<ffi::F32> y, int64_t tile,
                int64_t pad_top, int64_t pad_left, int64_t conv_h, int64_t conv_w, bool relu,
                bool pool) {
  const auto xd = x.dimensions(), ud = u.dimensions(), yd = y->dimensions();
  const int64_t k = (tile + 2) * (tile + 2);
  if (xd.size() != 4 || ud.size() != 4 || yd.size() != 4 || shift.dimensions().size() != 1 ||
      (tile != 2 && tile != 4)) {
    return ffi::Error::InvalidArgument(
        "auxtl Winograd convolution: expected NHWC input, [(m+2)^2, ceil(O/16), C, 16] "
        "kernel, [O] shift, NHWC output and tile m of 2 or 4");
  }
  Shape s{xd[0], xd[1], xd[2], xd[3], yd[3], conv_h, conv_w, yd[1], yd[2],
          pad_top, pad_left, relu, pool};
  const int64_t expect_h = pool ? conv_h / 2 : conv_h, expect_w = pool ? conv_w / 2 : conv_w;
  if (ud[0] != k || ud[1] != (s.o + kCols - 1) / kCols || ud[2] != s.c || ud[3] != kCols ||
      shift.dimensions()[0] != s.o || yd[0] != s.n || yd[1] != expect_h || yd[2] != expect_w ||
      pad_top < 0 || pad_left < 0 || conv_h < 1 || conv_w < 1) {
    return ffi::Error::InvalidArgument(
        "auxtl Winograd convolution: shapes do not match (input " + std::to_string(s.n) + "x" +
        std::to_string(s.h) + "x" + std::to_string(s.w) + "x" + std::to_string(s.c) +
        ", output channels " + std::to_string(s.o) + ", tile " + std::to_string(tile) + ")");
  }
  if (tile == 2) Run<2>(s, x.typed_data(), u.typed_data(), shift.typed_data(), y->typed_data());
  else Run<4>(s, x.typed_data(), u.typed_data(), shift.typed_data(), y->typed_data());
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(AuxtlWinogradConv, Conv,
                              ffi::Ffi::Bind()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Arg<F32>()
                                  .Ret<F32>()
                                  .Attr<int64_t>("tile")
                                  .Attr<int64_t>("pad_top")
                                  .Attr<int64_t>("pad_left")
                                  .Attr<int64_t>("conv_h")
                                  .Attr<int64_t>("conv_w")
                                  .Attr<bool>("relu")
                                  .Attr<bool>("pool"));
