// Read-only memory mapping of a whole file; the bytes stay valid while the object lives.
//
//   auto f = sparsa::MappedFile::open("model.safetensors");
//   const uint8_t* p = f->data();  size_t n = f->size();
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "sparsa/core/huge_pages.h"

namespace sparsa {

/// How a file's bytes reach memory.
enum class FileAccess : uint8_t {
  /// mmap of the file: nothing is copied; pages come from the page cache as they are touched.
  kMap,
  /// Read into anonymous memory aligned to 2 MiB and advised for transparent huge pages (like
  /// llama.cpp's --no-mmap): costs a copy and the file's size in RAM, but streaming reads of the
  /// weights cross far fewer page (TLB) boundaries.
  kRead,
};

class MappedFile {
 public:
  /// Maps or reads `path`; throws sparsa::Error naming the file when it cannot be opened, mapped
  /// or read in full.
  static std::shared_ptr<MappedFile> open(const std::string& path,
                                          FileAccess access = FileAccess::kMap);
  ~MappedFile();
  MappedFile(const MappedFile&) = delete;
  MappedFile& operator=(const MappedFile&) = delete;

  const uint8_t* data() const { return data_; }
  size_t size() const { return size_; }
  const std::string& path() const { return path_; }
  FileAccess access() const { return access_; }

 private:
  MappedFile() = default;
  std::string path_;
  const uint8_t* data_ = nullptr;
  size_t size_ = 0;
  FileAccess access_ = FileAccess::kMap;
  HugePageBuffer read_;  // kRead: the file's bytes
};

/// Reads a whole (small) file into a string; throws naming the file on failure.
std::string read_text_file(const std::string& path);

/// Writes `bytes` to `path` atomically: a temporary file beside it, fsync, rename, fsync of the
/// directory. A crash leaves either the old file or the new one, never half of one.
void write_file_atomic(const std::string& path, const void* bytes, size_t n);

}  // namespace sparsa
