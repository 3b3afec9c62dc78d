#include "sparsa/io/safetensors.h"

#include <fmt/ranges.h>
#include <gtest/gtest.h>
#include <stdlib.h>

#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <nlohmann/json.hpp>
#include <numeric>
#include <string>
#include <vector>

#include "sparsa/core/error.h"
#include "test_util.h"

namespace sparsa::io {
namespace {

namespace fs = std::filesystem;

// A fresh scratch directory per test, removed afterwards.
class ScratchDir {
 public:
  ScratchDir() {
    std::string tmpl = (fs::temp_directory_path() / "sparsa_st_XXXXXX").string();
    EXPECT_NE(::mkdtemp(tmpl.data()), nullptr);
    path_ = tmpl;
  }
  ScratchDir(const ScratchDir&) = delete;
  ScratchDir& operator=(const ScratchDir&) = delete;
  ~ScratchDir() {
    std::error_code ec;
    fs::remove_all(path_, ec);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }
  const fs::path& path() const { return path_; }
  size_t entries() const {
    return static_cast<size_t>(std::distance(fs::directory_iterator(path_), {}));
  }

 private:
  fs::path path_;
};

void write_bytes(const std::string& path, const std::string& bytes) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  ASSERT_TRUE(out.good()) << path;
}

std::string read_bytes(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  return {std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
}

std::string le64(uint64_t v) {
  std::string s(8, '\0');
  for (int i = 0; i < 8; ++i) s[i] = static_cast<char>(v >> (8 * i));
  return s;
}

// A safetensors file from raw header text and `data_size` bytes of data.
std::string st_bytes(const std::string& header, size_t data_size) {
  return le64(header.size()) + header + std::string(data_size, '\x5a');
}

std::string entry(const std::string& name, const std::string& dtype, const std::string& shape,
                  const std::string& offsets) {
  return fmt::format(R"("{}":{{"dtype":"{}","shape":{},"data_offsets":{}}})", name, dtype, shape,
                     offsets);
}

// A header object from entries.
std::string obj(const std::vector<std::string>& entries) {
  return fmt::format("{{{}}}", fmt::join(entries, ","));
}

// Runs `fn`, expecting sparsa::Error whose message holds every phrase.
template <typename Fn>
void expect_error(Fn&& fn, const std::vector<std::string>& phrases) {
  try {
    fn();
    ADD_FAILURE() << "no sparsa::Error thrown; expected: " << phrases.back();
  } catch (const Error& e) {
    const std::string msg = e.what();
    for (const std::string& p : phrases) EXPECT_NE(msg.find(p), std::string::npos) << msg;
  }
}

// ---- the vendored tiny model ----

TEST(SafetensorsTiny, OpensWithExpectedTensors) {
  const std::string path = sparsa::testing::tiny_model_dir() + "/model.safetensors";
  const auto f = SafetensorsFile::open(path);
  // embed + 2 x (4 attention + 3 mlp projections + 2 norms) + final norm + lm_head.
  ASSERT_EQ(f->tensors().size(), 21u);
  for (const TensorView& t : f->tensors()) EXPECT_EQ(t.dtype, DType::BF16) << t.name;
  const TensorView* embed = f->find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{8192, 128}));
  EXPECT_EQ(embed->numel(), 8192 * 128);
  EXPECT_EQ(embed->nbytes, 8192u * 128u * 2u);
  EXPECT_EQ(embed->file, path);
  EXPECT_EQ(f->find("no.such.tensor"), nullptr);
  EXPECT_EQ(f->metadata().at("format"), "pt");
  for (size_t i = 1; i < f->tensors().size(); ++i)
    EXPECT_LT(f->tensors()[i - 1].data, f->tensors()[i].data);
}

TEST(SafetensorsTiny, TensorDataPointsIntoTheMapping) {
  const std::string path = sparsa::testing::tiny_model_dir() + "/model.safetensors";
  const auto f = SafetensorsFile::open(path);
  const uint8_t* begin = f->mapping().data();
  const uint8_t* end = begin + f->mapping().size();
  const std::string bytes = read_bytes(path);
  ASSERT_EQ(bytes.size(), f->mapping().size());
  for (const TensorView& t : f->tensors()) {
    ASSERT_GE(t.data, begin) << t.name;
    ASSERT_LE(t.data + t.nbytes, end) << t.name;
    EXPECT_EQ(std::memcmp(t.data, bytes.data() + (t.data - begin), t.nbytes), 0) << t.name;
  }
  EXPECT_EQ(f->tensors().back().data + f->tensors().back().nbytes, end);
}

