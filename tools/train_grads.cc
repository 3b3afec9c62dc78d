// train_grads: one micro-batch of the fine-tuning loss through sparsa's training engine (CPU or
// CUDA), written out with every parameter's gradient, for scripts/compare_grads_torch.py to
// check against PyTorch.
//
//   train_grads --student DIR [--teacher DIR] --data valid.jsonl --device cuda --precision fp32
//               --batch 4 --seq 256 --ce 1 --kl 1 --squarehead 1 --temperature 2 -o grads.safetensors
//
// The file holds ids and targets [batch, seq] (i32), loss [total, ce, kl, squarehead] and
// weights [ce, kl, squarehead, T] (f64), and grad.<parameter name> (f32, the parameter's shape).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <optional>

#include "sparsa/core/error.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/io/text_data.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "sparsa/train/cuda.h"
#include "sparsa/train/model.h"
#include "sparsa/train/ops.h"

namespace {

struct Args {
  std::string student, teacher, data, output, device = "cpu", precision = "fp32";
  int64_t batch = 4, seq = 256, offset = 0;
  double ce = 1, kl = 1, squarehead = 1, temperature = 2;
  int threads = 0;
};

int run(const Args& a) {
  using namespace sparsa;
  using namespace sparsa::train;
  ThreadPool pool(a.threads);
  Model student = Model::load(a.student);
  const bool needs_teacher = a.kl > 0 || a.squarehead > 0;
  SPARSA_CHECK(!needs_teacher || !a.teacher.empty(), "train_grads: kl or squarehead needs --teacher");
  std::optional<Model> teacher;
  if (needs_teacher) teacher.emplace(Model::load(a.teacher));
  const io::ModelConfig& c = student.config();
  const Tokenizer tok = Tokenizer::from_file(a.student + "/tokenizer.json");
  SPARSA_CHECK(!c.eos_token_ids.empty(), "{}: no eos_token_id", a.student);
  const std::vector<int32_t> tokens =
      tokenize_corpus(tok, io::read_documents(a.data), c.eos_token_ids[0]);
  const int64_t n = a.batch * a.seq;
  SPARSA_CHECK(a.offset + n + 1 <= static_cast<int64_t>(tokens.size()),
               "train_grads: {} holds {} tokens, too few for {} x {} from offset {}", a.data,
               tokens.size(), a.batch, a.seq, a.offset);
  std::vector<int32_t> ids(tokens.begin() + a.offset, tokens.begin() + a.offset + n);
  std::vector<int32_t> targets(tokens.begin() + a.offset + 1, tokens.begin() + a.offset + n + 1);

  const auto t0 = std::chrono::steady_clock::now();
  cuda::Losses l;
  std::vector<float> grads(static_cast<size_t>(student.num_params()));
  if (a.device == "cuda") {
    std::vector<uint8_t> keep(static_cast<size_t>(student.num_params()), 1);
    cuda::Engine gpu(student, needs_teacher ? &*teacher : nullptr, keep,
                     cuda::parse_matmul(a.precision));
    std::cerr << "device: " << gpu.device_name() << ", " << a.precision << " GEMMs\n";
    gpu.zero_grad();
    l = gpu.micro_batch(ids.data(), targets.data(), a.batch, a.seq,
                        {a.ce, a.kl, a.squarehead, a.temperature}, 1.0f);
    gpu.download_grads(grads.data());
  } else {
    SPARSA_CHECK(a.device == "cpu", "train_grads: --device must be cpu or cuda");
    student.enable_gradients();
    if (needs_teacher) teacher->forward(ids.data(), a.batch, a.seq, pool);
    student.forward(ids.data(), a.batch, a.seq, pool);
    student.zero_grad();
    l.ce = ops::cross_entropy(student.dlogits(), student.logits(), targets.data(), n,
                              c.vocab_size, static_cast<float>(a.ce), pool);
    if (a.kl > 0)
      l.kl = ops::kl_distillation(student.dlogits(), student.logits(), teacher->logits(), n,
                                  c.vocab_size, static_cast<float>(a.temperature),
                                  static_cast<float>(a.kl), pool);
    if (a.squarehead > 0)
      for (int64_t i = 0; i < c.num_layers; ++i)
        l.squarehead += ops::squarehead(student.dblock_output(i), student.block_output(i),
                                        teacher->block_output(i), n * c.hidden_size,
                                        static_cast<float>(a.squarehead), pool);
    student.backward(pool);
    std::memcpy(grads.data(), student.grads(), grads.size() * sizeof(float));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();

  const double total = a.ce * l.ce + a.kl * l.kl + a.squarehead * l.squarehead;
  const double loss[4] = {total, l.ce, l.kl, l.squarehead};
  const double weights[4] = {a.ce, a.kl, a.squarehead, a.temperature};
  std::vector<io::TensorData> out = {
      {{"ids", DType::I32, {a.batch, a.seq}}, ids.data()},
      {{"targets", DType::I32, {a.batch, a.seq}}, targets.data()},
      {{"loss", DType::F64, {4}}, loss},
      {{"weights", DType::F64, {4}}, weights},
  };
  for (const ParamTensor& t : student.tensors())
    out.push_back({{"grad." + t.name, DType::F32, t.shape}, grads.data() + t.offset});
  io::write_safetensors(a.output, out,
                        {{"student", a.student},
                         {"teacher", a.teacher},
                         {"device", a.device},
                         {"precision", a.device == "cuda" ? a.precision : "fp32"}});
  std::cout << fmt::format(
      "loss {:.6f} (ce {:.6f}, kl {:.6f}, squarehead {:.6f}) on {} x {} tokens, {:.2f} s -> {}\n",
      total, l.ce, l.kl, l.squarehead, a.batch, a.seq, seconds, a.output);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"One micro-batch of the fine-tuning loss and its gradients, written to safetensors"};
  Args a;
  app.add_option("--student", a.student, "student model directory")->required();
  app.add_option("--teacher", a.teacher, "teacher model directory (kl, squarehead)");
  app.add_option("--data", a.data, "JSON lines or text to take the tokens from")->required();
  app.add_option("-o,--output", a.output, "output .safetensors")->required();
  app.add_option("--device", a.device, "cpu or cuda")->capture_default_str();
  app.add_option("--precision", a.precision, "CUDA GEMMs: fp32 or bf16")->capture_default_str();
  app.add_option("--batch", a.batch)->capture_default_str();
  app.add_option("--seq", a.seq)->capture_default_str();
  app.add_option("--offset", a.offset, "first token of the batch in the data")->capture_default_str();
  app.add_option("--ce", a.ce)->capture_default_str();
  app.add_option("--kl", a.kl)->capture_default_str();
  app.add_option("--squarehead", a.squarehead)->capture_default_str();
  app.add_option("--temperature", a.temperature)->capture_default_str();
  app.add_option("--threads", a.threads, "CPU threads (0: all cores)")->capture_default_str();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  try {
    return run(a);
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
