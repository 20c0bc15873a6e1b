// Torch binding of the fused LoRA linear (arXiv 2106.09685) and DoRA linear (arXiv 2402.09353) ops.
//
// Schemas and fakes: lorabench/ops/lora.py. One op body per op serves CPU and CUDA: the GEMMs go to
// BLAS / cuBLAS through ATen, arranged so the low-rank path adds no temporary and no extra pass:
//   forward   xa = x_d A^T (tokens, r; saved)   y = addmm(b, x, W^T)   y += s xa B^T (beta = 1)
//   backward  dxa = s dy B   dB = s dy^T xa   dA = dxa^T x_d   dx = dy W, then dx += dxa A (beta = 1)
// W + s B A is never formed. DoRA's row norms, epilogue and gradient prologue are one-pass kernels:
// csrc/cpu/lora_linear.cpp and csrc/cuda/lora.cu.
#include <torch/library.h>
#include <torch/csrc/autograd/custom_function.h>
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include "cpu/lora_linear.h"
#include "narrow_products.h"  // narrow_mm, grad_b: the low-rank products in the orientation BLAS is fast at

#ifdef LORABENCH_WITH_CUDA
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include "cuda/lora.h"
#endif

namespace lorabench {
namespace {

using at::Tensor;
using c10::optional;

#define CHECK_FLOAT(t) TORCH_CHECK(at::isFloatingType((t).scalar_type()), #t " must be a floating tensor, got ", (t).scalar_type())

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

Tensor drop(const Tensor& x, const optional<Tensor>& mask) { return mask.has_value() ? x * *mask : x; }

#ifdef LORABENCH_WITH_CUDA
cuda::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kDouble: return cuda::DType::kFloat64;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default: TORCH_CHECK(false, "lorabench: unsupported dtype ", t, "; use float32, bfloat16, float16 or float64");
  }
}
void check_launch(int code, const char* what) {
  TORCH_CHECK(code == 0, "lorabench::", what, " CUDA launch failed: ", cuda::error_string(code));
}
void* stream() { return c10::cuda::getCurrentCUDAStream().stream(); }
#endif

// ||W + s B A||_c per row, without forming W + s B A (acc dtype):
//   ||W_j||^2 + 2 s <W_j, (BA)_j> + s^2 ||(BA)_j||^2,  <W_j, (BA)_j> = (W A^T)_j . B_j,  ||(BA)_j||^2 = B_j (A A^T) B_j^T
// W A^T is accumulated in the acc dtype (low-precision W is converted in row chunks: no full copy). Rows
// where the expansion cancels (the sum under half of its positive terms) are recomputed from the
// formed row W_j + s B_j A, in the kernels.
constexpr int64_t kNormChunkRows = 256;
constexpr double kCancellation = 0.5;

Tensor dora_norm(const Tensor& weight, const Tensor& A, const Tensor& B, double scale) {
  const auto acc = acc_dtype(weight.scalar_type());
  const Tensor a = A.to(acc).contiguous(), b = B.to(acc).contiguous();
  Tensor wa;  // (out, r) = W A^T
  if (weight.scalar_type() == acc) {
    wa = at::mm(weight, a.t()).contiguous();
  } else {
    wa = at::empty({weight.size(0), a.size(0)}, weight.options().dtype(acc));
    for (int64_t j = 0; j < weight.size(0); j += kNormChunkRows) {
      const int64_t n = std::min(kNormChunkRows, weight.size(0) - j);
      Tensor rows = wa.narrow(0, j, n);
      at::mm_out(rows, weight.narrow(0, j, n).to(acc), a.t());
    }
  }
  const Tensor bg = at::mm(b, at::mm(a, a.t())).contiguous();  // (out, r) = B (A A^T)
  Tensor norm = at::empty({weight.size(0)}, weight.options().dtype(acc));
#ifdef LORABENCH_WITH_CUDA
  if (weight.is_cuda()) {
    const c10::cuda::CUDAGuard guard(weight.device());
    const Tensor w = weight.contiguous();
    cuda::DoraNormParams p{w.data_ptr(), a.data_ptr(), wa.data_ptr(), bg.data_ptr(), b.data_ptr(), norm.data_ptr(),
                           w.size(0), w.size(1), b.size(1), scale, kCancellation, cuda_dtype(w.scalar_type())};
    check_launch(cuda::launch_dora_norm(p, stream()), "dora_linear (norm)");
    return norm;
  }
#endif
  cpu::dora_norm(weight, a, wa, bg, b, scale, kCancellation, norm);
  return norm;
}

