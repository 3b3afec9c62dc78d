#include "sparsa/train/trainer.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <nlohmann/json.hpp>
#include <numbers>

#include "sparsa/compress/quantize.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/train/cuda.h"
#include "sparsa/train/dkm.h"

namespace sparsa::train {

namespace fs = std::filesystem;
using compress::DistillationArgs;
using compress::GradualPruningArgs;
using compress::ModifierType;

double learning_rate(const compress::TrainingArgs& a, int64_t step, int64_t total) {
  if (a.warmup_steps > 0 && step < a.warmup_steps)
    return a.lr * static_cast<double>(step + 1) / static_cast<double>(a.warmup_steps);
  const int64_t decay = total - a.warmup_steps;
  if (decay <= 1) return a.lr;
  const double progress =
      std::clamp(static_cast<double>(step - a.warmup_steps) / static_cast<double>(decay - 1), 0.0, 1.0);
  const double min_lr = a.lr * a.min_lr_ratio;
  return min_lr + 0.5 * (a.lr - min_lr) * (1.0 + std::cos(std::numbers::pi * progress));
}

double cubic_sparsity(const GradualPruningArgs& a, int64_t step) {
  if (step < a.start_step) return a.init_sparsity;
  if (step >= a.end_step) return a.final_sparsity;
  const double frac =
      static_cast<double>(step - a.start_step) / static_cast<double>(a.end_step - a.start_step);
  const double r = 1.0 - frac;
  return a.final_sparsity + (a.init_sparsity - a.final_sparsity) * r * r * r;
}

bool pruning_step(const GradualPruningArgs& a, int64_t step) {
  if (step < a.start_step || step > a.end_step) return false;
  return step == a.end_step || (step - a.start_step) % a.update_frequency == 0;
}

void magnitude_prune(float* w, uint8_t* keep, int64_t numel, double sparsity) {
  const int64_t k = std::llround(sparsity * static_cast<double>(numel));
  if (k <= 0) return;
  // (key, index): masked weights first (key −1), then by |w|, ties by position.
  std::vector<std::pair<float, int64_t>> order(static_cast<size_t>(numel));
  for (int64_t i = 0; i < numel; ++i)
    order[static_cast<size_t>(i)] = {keep[i] ? std::abs(w[i]) : -1.0f, i};
  std::nth_element(order.begin(), order.begin() + (std::min(k, numel) - 1), order.end());
  for (int64_t j = 0; j < std::min(k, numel); ++j) {
    const int64_t i = order[static_cast<size_t>(j)].second;
    keep[i] = 0;
    w[i] = 0.0f;
  }
}

void fake_quantize(const float* w, float* out, const FakeQuantGrid& g, uint8_t* codes) {
  const float maxq = static_cast<float>((1 << g.bits) - 1);
  for (int64_t r = 0; r < g.rows; ++r) {
    const float* s = g.scales.data() + r * g.n_groups;
    const float* z = g.zeros.data() + r * g.n_groups;
    for (int64_t c = 0; c < g.cols; ++c) {
      const int32_t k = g.g_idx[static_cast<size_t>(c)];
      const compress::QuantGrid grid{s[k], z[k]};
      const float q = compress::quant_code(w[r * g.cols + c], grid, maxq);
      out[r * g.cols + c] = compress::dequant_code(q, grid);
      if (codes != nullptr) codes[r * g.cols + c] = static_cast<uint8_t>(q);
    }
  }
}

FakeQuantGrid rtn_grid(const float* w, const uint8_t* keep, int64_t rows, int64_t cols, int bits,
                       int64_t group_size, bool symmetric) {
  const int64_t gs = group_size > 0 ? group_size : cols;
  SPARSA_CHECK(bits >= 2 && bits <= 8 && cols % gs == 0,
               "train: cannot quantize {} columns to {} bits in groups of {}", cols, bits, gs);
  FakeQuantGrid g;
  g.bits = bits;
  g.rows = rows;
  g.cols = cols;
  g.n_groups = cols / gs;
  g.scales.resize(static_cast<size_t>(rows * g.n_groups));
  g.zeros.resize(g.scales.size());
  g.g_idx.resize(static_cast<size_t>(cols));
  for (int64_t c = 0; c < cols; ++c) g.g_idx[static_cast<size_t>(c)] = static_cast<int32_t>(c / gs);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t k = 0; k < g.n_groups; ++k) {
      const int64_t off = r * cols + k * gs;
      const compress::QuantGrid q = compress::find_quant_grid(
          w + off, gs, bits, symmetric, keep != nullptr ? keep + off : nullptr);
      g.scales[static_cast<size_t>(r * g.n_groups + k)] = q.scale;
      g.zeros[static_cast<size_t>(r * g.n_groups + k)] = q.zero;
    }
  return g;
}

// ---- data ---------------------------------------------------------------------------------------

namespace {

uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

uint64_t fnv1a(const int32_t* p, int64_t n, uint64_t h = 0xcbf29ce484222325ull) {
  const auto* b = reinterpret_cast<const uint8_t*>(p);
  for (int64_t i = 0; i < n * 4; ++i) h = (h ^ b[i]) * 0x100000001b3ull;
  return h;
}

}  // namespace

