#include "sparsa/runtime/tokenizer.h"

#include <gtest/gtest.h>

#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "test_util.h"

namespace sparsa {
namespace {

using nlohmann::json;

std::string tiny_tokenizer_path() { return testing::tiny_model_dir() + "/tokenizer.json"; }

json tiny_tokenizer_json() { return json::parse(read_text_file(tiny_tokenizer_path())); }

// Every tokenizer[] case (ids with BOS, decoded text) and every prompt of a reference file.
void expect_matches_reference(const Tokenizer& tokenizer, const std::string& reference_path) {
  const json reference = json::parse(read_text_file(reference_path));
  const json& cases = reference.at("tokenizer");
  ASSERT_FALSE(cases.empty());
  for (const json& c : cases) {
    const std::string text = c.at("text");
    const std::vector<int32_t> ids = c.at("ids");
    SCOPED_TRACE("text: " + json(text).dump());
    EXPECT_EQ(tokenizer.encode(text), ids);
    EXPECT_EQ(tokenizer.decode(ids), c.at("decoded").get<std::string>());
  }
  const json& prompts = reference.at("prompts");
  ASSERT_FALSE(prompts.empty());
  for (const json& p : prompts) {
    const std::string text = p.at("text");
    const std::vector<int32_t> ids = p.at("ids");
    SCOPED_TRACE("prompt: " + json(text).dump());
    EXPECT_EQ(tokenizer.encode(text), ids);
    EXPECT_EQ(tokenizer.decode(ids), text);
  }
}

// Strict UTF-8 check, written independently of the library's decoder.
bool is_valid_utf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto b = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t cp = 0;
    if (b < 0x80) {
      ++i;
      continue;
    } else if ((b & 0xE0) == 0xC0) {
      n = 1, cp = b & 0x1F;
    } else if ((b & 0xF0) == 0xE0) {
      n = 2, cp = b & 0x0F;
    } else if ((b & 0xF8) == 0xF0) {
      n = 3, cp = b & 0x07;
    } else {
      return false;
    }
    if (i + n >= s.size()) return false;
    for (size_t k = 1; k <= n; ++k) {
      const auto c = static_cast<unsigned char>(s[i + k]);
      if ((c & 0xC0) != 0x80) return false;
      cp = (cp << 6) | (c & 0x3F);
    }
    static constexpr uint32_t kMin[] = {0, 0x80, 0x800, 0x10000};
    if (cp < kMin[n] || cp > 0x10FFFF || (cp >= 0xD800 && cp <= 0xDFFF)) return false;
    i += n + 1;
  }
  return true;
}

// Runs `load` and checks that it throws sparsa::Error whose message contains each of `parts`.
template <typename Load>
void expect_error(Load&& load, const std::vector<std::string>& parts) {
  try {
    load();
    ADD_FAILURE() << "no error; expected one mentioning '" << parts.front() << "'";
  } catch (const Error& e) {
    const std::string message = e.what();
    for (const std::string& part : parts) {
      EXPECT_NE(message.find(part), std::string::npos)
          << "message: " << message << "\nexpected to contain: " << part;
    }
  }
}

void expect_json_error(const json& config, const std::vector<std::string>& parts) {
  std::vector<std::string> with_source = parts;
  with_source.push_back("variant.json");
  expect_error([&] { Tokenizer::from_json(config.dump(), "variant.json"); }, with_source);
}

TEST(TokenizerTest, TinyMatchesReference) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  expect_matches_reference(tokenizer, testing::fixtures_dir() + "/tiny.json");
}

TEST(TokenizerTest, SmallMatchesReference) {
  SPARSA_REQUIRE_SHARED();
  const Tokenizer tokenizer =
      Tokenizer::from_file(testing::shared_dir() + "/models/small/tokenizer.json");
  expect_matches_reference(tokenizer, testing::shared_dir() + "/reference/small.json");
}

