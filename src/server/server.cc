// The OpenAI-compatible HTTP front end (see sparsa/server/server.h).
//
// A request is validated into one TextRequest per choice (n), started on the pipeline, and
// answered from an Exchange: the scheduler's thread pushes text events into it, and the HTTP
// thread waits on it, either to build one JSON response or to write server-sent events as they
// arrive. A failed write (the client went away) cancels the request's sequences at once.
#include "sparsa/server/server.h"

#include <httplib.h>
#include <signal.h>
#include <sys/socket.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <condition_variable>
#include <deque>
#include <map>
#include <mutex>
#include <random>

#include "sparsa/core/error.h"

namespace sparsa::server {

namespace {

using json = nlohmann::json;
using ojson = nlohmann::ordered_json;
using pipeline::Pipeline;
using pipeline::TextChunk;
using pipeline::TextRequest;
using pipeline::TextResult;
using pipeline::TokenLogprob;

// Serializes without ever throwing on invalid UTF-8 (a token's raw bytes may be a fragment).
std::string dump(const ojson& j) { return j.dump(-1, ' ', false, ojson::error_handler_t::replace); }

/// An error answered to the client: HTTP status and the OpenAI error fields.
struct ApiError {
  int status;
  std::string message;
  std::string type = "invalid_request_error";
  std::string param;
  std::string code;
};

ojson error_body(const ApiError& e) {
  ojson err = {{"message", e.message}, {"type", e.type}, {"param", nullptr}, {"code", nullptr}};
  if (!e.param.empty()) err["param"] = e.param;
  if (!e.code.empty()) err["code"] = e.code;
  return ojson{{"error", err}};
}

void send_error(httplib::Response& res, const ApiError& e) {
  res.status = e.status;
  res.set_content(dump(error_body(e)), "application/json");
}

[[noreturn]] void bad(std::string message, std::string param = "", std::string code = "") {
  throw ApiError{400, std::move(message), "invalid_request_error", std::move(param), std::move(code)};
}

std::string hex_id(std::mt19937_64& rng, std::mutex& m) {
  std::lock_guard<std::mutex> lock(m);
  return fmt::format("{:016x}{:08x}", rng(), static_cast<uint32_t>(rng()));
}

int64_t now_seconds() {
  return std::chrono::duration_cast<std::chrono::seconds>(
             std::chrono::system_clock::now().time_since_epoch())
      .count();
}

// ---- request fields

const ojson* field(const ojson& body, const char* name) {
  auto it = body.find(name);
  if (it == body.end() || it->is_null()) return nullptr;
  return &*it;
}

double get_number(const ojson& body, const char* name, double def, double lo, double hi) {
  const ojson* v = field(body, name);
  if (v == nullptr) return def;
  if (!v->is_number()) bad(fmt::format("'{}' must be a number, got {}", name, v->type_name()), name);
  const double x = v->get<double>();
  if (!std::isfinite(x) || x < lo || x > hi)
    bad(fmt::format("'{}' must be between {} and {}, got {}", name, lo, hi, x), name);
  return x;
}

int64_t get_int(const ojson& body, const char* name, int64_t def, int64_t lo, int64_t hi) {
  const ojson* v = field(body, name);
  if (v == nullptr) return def;
  if (!v->is_number_integer())
    bad(fmt::format("'{}' must be an integer, got {}", name,
                    v->is_number() ? "a fractional number" : v->type_name()), name);
  if (v->is_number_unsigned() && v->get<uint64_t>() > static_cast<uint64_t>(INT64_MAX))
    bad(fmt::format("'{}' must be at most {}", name, hi), name);
  const int64_t x = v->get<int64_t>();
  if (x < lo || x > hi) bad(fmt::format("'{}' must be between {} and {}, got {}", name, lo, hi, x), name);
  return x;
}

bool get_bool(const ojson& body, const char* name, bool def) {
  const ojson* v = field(body, name);
  if (v == nullptr) return def;
  if (!v->is_boolean()) bad(fmt::format("'{}' must be a boolean, got {}", name, v->type_name()), name);
  return v->get<bool>();
}

std::vector<std::string> get_stop(const ojson& body) {
  const ojson* v = field(body, "stop");
  if (v == nullptr) return {};
  std::vector<std::string> out;
  if (v->is_string()) {
    out.push_back(v->get<std::string>());
  } else if (v->is_array()) {
    if (v->size() > 4) bad(fmt::format("'stop' holds at most 4 strings, got {}", v->size()), "stop");
    for (const auto& s : *v) {
      if (!s.is_string()) bad("'stop' must be a string or a list of strings", "stop");
      out.push_back(s.get<std::string>());
    }
  } else {
    bad(fmt::format("'stop' must be a string or a list of strings, got {}", v->type_name()), "stop");
  }
  for (const auto& s : out) {
    if (s.empty()) bad("'stop' strings must not be empty", "stop");
    if (s.size() > 256) bad("'stop' strings must be at most 256 bytes", "stop");
  }
  return out;
}

// ---- events from the scheduler thread to the HTTP thread

struct Event {
  int index = 0;
  TextChunk chunk;
  bool done = false;
  TextResult result;
};

struct Exchange {
  std::mutex m;
  std::condition_variable cv;
  std::deque<Event> events;
  std::vector<Pipeline::Id> ids;
  std::vector<bool> finished;
  int remaining = 0;

