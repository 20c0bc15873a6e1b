// Torch binding of the 4-bit weight ops: lorabench::nf4_quantize / nf4_dequantize / nf4_linear (QLoRA,
// arXiv 2305.14314) and int4_quantize / int4_dequantize / int4_linear (QA-LoRA, arXiv 2309.14717).
// Schemas, fakes and references: lorabench/ops/nf4.py and int4.py. Shape and dtype checks happen here,
// at the boundary; the kernels are csrc/cpu/{nf4,int4,nf4_int4_gemv}.cpp and csrc/cuda/nf4_int4.cu.
//
// The linear ops pick a path by batch size: below kTileBatch rows of x, the GEMV kernel streams the
// packed weight once (dequantizing in registers); from kTileBatch on, tiles of rows are dequantized to
// fp32 in kernel order and multiplied with at::mm (the GEMM does the heavy lifting, the dequantization
// is amortised over the batch). x is permuted once into the kernel order (nf4_int4_gemv.h).
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "cpu/int4.h"
#include "cpu/nf4.h"
#include "cpu/nf4_int4_gemv.h"
#include "narrow_products.h"
#ifdef LORABENCH_WITH_CUDA
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include "cuda/nf4_int4.h"
#endif

namespace {

using OptTensor = std::optional<at::Tensor>;
constexpr int64_t kTileBatch = 16;            // batch rows from which the tiled GEMM path is used
constexpr int64_t kTileBytes = 2 << 20;       // fp32 bytes of one dequantized tile (fits the L2/L3)
constexpr int64_t kNestedBlock = 256;         // double quantization block

#define CHECK_CPU_OR_SAME(t, ref) TORCH_CHECK((t).device() == (ref).device(), #t " is on ", (t).device(), \
                                              " but x is on ", (ref).device())

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Double quantization: uint8 absmax codes with their second-level state.
void check_nested(const at::Tensor& absmax, const OptTensor& absmax2, const OptTensor& code2, const OptTensor& offset) {
  TORCH_CHECK(absmax.scalar_type() == at::kByte, "absmax must be float32 or uint8 (double quantization), got ",
              absmax.scalar_type());
  TORCH_CHECK(absmax2 && code2 && offset, "uint8 absmax (double quantization) needs absmax2, code2 and offset");
  const int64_t n = absmax.numel();
  TORCH_CHECK(absmax2->scalar_type() == at::kFloat && absmax2->numel() == ceil_div(n, kNestedBlock),
              "absmax2 must be float32 with ", ceil_div(n, kNestedBlock), " values, got ", absmax2->sizes());
  TORCH_CHECK(code2->scalar_type() == at::kFloat && code2->numel() == 256, "code2 must be float32 (256,)");
  TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, "offset must be a float32 scalar");
}

// The fp32 absmax of an NF4 state: decoded when double-quantized (uint8 codes).
at::Tensor nf4_absmax_fp32(const at::Tensor& absmax, const OptTensor& absmax2, const OptTensor& code2,
                           const OptTensor& offset) {
  if (absmax.scalar_type() == at::kFloat) return absmax.contiguous();
  check_nested(absmax, absmax2, code2, offset);
  const int64_t n = absmax.numel();
  auto out = at::empty({n}, absmax.options().dtype(at::kFloat));
  auto q = absmax.contiguous();
  auto a2 = absmax2->contiguous();
  auto c2 = code2->contiguous();
  lorabench::cpu::nf4_decode_absmax(q.data_ptr<uint8_t>(), a2.data_ptr<float>(), c2.data_ptr<float>(),
                                    offset->item<float>(), n, out.data_ptr<float>());
  return out;
}

void check_nf4_state(const at::Tensor& packed, const at::Tensor& absmax, int64_t numel, int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "blocksize must be a power of two in [32, 4096], got ", blocksize);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.numel() == ceil_div(numel, 2),
              "packed must be uint8 with ", ceil_div(numel, 2), " bytes for ", numel, " weights, got ",
              packed.scalar_type(), " ", packed.sizes());
  TORCH_CHECK(absmax.numel() == ceil_div(numel, blocksize), "absmax must have ", ceil_div(numel, blocksize),
              " values (blocks of ", blocksize, "), got ", absmax.numel());
}

void check_x(const at::Tensor& x, int64_t K, int64_t N, const OptTensor& bias) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "x must be (tokens, in=", K, "), got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kDouble,
              "x must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  if (bias) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "bias must be (", N, ",), got ", bias->sizes());
    CHECK_CPU_OR_SAME(*bias, x);
  }
}

