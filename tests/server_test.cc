// The HTTP server in process on the tiny model, driven by httplib's client: the OpenAI routes,
// streaming, the API key, a full queue, a client that disconnects mid-stream, and malformed
// requests, each answered with the right 4xx status and a clear OpenAI-style error body.
#include <gtest/gtest.h>
#include <httplib.h>

#include <nlohmann/json.hpp>
#include <thread>

#include "sparsa/core/mapped_file.h"
#include "sparsa/pipeline/pipeline.h"
#include "sparsa/server/server.h"
#include "test_util.h"

namespace sparsa {
namespace {

using nlohmann::json;

// A server on a free port of 127.0.0.1, running on its own thread for one test.
class LiveServer {
 public:
  LiveServer(int slots, int queue, int64_t ctx, std::string api_key = "") {
    pipeline::PipelineOptions po;
    po.engine.max_sequences = slots;
    po.engine.threads = 2;
    po.engine.context = ctx;
    po.scheduler.max_queue = queue;
    pipeline_ = pipeline::Pipeline::load(testing::tiny_model_dir(), po);
    server::ServerOptions so;
    so.port = 0;
    so.model_name = "tiny";
    so.api_key = std::move(api_key);
    so.heartbeat_ms = 50;
    server_ = std::make_unique<server::Server>(*pipeline_, so);
    port_ = server_->bind();
    thread_ = std::thread([this] { server_->run(); });
  }
  ~LiveServer() {
    server_->stop();
    thread_.join();
  }
  httplib::Client client() const {
    httplib::Client c("127.0.0.1", port_);
    c.set_read_timeout(60, 0);
    return c;
  }
  pipeline::Pipeline& pipeline() { return *pipeline_; }