  void push(Event e) {
    {
      std::lock_guard<std::mutex> lock(m);
      if (e.done) {
        finished[static_cast<size_t>(e.index)] = true;
        --remaining;
      }
      events.push_back(std::move(e));
    }
    cv.notify_all();
  }
};

// A request after validation.
struct Job {
  bool chat = false;
  bool stream = false;
  bool include_usage = false;
  int n = 1;
  int completion_logprobs = -1;  // completions: `logprobs` (top count); chat: top_logprobs
  bool chat_logprobs = false;
  TextRequest request;
};

}  // namespace

struct Server::Impl {
  Impl(Pipeline& p, const ServerOptions& o) : pipeline(p), opt(o) {
    if (opt.model_name.empty()) opt.model_name = "sparsa";
    rng.seed(std::random_device{}());
  }

  Pipeline& pipeline;
  ServerOptions opt;
  httplib::Server http;
  std::mt19937_64 rng;
  std::mutex rng_mutex;
  std::mutex metrics_mutex;
  std::map<std::pair<std::string, int>, uint64_t> requests;  // (route, status) → count
  std::atomic<int64_t> active_streams{0};
  int listen_fd = -1;

  uint64_t random_seed() {
    std::lock_guard<std::mutex> lock(rng_mutex);
    return rng();
  }

  // ---- validation