// y (fp32, (tokens, N)) += bias + scale * (P x A^T) B^T, then cast to x's dtype. pool > 1: QA-LoRA's
// group average of x.
at::Tensor finish(at::Tensor y, const at::Tensor& x, const OptTensor& bias, const OptTensor& lora_A,
                  const OptTensor& lora_B, double scale, int64_t pool) {
  const auto acc = y.scalar_type();
  if (bias) y.add_(bias->to(acc));
  if (lora_A) {
    TORCH_CHECK(lora_B, "give both lora_A and lora_B or neither");
    at::Tensor xa = x.to(acc);
    if (pool > 1) xa = xa.view({x.size(0), x.size(1) / pool, pool}).mean(-1);
    TORCH_CHECK(lora_A->dim() == 2 && lora_A->size(1) == xa.size(1), "lora_A must be (r, ", xa.size(1), "), got ",
                lora_A->sizes());
    TORCH_CHECK(lora_B->dim() == 2 && lora_B->size(0) == y.size(1) && lora_B->size(1) == lora_A->size(0),
                "lora_B must be (", y.size(1), ", ", lora_A->size(0), "), got ", lora_B->sizes());
    y.addmm_(lorabench::narrow_mm(xa, lora_A->to(acc).t()), lora_B->to(acc).t(), 1.0, scale);
  }
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

// y = x W^T (fp32) for a 4-bit weight, on CPU: GEMV path or tiled GEMM path (see the file comment).
at::Tensor q4_matmul_cpu(const at::Tensor& x, const lorabench::cpu::Q4Weight& w) {
  const int64_t B = x.size(0), K = w.K;
  // fp32 contiguous x (the GEMV's common case) is used as is: no dispatch for a no-op conversion
  const at::Tensor xf = x.scalar_type() == at::kFloat && x.is_contiguous() ? x : x.to(at::kFloat).contiguous();
  auto y = at::empty({B, w.N}, xf.options());
  if (B == 0 || w.N == 0) return y;
  auto xp = at::empty_like(xf);
  lorabench::cpu::permute_input(xf.data_ptr<float>(), B, K, K, w.int_codes, B < kTileBatch, xp.data_ptr<float>());
  if (B < kTileBatch) {
    at::Tensor xsum;
    if (w.int_codes) xsum = xf.view({B, K / w.group, w.group}).sum(-1).contiguous();  // (B, G)
    lorabench::cpu::q4_gemv(w, xp.data_ptr<float>(), w.int_codes ? xsum.data_ptr<float>() : nullptr, B,
                            y.data_ptr<float>(), w.N);
    return y;
  }
  const int64_t tn = std::min<int64_t>(w.N, std::max<int64_t>(16, kTileBytes / (4 * K)));
  auto buf = at::empty({tn, K}, xf.options());
  for (int64_t n0 = 0; n0 < w.N; n0 += tn) {
    const int64_t n1 = std::min(w.N, n0 + tn);
    lorabench::cpu::q4_dequantize_rows(w, n0, n1, buf.data_ptr<float>());
    y.narrow(1, n0, n1 - n0).copy_(at::mm(xp, buf.narrow(0, 0, n1 - n0).t()));
  }
  return y;
}

// --- NF4 ------------------------------------------------------------------------------------------

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& weight, int64_t blocksize) {
  TORCH_CHECK(blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0,
              "nf4_quantize: blocksize must be a power of two in [32, 4096], got ", blocksize);
  auto w = weight.contiguous().to(at::kFloat).reshape({-1});
  const int64_t n = w.numel();
  auto packed = at::empty({ceil_div(n, 2)}, w.options().dtype(at::kByte));
  auto absmax = at::empty({ceil_div(n, blocksize)}, w.options());
  lorabench::cpu::nf4_quantize(w.data_ptr<float>(), n, blocksize, packed.data_ptr<uint8_t>(),
                               absmax.data_ptr<float>());
  return {packed, absmax};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& absmax2,
                              const OptTensor& code2, const OptTensor& offset, at::IntArrayRef shape,
                              int64_t blocksize, at::ScalarType dtype) {
  int64_t n = 1;
  for (auto s : shape) n *= s;
  check_nf4_state(packed, absmax, n, blocksize);
  auto am = nf4_absmax_fp32(absmax, absmax2, code2, offset);
  auto p = packed.contiguous();
  auto out = at::empty({n}, packed.options().dtype(at::kFloat));
  lorabench::cpu::nf4_dequantize(p.data_ptr<uint8_t>(), am.data_ptr<float>(), n, blocksize, out.data_ptr<float>());
  return out.view(shape).to(dtype);
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                          const OptTensor& absmax2, const OptTensor& code2, const OptTensor& offset,
                          int64_t out_features, int64_t blocksize, const OptTensor& bias, const OptTensor& lora_A,
                          const OptTensor& lora_B, double scale) {
  const int64_t K = x.size(1), N = out_features;
  check_x(x, K, N, bias);
  check_nf4_state(packed, absmax, N * K, blocksize);
  const bool fast = K % 64 == 0 && K % blocksize == 0 && x.scalar_type() != at::kDouble;
  at::Tensor y;
  if (!fast) {  // blocks straddle rows (in % blocksize != 0) or float64: dequantize, then matmul
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    auto w = nf4_dequantize_cpu(packed, absmax, absmax2, code2, offset, {N, K}, blocksize, acc);
    y = at::mm(x.to(acc), w.t());
  } else {
    auto p = packed.contiguous();
    lorabench::cpu::Q4Weight w;
    w.packed = p.data_ptr<uint8_t>();
    w.N = N;
    w.K = K;
    w.group = blocksize;
    at::Tensor am, q8, a2, c2;  // keep the storage alive
    if (absmax.scalar_type() == at::kByte) {
      check_nested(absmax, absmax2, code2, offset);
      q8 = absmax.contiguous();
      a2 = absmax2->contiguous();
      c2 = code2->contiguous();
      w.scale_q8 = q8.data_ptr<uint8_t>();
      w.scale2 = a2.data_ptr<float>();
      w.code2 = c2.data_ptr<float>();
      w.offset = *offset->data_ptr<float>();  // a CPU float32 scalar (check_nested): no item() dispatch
    } else {
      TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32 or uint8, got ", absmax.scalar_type());
      am = absmax.contiguous();
      w.scale = am.data_ptr<float>();
    }
    y = q4_matmul_cpu(x, w);
  }
  return finish(y, x, bias, lora_A, lora_B, scale, 1);
}

