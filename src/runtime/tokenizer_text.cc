#include "runtime/tokenizer_text.h"

namespace sparsa::tokenizer_detail {

Utf8Char next_utf8_char(std::string_view text) {
  const auto byte = [&](size_t i) { return static_cast<uint8_t>(text[i]); };
  const uint8_t b0 = byte(0);
  if (b0 < 0x80) return {Utf8Status::kValid, 1, b0};
  size_t need;
  char32_t cp;
  uint8_t lo = 0x80, hi = 0xBF;  // allowed range of the second byte
  if (b0 >= 0xC2 && b0 <= 0xDF) {
    need = 1;
    cp = b0 & 0x1F;
  } else if (b0 >= 0xE0 && b0 <= 0xEF) {
    need = 2;
    cp = b0 & 0x0F;
    if (b0 == 0xE0) lo = 0xA0;  // overlong
    if (b0 == 0xED) hi = 0x9F;  // surrogates
  } else if (b0 >= 0xF0 && b0 <= 0xF4) {
    need = 3;
    cp = b0 & 0x07;
    if (b0 == 0xF0) lo = 0x90;  // overlong
    if (b0 == 0xF4) hi = 0x8F;  // above U+10FFFF
  } else {
    return {Utf8Status::kInvalid, 1, 0};
  }
  for (size_t k = 1; k <= need; ++k) {
    if (k >= text.size()) return {Utf8Status::kIncomplete, k, 0};
    const uint8_t b = byte(k);
    if (b < lo || b > hi) return {Utf8Status::kInvalid, k, 0};
    cp = (cp << 6) | (b & 0x3F);
    lo = 0x80;
    hi = 0xBF;
  }
  return {Utf8Status::kValid, need + 1, cp};
}

size_t previous_utf8_char(std::string_view text, size_t pos) {
  const size_t floor = pos >= 4 ? pos - 4 : 0;
  for (size_t start = pos - 1;; --start) {
    if ((static_cast<uint8_t>(text[start]) & 0xC0) != 0x80) {
      const Utf8Char c = next_utf8_char(text.substr(start, pos - start));
      return c.status == Utf8Status::kValid && c.length == pos - start ? start : pos - 1;
    }
    if (start == floor) return pos - 1;
  }
}

void append_utf8(char32_t cp, std::string& out) {
  if (cp < 0x80) {
    out.push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out.push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out.push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out.push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

void append_utf8_lossy(std::string_view bytes, std::string& out) {
  size_t i = 0;
  while (i < bytes.size()) {
    size_t ascii = i;
    while (ascii < bytes.size() && static_cast<uint8_t>(bytes[ascii]) < 0x80) ++ascii;
    out.append(bytes.substr(i, ascii - i));
    i = ascii;
    if (i == bytes.size()) break;
    const Utf8Char c = next_utf8_char(bytes.substr(i));
    if (c.status == Utf8Status::kValid) {
      out.append(bytes.substr(i, c.length));
    } else {
      out.append("\xEF\xBF\xBD");
    }
    i += c.length;
  }
}

size_t incomplete_utf8_suffix(std::string_view bytes) {
  for (size_t k = 1; k <= 3 && k <= bytes.size(); ++k) {
    const size_t start = bytes.size() - k;
    const uint8_t b = static_cast<uint8_t>(bytes[start]);
    if ((b & 0xC0) == 0x80) continue;
    const Utf8Char c = next_utf8_char(bytes.substr(start));
    return c.status == Utf8Status::kIncomplete && c.length == k ? k : 0;
  }
  return 0;
}

bool is_white_space(char32_t cp) {
  if (cp <= 0x20) return cp == 0x20 || (cp >= 0x09 && cp <= 0x0D);
  if (cp < 0x85) return false;
  return cp == 0x85 || cp == 0xA0 || cp == 0x1680 || (cp >= 0x2000 && cp <= 0x200A) ||
         cp == 0x2028 || cp == 0x2029 || cp == 0x202F || cp == 0x205F || cp == 0x3000;
}

const ByteLevelAlphabet& ByteLevelAlphabet::get() {
  static const ByteLevelAlphabet alphabet;
  return alphabet;
}

ByteLevelAlphabet::ByteLevelAlphabet() {
  byte_of_.fill(-1);
  char32_t next_extra = 256;
  for (int b = 0; b < 256; ++b) {
    const bool printable = (b >= '!' && b <= '~') || (b >= 0xA1 && b <= 0xAC) || b >= 0xAE;
    const char32_t cp = printable ? static_cast<char32_t>(b) : next_extra++;
    std::string s;
    append_utf8(cp, s);
    utf8_length_[b] = static_cast<uint8_t>(s.size());
    for (size_t k = 0; k < s.size(); ++k) utf8_[b][k] = s[k];
    byte_of_[cp] = static_cast<int16_t>(b);
  }
}

void ByteLevelAlphabet::encode(std::string_view bytes, std::string& out) const {
  out.reserve(out.size() + bytes.size() + bytes.size() / 4);
  for (char c : bytes) {
    const uint8_t b = static_cast<uint8_t>(c);
    out.append(utf8_[b].data(), utf8_length_[b]);
  }
}

bool ByteLevelAlphabet::decode(std::string_view token, std::string& out) const {
  const size_t old_size = out.size();
  size_t i = 0;
  while (i < token.size()) {
    const Utf8Char c = next_utf8_char(token.substr(i));
    if (c.status != Utf8Status::kValid || c.code_point >= kCodePoints ||
        byte_of_[c.code_point] < 0) {
      out.resize(old_size);
      return false;
    }
    out.push_back(static_cast<char>(byte_of_[c.code_point]));
    i += c.length;
  }
  return true;
}

}  // namespace sparsa::tokenizer_detail
