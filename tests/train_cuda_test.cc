// The CUDA training backend against the CPU engine on models/tiny: the loss terms and every
// parameter's gradient of one micro-batch, whole trainer steps (masked weights exactly zero),
// and bit-identical repeats and resumes. Skipped where no GPU is visible; the refusal without
// one is tested everywhere.
#include "sparsa/train/cuda.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <cmath>
#include <cstring>
#include <filesystem>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "sparsa/train/trainer.h"
#include "test_util.h"
#include "train_util.h"

namespace sparsa::train {
namespace {

namespace fs = std::filesystem;
using testing::half_pruned_tiny;
using testing::readme_tokens;

compress::Recipe recipe(int64_t steps) {
  return compress::Recipe::from_yaml(fmt::format(R"(ft_stage:
  run_type: finetune
  training: {{lr: 2e-3, warmup_steps: 2, steps: {}, batch_size: 4, seq_len: 32, grad_accum: 2,
             clip: 1.0, weight_decay: 0.01, seed: 5, eval_windows: 8, min_lr_ratio: 0.1}}
  m_modifiers:
    ConstantMaskModifier: {{targets: ["re:.*_proj$"], ignore: [lm_head]}}
    DistillationModifier: {{ce: 1.0, kl: 1.0, squarehead: 0.5, temperature: 2.0}}
)",
                                                 steps),
                                     "cuda-test.yaml");
}

class CudaTrain : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (!cuda::available(&why)) GTEST_SKIP() << "no GPU here: " << why;
  }
};

TEST(CudaTrainBackend, RefusesClearlyWithoutAGpu) {
  std::string why;
  if (cuda::available(&why)) GTEST_SKIP() << "a GPU is visible";
  EXPECT_FALSE(why.empty());
  Model m = Model::load(testing::tiny_model_dir());
  std::vector<uint8_t> keep(static_cast<size_t>(m.num_params()), 1);
  try {
    cuda::Engine e(m, nullptr, keep, cuda::Matmul::kFp32);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_EQ(std::string(e.what()), "cuda: cannot train on the GPU: " + why);
  }
  EXPECT_THROW(cuda::parse_matmul("fp16"), Error);
  EXPECT_EQ(cuda::parse_matmul("bf16"), cuda::Matmul::kBf16);
}

TEST_F(CudaTrain, LossAndEveryGradientMatchTheCpuEngine) {
  ThreadPool pool(2);
  Model student = half_pruned_tiny();
  Model teacher = Model::load(testing::tiny_model_dir());
  const io::ModelConfig& c = student.config();
  const int64_t b = 3, t = 48, n = b * t;
  const std::vector<int32_t> tokens = readme_tokens();
  ASSERT_GT(static_cast<int64_t>(tokens.size()), n + 1);
  std::vector<int32_t> ids(tokens.begin(), tokens.begin() + n),
      targets(tokens.begin() + 1, tokens.begin() + n + 1);
  targets[7] = -1;  // an ignored position
  const float grad_scale = 0.5f;
  const cuda::LossWeights w{1.0, 0.7, 0.3, 2.0};

  // CPU reference.
  student.enable_gradients();
  teacher.forward(ids.data(), b, t, pool);
  student.forward(ids.data(), b, t, pool);
  student.zero_grad();
  const double ce = ops::cross_entropy(student.dlogits(), student.logits(), targets.data(), n,
                                       c.vocab_size, static_cast<float>(w.ce) * grad_scale, pool);
  const double kl = ops::kl_distillation(student.dlogits(), student.logits(), teacher.logits(), n,
                                         c.vocab_size, static_cast<float>(w.temperature),
                                         static_cast<float>(w.kl) * grad_scale, pool);
  double sq = 0;
  for (int64_t l = 0; l < c.num_layers; ++l)
    sq += ops::squarehead(student.dblock_output(l), student.block_output(l),
                          teacher.block_output(l), n * c.hidden_size,
                          static_cast<float>(w.squarehead) * grad_scale, pool);
  student.backward(pool);

  std::vector<uint8_t> keep(static_cast<size_t>(student.num_params()), 1);
  cuda::Engine gpu(student, &teacher, keep, cuda::Matmul::kFp32);
  gpu.zero_grad();
  const cuda::Losses l = gpu.micro_batch(ids.data(), targets.data(), b, t, w, grad_scale);
  EXPECT_NEAR(l.ce, ce, 1e-5 * ce);
  EXPECT_NEAR(l.kl, kl, 1e-4 * kl);
  EXPECT_NEAR(l.squarehead, sq, 1e-4 * sq);
  std::vector<float> g(static_cast<size_t>(student.num_params()));
  gpu.download_grads(g.data());
  for (const ParamTensor& p : student.tensors()) {
    double max_ref = 0, max_err = 0;
    for (int64_t i = 0; i < p.numel; ++i) {
      const double r = student.grads()[p.offset + i], x = g[static_cast<size_t>(p.offset + i)];
      max_ref = std::max(max_ref, std::abs(r));
      max_err = std::max(max_err, std::abs(r - x));
    }
    ASSERT_GT(max_ref, 0.0) << p.name;
    EXPECT_LT(max_err, 2e-4 * max_ref) << p.name << ": max |Δ| " << max_err << " of " << max_ref;
  }

  // The evaluation path: the same cross-entropy, without gradients.
  int64_t count = 0;
  const double sum = gpu.eval_ce_sum(ids.data(), targets.data(), b, t, &count);
  EXPECT_EQ(count, n - 1);
  EXPECT_NEAR(sum / static_cast<double>(count), ce, 1e-5 * ce);
}