// --- int4 -----------------------------------------------------------------------------------------

void check_int4(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group) {
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "group_size must be 32, 64 or 128, got ", group);
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "packed must be (out, in/2) uint8, got ",
              packed.scalar_type(), " ", packed.sizes());
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  TORCH_CHECK(K % group == 0, "in_features ", K, " is not a multiple of group_size ", group);
  for (const auto* t : {&scales, &zeros})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == N && t->size(1) == K / group,
                "scales and zeros must be float32 (", N, ", ", K / group, "), got ", t->scalar_type(), " ", t->sizes());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> int4_quantize_cpu(const at::Tensor& weight, int64_t group) {
  TORCH_CHECK(weight.dim() == 2, "int4_quantize: weight must be (out, in), got ", weight.sizes());
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "group_size must be 32, 64 or 128, got ", group);
  const int64_t N = weight.size(0), K = weight.size(1);
  TORCH_CHECK(K % group == 0, "in_features ", K, " is not a multiple of group_size ", group);
  auto w = weight.contiguous().to(at::kFloat);
  auto packed = at::empty({N, K / 2}, w.options().dtype(at::kByte));
  auto scales = at::empty({N, K / group}, w.options());
  auto zeros = at::empty({N, K / group}, w.options());
  lorabench::cpu::int4_quantize(w.data_ptr<float>(), N, K, group, packed.data_ptr<uint8_t>(),
                                scales.data_ptr<float>(), zeros.data_ptr<float>());
  return {packed, scales, zeros};
}

at::Tensor int4_dequantize_cpu(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                               int64_t group, at::ScalarType dtype) {
  check_int4(packed, scales, zeros, group);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  auto p = packed.contiguous();
  auto s = scales.contiguous();
  auto z = zeros.contiguous();
  auto out = at::empty({N, K}, scales.options());
  lorabench::cpu::int4_dequantize(p.data_ptr<uint8_t>(), s.data_ptr<float>(), z.data_ptr<float>(), N, K, group,
                                  out.data_ptr<float>());
  return out.to(dtype);
}