TEST(TokenizerTest, TinyVocabularyAndSpecialTokens) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  EXPECT_EQ(tokenizer.vocab_size(), 8192);
  EXPECT_EQ(tokenizer.bos_id(), 0);
  EXPECT_EQ(tokenizer.token_to_id("<|end_of_text|>"), 1);
  EXPECT_EQ(tokenizer.token_to_id("no such token"), std::nullopt);
  EXPECT_TRUE(tokenizer.is_special(0));
  EXPECT_TRUE(tokenizer.is_special(2));
  const std::optional<int32_t> space = tokenizer.token_to_id("\xC4\xA0");  // 'Ġ'
  ASSERT_TRUE(space.has_value());
  EXPECT_FALSE(tokenizer.is_special(*space));
  EXPECT_EQ(tokenizer.token_bytes(*space), " ");
  EXPECT_EQ(tokenizer.token_bytes(1), "<|end_of_text|>");
  EXPECT_THROW(tokenizer.token_bytes(8192), Error);
  EXPECT_THROW(tokenizer.token_bytes(-1), Error);

  const std::vector<int32_t> with_bos = tokenizer.encode("The kernel scheduler");
  const std::vector<int32_t> without = tokenizer.encode("The kernel scheduler", false);
  ASSERT_EQ(with_bos.size(), without.size() + 1);
  EXPECT_EQ(with_bos.front(), 0);
  EXPECT_EQ(std::vector<int32_t>(with_bos.begin() + 1, with_bos.end()), without);

  const std::vector<int32_t> ids = tokenizer.encode("a<|end_of_text|>b", false);
  EXPECT_EQ(tokenizer.decode(ids), "ab");
  EXPECT_EQ(tokenizer.decode(ids, false), "a<|end_of_text|>b");
  // Ids beyond the vocabulary (padded embedding rows) are skipped, as `tokenizers` does.
  EXPECT_EQ(tokenizer.decode({ids[0], 9000, ids[2]}), "ab");
}

TEST(TokenizerTest, LongRunsRoundTrip) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  for (const std::string& text :
       {std::string(20000, 'x'), std::string(20000, ' '), std::string(5000, '\n') + "end",
        "word" + std::string(3000, ' ') + "word"}) {
    const std::vector<int32_t> ids = tokenizer.encode(text, false);
    EXPECT_LT(ids.size(), text.size());
    EXPECT_EQ(tokenizer.decode(ids), text);
  }
}

TEST(TokenizerTest, InvalidUtf8InputIsKeptAsBytes) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  const std::string text = "ab\xFF\xC3(cd";
  const std::vector<int32_t> ids = tokenizer.encode(text, false);
  std::string bytes;
  for (int32_t id : ids) bytes += tokenizer.token_bytes(id);
  EXPECT_EQ(bytes, text);
  EXPECT_EQ(tokenizer.decode(ids), "ab\xEF\xBF\xBD\xEF\xBF\xBD(cd");
}

TEST(TokenizerTest, MergesAsStringsMatchPairs) {
  json config = tiny_tokenizer_json();
  json& merges = config["model"]["merges"];
  ASSERT_TRUE(merges[0].is_array());
  for (json& merge : merges)
    merge = merge[0].get<std::string>() + " " + merge[1].get<std::string>();
  const Tokenizer pairs = Tokenizer::from_file(tiny_tokenizer_path());
  const Tokenizer strings = Tokenizer::from_json(config.dump(), "strings.json");

  const json reference = json::parse(read_text_file(testing::fixtures_dir() + "/tiny.json"));
  std::vector<std::string> texts = {"Hello world, this is a test of merges given as strings."};
  for (const json& c : reference.at("tokenizer")) texts.push_back(c.at("text"));
  for (const json& p : reference.at("prompts")) texts.push_back(p.at("text"));
  for (const std::string& text : texts) {
    SCOPED_TRACE(text);
    EXPECT_EQ(strings.encode(text), pairs.encode(text));
  }
}

// A Llama-3-style file written by hand: a Split pre-tokenizer with the Llama-3 pattern, then
// ByteLevel without its own regex; ids 0-255 are the byte-level alphabet in byte order, so a
// printable ASCII character written as a char literal is its own id.
class TokenizerLlama3StyleTest : public ::testing::Test {
 protected:
  static constexpr const char* kPattern =
      R"((?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3})"
      R"(| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+)";

