// Host run of the CUDA merge_task_vectors launch plan: csrc/cuda/merge_task_vectors.cu's plan_launches and
// merge_block (the kernel body), every block and thread executed on the CPU, against the per-element math of
// csrc/include/forgetkern/merge_task_vectors.h in the CPU kernel's order. Covers the multi-tensor tables (more
// tensors than one launch holds, empties), block -> tensor lookup, chunk tails, the aligned vector path and the
// scalar path (inputs one element off alignment), the DARE index with offsets, every prune / consensus /
// normalisation and dtype pairs. Prints "ok <cases>" or the first mismatch; exit code 1 on a mismatch.
#define FK_MERGE_HOST_ONLY
#include "../../csrc/cuda/merge_task_vectors.cu"

#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

namespace fk = forgetkern;
namespace fkc = forgetkern::cuda;

template <typename S> S from_double(double v) { return fk::Store<S>::from(static_cast<float>(v)); }
template <> double from_double<double>(double v) { return v; }
template <typename S> uint64_t bits(S v) { uint64_t r = 0; std::memcpy(&r, &v, sizeof(S)); return r; }

template <int PRUNE, bool ELECT, typename B, typename X>
int run_case(std::mt19937& rng, const fkc::MergeLaunchParams& prm, int shift) {
  using C = typename fkc::MergeTypes<B, X, ELECT>::C;
  const int64_t N = prm.n_tasks;
  const std::vector<int64_t> sizes = {0, 1, 3, 17, 16385, 7, 0, 300, 5, 2049, 1, 9, 33, 1024, 4, 6,
                                      8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30, 4097};
  const int64_t T = static_cast<int64_t>(sizes.size());
  std::normal_distribution<double> nd(0.0, 1.0);
  std::vector<std::vector<B>> base(T), out(T);
  std::vector<std::vector<X>> in(T * N);
  std::vector<const void*> bp(T), ip(T * N), tp(T);
  std::vector<void*> op(T);
  std::vector<uint64_t> offs(T);
  std::vector<uint32_t> keys(T * N);
  std::vector<C> thr(T * N);
  for (int64_t t = 0; t < T; ++t) {
    const int64_t n = sizes[t];
    const int sh = (t % 3 == 0) ? shift : 0;  // some tensors one element off alignment
    base[t].resize(n + sh);
    out[t].resize(n + sh);
    for (auto& v : base[t]) v = from_double<B>(nd(rng));
    bp[t] = base[t].data() + sh;
    op[t] = out[t].data() + sh;
    offs[t] = (t % 4 == 1) ? (uint64_t(1) << 32) - 5 + t : uint64_t(t * 1000);
    for (int64_t k = 0; k < N; ++k) {
      in[t * N + k].resize(n + sh);
      for (auto& v : in[t * N + k]) v = from_double<X>(0.1 * nd(rng));
      ip[t * N + k] = in[t * N + k].data() + sh;
      keys[t * N + k] = static_cast<uint32_t>(rng());
      thr[t * N + k] = static_cast<C>(0.02 * (k + 1));
    }
    tp[t] = thr.data() + t * N;
  }
  int launches = 0;
  const cudaError_t err = fkc::plan_launches<PRUNE, ELECT, B, X>(
      T, bp.data(), ip.data(), op.data(), sizes.data(), offs.data(), keys.data(), tp.data(), prm,
      [&](const fkc::MergeMeta& m, int64_t blocks) {
        ++launches;
        for (int64_t b = 0; b < blocks; ++b)
          for (int tid = 0; tid < fkc::kMergeThreads; ++tid) fkc::merge_block<PRUNE, ELECT, B, X>(m, b, tid);
        return cudaSuccess;
      });
  if (err != cudaSuccess || launches < 2) {
    std::printf("plan failed (err %d, launches %d)\n", int(err), launches);
    return 1;
  }
  const C scale = static_cast<C>(std::is_same<C, double>::value ? prm.scale_f64 : prm.scale_f32);
  for (int64_t t = 0; t < T; ++t) {
    const B* b = static_cast<const B*>(bp[t]);
    const B* o = static_cast<const B*>(op[t]);
    for (int64_t i = 0; i < sizes[t]; ++i) {
      const C bv = fk::load_as<C>(b[i]);
      fk::MergeAcc<C> a;
      fk::merge_acc_init(a);
      for (int64_t k = 0; k < N; ++k) {
        C tau = fk::load_as<C>(static_cast<const X*>(ip[t * N + k])[i]);
        if (prm.subtract_base) tau = fk::fk_sub(tau, bv);
        C v = tau;
        if (PRUNE == fk::kMergePruneMagnitude) v = fk::merge_prune_magnitude(tau, thr[t * N + k]);
        if (PRUNE == fk::kMergePruneRandom)
          v = fk::merge_prune_random(fk::merge_dare_keep(keys[t * N + k], offs[t] + uint64_t(i), prm.drop_threshold),
                                     tau, scale);
        const C w = static_cast<C>(prm.weights[k]);
        if (!ELECT) fk::merge_accumulate<fk::kMergeConsensusNone>(a, v, w, false, fk::kMergeNormNone);
        else if (prm.consensus == fk::kMergeConsensusFrequency)
          fk::merge_accumulate<fk::kMergeConsensusFrequency>(a, v, w, prm.sign_weighted, prm.normalize);
        else fk::merge_accumulate<fk::kMergeConsensusTotal>(a, v, w, prm.sign_weighted, prm.normalize);
      }
      const B want = fk::Store<B>::from(fk::merge_finalize<ELECT ? fk::kMergeConsensusTotal : fk::kMergeConsensusNone>(
          a, bv, prm.normalize, static_cast<C>(prm.lin_div), static_cast<C>(prm.lam)));
      if (bits(want) != bits(o[i])) {
        std::printf("mismatch: prune %d elect %d tensor %lld element %lld shift %d\n", PRUNE, int(ELECT),
                    (long long)t, (long long)i, shift);
        return 1;
      }
    }
  }
  return 0;
}

