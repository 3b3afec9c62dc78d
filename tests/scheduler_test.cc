// Batched forward, Engine, Scheduler and Pipeline on the tiny model: a batched step equals
// per-sequence forward passes, continuous batching gives each sequence what it would get alone
// (greedy and seeded sampling), greedy output equals the reference `sparsa generate` text, and
// cancellation, queue limits and invalid requests behave.
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <mutex>
#include <nlohmann/json.hpp>
#include <thread>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/model/batch.h"
#include "sparsa/pipeline/pipeline.h"
#include "sparsa/runtime/engine.h"
#include "sparsa/runtime/generator.h"
#include "sparsa/runtime/scheduler.h"
#include "test_util.h"

namespace sparsa {
namespace {

using nlohmann::json;

float max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  float d = 0;
  for (size_t i = 0; i < a.size(); ++i) d = std::max(d, std::abs(a[i] - b[i]));
  return d;
}

void check_batch_forward(DType kv) {
  auto model = model::Model::load(testing::tiny_model_dir());
  const auto& cfg = model->config();
  const size_t vocab = static_cast<size_t>(cfg.vocab_size);
  ThreadPool pool(2);
  const std::vector<std::vector<int32_t>> prompts = {
      {0, 645, 838, 3757, 6198, 17, 99}, {0, 12, 13}, {0, 400, 401, 402, 403}};
  std::vector<model::KvCache> ref, bat;
  for (size_t s = 0; s < prompts.size(); ++s) {
    ref.emplace_back(cfg, 64, kv);
    bat.emplace_back(cfg, 64, kv);
  }
  std::vector<std::vector<float>> ref_logits(3, std::vector<float>(vocab)), bat_logits = ref_logits;
  model::BatchWorkspace ws;
  // Step 1: sequences 0 and 1 prefill. Step 2: 0 and 1 decode while 2 prefills. Steps 3-5: all
  // decode (their own argmax), at different positions.
  std::vector<int32_t> next(3, -1);
  for (int step = 0; step < 5; ++step) {
    std::vector<model::BatchSequence> batch;
    std::vector<std::vector<int32_t>> inputs(3);
    for (size_t s = 0; s < 3; ++s) {
      if (s == 2 && step == 0) continue;
      inputs[s] = next[s] < 0 ? prompts[s] : std::vector<int32_t>{next[s]};
      model->forward(inputs[s], ref[s], ref_logits[s].data(), false, pool);
      batch.push_back({inputs[s], &bat[s], bat_logits[s].data()});
    }
    model::forward_batch(*model, batch, ws, pool);
    for (size_t s = 0; s < 3; ++s) {
      if (s == 2 && step == 0) continue;
      EXPECT_LE(max_abs_diff(ref_logits[s], bat_logits[s]), 1e-4f) << "step " << step << " seq " << s;
      EXPECT_EQ(ref[s].size(), bat[s].size());
      next[s] = argmax(ref_logits[s].data(), cfg.vocab_size);
    }
  }
  // A sequence that does not fit is refused before any cache changes.
  model::KvCache small(cfg, 2, kv);
  const std::vector<int32_t> three = {1, 2, 3}, one = {5};
  std::vector<model::BatchSequence> bad = {{one, &bat[0], nullptr}, {three, &small, nullptr}};
  const int64_t before = bat[0].size();
  EXPECT_THROW(model::forward_batch(*model, bad, ws, pool), Error);
  EXPECT_EQ(bat[0].size(), before);
}

TEST(BatchForward, MixedPrefillAndDecodeEqualPerSequenceForward) { check_batch_forward(DType::F32); }
TEST(BatchForward, Bf16KvCacheEqualsPerSequenceForward) { check_batch_forward(DType::BF16); }
TEST(BatchForward, Int8KvCacheEqualsPerSequenceForward) { check_batch_forward(DType::I8); }

struct Collected {
  std::mutex m;
  std::condition_variable cv;
  std::map<Scheduler::Id, std::vector<int32_t>> tokens;
  std::map<Scheduler::Id, SequenceEnd> ends;

