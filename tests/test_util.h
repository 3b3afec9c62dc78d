// Shared helpers for the tests: where fixtures live, and the ../shared data that some tests need.
#pragma once

#include <gtest/gtest.h>

#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <string>

namespace sparsa::testing {

inline std::string source_dir() { return SPARSA_SOURCE_DIR; }
inline std::string tiny_model_dir() { return source_dir() + "/models/tiny"; }
inline std::string fixtures_dir() { return source_dir() + "/tests/fixtures"; }
inline std::string cli_path() { return SPARSA_CLI_PATH; }

/// ../shared beside the checkout, or $SPARSA_SHARED; empty when absent.
inline std::string shared_dir() {
  if (const char* env = std::getenv("SPARSA_SHARED"); env != nullptr && *env != '\0') return env;
  const std::filesystem::path p = std::filesystem::path(source_dir()).parent_path() / "shared";
  return std::filesystem::exists(p / "README.md") ? p.string() : std::string();
}

inline bool in_ci() {
  const char* ci = std::getenv("CI");
  return ci != nullptr && std::string(ci) == "true";
}

/// The exit code and output (stdout and stderr together) of one `sparsa` command line.
struct CliRun {
  int code = -1;
  std::string out;
};

inline CliRun run_cli(const std::string& args) {
  const std::string cmd = cli_path() + " " + args + " 2>&1";
  CliRun r;
  FILE* p = ::popen(cmd.c_str(), "r");
  if (p == nullptr) return r;
  std::array<char, 4096> buf{};
  size_t n;
  while ((n = std::fread(buf.data(), 1, buf.size(), p)) > 0) r.out.append(buf.data(), n);
  const int status = ::pclose(p);
  r.code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return r;
}

}  // namespace sparsa::testing

/// Skips the test when ../shared is missing, except in CI (CI=true), where that is a failure.
#define SPARSA_REQUIRE_SHARED()                                                        \
  do {                                                                                 \
    if (::sparsa::testing::shared_dir().empty()) {                                     \
      if (::sparsa::testing::in_ci()) FAIL() << "../shared is missing (required in CI)"; \
      GTEST_SKIP() << "../shared is absent: skipped";                                  \
    }                                                                                  \
  } while (0)
