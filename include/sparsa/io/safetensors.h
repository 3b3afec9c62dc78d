// safetensors checkpoints, read through mmap without copying and validated in full.
//
// Format (https://github.com/huggingface/safetensors): 8-byte little-endian header length N,
// N bytes of JSON {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
// then the data section; offsets are relative to the data section.
//
//   auto ckpt = sparsa::io::Checkpoint::open_dir("models/tiny");   // one file or sharded
//   const sparsa::io::TensorView& w = ckpt.get("model.embed_tokens.weight");
//   // w.dtype, w.shape, w.data (points into the mapping), w.nbytes
#pragma once

#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "sparsa/core/dtype.h"
#include "sparsa/core/error.h"  // what open() and get() throw
#include "sparsa/core/mapped_file.h"

namespace sparsa::io {

/// One tensor inside a mapped file. `data` stays valid while its file (or Checkpoint) lives.
struct TensorView {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  const uint8_t* data = nullptr;
  size_t nbytes = 0;
  std::string file;  // the file it lives in, for error messages

  int64_t numel() const;
  int64_t dim(size_t i) const { return shape.at(i); }
};

/// One .safetensors file. open() validates everything before returning: header length within the
/// file and at most 100 MB, well-formed JSON object, known dtypes, integer shapes, offsets within
/// the data section, shape x dtype size equal to each byte range, ranges tiling the data section
/// exactly (no gap, no overlap), overflow-safe arithmetic. Errors name the file and the tensor.
class SafetensorsFile {
 public:
  static std::shared_ptr<SafetensorsFile> open(const std::string& path,
                                               FileAccess access = FileAccess::kMap);

  const std::string& path() const { return file_->path(); }
  /// Tensors in file order (ascending offset).
  const std::vector<TensorView>& tensors() const { return tensors_; }
  /// nullptr when absent.
  const TensorView* find(const std::string& name) const;
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  /// The mapping every TensorView::data points into.
  const MappedFile& mapping() const { return *file_; }

 private:
  std::shared_ptr<MappedFile> file_;
  std::vector<TensorView> tensors_;
  std::map<std::string, size_t> index_;
  std::map<std::string, std::string> metadata_;
};

/// All weights of a model directory: `model.safetensors`, or the shards that
/// `model.safetensors.index.json` lists (every listed shard must exist, every tensor must be in
/// the shard the index names, no tensor may appear twice).
class Checkpoint {
 public:
  static Checkpoint open_dir(const std::string& dir, FileAccess access = FileAccess::kMap);
  /// A single file, for tools and tests.
  static Checkpoint open_file(const std::string& path, FileAccess access = FileAccess::kMap);

  /// Throws sparsa::Error "missing tensor NAME in DIR" when absent.
  const TensorView& get(const std::string& name) const;
  const TensorView* find(const std::string& name) const;
  /// Names in sorted order.
  std::vector<std::string> names() const;
  size_t total_bytes() const;
  const std::string& source() const { return source_; }
  const std::vector<std::shared_ptr<SafetensorsFile>>& files() const { return files_; }

 private:
  std::string source_;
  std::vector<std::shared_ptr<SafetensorsFile>> files_;
  std::map<std::string, const TensorView*> by_name_;
};

/// What a writer is told about a tensor before its bytes arrive.
struct TensorSpec {
  std::string name;
  DType dtype = DType::F32;
  std::vector<int64_t> shape;
  size_t nbytes() const;
};

/// Streams a .safetensors file to disk: the header first (from the specs), then each tensor's
/// bytes in spec order. The file is written under a temporary name and only renamed into place
/// by finish() after an fsync; destroying an unfinished writer deletes the temporary file.
class SafetensorsWriter {
 public:
  SafetensorsWriter(std::string path, std::vector<TensorSpec> specs,
                    std::map<std::string, std::string> metadata = {});
  ~SafetensorsWriter();
  SafetensorsWriter(const SafetensorsWriter&) = delete;
  SafetensorsWriter& operator=(const SafetensorsWriter&) = delete;

  /// Writes the next tensor's bytes; `name` and `nbytes` must match the next spec.
  void write(const std::string& name, const void* data, size_t nbytes);
  /// fsync, rename into place, fsync the directory.
  void finish();

 private:
  std::string path_;
  std::string tmp_path_;
  std::vector<TensorSpec> specs_;
  size_t next_ = 0;
  int fd_ = -1;
  bool finished_ = false;
};

/// Convenience: writes whole in-memory tensors with SafetensorsWriter.
struct TensorData {
  TensorSpec spec;
  const void* data = nullptr;
};
void write_safetensors(const std::string& path, const std::vector<TensorData>& tensors,
                       const std::map<std::string, std::string>& metadata = {});

}  // namespace sparsa::io