void dora_epilogue(Tensor& y, const Tensor& u, const Tensor& g, const optional<Tensor>& bias, bool accumulate) {
#ifdef LORABENCH_WITH_CUDA
  if (y.is_cuda()) {
    const c10::cuda::CUDAGuard guard(y.device());
    const optional<Tensor> b = bias.has_value() ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
    cuda::DoraEpilogueParams p{y.data_ptr(), u.data_ptr(), g.data_ptr(), b.has_value() ? b->data_ptr() : nullptr,
                               u.size(0), u.size(1), accumulate, cuda_dtype(u.scalar_type())};
    check_launch(cuda::launch_dora_epilogue(p, stream()), "dora_linear (epilogue)");
    return;
  }
#endif
  const optional<Tensor> b = bias.has_value() ? optional<Tensor>(bias->contiguous()) : c10::nullopt;
  cpu::dora_epilogue(y, u, g, b, accumulate);
}

void dora_grad(const Tensor& dy, const Tensor& u, const Tensor& g, const Tensor& norm, Tensor& du, Tensor& dm) {
#ifdef LORABENCH_WITH_CUDA
  if (dy.is_cuda()) {
    const c10::cuda::CUDAGuard guard(dy.device());
    cuda::DoraGradParams p{dy.data_ptr(), u.data_ptr(), g.data_ptr(), norm.data_ptr(), du.data_ptr(), dm.data_ptr(),
                           dy.size(0), dy.size(1), cuda_dtype(dy.scalar_type())};
    Tensor partial;  // the token blocks' partial sums of dm (acc-typed, as dm)
    if (const int64_t n = cuda::dora_grad_workspace(p); n > 0) {
      partial = at::empty({n}, dm.options());
      p.partial = partial.data_ptr();
    }
    check_launch(cuda::launch_dora_grad(p, stream()), "dora_linear_backward");
    return;
  }
#endif
  cpu::dora_grad(dy, u, g, norm, du, dm);
}

// --- lora_linear ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> lora_linear(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                       const Tensor& A, const Tensor& B, double scale,
                                       const optional<Tensor>& mask) {
  CHECK_FLOAT(x);
  const Tensor xa = narrow_mm(drop(x, mask), A.t());  // (tokens, r), saved for the backward
  Tensor y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());  // (tokens, out)
  y.addmm_(xa, B.t(), /*beta=*/1.0, /*alpha=*/scale);  // eq. (3) of LoRA, accumulated in place
  return {y, xa};
}

std::tuple<Tensor, Tensor, Tensor> lora_linear_backward(const Tensor& dy, const Tensor& x, const Tensor& weight,
                                                        const Tensor& A, const Tensor& B, const Tensor& xa,
                                                        double scale, const optional<Tensor>& mask, bool need_dx) {
  const Tensor dxa = narrow_mm(dy, B).mul_(scale);      // (tokens, r)
  const Tensor dB = grad_b(dy, xa, scale);              // (out, r)
  const Tensor dA = at::mm(dxa.t(), drop(x, mask));     // (r, in)
  if (!need_dx) return {at::empty({0}, x.options()), dA, dB};
  Tensor dx = at::mm(dy, weight);                       // (tokens, in)
  if (mask.has_value()) dx.addcmul_(at::mm(dxa, A), *mask);  // dropout's gradient is its mask
  else dx.addmm_(dxa, A);
  return {dx, dA, dB};
}

