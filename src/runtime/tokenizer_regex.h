// A compiled PCRE2 pattern (UTF-8, Unicode properties, JIT when available) for pre-tokenizers.
#pragma once

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <cstddef>
#include <string>
#include <string_view>

namespace sparsa::tokenizer_detail {

class TokenizerRegex {
 public:
  /// `literal`: `pattern` is plain text rather than a regex. `context` starts every error message
  /// (e.g. "models/x/tokenizer.json: pre_tokenizer.pretokenizers[0].pattern.Regex").
  TokenizerRegex(std::string_view pattern, bool literal, std::string context);
  ~TokenizerRegex();
  TokenizerRegex(const TokenizerRegex&) = delete;
  TokenizerRegex& operator=(const TokenizerRegex&) = delete;

  /// The next match at or after `cursor`, as [begin, end); moves `cursor` on. Matches come as
  /// Oniguruma's iterator gives them (the engine Hugging Face `tokenizers` uses): an empty match
  /// counts, and the search then resumes one character later. Bytes that are not valid UTF-8
  /// never match but do not stop the search.
  bool next_match(std::string_view text, size_t& cursor, size_t& begin, size_t& end) const;

  /// Whether the pattern matches at offset 0 of `text`.
  bool matches_at_start(std::string_view text) const;

 private:
  pcre2_code* code_ = nullptr;
  std::string context_;
};

}  // namespace sparsa::tokenizer_detail
