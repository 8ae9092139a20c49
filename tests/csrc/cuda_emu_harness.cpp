// Numeric check of the CUDA project_out_ / olora_loss launchers under the host emulation (tests/csrc/cuda_emu_shim.h)
// against float64 loops: both sides, strided bases, bfloat16 storage, k = kProjMaxK, p = 0 layers (zero gradient),
// more layers than one kernel-argument table. Prints one line per case; exit status = number of failures.
#include <cstdio>
#include <array>
#include <random>
#include <vector>
#include <cmath>
#include "project_out_launch.h"
#include "olora_loss_launch.h"
using namespace forgetkern;
std::mt19937 rng(1);
double rnd() { return std::normal_distribution<double>(0, 1)(rng); }
int fails = 0;

void check_proj(bool left, int rows, int cols, int k, bool u_transposed, bool bf16) {
  int L = left ? rows : cols;
  std::vector<float> x(rows * cols), u(L * k);
  for (auto& v : x) v = rnd();
  for (auto& v : u) v = rnd() / std::sqrt(L);
  // U stored (L x k) row-major, or as the transpose of a (k x L) row-major buffer
  std::vector<float> ubuf(L * k);
  for (int l = 0; l < L; ++l) for (int j = 0; j < k; ++j) {
    if (u_transposed) ubuf[j * L + l] = u[l * k + j]; else ubuf[l * k + j] = u[l * k + j];
  }
  std::vector<fk_bf16> xb(x.size());
  if (bf16) for (size_t i = 0; i < x.size(); ++i) { xb[i] = Store<fk_bf16>::from(x[i]); x[i] = to_float(xb[i]); }
  // reference in double on the view Y
  std::vector<double> want(x.size());
  int n = left ? cols : rows;
  auto xi = [&](int l, int j) { return left ? l * cols + j : j * cols + l; };
  for (int j = 0; j < n; ++j) {
    std::vector<double> c(k, 0.0);
    for (int kk = 0; kk < k; ++kk) for (int l = 0; l < L; ++l) c[kk] += (double)u[l * k + kk] * x[xi(l, j)];
    for (int l = 0; l < L; ++l) { double s = x[xi(l, j)]; for (int kk = 0; kk < k; ++kk) s -= (double)u[l * k + kk] * c[kk]; want[xi(l, j)] = s; }
  }
  ProjLayer ly{};
  ly.x = bf16 ? (void*)xb.data() : (void*)x.data(); ly.u = ubuf.data(); ly.k = k;
  proj_view(left, rows, cols, &ly.L, &ly.n, &ly.s_l, &ly.s_n);
  ly.s_ul = u_transposed ? 1 : k; ly.s_uk = u_transposed ? L : 1;
  ProjLayer layers[2] = {ly, ly};
  cudaError_t e = cuda::project_out_launch(1, layers, bf16 ? DType::BFloat16 : DType::Float32, DType::Float32, nullptr);
  double maxerr = 0;
  for (size_t i = 0; i < x.size(); ++i) {
    double got = bf16 ? to_float(xb[i]) : x[i];
    maxerr = std::fmax(maxerr, std::fabs(got - want[i]) / (1 + std::fabs(want[i])));
  }
  bool ok = e == cudaSuccess && maxerr < (bf16 ? 1e-2 : 1e-5);
  if (!ok) ++fails;
  std::printf("proj left=%d %dx%d k=%d ut=%d bf16=%d err=%d maxrel=%.3g %s\n", left, rows, cols, k, u_transposed, bf16, (int)e, maxerr, ok ? "ok" : "FAIL");
}

void check_olora(std::vector<std::array<int, 3>> shapes, int norm) {
  std::vector<std::vector<float>> P, C, G;
  std::vector<OloraLayer> layers;
  int64_t s_total = 0;
  double want = 0;
  std::vector<std::vector<double>> gw;
  for (auto [p, r, K] : shapes) {
    std::vector<float> a(p * K), c(r * K);
    for (auto& v : a) v = rnd(); for (auto& v : c) v = rnd();
    P.push_back(a); C.push_back(c); G.emplace_back(r * K, -7.f);
    std::vector<double> g(r * K, 0.0);
    for (int i = 0; i < p; ++i) for (int j = 0; j < r; ++j) {
      double s = 0; for (int kk = 0; kk < K; ++kk) s += (double)a[i * K + kk] * c[j * K + kk];
      want += norm == 0 ? std::fabs(s) : s * s;
      double seed = (norm == 0 ? (s > 0 ? 1 : s < 0 ? -1 : 0) : 2 * s) * 1.5;
      for (int kk = 0; kk < K; ++kk) g[j * K + kk] += seed * a[i * K + kk];
    }
    gw.push_back(g);
  }
  for (size_t i = 0; i < shapes.size(); ++i) {
    OloraLayer ly{}; ly.past = P[i].data(); ly.cur = C[i].data(); ly.grad = G[i].data();
    ly.p = shapes[i][0]; ly.r = shapes[i][1]; ly.K = shapes[i][2]; ly.s_off = s_total;
    if (ly.p > 0 && ly.r > 0) s_total += (int64_t)ly.p * ly.r;
    layers.push_back(ly);
  }
  int64_t slots = cuda::olora_workspace_slots(layers.size(), layers.data());
  std::vector<double> ws(slots + 1);
  float out = -1, g = 1.5f;
  std::vector<float> scratch(s_total + 1);
  cudaError_t e1 = cuda::olora_forward_launch(layers.size(), layers.data(), DType::Float32, DType::Float32, norm, ws.data(), 0, nullptr);
  cudaError_t e2 = cuda::olora_finalize_launch(ws.data(), slots, &out, nullptr);
  cudaError_t e3 = cuda::olora_backward_launch(layers.size(), layers.data(), DType::Float32, DType::Float32, norm, &g, scratch.data(), nullptr);
  double gerr = 0;
  for (size_t i = 0; i < shapes.size(); ++i) for (size_t j = 0; j < G[i].size(); ++j)
    gerr = std::fmax(gerr, std::fabs(G[i][j] - gw[i][j]) / (1 + std::fabs(gw[i][j])));
  double lerr = std::fabs(out - want) / (1 + want);
  bool ok = !e1 && !e2 && !e3 && lerr < 1e-5 && gerr < 1e-4;
  if (!ok) ++fails;
  std::printf("olora n=%zu norm=%d loss=%.6g want=%.6g gerr=%.3g %s\n", shapes.size(), norm, out, want, gerr, ok ? "ok" : "FAIL");
}

int main() {
  check_proj(true, 70, 16, 9, false, false);
  check_proj(false, 16, 70, 9, false, false);
  check_proj(true, 33, 40, 40, true, false);
  check_proj(false, 45, 65, 128, true, false);
  check_proj(true, 65, 17, 64, false, true);
  check_proj(false, 5, 33, 3, false, true);
  check_olora({{32, 16, 40}, {8, 5, 33}, {48, 16, 70}, {0, 4, 9}, {40, 33, 130}}, 0);
  check_olora({{32, 16, 40}, {8, 5, 33}, {48, 16, 70}, {0, 4, 9}, {40, 33, 130}}, 1);
  std::vector<std::array<int, 3>> many;
  for (int k = 0; k < 70; ++k) many.push_back({2 + k % 3, 1 + k % 5, 4 + k % 7});
  check_olora(many, 1);
  std::printf("fails=%d\n", fails);
  return fails;
}
