// Shared helpers for the tests: where fixtures live, and the ../shared data that some tests need.
#pragma once

#include <gtest/gtest.h>

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

}  // namespace sparsa::testing

/// Skips the test when ../shared is missing, except in CI (CI=true), where that is a failure.
#define SPARSA_REQUIRE_SHARED()                                                        \
  do {                                                                                 \
    if (::sparsa::testing::shared_dir().empty()) {                                     \
      if (::sparsa::testing::in_ci()) FAIL() << "../shared is missing (required in CI)"; \
      GTEST_SKIP() << "../shared is absent: skipped";                                  \
    }                                                                                  \
  } while (0)
