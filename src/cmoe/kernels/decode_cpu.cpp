// One MoE FFN step for a few tokens on the CPU, float32: router, shared part and the chosen experts in a
// single call. Decode at batch 1 is bound by per-operation overhead (a Python-level PyTorch op costs a few
// microseconds, the arithmetic of one expert about as much), so this does the small elementwise work in
// plain loops and leaves only the matrix-vector products to ATen (BLAS).
//
// Semantics are those of MoEFFN.forward in moe.py (the reference the tests compare against):
//   score_e = |act(g_e . x) * (u_e . x)|  (gated)   or   |act(u_e . x + b_e)|  (plain)
//   p = softmax(score); chosen = top-k of p + selection_bias; gate = 1 + p * gate_scale
//   out = shared(x) + sum over chosen of gate * expert(x) (+ down bias)

#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

namespace {

enum Activation : int64_t { SILU = 0, GELU = 1, GELU_TANH = 2, RELU = 3 };

inline float activate(float v, int64_t act) {
  switch (act) {
    case SILU: return v / (1.0f + std::exp(-v));
    case GELU: return 0.5f * v * (1.0f + std::erf(v * 0.70710678118654752f));
    case GELU_TANH: return 0.5f * v * (1.0f + std::tanh(0.79788456080286536f * (v + 0.044715f * v * v * v)));
    default: return v > 0.0f ? v : 0.0f;
  }
}

// In place on the projection [2W] (gated: act(gate) * up into the first W) or [W] (plain: act(up + bias)).
void hidden_inplace(float* projected, int64_t width, bool gated, int64_t act, const float* bias) {
  if (gated) {
    for (int64_t i = 0; i < width; ++i) projected[i] = activate(projected[i], act) * projected[width + i];
  } else {
    for (int64_t i = 0; i < width; ++i) projected[i] = activate(projected[i] + (bias ? bias[i] : 0.0f), act);
  }
}

// The vectors read element by element must be float32 and contiguous (the weights go through ATen).
const float* vector_data(const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous(), "cmoe decode kernel: expected a contiguous float32 tensor");
  return t.data_ptr<float>();
}

const float* data_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? vector_data(*t) : nullptr;
}

}  // namespace

// x [T, H] -> [T, H]. Optional tensors are absent for FFNs without biases or without shared experts.
at::Tensor moe_decode(const at::Tensor& x, const c10::optional<at::Tensor>& shared_gate_up,
                      const c10::optional<at::Tensor>& shared_down, const c10::optional<at::Tensor>& shared_bias,
                      const at::Tensor& router_weight, const c10::optional<at::Tensor>& router_bias,
                      const at::Tensor& selection_bias, const at::Tensor& gate_scale, bool gates_are_one,
                      const at::Tensor& gate_up, const c10::optional<at::Tensor>& up_bias, const at::Tensor& down,
                      const c10::optional<at::Tensor>& down_bias, int64_t top_k, int64_t act, bool gated) {
  at::AutoDispatchBelowADInplaceOrView no_autograd;  // inference only: skip the autograd layer of each op
  const int64_t experts = selection_bias.size(0), width = down.size(2);
  const float* selection = vector_data(selection_bias);
  const float* scale = vector_data(gate_scale);
  const float* router_b = data_or_null(router_bias);
  const float* up_b = data_or_null(up_bias);
  const bool has_shared = shared_gate_up.has_value() && shared_gate_up->defined();
  at::Tensor out = has_shared ? at::empty_like(x) : at::zeros_like(x);
  std::vector<float> prob(experts), key(experts);
  std::vector<int64_t> order(experts);

  for (int64_t t = 0; t < x.size(0); ++t) {
    at::Tensor row = x.select(0, t), out_row = out.select(0, t);
    if (has_shared) {
      at::Tensor h = at::mv(*shared_gate_up, row);
      const int64_t shared_width = shared_down->size(1);
      hidden_inplace(h.data_ptr<float>(), shared_width, gated, act, data_or_null(shared_bias));
      at::mv_out(out_row, *shared_down, h.narrow(0, 0, shared_width));
    }
    // router: the representative neurons' scores, softmax, top-k of softmax + selection bias
    at::Tensor scores = at::mv(router_weight, row);
    float* s = scores.data_ptr<float>();
    hidden_inplace(s, experts, gated, act, router_b);
    float top = -INFINITY, total = 0.0f;
    for (int64_t e = 0; e < experts; ++e) top = std::max(top, std::fabs(s[e]));
    for (int64_t e = 0; e < experts; ++e) total += (prob[e] = std::exp(std::fabs(s[e]) - top));
    for (int64_t e = 0; e < experts; ++e) key[e] = (prob[e] /= total) + selection[e];
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                      [&](int64_t a, int64_t b) { return key[a] > key[b] || (key[a] == key[b] && a < b); });
    for (int64_t k = 0; k < top_k; ++k) {
      const int64_t e = order[k];
      at::Tensor h = at::mv(gate_up.select(0, e), row);
      float* hp = h.data_ptr<float>();
      hidden_inplace(hp, width, gated, act, up_b ? up_b + e * width : nullptr);
      if (!gates_are_one) {
        const float gate = 1.0f + prob[e] * scale[e];
        for (int64_t i = 0; i < width; ++i) hp[i] *= gate;
      }
      out_row.addmv_(down.select(0, e), h.narrow(0, 0, width));
    }
  }
  if (down_bias.has_value() && down_bias->defined()) out.add_(*down_bias);
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("moe_decode", &moe_decode, "MoE FFN forward for a few tokens on the CPU (float32)");
}