TEST(SafetensorsTiny, ReadModeHoldsTheSameBytesOnA2MiBBoundary) {
  const std::string path = sparsa::testing::tiny_model_dir() + "/model.safetensors";
  const auto mapped = SafetensorsFile::open(path, FileAccess::kMap);
  const auto read = SafetensorsFile::open(path, FileAccess::kRead);
  EXPECT_EQ(mapped->mapping().access(), FileAccess::kMap);
  EXPECT_EQ(read->mapping().access(), FileAccess::kRead);
  const uint8_t* begin = read->mapping().data();
  EXPECT_EQ(reinterpret_cast<uintptr_t>(begin) % (uintptr_t{2} << 20), 0u);
  ASSERT_EQ(read->mapping().size(), mapped->mapping().size());
  EXPECT_EQ(std::memcmp(begin, mapped->mapping().data(), read->mapping().size()), 0);
  ASSERT_EQ(read->tensors().size(), mapped->tensors().size());
  for (size_t i = 0; i < read->tensors().size(); ++i) {
    const TensorView& t = read->tensors()[i];
    EXPECT_EQ(t.name, mapped->tensors()[i].name);
    EXPECT_EQ(t.data - begin, mapped->tensors()[i].data - mapped->mapping().data()) << t.name;
  }
}

TEST(CheckpointTiny, OpenDirFindsTheSingleFile) {
  const std::string dir = sparsa::testing::tiny_model_dir();
  const Checkpoint c = Checkpoint::open_dir(dir);
  EXPECT_EQ(c.source(), dir);
  ASSERT_EQ(c.files().size(), 1u);
  const std::vector<std::string> names = c.names();
  ASSERT_EQ(names.size(), 21u);
  EXPECT_TRUE(std::is_sorted(names.begin(), names.end()));
  EXPECT_EQ(c.get("lm_head.weight").shape, (std::vector<int64_t>{8192, 128}));
  EXPECT_EQ(&c.get("model.norm.weight"), c.find("model.norm.weight"));
  size_t total = 0;
  for (const TensorView& t : c.files()[0]->tensors()) total += t.nbytes;
  EXPECT_EQ(c.total_bytes(), total);
}

TEST(SafetensorsLarge, OpensWithoutReadingTensorData) {
  // A sparse 4 GiB tensor: reading it would take seconds, parsing only the header takes micro-
  // seconds, and its size needs 64-bit offsets.
  ScratchDir dir;
  const std::string path = dir.file("large.safetensors");
  const uint64_t n = uint64_t{1} << 32;
  const std::string head =
      st_bytes(obj({entry("big", "U8", fmt::format("[{}]", n), fmt::format("[0,{}]", n))}), 0);
  write_bytes(path, head);
  fs::resize_file(path, head.size() + n);
  const auto start = std::chrono::steady_clock::now();
  const Checkpoint c = Checkpoint::open_file(path);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(c.get("big").nbytes, n);
  EXPECT_EQ(c.total_bytes(), n);
  EXPECT_LT(seconds, 1.0);
}

// ---- sharded checkpoints ----

TEST(CheckpointSharded, OpensSharedSmallModel) {
  SPARSA_REQUIRE_SHARED();
  const std::string dir = sparsa::testing::shared_dir() + "/models/small";
  const Checkpoint c = Checkpoint::open_dir(dir);
  EXPECT_EQ(c.files().size(), 3u);
  const auto index =
      nlohmann::json::parse(read_bytes(dir + "/model.safetensors.index.json"))["weight_map"];
  ASSERT_EQ(c.names().size(), index.size());
  for (const auto& [name, shard] : index.items()) {
    const TensorView& t = c.get(name);
    EXPECT_EQ(fs::path(t.file).filename().string(), shard.get<std::string>()) << name;
  }
}

