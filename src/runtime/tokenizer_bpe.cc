#include "runtime/tokenizer_bpe.h"

#include <algorithm>

#include "runtime/tokenizer_text.h"

namespace sparsa::tokenizer_detail {

BpeModel::BpeModel(StringMap<int32_t> vocab, Options options)
    : vocab_(std::move(vocab)), options_(options), byte_ids_(256, -1) {
  if (options_.byte_fallback) {
    for (int b = 0; b < 256; ++b) {
      if (auto id = find(byte_token_name(static_cast<uint8_t>(b)))) byte_ids_[b] = *id;
    }
  }
}

std::string BpeModel::byte_token_name(uint8_t b) {
  static constexpr char kHex[] = "0123456789ABCDEF";
  return std::string{'<', '0', 'x', kHex[b >> 4], kHex[b & 15], '>'};
}

bool BpeModel::add_merge(int32_t left, int32_t right, int32_t merged) {
  const auto [it, inserted] =
      merges_.insert_or_assign(pair_key(left, right), Merge{next_rank_++, merged});
  return inserted;
}

std::optional<int32_t> BpeModel::find(std::string_view token) const {
  const auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

void BpeModel::tokenize(std::string_view word, std::vector<int32_t>& ids) const {
  if (word.empty()) return;
  const bool cacheable = word.size() <= kMaxCachedWordBytes;
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    const auto it = cache_.find(word);
    if (it != cache_.end()) {
      ids.insert(ids.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  if (options_.ignore_merges) {
    if (auto id = find(word)) {
      ids.push_back(*id);
      return;
    }
  }
  const size_t first = ids.size();
  merge_word(word, ids);
  if (cacheable) {
    std::lock_guard<std::mutex> lock(cache_mutex_);
    if (cache_.size() < kMaxCacheEntries) {
      cache_.emplace(std::string(word), std::vector<int32_t>(ids.begin() + first, ids.end()));
    }
  }
}

void BpeModel::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  struct Symbol {
    int32_t id;  // -1 once merged into its left neighbour
    int32_t prev;
    int32_t next;
  };
  std::vector<Symbol> symbols;
  symbols.reserve(word.size());
  const auto push = [&](int32_t id) {
    const auto index = static_cast<int32_t>(symbols.size());
    symbols.push_back({id, index - 1, -1});
    if (index > 0) symbols[index - 1].next = index;
  };
  bool after_unk = false;
  for (size_t i = 0; i < word.size();) {
    const std::string_view ch = word.substr(i, next_utf8_char(word.substr(i)).length);
    i += ch.size();
    if (auto id = find(ch)) {
      push(*id);
      after_unk = false;
      continue;
    }
    if (options_.byte_fallback &&
        std::all_of(ch.begin(), ch.end(), [&](char b) { return byte_ids_[uint8_t(b)] >= 0; })) {
      for (char b : ch) push(byte_ids_[static_cast<uint8_t>(b)]);
      after_unk = false;
      continue;
    }
    if (options_.unk_id) {
      if (!(options_.fuse_unk && after_unk)) push(*options_.unk_id);
      after_unk = true;
    }
  }
  if (symbols.empty()) return;

  struct Candidate {
    int32_t rank;
    int32_t pos;
    int32_t id;
  };
  const auto later = [](const Candidate& a, const Candidate& b) {
    return a.rank != b.rank ? a.rank > b.rank : a.pos > b.pos;
  };
  std::vector<Candidate> heap;
  heap.reserve(symbols.size());
  const auto consider = [&](int32_t pos) {
    const int32_t next = symbols[pos].next;
    if (next < 0) return;
    const auto it = merges_.find(pair_key(symbols[pos].id, symbols[next].id));
    if (it == merges_.end()) return;
    heap.push_back({it->second.rank, pos, it->second.id});
    std::push_heap(heap.begin(), heap.end(), later);
  };
  for (int32_t pos = 0; pos + 1 < static_cast<int32_t>(symbols.size()); ++pos) consider(pos);

  while (!heap.empty()) {
    std::pop_heap(heap.begin(), heap.end(), later);
    const Candidate top = heap.back();
    heap.pop_back();
    Symbol& left = symbols[top.pos];
    if (left.id < 0 || left.next < 0) continue;
    const int32_t right = left.next;
    // Stale when either side changed since the candidate was queued.
    const auto it = merges_.find(pair_key(left.id, symbols[right].id));
    if (it == merges_.end() || it->second.id != top.id) continue;
    left.id = top.id;
    left.next = symbols[right].next;
    if (left.next >= 0) symbols[left.next].prev = top.pos;
    symbols[right].id = -1;
    if (left.prev >= 0) consider(left.prev);
    consider(top.pos);
  }
  for (int32_t pos = 0; pos >= 0; pos = symbols[pos].next) out.push_back(symbols[pos].id);
}

}  // namespace sparsa::tokenizer_detail
