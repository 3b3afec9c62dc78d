// Errors are values a user can read: every failure names the file, tensor or field at fault.
//
//   SPARSA_CHECK(n <= limit, "{}: header length {} exceeds {}", path, n, limit);
//   throw sparsa::Error(fmt::format("{}: unknown dtype '{}'", path, s));
#pragma once

#include <fmt/format.h>

#include <stdexcept>
#include <string>

namespace sparsa {

/// The one exception type of the library. `what()` is a complete sentence for the user.
class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

template <typename... Args>
[[noreturn]] void fail(fmt::format_string<Args...> format, Args&&... args) {
  throw Error(fmt::format(format, std::forward<Args>(args)...));
}

}  // namespace sparsa

/// Throws sparsa::Error with a formatted message when `cond` is false.
#define SPARSA_CHECK(cond, ...)       \
  do {                                \
    if (!(cond)) ::sparsa::fail(__VA_ARGS__); \
  } while (0)