 private:
  std::unique_ptr<pipeline::Pipeline> pipeline_;
  std::unique_ptr<server::Server> server_;
  int port_ = 0;
  std::thread thread_;
};

struct Reply {
  int status = 0;
  json body;
  std::string raw;
};

Reply post(httplib::Client& c, const std::string& path, const std::string& body,
           const httplib::Headers& headers = {}) {
  auto r = c.Post(path.c_str(), headers, body, "application/json");
  Reply out;
  if (!r) return out;
  out.status = r->status;
  out.raw = r->body;
  out.body = json::parse(r->body, nullptr, false);
  return out;
}

// Data lines of a server-sent event stream, [DONE] included.
std::vector<std::string> sse_data(const std::string& raw) {
  std::vector<std::string> out;
  size_t p = 0;
  while ((p = raw.find("data: ", p)) != std::string::npos) {
    const size_t e = raw.find("\n\n", p);
    out.push_back(raw.substr(p + 6, e - p - 6));
    p = e;
  }
  return out;
}

TEST(Server, CompletionsChatModelsHealthMetrics) {
  LiveServer s(4, 8, 256);
  auto c = s.client();
  const json ref = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  const auto& p0 = ref["prompts"][0];

  // Greedy: the reference text (EOS ignored by asking for exactly 32 tokens of a model that
  // does not produce EOS here), usage and finish_reason.
  Reply r = post(c, "/v1/completions",
                 json{{"model", "tiny"}, {"prompt", p0["text"]}, {"max_tokens", 32}, {"temperature", 0}}.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "text_completion");
  EXPECT_EQ(r.body["choices"][0]["text"], p0["greedy_text"]);
  EXPECT_EQ(r.body["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(r.body["usage"]["completion_tokens"], 32);
  EXPECT_EQ(r.body["usage"]["prompt_tokens"], p0["ids"].size());
  EXPECT_EQ(r.body["usage"]["total_tokens"], 32 + p0["ids"].size());

  // Streaming gives the same text in pieces, a final finish_reason, usage on request, [DONE].
  httplib::Request req;
  req.method = "POST";
  req.path = "/v1/completions";
  req.set_header("Content-Type", "application/json");
  req.body = json{{"model", "tiny"}, {"prompt", p0["text"]}, {"max_tokens", 32}, {"temperature", 0},
                  {"stream", true}, {"stream_options", {{"include_usage", true}}}}.dump();
  std::string raw;
  req.content_receiver = [&](const char* d, size_t n, uint64_t, uint64_t) {
    raw.append(d, n);
    return true;
  };
  auto sr = c.send(req);
  ASSERT_TRUE(sr);
  EXPECT_EQ(sr->status, 200);
  EXPECT_EQ(sr->get_header_value("Content-Type"), "text/event-stream");
  const auto events = sse_data(raw);
  ASSERT_GE(events.size(), 3u) << raw;
  EXPECT_EQ(events.back(), "[DONE]");
  std::string text, finish;
  for (size_t i = 0; i + 1 < events.size(); ++i) {
    const json e = json::parse(events[i]);
    if (e["choices"].empty()) {
      EXPECT_EQ(e["usage"]["completion_tokens"], 32);
      continue;
    }
    text += e["choices"][0]["text"].get<std::string>();
    if (!e["choices"][0]["finish_reason"].is_null()) finish = e["choices"][0]["finish_reason"];
  }
  EXPECT_EQ(text, p0["greedy_text"]);
  EXPECT_EQ(finish, "length");

  // Chat, n = 2 with a seed (two different seeded choices), logprobs.
  r = post(c, "/v1/chat/completions",
           json{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "What is a futex?"}}}},
                {"max_tokens", 12}, {"n", 2}, {"seed", 7}, {"logprobs", true}, {"top_logprobs", 2}}.dump());
  ASSERT_EQ(r.status, 200) << r.raw;
  EXPECT_EQ(r.body["object"], "chat.completion");
  ASSERT_EQ(r.body["choices"].size(), 2u);
  EXPECT_EQ(r.body["choices"][1]["index"], 1);
  EXPECT_EQ(r.body["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(r.body["choices"][0]["logprobs"]["content"][0]["top_logprobs"].size(), 2u);
  const Reply again = post(c, "/v1/chat/completions",
                           json{{"model", "tiny"}, {"messages", {{{"role", "user"}, {"content", "What is a futex?"}}}},
                                {"max_tokens", 12}, {"n", 2}, {"seed", 7}, {"logprobs", true}, {"top_logprobs", 2}}.dump());
  EXPECT_EQ(again.body["choices"], r.body["choices"]);  // seeded: repeatable

  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(json::parse(m->body)["data"][0]["id"], "tiny");
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
  auto met = c.Get("/metrics");
  ASSERT_TRUE(met);
  for (const char* name : {"sparsa_requests_total{route=\"/v1/completions\",code=\"200\"} 2",
                           "sparsa_generation_tokens_total", "sparsa_queue_depth 0",
                           "sparsa_time_to_first_token_seconds_bucket{le=\"+Inf\"} 6",
                           "sparsa_inter_token_latency_seconds_count", "sparsa_prompt_tokens_total"})
    EXPECT_NE(met->body.find(name), std::string::npos) << name << "\n" << met->body;
}

TEST(Server, ApiKeyIsRequiredEverywhereButHealth) {
  LiveServer s(2, 4, 256, "sekret");
  auto c = s.client();
  const std::string body = json{{"model", "tiny"}, {"prompt", "Hi"}, {"max_tokens", 2}}.dump();
  Reply r = post(c, "/v1/completions", body);
  EXPECT_EQ(r.status, 401);
  EXPECT_EQ(r.body["error"]["code"], "invalid_api_key");
  r = post(c, "/v1/completions", body, {{"Authorization", "Bearer wrong"}});
  EXPECT_EQ(r.status, 401);
  r = post(c, "/v1/completions", body, {{"Authorization", "Bearer sekret"}});
  EXPECT_EQ(r.status, 200) << r.raw;
  auto m = c.Get("/v1/models");
  ASSERT_TRUE(m);
  EXPECT_EQ(m->status, 401);
  auto met = c.Get("/metrics");
  ASSERT_TRUE(met);
  EXPECT_EQ(met->status, 401);
  auto h = c.Get("/health");
  ASSERT_TRUE(h);
  EXPECT_EQ(h->status, 200);
}

std::string metric_line(httplib::Client& c, const std::string& name) {
  auto m = c.Get("/metrics");
  if (!m) return "";
  const size_t p = m->body.find("\n" + name + " ");
  if (p == std::string::npos) return "";
  return m->body.substr(p + 1, m->body.find('\n', p + 1) - p - 1);
}

TEST(Server, DisconnectMidStreamFreesTheSequenceAndAFullQueueAnswers429) {
  LiveServer s(1, 1, 1024);
  auto c = s.client();
  // A long stream that the client abandons after a few events.
  std::thread abandoner([&] {
    auto c2 = s.client();
    httplib::Request req;
    req.method = "POST";
    req.path = "/v1/completions";
    req.set_header("Content-Type", "application/json");
    req.body = json{{"model", "tiny"}, {"prompt", "The kernel scheduler"}, {"max_tokens", 900},
                    {"stream", true}, {"temperature", 0}}.dump();
    int chunks = 0;
    req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return ++chunks < 5; };
    c2.send(req);
  });
  abandoner.join();
  // The abandoned sequence is cancelled and its slot freed.
  for (int i = 0; i < 20000 && metric_line(c, "sparsa_running_sequences") != "sparsa_running_sequences 0"; ++i)
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  EXPECT_EQ(metric_line(c, "sparsa_running_sequences"), "sparsa_running_sequences 0");
  EXPECT_EQ(metric_line(c, "sparsa_sequences_cancelled_total"), "sparsa_sequences_cancelled_total 1");

  // Fill the slot and the queue with streams, then ask once more while the queue is full. On a
  // loaded machine the first stream can finish before the probe arrives (tiny decodes a
  // thousand tokens in well under a second), so the attempt is repeated a few times.
  Reply r;
  for (int attempt = 0; attempt < 5; ++attempt) {
    std::atomic<bool> release{false};
    std::vector<std::thread> holders;
    for (int k = 0; k < 2; ++k)
      holders.emplace_back([&] {
        auto c2 = s.client();
        httplib::Request req;
        req.method = "POST";
        req.path = "/v1/completions";
        req.set_header("Content-Type", "application/json");
        req.body = json{{"model", "tiny"}, {"prompt", "The kernel scheduler"}, {"max_tokens", 1000},
                        {"stream", true}, {"temperature", 0}}.dump();
        req.content_receiver = [&](const char*, size_t, uint64_t, uint64_t) { return !release.load(); };
        c2.send(req);
      });
    for (int i = 0; i < 20000 && metric_line(c, "sparsa_queue_depth") != "sparsa_queue_depth 1"; ++i)
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
    r = post(c, "/v1/completions", json{{"model", "tiny"}, {"prompt", "x"}, {"max_tokens", 2}}.dump());
    release = true;
    for (auto& t : holders) t.join();
    if (r.status == 429) break;
  }
  EXPECT_EQ(r.status, 429) << r.raw;
  EXPECT_EQ(r.body["error"]["code"], "queue_full");
  EXPECT_NE(r.body["error"]["message"].get<std::string>().find("busy"), std::string::npos);
}

struct Malformed {
  std::string what;
  std::string path;
  std::string body;
  int status;
  std::string message;  // a part of error.message
  std::string param;    // expected error.param ("" = any)
};

TEST(Server, MalformedRequestsGetClearErrors) {
  LiveServer s(2, 4, 64);
  auto c = s.client();
  const std::string C = "/v1/completions", CH = "/v1/chat/completions";
  std::string long_prompt;
  for (int i = 0; i < 200; ++i) long_prompt += "kernel ";
  const std::vector<Malformed> cases = {
      {"invalid JSON", C, "{\"model\": \"tiny\", ", 400, "not valid JSON", ""},
      {"not an object", C, "[1, 2]", 400, "must be a JSON object", ""},
      {"missing model", C, R"({"prompt": "x"})", 400, "model", "model"},
      {"model of the wrong type", C, R"({"model": 5, "prompt": "x"})", 400, "'model' must be a string", "model"},
      {"unknown model", C, R"({"model": "gpt-9", "prompt": "x"})", 404, "'gpt-9' does not exist", "model"},
      {"missing prompt", C, R"({"model": "tiny"})", 400, "'prompt' is required", "prompt"},
      {"prompt of the wrong type", C, R"({"model": "tiny", "prompt": {"a": 1}})", 400, "'prompt' must be", "prompt"},
      {"several prompts", C, R"({"model": "tiny", "prompt": ["a", "b"]})", 400, "one prompt per request", "prompt"},
      {"negative max_tokens", C, R"({"model": "tiny", "prompt": "x", "max_tokens": -5})", 400, "'max_tokens' must be between 1 and 64", "max_tokens"},
      {"huge max_tokens", C, R"({"model": "tiny", "prompt": "x", "max_tokens": 100000000000})", 400, "'max_tokens' must be between", "max_tokens"},
      {"max_tokens as a string", C, R"({"model": "tiny", "prompt": "x", "max_tokens": "10"})", 400, "'max_tokens' must be an integer", "max_tokens"},
      {"fractional max_tokens", C, R"({"model": "tiny", "prompt": "x", "max_tokens": 2.5})", 400, "fractional", "max_tokens"},
      {"temperature as a string", C, R"({"model": "tiny", "prompt": "x", "temperature": "hot"})", 400, "'temperature' must be a number", "temperature"},
      {"temperature out of range", C, R"({"model": "tiny", "prompt": "x", "temperature": 7})", 400, "'temperature' must be between 0 and 2", "temperature"},
      {"top_p of zero", C, R"({"model": "tiny", "prompt": "x", "top_p": 0})", 400, "'top_p'", "top_p"},
      {"n too large", C, R"({"model": "tiny", "prompt": "x", "n": 50})", 400, "'n' must be between 1 and 4", "n"},
      {"stop of the wrong type", C, R"({"model": "tiny", "prompt": "x", "stop": 5})", 400, "'stop' must be a string or a list", "stop"},
      {"too many stop strings", C, R"({"model": "tiny", "prompt": "x", "stop": ["a","b","c","d","e"]})", 400, "at most 4", "stop"},
      {"presence_penalty out of range", C, R"({"model": "tiny", "prompt": "x", "presence_penalty": 3})", 400, "'presence_penalty'", "presence_penalty"},
      {"logprobs too large", C, R"({"model": "tiny", "prompt": "x", "logprobs": 9})", 400, "'logprobs' must be between 0 and 5", "logprobs"},
      {"stream not a boolean", C, R"({"model": "tiny", "prompt": "x", "stream": "yes"})", 400, "'stream' must be a boolean", "stream"},
      {"seed not an integer", C, R"({"model": "tiny", "prompt": "x", "seed": 1.5})", 400, "'seed' must be an integer", "seed"},
      {"prompt longer than the context", C, json{{"model", "tiny"}, {"prompt", long_prompt}}.dump(), 400, "maximum context length is 64 tokens", "prompt"},
      {"token ids outside the vocabulary", C, R"({"model": "tiny", "prompt": [1, 99999]})", 400, "token-id prompt", "prompt"},
      {"messages not a list", CH, R"({"model": "tiny", "messages": "hi"})", 400, "'messages' must be a non-empty list", "messages"},
      {"message without a role", CH, R"({"model": "tiny", "messages": [{"content": "hi"}]})", 400, "messages[0].role must be a string", "messages[0].role"},
      {"message content of the wrong type", CH, R"({"model": "tiny", "messages": [{"role": "user", "content": 5}]})", 400, "messages[0].content must be", "messages[0].content"},
      {"top_logprobs without logprobs", CH, R"({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_logprobs": 2})", 400, "needs 'logprobs'", "top_logprobs"},
  };
  ASSERT_GE(cases.size(), 15u);
  for (const Malformed& m : cases) {
    SCOPED_TRACE(m.what);
    const Reply r = post(c, m.path, m.body);
    EXPECT_EQ(r.status, m.status) << r.raw;
    ASSERT_TRUE(r.body.is_object() && r.body.contains("error")) << r.raw;
    const json& e = r.body["error"];
    EXPECT_NE(e["message"].get<std::string>().find(m.message), std::string::npos) << e["message"];
    EXPECT_TRUE(e["type"].is_string());
    EXPECT_TRUE(e.contains("code"));
    if (!m.param.empty()) {
      EXPECT_EQ(e["param"], m.param);
    }
  }

