#include "sparsa/io/safetensors.h"

#include <fcntl.h>
#include <fmt/ranges.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <filesystem>
#include <limits>
#include <nlohmann/json.hpp>
#include <set>
#include <string_view>
#include <utility>

#include "sparsa/core/error.h"

namespace sparsa::io {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr uint64_t kMaxHeaderBytes = 100u * 1000u * 1000u;
constexpr int kMaxJsonDepth = 64;
constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

std::string shape_str(const std::vector<int64_t>& shape) {
  return fmt::format("[{}]", fmt::join(shape, ", "));
}

// Bytes of `shape` elements of `elem` bytes each; false on overflow.
bool shape_bytes(const std::vector<int64_t>& shape, size_t elem, uint64_t* out) {
  uint64_t n = elem;
  for (int64_t d : shape) {
    if (d < 0 || __builtin_mul_overflow(n, static_cast<uint64_t>(d), &n)) return false;
  }
  *out = n;
  return true;
}

// Strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF.
bool valid_utf8(std::string_view s, size_t* bad_at) {
  const auto* p = reinterpret_cast<const unsigned char*>(s.data());
  const size_t n = s.size();
  size_t i = 0;
  while (i < n) {
    const unsigned c = p[i];
    size_t len;
    unsigned lo = 0x80, hi = 0xbf;
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xc2 && c <= 0xdf) {
      len = 2;
    } else if (c >= 0xe0 && c <= 0xef) {
      len = 3;
      if (c == 0xe0) lo = 0xa0;
      if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
      len = 4;
      if (c == 0xf0) lo = 0x90;
      if (c == 0xf4) hi = 0x8f;
    } else {
      *bad_at = i;
      return false;
    }
    if (n - i < len || p[i + 1] < lo || p[i + 1] > hi) {
      *bad_at = i;
      return false;
    }
    for (size_t k = 2; k < len; ++k) {
      if ((p[i + k] & 0xc0) != 0x80) {
        *bad_at = i;
        return false;
      }
    }
    i += len;
  }
  return true;
}

// nlohmann keeps the last of duplicate keys silently, so duplicates are caught while parsing.
json parse_json_strict(std::string_view text, const std::string& path, std::string_view what) {
  std::vector<std::set<std::string>> keys;
  const json::parser_callback_t cb = [&](int depth, json::parse_event_t event, json& parsed) {
    if (depth > kMaxJsonDepth)
      fail("{}: {} nests deeper than {} levels", path, what, kMaxJsonDepth);
    switch (event) {
      case json::parse_event_t::object_start:
        keys.emplace_back();
        break;
      case json::parse_event_t::object_end:
        keys.pop_back();
        break;
      case json::parse_event_t::key: {
        const std::string& k = parsed.get_ref<const std::string&>();
        if (!keys.back().insert(k).second) {
          fail("{}: {} has duplicate key '{}'{}", path, what, k,
               what == "header" && keys.size() == 1 ? " (duplicate tensor name)" : "");
        }
        break;
      }
      default:
        break;
    }
    return true;
  };
  try {
    return json::parse(text.begin(), text.end(), cb);
  } catch (const json::exception& e) {
    fail("{}: {} is not valid JSON: {}", path, what, e.what());
  }
}

bool is_nonneg_int(const json& v) { return v.is_number_unsigned(); }

std::string kind(const json& v) {
  if (v.is_null()) return "null";
  const std::string_view t = v.type_name();
  return fmt::format("{} {}", t == "array" || t == "object" ? "an" : "a", t);
}

std::string json_kind(const json& v) {
  if (v.is_number_integer() && !v.is_number_unsigned()) return "a negative integer";
  if (v.is_number_float()) return fmt::format("non-integer {}", v.dump());
  return kind(v);
}

struct Range {
  uint64_t begin, end;
  size_t tensor;
};

}  // namespace

int64_t TensorView::numel() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

size_t TensorSpec::nbytes() const {
  uint64_t n = 0;
  SPARSA_CHECK(shape_bytes(shape, dtype_size(dtype), &n) && n <= std::numeric_limits<size_t>::max(),
               "tensor '{}': shape {} of {} is negative or overflows", name, shape_str(shape),
               dtype_name(dtype));
  return static_cast<size_t>(n);
}