TokenData::TokenData(std::vector<int32_t> tokens, int64_t seq_len, int64_t eval_windows)
    : tokens_(std::move(tokens)), seq_len_(seq_len) {
  cut(eval_windows, true);
}

TokenData::TokenData(std::vector<int32_t> tokens, std::vector<int32_t> valid_tokens,
                     int64_t seq_len, int64_t eval_windows)
    : tokens_(std::move(tokens)), valid_tokens_(std::move(valid_tokens)), seq_len_(seq_len) {
  cut(eval_windows, false);
}

void TokenData::cut(int64_t eval_windows, bool hold_out) {
  SPARSA_CHECK(seq_len_ >= 2, "train: seq_len must be >= 2, got {}", seq_len_);
  auto windows = [&](const std::vector<int32_t>& t) {
    std::vector<const int32_t*> w;
    for (int64_t s = 0; s + seq_len_ + 1 <= static_cast<int64_t>(t.size()); s += seq_len_)
      w.push_back(t.data() + s);
    return w;
  };
  train_ = windows(tokens_);
  if (hold_out) {
    const int64_t held = std::min<int64_t>(eval_windows, static_cast<int64_t>(train_.size()) / 2);
    valid_.assign(train_.end() - held, train_.end());
    // The held-out windows must not share tokens with training ones: drop the window before.
    train_.resize(train_.size() - static_cast<size_t>(held) - (held > 0 && train_.size() > static_cast<size_t>(held) ? 1 : 0));
  } else {
    valid_ = windows(valid_tokens_);
    if (static_cast<int64_t>(valid_.size()) > eval_windows) valid_.resize(static_cast<size_t>(eval_windows));
  }
  SPARSA_CHECK(!train_.empty(),
               "train: the data holds {} tokens, too few for one training window of {} (+ {} "
               "held out for validation)",
               tokens_.size(), seq_len_ + 1, valid_.size());
  fingerprint_ = 0xcbf29ce484222325ull;
  for (const int32_t* w : train_) fingerprint_ = fnv1a(w, seq_len_ + 1, fingerprint_);
}

const int32_t* TokenData::train_window(int64_t index, uint64_t seed) const {
  const int64_t n = train_windows();
  const int64_t epoch = index / n;
  if (epoch != perm_epoch_ || seed != perm_seed_) {
    perm_.resize(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) perm_[static_cast<size_t>(i)] = i;
    uint64_t s = seed * 0x100000001b3ull + static_cast<uint64_t>(epoch);
    for (int64_t i = n - 1; i > 0; --i) {  // Fisher–Yates
      const int64_t j = static_cast<int64_t>(splitmix64(s) % static_cast<uint64_t>(i + 1));
      std::swap(perm_[static_cast<size_t>(i)], perm_[static_cast<size_t>(j)]);
    }
    perm_epoch_ = epoch;
    perm_seed_ = seed;
  }
  return train_[static_cast<size_t>(perm_[static_cast<size_t>(index % n)])];
}

// ---- trainer ------------------------------------------------------------------------------------