at::Tensor int4_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                           const at::Tensor& zeros, int64_t group, const OptTensor& bias, const OptTensor& lora_A,
                           const OptTensor& lora_B, double scale) {
  check_int4(packed, scales, zeros, group);
  const int64_t N = packed.size(0), K = packed.size(1) * 2;
  check_x(x, K, N, bias);
  const int64_t pool = lora_A && lora_A->dim() == 2 && lora_A->size(1) == K / group ? group : 1;
  at::Tensor y;
  if (K % 64 != 0 || x.scalar_type() == at::kDouble) {
    const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
    y = at::mm(x.to(acc), int4_dequantize_cpu(packed, scales, zeros, group, acc).t());
  } else {
    auto p = packed.contiguous();
    auto s = scales.contiguous();
    auto z = zeros.contiguous();
    lorabench::cpu::Q4Weight w;
    w.packed = p.data_ptr<uint8_t>();
    w.N = N;
    w.K = K;
    w.group = group;
    w.scale = s.data_ptr<float>();
    w.zero = z.data_ptr<float>();
    w.int_codes = true;
    y = q4_matmul_cpu(x, w);
  }
  return finish(y, x, bias, lora_A, lora_B, scale, pool);
}

}  // namespace

TORCH_LIBRARY_IMPL(lorabench, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_linear", &nf4_linear_cpu);
  m.impl("int4_quantize", &int4_quantize_cpu);
  m.impl("int4_dequantize", &int4_dequantize_cpu);
  m.impl("int4_linear", &int4_linear_cpu);
}

// --- autograd (in C++: a Python autograd.Function costs more than a batch-1 GEMV on a small layer) ---
// The same math as QuantLinearFunction in lorabench/ops/nf4.py (the autograd of the reference fallback
// when the extension is not built), op for op: gradients for x, bias, lora_A and lora_B; the quantized
// base is frozen (QLoRA), dx = dy W with W dequantized to dy's dtype. The forward redispatches below
// autograd to the device's kernel (compiled, or the reference registered from Python).
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

at::Tensor or_undefined(const OptTensor& t) { return t.has_value() ? *t : at::Tensor(); }

// Edge (input-gradient slot) of each differentiable argument: autograd numbers only the tensors that are
// present, so an absent optional shifts the ones after it. Stored in ctx->saved_data as {x, bias, A, B}.
std::vector<int64_t> quant_edges(int64_t state_tensors, const OptTensor& bias, const OptTensor& A,
                                 const OptTensor& B) {
  int64_t e = 1 + state_tensors;  // x, then the state tensors
  std::vector<int64_t> edges{0, -1, -1, -1};
  if (bias) edges[1] = e++;
  if (A) edges[2] = e++;
  if (B) edges[3] = e++;
  return edges;
}

bool needs(AutogradContext* ctx, int64_t edge) { return edge >= 0 && ctx->needs_input_grad(edge); }

