// Compression recipes: what to do to a model, written in YAML the way llm-compressor writes them —
// stages hold groups of modifiers, each modifier is one algorithm with its arguments, applied in
// the order written to the linear layers its `targets` name and its `ignore` list does not.
//
//   # recipes/sparsegpt-50-gptq-w4g128.yaml
//   calibration: {samples: 128, seq_len: 512}      # optional; these are the defaults
//   oneshot_stage:
//     pruning_modifiers:
//       SparseGPTModifier:
//         sparsity: 0.5
//         mask_structure: "0:0"
//         block_size: 128
//         dampening_frac: 0.01
//         targets: ["re:.*(q|k|v|o|gate|up|down)_proj$"]
//         ignore: ["lm_head"]
//     quantization_modifiers:
//       GPTQModifier:
//         scheme: {bits: 4, group_size: 128, symmetric: false, actorder: false}
//         targets: ["Linear"]
//         ignore: ["lm_head"]
//
//   using namespace sparsa::compress;
//   Recipe r = Recipe::from_file("recipes/x.yaml");
//   for (const Modifier* m : r.modifiers()) {
//     if (!m->applies_to("model.layers.0.mlp.down_proj")) continue;
//     if (const auto* a = std::get_if<SparseGPTArgs>(&m->args)) { /* a->sparsity, ... */ }
//   }
//   std::string stored = r.to_yaml();  // saved beside the compressed weights
//
// The file format
// - Top level: `calibration` (optional: `samples`, `seq_len`) and one or more stages, keys ending
//   in "stage" (`oneshot_stage`, `DEFAULT_stage`). A stage holds modifier groups, keys ending in
//   "modifiers" (`pruning_modifiers`), and optionally `run_type: oneshot | finetune`; a group maps modifier
//   names to their arguments. Stage, group and modifier order is kept. Calibration defaults are
//   the peer protocol's (128 windows of 512 tokens from data/train.jsonl, layer-sequential).
// - Every modifier takes `targets` (default ["Linear"]) and `ignore` (default []); see matches().
// - Unknown keys anywhere are errors, as are wrong types, out-of-range values and bad regexes.
//   Errors read "<source>: stage 'S', modifier 'M', field 'F': <what>, got <value> (line N)".
//
// Modifiers and their fields (defaults in parentheses; names follow llm-compressor where it has
// the algorithm):
//   MagnitudePruningModifier  sparsity in [0,1) (required when unstructured), mask_structure
//                             ("0:0") — per-matrix |W| threshold; "N:M" prunes the N lowest of
//                             every M input columns, and sparsity, if given, must equal N/M
//   WandaPruningModifier      sparsity, mask_structure, owl — |W|·‖X_j‖ per output row
//   SparseGPTModifier         sparsity, mask_structure, owl, block_size (128), dampening_frac
//                             (0.01), quantize (a scheme: joint quantization during pruning, as
//                             the reference SparseGPT's --wbits; absent or false = none)
//     owl: {lambda: 0.08, m: 5} — OWL non-uniform layer sparsity (sparsity ± lambda by outlier
//          ratio, outliers > m × mean); llm-compressor's `sparsity_profile: owl`, `owl_lmbda`,
//          `owl_m` are read too. Unstructured only.
//   StructuredPruningModifier head_sparsity, mlp_sparsity (0) in [0,1), at least one > 0: the
//                             fraction of attention heads (removed in whole GQA groups, the same
//                             number in every layer) / MLP intermediate channels removed;
//                             importance: activation (default, |W|·‖X‖) | fluctuation (FLAP) |
//                             magnitude; bias_compensation (false): FLAP's mean-contribution bias
//                             on o_proj / down_proj (llama only). See structured.h. It must be
//                             the recipe's first modifier and cover every layer.
//   QuantizationModifier      scheme | config_groups — round to nearest (RTN)
//   GPTQModifier              scheme | config_groups, block_size (128), dampening_frac (0.01),
//                             actorder (also inside the scheme)
//   AWQModifier               scheme | config_groups, n_grid (20), duo_scaling (true), apply_clip
//                             (true), mappings ([] = the Llama defaults)
//                             [{smooth_layer: "re:.*input_layernorm$", balance_layers: [...]}]
//   SmoothQuantModifier       smoothing_strength (0.5) in [0,1], mappings ([] = Llama defaults)
//                             [[["re:.*q_proj", "re:.*k_proj", "re:.*v_proj"],
//                               "re:.*input_layernorm"], ...]; pair it with a W8A8 scheme
//   PalettizationModifier     bits (4) 2..8, granularity per_tensor | per_grouped_channel
//                             (with group_size: output rows per palette), weight: none | hessian
//                             (k-means weighted by the Hessian diagonal); in a finetune stage
//                             (DKM) also temperature (0.02) > 0 and iterations (3) >= 0
//   LowRankModifier           method svd | svd_whitened (SVD-LLM), and exactly one of
//                             rank_fraction (of min(rows, cols)), param_fraction (rank chosen so
//                             U and V hold this fraction of W's parameters), energy (fraction of
//                             the squared singular values kept); each in (0, 1]
//
// Fine-tuning stages (`run_type: finetune`, at most one per recipe) take a `training` map (see
// TrainingArgs: lr, min_lr_ratio, warmup_steps, steps | max_tokens, batch_size, seq_len,
// grad_accum, weight_decay, beta1, beta2, eps, clip, seed, checkpoint_every, eval_every,
// eval_windows) and these modifiers, which only they may hold:
//   ConstantMaskModifier      (no arguments) — the targets' zeros stay zero
//   GradualPruningModifier    init_sparsity (0) <= final_sparsity (required) < 1, start_step (0)
//                             <= end_step (required), update_frequency (1) — cubic schedule
//   DistillationModifier      ce (1), kl (0), squarehead (0) >= 0, not all 0; temperature (1) > 0
//                             (one per stage)
//
// A scheme is, in one of three spellings:
//   scheme: {bits: 4, group_size: 128, symmetric: false, actorder: false}
//       bits 2..8; group_size > 0 input columns per scale, or -1 / absent / `strategy: channel`
//       for one scale per output channel; symmetric (true); actorder false | true | group |
//       weight (GPTQ only); input_activations: 8 for W8A8 (dynamic per-token int8)
//   scheme: W4A16 | W4A16_ASYM | W8A16 | W8A8          (compressed-tensors' presets)
//   config_groups: {group_0: {targets: [...], weights: {num_bits, type: int, symmetric,
//                   strategy, group_size, actorder, dynamic: false, observer}, input_activations}}
//       exactly one group; its targets replace the modifier's.
#pragma once

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <variant>
#include <vector>