Trainer::Trainer(Model& student, Model* teacher, const compress::Stage& stage, TokenData data,
                 ThreadPool& pool, int64_t max_tokens_override)
    : student_(student),
      teacher_(teacher),
      args_(stage.training),
      data_(std::move(data)),
      pool_(pool) {
  const std::string where = fmt::format("stage '{}'", stage.name);
  SPARSA_CHECK(stage.run_type == compress::RunType::kFinetune,
               "train: {} is not a finetune stage (run_type: finetune)", where);
  SPARSA_CHECK(data_.seq_len() == args_.seq_len,
               "train: the data is cut in windows of {} tokens, the {} trains on {}",
               data_.seq_len(), where, args_.seq_len);
  SPARSA_CHECK(args_.seq_len <= student.config().max_context(),
               "train: {}, field 'training.seq_len': {} exceeds the model's context {}", where,
               args_.seq_len, student.config().max_context());
  bool have_distill = false;
  for (const compress::Modifier& m : stage.modifiers) {
    modifiers_.push_back(m);
    if (const auto* d = std::get_if<DistillationArgs>(&m.args)) {
      distill_ = *d;
      have_distill = true;
    }
  }
  if (!have_distill) distill_ = DistillationArgs{};  // plain next-token cross-entropy
  const bool needs_teacher = distill_.kl > 0 || distill_.squarehead > 0;
  SPARSA_CHECK(!needs_teacher || teacher_ != nullptr,
               "train: {}, modifier 'DistillationModifier' needs a teacher (kl {} , squarehead {})",
               where, distill_.kl, distill_.squarehead);
  if (needs_teacher) {
    const io::ModelConfig &a = student.config(), &b = teacher_->config();
    SPARSA_CHECK(a.vocab_size == b.vocab_size,
                 "train: student and teacher vocabularies differ ({} vs {})", a.vocab_size,
                 b.vocab_size);
    SPARSA_CHECK(distill_.squarehead == 0 ||
                     (a.num_layers == b.num_layers && a.hidden_size == b.hidden_size),
                 "train: SquareHead needs student and teacher of the same depth and width "
                 "({}x{} vs {}x{})",
                 a.num_layers, a.hidden_size, b.num_layers, b.hidden_size);
  }
  const int64_t max_tokens = max_tokens_override > 0 ? max_tokens_override : args_.max_tokens;
  total_steps_ = max_tokens > 0 ? std::max<int64_t>(1, max_tokens / tokens_per_step()) : args_.steps;
  SPARSA_CHECK(total_steps_ > 0, "train: {}, field 'training.steps': give steps or max_tokens",
               where);

  // Masks: every linear tensor a ConstantMask or GradualPruning modifier targets keeps its zeros.
  student_.enable_gradients();
  const std::vector<ParamTensor>& ts = student_.tensors();
  keep_.assign(static_cast<size_t>(student_.num_params()), 1);
  tensor_masked_.assign(ts.size(), 0);
  tensor_schedule_.assign(ts.size(), nullptr);
  for (size_t i = 0; i < ts.size(); ++i) {
    if (!ts[i].linear) continue;
    for (const compress::Modifier& m : modifiers_) {
      if (!m.applies_to(ts[i].name)) continue;
      if (m.type() == ModifierType::kConstantMask) tensor_masked_[i] = 1;
      if (const auto* g = std::get_if<GradualPruningArgs>(&m.args)) {
        tensor_masked_[i] = 1;
        tensor_schedule_[i] = g;
      }
    }
    if (!tensor_masked_[i]) continue;
    const float* w = student_.params() + ts[i].offset;
    uint8_t* k = keep_.data() + ts[i].offset;
    for (int64_t j = 0; j < ts[i].numel; ++j) k[j] = w[j] != 0.0f;
  }
  for (const compress::Modifier& m : modifiers_) {
    if (const auto* g = std::get_if<GradualPruningArgs>(&m.args)) {
      SPARSA_CHECK(g->end_step <= total_steps_,
                   "train: {}, modifier 'GradualPruningModifier', field 'end_step': {} is past "
                   "the last step {}",
                   where, g->end_step, total_steps_);
    }
  }
  // Quantization-aware training: the stage's QuantizationModifier (at most one) and its targets.
  grids_.assign(ts.size(), FakeQuantGrid{});
  for (const compress::Modifier& m : modifiers_) {
    const auto* q = std::get_if<compress::QuantizationArgs>(&m.args);
    if (q == nullptr) continue;
    SPARSA_CHECK(!qat_, "train: {}: one QuantizationModifier per finetune stage", where);
    SPARSA_CHECK(q->scheme.input_activation_bits == 0,
                 "train: {}, modifier 'QuantizationModifier': quantization-aware training fakes "
                 "weight quantization only (input_activations are not supported)",
                 where);
    qat_ = true;
    qat_scheme_ = q->scheme;
    for (size_t i = 0; i < ts.size(); ++i) {
      if (!ts[i].linear || !m.applies_to(ts[i].name)) continue;
      const int64_t rows = ts[i].shape.at(0), cols = ts[i].shape.at(1);
      SPARSA_CHECK(q->scheme.group_size == 0 || cols % q->scheme.group_size == 0,
                   "train: {}, modifier 'QuantizationModifier', field 'group_size': {} does not "
                   "divide the {} columns of {}",
                   where, q->scheme.group_size, cols, ts[i].name);
      const uint8_t* keep = tensor_masked_[i] ? keep_.data() + ts[i].offset : nullptr;
      grids_[i] = rtn_grid(student_.params() + ts[i].offset, keep, rows, cols, q->scheme.bits,
                           q->scheme.group_size, q->scheme.symmetric);
    }
  }
  // Clustering-aware training (DKM): the stage's PalettizationModifier (at most one).
  dkm_tensors_.assign(ts.size(), DkmTensor{});
  for (const compress::Modifier& m : modifiers_) {
    const auto* p = std::get_if<compress::PalettizationArgs>(&m.args);
    if (p == nullptr) continue;
    SPARSA_CHECK(!dkm_, "train: {}: one PalettizationModifier per finetune stage", where);
    SPARSA_CHECK(p->weight == compress::PaletteWeighting::kNone,
                 "train: {}, modifier 'PalettizationModifier', field 'weight': clustering-aware "
                 "training weighs every weight alike (weight: none)",
                 where);
    dkm_ = true;
    dkm_opts_ = {p->temperature, p->iterations};
    for (size_t i = 0; i < ts.size(); ++i) {
      if (!ts[i].linear || !m.applies_to(ts[i].name)) continue;
      SPARSA_CHECK(!tensor_masked_[i] && grids_[i].rows == 0,
                   "train: {}: '{}' is a target of PalettizationModifier and of a mask or "
                   "QuantizationModifier; clustering-aware training takes dense, unquantized "
                   "tensors",
                   where, ts[i].name);
      const int64_t rows = ts[i].shape.at(0), cols = ts[i].shape.at(1);
      const int64_t group =
          p->granularity == compress::PaletteGranularity::kPerGroupedChannel ? p->group_size : 0;
      dkm_tensors_[i] = dkm_init(student_.params() + ts[i].offset, rows, cols, p->bits, group);
    }
  }
  if (dkm_) dkm_deriv_.assign(static_cast<size_t>(student_.num_params()), 1.0f);
  m_.assign(static_cast<size_t>(student_.num_params()), 0.0f);
  v_.assign(m_.size(), 0.0f);
  refresh_forward_weights(true);
}