  // GPT-2's byte-to-unicode table, spelled out again here so that the test checks the library.
  static std::string byte_char(int b) {
    int cp = b;
    if (!((b >= 0x21 && b <= 0x7E) || (b >= 0xA1 && b <= 0xAC) || (b >= 0xAE && b <= 0xFF))) {
      int n = 0;
      for (int k = 0; k < b; ++k) {
        if (!((k >= 0x21 && k <= 0x7E) || (k >= 0xA1 && k <= 0xAC) || (k >= 0xAE && k <= 0xFF)))
          ++n;
      }
      cp = 256 + n;
    }
    std::string s;
    if (cp < 0x80) {
      s.push_back(static_cast<char>(cp));
    } else {
      s.push_back(static_cast<char>(0xC0 | (cp >> 6)));
      s.push_back(static_cast<char>(0x80 | (cp & 0x3F)));
    }
    return s;
  }

  static json config(bool ignore_merges) {
    json vocab = json::object();
    for (int b = 0; b < 256; ++b) vocab[byte_char(b)] = b;
    const std::string sp = byte_char(' ');  // "Ġ"
    // Ranked first so that a missing split would show: "oĠ" and "34" only form across pieces.
    const std::vector<std::pair<std::string, std::string>> merges = {
        {"o", sp},  {"3", "4"},       {"1", "2"},   {"12", "3"},        {"4", "5"},
        {"h", "e"}, {"l", "l"},       {"he", "ll"}, {"hell", "o"},      {sp, "w"},
        {"o", "r"}, {sp + "w", "or"}, {"l", "d"},   {sp + "wor", "ld"}, {"'", "s"},
    };
    json merge_list = json::array();
    for (const auto& [a, b] : merges) {
      if (!vocab.contains(a + b)) vocab[a + b] = static_cast<int>(vocab.size());
      merge_list.push_back({a, b});
    }
    vocab[sp + "hello"] = static_cast<int>(vocab.size());  // reachable only by ignore_merges
    const int bos = static_cast<int>(vocab.size());
    const int eot = bos + 1;
    json added = json::array();
    for (const auto& [content, id] : {std::pair{"<|begin_of_text|>", bos}, {"<|eot_id|>", eot}}) {
      added.push_back({{"id", id},
                       {"content", content},
                       {"single_word", false},
                       {"lstrip", false},
                       {"rstrip", false},
                       {"normalized", false},
                       {"special", true}});
    }
    return {
        {"version", "1.0"},
        {"added_tokens", added},
        {"normalizer", nullptr},
        {"pre_tokenizer",
         {{"type", "Sequence"},
          {"pretokenizers", json::array({{{"type", "Split"},
                                          {"pattern", {{"Regex", kPattern}}},
                                          {"behavior", "Isolated"},
                                          {"invert", false}},
                                         {{"type", "ByteLevel"},
                                          {"add_prefix_space", false},
                                          {"trim_offsets", true},
                                          {"use_regex", false}}})}}},
        {"post_processor",
         {{"type", "Sequence"},
          {"processors",
           json::array({{{"type", "ByteLevel"},
                         {"add_prefix_space", true},
                         {"trim_offsets", false},
                         {"use_regex", true}},
                        {{"type", "TemplateProcessing"},
                         {"single", json::array({{{"SpecialToken",
                                                   {{"id", "<|begin_of_text|>"}, {"type_id", 0}}}},
                                                 {{"Sequence", {{"id", "A"}, {"type_id", 0}}}}})},
                         {"pair", json::array()},
                         {"special_tokens",
                          {{"<|begin_of_text|>",
                            {{"id", "<|begin_of_text|>"},
                             {"ids", {bos}},
                             {"tokens", {"<|begin_of_text|>"}}}}}}}})}}},
        {"decoder",
         {{"type", "ByteLevel"},
          {"add_prefix_space", true},
          {"trim_offsets", true},
          {"use_regex", true}}},
        {"model",
         {{"type", "BPE"},
          {"dropout", nullptr},
          {"unk_token", nullptr},
          {"continuing_subword_prefix", nullptr},
          {"end_of_word_suffix", nullptr},
          {"fuse_unk", false},
          {"byte_fallback", false},
          {"ignore_merges", ignore_merges},
          {"vocab", vocab},
          {"merges", merge_list}}},
    };
  }

  void SetUp() override {
    const json c = config(true);
    vocab_ = c["model"]["vocab"];
    tokenizer_ = Tokenizer::from_json(c.dump(), "llama3_style.json");
  }

  int32_t id(const std::string& token) const { return vocab_.at(token).get<int32_t>(); }

  json vocab_;
  Tokenizer tokenizer_;
};

