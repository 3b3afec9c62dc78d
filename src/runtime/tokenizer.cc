// Byte-level BPE following Hugging Face `tokenizers`: added tokens are cut out of the text first
// (leftmost-longest), each remaining segment goes through the pre-tokenizer chain, each pre-token
// through BPE, and the post-processor's template wraps the result.
#include "sparsa/runtime/tokenizer.h"

#include <algorithm>
#include <array>
#include <nlohmann/json.hpp>
#include <utility>

#include "runtime/tokenizer_bpe.h"
#include "runtime/tokenizer_regex.h"
#include "runtime/tokenizer_text.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"

namespace sparsa {
namespace {

using nlohmann::json;
using tokenizer_detail::BpeModel;
using tokenizer_detail::ByteLevelAlphabet;
using tokenizer_detail::StringMap;
using tokenizer_detail::TokenizerRegex;
using tokenizer_detail::Utf8Status;

constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// ---- Reading fields, with the file and the JSON path in every error ----

std::string field_path(std::string_view parent, std::string_view key) {
  return parent.empty() ? std::string(key) : fmt::format("{}.{}", parent, key);
}

// Absent and null read the same: `tokenizers` writes null for unset options.
const json* optional_field(const json& object, const char* key) {
  const auto it = object.find(key);
  return it == object.end() || it->is_null() ? nullptr : &*it;
}

const json& required_field(const json& object, const char* key, const std::string& source,
                           std::string_view parent) {
  const json* value = optional_field(object, key);
  SPARSA_CHECK(value != nullptr, "{}: {} is missing", source, field_path(parent, key));
  return *value;
}

const json& required_object(const json& object, const char* key, const std::string& source,
                            std::string_view parent) {
  const json& value = required_field(object, key, source, parent);
  SPARSA_CHECK(value.is_object(), "{}: {} is not an object", source, field_path(parent, key));
  return value;
}

const json& required_array(const json& object, const char* key, const std::string& source,
                           std::string_view parent) {
  const json& value = required_field(object, key, source, parent);
  SPARSA_CHECK(value.is_array(), "{}: {} is not an array", source, field_path(parent, key));
  return value;
}

const std::string& required_string(const json& object, const char* key, const std::string& source,
                                   std::string_view parent) {
  const json& value = required_field(object, key, source, parent);
  SPARSA_CHECK(value.is_string(), "{}: {} is not a string", source, field_path(parent, key));
  return value.get_ref<const std::string&>();
}

bool optional_bool(const json& object, const char* key, bool fallback, const std::string& source,
                   std::string_view parent) {
  const json* value = optional_field(object, key);
  if (value == nullptr) return fallback;
  SPARSA_CHECK(value->is_boolean(), "{}: {} is not true or false", source, field_path(parent, key));
  return value->get<bool>();
}

int32_t read_id(const json& value, size_t id_limit, const std::string& source,
                std::string_view where) {
  SPARSA_CHECK(value.is_number_integer(), "{}: {} is not an integer id", source, where);
  const int64_t id = value.get<int64_t>();
  SPARSA_CHECK(id >= 0 && static_cast<uint64_t>(id) < id_limit,
               "{}: {} = {} is out of range: the file holds {} tokens, so ids must lie in "
               "[0, {})",
               source, where, id, id_limit, id_limit);
  return static_cast<int32_t>(id);
}

std::string_view type_of(const json& object, const std::string& source, std::string_view where) {
  SPARSA_CHECK(object.is_object(), "{}: {} is not an object", source, where);
  return required_string(object, "type", source, where);
}

// ---- Added tokens ----

struct AddedToken {
  std::string content;
  int32_t id = 0;
  bool special = false;
  bool single_word = false;
  bool lstrip = false;
  bool rstrip = false;
  bool normalized = true;
};

// Finds added tokens leftmost-longest, as the Aho-Corasick automaton of `tokenizers` does; the
// few candidates per first byte are tried longest first.
class AddedTokenMatcher {
 public:
  struct Match {
    size_t begin;
    size_t end;
    size_t index;  // into the added-token list
  };

  void add(const std::string& content, size_t index) {
    auto& bucket = buckets_[static_cast<uint8_t>(content[0])];
    const auto at = std::find_if(bucket.begin(), bucket.end(), [&](const auto& entry) {
      return entry.first.size() < content.size();
    });
    bucket.insert(at, {content, index});
    ++count_;
  }

