// An OpenAI-compatible HTTP server over a Pipeline (built only with cpp-httplib; the macro
// SPARSA_HAVE_SERVER says whether it is).
//
//   POST /v1/completions, POST /v1/chat/completions   (stream: true → server-sent events, [DONE])
//   GET  /v1/models, GET /health, GET /metrics (Prometheus text)
//
//   sparsa::server::ServerOptions opt;  opt.port = 0;   // 0: any free port
//   sparsa::server::Server server(*pipeline, opt);
//   int port = server.bind();                           // throws when it cannot bind
//   std::thread t([&] { server.run(); });  ...  server.stop();  t.join();
//
// HTTP threads only validate requests, queue them with the pipeline's scheduler and stream what
// it produces; the model runs on the scheduler's thread. Every error is an OpenAI-style body
// {"error": {"message", "type", "param", "code"}} with a 4xx/5xx status.
#pragma once

#include <cstddef>
#include <memory>
#include <string>

#include "sparsa/pipeline/pipeline.h"

namespace sparsa::server {

struct ServerOptions {
  std::string host = "127.0.0.1";
  int port = 8080;
  std::string api_key;     // when set, every route but /health needs "Authorization: Bearer KEY"
  std::string model_name;  // the id clients must name; empty: "sparsa"
  size_t max_body_bytes = size_t{1} << 20;
  size_t max_header_count = 100;
  size_t max_header_bytes = 32 * 1024;
  int max_n = 4;             // choices per request at most
  int http_threads = 0;      // 0: enough for every running and queued sequence, plus a margin
  int heartbeat_ms = 500;    // SSE comment sent after this long without tokens (finds dead clients)
};

class Server {
 public:
  Server(pipeline::Pipeline& pipeline, const ServerOptions& options);
  ~Server();
  Server(const Server&) = delete;
  Server& operator=(const Server&) = delete;

  /// Binds the listening socket and returns its port. Throws sparsa::Error when it cannot.
  int bind();
  /// Serves until stop() (call bind() first). Blocks.
  void run();
  /// Stops serving; run() returns. Safe from any thread.
  void stop();

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sparsa::server