// --- dora_linear ------------------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_linear(const Tensor& x, const Tensor& weight,
                                                       const optional<Tensor>& bias, const Tensor& A,
                                                       const Tensor& B, const Tensor& magnitude, double scale,
                                                       const optional<Tensor>& mask) {
  CHECK_FLOAT(x);
  // The epilogue reads bias as x's dtype (a raw pointer on CUDA): another dtype would be misread.
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == x.scalar_type(), "dora_linear: bias.dtype is ", bias->scalar_type(),
                " but x.dtype is ", x.scalar_type(), "; cast them to one dtype");
  const Tensor norm = dora_norm(weight, A, B, scale);    // (out,), acc dtype, detached (sec. 4.3)
  const Tensor g = magnitude.to(norm.scalar_type()) / norm;  // eq. (5): m / ||W + s B A||_c
  const Tensor xd = drop(x, mask);
  const Tensor xa = narrow_mm(xd, A.t());                // (tokens, r)
  Tensor u = at::mm(xd, weight.t());                     // (tokens, out)
  Tensor y;
  if (mask.has_value()) {  // PEFT: the base path sees x, the DoRA path x_d: y = W x + b - W x_d + g u
    y = bias.has_value() ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
    y.sub_(u);
  } else {
    y = at::empty_like(u);
  }
  u.addmm_(xa, B.t(), 1.0, scale);                       // u = x_d W^T + s xa B^T
  dora_epilogue(y, u, g, mask.has_value() ? c10::nullopt : bias, /*accumulate=*/mask.has_value());
  return {y, xa, u, norm};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_linear_backward(
    const Tensor& dy_in, const Tensor& x, const Tensor& weight, const Tensor& A, const Tensor& B,
    const Tensor& magnitude, const Tensor& xa, const Tensor& u, const Tensor& norm, double scale,
    const optional<Tensor>& mask, bool need_dx) {
  const Tensor dy = dy_in.contiguous();
  const Tensor g = magnitude.to(norm.scalar_type()) / norm;
  Tensor du = at::empty_like(dy);
  Tensor dm = at::empty_like(norm);
  dora_grad(dy, u.contiguous(), g, norm, du, dm);        // du = dy g, dm = sum_t dy u / n
  const Tensor dxa = narrow_mm(du, B).mul_(scale);       // (tokens, r)
  const Tensor dB = grad_b(du, xa, scale);               // (out, r)
  const Tensor xd = drop(x, mask);
  const Tensor dA = at::mm(dxa.t(), xd);                 // (r, in)
  const Tensor dmag = dm.to(magnitude.scalar_type());
  if (!need_dx) return {at::empty({0}, x.options()), dA, dB, dmag};
  Tensor dx;
  if (mask.has_value()) {  // dx = dy W + ((du - dy) W + dxa A) * mask
    dx = at::mm(dy, weight);
    dx.addcmul_(at::mm(du - dy, weight).addmm_(dxa, A), *mask);
  } else {
    dx = at::mm(du, weight);
    dx.addmm_(dxa, A);
  }
  return {dx, dA, dB, dmag};
}

// --- autograd (in C++: a Python autograd.Function costs more than the whole op at a few tokens) ---
// The Autograd kernels redispatch below autograd to whatever kernel the device has: the compiled
// ones above, or the reference registered from Python. lorabench/ops/lora.py has the same
// Functions in Python for when this extension is not built.

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

Tensor or_undefined(const optional<Tensor>& t) { return t.has_value() ? *t : Tensor(); }
optional<Tensor> to_optional(const Tensor& t) { return t.defined() ? optional<Tensor>(t) : c10::nullopt; }