OptTensor to_opt(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// Gradients of y = x W^T + b + s (P x A^T) B^T (P: mean over groups of `pool` inputs, QA-LoRA): returns dx
// and fills d_bias, d_a, d_b (left undefined when not needed). `weight(dtype)` is W (out, in).
template <typename Dequantize>
at::Tensor quant_linear_backward(AutogradContext* ctx, const at::Tensor& dy, const at::Tensor& x,
                                 const at::Tensor& lora_A, const at::Tensor& lora_B, int64_t pool,
                                 Dequantize weight, at::Tensor& d_bias, at::Tensor& d_a, at::Tensor& d_b) {
  const auto edges = ctx->saved_data["edges"].toIntVector();
  const double scale = ctx->saved_data["scale"].toDouble();
  const bool need_x = needs(ctx, edges[0]), need_a = needs(ctx, edges[2]), need_bb = needs(ctx, edges[3]);
  at::Tensor dx;
  if (need_x) dx = at::mm(dy, weight(dy.scalar_type()));  // (tokens, in)
  if (lora_A.defined()) {
    const at::Tensor xp = pool == 1 ? x : x.reshape({x.size(0), x.size(1) / pool, pool}).mean(-1);
    const at::Tensor dxa = lorabench::narrow_mm(dy, lora_B).mul_(scale);  // (tokens, r)
    if (need_bb) d_b = lorabench::grad_b(dy, lorabench::narrow_mm(xp, lora_A.t()), scale);  // (out, r)
    if (need_a) d_a = at::mm(dxa.t(), xp);  // (r, in / pool)
    if (need_x) {
      const at::Tensor dxp = at::mm(dxa, lora_A);  // (tokens, in / pool)
      dx = dx.add(pool == 1 ? dxp : dxp.div(pool).repeat_interleave(pool, 1));
    }
  }
  if (needs(ctx, edges[1])) d_bias = dy.sum(0);
  return dx;
}

struct NF4LinearFunction : public torch::autograd::Function<NF4LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& absmax, const OptTensor& absmax2, const OptTensor& code2,
                               const OptTensor& offset, int64_t out_features, int64_t blocksize, const OptTensor& bias,
                               const OptTensor& lora_A, const OptTensor& lora_B, double scale) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::nf4_linear", "")
                         .typed<decltype(nf4_linear_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = op.call(x, packed, absmax, absmax2, code2, offset, out_features, blocksize, bias, lora_A, lora_B,
                           scale);
    ctx->save_for_backward({x, packed, absmax, or_undefined(absmax2), or_undefined(code2), or_undefined(offset),
                            or_undefined(lora_A), or_undefined(lora_B)});
    const int64_t state_tensors = 2 + absmax2.has_value() + code2.has_value() + offset.has_value();
    ctx->saved_data["edges"] = quant_edges(state_tensors, bias, lora_A, lora_B);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["out_features"] = out_features;
    ctx->saved_data["blocksize"] = blocksize;
    return {y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto dequantize = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::nf4_dequantize", "")
                                 .typed<decltype(nf4_dequantize_cpu)>();
    variable_list out(12);  // one slot per forward argument: x 0, bias 8, lora_A 9, lora_B 10
    if (!grads[0].defined()) return out;
    const auto v = ctx->get_saved_variables();
    const int64_t N = ctx->saved_data["out_features"].toInt(), bs = ctx->saved_data["blocksize"].toInt();
    const at::Tensor& x = v[0];
    auto weight = [&](at::ScalarType dtype) {
      const std::vector<int64_t> shape{N, x.size(1)};
      return dequantize.call(v[1], v[2], to_opt(v[3]), to_opt(v[4]), to_opt(v[5]), shape, bs, dtype);
    };
    out[0] = quant_linear_backward(ctx, grads[0], x, v[6], v[7], 1, weight, out[8], out[9], out[10]);
    return out;
  }
};

struct Int4LinearFunction : public torch::autograd::Function<Int4LinearFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& packed,
                               const at::Tensor& scales, const at::Tensor& zeros, int64_t group, const OptTensor& bias,
                               const OptTensor& lora_A, const OptTensor& lora_B, double scale) {
    static auto op = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::int4_linear", "")
                         .typed<decltype(int4_linear_cpu)>();
    at::AutoDispatchBelowADInplaceOrView guard;
    at::Tensor y = op.call(x, packed, scales, zeros, group, bias, lora_A, lora_B, scale);
    ctx->save_for_backward({x, packed, scales, zeros, or_undefined(lora_A), or_undefined(lora_B)});
    ctx->saved_data["edges"] = quant_edges(3, bias, lora_A, lora_B);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["group"] = group;
    return {y};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    static auto dequantize = c10::Dispatcher::singleton().findSchemaOrThrow("lorabench::int4_dequantize", "")
                                 .typed<decltype(int4_dequantize_cpu)>();
    variable_list out(9);  // one slot per forward argument: x 0, bias 5, lora_A 6, lora_B 7
    if (!grads[0].defined()) return out;
    const auto v = ctx->get_saved_variables();
    const int64_t group = ctx->saved_data["group"].toInt();
    const at::Tensor& x = v[0];
    const at::Tensor& A = v[4];
    // QA-LoRA: A (r, in / group) acts on the group-averaged input (as the op's own choice of pool)
    const int64_t pool = A.defined() && A.dim() == 2 && A.size(1) == x.size(1) / group ? group : 1;
    auto weight = [&](at::ScalarType dtype) { return dequantize.call(v[1], v[2], v[3], group, dtype); };
    out[0] = quant_linear_backward(ctx, grads[0], x, A, v[5], pool, weight, out[5], out[6], out[7]);
    return out;
  }
};

at::Tensor nf4_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                               const OptTensor& absmax2, const OptTensor& code2, const OptTensor& offset,
                               int64_t out_features, int64_t blocksize, const OptTensor& bias, const OptTensor& lora_A,
                               const OptTensor& lora_B, double scale) {
  return NF4LinearFunction::apply(x, packed, absmax, absmax2, code2, offset, out_features, blocksize, bias, lora_A,
                                  lora_B, scale)[0];
}