namespace sparsa::compress {

/// "N:M": the N lowest-scored weights of every M consecutive input columns are pruned (so "2:4"
/// keeps 2 of 4); "0:0" is unstructured.
struct MaskStructure {
  int n = 0;
  int m = 0;

  bool unstructured() const { return m == 0; }
  double sparsity() const { return m == 0 ? 0.0 : static_cast<double>(n) / m; }
  std::string to_string() const;
  /// nullopt unless "0:0" or "N:M" with 0 < N < M <= 1024.
  static std::optional<MaskStructure> parse(std::string_view s);
  bool operator==(const MaskStructure&) const = default;
};

enum class ActOrder : uint8_t { kNone, kGroup, kWeight };

struct QuantScheme {
  int bits = 4;
  int64_t group_size = 128;  // input columns per scale; 0: one scale per output channel
  bool symmetric = true;
  ActOrder actorder = ActOrder::kNone;
  int input_activation_bits = 0;  // 0: weight only; 8: dynamic per-token int8 (W8A8)

  bool per_channel() const { return group_size == 0; }
  bool operator==(const QuantScheme&) const = default;
};

/// OWL (Yin et al. 2023, arXiv:2310.05175): layer sparsity s_l = s ± lambda, ranked by the
/// fraction of outlier activations-times-weights (> m × the layer mean).
struct Owl {
  double lambda = 0.08;
  double m = 5.0;
  bool operator==(const Owl&) const = default;
};

struct MagnitudePruningArgs {
  double sparsity = 0.5;
  MaskStructure mask_structure = {};
  bool operator==(const MagnitudePruningArgs&) const = default;
};

struct WandaPruningArgs {
  double sparsity = 0.5;
  MaskStructure mask_structure = {};
  std::optional<Owl> owl = {};
  bool operator==(const WandaPruningArgs&) const = default;
};

struct SparseGPTArgs {
  double sparsity = 0.5;
  MaskStructure mask_structure = {};
  std::optional<Owl> owl = {};
  int64_t block_size = 128;
  double dampening_frac = 0.01;  // H += dampening_frac · mean(diag H) · I
  std::optional<QuantScheme> quantize = {};
  bool operator==(const SparseGPTArgs&) const = default;
};

enum class Importance : uint8_t { kActivation, kMagnitude, kFluctuation };

struct StructuredPruningArgs {
  double head_sparsity = 0.0;
  double mlp_sparsity = 0.0;
  Importance importance = Importance::kActivation;
  bool bias_compensation = false;
  bool operator==(const StructuredPruningArgs&) const = default;
};

struct QuantizationArgs {
  QuantScheme scheme = {};
  bool operator==(const QuantizationArgs&) const = default;
};

struct GPTQArgs {
  QuantScheme scheme = {};
  int64_t block_size = 128;
  double dampening_frac = 0.01;
  bool operator==(const GPTQArgs&) const = default;
};

/// A smooth layer (a norm or linear whose output feeds the balance layers) and the linears whose
/// input columns absorb the inverse scales; names are matches() patterns.
struct LayerMapping {
  std::string smooth_layer = {};
  std::vector<std::string> balance_layers = {};
  bool operator==(const LayerMapping&) const = default;
};

struct AWQArgs {
  QuantScheme scheme = {};
  int n_grid = 20;
  bool duo_scaling = true;
  bool apply_clip = true;
  std::vector<LayerMapping> mappings = {};
  bool operator==(const AWQArgs&) const = default;
};

struct SmoothQuantArgs {
  double smoothing_strength = 0.5;
  std::vector<LayerMapping> mappings = {};
  bool operator==(const SmoothQuantArgs&) const = default;
};

enum class PaletteGranularity : uint8_t { kPerTensor, kPerGroupedChannel };
enum class PaletteWeighting : uint8_t { kNone, kHessian };

struct PalettizationArgs {
  int bits = 4;
  PaletteGranularity granularity = PaletteGranularity::kPerTensor;
  int64_t group_size = 0;  // output rows per palette (per_grouped_channel)
  PaletteWeighting weight = PaletteWeighting::kNone;
  // Clustering-aware fine-tuning (DKM, in a finetune stage): the softness of the assignment,
  // relative to the palette's mean spacing squared, and the centroid updates per step. Small
  // enough that the hard assignment at the end loses little (3-bit `small`, 48 M tokens: τ 0.2
  // gave valid ppl 14.2 soft but 16.3 hard; 0.02 gave 14.6 soft and 14.66 hard).
  double temperature = 0.02;
  int64_t iterations = 3;
  bool operator==(const PalettizationArgs&) const = default;
};

enum class LowRankMethod : uint8_t { kSvd, kSvdWhitened };

struct LowRankArgs {
  LowRankMethod method = LowRankMethod::kSvd;
  // Exactly one is set (> 0).
  double rank_fraction = 0.0;
  double param_fraction = 0.0;
  double energy = 0.0;
  bool operator==(const LowRankArgs&) const = default;
};

// ---- fine-tuning (stages with `run_type: finetune`; run by sparsa/train/finetune.h) ----------

/// ConstantMaskModifier: the targets' zero weights stay exactly zero while training (the mask is
/// the student's nonzero pattern, fixed).
struct ConstantMaskArgs {
  bool operator==(const ConstantMaskArgs&) const = default;
};

/// GradualPruningModifier: magnitude pruning on the cubic schedule of Zhu & Gupta 2017 ("To
/// prune, or not to prune"): at steps start_step, start_step + update_frequency, ... up to
/// end_step each target is pruned to s_t = s_f + (s_0 − s_f)(1 − (t − start)/(end − start))³.
struct GradualPruningArgs {
  double init_sparsity = 0.0;   // s_0
  double final_sparsity = 0.5;  // s_f
  int64_t start_step = 0;
  int64_t end_step = 0;
  int64_t update_frequency = 1;
  bool operator==(const GradualPruningArgs&) const = default;
};

/// DistillationModifier: the loss is ce · CE(next token) + kl · T²·KL(teacher ‖ student at T) +
/// squarehead · Σ_layers MSE(student, teacher) / MSE(teacher, 0) over block outputs.
struct DistillationArgs {
  double ce = 1.0;
  double kl = 0.0;
  double squarehead = 0.0;
  double temperature = 1.0;
  bool operator==(const DistillationArgs&) const = default;
};

/// The variant's alternatives are in the order of ModifierType.
using ModifierArgs = std::variant<MagnitudePruningArgs, WandaPruningArgs, SparseGPTArgs,
                                  StructuredPruningArgs, QuantizationArgs, GPTQArgs, AWQArgs,
                                  SmoothQuantArgs, PalettizationArgs, LowRankArgs,
                                  ConstantMaskArgs, GradualPruningArgs, DistillationArgs>;

enum class ModifierType : uint8_t {
  kMagnitudePruning,
  kWandaPruning,
  kSparseGPT,
  kStructuredPruning,
  kQuantization,
  kGPTQ,
  kAWQ,
  kSmoothQuant,
  kPalettization,
  kLowRank,
  kConstantMask,
  kGradualPruning,
  kDistillation,
};

/// Whether a modifier belongs in a fine-tuning stage (ConstantMask, GradualPruning,
/// Distillation) rather than a one-shot one.
bool is_finetune_modifier(ModifierType t);

/// "SparseGPTModifier", ...
std::string_view modifier_name(ModifierType t);
std::optional<ModifierType> parse_modifier_name(std::string_view name);

struct Modifier {
  std::string group = "modifiers";  // the `<name>_modifiers` key it was written under
  ModifierArgs args = {};
  std::vector<std::string> targets = {"Linear"};
  std::vector<std::string> ignore = {};