TEST(CheckpointSharded, OpensSyntheticTwoShardDirectory) {
  ScratchDir dir;
  std::vector<float> a(6);
  std::iota(a.begin(), a.end(), 1.0f);
  std::vector<int32_t> b{7, 8, 9};
  std::vector<uint8_t> c{1, 2};
  write_safetensors(dir.file("model-00001-of-00002.safetensors"),
                    {{{"a", DType::F32, {2, 3}}, a.data()}, {{"b", DType::I32, {3}}, b.data()}});
  write_safetensors(dir.file("model-00002-of-00002.safetensors"),
                    {{{"c", DType::U8, {2}}, c.data()}});
  write_bytes(dir.file("model.safetensors.index.json"),
              R"({"metadata": {"total_size": 38}, "weight_map": {
                   "a": "model-00001-of-00002.safetensors",
                   "b": "model-00001-of-00002.safetensors",
                   "c": "model-00002-of-00002.safetensors"}})");
  const Checkpoint ckpt = Checkpoint::open_dir(dir.path().string());
  EXPECT_EQ(ckpt.files().size(), 2u);
  EXPECT_EQ(ckpt.names(), (std::vector<std::string>{"a", "b", "c"}));
  EXPECT_EQ(ckpt.total_bytes(), 24u + 12u + 2u);
  EXPECT_EQ(std::memcmp(ckpt.get("a").data, a.data(), 24), 0);
  EXPECT_EQ(std::memcmp(ckpt.get("b").data, b.data(), 12), 0);
  EXPECT_EQ(std::memcmp(ckpt.get("c").data, c.data(), 2), 0);
  EXPECT_EQ(ckpt.get("c").file, dir.file("model-00002-of-00002.safetensors"));
  const Checkpoint copy = ckpt;  // views stay valid in copies
  EXPECT_EQ(copy.get("b").dim(0), 3);
}

// ---- the writer ----

TEST(SafetensorsWriter, RoundTripsEveryKindOfTensor) {
  ScratchDir dir;
  const std::string path = dir.file("rt.safetensors");
  std::vector<float> f32{1.5f, -2.0f, 3.25f, 0.0f, 1e-3f, 7.0f};
  std::vector<uint16_t> bf16{f32_to_bf16(1.0f), f32_to_bf16(-0.5f), f32_to_bf16(3.0f),
                             f32_to_bf16(100.0f)};
  std::vector<int32_t> i32{-1, 0, 2147483647};
  std::vector<uint8_t> u8{0, 1, 254, 255, 9};
  const double scalar = 3.5;
  const std::vector<TensorData> tensors{
      {{"w.f32", DType::F32, {2, 3}}, f32.data()}, {{"w.bf16", DType::BF16, {4}}, bf16.data()},
      {{"w.i32", DType::I32, {3}}, i32.data()},    {{"w.u8", DType::U8, {5}}, u8.data()},
      {{"w.scalar", DType::F64, {}}, &scalar},     {{"w.empty", DType::F16, {0, 4}}, nullptr},
  };
  write_safetensors(path, tensors);
  const auto f = SafetensorsFile::open(path);
  ASSERT_EQ(f->tensors().size(), tensors.size());
  EXPECT_TRUE(f->metadata().empty());
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorSpec& s = tensors[i].spec;
    const TensorView& t = f->tensors()[i];  // spec order is file order
    EXPECT_EQ(t.name, s.name);
    EXPECT_EQ(t.dtype, s.dtype) << s.name;
    EXPECT_EQ(t.shape, s.shape) << s.name;
    ASSERT_EQ(t.nbytes, s.nbytes()) << s.name;
    if (t.nbytes > 0) {
      EXPECT_EQ(std::memcmp(t.data, tensors[i].data, t.nbytes), 0) << s.name;
    }
  }
  EXPECT_EQ(f->find("w.scalar")->numel(), 1);
  EXPECT_EQ(f->find("w.empty")->numel(), 0);
  EXPECT_EQ(f->find("w.empty")->nbytes, 0u);
}