at::Tensor int4_linear_autograd(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                const at::Tensor& zeros, int64_t group, const OptTensor& bias, const OptTensor& lora_A,
                                const OptTensor& lora_B, double scale) {
  return Int4LinearFunction::apply(x, packed, scales, zeros, group, bias, lora_A, lora_B, scale)[0];
}

}  // namespace

TORCH_LIBRARY_IMPL(lorabench, Autograd, m) {
  m.impl("nf4_linear", &nf4_linear_autograd);
  m.impl("int4_linear", &int4_linear_autograd);
}

#ifdef LORABENCH_WITH_CUDA
// --- CUDA -----------------------------------------------------------------------------------------
namespace {

namespace lc = lorabench::cuda;

lc::DType cuda_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return lc::DType::kFloat32;
    case at::kBFloat16: return lc::DType::kBFloat16;
    case at::kHalf: return lc::DType::kFloat16;
    default: TORCH_CHECK(false, "CUDA 4-bit kernels support float32, bfloat16 and float16, got ", t);
  }
}

// The launch parameters of an NF4 state; `keep` holds the contiguous tensors the pointers refer to.
lc::Q4Params nf4_params(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& absmax2,
                        const OptTensor& code2, const OptTensor& offset, int64_t N, int64_t K, int64_t blocksize,
                        std::vector<at::Tensor>& keep) {
  check_nf4_state(packed, absmax, N * K, blocksize);
  lc::Q4Params p;
  keep.push_back(packed.contiguous());
  p.packed = keep.back().data_ptr<uint8_t>();
  p.N = N;
  p.K = K;
  p.group = blocksize;
  if (absmax.scalar_type() == at::kByte) {
    TORCH_CHECK(absmax2 && code2 && offset, "uint8 absmax (double quantization) needs absmax2, code2 and offset");
    TORCH_CHECK(absmax2->scalar_type() == at::kFloat && absmax2->numel() == ceil_div(absmax.numel(), kNestedBlock),
                "absmax2 must be float32 with ", ceil_div(absmax.numel(), kNestedBlock), " values");
    TORCH_CHECK(code2->scalar_type() == at::kFloat && code2->numel() == 256, "code2 must be float32 (256,)");
    TORCH_CHECK(offset->scalar_type() == at::kFloat && offset->numel() == 1, "offset must be a float32 scalar");
    keep.push_back(absmax.contiguous());
    p.scale_q8 = keep.back().data_ptr<uint8_t>();
    keep.push_back(absmax2->contiguous());
    p.scale2 = keep.back().data_ptr<float>();
    keep.push_back(code2->contiguous());
    p.code2 = keep.back().data_ptr<float>();
    keep.push_back(offset->contiguous());
    p.offset = keep.back().data_ptr<float>();
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, "absmax must be float32 or uint8, got ", absmax.scalar_type());
    keep.push_back(absmax.contiguous());
    p.scale = keep.back().data_ptr<float>();
  }
  for (const auto& t : keep) TORCH_CHECK(t.is_cuda() && t.device() == packed.device(), "all state tensors must be on ", packed.device());
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  return p;
}

lc::Q4Params int4_params(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros, int64_t group,
                         std::vector<at::Tensor>& keep) {
  check_int4(packed, scales, zeros, group);
  lc::Q4Params p;
  keep.push_back(packed.contiguous());
  p.packed = keep.back().data_ptr<uint8_t>();
  p.N = packed.size(0);
  p.K = packed.size(1) * 2;
  p.group = group;
  keep.push_back(scales.contiguous());
  p.scale = keep.back().data_ptr<float>();
  keep.push_back(zeros.contiguous());
  p.zero = keep.back().data_ptr<float>();
  p.int_codes = true;
  for (const auto& t : keep) TORCH_CHECK(t.is_cuda() && t.device() == packed.device(), "all state tensors must be on ", packed.device());
  p.stream = c10::cuda::getCurrentCUDAStream().stream();
  return p;
}

