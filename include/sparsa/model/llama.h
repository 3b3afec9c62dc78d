// Llama-family decoders (Llama, Mistral, Qwen2) as one description: config → named weights →
// forward over a batch of tokens with a KV cache.
//
//   sparsa::ThreadPool pool(2);
//   auto model = sparsa::model::Model::load("models/tiny");
//   sparsa::model::KvCache cache(model->config(), 256);
//   std::vector<float> logits(model->config().vocab_size);
//   model->forward(ids, cache, logits.data(), /*all_logits=*/false, pool);   // prefill
//   model->forward({next_id}, cache, logits.data(), false, pool);            // one decode step
//
// Every linear layer runs through kernels::linear on a formats::PackedWeight: float weights are
// copied once into the kernels' panel layout (kernels::DenseWeight), compressed ones
// (pack-quantized, int-quantized, sparse-bitmask, sparse-24-bitmask, palettized, low-rank) are
// converted once at load into the layout their kernel streams. The reference path
// (LinearPath::kReference, or SPARSA_REFERENCE_LINEAR=1) decodes them to f32 instead.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "sparsa/core/aligned.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/core/thread_pool.h"
#include "sparsa/formats/packed_weight.h"
#include "sparsa/io/compressed_tensors.h"
#include "sparsa/io/model_config.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/kernels/linear.h"

namespace sparsa::model {

/// One layer of a KV cache as block_forward writes it and attention reads it: rows of
/// n_kv_heads * head_dim elements of `dtype` (F32, BF16 or I8). An I8 layer also has the scales
/// of its rows, per kv head: token t's head h row is k_scales[h * ld_scales + t] times its codes
/// (the layout kernels::AttentionShape takes).
struct KvLayer {
  void* k = nullptr;
  void* v = nullptr;
  DType dtype = DType::F32;
  float* k_scales = nullptr;  // I8 only: [n_kv_heads, capacity]
  float* v_scales = nullptr;
  int64_t ld_scales = 0;

  /// Sets the cache fields of an attention shape (dtype and any scales).
  void describe(kernels::AttentionShape& s) const {
    s.kv_dtype = dtype;
    s.k_scales = k_scales;
    s.v_scales = v_scales;
    s.ld_scales = ld_scales;
  }
};

/// Symmetric int8 quantization of one row of n values (an I8 cache's (token, kv head) row):
/// scale = max |x| / 127 and codes[i] = x[i] / scale rounded to nearest (ties to even), within
/// [-127, 127]; the row's largest magnitude becomes ±127. An all-zero row gets scale 0 and
/// codes 0. Returns the scale.
float quantize_kv_row(const float* x, int64_t n, int8_t* codes);

/// Keys and values of every layer for one sequence, [max_tokens, n_kv_heads * head_dim] per
/// layer, stored as
///   F32  (the default: exact),
///   BF16 (half the memory and half attention's reads; keys and values are rounded to nearest
///        even as they are written, as llama.cpp's f16 and vLLM's bf16 caches round them), or
///   I8   (a quarter of the memory and reads, plus 8 bytes per token and kv head: each (token,
///        kv head) row of head_dim keys, and of values, is quantized by quantize_kv_row as it is
///        written, keys after RoPE: symmetric absmax int8 as llama.cpp's q8_0 cache quantizes,
///        with one f32 scale per row where q8_0 has an f16 one per 32 values). The scales are
///        kept per layer as [n_kv_heads, max_tokens], head by head, so that attention reads one
///        head's scales over the keys contiguously.
/// Attention's arithmetic stays f32 for every type.
class KvCache {
 public:
  KvCache(const io::ModelConfig& config, int64_t max_tokens, DType dtype = DType::F32);

  /// Bytes one token's keys and values take over all layers, scales included (I8: 2 · n_kv_heads
  /// · (head_dim + 4) per layer).
  static int64_t bytes_per_token(const io::ModelConfig& config, DType dtype);

  DType dtype() const { return dtype_; }
  KvLayer layer(int64_t layer);
  /// Rows pos .. pos + n - 1 of a layer's keys and values from f32 rows (row stride ld).
  void write(int64_t layer, int64_t pos, const float* k, const float* v, int64_t n, int64_t ld);

  int64_t size() const { return size_; }
  int64_t capacity() const { return capacity_; }
  void clear() { size_ = 0; }
  /// Forgets everything after the first `n` tokens.
  void truncate(int64_t n);

  /// An F32 cache's rows (an error for the other types).
  float* keys(int64_t layer);
  float* values(int64_t layer);
  int64_t row_stride() const { return row_; }
  void advance(int64_t n) { size_ += n; }