struct LoraLinearFunction : public torch::autograd::Function<LoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const optional<Tensor>& bias, const Tensor& A, const Tensor& B, double scale,
                               const optional<Tensor>& mask) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::lora_linear", "")
                         .typed<decltype(lora_linear)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xa] = op.call(x, weight, bias, A, B, scale, mask);
    ctx->save_for_backward({x, weight, A, B, xa, or_undefined(mask)});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({xa});
    ctx->set_materialize_grads(false);  // no zero-filled (tokens, r) gradient for xa in every backward
    return {y, xa};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::lora_linear_backward", "")
                         .typed<decltype(lora_linear_backward)>();
    const auto v = ctx->get_saved_variables();
    const bool need_dx = ctx->needs_input_grad(0);
    if (!grads[0].defined()) return variable_list(7);
    auto [dx, dA, dB] = op.call(grads[0], v[0], v[1], v[2], v[3], v[4], ctx->saved_data["scale"].toDouble(),
                                to_optional(v[5]), need_dx);
    return {need_dx ? dx : Tensor(), Tensor(), Tensor(), dA, dB, Tensor(), Tensor()};
  }
};

struct DoraLinearFunction : public torch::autograd::Function<DoraLinearFunction> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& weight,
                               const optional<Tensor>& bias, const Tensor& A, const Tensor& B,
                               const Tensor& magnitude, double scale, const optional<Tensor>& mask) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::dora_linear", "")
                         .typed<decltype(dora_linear)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [y, xa, u, norm] = op.call(x, weight, bias, A, B, magnitude, scale, mask);
    ctx->save_for_backward({x, weight, A, B, magnitude, xa, u, norm, or_undefined(mask)});
    ctx->saved_data["scale"] = scale;
    ctx->mark_non_differentiable({xa, u, norm});  // the norm is a constant: sec. 4.3 of DoRA
    ctx->set_materialize_grads(false);  // no zero-filled gradients for xa, u (tokens, out) and norm
    return {y, xa, u, norm};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::dora_linear_backward", "")
                         .typed<decltype(dora_linear_backward)>();
    const auto v = ctx->get_saved_variables();
    const bool need_dx = ctx->needs_input_grad(0);
    if (!grads[0].defined()) return variable_list(8);
    auto [dx, dA, dB, dm] = op.call(grads[0], v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7],
                                    ctx->saved_data["scale"].toDouble(), to_optional(v[8]), need_dx);
    return {need_dx ? dx : Tensor(), Tensor(), Tensor(), dA, dB, dm, Tensor(), Tensor()};
  }
};

std::tuple<Tensor, Tensor> lora_linear_autograd(const Tensor& x, const Tensor& weight, const optional<Tensor>& bias,
                                                const Tensor& A, const Tensor& B, double scale,
                                                const optional<Tensor>& mask) {
  auto out = LoraLinearFunction::apply(x, weight, bias, A, B, scale, mask);
  return {out[0], out[1]};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dora_linear_autograd(const Tensor& x, const Tensor& weight,
                                                                const optional<Tensor>& bias, const Tensor& A,
                                                                const Tensor& B, const Tensor& magnitude,
                                                                double scale, const optional<Tensor>& mask) {
  auto out = DoraLinearFunction::apply(x, weight, bias, A, B, magnitude, scale, mask);
  return {out[0], out[1], out[2], out[3]};
}

}  // namespace

TORCH_LIBRARY_IMPL(lorabench, Autograd, m) {
  m.impl("lora_linear", &lora_linear_autograd);
  m.impl("dora_linear", &dora_linear_autograd);
}

TORCH_LIBRARY_IMPL(lorabench, CPU, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("dora_linear", &dora_linear);
  m.impl("dora_linear_backward", &dora_linear_backward);
}

#ifdef LORABENCH_WITH_CUDA
TORCH_LIBRARY_IMPL(lorabench, CUDA, m) {
  m.impl("lora_linear", &lora_linear);
  m.impl("lora_linear_backward", &lora_linear_backward);
  m.impl("dora_linear", &dora_linear);
  m.impl("dora_linear_backward", &dora_linear_backward);
}
#endif

}  // namespace lorabench