at::Tensor q4_dequantize_cuda(const lc::Q4Params& p, const at::TensorOptions& opts, at::ScalarType dtype) {
  const auto kernel_dtype = dtype == at::kDouble ? at::kFloat : dtype;
  auto out = at::empty({p.N, p.K}, opts.dtype(kernel_dtype));
  if (out.numel() > 0) {
    lc::q4_dequantize_cuda(p, out.data_ptr(), cuda_dtype(kernel_dtype));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return out.to(dtype);
}

// y = x W^T: the GEMV kernel for small batches, else dequantize to x's dtype and cuBLAS.
at::Tensor q4_matmul_cuda(const at::Tensor& x, const lc::Q4Params& p) {
  const int64_t B = x.size(0);
  const bool aligned = reinterpret_cast<uintptr_t>(p.packed) % 16 == 0;
  if (B <= lc::kMaxGemvBatch && p.K % 32 == 0 && aligned && x.scalar_type() != at::kDouble) {
    auto xc = x.contiguous();
    auto y = at::empty({B, p.N}, x.options().dtype(at::kFloat));
    if (B > 0 && p.N > 0) {
      lc::q4_gemv_cuda(p, xc.data_ptr(), p.K, cuda_dtype(x.scalar_type()), B, y.data_ptr<float>(), p.N);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    return y;
  }
  // W dequantized to x's dtype, the product in fp32 (cuBLAS sums in fp32 and writes fp32): finish() then adds
  // bias and LoRA in fp32 and rounds once, as the CPU path does, instead of rounding the product first.
  const at::Tensor w = q4_dequantize_cuda(p, x.options(), x.scalar_type());
  if (x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16) return at::mm(x, w.t(), at::kFloat);
  return at::mm(x, w.t());
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& absmax, const OptTensor& absmax2,
                               const OptTensor& code2, const OptTensor& offset, at::IntArrayRef shape,
                               int64_t blocksize, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(packed.device());
  int64_t n = 1;
  for (auto s : shape) n *= s;
  std::vector<at::Tensor> keep;
  auto p = nf4_params(packed, absmax, absmax2, code2, offset, 1, n, blocksize, keep);
  return q4_dequantize_cuda(p, packed.options(), dtype).view(shape);
}

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                           const OptTensor& absmax2, const OptTensor& code2, const OptTensor& offset,
                           int64_t out_features, int64_t blocksize, const OptTensor& bias, const OptTensor& lora_A,
                           const OptTensor& lora_B, double scale) {
  c10::cuda::CUDAGuard guard(x.device());
  const int64_t K = x.size(1), N = out_features;
  check_x(x, K, N, bias);
  CHECK_CPU_OR_SAME(packed, x);
  if (lora_A) CHECK_CPU_OR_SAME(*lora_A, x);
  if (lora_B) CHECK_CPU_OR_SAME(*lora_B, x);
  std::vector<at::Tensor> keep;
  auto p = nf4_params(packed, absmax, absmax2, code2, offset, N, K, blocksize, keep);
  return finish(q4_matmul_cuda(x, p), x, bias, lora_A, lora_B, scale, 1);
}

at::Tensor int4_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales, const at::Tensor& zeros,
                                int64_t group, at::ScalarType dtype) {
  c10::cuda::CUDAGuard guard(packed.device());
  std::vector<at::Tensor> keep;
  auto p = int4_params(packed, scales, zeros, group, keep);
  return q4_dequantize_cuda(p, packed.options(), dtype);
}

at::Tensor int4_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                            const at::Tensor& zeros, int64_t group, const OptTensor& bias, const OptTensor& lora_A,
                            const OptTensor& lora_B, double scale) {
  c10::cuda::CUDAGuard guard(x.device());
  std::vector<at::Tensor> keep;
  CHECK_CPU_OR_SAME(packed, x);
  if (lora_A) CHECK_CPU_OR_SAME(*lora_A, x);
  if (lora_B) CHECK_CPU_OR_SAME(*lora_B, x);
  auto p = int4_params(packed, scales, zeros, group, keep);
  check_x(x, p.K, p.N, bias);
  const int64_t pool = lora_A && lora_A->dim() == 2 && lora_A->size(1) == p.K / group ? group : 1;
  return finish(q4_matmul_cuda(x, p), x, bias, lora_A, lora_B, scale, pool);
}

}  // namespace

// Quantization has no CUDA kernel: the reference (CompositeExplicitAutograd) runs it on the GPU.
TORCH_LIBRARY_IMPL(lorabench, CUDA, m) {
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_linear", &nf4_linear_cuda);
  m.impl("int4_dequantize", &int4_dequantize_cuda);
  m.impl("int4_linear", &int4_linear_cuda);
}
#endif  // LORABENCH_WITH_CUDA