  Job parse_job(const httplib::Request& req, bool chat) {
    ojson body;
    try {
      body = ojson::parse(req.body);
    } catch (const ojson::parse_error& e) {
      // nlohmann's message names the byte offset and what it expected there.
      std::string what = e.what();
      const size_t colon = what.find("parse error");
      bad("the request body is not valid JSON: " + (colon == std::string::npos ? what : what.substr(colon)));
    }
    if (!body.is_object()) bad(fmt::format("the request body must be a JSON object, got {}", body.type_name()));
    const ojson* model = field(body, "model");
    if (model == nullptr) bad("you must provide a model parameter", "model");
    if (!model->is_string()) bad(fmt::format("'model' must be a string, got {}", model->type_name()), "model");
    if (model->get<std::string>() != opt.model_name)
      throw ApiError{404, fmt::format("the model '{}' does not exist; this server serves '{}'",
                                      model->get<std::string>(), opt.model_name),
                     "invalid_request_error", "model", "model_not_found"};

    Job job;
    job.chat = chat;
    std::vector<int32_t>& ids = job.request.prompt_ids;
    if (chat) {
      const ojson* msgs = field(body, "messages");
      if (msgs == nullptr) bad("'messages' is required", "messages");
      if (!msgs->is_array() || msgs->empty()) bad("'messages' must be a non-empty list of messages", "messages");
      ojson clean = ojson::array();
      for (size_t i = 0; i < msgs->size(); ++i) {
        const ojson& m = (*msgs)[i];
        const std::string param = fmt::format("messages[{}]", i);
        if (!m.is_object()) bad(fmt::format("{} must be an object", param), param);
        const ojson* role = field(m, "role");
        if (role == nullptr || !role->is_string())
          bad(fmt::format("{}.role must be a string", param), param + ".role");
        ojson out = m;
        const ojson* content = field(m, "content");
        if (content == nullptr) {
          out["content"] = "";
        } else if (content->is_array()) {
          // Content parts: the text parts, joined.
          std::string text;
          for (const auto& part : *content) {
            if (!part.is_object() || part.value("type", "") != "text" || !part.contains("text") ||
                !part["text"].is_string())
              bad(fmt::format("{}.content parts must be {{\"type\": \"text\", \"text\": ...}}", param),
                  param + ".content");
            text += part["text"].get<std::string>();
          }
          out["content"] = text;
        } else if (!content->is_string()) {
          bad(fmt::format("{}.content must be a string or a list of text parts", param), param + ".content");
        }
        clean.push_back(std::move(out));
      }
      if (!pipeline.has_chat_template())
        bad("this model has no chat template; use /v1/completions", "messages");
      ojson extra = ojson::object();
      if (const ojson* tools = field(body, "tools")) {
        if (!tools->is_array()) bad("'tools' must be a list", "tools");
        extra["tools"] = *tools;
      }
      std::string text;
      try {
        text = pipeline.render_chat(clean, true, extra);
      } catch (const Error& e) {
        bad(fmt::format("the chat template could not render these messages: {}", e.what()), "messages");
      }
      ids = pipeline.tokenizer().encode(text, false);
    } else {
      const ojson* prompt = field(body, "prompt");
      if (prompt == nullptr) bad("'prompt' is required", "prompt");
      if (prompt->is_string()) {
        ids = pipeline.encode_prompt(prompt->get<std::string>());
      } else if (prompt->is_array() && prompt->size() == 1 && (*prompt)[0].is_string()) {
        ids = pipeline.encode_prompt((*prompt)[0].get<std::string>());
      } else if (prompt->is_array() && !prompt->empty() && (*prompt)[0].is_number()) {
        const int64_t vocab = pipeline.engine().vocab_size();
        for (const auto& t : *prompt) {
          if (!t.is_number_integer() || t.get<int64_t>() < 0 || t.get<int64_t>() >= vocab)
            bad(fmt::format("a token-id prompt must hold integers in [0, {})", vocab), "prompt");
          ids.push_back(static_cast<int32_t>(t.get<int64_t>()));
        }
      } else if (prompt->is_array()) {
        bad("'prompt' must be a string, a list of one string, or a list of token ids (one prompt per "
            "request)", "prompt");
      } else {
        bad(fmt::format("'prompt' must be a string, got {}", prompt->type_name()), "prompt");
      }
      if (ids.empty()) bad("the prompt is empty", "prompt");
    }
    const int64_t ctx = pipeline.context();
    const int64_t n_prompt = static_cast<int64_t>(ids.size());
    if (n_prompt >= ctx)
      bad(fmt::format("this model's maximum context length is {} tokens, but the prompt has {} "
                      "tokens; shorten it", ctx, n_prompt),
          chat ? "messages" : "prompt", "context_length_exceeded");

    const char* max_name = chat && field(body, "max_completion_tokens") ? "max_completion_tokens" : "max_tokens";
    const int64_t def_max = chat ? ctx - n_prompt : 16;
    job.request.max_tokens = get_int(body, max_name, def_max, 1, ctx);
    job.n = static_cast<int>(get_int(body, "n", 1, 1, opt.max_n));
    job.stream = get_bool(body, "stream", false);
    if (const ojson* so = field(body, "stream_options")) {
      if (!so->is_object()) bad("'stream_options' must be an object", "stream_options");
      job.include_usage = get_bool(*so, "include_usage", false);
    }
    SamplingParams& s = job.request.sampling;
    s.temperature = static_cast<float>(get_number(body, "temperature", 1.0, 0.0, 2.0));
    s.top_p = static_cast<float>(get_number(body, "top_p", 1.0, 0.0, 1.0));
    if (s.top_p <= 0) bad("'top_p' must be greater than 0", "top_p");
    s.top_k = static_cast<int>(get_int(body, "top_k", 0, 0, 1 << 20));
    s.min_p = static_cast<float>(get_number(body, "min_p", 0.0, 0.0, 1.0));
    s.presence_penalty = static_cast<float>(get_number(body, "presence_penalty", 0.0, -2.0, 2.0));
    s.frequency_penalty = static_cast<float>(get_number(body, "frequency_penalty", 0.0, -2.0, 2.0));
    s.repetition_penalty = static_cast<float>(get_number(body, "repetition_penalty", 1.0, 0.01, 10.0));
    s.seed = field(body, "seed") ? static_cast<uint64_t>(get_int(body, "seed", 0, INT64_MIN, INT64_MAX))
                                 : random_seed();
    job.request.stop = get_stop(body);
    if (chat) {
      job.chat_logprobs = get_bool(body, "logprobs", false);
      const int64_t top = get_int(body, "top_logprobs", 0, 0, 20);
      if (field(body, "top_logprobs") && !job.chat_logprobs)
        bad("'top_logprobs' needs 'logprobs': true", "top_logprobs");
      job.request.top_logprobs = job.chat_logprobs ? static_cast<int>(top) : -1;
    } else {
      job.completion_logprobs = static_cast<int>(get_int(body, "logprobs", -1, 0, 5));
      job.request.top_logprobs = job.completion_logprobs;
      if (get_bool(body, "echo", false)) bad("'echo' is not supported", "echo");
      if (field(body, "suffix")) bad("'suffix' is not supported", "suffix");
      if (get_int(body, "best_of", 1, 1, 1) != 1) bad("'best_of' is not supported", "best_of");
    }
    return job;
  }