  SequenceCallbacks callbacks(std::shared_ptr<Scheduler::Id> id) {
    SequenceCallbacks cb;
    cb.on_token = [this, id](const TokenInfo& t) {
      std::lock_guard<std::mutex> lock(m);
      tokens[*id].push_back(t.id);
      return true;
    };
    cb.on_end = [this, id](const SequenceEnd& e) {
      std::lock_guard<std::mutex> lock(m);
      ends[*id] = e;
      cv.notify_all();
    };
    return cb;
  }
  void wait(size_t n) {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return ends.size() >= n; });
  }
};

std::vector<GenerateOptions> varied_options() {
  std::vector<GenerateOptions> opts;
  for (int i = 0; i < 7; ++i) {
    GenerateOptions o;
    o.max_tokens = 6 + 3 * i;
    o.stop_at_eos = false;
    if (i % 2 == 1) {
      o.sampling.temperature = 0.8f;
      o.sampling.top_k = 40;
      o.sampling.top_p = 0.95f;
      o.sampling.seed = static_cast<uint64_t>(100 + i);
    }
    if (i == 5) o.sampling.frequency_penalty = 0.5f;
    if (i == 3) o.sampling.top_k = 0;  // the whole vocabulary sorted (not a partial sort)
    opts.push_back(o);
  }
  return opts;
}

void check_continuous_batching(DType kv) {
  const Tokenizer tok = Tokenizer::from_file(testing::tiny_model_dir() + "/tokenizer.json");
  const std::vector<std::string> texts = {"The kernel scheduler", "Memory barriers", "A file system",
                                          "def main():", "The network stack", "Interrupts", "Python"};
  const auto opts = varied_options();
  // Reference: each request alone, one after the other.
  std::vector<std::vector<int32_t>> want;
  {
    auto model = model::Model::load(testing::tiny_model_dir());
    ThreadPool pool(2);
    for (size_t i = 0; i < texts.size(); ++i) {
      GenerateOptions o = opts[i];
      o.kv_cache = kv;
      want.push_back(generate(*model, tok, texts[i], o, pool).ids);
    }
  }
  // Three slots for seven requests: sequences join and leave the running batch as they finish.
  EngineOptions eo;
  eo.max_sequences = 3;
  eo.threads = 2;
  eo.context = 256;
  eo.kv_cache = kv;
  Engine engine(model::Model::load(testing::tiny_model_dir()), eo);
  SchedulerOptions so;
  so.prefill_tokens = 4;  // prompts are cut into chunks interleaved with decoding
  Scheduler sched(engine, so);
  Collected got;
  std::vector<Scheduler::Id> ids;
  for (size_t i = 0; i < texts.size(); ++i) {
    SequenceParams p;
    p.prompt = tok.encode(texts[i]);
    p.max_tokens = opts[i].max_tokens;
    p.sampling = opts[i].sampling;
    p.stop_at_eos = false;
    auto id = std::make_shared<Scheduler::Id>(0);
    std::unique_lock<std::mutex> lock(got.m);  // the id is known before any callback reads it
    *id = sched.submit(std::move(p), got.callbacks(id));
    ids.push_back(*id);
  }
  got.wait(texts.size());
  for (size_t i = 0; i < texts.size(); ++i) {
    EXPECT_EQ(got.tokens[ids[i]], want[i]) << "request " << i;
    EXPECT_EQ(got.ends[ids[i]].finish_reason, "length");
    EXPECT_EQ(got.ends[ids[i]].completion_tokens, opts[i].max_tokens);
  }
  const SchedulerStats st = sched.stats();
  EXPECT_EQ(st.finished, texts.size());
  EXPECT_EQ(st.running, 0);
  EXPECT_EQ(st.time_to_first_token.count, texts.size());
  EXPECT_GT(st.steps, 0u);
  EXPECT_LT(st.steps, st.generated_tokens + st.prompt_tokens);  // batching took place
}