TEST(SafetensorsWriter, RoundTripsMetadata) {
  ScratchDir dir;
  const std::string path = dir.file("meta.safetensors");
  const std::map<std::string, std::string> meta{{"format", "pt"}, {"note", "ünïcode \"quoted\""}};
  const float x = 1.0f;
  write_safetensors(path, {{{"x", DType::F32, {1}}, &x}}, meta);
  EXPECT_EQ(SafetensorsFile::open(path)->metadata(), meta);
  const std::string bytes = read_bytes(path);
  EXPECT_NE(bytes.find("\"__metadata__\""), std::string::npos);
}

TEST(SafetensorsWriter, AlignsTheDataSectionTo8Bytes) {
  ScratchDir dir;
  const uint8_t b = 1;
  for (int len = 1; len <= 9; ++len) {
    const std::string path = dir.file("align" + std::to_string(len) + ".safetensors");
    write_safetensors(path, {{{std::string(len, 'n'), DType::U8, {1}}, &b}});
    const std::string bytes = read_bytes(path);
    uint64_t n = 0;
    for (int i = 7; i >= 0; --i) n = (n << 8) | static_cast<uint8_t>(bytes[i]);
    EXPECT_EQ((8 + n) % 8, 0u) << len;
    EXPECT_EQ(bytes.size(), 8 + n + 1);
    EXPECT_EQ(bytes.find_last_not_of(' ', 8 + n - 1), bytes.find_last_of('}', 8 + n - 1));
    const auto f = SafetensorsFile::open(path);
    EXPECT_EQ(f->tensors()[0].data - f->mapping().data(), static_cast<ptrdiff_t>(8 + n));
  }
}

TEST(SafetensorsWriter, IsAtomic) {
  ScratchDir dir;
  const std::string path = dir.file("atomic.safetensors");
  const std::vector<float> x(4, 2.0f);
  {
    SafetensorsWriter w(path, {{"x", DType::F32, {4}}, {"y", DType::F32, {4}}});
    w.write("x", x.data(), 16);
    EXPECT_FALSE(fs::exists(path));
    EXPECT_EQ(dir.entries(), 1u);  // the temporary file, beside the target
  }
  EXPECT_FALSE(fs::exists(path));
  EXPECT_EQ(dir.entries(), 0u);  // destroyed unfinished: temporary removed

  SafetensorsWriter w(path, {{"x", DType::F32, {4}}});
  w.write("x", x.data(), 16);
  EXPECT_FALSE(fs::exists(path));
  w.finish();
  EXPECT_TRUE(fs::exists(path));
  EXPECT_EQ(dir.entries(), 1u);
  EXPECT_EQ(SafetensorsFile::open(path)->find("x")->nbytes, 16u);
}

TEST(SafetensorsWriter, ChecksWritesAgainstSpecs) {
  ScratchDir dir;
  const std::string path = dir.file("checks.safetensors");
  const std::vector<float> x(4, 2.0f);
  SafetensorsWriter w(path, {{"x", DType::F32, {4}}, {"y", DType::F32, {2}}});
  expect_error([&] { w.write("y", x.data(), 8); }, {path, "'y' written where 'x' comes next"});
  expect_error([&] { w.write("x", x.data(), 12); }, {path, "12 bytes written, its spec needs 16"});
  w.write("x", x.data(), 16);
  expect_error([&] { w.finish(); }, {path, "after 1 of 2 tensors; 'y' not written"});
  w.write("y", x.data(), 8);
  expect_error([&] { w.write("z", x.data(), 4); }, {path, "all 2 tensors are done"});
  w.finish();
  expect_error([&] { w.finish(); }, {path, "finish() called twice"});
  expect_error(
      [&] {
        SafetensorsWriter w2(path, {{"a", DType::F32, {1}}, {"a", DType::F32, {1}}});
      },
      {path, "'a' given twice"});
  expect_error(
      [&] {
        SafetensorsWriter w2(path, {{"a", DType::F32, {-1}}});
      },
      {path, "negative or overflows"});
}

// ---- corrupt files: each case names the file and a phrase of its own ----

struct CorruptCase {
  std::string name;
  std::string bytes;
  std::vector<std::string> phrases;
};