  // ---- response pieces

  ojson logprobs_json(const Job& job, const std::vector<TokenLogprob>& lps, size_t text_offset) const {
    if (job.chat) {
      if (!job.chat_logprobs) return nullptr;
      ojson content = ojson::array();
      auto bytes_of = [](const std::string& s) {
        ojson b = ojson::array();
        for (unsigned char c : s) b.push_back(static_cast<int>(c));
        return b;
      };
      for (const auto& lp : lps) {
        ojson top = ojson::array();
        for (const auto& [tok, l] : lp.top) top.push_back({{"token", tok}, {"logprob", l}, {"bytes", bytes_of(tok)}});
        content.push_back({{"token", lp.token}, {"logprob", lp.logprob}, {"bytes", bytes_of(lp.token)},
                           {"top_logprobs", top}});
      }
      return ojson{{"content", content}};
    }
    if (job.completion_logprobs < 0) return nullptr;
    ojson tokens = ojson::array(), token_lps = ojson::array(), tops = ojson::array(), offsets = ojson::array();
    size_t off = text_offset;
    for (const auto& lp : lps) {
      tokens.push_back(lp.token);
      token_lps.push_back(lp.logprob);
      ojson top = ojson::object();
      for (const auto& [tok, l] : lp.top) top[tok] = l;
      tops.push_back(top);
      offsets.push_back(off);
      off += lp.token.size();
    }
    return ojson{{"tokens", tokens}, {"token_logprobs", token_lps}, {"top_logprobs", tops},
                 {"text_offset", offsets}};
  }

  ojson usage_json(int64_t prompt, int64_t completion) const {
    return {{"prompt_tokens", prompt}, {"completion_tokens", completion},
            {"total_tokens", prompt + completion}};
  }

  // Starts the job's choices; the exchange collects their events.
  std::shared_ptr<Exchange> start(const Job& job) {
    auto ex = std::make_shared<Exchange>();
    ex->finished.assign(static_cast<size_t>(job.n), false);
    ex->remaining = job.n;
    std::vector<TextRequest> reqs;
    std::vector<Pipeline::ChunkFn> chunks;
    std::vector<Pipeline::DoneFn> dones;
    for (int i = 0; i < job.n; ++i) {
      TextRequest r = job.request;
      r.sampling.seed += static_cast<uint64_t>(i);
      reqs.push_back(std::move(r));
      chunks.push_back([ex, i](const TextChunk& c) { ex->push(Event{i, c, false, {}}); });
      dones.push_back([ex, i](const TextResult& r) { ex->push(Event{i, {}, true, r}); });
    }
    try {
      ex->ids = pipeline.start_group(reqs, chunks, dones);
    } catch (const QueueFull& e) {
      throw ApiError{429, e.what(), "server_busy", "", "queue_full"};
    } catch (const Error& e) {
      bad(e.what());
    }
    return ex;
  }

  void cancel(Exchange& ex) {
    std::vector<Pipeline::Id> open;
    {
      std::lock_guard<std::mutex> lock(ex.m);
      for (size_t i = 0; i < ex.ids.size(); ++i)
        if (!ex.finished[i]) open.push_back(ex.ids[i]);
    }
    for (Pipeline::Id id : open) pipeline.cancel(id);
  }

