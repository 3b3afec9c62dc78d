// `sparsa finetune STUDENT --teacher TEACHER --data DATA -r RECIPE -o OUT`: sparse fine-tuning
// with distillation (sparsa/train/finetune.h). Registered by main.cc through
// add_finetune_command().
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>

#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/train/finetune.h"

namespace {

struct FinetuneArgs {
  sparsa::train::FinetuneOptions opt;
  int threads = 0;
  bool json = false;
};

int run_finetune(const FinetuneArgs& a) {
  sparsa::ThreadPool pool(a.threads);
  sparsa::train::FinetuneOptions o = a.opt;
  o.progress = !a.json;
  const sparsa::train::FinetuneReport r = sparsa::train::finetune(o, pool);
  nlohmann::json j = {{"student", o.student_dir},
                      {"teacher", o.teacher_dir},
                      {"recipe", o.recipe_path},
                      {"output", r.output_dir},
                      {"threads", pool.size()},
                      {"device", r.device},
                      {"steps", r.steps},
                      {"total_steps", r.total_steps},
                      {"tokens", r.tokens},
                      {"seconds", r.seconds},
                      {"tokens_per_s", r.tokens_per_s},
                      {"flops_per_token", r.flops_per_token},
                      {"model_tflops", r.model_tflops},
                      {"first_loss", r.first_loss},
                      {"last_loss", r.last_loss},
                      {"valid_ce_before", r.valid_ce_before},
                      {"valid_ce_after", r.valid_ce_after},
                      {"sparsity", r.sparsity},
                      {"checkpoints", r.checkpoints}};
  if (a.json) {
    std::cout << j.dump() << "\n";
    return 0;
  }
  std::cout << fmt::format(
      "steps        {} of {} ({} tokens, {:.1f} s, {:.0f} tokens/s on {})\n"
      "compute      {:.3g} model TFLOP/s ({:.1f} MFLOP per token)\n"
      "train loss   {:.4f} -> {:.4f}\nvalid CE     {:.4f} -> {:.4f}\nsparsity     {:.2f}% of "
      "the masked weights\n",
      r.steps, r.total_steps, r.tokens, r.seconds, r.tokens_per_s, r.device, r.model_tflops,
      r.flops_per_token / 1e6, r.first_loss, r.last_loss, r.valid_ce_before, r.valid_ce_after,
      100 * r.sparsity);
  for (const std::string& c : r.checkpoints) std::cout << "checkpoint   " << c << "\n";
  std::cout << (r.output_dir.empty() ? std::string("stopped early; no model written\n")
                                     : "output       " + r.output_dir + "\n");
  return 0;
}

}  // namespace

void add_finetune_command(CLI::App& app) {
  auto a = std::make_shared<FinetuneArgs>();
  auto* cmd = app.add_subcommand(
      "finetune", "sparse fine-tuning with distillation from a dense teacher (recipe stage "
                  "'run_type: finetune')");
  cmd->add_option("student", a->opt.student_dir, "student model directory (pruned or compressed)")
      ->required();
  cmd->add_option("--teacher", a->opt.teacher_dir, "dense teacher model directory");
  cmd->add_option("--data", a->opt.data_path, "training text: JSON lines or plain text")
      ->required();
  cmd->add_option("--valid", a->opt.valid_path,
                  "validation text (default: windows held out from --data)");
  cmd->add_option("-r,--recipe", a->opt.recipe_path, "recipe YAML with a finetune stage")
      ->required();
  cmd->add_option("-o,--output", a->opt.output_dir, "output model directory")->required();
  cmd->add_option("--device", a->opt.device, "cpu or cuda")->capture_default_str();
  cmd->add_option("--precision", a->opt.precision,
                  "GEMMs on the GPU: bf16 (tensor cores, fp32 accumulation) or fp32")
      ->check(CLI::IsMember({"bf16", "fp32"}))
      ->capture_default_str();
  cmd->add_option("--max-tokens", a->opt.max_tokens,
                  "training tokens (overrides the recipe's steps / max_tokens)");
  cmd->add_option("--checkpoint-dir", a->opt.checkpoint_dir,
                  "where step-NNNNNN checkpoints go (default: OUTPUT.checkpoints)");
  cmd->add_option("--resume", a->opt.resume_dir, "continue from a checkpoint directory");
  cmd->add_option("--stop-after", a->opt.stop_after,
                  "stop after this step, leaving a checkpoint and no model");
  cmd->add_option("-t,--threads", a->threads, "threads (default: all cores)");
  cmd->add_flag("--overwrite", a->opt.overwrite, "replace the output directory if it exists");
  cmd->add_flag("--json", a->json, "print one JSON object");
  cmd->callback([a, &app] {
    int code = 1;
    try {
      if (const CLI::Option* o = app.get_option_no_throw("--isa"); o != nullptr && o->count() > 0)
        sparsa::set_active_isa(sparsa::parse_isa(o->as<std::string>()));
      code = run_finetune(*a);
    } catch (const std::exception& e) {
      std::fflush(stdout);
      std::fprintf(stderr, "error: %s\n", e.what());
    }
    std::exit(code);
  });
}