TEST_F(CudaTrain, TrainerStepsFollowTheCpuAndKeepMasksExactlyZero) {
  ThreadPool pool(2);
  const compress::Recipe r = recipe(4);
  const std::vector<int32_t> tokens = readme_tokens();
  Model teacher = Model::load(testing::tiny_model_dir());
  Model a = half_pruned_tiny(), b = half_pruned_tiny();
  Trainer ta(a, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  Trainer tb(b, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  tb.use_cuda("fp32");
  EXPECT_TRUE(tb.on_gpu());
  EXPECT_NE(tb.device_description().find("fp32 GEMMs"), std::string::npos);
  EXPECT_NEAR(tb.evaluate().ce, ta.evaluate().ce, 1e-5);
  while (ta.step() < ta.total_steps()) {
    const StepStats sa = ta.train_step(), sb = tb.train_step();
    EXPECT_NEAR(sb.loss, sa.loss, 1e-4 * sa.loss) << "step " << sa.step;
    EXPECT_NEAR(sb.grad_norm, sa.grad_norm, 1e-3 * sa.grad_norm) << "step " << sa.step;
    EXPECT_DOUBLE_EQ(sb.sparsity, sa.sparsity);
  }
  EXPECT_NEAR(tb.evaluate().ce, ta.evaluate().ce, 1e-3);
  tb.sync_to_host();
  const Model ref = half_pruned_tiny();
  int64_t moved = 0;
  for (const ParamTensor& t : b.tensors()) {
    if (!t.linear) continue;
    for (int64_t i = 0; i < t.numel; ++i) {
      const float w0 = ref.params()[t.offset + i], w1 = b.params()[t.offset + i];
      if (w0 == 0.0f) {
        ASSERT_EQ(w1, 0.0f) << t.name << "[" << i << "]";
        ASSERT_FALSE(std::signbit(w1)) << t.name << "[" << i << "]";
      } else {
        moved += w1 != w0;
      }
    }
  }
  EXPECT_GT(moved, 0);
}

// The CPU trainer `cpu` and the GPU trainer `gpu` (same model, recipe and data) run step by
// step: the same validation CE at the start, every step's loss within 1e-3 relative, the final
// validation CE within final_ce_tol.
void expect_gpu_steps_follow_cpu(Trainer& cpu, Trainer& gpu, double final_ce_tol) {
  EXPECT_NEAR(gpu.evaluate().ce, cpu.evaluate().ce, 1e-5);
  while (cpu.step() < cpu.total_steps()) {
    const StepStats sa = cpu.train_step(), sb = gpu.train_step();
    EXPECT_NEAR(sb.loss, sa.loss, 1e-3 * sa.loss) << "step " << sa.step;
  }
  EXPECT_NEAR(gpu.evaluate().ce, cpu.evaluate().ce, final_ce_tol);
}

TEST_F(CudaTrain, QuantizationAwareStepsFollowTheCpu) {
  ThreadPool pool(2);
  const compress::Recipe r = compress::Recipe::from_yaml(R"(ft_stage:
  run_type: finetune
  training: {lr: 1e-2, warmup_steps: 1, steps: 4, batch_size: 4, seq_len: 32, clip: 1.0, seed: 5,
             eval_windows: 8}
  m_modifiers:
    ConstantMaskModifier: {targets: ["re:.*_proj$"], ignore: [lm_head]}
    QuantizationModifier: {scheme: {bits: 4, group_size: 32, symmetric: false}, targets: ["re:.*_proj$"], ignore: [lm_head]}
    DistillationModifier: {ce: 1.0, kl: 1.0, squarehead: 0.5, temperature: 2.0}
)",
                                                         "cuda-qat.yaml");
  const std::vector<int32_t> tokens = readme_tokens();
  Model teacher = Model::load(testing::tiny_model_dir());
  Model a = half_pruned_tiny(), b = half_pruned_tiny();
  Trainer ta(a, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  Trainer tb(b, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  tb.use_cuda("fp32");
  // The fake-quantized forward: both start from the same quantized model.
  expect_gpu_steps_follow_cpu(ta, tb, 1e-2);
  tb.sync_to_host();
  const Model ref = half_pruned_tiny();
  for (const ParamTensor& t : b.tensors())
    if (t.linear)
      for (int64_t i = 0; i < t.numel; ++i)
        if (ref.params()[t.offset + i] == 0.0f) {
          ASSERT_EQ(b.params()[t.offset + i], 0.0f) << t.name;
        }
}

TEST_F(CudaTrain, ClusteringAwareStepsFollowTheCpu) {
  ThreadPool pool(2);
  const compress::Recipe r = compress::Recipe::from_yaml(R"(ft_stage:
  run_type: finetune
  training: {lr: 2e-3, warmup_steps: 1, steps: 4, batch_size: 4, seq_len: 32, clip: 1.0, seed: 5,
             eval_windows: 8}
  m_modifiers:
    PalettizationModifier: {bits: 3, granularity: per_grouped_channel, group_size: 16,
                            temperature: 0.2, iterations: 2, targets: ["re:.*_proj$"]}
    DistillationModifier: {ce: 1.0, kl: 1.0, squarehead: 0.5, temperature: 2.0}
)",
                                                         "cuda-dkm.yaml");
  const std::vector<int32_t> tokens = readme_tokens();
  Model teacher = Model::load(testing::tiny_model_dir());
  Model a = Model::load(testing::tiny_model_dir()), b = Model::load(testing::tiny_model_dir());
  Trainer ta(a, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  Trainer tb(b, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  tb.use_cuda("fp32");
  expect_gpu_steps_follow_cpu(ta, tb, 1e-3);
  tb.sync_to_host();
  for (const std::string& name : ta.clustered_tensors()) {
    const std::vector<float>& ca = ta.clustering(name).centroids;
    const std::vector<float>& cb = tb.clustering(name).centroids;
    ASSERT_EQ(ca.size(), cb.size());
    for (size_t i = 0; i < ca.size(); ++i) EXPECT_NEAR(cb[i], ca[i], 1e-4) << name << " " << i;
  }
}

TEST_F(CudaTrain, RepeatedAndResumedRunsAreBitIdentical) {
  ThreadPool pool(2);
  const compress::Recipe r = recipe(5);
  const std::vector<int32_t> tokens = readme_tokens();
  Model teacher = Model::load(testing::tiny_model_dir());
  auto run = [&](Model& m, Trainer& tr) {
    while (tr.step() < tr.total_steps()) tr.train_step();
    tr.sync_to_host();
    return std::vector<float>(m.params(), m.params() + m.num_params());
  };
  Model a = half_pruned_tiny();
  Trainer ta(a, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  ta.use_cuda("bf16");
  const std::vector<float> pa = run(a, ta);

  Model b = half_pruned_tiny();
  Trainer tb(b, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  tb.use_cuda("bf16");
  EXPECT_EQ(run(b, tb), pa) << "two runs of the same steps differ";

  const fs::path dir =
      fs::temp_directory_path() / ("sparsa_cuda_resume_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  {
    Model c = half_pruned_tiny();
    Trainer tc(c, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
    tc.use_cuda("bf16");
    tc.train_step();
    tc.train_step();
    tc.save_checkpoint((dir / "step-2").string());
  }
  Model d = half_pruned_tiny();
  Trainer td(d, &teacher, *r.finetune_stage(), TokenData(tokens, 32, 8), pool);
  td.use_cuda("bf16");
  td.load_checkpoint((dir / "step-2").string());
  EXPECT_EQ(td.step(), 2);
  EXPECT_EQ(run(d, td), pa) << "the resumed run differs from the uninterrupted one";
  for (size_t i = 0; i < ta.history().size(); ++i)
    EXPECT_EQ(td.history()[i].loss, ta.history()[i].loss) << "step " << i + 1;
  fs::remove_all(dir);
}

}  // namespace
}  // namespace sparsa::train