  bool empty() const { return count_ == 0; }

  std::optional<Match> find(std::string_view text, size_t from) const {
    for (size_t i = from; i < text.size(); ++i) {
      const auto& bucket = buckets_[static_cast<uint8_t>(text[i])];
      for (const auto& [content, index] : bucket) {
        if (text.compare(i, content.size(), content) == 0)
          return Match{i, i + content.size(), index};
      }
    }
    return std::nullopt;
  }

 private:
  std::array<std::vector<std::pair<std::string, size_t>>, 256> buckets_;
  size_t count_ = 0;
};

// ---- Pre-tokenizers ----

enum class SplitBehavior { kRemoved, kIsolated, kMergedWithPrevious, kMergedWithNext, kContiguous };

struct PreTokenizerStep {
  enum class Kind { kByteLevel, kSplit };
  Kind kind = Kind::kSplit;
  std::unique_ptr<TokenizerRegex> regex;  // ByteLevel: null unless use_regex
  bool add_prefix_space = false;          // ByteLevel
  SplitBehavior behavior = SplitBehavior::kIsolated;
  bool invert = false;
};

struct Span {
  size_t begin;
  size_t end;
  bool is_match;
};

// Cuts `text` at the matches of `regex`, groups the parts as `behavior` says and hands each
// non-empty group to `emit`, without holding them all (a document can be megabytes). Grouping
// follows SplitDelimiterBehavior in `tokenizers`: "the-final--countdown" split on '-' gives
// Removed [the, final, countdown], Isolated [the, -, final, -, -, countdown],
// MergedWithPrevious [the-, final-, -, countdown], MergedWithNext [the, -final, -, -countdown],
// Contiguous [the, -, final, --, countdown].
template <typename Emit>
void split_text(std::string_view text, const TokenizerRegex& regex, SplitBehavior behavior,
                bool invert, Emit&& emit) {
  std::optional<Span> pending;
  bool previous_match = false;
  const auto out = [&](const Span& s) {
    if (s.end > s.begin) emit(text.substr(s.begin, s.end - s.begin));
  };
  const auto add = [&](const Span& s) {
    switch (behavior) {
      case SplitBehavior::kRemoved:
        if (!s.is_match) out(s);
        break;
      case SplitBehavior::kIsolated:
        out(s);
        break;
      case SplitBehavior::kMergedWithPrevious:
        if (s.is_match && !previous_match && pending) {
          pending->end = s.end;
        } else {
          if (pending) out(*pending);
          pending = s;
        }
        break;
      case SplitBehavior::kContiguous:
        if (s.is_match == previous_match && pending) {
          pending->end = s.end;
        } else {
          if (pending) out(*pending);
          pending = s;
        }
        break;
      case SplitBehavior::kMergedWithNext:
        // A match joins the part after it unless that part is a match too.
        if (pending && pending->is_match && !s.is_match) {
          out({pending->begin, s.end, false});
          pending.reset();
        } else {
          if (pending) out(*pending);
          pending = s;
        }
        break;
    }
    previous_match = s.is_match;
  };
  size_t cursor = 0, previous = 0, begin = 0, end = 0;
  while (regex.next_match(text, cursor, begin, end)) {
    if (previous != begin) add({previous, begin, invert});
    add({begin, end, !invert});
    previous = end;
  }
  if (previous != text.size()) add({previous, text.size(), invert});
  if (pending) out(*pending);
}

SplitBehavior parse_behavior(const std::string& name, const std::string& source,
                             std::string_view where) {
  if (name == "Removed") return SplitBehavior::kRemoved;
  if (name == "Isolated") return SplitBehavior::kIsolated;
  if (name == "MergedWithPrevious") return SplitBehavior::kMergedWithPrevious;
  if (name == "MergedWithNext") return SplitBehavior::kMergedWithNext;
  if (name == "Contiguous") return SplitBehavior::kContiguous;
  fail(
      "{}: {}.behavior '{}' is unknown (expected Removed, Isolated, MergedWithPrevious, "
      "MergedWithNext or Contiguous)",
      source, where, name);
}

void parse_pre_tokenizer(const json& config, const std::string& source, const std::string& where,
                         std::vector<PreTokenizerStep>& steps) {
  const std::string_view type = type_of(config, source, where);
  PreTokenizerStep step;
  if (type == "Sequence") {
    const json& list = required_array(config, "pretokenizers", source, where);
    for (size_t i = 0; i < list.size(); ++i) {
      parse_pre_tokenizer(list[i], source, fmt::format("{}.pretokenizers[{}]", where, i), steps);
    }
    return;
  }
  if (type == "ByteLevel") {
    // Defaults are those of `tokenizers`' ByteLevel::default().
    step.kind = PreTokenizerStep::Kind::kByteLevel;
    step.add_prefix_space = optional_bool(config, "add_prefix_space", true, source, where);
    if (optional_bool(config, "use_regex", true, source, where)) {
      step.regex = std::make_unique<TokenizerRegex>(kGpt2Pattern, false, source + ": " + where);
    }
  } else if (type == "Split") {
    const std::string pattern_where = field_path(where, "pattern");
    const json& pattern = required_object(config, "pattern", source, where);
    if (const json* regex = optional_field(pattern, "Regex")) {
      SPARSA_CHECK(regex->is_string(), "{}: {}.Regex is not a string", source, pattern_where);
      step.regex =
          std::make_unique<TokenizerRegex>(regex->get_ref<const std::string&>(), false,
                                           fmt::format("{}: {}.Regex", source, pattern_where));
    } else if (const json* literal = optional_field(pattern, "String")) {
      SPARSA_CHECK(literal->is_string(), "{}: {}.String is not a string", source, pattern_where);
      step.regex =
          std::make_unique<TokenizerRegex>(literal->get_ref<const std::string&>(), true,
                                           fmt::format("{}: {}.String", source, pattern_where));
    } else {
      fail("{}: {} has neither Regex nor String", source, pattern_where);
    }
    step.behavior =
        parse_behavior(required_string(config, "behavior", source, where), source, where);
    step.invert = optional_bool(config, "invert", false, source, where);
  } else if (type == "Digits") {
    step.regex = std::make_unique<TokenizerRegex>(R"(\p{N})", false, source + ": " + where);
    step.behavior = optional_bool(config, "individual_digits", false, source, where)
                        ? SplitBehavior::kIsolated
                        : SplitBehavior::kContiguous;
  } else {
    fail("{}: {} type '{}' is not supported (supported: ByteLevel, Split, Digits, Sequence)",
         source, where, type);
  }
  steps.push_back(std::move(step));
}

// ---- Post-processor: the single-sequence template, as ids before and after the text ----

struct Template {
  std::vector<int32_t> prefix;
  std::vector<int32_t> suffix;
};

std::vector<int32_t> template_special_ids(const json& config, const std::string& name,
                                          size_t id_limit, const std::string& source,
                                          const std::string& where) {
  const json& specials = required_object(config, "special_tokens", source, where);
  const auto it = specials.find(name);
  SPARSA_CHECK(it != specials.end() && it->is_object(),
               "{}: {}.single uses special token '{}', which {}.special_tokens does not define",
               source, where, name, where);
  const std::string entry = fmt::format("{}.special_tokens[\"{}\"]", where, name);
  const json& ids = required_array(*it, "ids", source, entry);
  std::vector<int32_t> out;
  for (size_t i = 0; i < ids.size(); ++i) {
    out.push_back(read_id(ids[i], id_limit, source, fmt::format("{}.ids[{}]", entry, i)));
  }
  return out;
}

void parse_template(const json& config, size_t id_limit, const std::string& source,
                    const std::string& where, Template& result) {
  const json& single = required_field(config, "single", source, where);
  const std::string single_where = field_path(where, "single");
  // Items: (special token name, or empty for the sequence).
  std::vector<std::string> items;
  if (single.is_string()) {
    // The textual form "<s> $A" (type ids after ':' do not matter for ids).
    const std::string& text = single.get_ref<const std::string&>();
    size_t i = 0;
    while (i < text.size()) {
      if (text[i] == ' ') {
        ++i;
        continue;
      }
      size_t end = text.find(' ', i);
      if (end == std::string::npos) end = text.size();
      std::string item = text.substr(i, end - i);
      i = end;
      if (item.starts_with('$')) {
        const std::string seq = item.substr(0, item.find(':'));
        SPARSA_CHECK(seq == "$" || seq == "$A" || seq == "$0",
                     "{}: {} refers to sequence '{}'; only A exists for single sequences", source,
                     single_where, seq);
        items.emplace_back();
      } else {
        const size_t colon = item.rfind(':');
        if (colon != std::string::npos && colon > 0) item.resize(colon);
        items.push_back(item);
      }
    }
  } else {
    SPARSA_CHECK(single.is_array(), "{}: {} is neither a list nor a string", source, single_where);
    for (size_t i = 0; i < single.size(); ++i) {
      const json& item = single[i];
      const std::string item_where = fmt::format("{}[{}]", single_where, i);
      SPARSA_CHECK(item.is_object() && item.size() == 1,
                   "{}: {} is not {{\"SpecialToken\": ...}} or {{\"Sequence\": ...}}", source,
                   item_where);
      if (const json* special = optional_field(item, "SpecialToken")) {
        SPARSA_CHECK(special->is_object(), "{}: {}.SpecialToken is not an object", source,
                     item_where);
        items.push_back(
            required_string(*special, "id", source, field_path(item_where, "SpecialToken")));
      } else if (const json* sequence = optional_field(item, "Sequence")) {
        SPARSA_CHECK(sequence->is_object(), "{}: {}.Sequence is not an object", source, item_where);
        const std::string& seq =
            required_string(*sequence, "id", source, field_path(item_where, "Sequence"));
        SPARSA_CHECK(seq == "A", "{}: {}.Sequence.id is '{}'; only A exists for single sequences",
                     source, item_where, seq);
        items.emplace_back();
      } else {
        fail("{}: {} is not {{\"SpecialToken\": ...}} or {{\"Sequence\": ...}}", source,
             item_where);
      }
    }
  }
  const auto sequences = std::count(items.begin(), items.end(), std::string());
  SPARSA_CHECK(sequences == 1, "{}: {} holds sequence A {} times; expected once", source,
               single_where, sequences);
  Template local;
  bool after = false;
  for (const std::string& item : items) {
    if (item.empty()) {
      after = true;
      continue;
    }
    const std::vector<int32_t> ids = template_special_ids(config, item, id_limit, source, where);
    auto& side = after ? local.suffix : local.prefix;
    side.insert(side.end(), ids.begin(), ids.end());
  }
  // A later processor wraps what the earlier ones produced.
  result.prefix.insert(result.prefix.begin(), local.prefix.begin(), local.prefix.end());
  result.suffix.insert(result.suffix.end(), local.suffix.begin(), local.suffix.end());
}

void parse_post_processor(const json& config, size_t id_limit, const std::string& source,
                          const std::string& where, Template& result) {
  const std::string_view type = type_of(config, source, where);
  if (type == "Sequence") {
    const json& list = required_array(config, "processors", source, where);
    for (size_t i = 0; i < list.size(); ++i) {
      parse_post_processor(list[i], id_limit, source, fmt::format("{}.processors[{}]", where, i),
                           result);
    }
  } else if (type == "TemplateProcessing") {
    parse_template(config, id_limit, source, where, result);
  } else if (type != "ByteLevel") {  // ByteLevel only trims offsets, which we do not report
    fail("{}: {} type '{}' is not supported (supported: TemplateProcessing, ByteLevel, Sequence)",
         source, where, type);
  }
}

void check_decoder(const json& config, const std::string& source, const std::string& where) {
  const std::string_view type = type_of(config, source, where);
  if (type == "Sequence") {
    const json& list = required_array(config, "decoders", source, where);
    for (size_t i = 0; i < list.size(); ++i) {
      check_decoder(list[i], source, fmt::format("{}.decoders[{}]", where, i));
    }
  } else if (type != "ByteLevel") {
    fail("{}: {} type '{}' is not supported (supported: ByteLevel, Sequence)", source, where, type);
  }
}

void check_normalizer(const json& config, const std::string& source, const std::string& where) {
  const std::string_view type = type_of(config, source, where);
  if (type == "Sequence") {
    const json& list = required_array(config, "normalizers", source, where);
    for (size_t i = 0; i < list.size(); ++i) {
      check_normalizer(list[i], source, fmt::format("{}.normalizers[{}]", where, i));
    }
    return;
  }
  fail("{}: {} type '{}' is not supported (only a null normalizer is)", source, where, type);
}

enum class TokenKind : uint8_t { kNone, kModel, kAdded, kSpecial };

}  // namespace

struct Tokenizer::Impl {
  std::string source;
  std::unique_ptr<BpeModel> model;
  std::vector<AddedToken> added;
  StringMap<int32_t> added_ids;
  AddedTokenMatcher raw_matcher;              // tokens matched before normalization
  AddedTokenMatcher normalized_matcher;       // tokens matched after it
  std::unique_ptr<TokenizerRegex> word_char;  // \w, for single_word tokens
  std::vector<PreTokenizerStep> pre_tokenizer;
  Template post;
  std::vector<std::string> bytes_of;  // by id
  std::vector<TokenKind> kind_of;     // by id