namespace {

// The tensors that a per-tensor table (the DKM palettes, the fake-quantization grids) covers:
// those whose entry has rows.
template <class T>
std::vector<std::string> covered_names(const std::vector<ParamTensor>& ts,
                                       const std::vector<T>& table) {
  std::vector<std::string> out;
  for (size_t i = 0; i < ts.size(); ++i)
    if (table[i].rows > 0) out.push_back(ts[i].name);
  return out;
}

// The index of tensor `name` in such a table; fails naming `kind` when the table does not cover
// it.
template <class T>
size_t covered_index(const std::vector<ParamTensor>& ts, const std::vector<T>& table,
                     const std::string& name, const char* kind) {
  for (size_t i = 0; i < ts.size(); ++i)
    if (ts[i].name == name && table[i].rows > 0) return i;
  fail("train: '{}' is not a {}-aware tensor", name, kind);
}

}  // namespace

std::vector<std::string> Trainer::clustered_tensors() const {
  return covered_names(student_.tensors(), dkm_tensors_);
}

const DkmTensor& Trainer::clustering(const std::string& tensor) const {
  const size_t i = covered_index(student_.tensors(), dkm_tensors_, tensor, "clustering");
  return dkm_tensors_[i];
}

void Trainer::set_clustering(const std::string& tensor, DkmTensor t) {
  const size_t i = covered_index(student_.tensors(), dkm_tensors_, tensor, "clustering");
  const DkmTensor& old = dkm_tensors_[i];
  SPARSA_CHECK(t.bits == old.bits && t.rows == old.rows && t.cols == old.cols &&
                   t.group_rows > 0 &&
                   static_cast<int64_t>(t.centroids.size()) == t.n_groups() * t.k(),
               "train: the palettes given for '{}' ({} bits, {}x{}, {} rows each) do not fit "
               "the recipe's ({} bits, {}x{})",
               tensor, t.bits, t.rows, t.cols, t.group_rows, old.bits, old.rows, old.cols);
  dkm_tensors_[i] = std::move(t);
  upload_clustering();
  refresh_forward_weights();
}

std::vector<std::string> Trainer::quantized_tensors() const {
  return covered_names(student_.tensors(), grids_);
}

const FakeQuantGrid& Trainer::quant_grid(const std::string& tensor) const {
  const size_t i = covered_index(student_.tensors(), grids_, tensor, "quantization");
  return grids_[i];
}

void Trainer::set_quant_grid(const std::string& tensor, FakeQuantGrid grid) {
  const size_t i = covered_index(student_.tensors(), grids_, tensor, "quantization");
  const FakeQuantGrid& old = grids_[i];
  SPARSA_CHECK(grid.bits == old.bits && grid.rows == old.rows && grid.cols == old.cols &&
                   grid.n_groups > 0 &&
                   static_cast<int64_t>(grid.scales.size()) == grid.rows * grid.n_groups &&
                   grid.zeros.size() == grid.scales.size() &&
                   static_cast<int64_t>(grid.g_idx.size()) == grid.cols,
               "train: the grid given for '{}' ({} bits, {}x{}, {} groups) does not fit the "
               "recipe's ({} bits, {}x{})",
               tensor, grid.bits, grid.rows, grid.cols, grid.n_groups, old.bits, old.rows,
               old.cols);
  for (int32_t k : grid.g_idx)
    SPARSA_CHECK(k >= 0 && k < grid.n_groups, "train: the grid of '{}' has group index {}",
                 tensor, k);
  grids_[i] = std::move(grid);
  refresh_forward_weights();
}

void Trainer::refresh_forward_weights(bool update_centroids) {
  if (!qat_ && !dkm_) return;
  if (gpu_ != nullptr) {
    gpu_->refresh_forward_weights(update_centroids);
    return;
  }
  // Each tensor once: the fake-quantized or soft-clustered copy, or the weights as they are.
  float* fw = student_.forward_weights();
  const std::vector<ParamTensor>& ts = student_.tensors();
  for (size_t i = 0; i < ts.size(); ++i) {
    const float* w = student_.params() + ts[i].offset;
    if (grids_[i].rows > 0) {
      fake_quantize(w, fw + ts[i].offset, grids_[i]);
    } else if (dkm_tensors_[i].rows > 0) {
      if (update_centroids) dkm_update_centroids(dkm_tensors_[i], w, dkm_opts_);
      dkm_soft_weights(dkm_tensors_[i], w, dkm_opts_, fw + ts[i].offset,
                       dkm_deriv_.data() + ts[i].offset);
    } else {
      std::memcpy(fw + ts[i].offset, w, static_cast<size_t>(ts[i].numel) * sizeof(float));
    }
  }
}

