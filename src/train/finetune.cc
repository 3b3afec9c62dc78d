#include "sparsa/train/finetune.h"

#include <fcntl.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <map>
#include <nlohmann/json.hpp>
#include <optional>

#include "sparsa/compress/recipe.h"
#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/core/progress.h"
#include "sparsa/io/compressed_tensors.h"
#include "sparsa/io/safetensors.h"
#include "sparsa/io/text_data.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "sparsa/train/cuda.h"

namespace sparsa::train {

namespace fs = std::filesystem;

namespace {

void fsync_dir(const fs::path& d) {
  const int fd = ::open(d.c_str(), O_RDONLY | O_DIRECTORY);
  if (fd >= 0) {
    ::fsync(fd);
    ::close(fd);
  }
}

std::vector<uint8_t> encode(const float* v, int64_t n, DType dt) {
  std::vector<uint8_t> out(static_cast<size_t>(n) * dtype_size(dt));
  if (dt == DType::F32) {
    std::memcpy(out.data(), v, out.size());
    return out;
  }
  for (int64_t i = 0; i < n; ++i) {
    const uint16_t h = dt == DType::BF16 ? f32_to_bf16(v[i]) : f32_to_f16(v[i]);
    std::memcpy(out.data() + 2 * i, &h, 2);
  }
  return out;
}

std::string module_of(const std::string& tensor) {
  return tensor.size() > 7 && tensor.ends_with(".weight") ? tensor.substr(0, tensor.size() - 7)
                                                          : tensor;
}

std::string csv_number(double x) { return fmt::format("{:.6g}", x); }

}  // namespace

size_t write_hf_checkpoint(const Model& model, const std::string& source_dir,
                           const std::string& dir, DType dt,
                           const std::vector<std::string>& sparse_tensors, bool overwrite,
                           const std::vector<std::pair<std::string, std::string>>& extra_files,
                           const QuantizedOutput* quantized) {
  SPARSA_CHECK(dt == DType::F32 || dt == DType::BF16 || dt == DType::F16,
               "finetune: cannot write weights as {}", dtype_name(dt));
  const fs::path out(dir);
  SPARSA_CHECK(!dir.empty(), "finetune: no output directory given");
  SPARSA_CHECK(overwrite || !fs::exists(out),
               "finetune: output directory '{}' already exists (choose another or pass "
               "--overwrite)",
               dir);
  fs::path tmp = out;
  tmp += ".partial-" + std::to_string(::getpid());
  fs::remove_all(tmp);
  fs::create_directories(tmp);
  try {
    std::vector<std::vector<uint8_t>> buffers;
    std::vector<io::TensorData> tensors;
    auto add = [&](const std::string& name, DType t, std::vector<int64_t> shape,
                   std::vector<uint8_t> bytes) {
      buffers.push_back(std::move(bytes));
      io::TensorData d;
      d.spec = {name, t, std::move(shape)};
      d.data = buffers.back().data();
      tensors.push_back(std::move(d));
    };
    buffers.reserve(model.tensors().size() * 4);
    int64_t zeros = 0, sparse_total = 0;
    std::vector<std::string> ignore = {"lm_head"};
    std::vector<std::string> quant_ignore = {"lm_head"}, palette_ignore = {"lm_head"}, palettized;
    int64_t quant_count = 0, palette_rows = 0;
    int palette_bits = 0;
    for (const ParamTensor& t : model.tensors()) {
      const float* w = model.params() + t.offset;
      const bool listed = std::find(sparse_tensors.begin(), sparse_tensors.end(), t.name) !=
                          sparse_tensors.end();
      const FakeQuantGrid* grid = nullptr;
      if (quantized != nullptr)
        for (const auto& [name, g] : quantized->tensors)
          if (name == t.name) grid = g;
      if (grid != nullptr) {
        // pack-quantized, as `sparsa compress` writes GPTQ's output (compressed-tensors).
        const int64_t rows = grid->rows, cols = grid->cols, ng = grid->n_groups;
        const std::string mod = module_of(t.name);
        std::vector<float> deq(static_cast<size_t>(rows * cols));
        std::vector<uint8_t> codes(deq.size());
        fake_quantize(w, deq.data(), *grid, codes.data());
        if (listed) {
          for (float x : deq) zeros += x == 0.0f;
          sparse_total += rows * cols;
        }
        std::vector<int32_t> packed = io::pack_quantized(codes, rows, cols, grid->bits);
        std::vector<uint8_t> bytes(packed.size() * 4);
        std::memcpy(bytes.data(), packed.data(), bytes.size());
        add(mod + ".weight_packed", DType::I32, {rows, io::packed_words(cols, grid->bits)},
            std::move(bytes));
        std::vector<uint8_t> sc(grid->scales.size() * 4);
        std::memcpy(sc.data(), grid->scales.data(), sc.size());
        add(mod + ".weight_scale", DType::F32, {rows, ng}, std::move(sc));
        if (!quantized->scheme.symmetric) {
          std::vector<uint8_t> z(grid->zeros.size());
          for (size_t j = 0; j < z.size(); ++j) z[j] = static_cast<uint8_t>(grid->zeros[j]);
          std::vector<int32_t> pz = io::pack_zero_points(z, rows, ng, grid->bits);
          std::vector<uint8_t> zb(pz.size() * 4);
          std::memcpy(zb.data(), pz.data(), zb.size());
          add(mod + ".weight_zero_point", DType::I32, {io::packed_words(rows, grid->bits), ng},
              std::move(zb));
        }
        if (quantized->scheme.actorder != compress::ActOrder::kNone) {
          std::vector<uint8_t> gi(grid->g_idx.size() * 4);
          std::memcpy(gi.data(), grid->g_idx.data(), gi.size());
          add(mod + ".weight_g_idx", DType::I32, {cols}, std::move(gi));
        }
        std::vector<uint8_t> shape(2 * sizeof(int64_t));
        const int64_t rc[2] = {rows, cols};
        std::memcpy(shape.data(), rc, shape.size());
        add(mod + ".weight_shape", DType::I64, {2}, std::move(shape));
        ++quant_count;
        continue;
      }
      const compress::Palette* palette = nullptr;
      if (quantized != nullptr)
        for (const auto& [name, p] : quantized->palettes)
          if (name == t.name) palette = &p;
      if (palette != nullptr) {
        // sparsa-palettized, as `sparsa compress` writes palettization.
        const int64_t rows = t.shape.at(0), cols = t.shape.at(1);
        const std::string mod = module_of(t.name);
        const int64_t k = int64_t{1} << palette->bits;
        const int64_t n_pal = static_cast<int64_t>(palette->lut.size()) / k;
        add(mod + ".weight_palette", dt, {n_pal, k},
            encode(palette->lut.data(), static_cast<int64_t>(palette->lut.size()), dt));
        std::vector<int32_t> packed = io::pack_quantized(palette->indices, rows, cols, palette->bits);
        std::vector<uint8_t> bytes(packed.size() * 4);
        std::memcpy(bytes.data(), packed.data(), bytes.size());
        add(mod + ".weight_indices_packed", DType::I32, {rows, io::packed_words(cols, palette->bits)},
            std::move(bytes));
        std::vector<uint8_t> shape(2 * sizeof(int64_t));
        const int64_t rc[2] = {rows, cols};
        std::memcpy(shape.data(), rc, shape.size());
        add(mod + ".weight_shape", DType::I64, {2}, std::move(shape));
        palettized.push_back(mod);
        palette_bits = palette->bits;
        palette_rows = palette->group_rows == rows ? 0 : palette->group_rows;
        continue;
      }
      if (quantized != nullptr && t.linear) {
        quant_ignore.push_back(module_of(t.name));
        if (!quantized->palettes.empty()) palette_ignore.push_back(module_of(t.name));
      }
      // With quantization the sparsity block is descriptive ("dense"): masked tensors that are
      // not quantized are written as plain weights.
      const bool sparse = listed && quantized == nullptr;
      std::vector<uint8_t> dense = encode(w, t.numel, dt);
      if (!sparse) {
        if (t.linear) ignore.push_back(module_of(t.name));
        add(t.name, dt, t.shape, std::move(dense));
        continue;
      }
      const int64_t rows = t.shape.at(0), cols = t.shape.at(1);
      const std::string mod = module_of(t.name);
      io::SparseBitmask s = io::sparse_bitmask_compress(dense.data(), rows, cols, dt);
      zeros += rows * cols - s.nnz;
      sparse_total += rows * cols;
      const int64_t nnz = s.nnz;
      add(mod + ".compressed", dt, {nnz}, std::move(s.compressed));
      add(mod + ".bitmask", DType::U8, {rows, io::bitmask_row_bytes(cols)}, std::move(s.bitmask));
      std::vector<uint8_t> offs(s.row_offsets.size() * sizeof(int64_t));
      std::memcpy(offs.data(), s.row_offsets.data(), offs.size());
      add(mod + ".row_offsets", DType::I64, {rows}, std::move(offs));
      std::vector<uint8_t> shape(2 * sizeof(int64_t));
      const int64_t rc[2] = {rows, cols};
      std::memcpy(shape.data(), rc, shape.size());
      add(mod + ".shape", DType::I64, {2}, std::move(shape));
    }
    io::write_safetensors((tmp / "model.safetensors").string(), tensors, {{"format", "pt"}});

    nlohmann::json config =
        nlohmann::json::parse(read_text_file((fs::path(source_dir) / "config.json").string()));
    io::CompressionConfig cc;
    if (quantized != nullptr && quant_count > 0) {
      io::QuantizationConfig q;
      q.bits = quantized->scheme.bits;
      q.group_size = quantized->scheme.group_size;
      q.symmetric = quantized->scheme.symmetric;
      q.actorder = quantized->scheme.actorder == compress::ActOrder::kNone ? io::ActOrder::kNone
                                                                          : io::ActOrder::kGroup;
      q.ignore = quant_ignore;
      cc.quantization = q;
    }
    if (!palettized.empty()) {
      io::SparsaGroup g;
      g.format = io::SparsaFormat::kPalettized;
      g.targets = palettized;
      g.bits = palette_bits;
      g.palette_group_rows = palette_rows;
      io::SparsaConfig sc;
      sc.groups.push_back(g);
      // Quantized tensors are not palettized.
      for (const auto& [name, grid] : quantized->tensors) palette_ignore.push_back(module_of(name));
      sc.ignore = palette_ignore;
      cc.sparsa = sc;
    }
    if (sparse_total > 0) {
      io::SparsityConfig s;
      s.format = cc.quantization ? "dense" : "sparse-bitmask";
      s.structure = "unstructured";
      s.global_sparsity = static_cast<double>(zeros) / static_cast<double>(sparse_total);
      s.ignore = ignore;
      cc.sparsity = s;
    }
    io::write_compression_config(cc, config);
    const std::string config_text = config.dump(2) + "\n";
    write_file_atomic((tmp / "config.json").string(), config_text.data(), config_text.size());
    for (const char* name : {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                             "generation_config.json", "chat_template.jinja"}) {
      const fs::path src = fs::path(source_dir) / name;
      if (!fs::exists(src)) continue;
      const std::string text = read_text_file(src.string());
      write_file_atomic((tmp / name).string(), text.data(), text.size());
    }
    for (const auto& [name, text] : extra_files)
      write_file_atomic((tmp / name).string(), text.data(), text.size());
    fsync_dir(tmp);
    if (fs::exists(out)) {
      fs::path old = out;
      old += ".old-" + std::to_string(::getpid());
      fs::rename(out, old);
      fs::rename(tmp, out);
      fs::remove_all(old);
    } else {
      fs::rename(tmp, out);
    }
    fsync_dir(out.has_parent_path() ? out.parent_path() : fs::path("."));
  } catch (...) {
    std::error_code ec;
    fs::remove_all(tmp, ec);
    throw;
  }
  size_t bytes = 0;
  for (const auto& e : fs::directory_iterator(out))
    if (e.is_regular_file()) bytes += e.file_size();
  return bytes;
}

std::string loss_svg(const std::vector<StepStats>& history, const std::vector<EvalStats>& evals) {
  const double W = 720, H = 400, L = 60, R = 20, T = 30, B = 45;
  double max_step = 1, lo = INFINITY, hi = -INFINITY;
  for (const StepStats& s : history) {
    max_step = std::max(max_step, static_cast<double>(s.step));
    lo = std::min({lo, s.loss, s.ce});
    hi = std::max({hi, s.loss, s.ce});
  }
  for (const EvalStats& e : evals) {
    max_step = std::max(max_step, static_cast<double>(e.step));
    lo = std::min(lo, e.ce);
    hi = std::max(hi, e.ce);
  }
  if (!(hi > lo)) lo = (std::isfinite(lo) ? lo : 0) - 1, hi = lo + 2;
  const double pad = 0.05 * (hi - lo);
  lo -= pad, hi += pad;
  auto X = [&](double s) { return L + (W - L - R) * s / max_step; };
  auto Y = [&](double v) { return T + (H - T - B) * (hi - v) / (hi - lo); };
  std::string svg = fmt::format(
      "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{}\" height=\"{}\" "
      "font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" "
      "fill=\"white\"/>\n",
      W, H);
  svg += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", L, H - B,
                     W - R, H - B);
  svg += fmt::format("<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n", L, T, L,
                     H - B);
  for (int i = 0; i <= 4; ++i) {
    const double v = lo + (hi - lo) * i / 4;
    svg += fmt::format("<text x=\"{}\" y=\"{:.1f}\" text-anchor=\"end\">{:.3g}</text>\n", L - 6,
                       Y(v) + 4, v);
    const double s = max_step * i / 4;
    svg += fmt::format("<text x=\"{:.1f}\" y=\"{}\" text-anchor=\"middle\">{:.0f}</text>\n", X(s),
                       H - B + 16, s);
  }
  svg += fmt::format("<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">step</text>\n", (L + W - R) / 2,
                     H - 8);
  auto line = [&](const std::vector<std::pair<double, double>>& pts, const char* color,
                  const char* label, int row, bool dots) {
    if (pts.empty()) return;
    std::string p;
    for (const auto& [s, v] : pts) p += fmt::format("{:.1f},{:.1f} ", X(s), Y(v));
    svg += fmt::format("<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.5\" points=\"{}\"/>\n",
                       color, p);
    if (dots)
      for (const auto& [s, v] : pts)
        svg += fmt::format("<circle cx=\"{:.1f}\" cy=\"{:.1f}\" r=\"3\" fill=\"{}\"/>\n", X(s), Y(v),
                           color);
    svg += fmt::format(
        "<rect x=\"{}\" y=\"{}\" width=\"14\" height=\"3\" fill=\"{}\"/><text x=\"{}\" "
        "y=\"{}\">{}</text>\n",
        W - R - 170, T + 6 + 16 * row, color, W - R - 150, T + 10 + 16 * row, label);
  };
  std::vector<std::pair<double, double>> loss, ce, val;
  for (const StepStats& s : history) {
    loss.emplace_back(static_cast<double>(s.step), s.loss);
    ce.emplace_back(static_cast<double>(s.step), s.ce);
  }
  for (const EvalStats& e : evals) val.emplace_back(static_cast<double>(e.step), e.ce);
  line(loss, "#1f77b4", "train loss (weighted)", 0, false);
  line(ce, "#2ca02c", "train cross-entropy", 1, false);
  line(val, "#ff7f0e", "validation cross-entropy", 2, true);
  return svg + "</svg>\n";
}