  bool is_word_char(std::string_view text, size_t begin) const;
  bool ends_with_word(std::string_view text) const;
  template <typename OnText>
  void split_added(std::string_view text, const AddedTokenMatcher& matcher,
                   std::vector<int32_t>& ids, OnText&& on_text) const;
  void encode_segment(std::string_view segment, std::vector<int32_t>& ids) const;
  void pre_tokenize(size_t step_index, std::string_view piece, std::vector<int32_t>& ids) const;
};

bool Tokenizer::Impl::is_word_char(std::string_view text, size_t begin) const {
  const auto c = tokenizer_detail::next_utf8_char(text.substr(begin));
  if (c.status != Utf8Status::kValid) return false;
  if (c.code_point < 0x80) {
    const char a = static_cast<char>(c.code_point);
    return (a >= '0' && a <= '9') || (a >= 'a' && a <= 'z') || (a >= 'A' && a <= 'Z') || a == '_';
  }
  return word_char->matches_at_start(text.substr(begin, c.length));
}

bool Tokenizer::Impl::ends_with_word(std::string_view text) const {
  return !text.empty() &&
         is_word_char(text, tokenizer_detail::previous_utf8_char(text, text.size()));
}

// Mirrors AddedVocabulary::find_matches: lstrip/rstrip widen a match over the whitespace beside
// it, and a single_word token only counts between non-word characters.
template <typename OnText>
void Tokenizer::Impl::split_added(std::string_view text, const AddedTokenMatcher& matcher,
                                  std::vector<int32_t>& ids, OnText&& on_text) const {
  if (matcher.empty()) {
    on_text(text);
    return;
  }
  size_t done = 0;
  size_t from = 0;
  while (auto match = matcher.find(text, from)) {
    const AddedToken& token = added[match->index];
    size_t begin = match->begin;
    size_t end = match->end;
    from = end;
    if (token.single_word) {
      const bool word_before = ends_with_word(text.substr(0, begin));
      const bool word_after = end < text.size() && is_word_char(text, end);
      if (word_before || word_after) continue;
    }
    if (token.lstrip) {
      while (begin > done) {
        const size_t p = tokenizer_detail::previous_utf8_char(text, begin);
        const auto c = tokenizer_detail::next_utf8_char(text.substr(p));
        if (c.status != Utf8Status::kValid || !tokenizer_detail::is_white_space(c.code_point))
          break;
        begin = p;
      }
    }
    if (token.rstrip) {
      while (end < text.size()) {
        const auto c = tokenizer_detail::next_utf8_char(text.substr(end));
        if (c.status != Utf8Status::kValid || !tokenizer_detail::is_white_space(c.code_point))
          break;
        end += c.length;
      }
      from = end;
    }
    if (done < begin) on_text(text.substr(done, begin - done));
    ids.push_back(token.id);
    done = end;
  }
  if (done < text.size()) on_text(text.substr(done));
}

void Tokenizer::Impl::encode_segment(std::string_view segment, std::vector<int32_t>& ids) const {
  if (!segment.empty()) pre_tokenize(0, segment, ids);
}

// Each pre-token goes through the remaining steps, and then BPE, as soon as it is cut.
void Tokenizer::Impl::pre_tokenize(size_t step_index, std::string_view piece,
                                   std::vector<int32_t>& ids) const {
  if (step_index == pre_tokenizer.size()) {
    model->tokenize(piece, ids);
    return;
  }
  const PreTokenizerStep& step = pre_tokenizer[step_index];
  const auto next = [&](std::string_view part) { pre_tokenize(step_index + 1, part, ids); };
  if (step.kind == PreTokenizerStep::Kind::kSplit) {
    split_text(piece, *step.regex, step.behavior, step.invert, next);
    return;
  }
  std::string prefixed;
  if (step.add_prefix_space && !piece.starts_with(' ')) {
    prefixed.reserve(piece.size() + 1);
    prefixed.push_back(' ');
    prefixed.append(piece);
    piece = prefixed;
  }
  std::string mapped;
  const auto map_bytes = [&](std::string_view part) {
    mapped.clear();
    ByteLevelAlphabet::get().encode(part, mapped);
    next(mapped);
  };
  if (step.regex == nullptr) {
    map_bytes(piece);
  } else {
    split_text(piece, *step.regex, SplitBehavior::kIsolated, false, map_bytes);
  }
}

Tokenizer Tokenizer::from_file(const std::string& path) {
  return from_json(read_text_file(path), path);
}

Tokenizer Tokenizer::from_json(const std::string& json_text, const std::string& source) {
  json root;
  try {
    root = json::parse(json_text);
  } catch (const json::exception& e) {
    fail("{}: not valid JSON: {}", source, e.what());
  }
  SPARSA_CHECK(root.is_object(), "{}: the top level is not a JSON object", source);

  auto impl = std::make_unique<Impl>();
  impl->source = source;

  const json& model = required_object(root, "model", source, "");
  if (const json* type = optional_field(model, "type")) {
    SPARSA_CHECK(type->is_string(), "{}: model.type is not a string", source);
    const std::string& name = type->get_ref<const std::string&>();
    SPARSA_CHECK(name == "BPE", "{}: model type '{}' is not supported (only BPE is)", source, name);
  } else {
    SPARSA_CHECK(model.contains("merges"), "{}: model.type is missing", source);
  }
  if (const json* dropout = optional_field(model, "dropout")) {
    SPARSA_CHECK(dropout->is_number() && dropout->get<double>() == 0.0,
                 "{}: model.dropout {} is not supported (encoding would be random)", source,
                 dropout->dump());
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    const json* affix = optional_field(model, key);
    SPARSA_CHECK(
        affix == nullptr || (affix->is_string() && affix->get_ref<const std::string&>().empty()),
        "{}: model.{} {} is not supported (byte-level BPE uses none)", source, key,
        affix == nullptr ? std::string() : affix->dump());
  }

  const json& vocab = required_object(model, "vocab", source, "model");
  const json* added_list = optional_field(root, "added_tokens");
  SPARSA_CHECK(added_list == nullptr || added_list->is_array(), "{}: added_tokens is not an array",
               source);
  const size_t id_limit = vocab.size() + (added_list ? added_list->size() : 0);
  SPARSA_CHECK(id_limit < (size_t{1} << 31), "{}: too many tokens ({})", source, id_limit);

  impl->bytes_of.resize(id_limit);
  impl->kind_of.assign(id_limit, TokenKind::kNone);
  std::vector<std::string> token_of(id_limit);
  StringMap<int32_t> vocab_map;
  vocab_map.reserve(vocab.size());
  const ByteLevelAlphabet& alphabet = ByteLevelAlphabet::get();
  for (const auto& [token, value] : vocab.items()) {
    const int32_t id = read_id(value, id_limit, source, fmt::format("model.vocab[\"{}\"]", token));
    SPARSA_CHECK(impl->kind_of[id] == TokenKind::kNone,
                 "{}: model.vocab gives id {} to both \"{}\" and \"{}\"", source, id, token_of[id],
                 token);
    impl->kind_of[id] = TokenKind::kModel;
    token_of[id] = token;
    if (!alphabet.decode(token, impl->bytes_of[id])) impl->bytes_of[id] = token;
    vocab_map.emplace(token, id);
  }

  BpeModel::Options options;
  options.ignore_merges = optional_bool(model, "ignore_merges", false, source, "model");
  options.fuse_unk = optional_bool(model, "fuse_unk", false, source, "model");
  options.byte_fallback = optional_bool(model, "byte_fallback", false, source, "model");
  if (const json* unk = optional_field(model, "unk_token")) {
    SPARSA_CHECK(unk->is_string(), "{}: model.unk_token is not a string", source);
    const auto it = vocab_map.find(unk->get_ref<const std::string&>());
    SPARSA_CHECK(it != vocab_map.end(), "{}: model.unk_token \"{}\" is not in model.vocab", source,
                 unk->get_ref<const std::string&>());
    options.unk_id = it->second;
  }
  impl->model = std::make_unique<BpeModel>(std::move(vocab_map), options);
  BpeModel& bpe = *impl->model;

  const json& merges = required_array(model, "merges", source, "model");
  std::string merged;
  for (size_t i = 0; i < merges.size(); ++i) {
    const json& entry = merges[i];
    std::string_view left, right;
    if (entry.is_string()) {
      const std::string& text = entry.get_ref<const std::string&>();
      const size_t space = text.find(' ');
      SPARSA_CHECK(space != std::string::npos && text.find(' ', space + 1) == std::string::npos,
                   "{}: model.merges[{}] \"{}\" is not two tokens separated by one space", source,
                   i, text);
      left = std::string_view(text).substr(0, space);
      right = std::string_view(text).substr(space + 1);
    } else {
      SPARSA_CHECK(
          entry.is_array() && entry.size() == 2 && entry[0].is_string() && entry[1].is_string(),
          "{}: model.merges[{}] is not a pair of strings", source, i);
      left = entry[0].get_ref<const std::string&>();
      right = entry[1].get_ref<const std::string&>();
    }
    const auto left_id = bpe.find(left);
    const auto right_id = bpe.find(right);
    for (const auto& [part, id] : {std::pair{left, left_id}, std::pair{right, right_id}}) {
      SPARSA_CHECK(id.has_value(),
                   "{}: model.merges[{}] refers to \"{}\", which is not in model.vocab", source, i,
                   part);
    }
    merged.assign(left);
    merged.append(right);
    const auto merged_id = bpe.find(merged);
    SPARSA_CHECK(merged_id.has_value(),
                 "{}: model.merges[{}] makes \"{}\", which is not in model.vocab", source, i,
                 merged);
    bpe.add_merge(*left_id, *right_id, *merged_id);
  }

  if (added_list != nullptr) {
    for (size_t i = 0; i < added_list->size(); ++i) {
      const json& entry = (*added_list)[i];
      const std::string where = fmt::format("added_tokens[{}]", i);
      SPARSA_CHECK(entry.is_object(), "{}: {} is not an object", source, where);
      AddedToken token;
      token.id =
          read_id(required_field(entry, "id", source, where), id_limit, source, where + ".id");
      token.content = required_string(entry, "content", source, where);
      SPARSA_CHECK(!token.content.empty(), "{}: {}.content is empty", source, where);
      token.special = optional_bool(entry, "special", false, source, where);
      token.single_word = optional_bool(entry, "single_word", false, source, where);
      token.lstrip = optional_bool(entry, "lstrip", false, source, where);
      token.rstrip = optional_bool(entry, "rstrip", false, source, where);
      token.normalized = optional_bool(entry, "normalized", !token.special, source, where);
      if (token.special) {
        impl->kind_of[token.id] = TokenKind::kSpecial;
        impl->bytes_of[token.id] = token.content;
      } else {
        impl->kind_of[token.id] = TokenKind::kAdded;
        std::string& bytes = impl->bytes_of[token.id];
        bytes.clear();
        if (!alphabet.decode(token.content, bytes)) bytes = token.content;
      }
      impl->added_ids.insert_or_assign(token.content, token.id);
      (token.normalized ? impl->normalized_matcher : impl->raw_matcher).add(token.content, i);
      if (token.single_word && impl->word_char == nullptr) {
        impl->word_char = std::make_unique<TokenizerRegex>(R"(\w)", false, source);
      }
      impl->added.push_back(std::move(token));
    }
  }

  // Ids run up to the largest one used; added tokens often repeat ids of the vocab.
  while (!impl->kind_of.empty() && impl->kind_of.back() == TokenKind::kNone) {
    impl->kind_of.pop_back();
    impl->bytes_of.pop_back();
  }

  if (const json* normalizer = optional_field(root, "normalizer")) {
    check_normalizer(*normalizer, source, "normalizer");
  }
  if (const json* pre = optional_field(root, "pre_tokenizer")) {
    parse_pre_tokenizer(*pre, source, "pre_tokenizer", impl->pre_tokenizer);
  }
  if (const json* post = optional_field(root, "post_processor")) {
    parse_post_processor(*post, id_limit, source, "post_processor", impl->post);
  }
  const json* decoder = optional_field(root, "decoder");
  SPARSA_CHECK(decoder != nullptr, "{}: decoder is missing (byte-level BPE needs ByteLevel)",
               source);
  check_decoder(*decoder, source, "decoder");

  Tokenizer tokenizer;
  tokenizer.impl_ = std::move(impl);
  return tokenizer;
}

Tokenizer::Tokenizer() = default;
Tokenizer::~Tokenizer() = default;
Tokenizer::Tokenizer(Tokenizer&&) noexcept = default;
Tokenizer& Tokenizer::operator=(Tokenizer&&) noexcept = default;

std::vector<int32_t> Tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  SPARSA_CHECK(impl_ != nullptr, "Tokenizer::encode on a tokenizer that was never loaded");
  const Impl& impl = *impl_;
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = impl.post.prefix;
  ids.reserve(text.size() / 4 + 8);
  impl.split_added(text, impl.raw_matcher, ids, [&](std::string_view part) {
    impl.split_added(part, impl.normalized_matcher, ids,
                     [&](std::string_view segment) { impl.encode_segment(segment, ids); });
  });
  if (add_special_tokens) ids.insert(ids.end(), impl.post.suffix.begin(), impl.post.suffix.end());
  return ids;
}