void Trainer::upload_clustering() {
  if (!dkm_ || gpu_ == nullptr) return;
  std::vector<cuda::ClusteredTensor> list;
  const std::vector<ParamTensor>& ts = student_.tensors();
  for (size_t i = 0; i < ts.size(); ++i) {
    const DkmTensor& t = dkm_tensors_[i];
    if (t.rows == 0) continue;
    list.push_back({ts[i].offset, t.bits, t.rows, t.cols, t.group_rows, t.centroids.data()});
  }
  gpu_->set_clustering(list, dkm_opts_.temperature, dkm_opts_.iterations);
}

void Trainer::upload_fake_quant() {
  if (!qat_ || gpu_ == nullptr) return;
  std::vector<cuda::FakeQuantTensor> list;
  const std::vector<ParamTensor>& ts = student_.tensors();
  for (size_t i = 0; i < ts.size(); ++i) {
    const FakeQuantGrid& g = grids_[i];
    if (g.rows == 0) continue;
    list.push_back({ts[i].offset, g.bits, g.rows, g.cols, g.n_groups, g.scales.data(),
                    g.zeros.data(), g.g_idx.data()});
  }
  gpu_->set_fake_quant(list);
}

Trainer::~Trainer() = default;

void Trainer::use_cuda(const std::string& matmul, int device) {
  const bool needs_teacher = distill_.kl > 0 || distill_.squarehead > 0;
  gpu_ = std::make_unique<cuda::Engine>(student_, needs_teacher ? teacher_ : nullptr, keep_,
                                        cuda::parse_matmul(matmul), device);
  gpu_->upload_moments(m_.data(), v_.data());
  upload_fake_quant();
  upload_clustering();
}

std::string Trainer::device_description() const {
  if (gpu_ == nullptr) return fmt::format("cpu ({} threads)", pool_.size());
  return fmt::format("cuda: {}, {} GEMMs", gpu_->device_name(), cuda::matmul_name(gpu_->matmul()));
}

void Trainer::sync_to_host() {
  if (gpu_ == nullptr) return;
  gpu_->download_params(student_.params());
  gpu_->download_moments(m_.data(), v_.data());
  if (!dkm_) return;
  std::vector<float*> centroids;
  for (DkmTensor& t : dkm_tensors_)
    if (t.rows > 0) centroids.push_back(t.centroids.data());
  gpu_->download_centroids(centroids);
}

int64_t Trainer::tokens_per_step() const {
  return args_.batch_size * args_.seq_len * args_.grad_accum;
}

double Trainer::flops_per_token() const {
  auto cost = [&](const Model& m, double per_weight, double attn) {
    double weights = 0;
    for (const ParamTensor& t : m.tensors())
      if (t.linear || t.name == "lm_head.weight") weights += static_cast<double>(t.numel);
    if (m.config().tie_word_embeddings)
      weights += static_cast<double>(m.config().vocab_size * m.config().hidden_size);
    const io::ModelConfig& c = m.config();
    return per_weight * weights + attn * static_cast<double>(c.num_layers * args_.seq_len *
                                                             c.num_heads * c.head_dim);
  };
  double f = cost(student_, 6.0, 12.0);
  if (teacher_ != nullptr && (distill_.kl > 0 || distill_.squarehead > 0))
    f += cost(*teacher_, 2.0, 4.0);
  return f;
}

bool Trainer::masked(const std::string& tensor) const {
  const std::vector<ParamTensor>& ts = student_.tensors();
  for (size_t i = 0; i < ts.size(); ++i)
    if (ts[i].name == tensor) return tensor_masked_[i] != 0;
  return false;
}

double Trainer::masked_sparsity() const {
  const std::vector<ParamTensor>& ts = student_.tensors();
  int64_t zeros = 0, total = 0;
  for (size_t i = 0; i < ts.size(); ++i) {
    if (!tensor_masked_[i]) continue;
    if (gpu_ != nullptr) {
      // The weights are on the GPU; the masks (which hold their zeros) are here.
      const uint8_t* k = keep_.data() + ts[i].offset;
      for (int64_t j = 0; j < ts[i].numel; ++j) zeros += k[j] == 0;
    } else {
      const float* w = student_.params() + ts[i].offset;
      for (int64_t j = 0; j < ts[i].numel; ++j) zeros += w[j] == 0.0f;
    }
    total += ts[i].numel;
  }
  return total > 0 ? static_cast<double>(zeros) / static_cast<double>(total) : 0.0;
}