std::shared_ptr<SafetensorsFile> SafetensorsFile::open(const std::string& path,
                                                       FileAccess access) {
  auto st = std::make_shared<SafetensorsFile>();
  st->file_ = MappedFile::open(path, access);
  const uint8_t* base = st->file_->data();
  const uint64_t size = st->file_->size();

  SPARSA_CHECK(size >= 8, "{}: file is {} bytes, shorter than the 8-byte header length", path,
               size);
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | base[i];
  SPARSA_CHECK(header_len > 0, "{}: header length is zero", path);
  SPARSA_CHECK(header_len <= kMaxHeaderBytes, "{}: header length {} exceeds the limit of {} bytes",
               path, header_len, kMaxHeaderBytes);
  SPARSA_CHECK(header_len <= size - 8, "{}: header length {} is larger than the file ({} bytes)",
               path, header_len, size);

  const std::string_view text(reinterpret_cast<const char*>(base + 8), header_len);
  size_t bad_at = 0;
  SPARSA_CHECK(valid_utf8(text, &bad_at), "{}: header is not valid UTF-8 (byte {})", path,
               8 + bad_at);
  const json header = parse_json_strict(text, path, "header");
  SPARSA_CHECK(header.is_object(), "{}: header is {}, not an object", path, kind(header));

  const uint64_t data_size = size - 8 - header_len;
  const uint8_t* data = base + 8 + header_len;
  std::vector<Range> ranges;
  ranges.reserve(header.size());
  st->tensors_.reserve(header.size());

  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      SPARSA_CHECK(entry.is_object(), "{}: __metadata__ is {}, not an object of strings", path,
                   kind(entry));
      for (const auto& [k, v] : entry.items()) {
        SPARSA_CHECK(v.is_string(), "{}: __metadata__ '{}' is {}, not a string", path, k, kind(v));
        st->metadata_.emplace(k, v.get<std::string>());
      }
      continue;
    }
    SPARSA_CHECK(entry.is_object(), "{}: tensor '{}': entry is {}, not an object", path, name,
                 kind(entry));

    const auto dt = entry.find("dtype");
    SPARSA_CHECK(dt != entry.end(), "{}: tensor '{}': missing field 'dtype'", path, name);
    SPARSA_CHECK(dt->is_string(), "{}: tensor '{}': 'dtype' is {}, not a string", path, name,
                 kind(*dt));
    const auto dtype = parse_dtype(dt->get_ref<const std::string&>());
    SPARSA_CHECK(dtype.has_value(), "{}: tensor '{}': unknown dtype '{}'", path, name,
                 dt->get_ref<const std::string&>());

    const auto sh = entry.find("shape");
    SPARSA_CHECK(sh != entry.end(), "{}: tensor '{}': missing field 'shape'", path, name);
    SPARSA_CHECK(sh->is_array(), "{}: tensor '{}': 'shape' is {}, not an array", path, name,
                 kind(*sh));
    std::vector<int64_t> shape;
    shape.reserve(sh->size());
    for (size_t i = 0; i < sh->size(); ++i) {
      const json& d = (*sh)[i];
      SPARSA_CHECK(is_nonneg_int(d),
                   "{}: tensor '{}': shape dim {} is {}, not a non-negative integer", path, name, i,
                   json_kind(d));
      const uint64_t v = d.get<uint64_t>();
      SPARSA_CHECK(v <= static_cast<uint64_t>(std::numeric_limits<int64_t>::max()),
                   "{}: tensor '{}': shape dim {} is {}, too large", path, name, i, v);
      shape.push_back(static_cast<int64_t>(v));
    }

    const auto off = entry.find("data_offsets");
    SPARSA_CHECK(off != entry.end(), "{}: tensor '{}': missing field 'data_offsets'", path, name);
    SPARSA_CHECK(off->is_array() && off->size() == 2,
                 "{}: tensor '{}': 'data_offsets' must be an array of two integers, got {}", path,
                 name, off->dump());
    for (size_t i = 0; i < 2; ++i) {
      SPARSA_CHECK(is_nonneg_int((*off)[i]),
                   "{}: tensor '{}': data_offsets[{}] is {}, not a non-negative integer", path,
                   name, i, json_kind((*off)[i]));
    }
    const uint64_t begin = (*off)[0].get<uint64_t>();
    const uint64_t end = (*off)[1].get<uint64_t>();
    SPARSA_CHECK(begin <= end, "{}: tensor '{}': data_offsets begin {} > end {}", path, name, begin,
                 end);
    SPARSA_CHECK(end <= data_size,
                 "{}: tensor '{}': data_offsets end {} is beyond the data section ({} bytes); "
                 "file truncated?",
                 path, name, end, data_size);

    uint64_t need = 0;
    SPARSA_CHECK(shape_bytes(shape, dtype_size(*dtype), &need),
                 "{}: tensor '{}': shape {} of {} overflows 64-bit size arithmetic", path, name,
                 shape_str(shape), dtype_name(*dtype));
    SPARSA_CHECK(need == end - begin,
                 "{}: tensor '{}': shape {} of {} needs {} bytes but data_offsets span {}", path,
                 name, shape_str(shape), dtype_name(*dtype), need, end - begin);

    TensorView tv;
    tv.name = name;
    tv.dtype = *dtype;
    tv.shape = std::move(shape);
    tv.data = data + begin;
    tv.nbytes = static_cast<size_t>(end - begin);
    tv.file = path;
    ranges.push_back({begin, end, st->tensors_.size()});
    st->tensors_.push_back(std::move(tv));
  }

  std::stable_sort(ranges.begin(), ranges.end(), [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end < b.end;
  });
  uint64_t pos = 0;
  const std::string* prev = nullptr;
  for (const Range& r : ranges) {
    const std::string& name = st->tensors_[r.tensor].name;
    if (r.begin < pos) {
      fail("{}: tensor '{}': data_offsets [{}, {}] overlap tensor '{}' ending at {}", path, name,
           r.begin, r.end, *prev, pos);
    }
    if (r.begin > pos) {
      fail("{}: tensor '{}': gap of {} bytes in the data section before it (at offset {})", path,
           name, r.begin - pos, pos);
    }
    pos = r.end;
    prev = &name;
  }
  SPARSA_CHECK(pos == data_size,
               "{}: {} trailing bytes after the last tensor (data section is {} bytes, tensors "
               "end at {})",
               path, data_size - pos, data_size, pos);

  std::vector<TensorView> ordered;
  ordered.reserve(ranges.size());
  for (const Range& r : ranges) ordered.push_back(std::move(st->tensors_[r.tensor]));
  st->tensors_ = std::move(ordered);
  for (size_t i = 0; i < st->tensors_.size(); ++i) st->index_.emplace(st->tensors_[i].name, i);
  return st;
}