 private:
  int64_t capacity_ = 0;
  int64_t size_ = 0;
  int64_t row_ = 0;
  int64_t head_dim_ = 0;
  DType dtype_ = DType::F32;
  std::vector<AlignedVector<float>> k_, v_;       // F32
  std::vector<AlignedVector<uint16_t>> kh_, vh_;  // BF16
  std::vector<AlignedVector<int8_t>> kq_, vq_;    // I8 codes
  std::vector<AlignedVector<float>> ks_, vs_;     // I8 scales, [n_kv_heads, capacity_] per layer
};

/// How Model::load runs the linear layers.
enum class LinearPath : uint8_t {
  /// Each weight in its packed layout (formats::PackedWeight), run by its format's kernels.
  kPacked,
  /// Compressed weights decoded to f32 (io::decode_weight) and run by the dense f32 kernel: the
  /// reference the packed path is tested against. Float weights are the same on both paths.
  kReference,
};

struct LoadOptions {
  /// kPacked unless the environment sets SPARSA_REFERENCE_LINEAR=1 (then kReference).
  LinearPath linear = LinearPath::kPacked;
  /// kMap: float weights are used in place from the mapped files. kRead: the files are read into
  /// huge-page-backed memory first (a user's --no-mmap).
  FileAccess file_access = FileAccess::kMap;
};

/// A linear layer: y = x Wᵀ + b.
struct Linear {
  std::string name;  // tensor name of the weight (or module name when stored compressed)
  /// The weight as a dense float matrix where there is one: a memory-mapped float tensor, or the
  /// decoded f32 weights (reference path; formats without a packed layout). Empty (data null)
  /// for a weight that exists only packed.
  kernels::DenseWeight weight;
  /// What the forward pass runs (for a low-rank weight W = U V: U [rows, rank]). Null: `weight`
  /// is run as it is (layers assembled by hand, e.g. by the compression pipeline).
  std::shared_ptr<const formats::PackedWeight> packed;
  /// Low-rank weights only: V [rank, cols], applied first (y = (x Vᵀ) Uᵀ).
  std::shared_ptr<const formats::PackedWeight> packed_v;
  std::vector<float> bias;  // empty when none
  /// 8: the input is quantized to int8 per token (symmetric, max|x| / 127) before the product,
  /// as W8A8 (SmoothQuant) layers run; 0: f32 input.
  int input_bits = 0;
  /// The stored format ("dense" when memory-mapped as is).
  std::string format = "dense";
  /// Decoded weights this layer owns (compressed checkpoints); `weight` points into them.
  std::shared_ptr<const std::vector<float>> owned;
  /// Bytes this layer's weight occupies on disk.
  size_t stored_bytes = 0;

  int64_t rows() const;
  int64_t cols() const;
  /// Bytes one decode step reads: the packed weight(s) (else the dense matrix) and the bias.
  size_t bytes_per_token() const;
  /// The layout the forward pass runs: "bf16", "int4g128", "sparse-bf16", "u[64]bf16·v[64]bf16"...
  std::string describe() const;
};

/// Scratch buffers of linear_forward(), grown on demand and reused.
struct LinearScratch {
  AlignedVector<float> xq;        // W8A8 layers: the int8-quantized input [n, cols]
  AlignedVector<float> low_rank;  // low-rank layers: x Vᵀ [n, rank]
};

/// y = x Wᵀ (no bias) for n rows of x through kernels::linear on the layer's packed weight(s),
/// after quantizing x to int8 per token when l.input_bits == 8.
void linear_forward(const Linear& l, const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy,
                    LinearScratch& scratch, ThreadPool& pool);

/// Several linear layers over the same input (q/k/v, gate/up): kernels::linear_many when every
/// one is a single packed weight, else linear_forward() one by one. Biases are not added.
struct LinearTarget {
  const Linear* linear = nullptr;
  float* y = nullptr;
  int64_t ldy = 0;
};
void linear_forward_many(const LinearTarget* targets, int count, const float* x, int64_t ldx,
                         int64_t n, LinearScratch& scratch, ThreadPool& pool);

struct Block {
  std::vector<float> attn_norm, mlp_norm;  // [hidden]
  Linear q, k, v, o, gate, up, down;
};

/// Called with the input of every linear layer (for calibration): the layer index, the
/// linear's name ("q", "k", "v", "o", "gate", "up", "down"), x [n_tokens, in_features].
using LinearInputHook =
    std::function<void(int64_t layer, const char* linear, const float* x, int64_t n_tokens)>;

/// Activations of one block over a chunk of tokens; grown on demand, reused across calls.
struct BlockWorkspace {
  int64_t tokens = 0;
  AlignedVector<float> xn, q, attn, gate, up, cos, sin;
  AlignedVector<float> k, v;  // the new rows before they are rounded into a BF16 or I8 cache
  LinearScratch linear;
  void reserve(const io::ModelConfig& config, int64_t n_tokens);
};

/// One decoder block over `n` tokens at positions pos0 .. pos0 + n - 1: x [n, hidden] is updated
/// in place (both residual branches); the block's keys and values are written to rows pos0 ..
/// of the cache layer ([>= pos0 + n, n_kv_heads * head_dim]), which must already hold rows
/// 0 .. pos0 - 1. `hook` (may be empty) sees every linear layer's input.
void block_forward(const io::ModelConfig& config, const Block& block, int64_t layer,
                   const std::vector<float>& rope_inv_freq, float* x, int64_t n, int64_t pos0,
                   KvLayer kv, BlockWorkspace& ws, const LinearInputHook& hook, ThreadPool& pool);
/// The same over an f32 cache.
inline void block_forward(const io::ModelConfig& config, const Block& block, int64_t layer,
                          const std::vector<float>& rope_inv_freq, float* x, int64_t n,
                          int64_t pos0, float* k_cache, float* v_cache, BlockWorkspace& ws,
                          const LinearInputHook& hook, ThreadPool& pool) {
  block_forward(config, block, layer, rope_inv_freq, x, n, pos0,
                KvLayer{k_cache, v_cache, DType::F32}, ws, hook, pool);
}

/// The rotary angles of one position: cos[i], sin[i] of position · inv_freq[i] for i < half
/// (the product in f32, as HF computes it).
void rope_angles(const float* inv_freq, int64_t half, int64_t position, float* cos, float* sin);

/// Rotary embedding (rotate-half, as HF Llama) of `heads` heads of width hd in each of n rows of
/// x (row stride ld); cos, sin: [n, hd / 2]. `inverse` applies the transposed rotation (the
/// backward pass: the gradient of the output becomes that of the input).
void apply_rope(float* x, int64_t ld, int64_t n, int64_t heads, int64_t hd, const float* cos,
                const float* sin, bool inverse = false);

/// y[t] += bias for n rows of stride ld; nothing when bias is empty.
void add_bias(float* y, int64_t ld, int64_t n, const std::vector<float>& bias);

/// Per-token symmetric int8 fake quantization (W8A8's dynamic activation quantization):
/// out[t] = clamp(round(x[t] / s), -127, 127) · s with s = max|x[t]| / 127; rows of dim floats.
void quantize_activations_int8(const float* x, int64_t n, int64_t dim, float* out);

/// RMSNorm over rows: out[t] = w * x[t] / sqrt(mean(x[t]²) + eps), x and out [n, dim].
void rms_norm(const float* x, const float* w, float eps, int64_t n, int64_t dim, float* out);

class Model {
 public:
  /// Loads DIR (config.json + safetensors). Float weights stay in the mmapped files; compressed
  /// ones are packed (or, on the reference path, decoded to f32); norms and biases are converted
  /// to f32. Throws sparsa::Error on any missing or ill-shaped tensor.
  static std::unique_ptr<Model> load(const std::string& dir, LoadOptions options = {});
  /// A model over weights built in memory (benchmarks of random weights in any packed format).
  /// The embedding's data and every Linear's dense `weight` must stay valid as long as `storage`
  /// lives; the model keeps it.
  static std::unique_ptr<Model> from_parts(io::ModelConfig config, io::TensorView embedding,
                                           std::vector<Block> blocks, std::vector<float> final_norm,
                                           Linear lm_head, std::shared_ptr<const void> storage);