void Trainer::update_masks(int64_t step) {
  const std::vector<ParamTensor>& ts = student_.tensors();
  bool any = false;
  for (size_t i = 0; i < ts.size(); ++i)
    any = any || (tensor_schedule_[i] != nullptr && pruning_step(*tensor_schedule_[i], step));
  if (!any) return;
  sync_to_host();
  for (size_t i = 0; i < ts.size(); ++i) {
    const GradualPruningArgs* g = tensor_schedule_[i];
    if (g == nullptr || !pruning_step(*g, step)) continue;
    const int64_t off = ts[i].offset;
    magnitude_prune(student_.params() + off, keep_.data() + off, ts[i].numel,
                    cubic_sparsity(*g, step));
    // Pruned weights start over: no momentum carries them back.
    for (int64_t j = 0; j < ts[i].numel; ++j)
      if (!keep_[static_cast<size_t>(off + j)]) m_[static_cast<size_t>(off + j)] = v_[static_cast<size_t>(off + j)] = 0.0f;
  }
  if (gpu_ != nullptr) {
    gpu_->upload_params(student_.params());
    gpu_->upload_moments(m_.data(), v_.data());
    gpu_->upload_keep(keep_.data());
  }
  refresh_forward_weights();
}

double Trainer::micro_batch(int64_t index, float grad_scale, double* ce, double* kl, double* sq) {
  const int64_t b = args_.batch_size, t = args_.seq_len, n = b * t;
  batch_ids_.resize(static_cast<size_t>(n));
  batch_targets_.resize(static_cast<size_t>(n));
  for (int64_t s = 0; s < b; ++s) {
    const int32_t* w = data_.train_window(index * b + s, static_cast<uint64_t>(args_.seed));
    std::copy(w, w + t, batch_ids_.begin() + s * t);
    std::copy(w + 1, w + t + 1, batch_targets_.begin() + s * t);
  }
  if (gpu_ != nullptr) {
    const cuda::Losses l = gpu_->micro_batch(
        batch_ids_.data(), batch_targets_.data(), b, t,
        {distill_.ce, distill_.kl, distill_.squarehead, distill_.temperature}, grad_scale);
    *ce += l.ce;
    *kl += l.kl;
    *sq += l.squarehead;
    return distill_.ce * l.ce + distill_.kl * l.kl + distill_.squarehead * l.squarehead;
  }
  const int64_t vocab = student_.config().vocab_size, h = student_.config().hidden_size;
  const bool need_teacher = distill_.kl > 0 || distill_.squarehead > 0;
  if (need_teacher) teacher_->forward(batch_ids_.data(), b, t, pool_);
  student_.forward(batch_ids_.data(), b, t, pool_);
  double loss = 0;
  // The cross-entropy is always measured (it is the curve users read); it enters the gradient
  // with its weight.
  const double c = ops::cross_entropy(distill_.ce > 0 ? student_.dlogits() : nullptr,
                                      student_.logits(), batch_targets_.data(), n, vocab,
                                      static_cast<float>(distill_.ce) * grad_scale, pool_);
  *ce += c;
  loss += distill_.ce * c;
  if (distill_.kl > 0) {
    const double k = ops::kl_distillation(student_.dlogits(), student_.logits(), teacher_->logits(),
                                          n, vocab, static_cast<float>(distill_.temperature),
                                          static_cast<float>(distill_.kl) * grad_scale, pool_);
    *kl += k;
    loss += distill_.kl * k;
  }
  if (distill_.squarehead > 0) {
    double total = 0;
    for (int64_t l = 0; l < student_.config().num_layers; ++l)
      total += ops::squarehead(student_.dblock_output(l), student_.block_output(l),
                               teacher_->block_output(l), n * h,
                               static_cast<float>(distill_.squarehead) * grad_scale, pool_);
    *sq += total;
    loss += distill_.squarehead * total;
  }
  student_.backward(pool_);
  return loss;
}

