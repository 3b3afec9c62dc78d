// Byte-level BPE tokenizer read from a Hugging Face `tokenizer.json` (GPT-2, Llama-3, Qwen2 and
// Mistral-style files).
//
//   auto tok = sparsa::Tokenizer::from_file("models/tiny/tokenizer.json");
//   std::vector<int32_t> ids = tok.encode("Hello world");      // BOS added per post_processor
//   std::string text = tok.decode(ids);                          // special tokens skipped
//
//   sparsa::StreamDecoder stream(tok);                           // incremental, UTF-8 safe
//   for (int32_t id : generated) std::cout << stream.push(id);
//   std::cout << stream.flush();
//
// Ids match Hugging Face `tokenizers` for the parts it reads: the BPE model (merges as pairs or
// as "a b" strings, ignore_merges, unk_token, byte_fallback), added tokens (lstrip, rstrip,
// single_word), the pre-tokenizers ByteLevel, Split, Digits and Sequence, a null normalizer,
// the TemplateProcessing and ByteLevel post-processors and the ByteLevel decoder. Any other
// component is refused at load time with an error naming its field. Text that is not valid UTF-8
// is encoded byte for byte rather than refused.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

namespace sparsa {

class Tokenizer {
 public:
  /// Parses and validates `path`; throws sparsa::Error naming the file and what is wrong.
  static Tokenizer from_file(const std::string& path);
  static Tokenizer from_json(const std::string& json_text, const std::string& source_name);

  Tokenizer();
  ~Tokenizer();
  Tokenizer(Tokenizer&&) noexcept;
  Tokenizer& operator=(Tokenizer&&) noexcept;

  /// Text to ids. Added/special tokens written literally in `text` map to their ids; with
  /// `add_special_tokens` the post-processor's template is applied (e.g. BOS in front).
  std::vector<int32_t> encode(std::string_view text, bool add_special_tokens = true) const;
  /// Ids to text; special tokens are dropped when `skip_special_tokens`.
  std::string decode(const std::vector<int32_t>& ids, bool skip_special_tokens = true) const;
  /// The raw bytes one token stands for (special tokens: their content).
  std::string token_bytes(int32_t id) const;
  bool is_special(int32_t id) const;
  /// Whether `id` names a token; decode() skips ids that do not (e.g. padding rows of a model's
  /// embedding beyond the tokenizer's vocabulary).
  bool has_id(int32_t id) const;
  std::optional<int32_t> token_to_id(std::string_view token) const;
  int32_t vocab_size() const;
  /// The BOS id the post-processor adds, if any.
  std::optional<int32_t> bos_id() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

/// Turns a stream of ids into text pieces without ever emitting part of a UTF-8 character:
/// bytes of an unfinished character wait for the next id.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens = true);
  /// The text that became complete with `id` (possibly empty).
  std::string push(int32_t id);
  /// Whatever is still pending (an incomplete character is emitted as U+FFFD).
  std::string flush();

 private:
  const Tokenizer* tokenizer_;
  bool skip_special_;
  std::string pending_;
};

}  // namespace sparsa