TEST_F(TokenizerLlama3StyleTest, DigitsGoInGroupsOfThree) {
  // "1234567" -> "123" "456" "7"; "456" has no merge beyond "45".
  EXPECT_EQ(tokenizer_.encode("1234567", false),
            (std::vector<int32_t>{id("123"), id("45"), '6', '7'}));
  EXPECT_EQ(tokenizer_.encode("12345", false), (std::vector<int32_t>{id("123"), id("45")}));
}

TEST_F(TokenizerLlama3StyleTest, WordsSpacesAndContractions) {
  const int32_t space = id(byte_char(' '));
  // "hello" " world" " " "123" "45": \s+(?!\S) leaves the space before a digit on its own.
  EXPECT_EQ(tokenizer_.encode("hello world 12345", false),
            (std::vector<int32_t>{id("hello"), id(byte_char(' ') + "world"), space, id("123"),
                                  id("45")}));
  // (?i:'s) isolates the contraction in either case; "'S" has no merge.
  EXPECT_EQ(tokenizer_.encode("it's IT'S", false),
            (std::vector<int32_t>{'i', 't', id("'s"), space, 'I', 'T', '\'', 'S'}));
  // "\n\n" is one piece; the space goes with the word after it.
  EXPECT_EQ(tokenizer_.encode("o\n\n o", false),
            (std::vector<int32_t>{'o', id(byte_char('\n')), id(byte_char('\n')), space, 'o'}));
}

TEST_F(TokenizerLlama3StyleTest, IgnoreMergesEmitsWholeVocabularyWords) {
  EXPECT_EQ(tokenizer_.encode("say hello", false),
            (std::vector<int32_t>{'s', 'a', 'y', id(byte_char(' ') + "hello")}));
  const Tokenizer merging = Tokenizer::from_json(config(false).dump(), "merging.json");
  EXPECT_EQ(merging.encode("say hello", false),
            (std::vector<int32_t>{'s', 'a', 'y', id(byte_char(' ')), id("hello")}));
}

TEST_F(TokenizerLlama3StyleTest, SpecialTokensAndTemplate) {
  const int32_t bos = id(byte_char(' ') + "hello") + 1;
  EXPECT_EQ(tokenizer_.bos_id(), bos);
  EXPECT_EQ(tokenizer_.vocab_size(), bos + 2);
  EXPECT_EQ(tokenizer_.encode("hello<|eot_id|>"),
            (std::vector<int32_t>{bos, id("hello"), bos + 1}));
  EXPECT_EQ(tokenizer_.decode({bos, id("hello"), bos + 1}), "hello");
  EXPECT_EQ(tokenizer_.decode({bos, id("hello"), bos + 1}, false),
            "<|begin_of_text|>hello<|eot_id|>");
  const std::string text = "Mixed text: 1234567 it's\n\n  done! ünïcødé 🙂";
  EXPECT_EQ(tokenizer_.decode(tokenizer_.encode(text)), text);
}

// With ignore_merges a pre-token found in the vocabulary comes out as one id, so the ids show
// exactly where the pre-tokenizer cut the text.
TEST_F(TokenizerLlama3StyleTest, SplitBehaviors) {
  json base = config(true);
  json& vocab = base["model"]["vocab"];
  int next_id = static_cast<int>(vocab.size()) + 2;  // after the two added tokens
  for (const char* group :
       {"the", "final", "countdown", "the-", "final-", "-final", "-countdown", "--", "ab", "123"}) {
    if (!vocab.contains(group)) vocab[group] = next_id++;
  }
  struct Case {
    const char* behavior;
    bool invert;
    std::vector<std::string> pieces;
  };
  const std::vector<Case> cases = {
      {"Removed", false, {"the", "final", "countdown"}},
      {"Isolated", false, {"the", "-", "final", "-", "-", "countdown"}},
      {"MergedWithPrevious", false, {"the-", "final-", "-", "countdown"}},
      {"MergedWithNext", false, {"the", "-final", "-", "-countdown"}},
      {"Contiguous", false, {"the", "-", "final", "--", "countdown"}},
      {"Removed", true, {"-", "-", "-"}},  // inverted: the words are the delimiters
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(fmt::format("{} invert={}", c.behavior, c.invert));
    json variant = base;
    variant["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Split"},
                                                    {"pattern", {{"String", "-"}}},
                                                    {"behavior", c.behavior},
                                                    {"invert", c.invert}};
    const Tokenizer tokenizer = Tokenizer::from_json(variant.dump(), "split.json");
    std::vector<int32_t> expected;
    for (const std::string& piece : c.pieces) expected.push_back(vocab.at(piece).get<int32_t>());
    EXPECT_EQ(tokenizer.encode("the-final--countdown", false), expected);
  }
  for (const bool individual : {true, false}) {
    json variant = base;
    variant["pre_tokenizer"]["pretokenizers"][0] = {{"type", "Digits"},
                                                    {"individual_digits", individual}};
    const Tokenizer tokenizer = Tokenizer::from_json(variant.dump(), "digits.json");
    const int32_t ab = vocab.at("ab").get<int32_t>();
    const std::vector<int32_t> expected =
        individual ? std::vector<int32_t>{ab, '1', '2', '3'}
                   : std::vector<int32_t>{ab, vocab.at("123").get<int32_t>()};
    EXPECT_EQ(tokenizer.encode("ab123", false), expected);
  }
}