const TensorView* SafetensorsFile::find(const std::string& name) const {
  const auto it = index_.find(name);
  return it == index_.end() ? nullptr : &tensors_[it->second];
}

Checkpoint Checkpoint::open_file(const std::string& path, FileAccess access) {
  Checkpoint c;
  c.source_ = path;
  c.files_.push_back(SafetensorsFile::open(path, access));
  for (const TensorView& t : c.files_[0]->tensors()) c.by_name_.emplace(t.name, &t);
  return c;
}

Checkpoint Checkpoint::open_dir(const std::string& dir, FileAccess access) {
  const fs::path d(dir);
  std::error_code ec;
  if (fs::exists(d / kSingleName, ec)) {
    Checkpoint c = open_file((d / kSingleName).string(), access);
    c.source_ = dir;
    return c;
  }
  const std::string index_path = (d / kIndexName).string();
  SPARSA_CHECK(fs::exists(index_path, ec), "{}: no {} or {} in this directory", dir, kSingleName,
               kIndexName);

  const json index = parse_json_strict(read_text_file(index_path), index_path, "index");
  SPARSA_CHECK(index.is_object(), "{}: index is {}, not an object", index_path, kind(index));
  const auto wm = index.find("weight_map");
  SPARSA_CHECK(wm != index.end(), "{}: missing field 'weight_map'", index_path);
  SPARSA_CHECK(wm->is_object(), "{}: 'weight_map' is {}, not an object", index_path, kind(*wm));

  std::map<std::string, std::vector<std::string>> shards;  // shard file -> tensor names
  for (const auto& [name, shard] : wm->items()) {
    SPARSA_CHECK(shard.is_string(), "{}: weight_map['{}'] is {}, not a string", index_path, name,
                 kind(shard));
    const std::string& file = shard.get_ref<const std::string&>();
    SPARSA_CHECK(!file.empty() && file.find('/') == std::string::npos &&
                     file.find('\\') == std::string::npos && file.find("..") == std::string::npos,
                 "{}: weight_map['{}']: shard name '{}' escapes the directory", index_path, name,
                 file);
    shards[file].push_back(name);
  }

  Checkpoint c;
  c.source_ = dir;
  for (const auto& [file, names] : shards) {
    const std::string shard_path = (d / file).string();
    SPARSA_CHECK(fs::is_regular_file(shard_path, ec),
                 "{}: shard '{}' listed in the index is missing", index_path, shard_path);
    auto f = SafetensorsFile::open(shard_path, access);
    for (const std::string& name : names) {
      SPARSA_CHECK(f->find(name) != nullptr,
                   "{}: tensor '{}' is missing from its shard (the index {} names it)", shard_path,
                   name, index_path);
    }
    for (const TensorView& t : f->tensors()) {
      const auto [it, inserted] = c.by_name_.emplace(t.name, &t);
      SPARSA_CHECK(inserted, "{}: tensor '{}' appears in two shards, {} and {}", index_path, t.name,
                   it->second->file, shard_path);
    }
    c.files_.push_back(std::move(f));
  }
  for (const auto& [name, view] : c.by_name_) {
    const auto it = wm->find(name);
    SPARSA_CHECK(it != wm->end() && fs::path(view->file).filename() == it->get<std::string>(),
                 "{}: tensor '{}' is not listed in the index {} for this shard", view->file, name,
                 index_path);
  }
  return c;
}