  void handle_generate(const httplib::Request& req, httplib::Response& res, bool chat) {
    Job job = parse_job(req, chat);
    std::shared_ptr<Exchange> ex = start(job);
    const std::string id = (chat ? "chatcmpl-" : "cmpl-") + hex_id(rng, rng_mutex);
    const int64_t created = now_seconds();
    if (job.stream) {
      stream(job, ex, id, created, res);
      return;
    }
    std::vector<TextResult> results(static_cast<size_t>(job.n));
    {
      std::unique_lock<std::mutex> lock(ex->m);
      ex->cv.wait(lock, [&] { return ex->remaining == 0; });
      for (Event& e : ex->events)
        if (e.done) results[static_cast<size_t>(e.index)] = std::move(e.result);
      ex->events.clear();
    }
    ojson choices = ojson::array();
    int64_t completion = 0;
    for (int i = 0; i < job.n; ++i) {
      const TextResult& r = results[static_cast<size_t>(i)];
      if (r.finish_reason == "error")
        throw ApiError{500, "generation failed: " + r.error, "server_error", "", ""};
      if (r.finish_reason == "cancelled")
        throw ApiError{503, "the server is shutting down", "server_error", "", ""};
      completion += r.completion_tokens;
      ojson c = {{"index", i}};
      if (chat) c["message"] = {{"role", "assistant"}, {"content", r.text}};
      else c["text"] = r.text;
      c["logprobs"] = logprobs_json(job, r.logprobs, 0);
      c["finish_reason"] = r.finish_reason;
      choices.push_back(std::move(c));
    }
    const int64_t prompt = static_cast<int64_t>(job.request.prompt_ids.size());
    ojson out = {{"id", id}, {"object", chat ? "chat.completion" : "text_completion"},
                 {"created", created}, {"model", opt.model_name}, {"choices", choices},
                 {"usage", usage_json(prompt, completion)}};
    res.set_content(dump(out), "application/json");
  }

  ojson chunk_json(const Job& job, const std::string& id, int64_t created, int index, const ojson& delta_or_text,
                   const ojson& logprobs, const ojson& finish) const {
    ojson c = {{"index", index}};
    if (job.chat) c["delta"] = delta_or_text;
    else c["text"] = delta_or_text;
    c["logprobs"] = logprobs;
    c["finish_reason"] = finish;
    return ojson{{"id", id}, {"object", job.chat ? "chat.completion.chunk" : "text_completion"},
                 {"created", created}, {"model", opt.model_name}, {"choices", ojson::array({c})}};
  }