TEST(TokenizerTest, AddedTokenStripsWhitespaceWhenAsked) {
  json config = tiny_tokenizer_json();
  const int id = static_cast<int>(config["model"]["vocab"].size() + config["added_tokens"].size());
  config["added_tokens"].push_back({{"id", id},
                                    {"content", "<mask>"},
                                    {"single_word", false},
                                    {"lstrip", true},
                                    {"rstrip", true},
                                    {"normalized", false},
                                    {"special", true}});
  const Tokenizer tokenizer = Tokenizer::from_json(config.dump(), "mask.json");
  const Tokenizer plain = Tokenizer::from_file(tiny_tokenizer_path());
  std::vector<int32_t> expected = plain.encode("I saw", false);
  expected.push_back(id);
  const std::vector<int32_t> tail = plain.encode("here", false);
  expected.insert(expected.end(), tail.begin(), tail.end());
  EXPECT_EQ(tokenizer.encode("I saw  <mask> \there", false), expected);
}

TEST(TokenizerTest, RejectsMalformedFiles) {
  expect_error([] { Tokenizer::from_json("{\"model\": ", "broken.json"); },
               {"broken.json", "not valid JSON"});
  expect_error([] { Tokenizer::from_json("[1, 2]", "list.json"); }, {"list.json", "object"});
  expect_error([] { Tokenizer::from_json("{}", "empty.json"); },
               {"empty.json", "model is missing"});
  expect_error([] { Tokenizer::from_file("/nonexistent/dir/tokenizer.json"); },
               {"/nonexistent/dir/tokenizer.json", "cannot open"});

  const json base = tiny_tokenizer_json();
  {
    json c = base;
    c["model"] = {{"type", "Unigram"}, {"vocab", json::array()}};
    expect_json_error(c, {"model type 'Unigram' is not supported"});
  }
  {
    json c = base;
    c["model"].erase("vocab");
    expect_json_error(c, {"model.vocab is missing"});
  }
  {
    json c = base;
    c["model"]["merges"][12] = 42;
    expect_json_error(c, {"model.merges[12] is not a pair of strings"});
  }
  {
    json c = base;
    c["model"]["merges"][3] = json::array({"e"});
    expect_json_error(c, {"model.merges[3] is not a pair of strings"});
  }
  {
    json c = base;
    c["model"]["merges"][5] = "a b c";
    expect_json_error(c, {"model.merges[5]", "not two tokens separated by one space"});
  }
  {
    json c = base;
    c["model"]["merges"][7] = json::array({"e", "no_such_token"});
    expect_json_error(c, {"model.merges[7] refers to \"no_such_token\"", "not in model.vocab"});
  }
  {
    json c = base;
    c["model"]["vocab"]["zzz_new"] = 1000000;
    expect_json_error(c, {"model.vocab[\"zzz_new\"] = 1000000 is out of range"});
  }
  {
    json c = base;
    c["model"]["vocab"]["zzz_new"] = -3;
    expect_json_error(c, {"model.vocab[\"zzz_new\"] = -3 is out of range"});
  }
  {
    json c = base;
    c["model"]["vocab"]["zzz_new"] = "seven";
    expect_json_error(c, {"model.vocab[\"zzz_new\"] is not an integer id"});
  }
  {
    json c = base;
    c["model"]["vocab"]["zzz_new"] = c["model"]["vocab"]["e"];
    expect_json_error(c, {"model.vocab gives id", "\"e\"", "\"zzz_new\""});
  }
  {
    json c = base;
    c["pre_tokenizer"] = {{"type", "Split"},
                          {"pattern", {{"Regex", "(\\p{L}+"}}},
                          {"behavior", "Isolated"},
                          {"invert", false}};
    expect_json_error(c, {"pre_tokenizer.pattern.Regex", "bad regex", "(\\p{L}+"});
  }
  {
    json c = base;
    c["pre_tokenizer"] = {
        {"type", "Split"}, {"pattern", {{"Regex", "\\s+"}}}, {"behavior", "Sideways"}};
    expect_json_error(c, {"pre_tokenizer.behavior 'Sideways' is unknown"});
  }
  {
    json c = base;
    c["pre_tokenizer"] = {{"type", "Metaspace"}, {"replacement", "_"}};
    expect_json_error(c, {"pre_tokenizer type 'Metaspace' is not supported"});
  }
  {
    json c = base;
    c["normalizer"] = {{"type", "NFKC"}};
    expect_json_error(c, {"normalizer type 'NFKC' is not supported"});
  }
  {
    json c = base;
    c["normalizer"] = {{"type", "Sequence"}, {"normalizers", json::array()}};
    EXPECT_NO_THROW(Tokenizer::from_json(c.dump(), "variant.json"));
  }
  {
    json c = base;
    c["decoder"] = {{"type", "WordPiece"}};
    expect_json_error(c, {"decoder type 'WordPiece' is not supported"});
  }
  {
    json c = base;
    c["post_processor"]["processors"][1]["single"][0]["SpecialToken"]["id"] = "<s>";
    expect_json_error(c, {"post_processor.processors[1].single uses special token '<s>'"});
  }
  {
    json c = base;
    c["added_tokens"][1]["id"] = 123456;
    expect_json_error(c, {"added_tokens[1].id = 123456 is out of range"});
  }
  {
    json c = base;
    c["model"]["unk_token"] = "<unk>";
    expect_json_error(c, {"model.unk_token \"<unk>\" is not in model.vocab"});
  }
}

