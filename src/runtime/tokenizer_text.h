// UTF-8 and GPT-2 byte-level helpers shared by the pieces of the tokenizer.
#pragma once

#include <array>
#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

namespace sparsa::tokenizer_detail {

enum class Utf8Status { kValid, kInvalid, kIncomplete };

struct Utf8Char {
  Utf8Status status;
  /// Bytes taken: the character, or the maximal ill-formed subpart (Unicode 3.9, "U+FFFD
  /// substitution of maximal subparts", which is also what Rust's from_utf8_lossy does).
  size_t length;
  char32_t code_point;  // meaningful only when status == kValid
};

/// The character that starts `text` (non-empty).
Utf8Char next_utf8_char(std::string_view text);

/// Start of the character that ends just before `pos` (pos > 0); ill-formed bytes count alone.
size_t previous_utf8_char(std::string_view text, size_t pos);

void append_utf8(char32_t code_point, std::string& out);

/// Appends `bytes` with every ill-formed subpart, including a cut-off final character, replaced
/// by U+FFFD.
void append_utf8_lossy(std::string_view bytes, std::string& out);

/// Length of the suffix of `bytes` that is the start of a character still missing bytes.
size_t incomplete_utf8_suffix(std::string_view bytes);

/// The Unicode White_Space property (what Rust's `char::is_whitespace` and `\s` test).
bool is_white_space(char32_t code_point);

/// GPT-2's byte-to-unicode table: every byte shown as a printable character, so that BPE over
/// characters covers arbitrary bytes. Printable Latin-1 bytes stand for themselves; the other 68
/// bytes take U+0100 upwards in byte order (space becomes 'Ġ', newline 'Ċ').
class ByteLevelAlphabet {
 public:
  static const ByteLevelAlphabet& get();

  /// Appends the characters for `bytes`.
  void encode(std::string_view bytes, std::string& out) const;
  /// Appends the bytes `token` stands for; false (leaving `out` as it was) when a character of
  /// `token` is not in the alphabet.
  bool decode(std::string_view token, std::string& out) const;

 private:
  ByteLevelAlphabet();

  static constexpr int kCodePoints = 256 + 68;
  std::array<std::array<char, 2>, 256> utf8_{};  // bytes of each character; all take 1 or 2
  std::array<uint8_t, 256> utf8_length_{};
  std::array<int16_t, kCodePoints> byte_of_{};  // -1: code point not in the alphabet
};

}  // namespace sparsa::tokenizer_detail