  const io::ModelConfig& config() const { return config_; }
  const io::Checkpoint& checkpoint() const { return checkpoint_; }
  /// The checkpoint's compression (quantization_config, sparsity_config, sparsa_config).
  const io::CompressionConfig& compression() const { return compression_; }
  const std::vector<Block>& blocks() const { return blocks_; }
  const Linear& lm_head() const { return lm_head_; }
  const io::TensorView& embedding() const { return embed_; }
  const std::vector<float>& final_norm() const { return final_norm_; }
  const std::vector<float>& rope_inv_freq() const { return rope_inv_freq_; }
  /// Bytes of weights one decode step reads: every linear layer as packed (Linear::
  /// bytes_per_token), lm_head, one embedding row.
  size_t weight_bytes_per_token() const;
  LinearPath linear_path() const { return linear_path_; }

  /// Runs `tokens` at positions cache.size() ... and appends their keys and values to `cache`.
  /// logits: [vocab] for the last token, or [tokens.size(), vocab] when `all_logits`.
  void forward(std::span<const int32_t> tokens, KvCache& cache, float* logits, bool all_logits,
               ThreadPool& pool);

  void set_linear_input_hook(LinearInputHook hook) { hook_ = std::move(hook); }

 private:
  Model() = default;
  void forward_chunk(std::span<const int32_t> tokens, KvCache& cache, float* logits,
                     bool all_logits, ThreadPool& pool);

  io::ModelConfig config_;
  io::Checkpoint checkpoint_;
  io::CompressionConfig compression_;
  io::TensorView embed_;
  std::vector<Block> blocks_;
  std::vector<float> final_norm_;
  Linear lm_head_;
  std::vector<float> rope_inv_freq_;  // [head_dim / 2]
  LinearInputHook hook_;
  LinearPath linear_path_ = LinearPath::kPacked;
  std::shared_ptr<const void> storage_;  // from_parts(): what the weights point into

  // Activations of one chunk; grown once, reused by every call (no allocation while decoding).
  AlignedVector<float> x_;
  BlockWorkspace ws_;
};

/// Inverse frequencies of rotary embeddings after rope scaling (HF's rope init functions).
std::vector<float> rope_inverse_frequencies(const io::ModelConfig& config);

}  // namespace sparsa::model