TEST(StreamDecoderTest, NeverSplitsACharacter) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  const std::string text = "日本語 🙂 naïve — ok";
  const std::vector<int32_t> ids = tokenizer.encode(text);
  StreamDecoder stream(tokenizer);
  std::string joined;
  int held = 0;
  for (int32_t id : ids) {
    const std::string piece = stream.push(id);
    EXPECT_TRUE(is_valid_utf8(piece))
        << "piece: " << json(piece).dump(-1, ' ', false, json::error_handler_t::replace);
    if (piece.empty()) ++held;
    joined += piece;
  }
  joined += stream.flush();
  EXPECT_EQ(joined, text);
  EXPECT_GT(held, 1) << "expected tokens that end inside a character";
}

TEST(StreamDecoderTest, FlushReplacesAnUnfinishedCharacter) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  const std::vector<int32_t> ids = tokenizer.encode("🙂", false);
  ASSERT_GT(ids.size(), 1u);
  ASSERT_LT(tokenizer.token_bytes(ids[0]).size(), 4u);
  StreamDecoder stream(tokenizer);
  EXPECT_EQ(stream.push(ids[0]), "");
  EXPECT_EQ(stream.flush(), "\xEF\xBF\xBD");
  EXPECT_EQ(stream.flush(), "");
  for (size_t i = 0; i + 1 < ids.size(); ++i) EXPECT_EQ(stream.push(ids[i]), "");
  EXPECT_EQ(stream.push(ids.back()), "🙂");
}

TEST(StreamDecoderTest, SpecialTokensFollowTheSkipFlag) {
  const Tokenizer tokenizer = Tokenizer::from_file(tiny_tokenizer_path());
  StreamDecoder skipping(tokenizer);
  EXPECT_EQ(skipping.push(1), "");
  StreamDecoder keeping(tokenizer, false);
  EXPECT_EQ(keeping.push(1), "<|end_of_text|>");
}

}  // namespace
}  // namespace sparsa