StepStats Trainer::train_step() {
  SPARSA_CHECK(step_ < total_steps_, "train: all {} steps are done", total_steps_);
  const auto t0 = std::chrono::steady_clock::now();
  update_masks(step_);
  if (gpu_ != nullptr)
    gpu_->zero_grad();
  else
    student_.zero_grad();
  StepStats st;
  const float grad_scale = 1.0f / static_cast<float>(args_.grad_accum);
  for (int64_t a = 0; a < args_.grad_accum; ++a) {
    st.loss += micro_batch(consumed_ / args_.batch_size, grad_scale, &st.ce, &st.kl, &st.squarehead);
    consumed_ += args_.batch_size;
  }
  const double inv = 1.0 / static_cast<double>(args_.grad_accum);
  st.loss *= inv, st.ce *= inv, st.kl *= inv, st.squarehead *= inv;

  const std::vector<ParamTensor>& ts = student_.tensors();
  if (gpu_ != nullptr) {
    std::vector<cuda::TensorUpdate> updates;
    for (size_t i = 0; i < ts.size(); ++i)
      updates.push_back({ts[i].offset, ts[i].numel, tensor_masked_[i] != 0,
                         ts[i].matrix ? static_cast<float>(args_.weight_decay) : 0.0f});
    st.lr = learning_rate(args_, step_, total_steps_);
    const ops::AdamW opt{static_cast<float>(st.lr), static_cast<float>(args_.beta1),
                         static_cast<float>(args_.beta2), static_cast<float>(args_.eps), 0.0f};
    st.grad_norm = gpu_->optimizer_step(updates, args_.clip, opt, step_ + 1);
  } else {
    // Clustering-aware tensors: the gradient of the soft-clustered weights times ∂w̃/∂w.
    if (dkm_)
      for (size_t i = 0; i < ts.size(); ++i)
        if (dkm_tensors_[i].rows > 0)
          for (int64_t j = 0; j < ts[i].numel; ++j)
            student_.grads()[ts[i].offset + j] *= dkm_deriv_[static_cast<size_t>(ts[i].offset + j)];
    // Masked gradients: pruned weights get no update (and no weight decay either, below).
    for (size_t i = 0; i < ts.size(); ++i)
      if (tensor_masked_[i])
        ops::apply_mask(student_.grads() + ts[i].offset, keep_.data() + ts[i].offset, ts[i].numel,
                        pool_);
    const double norm = std::sqrt(ops::sum_of_squares(student_.grads(), student_.num_params(), pool_));
    st.grad_norm = norm;
    if (args_.clip > 0 && norm > args_.clip)
      ops::scale(student_.grads(), static_cast<float>(args_.clip / norm), student_.num_params(), pool_);
    st.lr = learning_rate(args_, step_, total_steps_);
    ops::AdamW opt{static_cast<float>(st.lr), static_cast<float>(args_.beta1),
                   static_cast<float>(args_.beta2), static_cast<float>(args_.eps), 0.0f};
    for (size_t i = 0; i < ts.size(); ++i) {
      opt.weight_decay = ts[i].matrix ? static_cast<float>(args_.weight_decay) : 0.0f;
      const int64_t off = ts[i].offset;
      ops::adamw_update(student_.params() + off, student_.grads() + off, m_.data() + off,
                        v_.data() + off, ts[i].numel, opt, step_ + 1, pool_);
      if (tensor_masked_[i])
        ops::apply_mask(student_.params() + off, keep_.data() + off, ts[i].numel, pool_);
    }
    refresh_forward_weights(true);
  }
  ++step_;
  st.step = step_;
  st.tokens = consumed_ * args_.seq_len;
  st.sparsity = masked_sparsity();
  st.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  history_.push_back(st);
  return st;
}

EvalStats Trainer::evaluate() {
  EvalStats e;
  e.step = step_;
  const int64_t n_win = data_.eval_windows(), t = args_.seq_len;
  if (n_win == 0) return e;
  const int64_t vocab = student_.config().vocab_size;
  const int64_t per_batch = std::max<int64_t>(1, args_.batch_size);
  double total = 0;
  int64_t count = 0;
  for (int64_t w0 = 0; w0 < n_win; w0 += per_batch) {
    const int64_t b = std::min(per_batch, n_win - w0);
    batch_ids_.resize(static_cast<size_t>(b * t));
    batch_targets_.resize(static_cast<size_t>(b * t));
    for (int64_t s = 0; s < b; ++s) {
      const int32_t* w = data_.eval_window(w0 + s);
      std::copy(w, w + t, batch_ids_.begin() + s * t);
      std::copy(w + 1, w + t + 1, batch_targets_.begin() + s * t);
    }
    if (gpu_ != nullptr) {
      int64_t k = 0;
      total += gpu_->eval_ce_sum(batch_ids_.data(), batch_targets_.data(), b, t, &k);
      count += k;
      continue;
    }
    student_.forward(batch_ids_.data(), b, t, pool_);
    total += ops::cross_entropy(nullptr, student_.logits(), batch_targets_.data(), b * t, vocab,
                                1.0f, pool_) *
             static_cast<double>(b * t);
    count += b * t;
  }
  e.ce = total / static_cast<double>(count);
  e.ppl = std::exp(e.ce);
  evals_.push_back(e);
  return e;
}

// ---- checkpoints --------------------------------------------------------------------------------