TEST(Scheduler, ContinuousBatchingEqualsSequentialGeneration) {
  check_continuous_batching(DType::F32);
}
TEST(Scheduler, Bf16KvCacheContinuousBatchingEqualsSequentialGeneration) {
  check_continuous_batching(DType::BF16);
}
TEST(Scheduler, Int8KvCacheContinuousBatchingEqualsSequentialGeneration) {
  check_continuous_batching(DType::I8);
}

pipeline::PipelineOptions tiny_options(int slots, int queue) {
  pipeline::PipelineOptions o;
  o.engine.max_sequences = slots;
  o.engine.threads = 2;
  o.scheduler.max_queue = queue;
  return o;
}

TEST(Pipeline, GreedyEqualsTheGenerateReferenceAloneAndInABatch) {
  const json ref = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  const auto& p0 = ref["prompts"][0];
  auto p = pipeline::Pipeline::load(testing::tiny_model_dir(), tiny_options(8, 16));
  pipeline::TextRequest r;
  r.prompt_ids = p->encode_prompt(p0["text"].get<std::string>());
  r.max_tokens = 32;
  r.stop_at_eos = false;
  const auto alone = p->generate(r);
  EXPECT_EQ(alone.text, p0["greedy_text"].get<std::string>());
  EXPECT_EQ(alone.completion_tokens, 32);
  EXPECT_EQ(alone.prompt_tokens, static_cast<int64_t>(p0["ids"].size()));

  // The same request alongside 7 others (other prompts, sampling) running in the same batch.
  std::vector<pipeline::TextRequest> reqs;
  for (int i = 0; i < 8; ++i) {
    pipeline::TextRequest q = r;
    if (i > 0) {
      q.prompt_ids = p->encode_prompt(ref["prompts"][static_cast<size_t>(i % 6)]["text"].get<std::string>() + " x");
      q.sampling.temperature = 0.7f;
      q.sampling.seed = static_cast<uint64_t>(i);
    }
    reqs.push_back(q);
  }
  std::mutex m;
  std::condition_variable cv;
  std::vector<pipeline::TextResult> results(8);
  int done = 0;
  std::vector<pipeline::Pipeline::ChunkFn> chunks(8);
  std::vector<pipeline::Pipeline::DoneFn> dones;
  for (int i = 0; i < 8; ++i)
    dones.push_back([&, i](const pipeline::TextResult& res) {
      std::lock_guard<std::mutex> lock(m);
      results[static_cast<size_t>(i)] = res;
      ++done;
      cv.notify_all();
    });
  p->start_group(reqs, chunks, dones);
  std::unique_lock<std::mutex> lock(m);
  cv.wait(lock, [&] { return done == 8; });
  EXPECT_EQ(results[0].text, p0["greedy_text"].get<std::string>());
}

// `sparsa serve --no-mmap`: the pipeline reads the weights into memory and gives the same text.
TEST(Pipeline, WeightsReadIntoMemoryGiveTheReferenceText) {
  const json ref = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  const auto& p0 = ref["prompts"][0];
  pipeline::PipelineOptions o = tiny_options(2, 4);
  o.load.file_access = FileAccess::kRead;
  auto p = pipeline::Pipeline::load(testing::tiny_model_dir(), o);
  pipeline::TextRequest r;
  r.prompt_ids = p->encode_prompt(p0["text"].get<std::string>());
  r.max_tokens = 32;
  r.stop_at_eos = false;
  EXPECT_EQ(p->generate(r).text, p0["greedy_text"].get<std::string>());
}