FinetuneReport finetune(const FinetuneOptions& o, ThreadPool& pool) {
  using Clock = std::chrono::steady_clock;
  SPARSA_CHECK(o.device == "cpu" || o.device == "cuda",
               "finetune: --device must be cpu or cuda, got '{}'", o.device);
  if (o.device == "cuda") {
    std::string why;
    SPARSA_CHECK(cuda::available(&why), "finetune: --device cuda: {} (or use --device cpu)", why);
    cuda::parse_matmul(o.precision);
  }
  const compress::Recipe recipe = compress::Recipe::from_file(o.recipe_path);
  const compress::Stage* stage = recipe.finetune_stage();
  SPARSA_CHECK(stage != nullptr,
               "{}: no finetune stage (a stage with 'run_type: finetune'; see "
               "recipes/finetune-squarehead.yaml)",
               recipe.source);
  for (const compress::Stage& s : recipe.stages)
    SPARSA_CHECK(s.run_type == compress::RunType::kFinetune,
                 "{}: stage '{}' is a one-shot stage; run it with `sparsa compress` first and "
                 "fine-tune its output",
                 recipe.source, s.name);
  if (o.stop_after == 0 && !o.overwrite)
    SPARSA_CHECK(!fs::exists(o.output_dir),
                 "finetune: output directory '{}' already exists (choose another or pass "
                 "--overwrite)",
                 o.output_dir);
  bool needs_teacher = false;
  for (const compress::Modifier& m : stage->modifiers)
    if (const auto* d = std::get_if<compress::DistillationArgs>(&m.args))
      needs_teacher = d->kl > 0 || d->squarehead > 0;
  SPARSA_CHECK(!needs_teacher || !o.teacher_dir.empty(),
               "{}: stage '{}', modifier 'DistillationModifier' distils (kl or squarehead > 0): "
               "give --teacher",
               recipe.source, stage->name);

  Model student = Model::load(o.student_dir);
  std::optional<Model> teacher;
  if (needs_teacher) teacher.emplace(Model::load(o.teacher_dir));
  const io::Checkpoint student_ck = io::Checkpoint::open_dir(o.student_dir);
  const DType out_dtype = student_ck.get("model.embed_tokens.weight").dtype;

  const Tokenizer tokenizer =
      Tokenizer::from_file((fs::path(o.student_dir) / "tokenizer.json").string());
  const io::ModelConfig& cfg = student.config();
  SPARSA_CHECK(!cfg.eos_token_ids.empty(), "{}: no eos_token_id to join documents", o.student_dir);
  const int32_t eos = cfg.eos_token_ids[0];
  std::vector<int32_t> tokens = tokenize_corpus(tokenizer, io::read_documents(o.data_path), eos);
  const int64_t seq = stage->training.seq_len, eval_windows = stage->training.eval_windows;
  TokenData data = o.valid_path.empty()
                       ? TokenData(std::move(tokens), seq, eval_windows)
                       : TokenData(std::move(tokens),
                                   tokenize_corpus(tokenizer, io::read_documents(o.valid_path), eos),
                                   seq, eval_windows);
  Trainer trainer(student, teacher ? &*teacher : nullptr, *stage, std::move(data), pool,
                  o.max_tokens);
  // The student's compression config, read once if a quantization- or clustering-aware tensor
  // needs its stored grid or palettes.
  std::optional<io::CompressionConfig> stored_config;
  if (trainer.quant_scheme() != nullptr || !trainer.clustered_tensors().empty())
    stored_config = io::read_compression_config(
        nlohmann::json::parse(read_text_file((fs::path(o.student_dir) / "config.json").string())),
        o.student_dir + "/config.json");
  // Quantization-aware tensors stored quantized keep their grid (GPTQ's, say).
  if (const compress::QuantScheme* qs = trainer.quant_scheme()) {
    const io::CompressionConfig& scc = *stored_config;
    for (const std::string& name : trainer.quantized_tensors()) {
      const std::string mod = module_of(name);
      if (!io::is_compressed_weight(student_ck, mod)) continue;
      const ParamTensor* t = student.find(name);
      const int64_t rows = t->shape.at(0), cols = t->shape.at(1);
      io::StoredWeight sw = io::read_stored_weight(student_ck, mod, rows, cols, scc);
      if (sw.kind != io::StoredWeight::Kind::kPackQuantized) continue;
      SPARSA_CHECK(sw.bits == qs->bits && scc.quantization &&
                       scc.quantization->symmetric == qs->symmetric &&
                       scc.quantization->group_size == qs->group_size,
                   "{}: '{}' is stored with {}-bit codes ({}, group {}); the recipe's "
                   "QuantizationModifier trains {} bits ({}, group {})",
                   o.student_dir, mod, sw.bits,
                   scc.quantization && scc.quantization->symmetric ? "symmetric" : "asymmetric",
                   scc.quantization ? scc.quantization->group_size : 0, qs->bits,
                   qs->symmetric ? "symmetric" : "asymmetric", qs->group_size);
      FakeQuantGrid g;
      g.bits = sw.bits;
      g.rows = rows;
      g.cols = cols;
      g.n_groups = sw.n_groups;
      g.scales = std::move(sw.scales);
      g.zeros.assign(sw.zeros.begin(), sw.zeros.end());
      g.g_idx = std::move(sw.g_idx);
      trainer.set_quant_grid(name, std::move(g));
    }
  }
  // Clustering-aware tensors stored palettized start from their palettes.
  if (!trainer.clustered_tensors().empty()) {
    const io::CompressionConfig& scc = *stored_config;
    for (const std::string& name : trainer.clustered_tensors()) {
      const std::string mod = module_of(name);
      if (!io::is_compressed_weight(student_ck, mod)) continue;
      const ParamTensor* t = student.find(name);
      io::StoredWeight sw =
          io::read_stored_weight(student_ck, mod, t->shape.at(0), t->shape.at(1), scc);
      if (sw.kind != io::StoredWeight::Kind::kPalettized) continue;
      DkmTensor d;
      d.bits = sw.bits;
      d.rows = t->shape.at(0);
      d.cols = t->shape.at(1);
      d.group_rows = sw.group_rows;
      d.centroids = std::move(sw.lut);
      trainer.set_clustering(name, std::move(d));
    }
  }
  if (o.device == "cuda") trainer.use_cuda(o.precision);
  if (!o.resume_dir.empty()) trainer.load_checkpoint(o.resume_dir);

  const std::string ckpt_root =
      o.checkpoint_dir.empty() ? o.output_dir + ".checkpoints" : o.checkpoint_dir;
  FinetuneReport rep;
  rep.device = trainer.device_description();
  rep.total_steps = trainer.total_steps();
  const compress::TrainingArgs& a = trainer.args();
  const int64_t first = trainer.step();
  const int64_t last = o.stop_after > 0 ? std::min(o.stop_after, trainer.total_steps())
                                        : trainer.total_steps();
  if (first == 0 && trainer.evals().empty()) trainer.evaluate();
  Progress bar("finetune", std::max<int64_t>(0, last - first), "step", o.progress);
  double train_seconds = 0;
  while (trainer.step() < last) {
    const auto t0 = Clock::now();
    const StepStats s = trainer.train_step();
    train_seconds += std::chrono::duration<double>(Clock::now() - t0).count();
    rep.steps += 1;
    rep.tokens += trainer.tokens_per_step();
    if (rep.steps == 1) rep.first_loss = s.loss;
    rep.last_loss = s.loss;
    if (a.eval_every > 0 && s.step % a.eval_every == 0 && s.step < trainer.total_steps())
      trainer.evaluate();
    const bool stop_here = o.stop_after > 0 && s.step == last;
    if ((a.checkpoint_every > 0 && s.step % a.checkpoint_every == 0) || stop_here) {
      const std::string d = (fs::path(ckpt_root) / fmt::format("step-{:06d}", s.step)).string();
      trainer.save_checkpoint(d);
      rep.checkpoints.push_back(d);
    }
    bar.advance(1, fmt::format("loss {:.4f} ce {:.4f} | {:.0f} tok/s", s.loss, s.ce,
                               static_cast<double>(rep.tokens) / std::max(train_seconds, 1e-9)));
  }
  bar.finish();
  rep.seconds = train_seconds;
  rep.tokens_per_s = train_seconds > 0 ? static_cast<double>(rep.tokens) / train_seconds : 0.0;
  rep.flops_per_token = trainer.flops_per_token();
  rep.model_tflops = rep.tokens_per_s * rep.flops_per_token / 1e12;
  rep.sparsity = trainer.masked_sparsity();
  if (!trainer.evals().empty()) rep.valid_ce_before = trainer.evals().front().ce;
  if (trainer.step() < trainer.total_steps()) {
    rep.valid_ce_after = trainer.evals().empty() ? 0.0 : trainer.evals().back().ce;
    return rep;  // stopped early: the checkpoint is the result
  }
  rep.valid_ce_after = trainer.evaluate().ce;

  // Curves.
  std::string train_csv = "step,tokens,lr,loss,ce,kl,squarehead,grad_norm,sparsity,seconds\n";
  for (const StepStats& s : trainer.history())
    train_csv += fmt::format("{},{},{},{},{},{},{},{},{},{}\n", s.step, s.tokens, csv_number(s.lr),
                             csv_number(s.loss), csv_number(s.ce), csv_number(s.kl),
                             csv_number(s.squarehead), csv_number(s.grad_norm),
                             csv_number(s.sparsity), csv_number(s.seconds));
  std::string valid_csv = "step,ce,ppl\n";
  for (const EvalStats& e : trainer.evals())
    valid_csv += fmt::format("{},{},{}\n", e.step, csv_number(e.ce), csv_number(e.ppl));

  trainer.sync_to_host();
  std::vector<std::string> sparse;
  for (const ParamTensor& t : student.tensors())
    if (trainer.masked(t.name)) sparse.push_back(t.name);
  QuantizedOutput qout;
  if (const compress::QuantScheme* qs = trainer.quant_scheme()) {
    qout.scheme = *qs;
    for (const std::string& name : trainer.quantized_tensors())
      qout.tensors.push_back({name, &trainer.quant_grid(name)});
  }
  for (const std::string& name : trainer.clustered_tensors())
    qout.palettes.push_back({name, dkm_palette(trainer.clustering(name), student.param(name))});
  const bool compressed_out = trainer.quant_scheme() != nullptr || !qout.palettes.empty();
  write_hf_checkpoint(student, o.student_dir, o.output_dir, out_dtype, sparse, o.overwrite,
                      {{"recipe.yaml", recipe.to_yaml()},
                       {"train_log.csv", train_csv},
                       {"valid_log.csv", valid_csv},
                       {"loss.svg", loss_svg(trainer.history(), trainer.evals())}},
                      compressed_out ? &qout : nullptr);
  rep.output_dir = o.output_dir;
  return rep;
}

}  // namespace sparsa::train