  ModifierType type() const { return static_cast<ModifierType>(args.index()); }
  std::string_view name() const { return modifier_name(type()); }
  /// matches(targets, name) && !matches(ignore, name).
  bool applies_to(const std::string& tensor_or_module_name) const;
  bool operator==(const Modifier&) const = default;
};

/// The training arguments of a fine-tuning stage (`training:` in the stage).
struct TrainingArgs {
  double lr = 1e-4;             // peak learning rate
  double min_lr_ratio = 0.0;    // the cosine decays to lr · min_lr_ratio
  int64_t warmup_steps = 0;     // linear warmup from 0
  int64_t steps = 0;            // optimizer steps; 0: from max_tokens
  int64_t max_tokens = 0;       // training tokens; 0: from steps
  int64_t batch_size = 8;       // sequences per micro-batch
  int64_t seq_len = 256;        // tokens per sequence
  int64_t grad_accum = 1;       // micro-batches per optimizer step
  double weight_decay = 0.0;    // AdamW, decoupled; matrices only
  double beta1 = 0.9;
  double beta2 = 0.95;
  double eps = 1e-8;
  double clip = 1.0;            // global gradient-norm clip; 0: off
  int64_t seed = 0;             // data order
  int64_t checkpoint_every = 0; // steps; 0: none
  int64_t eval_every = 0;       // steps between validation losses; 0: at the end only
  int64_t eval_windows = 8;     // validation sequences
  bool operator==(const TrainingArgs&) const = default;
};

enum class RunType : uint8_t { kOneshot, kFinetune };

struct Stage {
  std::string name = {};  // e.g. "oneshot_stage"
  std::vector<Modifier> modifiers = {};
  RunType run_type = RunType::kOneshot;  // `run_type: finetune` holds only fine-tuning modifiers
  TrainingArgs training = {};            // finetune stages
  bool operator==(const Stage&) const = default;
};

struct Calibration {
  int64_t samples = 128;  // windows
  int64_t seq_len = 512;  // tokens per window
  bool operator==(const Calibration&) const = default;
};

struct Recipe {
  std::string source = {};  // file name or the `source` given to from_yaml, for messages
  Calibration calibration = {};
  std::vector<Stage> stages = {};