  // HTTP-level refusals carry the same kind of body.
  auto unknown = c.Get("/v1/nothing");
  ASSERT_TRUE(unknown);
  EXPECT_EQ(unknown->status, 404);
  EXPECT_NE(json::parse(unknown->body)["error"]["message"].get<std::string>().find("unknown route"), std::string::npos);
  auto wrong_method = c.Get("/v1/completions");
  ASSERT_TRUE(wrong_method);
  EXPECT_EQ(wrong_method->status, 405);
  const Reply big = post(c, C, std::string(2 << 20, ' '));
  EXPECT_EQ(big.status, 413);
  EXPECT_NE(big.raw.find("too large"), std::string::npos) << big.raw;
  httplib::Headers many;
  for (int i = 0; i < 150; ++i) many.emplace("X-Filler-" + std::to_string(i), "x");
  const Reply headers = post(c, C, R"({"model": "tiny", "prompt": "x"})", many);
  EXPECT_EQ(headers.status, 431);
  EXPECT_NE(headers.raw.find("headers too large"), std::string::npos) << headers.raw;

  // And the server still serves.
  const Reply ok = post(c, C, R"({"model": "tiny", "prompt": "x", "max_tokens": 3})");
  EXPECT_EQ(ok.status, 200) << ok.raw;
}

}  // namespace
}  // namespace sparsa