std::vector<CorruptCase> corrupt_cases() {
  const std::string ok = entry("a", "F32", "[2]", "[0,8]");
  return {
      {"FileShorterThan8Bytes",
       std::string("\x10\0\0\0\0", 5),
       {"file is 5 bytes, shorter than the 8-byte"}},
      {"ZeroHeaderLength", le64(0) + "{}", {"header length is zero"}},
      {"HeaderLongerThanFile", le64(1000) + "{}", {"header length 1000 is larger than the file"}},
      {"HeaderOver100MB", le64(100'000'001) + "{}", {"header length 100000001 exceeds the limit"}},
      {"HeaderNotJson", st_bytes("{\"a\": nope}", 0), {"header is not valid JSON"}},
      {"HeaderNotUtf8", st_bytes("{\"\xff\xfe\": 1}", 0), {"header is not valid UTF-8 (byte 10)"}},
      {"HeaderIsArray", st_bytes("[1, 2]", 0), {"header is an array, not an object"}},
      {"HeaderTooDeep",
       st_bytes(std::string(100, '[') + std::string(100, ']'), 0),
       {"header nests deeper than 64 levels"}},
      {"EntryNotObject",
       st_bytes(R"({"a": 5})", 0),
       {"tensor 'a': entry is a number, not an object"}},
      {"MissingDtype",
       st_bytes(R"({"a": {"shape": [2], "data_offsets": [0, 8]}})", 8),
       {"tensor 'a': missing field 'dtype'"}},
      {"DtypeNotString",
       st_bytes(R"({"a": {"dtype": 4, "shape": [2], "data_offsets": [0, 8]}})", 8),
       {"tensor 'a': 'dtype' is a number, not a string"}},
      {"UnknownDtype",
       st_bytes(obj({entry("a", "F8_E4M3", "[2]", "[0,2]")}), 2),
       {"tensor 'a': unknown dtype 'F8_E4M3'"}},
      {"MissingShape",
       st_bytes(R"({"a": {"dtype": "F32", "data_offsets": [0, 8]}})", 8),
       {"tensor 'a': missing field 'shape'"}},
      {"ShapeNotArray",
       st_bytes(obj({entry("a", "F32", "\"2\"", "[0,8]")}), 8),
       {"tensor 'a': 'shape' is a string, not an array"}},
      {"NegativeDim",
       st_bytes(obj({entry("a", "F32", "[2,-3]", "[0,8]")}), 8),
       {"tensor 'a': shape dim 1 is a negative integer"}},
      {"NonIntegerDim",
       st_bytes(obj({entry("a", "F32", "[2.5]", "[0,8]")}), 8),
       {"tensor 'a': shape dim 0 is non-integer 2.5"}},
      {"DimTooLarge",
       st_bytes(obj({entry("a", "U8", "[18446744073709551615]", "[0,8]")}), 8),
       {"tensor 'a': shape dim 0 is 18446744073709551615, too large"}},
      {"MissingOffsets",
       st_bytes(R"({"a": {"dtype": "F32", "shape": [2]}})", 8),
       {"tensor 'a': missing field 'data_offsets'"}},
      {"OffsetsNotAPair",
       st_bytes(obj({entry("a", "F32", "[2]", "[0]")}), 8),
       {"tensor 'a': 'data_offsets' must be an array of two integers, got [0]"}},
      {"NegativeOffset",
       st_bytes(obj({entry("a", "F32", "[2]", "[-8,0]")}), 8),
       {"tensor 'a': data_offsets[0] is a negative integer"}},
      {"BeginAfterEnd",
       st_bytes(obj({entry("a", "F32", "[0]", "[8,4]")}), 8),
       {"tensor 'a': data_offsets begin 8 > end 4"}},
      {"OffsetsOutOfRange",
       st_bytes(obj({entry("a", "U8", "[1000]", "[0,1000]")}), 8),
       {"tensor 'a': data_offsets end 1000 is beyond the data section (8 bytes)"}},
      {"TruncatedData",
       st_bytes(obj({ok, entry("b", "F32", "[4]", "[8,24]")}), 20),
       {"tensor 'b': data_offsets end 24 is beyond the data section (20 bytes); file truncated?"}},
      {"SizeMismatch",
       st_bytes(obj({entry("lm_head.weight", "BF16", "[2,3]", "[0,10]")}), 10),
       {"tensor 'lm_head.weight': shape [2, 3] of BF16 needs 12 bytes but data_offsets span 10"}},
      {"ShapeOverflow",
       st_bytes(obj({entry("a", "F32", "[4294967296,4294967296,16]", "[0,8]")}), 8),
       {"tensor 'a': shape [4294967296, 4294967296, 16] of F32 overflows"}},
      {"OverlappingRanges",
       st_bytes(obj({ok, entry("b", "F32", "[2]", "[4,12]")}), 12),
       {"tensor 'b': data_offsets [4, 12] overlap tensor 'a' ending at 8"}},
      {"GapBetweenRanges",
       st_bytes(obj({ok, entry("b", "F32", "[2]", "[12,20]")}), 20),
       {"tensor 'b': gap of 4 bytes in the data section before it (at offset 8)"}},
      {"GapAtStart",
       st_bytes(obj({entry("a", "F32", "[2]", "[4,12]")}), 12),
       {"tensor 'a': gap of 4 bytes in the data section before it (at offset 0)"}},
      {"TrailingBytes", st_bytes(obj({ok}), 11), {"3 trailing bytes after the last tensor"}},
      {"DuplicateNames",
       st_bytes(obj({ok, entry("a", "F32", "[2]", "[8,16]")}), 16),
       {"header has duplicate key 'a' (duplicate tensor name)"}},
      {"DuplicateField",
       st_bytes(R"({"a": {"dtype": "F32", "dtype": "U8", "shape": [2], "data_offsets": [0, 8]}})",
                8),
       {"header has duplicate key 'dtype'"}},
      {"MetadataNotObject",
       st_bytes(R"({"__metadata__": "pt"})", 0),
       {"__metadata__ is a string, not an object of strings"}},
      {"MetadataNotStrings",
       st_bytes(R"({"__metadata__": {"format": "pt", "n": 3}})", 0),
       {"__metadata__ 'n' is a number, not a string"}},
  };
}