const TensorView* Checkpoint::find(const std::string& name) const {
  const auto it = by_name_.find(name);
  return it == by_name_.end() ? nullptr : it->second;
}

const TensorView& Checkpoint::get(const std::string& name) const {
  const TensorView* t = find(name);
  SPARSA_CHECK(t != nullptr, "missing tensor {} in {}", name, source_);
  return *t;
}

std::vector<std::string> Checkpoint::names() const {
  std::vector<std::string> out;
  out.reserve(by_name_.size());
  for (const auto& [name, view] : by_name_) out.push_back(name);
  return out;
}

size_t Checkpoint::total_bytes() const {
  size_t n = 0;
  for (const auto& [name, view] : by_name_) n += view->nbytes;
  return n;
}

namespace {

void write_all(int fd, const void* bytes, size_t n, const std::string& path) {
  const auto* p = static_cast<const uint8_t*>(bytes);
  while (n > 0) {
    const ssize_t w = ::write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    SPARSA_CHECK(w > 0, "{}: write failed: {}", path, std::strerror(errno));
    p += w;
    n -= static_cast<size_t>(w);
  }
}

}  // namespace

SafetensorsWriter::SafetensorsWriter(std::string path, std::vector<TensorSpec> specs,
                                     std::map<std::string, std::string> metadata)
    : path_(std::move(path)), specs_(std::move(specs)) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  std::set<std::string_view> seen;
  uint64_t offset = 0;
  for (const TensorSpec& s : specs_) {
    SPARSA_CHECK(!s.name.empty() && s.name != "__metadata__", "{}: invalid tensor name '{}'", path_,
                 s.name);
    SPARSA_CHECK(seen.insert(s.name).second, "{}: tensor '{}' given twice", path_, s.name);
    uint64_t n = 0;
    SPARSA_CHECK(shape_bytes(s.shape, dtype_size(s.dtype), &n),
                 "{}: tensor '{}': shape {} of {} is negative or overflows", path_, s.name,
                 shape_str(s.shape), dtype_name(s.dtype));
    SPARSA_CHECK(!__builtin_add_overflow(offset, n, &n), "{}: tensor '{}': offsets overflow", path_,
                 s.name);
    header[s.name] = {{"dtype", std::string(dtype_name(s.dtype))},
                      {"shape", s.shape},
                      {"data_offsets", {offset, n}}};
    offset = n;
  }
  std::string text = header.dump();
  text.append((8 - (8 + text.size()) % 8) % 8, ' ');
  SPARSA_CHECK(text.size() <= kMaxHeaderBytes, "{}: header of {} bytes exceeds the limit of {}",
               path_, text.size(), kMaxHeaderBytes);

  const fs::path target(path_);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string tmpl = (dir / fmt::format(".{}.tmp.XXXXXX", target.filename().string())).string();
  fd_ = ::mkostemp(tmpl.data(), O_CLOEXEC);
  SPARSA_CHECK(fd_ >= 0, "{}: cannot create a temporary file beside it: {}", path_,
               std::strerror(errno));
  tmp_path_ = std::move(tmpl);
  ::fchmod(fd_, 0644);

  uint8_t len[8];
  for (int i = 0; i < 8; ++i) len[i] = static_cast<uint8_t>(text.size() >> (8 * i));
  write_all(fd_, len, sizeof len, tmp_path_);
  write_all(fd_, text.data(), text.size(), tmp_path_);
}