  void stream(const Job& job, std::shared_ptr<Exchange> ex, const std::string& id, int64_t created,
              httplib::Response& res) {
    struct StreamState {
      std::vector<size_t> text_offset;
      // A text chunk without log-probabilities is text_head[index] + JSON string + text_tail,
      // byte for byte what chunk_json() gives.
      std::vector<std::string> text_head;
      std::string text_tail;
      int64_t completion = 0;
      bool finished = false;
    };
    auto st = std::make_shared<StreamState>();
    st->text_offset.assign(static_cast<size_t>(job.n), 0);
    {
      const std::string marker = "\x01";
      const ojson delta = job.chat ? ojson{{"content", marker}} : ojson(marker);
      for (int i = 0; i < job.n; ++i) {
        const std::string whole = "data: " + dump(chunk_json(job, id, created, i, delta, nullptr, nullptr)) + "\n\n";
        const std::string quoted = dump(ojson(marker));
        const size_t at = whole.rfind(quoted);  // the text is the last string of the chunk
        st->text_head.push_back(whole.substr(0, at));
        st->text_tail = whole.substr(at + quoted.size());
      }
    }
    res.set_header("Cache-Control", "no-cache");
    res.set_header("X-Accel-Buffering", "no");
    ++active_streams;
    const auto heartbeat = std::chrono::milliseconds(std::max(10, opt.heartbeat_ms));
    // Chat streams begin with the assistant role, as OpenAI's do.
    std::string head;
    if (job.chat)
      for (int i = 0; i < job.n; ++i)
        head += "data: " + dump(chunk_json(job, id, created, i, {{"role", "assistant"}, {"content", ""}},
                                           nullptr, nullptr)) + "\n\n";
    auto head_sent = std::make_shared<bool>(head.empty());
    res.set_chunked_content_provider(
        "text/event-stream",
        [this, job, ex, id, created, st, heartbeat, head, head_sent](size_t, httplib::DataSink& sink) {
          auto write = [&](const std::string& s) { return sink.write(s.data(), s.size()); };
          if (!*head_sent) {
            *head_sent = true;
            if (!write(head)) {
              cancel(*ex);
              return false;
            }
          }
          std::deque<Event> events;
          bool all_done;
          {
            std::unique_lock<std::mutex> lock(ex->m);
            ex->cv.wait_for(lock, heartbeat, [&] { return !ex->events.empty(); });
            events.swap(ex->events);
            all_done = ex->remaining == 0;
          }
          std::string out;
          if (events.empty() && !all_done) out = ": keep-alive\n\n";
          for (Event& e : events) {
            const size_t i = static_cast<size_t>(e.index);
            if (!e.done) {
              if (e.chunk.text.empty() && e.chunk.logprobs.empty()) continue;
              const ojson lp = logprobs_json(job, e.chunk.logprobs, st->text_offset[i]);
              st->text_offset[i] += e.chunk.text.size();
              if (lp.is_null()) {
                // The common chunk (text only): the fixed parts were serialized once.
                out += st->text_head[i];
                out += dump(ojson(e.chunk.text));
                out += st->text_tail;
                continue;
              }
              const ojson delta = job.chat ? ojson{{"content", e.chunk.text}} : ojson(e.chunk.text);
              out += "data: " + dump(chunk_json(job, id, created, e.index, delta, lp, nullptr)) + "\n\n";
              continue;
            }
            const TextResult& r = e.result;
            st->completion += r.completion_tokens;
            if (r.finish_reason == "error" || r.finish_reason == "cancelled") {
              const ApiError err{500, r.finish_reason == "error" ? "generation failed: " + r.error
                                                                 : "the server is shutting down",
                                 "server_error", "", ""};
              out += "data: " + dump(error_body(err)) + "\n\n";
              continue;
            }
            const ojson delta = job.chat ? ojson::object() : ojson("");
            out += "data: " + dump(chunk_json(job, id, created, e.index, delta, nullptr, r.finish_reason)) + "\n\n";
          }
          if (all_done) {
            if (job.include_usage) {
              ojson u = {{"id", id}, {"object", job.chat ? "chat.completion.chunk" : "text_completion"},
                         {"created", created}, {"model", opt.model_name}, {"choices", ojson::array()},
                         {"usage", usage_json(static_cast<int64_t>(job.request.prompt_ids.size()), st->completion)}};
              out += "data: " + dump(u) + "\n\n";
            }
            out += "data: [DONE]\n\n";
          }
          if (!out.empty() && !write(out)) {
            cancel(*ex);  // the client went away: free its sequences now
            return false;
          }
          if (all_done) {
            st->finished = true;
            sink.done();
          }
          return true;
        },
        [this, ex, st](bool success) {
          --active_streams;
          if (!success || !st->finished) cancel(*ex);
        });
  }

  // ---- other routes

