#include "sparsa/pipeline/pipeline.h"

#include <condition_variable>
#include <filesystem>
#include <fstream>
#include <mutex>
#include <sstream>

#include "sparsa/core/error.h"
#include "sparsa/runtime/generator.h"

namespace sparsa::pipeline {

namespace {

namespace fs = std::filesystem;
using ojson = nlohmann::ordered_json;

// A special token of tokenizer_config.json: a string, or an AddedToken object with "content".
std::string special_token(const ojson& cfg, const char* key) {
  if (!cfg.is_object() || !cfg.contains(key)) return {};
  const ojson& v = cfg[key];
  if (v.is_string()) return v.get<std::string>();
  if (v.is_object() && v.contains("content") && v["content"].is_string())
    return v["content"].get<std::string>();
  return {};
}

// What one sequence needs between tokens: incremental UTF-8 decoding, the stop-string filter,
// and the text and log-probabilities gathered so far.
struct TextState {
  TextState(const Tokenizer& tok, std::vector<std::string> stops)
      : decoder(tok), filter(std::move(stops)) {}
  StreamDecoder decoder;
  StopStringFilter filter;
  TextResult result;
  std::vector<TokenLogprob> pending_logprobs;
};

}  // namespace

Pipeline::~Pipeline() { scheduler_.reset(); }

std::unique_ptr<Pipeline> Pipeline::load(const std::string& dir, const PipelineOptions& options) {
  std::unique_ptr<Pipeline> p(new Pipeline());
  const fs::path tok_path = fs::path(dir) / "tokenizer.json";
  SPARSA_CHECK(fs::exists(tok_path), "{}: missing tokenizer.json", dir);
  p->tokenizer_ = Tokenizer::from_file(tok_path.string());
  p->chat_template_ = ChatTemplate::from_model_dir(dir);
  const fs::path cfg_path = fs::path(dir) / "tokenizer_config.json";
  if (fs::exists(cfg_path)) {
    std::ifstream in(cfg_path);
    std::stringstream ss;
    ss << in.rdbuf();
    ojson cfg = ojson::parse(ss.str(), nullptr, /*allow_exceptions=*/false);
    SPARSA_CHECK(!cfg.is_discarded(), "{}: not valid JSON", cfg_path.string());
    p->bos_token_ = special_token(cfg, "bos_token");
    p->eos_token_ = special_token(cfg, "eos_token");
  }
  auto model = model::Model::load(dir, options.load);
  const io::ModelConfig& c = model->config();
  if (p->bos_token_.empty() && c.bos_token_id && p->tokenizer_.has_id(*c.bos_token_id))
    p->bos_token_ = p->tokenizer_.token_bytes(*c.bos_token_id);
  if (p->eos_token_.empty() && !c.eos_token_ids.empty() && p->tokenizer_.has_id(c.eos_token_ids[0]))
    p->eos_token_ = p->tokenizer_.token_bytes(c.eos_token_ids[0]);
  p->engine_ = std::make_unique<Engine>(std::move(model), options.engine);
  p->scheduler_ = std::make_unique<Scheduler>(*p->engine_, options.scheduler);
  return p;
}

std::vector<int32_t> Pipeline::encode_prompt(const std::string& text) const {
  return tokenizer_.encode(text, true);
}

std::string Pipeline::render_chat(const ojson& messages, bool add_generation_prompt,
                                  const ojson& extra) const {
  SPARSA_CHECK(chat_template_.has_value(),
               "the model has no chat template (chat_template.jinja or tokenizer_config.json)");
  ojson ctx = ojson::object();
  if (extra.is_object())
    for (auto it = extra.begin(); it != extra.end(); ++it) ctx[it.key()] = it.value();
  ctx["messages"] = messages;
  ctx["add_generation_prompt"] = add_generation_prompt;
  ctx["bos_token"] = bos_token_;
  ctx["eos_token"] = eos_token_;
  return chat_template_->render(ctx);
}

std::vector<int32_t> Pipeline::encode_chat(const ojson& messages) const {
  return tokenizer_.encode(render_chat(messages, true), false);
}

std::pair<SequenceParams, SequenceCallbacks> Pipeline::prepare(const TextRequest& r,
                                                               ChunkFn on_chunk, DoneFn on_done) {
  SequenceParams p;
  p.prompt = r.prompt_ids;
  p.max_tokens = r.max_tokens;
  p.sampling = r.sampling;
  p.stop_at_eos = r.stop_at_eos;
  p.top_logprobs = r.top_logprobs;
  auto state = std::make_shared<TextState>(tokenizer_, r.stop);
  const bool want_logprobs = r.top_logprobs >= 0;
  auto emit = [state, on_chunk](std::string text) {
    if (text.empty() && state->pending_logprobs.empty()) return;
    state->result.text += text;
    TextChunk c;
    c.text = std::move(text);
    c.logprobs = std::move(state->pending_logprobs);
    state->pending_logprobs.clear();
    if (on_chunk) on_chunk(c);
  };
  SequenceCallbacks cb;
  cb.on_token = [this, state, emit, want_logprobs](const TokenInfo& t) {
    if (want_logprobs) {
      TokenLogprob lp;
      lp.id = t.id;
      lp.token = tokenizer_.token_bytes(t.id);
      lp.logprob = t.logprob;
      for (const auto& [id, l] : t.top) lp.top.emplace_back(tokenizer_.token_bytes(id), l);
      state->result.logprobs.push_back(lp);
      state->pending_logprobs.push_back(std::move(lp));
    }
    std::string piece = state->filter.push(state->decoder.push(t.id));
    // Text held back (an unfinished character or a possible stop string) waits; the
    // log-probabilities of its tokens travel with the next piece of text.
    if (!piece.empty()) emit(std::move(piece));
    return !state->filter.stopped();
  };
  cb.on_end = [state, emit, on_done](const SequenceEnd& e) {
    if (!state->filter.stopped() && e.finish_reason != "cancelled") {
      std::string rest = state->filter.push(state->decoder.flush());
      rest += state->filter.flush();
      emit(std::move(rest));
    }
    if (!state->pending_logprobs.empty()) emit("");
    TextResult& res = state->result;
    res.finish_reason = e.finish_reason;
    res.error = e.error;
    res.prompt_tokens = e.prompt_tokens;
    res.completion_tokens = e.completion_tokens;
    if (on_done) on_done(res);
  };
  return {std::move(p), std::move(cb)};
}

Pipeline::Id Pipeline::start(const TextRequest& request, ChunkFn on_chunk, DoneFn on_done) {
  auto [p, cb] = prepare(request, std::move(on_chunk), std::move(on_done));
  return scheduler_->submit(std::move(p), std::move(cb));
}

std::vector<Pipeline::Id> Pipeline::start_group(const std::vector<TextRequest>& requests,
                                                const std::vector<ChunkFn>& on_chunk,
                                                const std::vector<DoneFn>& on_done) {
  SPARSA_CHECK(on_chunk.size() == requests.size() && on_done.size() == requests.size(),
               "start_group: one chunk and one done callback per request");
  std::vector<std::pair<SequenceParams, SequenceCallbacks>> group;
  for (size_t i = 0; i < requests.size(); ++i) group.push_back(prepare(requests[i], on_chunk[i], on_done[i]));
  return scheduler_->submit_group(std::move(group));
}

TextResult Pipeline::generate(const TextRequest& request) {
  std::mutex m;
  std::condition_variable cv;
  bool done = false;
  TextResult out;
  start(request, nullptr, [&](const TextResult& r) {
    std::lock_guard<std::mutex> lock(m);
    out = r;
    done = true;
    cv.notify_all();
  });
  std::unique_lock<std::mutex> lock(m);
  cv.wait(lock, [&] { return done; });
  return out;
}

}  // namespace sparsa::pipeline