template <typename B, typename X>
int run_types(std::mt19937& rng, int& cases) {
  const double w[3] = {0.7, 1.3, -0.4};
  int bad = 0;
  for (int shift = 0; shift < 2; ++shift)
    for (int consensus = 0; consensus < 3; ++consensus)
      for (int normalize = 0; normalize < 3; ++normalize)
        for (int flags = 0; flags < 4; flags += (consensus == 0 ? 2 : 1)) {  // sign_weighted: election only
          fkc::MergeLaunchParams prm{};
          prm.n_tasks = 3;
          prm.weights = w;
          prm.consensus = consensus;
          prm.normalize = normalize;
          prm.sign_weighted = flags & 1;
          prm.subtract_base = flags & 2;
          prm.drop_threshold = fk::lora_keep_threshold(0.6);
          prm.scale_f64 = fk::lora_keep_scale_f64(0.6);
          prm.scale_f32 = static_cast<double>(fk::lora_keep_scale(0.6));
          prm.lin_div = normalize == fk::kMergeNormCount ? 3.0 : 1.6;
          prm.lam = 0.9;
          for (int prune = 0; prune < 3; ++prune) {
            prm.prune = prune;
            const bool e = consensus != 0;
#define FK_CASE(P) (e ? run_case<P, true, B, X>(rng, prm, shift) : run_case<P, false, B, X>(rng, prm, shift))
            bad |= prune == 0 ? FK_CASE(0) : prune == 1 ? FK_CASE(1) : FK_CASE(2);
#undef FK_CASE
            ++cases;
            if (bad) return bad;
          }
        }
  return bad;
}

int main() {
  std::mt19937 rng(1234);
  int cases = 0;
  int bad = run_types<float, float>(rng, cases);
  if (!bad) bad = run_types<fk::fk_bf16, float>(rng, cases);
  if (!bad) bad = run_types<float, fk::fk_half>(rng, cases);
  if (!bad) bad = run_types<double, double>(rng, cases);
  if (!bad) bad = run_types<fk::fk_bf16, double>(rng, cases);
  if (bad) return 1;
  std::printf("ok %d\n", cases);
  return 0;
}
