// Accuracy check of csrc/cpu/gauss_x4.h (the Gaussian generator's float64 log and sin / cos) against glibc:
// the arguments the generator produces (u1 = (h >> 32 + 0.5) 2^-32, t = 2 pi (h mod 2^32) 2^-32) for N random
// 64-bit h, plus edge cases (the ends of both ranges, the reduction's quadrant boundaries, t next to
// multiples of pi / 2, log's sqrt(2) / 2 split). Prints "log <max ulp> <fraction not equal to glibc's> sin ... cos ...
// n <count>" and exits 1 if any result is more than 1 ulp of float64 from glibc's. Built and run by
// tests/test_projection_ops.py (g++ -O2 -mavx2 -mfma -ffp-contract=off -I csrc/cpu).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "gauss_x4.h"

namespace {
constexpr double kTwoPi = 6.283185307179586, kInv2p32 = 2.3283064365386963e-10;

int64_t ordered(double v) {  // float64 bits mapped to integers in value order (ulp distance = difference)
  int64_t i;
  std::memcpy(&i, &v, 8);
  return i < 0 ? INT64_MIN - i : i;
}
struct MaxUlp {
  long long worst = 0, differ = 0, count = 0;
  void add(double got, double want) {
    const long long d = std::llabs(ordered(got) - ordered(want));
    if (d > worst) worst = d;
    differ += d != 0;
    ++count;
  }
  double frac() const { return count ? static_cast<double>(differ) / count : 0.0; }
};
uint64_t splitmix(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}
}  // namespace

int main(int argc, char** argv) {
  const long n = argc > 1 ? std::atol(argv[1]) : 1 << 22;
  std::vector<double> u, t;
  uint64_t s = 12345;
  for (long i = 0; i < n; ++i) {
    const uint64_t h = splitmix(s);
    u.push_back((static_cast<double>(h >> 32) + 0.5) * kInv2p32);
    t.push_back(kTwoPi * (static_cast<double>(h & 0xffffffffull) * kInv2p32));
  }
  // edges: u1 at both ends and around log's split points; t at the quadrant boundaries and next to them
  const double ue[] = {0.5 * kInv2p32, (4294967295.0 + 0.5) * kInv2p32, 0.5, 0.25, 0.7071067811865475,
                       0.7071067811865476, 0.7071067811865477, 0.35355339059327373, 0.35355339059327379,
                       std::nextafter(1.0, 0.0), 1.0 - 1e-9, 0.999, 1.5 * kInv2p32};
  for (double v : ue) u.push_back(v);
  const uint64_t q = 1ull << 30;
  const uint64_t te[] = {0, 1, 2, q / 2 - 1, q / 2, q / 2 + 1, q - 1, q, q + 1, 3 * q / 2, 2 * q - 1, 2 * q, 2 * q + 1,
                         5 * q / 2, 3 * q - 1, 3 * q, 3 * q + 1, 7 * q / 2, 4 * q - 2, 4 * q - 1};
  for (uint64_t m : te) t.push_back(kTwoPi * (static_cast<double>(m) * kInv2p32));
  while (u.size() % 4) u.push_back(0.5);
  while (t.size() % 4) t.push_back(0.0);
  MaxUlp lg, sn, cs;
  for (size_t i = 0; i < u.size(); i += 4) {
    double out[4];
    _mm256_storeu_pd(out, gradkit::projection::gauss::log_unit_x4(_mm256_loadu_pd(&u[i])));
    for (int l = 0; l < 4; ++l) lg.add(out[l], std::log(u[i + l]));
  }
  for (size_t i = 0; i < t.size(); i += 4) {
    __m256d sv, cv;
    gradkit::projection::gauss::sincos_turn_x4(_mm256_loadu_pd(&t[i]), &sv, &cv);
    double so[4], co[4];
    _mm256_storeu_pd(so, sv);
    _mm256_storeu_pd(co, cv);
    for (int l = 0; l < 4; ++l) {
      sn.add(so[l], std::sin(t[i + l]));
      cs.add(co[l], std::cos(t[i + l]));
    }
  }
  std::printf("log %lld %.4f sin %lld %.4f cos %lld %.4f n %zu\n", lg.worst, lg.frac(), sn.worst, sn.frac(), cs.worst,
              cs.frac(), u.size() + t.size());
  return lg.worst > 1 || sn.worst > 1 || cs.worst > 1;
}