std::string Tokenizer::decode(const std::vector<int32_t>& ids, bool skip_special_tokens) const {
  SPARSA_CHECK(impl_ != nullptr, "Tokenizer::decode on a tokenizer that was never loaded");
  std::string bytes;
  for (int32_t id : ids) {
    if (!has_id(id) || (skip_special_tokens && is_special(id))) continue;
    bytes += impl_->bytes_of[id];
  }
  std::string text;
  tokenizer_detail::append_utf8_lossy(bytes, text);
  return text;
}

std::string Tokenizer::token_bytes(int32_t id) const {
  SPARSA_CHECK(has_id(id), "{}: id {} is not a token of this tokenizer",
               impl_ ? impl_->source : std::string("tokenizer"), id);
  return impl_->bytes_of[id];
}

bool Tokenizer::has_id(int32_t id) const {
  return impl_ != nullptr && id >= 0 && static_cast<size_t>(id) < impl_->kind_of.size() &&
         impl_->kind_of[id] != TokenKind::kNone;
}

bool Tokenizer::is_special(int32_t id) const {
  return has_id(id) && impl_->kind_of[id] == TokenKind::kSpecial;
}

std::optional<int32_t> Tokenizer::token_to_id(std::string_view token) const {
  if (impl_ == nullptr) return std::nullopt;
  if (const auto it = impl_->added_ids.find(token); it != impl_->added_ids.end()) {
    return it->second;
  }
  return impl_->model->find(token);
}

int32_t Tokenizer::vocab_size() const {
  return impl_ == nullptr ? 0 : static_cast<int32_t>(impl_->kind_of.size());
}

std::optional<int32_t> Tokenizer::bos_id() const {
  if (impl_ == nullptr || impl_->post.prefix.empty()) return std::nullopt;
  return impl_->post.prefix.front();
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special_tokens)
    : tokenizer_(&tokenizer), skip_special_(skip_special_tokens) {}

std::string StreamDecoder::push(int32_t id) {
  if (!tokenizer_->has_id(id) || (skip_special_ && tokenizer_->is_special(id))) return {};
  pending_ += tokenizer_->token_bytes(id);
  const size_t ready = pending_.size() - tokenizer_detail::incomplete_utf8_suffix(pending_);
  std::string text;
  tokenizer_detail::append_utf8_lossy(std::string_view(pending_).substr(0, ready), text);
  pending_.erase(0, ready);
  return text;
}

std::string StreamDecoder::flush() {
  std::string text;
  tokenizer_detail::append_utf8_lossy(pending_, text);
  pending_.clear();
  return text;
}

}  // namespace sparsa