class SafetensorsCorrupt : public ::testing::TestWithParam<CorruptCase> {};

TEST_P(SafetensorsCorrupt, OpenThrowsNamingFileAndFault) {
  ScratchDir dir;
  const std::string path = dir.file(GetParam().name + ".safetensors");
  write_bytes(path, GetParam().bytes);
  std::vector<std::string> phrases = GetParam().phrases;
  phrases.insert(phrases.begin(), path + ": ");
  expect_error([&] { SafetensorsFile::open(path); }, phrases);
  expect_error([&] { Checkpoint::open_file(path); }, phrases);
  // Read into memory instead of mapped: the same checks, the same messages.
  expect_error([&] { SafetensorsFile::open(path, FileAccess::kRead); }, phrases);
}

INSTANTIATE_TEST_SUITE_P(SafetensorsCorrupt, SafetensorsCorrupt,
                         ::testing::ValuesIn(corrupt_cases()),
                         [](const ::testing::TestParamInfo<CorruptCase>& info) {
                           return info.param.name;
                         });

TEST(SafetensorsCorruptCases, BaselineOfTheCasesIsValid) {
  // The cases above are this valid file with one fault each.
  ScratchDir dir;
  const std::string path = dir.file("ok.safetensors");
  write_bytes(
      path,
      st_bytes(obj({entry("a", "F32", "[2]", "[0,8]"), entry("b", "F32", "[2]", "[8,16]")}), 16));
  EXPECT_EQ(SafetensorsFile::open(path)->tensors().size(), 2u);
  EXPECT_GE(corrupt_cases().size(), 30u);
}

// ---- corrupt checkpoint directories ----

class CheckpointCorrupt : public ::testing::Test {
 protected:
  void SetUp() override {
    const float v[2] = {1.0f, 2.0f};
    write_safetensors(dir_.file("s1.safetensors"), {{{"a", DType::F32, {2}}, v}});
    write_safetensors(dir_.file("s2.safetensors"), {{{"b", DType::F32, {2}}, v}});
  }
  void write_index(const std::string& text) { write_bytes(index_path(), text); }
  std::string index_path() const { return dir_.file("model.safetensors.index.json"); }
  std::string dir() const { return dir_.path().string(); }
  void expect_open_error(const std::vector<std::string>& phrases) {
    expect_error([&] { Checkpoint::open_dir(dir()); }, phrases);
  }

