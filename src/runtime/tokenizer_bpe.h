// The BPE model of a Hugging Face tokenizer: one pre-token in, ids out.
//
// Merges are applied by rank, lowest first and leftmost among equals, through a min-heap over a
// linked list of symbols: O(n log n) for a pre-token of n characters, so long runs (a line of
// 10k spaces) stay cheap. Results for short pre-tokens are cached, as real text repeats words.
#pragma once

#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace sparsa::tokenizer_detail {

struct StringHash {
  using is_transparent = void;
  size_t operator()(std::string_view s) const { return std::hash<std::string_view>{}(s); }
};

template <typename V>
using StringMap = std::unordered_map<std::string, V, StringHash, std::equal_to<>>;

class BpeModel {
 public:
  struct Options {
    bool ignore_merges = false;     // a pre-token found whole in the vocab is emitted as is
    std::optional<int32_t> unk_id;  // for characters outside the vocab; dropped when unset
    bool fuse_unk = false;          // consecutive unknown characters give one unk
    bool byte_fallback = false;     // unknown characters as <0xXX> byte tokens when present
  };

  BpeModel(StringMap<int32_t> vocab, Options options);
  BpeModel(const BpeModel&) = delete;
  BpeModel& operator=(const BpeModel&) = delete;

  /// Registers the merge of the next rank. Returns false when the pair was already listed: the
  /// later rank wins then, as in `tokenizers`.
  bool add_merge(int32_t left, int32_t right, int32_t merged);

  std::optional<int32_t> find(std::string_view token) const;
  /// The name of byte `b`'s fallback token, "<0x0A>" for a newline.
  static std::string byte_token_name(uint8_t b);
  const StringMap<int32_t>& vocab() const { return vocab_; }

  /// Appends the ids of `word` (one pre-token, already in the model's alphabet).
  void tokenize(std::string_view word, std::vector<int32_t>& ids) const;

 private:
  struct Merge {
    int32_t rank;
    int32_t id;
  };
  static uint64_t pair_key(int32_t left, int32_t right) {
    return (static_cast<uint64_t>(static_cast<uint32_t>(left)) << 32) |
           static_cast<uint32_t>(right);
  }
  void merge_word(std::string_view word, std::vector<int32_t>& ids) const;

  StringMap<int32_t> vocab_;
  Options options_;
  std::unordered_map<uint64_t, Merge> merges_;
  int32_t next_rank_ = 0;
  std::vector<int32_t> byte_ids_;  // <0xXX> token per byte, -1 when absent

  static constexpr size_t kMaxCachedWordBytes = 64;
  static constexpr size_t kMaxCacheEntries = size_t{1} << 18;
  mutable std::mutex cache_mutex_;
  mutable StringMap<std::vector<int32_t>> cache_;
};

}  // namespace sparsa::tokenizer_detail
