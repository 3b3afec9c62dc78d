// The CUDA training backend's entry points in a build without CUDA (no nvcc was found): the
// backend reports itself unavailable and refuses to start, naming why.
#include "sparsa/core/error.h"
#include "sparsa/train/cuda.h"

namespace sparsa::train::cuda {

namespace {
constexpr const char* kWhy =
    "this build of sparsa has no CUDA backend (build it where nvcc and the CUDA toolkit are "
    "installed)";
}

bool available(std::string* why) {
  if (why != nullptr) *why = kWhy;
  return false;
}

Matmul parse_matmul(const std::string& name) {
  if (name == "fp32") return Matmul::kFp32;
  if (name == "bf16") return Matmul::kBf16;
  fail("cuda: unknown GEMM precision '{}' (use bf16 or fp32)", name);
}

const char* matmul_name(Matmul m) { return m == Matmul::kBf16 ? "bf16" : "fp32"; }

struct Engine::Impl {};

Engine::Engine(const Model&, const Model*, const std::vector<uint8_t>&, Matmul, int) {
  fail("cuda: cannot train on the GPU: {}", kWhy);
}
Engine::~Engine() = default;
std::string Engine::device_name() const { return {}; }
Matmul Engine::matmul() const { return Matmul::kFp32; }
void Engine::upload_params(const float*) {}
void Engine::upload_keep(const uint8_t*) {}
void Engine::upload_moments(const float*, const float*) {}
void Engine::download_params(float*) const {}
void Engine::download_moments(float*, float*) const {}
void Engine::download_grads(float*) const {}
void Engine::set_fake_quant(const std::vector<FakeQuantTensor>&) {}
void Engine::set_clustering(const std::vector<ClusteredTensor>&, double, int64_t) {}
void Engine::download_centroids(const std::vector<float*>&) const {}
void Engine::refresh_forward_weights(bool) {}
void Engine::zero_grad() {}
Losses Engine::micro_batch(const int32_t*, const int32_t*, int64_t, int64_t, const LossWeights&,
                           float) {
  return {};
}
double Engine::eval_ce_sum(const int32_t*, const int32_t*, int64_t, int64_t, int64_t*) {
  return 0.0;
}
double Engine::optimizer_step(const std::vector<TensorUpdate>&, double, const ops::AdamW&,
                              int64_t) {
  return 0.0;
}

}  // namespace sparsa::train::cuda