  std::string metrics_text() {
    const SchedulerStats s = pipeline.scheduler().stats();
    std::string out;
    auto metric = [&](const char* name, const char* type, const char* help) {
      out += fmt::format("# HELP {} {}\n# TYPE {} {}\n", name, help, name, type);
    };
    metric("sparsa_requests_total", "counter", "HTTP requests answered, by route and status code.");
    {
      std::lock_guard<std::mutex> lock(metrics_mutex);
      for (const auto& [key, n] : requests)
        out += fmt::format("sparsa_requests_total{{route=\"{}\",code=\"{}\"}} {}\n", key.first, key.second, n);
    }
    metric("sparsa_sequences_submitted_total", "counter", "Sequences queued (one per choice).");
    out += fmt::format("sparsa_sequences_submitted_total {}\n", s.submitted);
    metric("sparsa_sequences_cancelled_total", "counter", "Sequences cancelled (client gone or shutdown).");
    out += fmt::format("sparsa_sequences_cancelled_total {}\n", s.cancelled);
    metric("sparsa_prompt_tokens_total", "counter", "Prompt tokens prefilled.");
    out += fmt::format("sparsa_prompt_tokens_total {}\n", s.prompt_tokens);
    metric("sparsa_generation_tokens_total", "counter", "Tokens generated.");
    out += fmt::format("sparsa_generation_tokens_total {}\n", s.generated_tokens);
    metric("sparsa_batch_steps_total", "counter", "Batched model steps run.");
    out += fmt::format("sparsa_batch_steps_total {}\n", s.steps);
    metric("sparsa_queue_depth", "gauge", "Sequences waiting for a KV-cache slot.");
    out += fmt::format("sparsa_queue_depth {}\n", s.queued);
    metric("sparsa_running_sequences", "gauge", "Sequences holding a KV-cache slot.");
    out += fmt::format("sparsa_running_sequences {}\n", s.running);
    metric("sparsa_active_streams", "gauge", "Server-sent event streams open.");
    out += fmt::format("sparsa_active_streams {}\n", active_streams.load());
    auto histogram = [&](const char* name, const char* help, const LatencyHistogram& h) {
      metric(name, "histogram", help);
      uint64_t cum = 0;
      for (size_t b = 0; b < h.bounds.size(); ++b) {
        cum += h.counts[b];
        out += fmt::format("{}_bucket{{le=\"{}\"}} {}\n", name, h.bounds[b], cum);
      }
      cum += h.counts.back();
      out += fmt::format("{}_bucket{{le=\"+Inf\"}} {}\n{}_sum {}\n{}_count {}\n", name, cum, name, h.sum, name, h.count);
    };
    histogram("sparsa_time_to_first_token_seconds", "From queueing to the first sampled token.",
              s.time_to_first_token);
    histogram("sparsa_inter_token_latency_seconds", "Between consecutive tokens of a sequence.",
              s.inter_token_latency);
    return out;
  }

  static std::string route_of(const std::string& path) {
    static const char* kRoutes[] = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics"};
    for (const char* r : kRoutes)
      if (path == r) return r;
    return "other";
  }

  bool authorized(const httplib::Request& req) const {
    if (opt.api_key.empty()) return true;
    const std::string want = "Bearer " + opt.api_key;
    const std::string got = req.get_header_value("Authorization");
    // Compared in time independent of where they differ.
    unsigned diff = got.size() != want.size();
    for (size_t i = 0; i < want.size(); ++i) diff |= static_cast<unsigned>(want[i] ^ (i < got.size() ? got[i] : 0));
    return diff == 0;
  }

  // Wraps a handler: every ApiError or exception becomes an OpenAI-style error response.
  template <typename F>
  httplib::Server::Handler guarded(F f) {
    return [this, f](const httplib::Request& req, httplib::Response& res) {
      try {
        f(req, res);
      } catch (const ApiError& e) {
        send_error(res, e);
      } catch (const std::exception& e) {
        send_error(res, {500, fmt::format("internal error: {}", e.what()), "server_error", "", ""});
      }
    };
  }