  ScratchDir dir_;
};

TEST_F(CheckpointCorrupt, MissingTensorViaGet) {
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  const Checkpoint c = Checkpoint::open_dir(dir());
  EXPECT_EQ(c.find("model.norm.weight"), nullptr);
  expect_error([&] { c.get("model.norm.weight"); },
               {"missing tensor model.norm.weight in " + dir()});
}

TEST_F(CheckpointCorrupt, NoWeightsInDirectory) {
  expect_open_error({dir() + ": no model.safetensors or model.safetensors.index.json"});
}

TEST_F(CheckpointCorrupt, IndexNotJson) {
  write_index(R"({"weight_map": {"a": "s1.safetensors",)");
  expect_open_error({index_path() + ": index is not valid JSON"});
}

TEST_F(CheckpointCorrupt, IndexNotObject) {
  write_index(R"(["s1.safetensors"])");
  expect_open_error({index_path() + ": index is an array, not an object"});
}

TEST_F(CheckpointCorrupt, IndexWithoutWeightMap) {
  write_index(R"({"metadata": {"total_size": 16}})");
  expect_open_error({index_path() + ": missing field 'weight_map'"});
}

TEST_F(CheckpointCorrupt, WeightMapNotObject) {
  write_index(R"({"weight_map": ["s1.safetensors"]})");
  expect_open_error({index_path() + ": 'weight_map' is an array, not an object"});
}

TEST_F(CheckpointCorrupt, WeightMapValueNotString) {
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": 2}})");
  expect_open_error({index_path() + ": weight_map['b'] is a number, not a string"});
}

TEST_F(CheckpointCorrupt, DuplicateIndexEntry) {
  write_index(R"({"weight_map": {"a": "s1.safetensors", "a": "s2.safetensors"}})");
  expect_open_error({index_path() + ": index has duplicate key 'a'"});
}

TEST_F(CheckpointCorrupt, MissingShard) {
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s3.safetensors"}})");
  expect_open_error({index_path(), "shard '" + dir_.file("s3.safetensors") + "'", "is missing"});
}

TEST_F(CheckpointCorrupt, ShardEscapesDirectory) {
  write_index(R"({"weight_map": {"a": "../s1.safetensors", "b": "s2.safetensors"}})");
  expect_open_error(
      {index_path(), "weight_map['a']: shard name '../s1.safetensors' escapes the directory"});
}

TEST_F(CheckpointCorrupt, ShardInSubdirectory) {
  write_index(R"({"weight_map": {"a": "sub/s1.safetensors", "b": "s2.safetensors"}})");
  expect_open_error({index_path(), "shard name 'sub/s1.safetensors' escapes the directory"});
}

TEST_F(CheckpointCorrupt, TensorMissingFromItsShard) {
  write_index(R"({"weight_map": {"a": "s2.safetensors", "b": "s2.safetensors"}})");
  expect_open_error({dir_.file("s2.safetensors"), "tensor 'a' is missing from its shard"});
}

TEST_F(CheckpointCorrupt, TensorInTwoShards) {
  const float v[2] = {3.0f, 4.0f};
  write_safetensors(dir_.file("s2.safetensors"),
                    {{{"a", DType::F32, {2}}, v}, {{"b", DType::F32, {2}}, v}});
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_open_error({index_path(), "tensor 'a' appears in two shards", dir_.file("s1.safetensors"),
                     dir_.file("s2.safetensors")});
}

TEST_F(CheckpointCorrupt, TensorNotListedInIndex) {
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  const float v[2] = {3.0f, 4.0f};
  write_safetensors(dir_.file("s1.safetensors"),
                    {{{"a", DType::F32, {2}}, v}, {{"extra", DType::F32, {2}}, v}});
  expect_open_error({dir_.file("s1.safetensors"), "tensor 'extra' is not listed in the index"});
}

TEST_F(CheckpointCorrupt, CorruptShardNamesTheShard) {
  write_bytes(dir_.file("s2.safetensors"), "short");
  write_index(R"({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}})");
  expect_open_error({dir_.file("s2.safetensors") + ": file is 5 bytes"});
}

}  // namespace
}  // namespace sparsa::io