SafetensorsWriter::~SafetensorsWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_ && !tmp_path_.empty()) ::unlink(tmp_path_.c_str());
}

void SafetensorsWriter::write(const std::string& name, const void* data, size_t nbytes) {
  SPARSA_CHECK(!finished_, "{}: write of tensor '{}' after finish()", path_, name);
  SPARSA_CHECK(next_ < specs_.size(), "{}: tensor '{}' written but all {} tensors are done", path_,
               name, specs_.size());
  const TensorSpec& s = specs_[next_];
  SPARSA_CHECK(name == s.name, "{}: tensor '{}' written where '{}' comes next", path_, name,
               s.name);
  SPARSA_CHECK(nbytes == s.nbytes(), "{}: tensor '{}': {} bytes written, its spec needs {}", path_,
               name, nbytes, s.nbytes());
  SPARSA_CHECK(data != nullptr || nbytes == 0, "{}: tensor '{}': null data", path_, name);
  write_all(fd_, data, nbytes, tmp_path_);
  ++next_;
}

void SafetensorsWriter::finish() {
  SPARSA_CHECK(!finished_, "{}: finish() called twice", path_);
  SPARSA_CHECK(next_ == specs_.size(), "{}: finish() after {} of {} tensors; '{}' not written",
               path_, next_, specs_.size(), specs_[next_].name);
  const int fd = std::exchange(fd_, -1);
  if (::fsync(fd) != 0) {
    const int e = errno;
    ::close(fd);
    fail("{}: cannot flush to disk: {}", tmp_path_, std::strerror(e));
  }
  SPARSA_CHECK(::close(fd) == 0, "{}: cannot flush to disk: {}", tmp_path_, std::strerror(errno));
  SPARSA_CHECK(::rename(tmp_path_.c_str(), path_.c_str()) == 0, "{}: cannot rename into place: {}",
               path_, std::strerror(errno));
  finished_ = true;
  const fs::path target(path_);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  const int dfd = ::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dfd >= 0) {
    ::fsync(dfd);
    ::close(dfd);
  }
}

void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const std::map<std::string, std::string>& metadata) {
  std::vector<TensorSpec> specs;
  specs.reserve(tensors.size());
  for (const TensorData& t : tensors) specs.push_back(t.spec);
  SafetensorsWriter w(path, std::move(specs), metadata);
  for (const TensorData& t : tensors) w.write(t.spec.name, t.data, t.spec.nbytes());
  w.finish();
}

}  // namespace sparsa::io
