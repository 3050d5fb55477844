// Argument checks of masked_adamw_, shared by the CPU and CUDA kernels so both reject the same
// bad input with the same message (before any tensor is touched).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/irange.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "overlap.h"

namespace gradkit {
namespace adamw {

inline void check_list(at::TensorList ts, const at::Tensor& p0, const char* what) {
  for (const auto i : c10::irange(ts.size())) {
    TORCH_CHECK_VALUE(ts[i].device() == p0.device(), what, "[", i, "]: on ", ts[i].device(), " but params[0] is on ",
                      p0.device());
    TORCH_CHECK_VALUE(ts[i].is_contiguous(), what, "[", i, "]: expected a contiguous tensor");
    TORCH_CHECK_TYPE(ts[i].scalar_type() == p0.scalar_type(), what, "[", i, "]: dtype ", ts[i].scalar_type(),
                     " differs from params[0]'s ", p0.scalar_type());
  }
}

// Python's repr() of a float: the shortest digits that read back as v, fixed notation for decimal
// exponents in [-4, 16) (with a ".0" when integral), else d[.ddd]e+XX; "nan", "inf", "-inf". The scalar
// checks below print their values with it, so their messages are the Python wrapper's (gradkit.ops.
// masked_adamw_, which prints {v!r}) character for character.
inline std::string py_repr(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[40];
  for (int prec = 0; prec < 17; ++prec) {  // significant digits - 1; 17 digits always read back
    std::snprintf(buf, sizeof buf, "%.*e", prec, v);
    if (std::strtod(buf, nullptr) == v) break;
  }
  std::string s(buf);  // [-]d[.ddd]e(+|-)XX
  const bool neg = s[0] == '-';
  if (neg) s.erase(0, 1);
  const size_t e = s.find('e');
  const int exp = std::atoi(s.c_str() + e + 1);
  std::string digits;
  for (size_t i = 0; i < e; ++i) {
    if (s[i] != '.') digits += s[i];
  }
  while (digits.size() > 1 && digits.back() == '0') digits.pop_back();
  std::string out;
  if (exp >= -4 && exp < 16) {
    if (exp < 0) {
      out = "0." + std::string(static_cast<size_t>(-exp - 1), '0') + digits;
    } else if (digits.size() <= static_cast<size_t>(exp) + 1) {
      out = digits + std::string(static_cast<size_t>(exp) + 1 - digits.size(), '0') + ".0";
    } else {
      out = digits.substr(0, static_cast<size_t>(exp) + 1) + "." + digits.substr(static_cast<size_t>(exp) + 1);
    }
  } else {
    out = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : std::string());
    char eb[16];
    std::snprintf(eb, sizeof eb, "e%c%02d", exp < 0 ? '-' : '+', exp < 0 ? -exp : exp);
    out += eb;
  }
  return neg ? "-" + out : out;
}

// The scalar checks of gradkit.ops.masked_adamw_ (same ranges, same order, same messages): rates, eps and
// weight decay finite and >= 0 (a NaN or inf one writes NaN into every parameter), betas in [0, 1), every
// bias correction in (0, 1] (each entry named by its index).
inline void check_scalars(double masked_lr, double unmasked_lr, double beta1, double beta2, double eps,
                          double weight_decay, at::ArrayRef<double> bias_correction1,
                          at::ArrayRef<double> bias_correction2_sqrt) {
  const std::pair<const char*, double> nonneg[] = {
      {"masked_lr", masked_lr}, {"unmasked_lr", unmasked_lr}, {"eps", eps}, {"weight_decay", weight_decay}};
  for (const auto& [name, v] : nonneg) {
    TORCH_CHECK_VALUE(std::isfinite(v) && v >= 0, name, ": expected a finite number >= 0, got ", py_repr(v));
  }
  const std::pair<const char*, double> betas[] = {{"beta1", beta1}, {"beta2", beta2}};
  for (const auto& [name, v] : betas) {
    TORCH_CHECK_VALUE(v >= 0.0 && v < 1.0, name, ": expected a number in [0, 1), got ", py_repr(v));
  }
  const std::pair<const char*, at::ArrayRef<double>> bcs[] = {{"bias_correction1", bias_correction1},
                                                              {"bias_correction2_sqrt", bias_correction2_sqrt}};
  for (const auto& [name, vs] : bcs) {
    for (const auto i : c10::irange(vs.size())) {
      TORCH_CHECK_VALUE(vs[i] > 0.0 && vs[i] <= 1.0, name, "[", i, "]: expected a number in (0, 1], got ",
                        py_repr(vs[i]));
    }
  }
}

// Every check, before any tensor is touched. Returns false when there is nothing to do (no parameters).
inline bool check_args(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, const c10::List<std::optional<at::Tensor>>& bits,
                       double masked_lr, double unmasked_lr, double beta1, double beta2, double eps,
                       double weight_decay, at::ArrayRef<double> bias_correction1,
                       at::ArrayRef<double> bias_correction2_sqrt,
                       const std::optional<at::TensorList>& max_exp_avg_sqs = std::nullopt) {
  const size_t n = params.size();
  if (max_exp_avg_sqs.has_value()) {  // AMSGrad's running maxima: one per parameter, as exp_avg_sqs
    TORCH_CHECK_VALUE(max_exp_avg_sqs->size() == n, "max_exp_avg_sqs: expected a list of ", n,
                      " entries (one per parameter)");
  }
  const std::pair<const char*, size_t> sizes[] = {
      {"grads", grads.size()}, {"exp_avgs", exp_avgs.size()}, {"exp_avg_sqs", exp_avg_sqs.size()},
      {"bits", bits.size()}, {"bias_correction1", bias_correction1.size()},
      {"bias_correction2_sqrt", bias_correction2_sqrt.size()}};
  for (const auto& [name, size] : sizes) {  // the wrapper's message, naming the first list that is off
    TORCH_CHECK_VALUE(size == n, name, ": expected a list of ", n, " entries (one per parameter)");
  }
  if (n == 0) {  // nothing to write, but the wrapper refuses bad scalars here too
    check_scalars(masked_lr, unmasked_lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt);
    return false;
  }
  const at::Tensor& p0 = params[0];
  TORCH_CHECK_TYPE(p0.is_floating_point(), "params[0]: expected a floating tensor, got ", p0.scalar_type());
  check_list(params, p0, "params");
  check_list(grads, p0, "grads");
  check_list(exp_avgs, p0, "exp_avgs");
  check_list(exp_avg_sqs, p0, "exp_avg_sqs");
  if (max_exp_avg_sqs.has_value()) check_list(*max_exp_avg_sqs, p0, "max_exp_avg_sqs");
  for (const auto i : c10::irange(n)) {
    const int64_t numel = params[i].numel();
    const std::pair<const char*, const at::Tensor*> state[] = {
        {"grads", &grads[i]}, {"exp_avgs", &exp_avgs[i]}, {"exp_avg_sqs", &exp_avg_sqs[i]}};
    for (const auto& [name, t] : state) {  // the shape, as the wrapper (not only the entry count)
      TORCH_CHECK_VALUE(t->sizes() == params[i].sizes(), name, "[", i, "]: expected a contiguous tensor of shape ",
                        params[i].sizes(), " (that of params[", i, "]), got ", t->sizes());
    }
    if (max_exp_avg_sqs.has_value()) {
      const at::Tensor& t = (*max_exp_avg_sqs)[i];
      TORCH_CHECK_VALUE(t.sizes() == params[i].sizes(), "max_exp_avg_sqs[", i, "]: expected a contiguous tensor of ",
                        "shape ", params[i].sizes(), " (that of params[", i, "]), got ", t.sizes());
    }
    const auto& b = bits.get(i);
    if (b.has_value()) {
      TORCH_CHECK_TYPE(b->scalar_type() == at::kByte, "bits[", i, "]: expected uint8, got ", b->scalar_type());
      TORCH_CHECK_VALUE(b->dim() == 1 && b->numel() == (numel + 7) / 8 && b->is_contiguous() &&
                            b->device() == p0.device(),
                        "bits[", i, "]: expected a contiguous uint8 tensor of ", (numel + 7) / 8, " bytes on ",
                        p0.device());
    }
  }
  check_scalars(masked_lr, unmasked_lr, beta1, beta2, eps, weight_decay, bias_correction1, bias_correction2_sqrt);
  // Every entry of every tensor is updated in one parallel pass (and the kernels take the lists' pointers as
  // not aliasing): a tensor written twice (a parameter listed twice, one state tensor for two roles) or a
  // gradient that is also written would race. Refused, naming both, before any tensor is touched.
  std::vector<NamedTensor> named;
  named.reserve(5 * n);
  const std::pair<const char*, at::TensorList> written[] = {
      {"params", params}, {"exp_avgs", exp_avgs}, {"exp_avg_sqs", exp_avg_sqs}};
  for (const auto& [name, list] : written)
    for (const auto i : c10::irange(n)) named.push_back({&list[i], name, static_cast<int64_t>(i), true});
  if (max_exp_avg_sqs.has_value())
    for (const auto i : c10::irange(n)) named.push_back({&(*max_exp_avg_sqs)[i], "max_exp_avg_sqs", static_cast<int64_t>(i), true});
  for (const auto i : c10::irange(n)) named.push_back({&grads[i], "grads", static_cast<int64_t>(i), false});
  check_no_overlap(named);
  return true;
}

}  // namespace adamw
}  // namespace gradkit