  /// Parses and validates; throws sparsa::Error naming the file, stage, modifier and field.
  static Recipe from_file(const std::string& path);
  static Recipe from_yaml(const std::string& text, const std::string& source);
  /// Every field written out explicitly (defaults included); from_yaml reads it back equal.
  std::string to_yaml() const;
  /// All modifiers, stage by stage, in order.
  std::vector<const Modifier*> modifiers() const;
  /// The fine-tuning stage (a recipe holds at most one), or nullptr.
  const Stage* finetune_stage() const;

  bool operator==(const Recipe& o) const {
    return calibration == o.calibration && stages == o.stages;
  }
};

/// Whether a module or tensor name matches any pattern of an llm-compressor targets/ignore list:
/// - "re:<regex>": ECMAScript regex matched from the start of the name (Python's re.match, which
///   compressed-tensors and llm-compressor use, so `ignore` lists mean the same in vLLM); write a
///   leading ".*" to match anywhere.
/// - "Linear": every linear projection (a module whose last name part ends in "_proj", and
///   "lm_head").
/// - a plain name: the module itself ("model.layers.0.mlp.down_proj"), a dot-separated suffix of
///   it ("mlp.down_proj", "lm_head") or one of its parents ("model.layers.0").
/// A tensor name ("....q_proj.weight") is matched through its module name too.
bool matches(const std::vector<std::string>& patterns, const std::string& tensor_or_module_name);

/// Throws sparsa::Error when a "re:" pattern does not compile.
void check_pattern(const std::string& pattern);

}  // namespace sparsa::compress