namespace {

void fsync_path(const fs::path& p, bool dir) {
  const int fd = ::open(p.c_str(), dir ? (O_RDONLY | O_DIRECTORY) : O_RDONLY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

nlohmann::json step_json(const StepStats& s) {
  return {{"step", s.step},   {"tokens", s.tokens}, {"lr", s.lr},
          {"loss", s.loss},   {"ce", s.ce},         {"kl", s.kl},
          {"squarehead", s.squarehead}, {"grad_norm", s.grad_norm},
          {"sparsity", s.sparsity},     {"seconds", s.seconds}};
}

}  // namespace

void Trainer::save_checkpoint(const std::string& dir) {
  sync_to_host();
  const fs::path out(dir);
  fs::path tmp = out;
  tmp += ".partial-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  const int64_t n = student_.num_params();
  std::vector<io::TensorData> tensors = {
      {{"params", DType::F32, {n}}, student_.params()},
      {{"adam_m", DType::F32, {n}}, m_.data()},
      {{"adam_v", DType::F32, {n}}, v_.data()},
      {{"keep", DType::U8, {n}}, keep_.data()},
  };
  std::vector<float> centroids;
  for (const DkmTensor& t : dkm_tensors_)
    centroids.insert(centroids.end(), t.centroids.begin(), t.centroids.end());
  if (!centroids.empty())
    tensors.push_back({{"dkm_centroids", DType::F32, {static_cast<int64_t>(centroids.size())}},
                       centroids.data()});
  io::write_safetensors((tmp / "state.safetensors").string(), tensors, {{"format", "sparsa-train"}});
  nlohmann::json j;
  j["step"] = step_;
  j["total_steps"] = total_steps_;
  j["consumed_windows"] = consumed_;
  j["seed"] = args_.seed;
  j["data_fingerprint"] = fmt::format("{:016x}", data_.fingerprint());
  j["num_params"] = n;
  j["history"] = nlohmann::json::array();
  for (const StepStats& s : history_) j["history"].push_back(step_json(s));
  j["evals"] = nlohmann::json::array();
  for (const EvalStats& e : evals_) j["evals"].push_back({{"step", e.step}, {"ce", e.ce}, {"ppl", e.ppl}});
  const std::string text = j.dump(1) + "\n";
  write_file_atomic((tmp / "trainer.json").string(), text.data(), text.size());
  fsync_path(tmp, true);
  if (fs::exists(out)) fs::remove_all(out);
  fs::create_directories(out.has_parent_path() ? out.parent_path() : fs::path("."));
  fs::rename(tmp, out);
  fsync_path(out.has_parent_path() ? out.parent_path() : fs::path("."), true);
}

void Trainer::load_checkpoint(const std::string& dir) {
  const std::string json_path = (fs::path(dir) / "trainer.json").string();
  SPARSA_CHECK(fs::exists(json_path), "resume: {} is not a training checkpoint (no trainer.json)",
               dir);
  const nlohmann::json j = nlohmann::json::parse(read_text_file(json_path));
  const int64_t n = student_.num_params();
  SPARSA_CHECK(j.at("num_params").get<int64_t>() == n,
               "resume: {} holds {} parameters, the student has {}", dir,
               j.at("num_params").get<int64_t>(), n);
  SPARSA_CHECK(j.at("data_fingerprint").get<std::string>() == fmt::format("{:016x}", data_.fingerprint()),
               "resume: {} was trained on other data (or another seq_len / tokenizer)", dir);
  SPARSA_CHECK(j.at("seed").get<int64_t>() == args_.seed,
               "resume: {} was trained with seed {}, the recipe says {}", dir,
               j.at("seed").get<int64_t>(), args_.seed);
  SPARSA_CHECK(j.at("total_steps").get<int64_t>() == total_steps_,
               "resume: {} was planned for {} steps, this run for {} (the schedule would differ)",
               dir, j.at("total_steps").get<int64_t>(), total_steps_);
  const io::Checkpoint ck = io::Checkpoint::open_file((fs::path(dir) / "state.safetensors").string());
  auto read = [&](const char* name, DType dt, void* dst) {
    const io::TensorView& t = ck.get(name);
    SPARSA_CHECK(t.dtype == dt && t.numel() == n, "resume: {}: tensor '{}' has the wrong shape",
                 t.file, name);
    std::memcpy(dst, t.data, t.nbytes);
  };
  read("params", DType::F32, student_.params());
  read("adam_m", DType::F32, m_.data());
  read("adam_v", DType::F32, v_.data());
  read("keep", DType::U8, keep_.data());
  size_t total = 0;
  for (const DkmTensor& t : dkm_tensors_) total += t.centroids.size();
  if (total > 0) {
    const io::TensorView& c = ck.get("dkm_centroids");
    SPARSA_CHECK(c.dtype == DType::F32 && c.numel() == static_cast<int64_t>(total),
                 "resume: {}: tensor 'dkm_centroids' has the wrong shape", c.file);
    const uint8_t* src = c.data;
    for (DkmTensor& t : dkm_tensors_) {
      if (t.centroids.empty()) continue;
      std::memcpy(t.centroids.data(), src, t.centroids.size() * sizeof(float));
      src += t.centroids.size() * sizeof(float);
    }
    upload_clustering();
  }
  if (gpu_ != nullptr) {
    gpu_->upload_params(student_.params());
    gpu_->upload_moments(m_.data(), v_.data());
    gpu_->upload_keep(keep_.data());
  }
  refresh_forward_weights();
  step_ = j.at("step").get<int64_t>();
  consumed_ = j.at("consumed_windows").get<int64_t>();
  history_.clear();
  for (const auto& s : j.at("history")) {
    StepStats st;
    st.step = s.at("step");
    st.tokens = s.at("tokens");
    st.lr = s.at("lr");
    st.loss = s.at("loss");
    st.ce = s.at("ce");
    st.kl = s.at("kl");
    st.squarehead = s.at("squarehead");
    st.grad_norm = s.at("grad_norm");
    st.sparsity = s.at("sparsity");
    st.seconds = s.at("seconds");
    history_.push_back(st);
  }
  evals_.clear();
  for (const auto& e : j.at("evals")) evals_.push_back({e.at("step"), e.at("ce"), e.at("ppl")});
}

}  // namespace sparsa::train