  void setup() {
    const int threads = opt.http_threads > 0
                            ? opt.http_threads
                            : std::min(1024, pipeline.engine().max_sequences() + 64 + 16);
    http.new_task_queue = [threads] { return new httplib::ThreadPool(static_cast<size_t>(threads)); };
    http.set_payload_max_length(opt.max_body_bytes);
    http.set_read_timeout(10, 0);
    http.set_write_timeout(10, 0);
    http.set_tcp_nodelay(true);
    // A client keeps its connection for many requests (httplib's default closes it after 5).
    http.set_keep_alive_max_count(100000);
    // httplib listens with a backlog of 5: a burst of new connections (many clients starting at
    // once) overflows it, and each dropped SYN costs the client a retransmission a second later.
    // The listening socket is remembered here and given a full backlog in bind().
    http.set_socket_options([this](socket_t sock) {
      httplib::default_socket_options(sock);
      listen_fd = sock;
    });

    http.set_pre_routing_handler([this](const httplib::Request& req, httplib::Response& res) {
      size_t bytes = 0;
      for (const auto& [k, v] : req.headers) bytes += k.size() + v.size() + 4;
      if (req.headers.size() > opt.max_header_count || bytes > opt.max_header_bytes) {
        send_error(res, {431, fmt::format("request headers too large: {} headers, {} bytes (limits {} and {})",
                                          req.headers.size(), bytes, opt.max_header_count, opt.max_header_bytes),
                         "invalid_request_error", "", "headers_too_large"});
        return httplib::Server::HandlerResponse::Handled;
      }
      if (req.path != "/health" && !authorized(req)) {
        send_error(res, {401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                         "invalid_request_error", "", "invalid_api_key"});
        return httplib::Server::HandlerResponse::Handled;
      }
      return httplib::Server::HandlerResponse::Unhandled;
    });
    // httplib's own refusals (unknown route, body too large, bad request line) have no body.
    http.set_error_handler(httplib::Server::HandlerWithResponse(
        [](const httplib::Request& req, httplib::Response& res) {
      if (!res.body.empty() || res.content_provider_) return httplib::Server::HandlerResponse::Unhandled;
      ApiError e{res.status, "", "invalid_request_error", "", ""};
      switch (res.status) {
        case 404: e.message = fmt::format("unknown route: {} {}", req.method, req.path); e.code = "not_found"; break;
        case 413: e.message = "the request body is too large"; e.code = "body_too_large"; break;
        case 414: e.message = "the request URI is too long"; break;
        case 400: e.message = "malformed HTTP request"; break;
        default: e.message = fmt::format("HTTP error {}", res.status);
      }
      if (res.status >= 500) e.type = "server_error";
      send_error(res, e);
      return httplib::Server::HandlerResponse::Handled;
    }));
    http.set_exception_handler([](const httplib::Request&, httplib::Response& res, std::exception_ptr ep) {
      std::string what = "unknown error";
      try {
        if (ep) std::rethrow_exception(ep);
      } catch (const std::exception& e) {
        what = e.what();
      } catch (...) {
      }
      send_error(res, {500, "internal error: " + what, "server_error", "", ""});
    });
    http.set_logger([this](const httplib::Request& req, const httplib::Response& res) {
      std::lock_guard<std::mutex> lock(metrics_mutex);
      ++requests[{route_of(req.path), res.status}];
    });

    http.Get("/health", [](const httplib::Request&, httplib::Response& res) {
      res.set_content("{\"status\":\"ok\"}", "application/json");
    });
    http.Get("/v1/models", guarded([this](const httplib::Request&, httplib::Response& res) {
      const ojson m = {{"id", opt.model_name}, {"object", "model"}, {"created", 0}, {"owned_by", "sparsa"},
                       {"context_length", pipeline.context()}};
      res.set_content(dump({{"object", "list"}, {"data", ojson::array({m})}}), "application/json");
    }));
    http.Get("/metrics", guarded([this](const httplib::Request&, httplib::Response& res) {
      res.set_content(metrics_text(), "text/plain; version=0.0.4");
    }));
    http.Post("/v1/completions", guarded([this](const httplib::Request& req, httplib::Response& res) {
      handle_generate(req, res, false);
    }));
    http.Post("/v1/chat/completions", guarded([this](const httplib::Request& req, httplib::Response& res) {
      handle_generate(req, res, true);
    }));
    for (const char* path : {"/v1/completions", "/v1/chat/completions"})
      http.Get(path, [path](const httplib::Request&, httplib::Response& res) {
        send_error(res, {405, fmt::format("{} only accepts POST", path), "invalid_request_error", "", "method_not_allowed"});
      });
  }
};

Server::Server(pipeline::Pipeline& pipeline, const ServerOptions& options)
    : impl_(std::make_unique<Impl>(pipeline, options)) {
  impl_->setup();
}

Server::~Server() { stop(); }

int Server::bind() {
  // A client that disconnects makes a later write fail with EPIPE; without this the signal
  // would end the process.
  ::signal(SIGPIPE, SIG_IGN);
  const ServerOptions& o = impl_->opt;
  SPARSA_CHECK(o.port >= 0 && o.port <= 65535, "port must be in [0, 65535], got {}", o.port);
  int port = o.port;
  if (o.port == 0) {
    port = impl_->http.bind_to_any_port(o.host);
    SPARSA_CHECK(port > 0, "cannot listen on {} (any port)", o.host);
  } else {
    SPARSA_CHECK(impl_->http.bind_to_port(o.host, o.port),
                 "cannot listen on {}:{} (in use, or not an address of this machine)", o.host,
                 o.port);
  }
  // listen() again on a listening socket only changes its backlog.
  if (impl_->listen_fd >= 0) ::listen(impl_->listen_fd, SOMAXCONN);
  return port;
}

void Server::run() { impl_->http.listen_after_bind(); }

void Server::stop() { impl_->http.stop(); }

}  // namespace sparsa::server