TEST(Pipeline, StopStringsStreamingAndLogprobs) {
  auto p = pipeline::Pipeline::load(testing::tiny_model_dir(), tiny_options(2, 4));
  const Tokenizer& tok = p->tokenizer();
  auto model = model::Model::load(testing::tiny_model_dir());
  ThreadPool pool(2);
  GenerateOptions go;
  go.max_tokens = 40;
  go.stop = {"task that"};
  const auto want = generate(*model, tok, "The kernel scheduler", go, pool);

  pipeline::TextRequest r;
  r.prompt_ids = p->encode_prompt("The kernel scheduler");
  r.max_tokens = 40;
  r.stop = go.stop;
  r.top_logprobs = 3;
  std::string streamed;
  size_t lps = 0;
  std::mutex m;
  std::condition_variable cv;
  bool finished = false;
  pipeline::TextResult res;
  p->start(r,
           [&](const pipeline::TextChunk& c) {
             streamed += c.text;
             lps += c.logprobs.size();
           },
           [&](const pipeline::TextResult& x) {
             std::lock_guard<std::mutex> lock(m);
             res = x;
             finished = true;
             cv.notify_all();
           });
  {
    std::unique_lock<std::mutex> lock(m);
    cv.wait(lock, [&] { return finished; });
  }
  EXPECT_EQ(res.text, want.text);
  EXPECT_EQ(streamed, want.text);
  EXPECT_EQ(res.finish_reason, want.finish_reason);
  EXPECT_EQ(res.finish_reason, "stop");
  EXPECT_EQ(res.text.find("task that"), std::string::npos);
  ASSERT_EQ(res.logprobs.size(), static_cast<size_t>(res.completion_tokens));
  EXPECT_EQ(lps, res.logprobs.size());
  for (const auto& lp : res.logprobs) {
    EXPECT_LE(lp.logprob, 0.0f);
    ASSERT_EQ(lp.top.size(), 3u);
    EXPECT_EQ(lp.top[0].first, lp.token);  // greedy picks the most likely token
    EXPECT_FLOAT_EQ(lp.top[0].second, lp.logprob);
    EXPECT_GE(lp.top[0].second, lp.top[1].second);
  }
}

TEST(Scheduler, CancelFreesTheSlotAndFullQueueRefuses) {
  EngineOptions eo;
  eo.max_sequences = 1;
  eo.threads = 2;
  eo.context = 512;
  Engine engine(model::Model::load(testing::tiny_model_dir()), eo);
  SchedulerOptions so;
  so.max_queue = 1;
  Scheduler sched(engine, so);
  Collected got;
  auto submit = [&](int64_t max_tokens) {
    SequenceParams p;
    p.prompt = {0, 645, 838};
    p.max_tokens = max_tokens;
    p.stop_at_eos = false;
    auto id = std::make_shared<Scheduler::Id>(0);
    std::unique_lock<std::mutex> lock(got.m);
    *id = sched.submit(std::move(p), got.callbacks(id));
    return *id;
  };
  const auto long_id = submit(400);
  // Wait until it holds the only slot and produces tokens.
  for (;;) {
    {
      std::lock_guard<std::mutex> lock(got.m);
      if (got.tokens[long_id].size() >= 2) break;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
  const auto queued_id = submit(3);  // waits for the slot
  EXPECT_THROW(submit(3), QueueFull);
  sched.cancel(long_id);
  got.wait(2);
  EXPECT_EQ(got.ends[long_id].finish_reason, "cancelled");
  EXPECT_LT(got.ends[long_id].completion_tokens, 400);
  EXPECT_EQ(got.ends[queued_id].finish_reason, "length");
  EXPECT_EQ(got.tokens[queued_id].size(), 3u);
  EXPECT_EQ(sched.stats().cancelled, 1u);

  SequenceParams empty;
  EXPECT_THROW(sched.submit(empty, {}), Error);
  SequenceParams too_long;
  too_long.prompt.assign(512, 5);
  EXPECT_THROW(sched.submit(too_long, {}), Error);
  SequenceParams bad_id;
  bad_id.prompt = {1 << 20};
  EXPECT_THROW(sched.submit(bad_id, {}), Error);
  SequenceParams bad_temp;
  bad_temp.prompt = {0};
  bad_temp.sampling.temperature = -1;
  EXPECT_THROW(sched.submit(bad_temp, {}), Error);
}

}  // namespace
}  // namespace sparsa
