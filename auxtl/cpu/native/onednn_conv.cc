// oneDNN 2-D convolutions (forward, input gradient, weight gradient) as XLA FFI handlers.
//
// Float32, NHWC activations and HWIO kernels (the layout auxtl's convolutions use),
// any strides and padding, no dilation or groups. auxtl/cpu/onednn.py compiles this file
// on first use and registers the handlers for XLA's CPU platform; see it for why.
#include <cstdint>
#include <exception>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using dnnl::memory;
using Tag = memory::format_tag;

enum class Kind : int64_t { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };

// One convolution problem: what a primitive is built (and cached) for.
struct Problem {
  Kind kind;
  int64_t n, h, w, c;        // input, NHWC
  int64_t oh, ow, o;         // output, NHWC
  int64_t kh, kw;            // kernel, HWIO (kh, kw, c, o)
  int64_t sh, sw;            // strides
  int64_t pt, pb, pl, pr;    // padding: top, bottom, left, right

  auto Tie() const {
    return std::tie(kind, n, h, w, c, oh, ow, o, kh, kw, sh, sw, pt, pb, pl, pr);
  }
  bool operator<(const Problem& other) const { return Tie() < other.Tie(); }

  memory::desc Input() const { return {{n, c, h, w}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Output() const { return {{n, o, oh, ow}, memory::data_type::f32, Tag::nhwc}; }
  memory::desc Kernel(Tag tag = Tag::hwio) const {
    return {{o, c, kh, kw}, memory::data_type::f32, tag};
  }
};

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// A built primitive, the kernel layout it wants (blocked layouts are faster for the
// gradients) and the size of the scratch memory it needs per call.
struct Built {
  dnnl::primitive primitive;
  memory::desc kernel;
  memory::desc scratch;
};

Built Build(const Problem& p) {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);  // one scratch per call: thread-safe
  const memory::dims strides{p.sh, p.sw}, pad_l{p.pt, p.pl}, pad_r{p.pb, p.pr};
  const auto algo = dnnl::algorithm::convolution_direct;
  if (p.kind == Kind::kForward) {
    dnnl::convolution_forward::primitive_desc pd(
        Engine(), dnnl::prop_kind::forward_training, algo, p.Input(), p.Kernel(), p.Output(),
        strides, pad_l, pad_r, attr);
    return {dnnl::convolution_forward(pd), pd.weights_desc(), pd.scratchpad_desc()};
  }
  const memory::desc any_kernel = p.Kernel(Tag::any);
  dnnl::convolution_forward::primitive_desc hint(
      Engine(), dnnl::prop_kind::forward_training, algo, p.Input(), any_kernel, p.Output(),
      strides, pad_l, pad_r, attr);
  if (p.kind == Kind::kInputGrad) {
    dnnl::convolution_backward_data::primitive_desc pd(
        Engine(), algo, p.Input(), any_kernel, p.Output(), strides, pad_l, pad_r, hint, attr);
    return {dnnl::convolution_backward_data(pd), pd.weights_desc(), pd.scratchpad_desc()};
  }
  dnnl::convolution_backward_weights::primitive_desc pd(
      Engine(), algo, p.Input(), any_kernel, p.Output(), strides, pad_l, pad_r, hint, attr);
  return {dnnl::convolution_backward_weights(pd), pd.diff_weights_desc(), pd.scratchpad_desc()};
}

const Built& Cached(const Problem& p) {
  static std::mutex mutex;
  static std::map<Problem, std::unique_ptr<Built>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  std::unique_ptr<Built>& slot = cache[p];
  if (!slot) slot = std::make_unique<Built>(Build(p));
  return *slot;
}

// input: NHWC (diff_src for kInputGrad); kernel: HWIO (diff_weights for kWeightGrad);
// output: NHWC (diff_dst for the gradients).
void Execute(const Problem& p, void* input, void* kernel, void* output) {
  const Built& built = Cached(p);
  dnnl::engine& engine = Engine();
  dnnl::stream stream(engine);
  // Uninitialised: oneDNN writes its scratch before reading it.
  std::unique_ptr<uint8_t[]> scratch(new uint8_t[built.scratch.get_size() + 1]);
  memory input_m(p.Input(), engine, input), output_m(p.Output(), engine, output);
  memory user_kernel(p.Kernel(), engine, kernel);
  const bool reorder = built.kernel != p.Kernel();
  memory kernel_m = reorder ? memory(built.kernel, engine) : user_kernel;
  std::unordered_map<int, memory> args{
      {DNNL_ARG_SCRATCHPAD, memory(built.scratch, engine, scratch.get())}};
  switch (p.kind) {
    case Kind::kForward:
      args.insert({{DNNL_ARG_SRC, input_m}, {DNNL_ARG_WEIGHTS, kernel_m}, {DNNL_ARG_DST, output_m}});
      break;
    case Kind::kInputGrad:
      if (reorder) dnnl::reorder(user_kernel, kernel_m).execute(stream, user_kernel, kernel_m);
      args.insert({{DNNL_ARG_DIFF_SRC, input_m}, {DNNL_ARG_WEIGHTS, kernel_m},
                   {DNNL_ARG_DIFF_DST, output_m}});
      break;
    case Kind::kWeightGrad:
      args.insert({{DNNL_ARG_SRC, input_m}, {DNNL_ARG_DIFF_WEIGHTS, kernel_m},
                   {DNNL_ARG_DIFF_DST, output_m}});
      break;
  }
  built.primitive.execute(stream, args);
  if (reorder && p.kind == Kind::kWeightGrad) {
    dnnl::reorder(kernel_m, user_kernel).execute(stream, kernel_m, user_kernel);
  }
  stream.wait();
}

ffi::Error Run(Kind kind, ffi::Span<const int64_t> in, ffi::Span<const int64_t> k,
               ffi::Span<const int64_t> out, ffi::Span<const int64_t> strides,
               ffi::Span<const int64_t> padding, void* input, void* kernel, void* output) {
  if (in.size() != 4 || k.size() != 4 || out.size() != 4 || strides.size() != 2 ||
      padding.size() != 4 || k[2] != in[3] || k[3] != out[3] || in[0] != out[0]) {
    return ffi::Error::InvalidArgument(
        "auxtl oneDNN convolution: expected NHWC input, HWIO kernel, NHWC output, "
        "2 strides and 4 paddings with matching channels and batch");
  }
  const Problem p{kind,       in[0],      in[1],      in[2],      in[3],
                  out[1],     out[2],     out[3],     k[0],       k[1],
                  strides[0], strides[1], padding[0], padding[1], padding[2],
                  padding[3]};
  try {
    Execute(p, input, kernel, output);
  } catch (const dnnl::error& error) {
    return ffi::Error::Internal(std::string("oneDNN: ") + error.what());
  } catch (const std::exception& error) {
    return ffi::Error::Internal(error.what());
  }
  return ffi::Error::Success();
}

using F32 = ffi::Buffer<ffi::F32>;
using Ints = ffi::Span<const int64_t>;

ffi::Error Forward(F32 x, F32 kernel, ffi::ResultBuffer<ffi::F32> y, Ints strides,
                   Ints padding) {
  return Run(Kind::kForward, x.dimensions(), kernel.dimensions(), y->dimensions(), strides,
             padding, x.untyped_data(), kernel.untyped_data(), y->untyped_data());
}

ffi::Error InputGrad(F32 dy, F32 kernel, ffi::ResultBuffer<ffi::F32> dx, Ints strides,
                     Ints padding) {
  return Run(Kind::kInputGrad, dx->dimensions(), kernel.dimensions(), dy.dimensions(),
             strides, padding, dx->untyped_data(), kernel.untyped_data(), dy.untyped_data());
}

ffi::Error WeightGrad(F32 x, F32 dy, ffi::ResultBuffer<ffi::F32> dkernel, Ints strides,
                      Ints padding) {
  return Run(Kind::kWeightGrad, x.dimensions(), dkernel->dimensions(), dy.dimensions(),
             strides, padding, x.untyped_data(), dkernel->untyped_data(), dy.untyped_data());
}

}  // namespace

#define AUXTL_CONV_BINDING                                                          \
  ffi::Ffi::Bind().Arg<F32>().Arg<F32>().Ret<F32>().Attr<Ints>("strides").Attr<Ints>( \
      "padding")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AuxtlOneDnnConvForward, Forward, AUXTL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AuxtlOneDnnConvInputGrad, InputGrad, AUXTL_CONV_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AuxtlOneDnnConvWeightGrad, WeightGrad, AUXTL_CONV_BINDING);
