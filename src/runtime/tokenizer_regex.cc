#include "runtime/tokenizer_regex.h"

#include <algorithm>

#include "runtime/tokenizer_text.h"
#include "sparsa/core/error.h"

namespace sparsa::tokenizer_detail {
namespace {

std::string pcre2_message(int code) {
  PCRE2_UCHAR buffer[256];
  const int n = pcre2_get_error_message(code, buffer, sizeof(buffer));
  return n < 0 ? fmt::format("PCRE2 error {}", code)
               : std::string(reinterpret_cast<const char*>(buffer), static_cast<size_t>(n));
}

// One match-data block per thread: matching stays const and allocation-free on the hot path.
pcre2_match_data* thread_match_data() {
  struct Holder {
    pcre2_match_data* data = pcre2_match_data_create(1, nullptr);
    ~Holder() { pcre2_match_data_free(data); }
  };
  thread_local Holder holder;
  SPARSA_CHECK(holder.data != nullptr, "tokenizer: out of memory for PCRE2 match data");
  return holder.data;
}

}  // namespace

TokenizerRegex::TokenizerRegex(std::string_view pattern, bool literal, std::string context)
    : context_(std::move(context)) {
  uint32_t options = PCRE2_UTF | PCRE2_MATCH_INVALID_UTF;
  options |= literal ? PCRE2_LITERAL : PCRE2_UCP;  // PCRE2 refuses UCP beside LITERAL
  int error = 0;
  PCRE2_SIZE offset = 0;
  code_ = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(), options,
                        &error, &offset, nullptr);
  SPARSA_CHECK(code_ != nullptr, "{}: bad regex /{}/: {} at offset {}", context_, pattern,
               pcre2_message(error), offset);
  pcre2_jit_compile(code_, PCRE2_JIT_COMPLETE);  // without JIT the interpreter still works
}

TokenizerRegex::~TokenizerRegex() { pcre2_code_free(code_); }

bool TokenizerRegex::next_match(std::string_view text, size_t& cursor, size_t& begin,
                                size_t& end) const {
  if (cursor > text.size()) return false;
  pcre2_match_data* data = thread_match_data();
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), cursor,
                             0, data, nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) {
    cursor = text.size() + 1;
    return false;
  }
  SPARSA_CHECK(rc >= 0, "{}: regex match failed: {}", context_, pcre2_message(rc));
  const PCRE2_SIZE* ovector = pcre2_get_ovector_pointer(data);
  begin = ovector[0];
  end = std::max<size_t>(ovector[0], ovector[1]);
  if (end > begin) {
    cursor = end;
  } else {
    cursor = end < text.size() ? end + next_utf8_char(text.substr(end)).length : text.size() + 1;
  }
  return true;
}

bool TokenizerRegex::matches_at_start(std::string_view text) const {
  pcre2_match_data* data = thread_match_data();
  const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(), 0,
                             PCRE2_ANCHORED, data, nullptr);
  if (rc == PCRE2_ERROR_NOMATCH) return false;
  SPARSA_CHECK(rc >= 0, "{}: regex match failed: {}", context_, pcre2_message(rc));
  return true;
}

}  // namespace sparsa::tokenizer_detail
