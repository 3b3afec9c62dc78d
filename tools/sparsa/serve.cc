// `sparsa serve MODEL`: the OpenAI-compatible HTTP server (sparsa/server/server.h). Registered
// by main.cc through add_serve_command(); built only when cpp-httplib is available.
#include <CLI/CLI.hpp>
#include <fmt/format.h>
#include <signal.h>

#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>

#include "sparsa/core/cpu.h"
#include "sparsa/core/error.h"
#include "sparsa/pipeline/pipeline.h"
#include "sparsa/server/server.h"

extern const char* const kNoMmapHelp;  // tools/sparsa/main.cc
extern const char* const kKvCacheHelp;  // tools/sparsa/main.cc
sparsa::DType parse_kv_cache(const std::string& name);  // tools/sparsa/main.cc

namespace {

struct ServeArgs {
  std::string model;
  sparsa::server::ServerOptions server;
  int max_seqs = 8;
  int queue = 64;
  int64_t ctx = 0;
  int threads = 0;
  int64_t prefill_tokens = 256;
  bool no_mmap = false;
  std::string kv_cache = "f32";
};

int run_serve(const ServeArgs& a, const std::string& isa) {
  if (!isa.empty()) sparsa::set_active_isa(sparsa::parse_isa(isa));
  // SIGINT and SIGTERM are taken by one thread (below) that stops the server; every thread
  // started from here on inherits the blocked mask.
  sigset_t stop_signals;
  sigemptyset(&stop_signals);
  sigaddset(&stop_signals, SIGINT);
  sigaddset(&stop_signals, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &stop_signals, nullptr);

  sparsa::pipeline::PipelineOptions opt;
  if (a.no_mmap) opt.load.file_access = sparsa::FileAccess::kRead;
  opt.engine.max_sequences = a.max_seqs;
  opt.engine.context = a.ctx;
  opt.engine.threads = a.threads;
  opt.engine.kv_cache = parse_kv_cache(a.kv_cache);
  opt.scheduler.max_queue = a.queue;
  opt.scheduler.prefill_tokens = a.prefill_tokens;
  auto pipeline = sparsa::pipeline::Pipeline::load(a.model, opt);
  sparsa::server::ServerOptions so = a.server;
  if (so.model_name.empty()) so.model_name = a.model;
  sparsa::server::Server server(*pipeline, so);
  const int port = server.bind();
  std::thread stopper([&] {
    int sig = 0;
    sigwait(&stop_signals, &sig);
    server.stop();
  });
  std::printf("sparsa serve: listening on http://%s:%d (model '%s', %d sequences, queue %d, context %lld)\n",
              so.host.c_str(), port, so.model_name.c_str(), a.max_seqs, a.queue,
              static_cast<long long>(pipeline->context()));
  std::fflush(stdout);
  server.run();
  // run() also returns when listening fails; make sure the stopper thread can end.
  pthread_kill(stopper.native_handle(), SIGTERM);
  stopper.join();
  std::fprintf(stderr, "sparsa serve: stopped\n");
  return 0;
}

}  // namespace

void add_serve_command(CLI::App& app) {
  auto args = std::make_shared<ServeArgs>();
  auto* cmd = app.add_subcommand("serve", "OpenAI-compatible HTTP server with continuous batching");
  cmd->add_option("model", args->model, "model directory")->required();
  cmd->add_option("--host", args->server.host, "address to listen on")->capture_default_str();
  cmd->add_option("--port", args->server.port, "port (0: any free port)")->capture_default_str();
  cmd->add_option("--api-key", args->server.api_key,
                  "require 'Authorization: Bearer KEY' on every route but /health");
  cmd->add_option("--max-seqs", args->max_seqs, "sequences decoded together (KV-cache slots)")
      ->capture_default_str();
  cmd->add_option("--queue", args->queue, "requests waiting for a slot at most (more: 429)")
      ->capture_default_str();
  cmd->add_option("--ctx", args->ctx, "tokens per sequence (default: the model's context)");
  cmd->add_option("-t,--threads", args->threads, "threads running the model (default: all cores)");
  cmd->add_flag("--no-mmap", args->no_mmap, kNoMmapHelp);
  cmd->add_option("--kv-cache", args->kv_cache, kKvCacheHelp)
      ->check(CLI::IsMember({"f32", "bf16", "int8"}))
      ->capture_default_str();
  cmd->add_option("--model-name", args->server.model_name,
                  "model id clients must send (default: the model directory as given)");
  cmd->add_option("--max-n", args->server.max_n, "choices per request at most")->capture_default_str();
  cmd->add_option("--prefill-tokens", args->prefill_tokens,
                  "prompt tokens per batched step at most")->capture_default_str();
  cmd->callback([args, &app] {
    std::string isa;
    if (const CLI::Option* o = app.get_option_no_throw("--isa"); o != nullptr && o->count() > 0)
      isa = o->as<std::string>();
    int code = 1;
    try {
      code = run_serve(*args, isa);
    } catch (const std::exception& e) {
      std::fflush(stdout);
      std::fprintf(stderr, "error: %s\n", e.what());
    }
    std::exit(code);
  });
}
