// Pipeline: text in, text out. Adds to the Engine and Scheduler the tokenizer, the model's chat
// template and incremental detokenization with stop strings, so that callers see text pieces as
// they become final.
//
//   sparsa::pipeline::PipelineOptions opt;  opt.engine.max_sequences = 8;
//   auto p = sparsa::pipeline::Pipeline::load("models/tiny", opt);
//   sparsa::pipeline::TextRequest r;
//   r.prompt_ids = p->encode_prompt("The kernel");     // or p->encode_chat(messages)
//   r.max_tokens = 32;
//   auto id = p->start(r, [](const TextChunk& c) { std::cout << c.text; },
//                         [](const TextResult& res) { ... res.finish_reason ... });
//   TextResult res = p->generate(r);                   // blocking form
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "sparsa/model/llama.h"
#include "sparsa/pipeline/chat_template.h"
#include "sparsa/runtime/engine.h"
#include "sparsa/runtime/sampler.h"
#include "sparsa/runtime/scheduler.h"
#include "sparsa/runtime/tokenizer.h"

namespace sparsa::pipeline {

struct PipelineOptions {
  model::LoadOptions load;  // e.g. file_access kRead for a server's --no-mmap
  EngineOptions engine;
  SchedulerOptions scheduler;
};

struct TextRequest {
  std::vector<int32_t> prompt_ids;
  int64_t max_tokens = 16;
  SamplingParams sampling;
  std::vector<std::string> stop;  // the text ends before the first occurrence of any
  bool stop_at_eos = true;
  int top_logprobs = -1;  // -1: none; 0: chosen tokens only; k: also the k most likely
};

struct TokenLogprob {
  std::string token;  // the token's text (its raw bytes)
  int32_t id = 0;
  float logprob = 0;
  std::vector<std::pair<std::string, float>> top;
};

/// Text that became final, and the tokens processed since the previous chunk.
struct TextChunk {
  std::string text;
  std::vector<TokenLogprob> logprobs;  // when requested
};

struct TextResult {
  std::string text;
  std::string finish_reason;  // "stop", "length", "cancelled" or "error"
  std::string error;
  int64_t prompt_tokens = 0;
  int64_t completion_tokens = 0;
  std::vector<TokenLogprob> logprobs;
};

class Pipeline {
 public:
  /// Loads the model, tokenizer.json, the chat template (when the directory has one) and the
  /// special tokens of tokenizer_config.json, and starts the scheduler.
  static std::unique_ptr<Pipeline> load(const std::string& dir, const PipelineOptions& options);
  ~Pipeline();

  const Tokenizer& tokenizer() const { return tokenizer_; }
  Scheduler& scheduler() { return *scheduler_; }
  const Engine& engine() const { return *engine_; }
  int64_t context() const { return engine_->context(); }
  bool has_chat_template() const { return chat_template_.has_value(); }

  /// Prompt text to ids, with the tokenizer's special tokens (BOS) as `sparsa generate` does.
  std::vector<int32_t> encode_prompt(const std::string& text) const;
  /// Renders the chat template over `messages` (with add_generation_prompt, bos_token,
  /// eos_token and any `extra` variables). Throws sparsa::Error when there is no template or the
  /// template refuses the conversation.
  std::string render_chat(const nlohmann::ordered_json& messages, bool add_generation_prompt = true,
                          const nlohmann::ordered_json& extra = nlohmann::ordered_json::object()) const;
  /// The rendered chat as ids (special tokens written by the template, none added).
  std::vector<int32_t> encode_chat(const nlohmann::ordered_json& messages) const;

  using Id = Scheduler::Id;
  using ChunkFn = std::function<void(const TextChunk&)>;
  using DoneFn = std::function<void(const TextResult&)>;
  /// Starts generating; `on_chunk` and `on_done` run on the scheduler's thread. Throws
  /// sparsa::Error on invalid requests and QueueFull when the queue is full.
  Id start(const TextRequest& request, ChunkFn on_chunk, DoneFn on_done);
  /// Starts several requests at once (all or none), e.g. the n choices of one HTTP request.
  std::vector<Id> start_group(const std::vector<TextRequest>& requests,
                              const std::vector<ChunkFn>& on_chunk,
                              const std::vector<DoneFn>& on_done);
  void cancel(Id id) { scheduler_->cancel(id); }
  /// Blocks until the request finishes.
  TextResult generate(const TextRequest& request);

 private:
  Pipeline() = default;
  std::pair<SequenceParams, SequenceCallbacks> prepare(const TextRequest& request, ChunkFn on_chunk,
                                                       DoneFn on_done);

  Tokenizer tokenizer_;
  std::optional<ChatTemplate> chat_template_;
  std::string bos_token_, eos_token_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Scheduler> scheduler_;
};

}  // namespace sparsa::pipeline
