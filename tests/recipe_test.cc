#include "sparsa/compress/recipe.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <filesystem>
#include <set>
#include <string>
#include <vector>

#include "sparsa/core/error.h"
#include "test_util.h"

namespace sparsa::compress {
namespace {

const std::string kProjections = "re:.*(q|k|v|o|gate|up|down)_proj$";

std::string recipes_dir() { return testing::source_dir() + "/recipes"; }

std::string error_of(const std::string& yaml) {
  try {
    Recipe::from_yaml(yaml, "recipes/x.yaml");
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

// A one-modifier recipe around `args` (indented 6 spaces).
std::string one(const std::string& modifier, const std::string& args) {
  return "oneshot_stage:\n  pruning_modifiers:\n    " + modifier + ":\n" + args;
}

TEST(Recipe, LoadsEveryShippedRecipe) {
  std::set<std::string> names;
  for (const auto& entry : std::filesystem::directory_iterator(recipes_dir())) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    Recipe r;
    ASSERT_NO_THROW(r = Recipe::from_file(entry.path().string()));
    names.insert(entry.path().stem().string());
    EXPECT_FALSE(r.modifiers().empty());
    // Stored beside the weights and read back, the recipe is the same recipe.
    EXPECT_EQ(Recipe::from_yaml(r.to_yaml(), "stored"), r) << r.to_yaml();
  }
  for (const char* required :
       {"magnitude-50",   "wanda-50",         "sparsegpt-50",   "sparsegpt-2of4",
        "sparsegpt-70",   "owl-sparsegpt-70", "rtn-w4g128",     "gptq-w4g128",
        "gptq-w3g128",    "gptq-w4",          "awq-w4g128",     "smoothquant-w8a8",
        "palettize-4bit", "palettize-3bit",   "svd-50",         "sparsegpt-50-gptq-w4g128",
        "magnitude-2of4", "wanda-2of4",       "wanda-70",       "rtn-w3g128",
        "rtn-w4",         "gptq-w2g128",      "sparsegpt-50-w4"}) {
    EXPECT_TRUE(names.count(required)) << "recipes/" << required << ".yaml is missing";
  }
  // Every modifier type has an example.
  std::set<ModifierType> types;
  for (const std::string& n : names) {
    const Recipe r = Recipe::from_file(recipes_dir() + "/" + n + ".yaml");
    for (const Modifier* m : r.modifiers()) types.insert(m->type());
  }
  EXPECT_EQ(types.size(), std::variant_size_v<ModifierArgs>);
}

TEST(Recipe, ShippedRecipesFollowThePeerProtocol) {
  for (const auto& entry : std::filesystem::directory_iterator(recipes_dir())) {
    if (entry.path().extension() != ".yaml") continue;
    SCOPED_TRACE(entry.path().string());
    const Recipe r = Recipe::from_file(entry.path().string());
    EXPECT_EQ(r.calibration.samples, 128);
    EXPECT_EQ(r.calibration.seq_len, 512);
    for (const Modifier* m : r.modifiers()) {
      EXPECT_EQ(m->targets, std::vector<std::string>{kProjections});
      EXPECT_EQ(m->ignore, std::vector<std::string>{"lm_head"});
      if (const auto* a = std::get_if<SparseGPTArgs>(&m->args)) {
        EXPECT_EQ(a->block_size, 128);
        EXPECT_DOUBLE_EQ(a->dampening_frac, 0.01);
      }
      if (const auto* a = std::get_if<GPTQArgs>(&m->args)) {
        EXPECT_EQ(a->block_size, 128);
        EXPECT_DOUBLE_EQ(a->dampening_frac, 0.01);
        EXPECT_FALSE(a->scheme.symmetric);  // asymmetric min-max
      }
      if (const auto* a = std::get_if<QuantizationArgs>(&m->args)) {
        if (a->scheme.input_activation_bits == 0) {
          EXPECT_FALSE(a->scheme.symmetric);
        }
      }
      for (const char* proj : {"q", "k", "v", "o", "gate", "up", "down"}) {
        const std::string attn = std::string(proj).size() == 1 ? "self_attn" : "mlp";
        EXPECT_TRUE(m->applies_to("model.layers.3." + attn + "." + proj + "_proj.weight"));
      }
      EXPECT_FALSE(m->applies_to("lm_head.weight"));
      EXPECT_FALSE(m->applies_to("model.embed_tokens.weight"));
      EXPECT_FALSE(m->applies_to("model.layers.3.input_layernorm.weight"));
    }
  }
}

TEST(Recipe, ReadsTheCombinedRecipe) {
  const Recipe r = Recipe::from_file(recipes_dir() + "/sparsegpt-50-gptq-w4g128.yaml");
  ASSERT_EQ(r.stages.size(), 1u);
  EXPECT_EQ(r.stages[0].name, "oneshot_stage");
  const std::vector<const Modifier*> ms = r.modifiers();
  ASSERT_EQ(ms.size(), 2u);
  EXPECT_EQ(ms[0]->type(), ModifierType::kSparseGPT);
  EXPECT_EQ(ms[0]->name(), "SparseGPTModifier");
  EXPECT_EQ(ms[0]->group, "pruning_modifiers");
  const auto& sg = std::get<SparseGPTArgs>(ms[0]->args);
  EXPECT_DOUBLE_EQ(sg.sparsity, 0.5);
  EXPECT_TRUE(sg.mask_structure.unstructured());
  EXPECT_FALSE(sg.owl.has_value());
  EXPECT_FALSE(sg.quantize.has_value());
  EXPECT_EQ(ms[1]->type(), ModifierType::kGPTQ);
  const auto& gq = std::get<GPTQArgs>(ms[1]->args);
  EXPECT_EQ(gq.scheme, (QuantScheme{.bits = 4, .group_size = 128, .symmetric = false}));
}

TEST(Recipe, ReadsEachMethodsArguments) {
  auto first = [](const std::string& name) {
    return *Recipe::from_file(recipes_dir() + "/" + name + ".yaml").modifiers().at(0);
  };
  const auto sg24 = std::get<SparseGPTArgs>(first("sparsegpt-2of4").args);
  EXPECT_EQ(sg24.mask_structure, (MaskStructure{2, 4}));
  EXPECT_DOUBLE_EQ(sg24.sparsity, 0.5);
  const auto owl = std::get<SparseGPTArgs>(first("owl-sparsegpt-70").args);
  ASSERT_TRUE(owl.owl.has_value());
  EXPECT_DOUBLE_EQ(owl.sparsity, 0.7);
  EXPECT_DOUBLE_EQ(owl.owl->lambda, 0.08);
  EXPECT_DOUBLE_EQ(owl.owl->m, 5);
  const auto joint = std::get<SparseGPTArgs>(first("sparsegpt-50-w4").args);
  ASSERT_TRUE(joint.quantize.has_value());
  EXPECT_EQ(*joint.quantize, (QuantScheme{.bits = 4, .group_size = 0, .symmetric = false}));
  EXPECT_TRUE(std::get<GPTQArgs>(first("gptq-w4").args).scheme.per_channel());
  EXPECT_EQ(std::get<GPTQArgs>(first("gptq-w2g128").args).scheme.bits, 2);
  EXPECT_EQ(std::get<QuantizationArgs>(first("rtn-w3g128").args).scheme,
            (QuantScheme{.bits = 3, .group_size = 128, .symmetric = false}));
  const auto awq = std::get<AWQArgs>(first("awq-w4g128").args);
  EXPECT_EQ(awq.n_grid, 20);
  EXPECT_TRUE(awq.apply_clip);
  const Recipe sq = Recipe::from_file(recipes_dir() + "/smoothquant-w8a8.yaml");
  const auto sqa = std::get<SmoothQuantArgs>(sq.modifiers()[0]->args);
  EXPECT_DOUBLE_EQ(sqa.smoothing_strength, 0.8);
  ASSERT_EQ(sqa.mappings.size(), 2u);
  EXPECT_EQ(sqa.mappings[0].smooth_layer, "re:.*input_layernorm$");
  EXPECT_EQ(sqa.mappings[0].balance_layers.size(), 3u);
  EXPECT_EQ(
      std::get<QuantizationArgs>(sq.modifiers()[1]->args).scheme,
      (QuantScheme{.bits = 8, .group_size = 0, .symmetric = true, .input_activation_bits = 8}));
  const auto pal = std::get<PalettizationArgs>(first("palettize-3bit").args);
  EXPECT_EQ(pal.bits, 3);
  EXPECT_EQ(pal.granularity, PaletteGranularity::kPerGroupedChannel);
  EXPECT_EQ(pal.group_size, 16);
  EXPECT_EQ(pal.weight, PaletteWeighting::kHessian);
  const auto svd = std::get<LowRankArgs>(first("svd-50").args);
  EXPECT_EQ(svd.method, LowRankMethod::kSvd);
  EXPECT_DOUBLE_EQ(svd.param_fraction, 0.5);
  const auto st = std::get<StructuredPruningArgs>(first("structured-25").args);
  EXPECT_DOUBLE_EQ(st.head_sparsity, 0.25);
  EXPECT_DOUBLE_EQ(st.mlp_sparsity, 0.25);
}

TEST(Recipe, CalibrationDefaultsToThePeerProtocol) {
  const Recipe r = Recipe::from_yaml(one("MagnitudePruningModifier", "      sparsity: 0.5\n"), "x");
  EXPECT_EQ(r.calibration.samples, 128);
  EXPECT_EQ(r.calibration.seq_len, 512);
  const Modifier& m = *r.modifiers()[0];
  EXPECT_EQ(m.targets, std::vector<std::string>{"Linear"});
  EXPECT_TRUE(m.ignore.empty());
  const Recipe c = Recipe::from_yaml("calibration: {samples: 16, seq_len: 64}\n" +
                                         one("MagnitudePruningModifier", "      sparsity: 0.5\n"),
                                     "x");
  EXPECT_EQ(c.calibration, (Calibration{16, 64}));
}

// The same recipe in llm-compressor's own spelling: config_groups, sequential_update,
// sparsity_profile / owl_lmbda / owl_m, targets as a bare string, run_type.
TEST(Recipe, ReadsLlmCompressorSpellings) {
  const Recipe theirs = Recipe::from_yaml(R"(
DEFAULT_stage:
  run_type: oneshot
  DEFAULT_modifiers:
    SparseGPTModifier:
      sparsity: 0.7
      sparsity_profile: owl
      owl_lmbda: 0.08
      owl_m: 5
      sequential_update: true
      targets: Linear
      ignore: [lm_head]
    GPTQModifier:
      sequential_update: true
      dampening_frac: 0.01
      ignore: [lm_head]
      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 4, type: int, symmetric: false, strategy: group, group_size: 128,
                    actorder: null, dynamic: false, observer: minmax}
          input_activations: null
)",
                                          "theirs");
  const Recipe ours = Recipe::from_yaml(R"(
DEFAULT_stage:
  DEFAULT_modifiers:
    SparseGPTModifier:
      sparsity: 0.7
      owl: {lambda: 0.08, m: 5}
      ignore: [lm_head]
    GPTQModifier:
      scheme: {bits: 4, group_size: 128, symmetric: false}
      ignore: [lm_head]
)",
                                        "ours");
  EXPECT_EQ(theirs, ours);
  const Recipe w8a8 = Recipe::from_yaml(one("GPTQModifier", R"(      config_groups:
        group_0:
          targets: [Linear]
          weights: {num_bits: 8, type: int, symmetric: true, strategy: channel}
          input_activations: {num_bits: 8, type: int, symmetric: true, strategy: token,
                              dynamic: true}
)"),
                                        "x");
  EXPECT_EQ(
      std::get<GPTQArgs>(w8a8.modifiers()[0]->args).scheme,
      (QuantScheme{.bits = 8, .group_size = 0, .symmetric = true, .input_activation_bits = 8}));
  const Recipe preset =
      Recipe::from_yaml(one("QuantizationModifier", "      scheme: W4A16\n"), "x");
  EXPECT_EQ(std::get<QuantizationArgs>(preset.modifiers()[0]->args).scheme,
            (QuantScheme{.bits = 4, .group_size = 128, .symmetric = true}));
  const Recipe minus1 = Recipe::from_yaml(
      one("QuantizationModifier", "      scheme: {bits: 4, group_size: -1}\n"), "x");
  EXPECT_TRUE(std::get<QuantizationArgs>(minus1.modifiers()[0]->args).scheme.per_channel());
}

TEST(Recipe, KeepsStageAndModifierOrder) {
  const Recipe r = Recipe::from_yaml(R"(
first_stage:
  b_modifiers:
    WandaPruningModifier: {sparsity: 0.5}
  a_modifiers:
    QuantizationModifier: {scheme: {bits: 4, group_size: 64}}
    SmoothQuantModifier: {}
second_stage:
  modifiers:
    LowRankModifier: {method: svd_whitened, energy: 0.9}
)",
                                     "x");
  ASSERT_EQ(r.stages.size(), 2u);
  EXPECT_EQ(r.stages[1].name, "second_stage");
  std::vector<ModifierType> order;
  for (const Modifier* m : r.modifiers()) order.push_back(m->type());
  EXPECT_EQ(order,
            (std::vector<ModifierType>{ModifierType::kWandaPruning, ModifierType::kQuantization,
                                       ModifierType::kSmoothQuant, ModifierType::kLowRank}));
  EXPECT_EQ(r.modifiers()[1]->group, "a_modifiers");
  EXPECT_DOUBLE_EQ(std::get<SmoothQuantArgs>(r.modifiers()[2]->args).smoothing_strength, 0.5);
  EXPECT_EQ(Recipe::from_yaml(r.to_yaml(), "again"), r);
}

TEST(Recipe, RoundTripsEveryModifierKind) {
  Recipe r;
  r.calibration = {32, 256};
  Stage s{"oneshot_stage", {}};
  auto add = [&](ModifierArgs args, std::string group = "m_modifiers") {
    Modifier m;
    m.args = std::move(args);
    m.group = std::move(group);
    m.targets = {"re:model\\.layers\\.\\d+\\.mlp\\..*", "lm_head"};
    m.ignore = {"model.layers.0"};
    s.modifiers.push_back(std::move(m));
  };
  add(MagnitudePruningArgs{0.5, {4, 8}});
  add(WandaPruningArgs{0.6, {}, Owl{0.05, 7}});
  add(SparseGPTArgs{0.3,
                    {},
                    std::nullopt,
                    64,
                    0.02,
                    QuantScheme{.bits = 3, .group_size = 32, .symmetric = false}});
  add(StructuredPruningArgs{0.125, 0, Importance::kMagnitude});
  add(QuantizationArgs{{.bits = 8, .group_size = 0, .input_activation_bits = 8}}, "q_modifiers");
  add(GPTQArgs{{.bits = 4, .group_size = 128, .actorder = ActOrder::kWeight}, 256, 0.001},
      "g_modifiers");
  add(AWQArgs{{.bits = 4, .group_size = 64, .symmetric = false},
              10,
              false,
              false,
              {{"re:.*input_layernorm$", {"re:.*q_proj$", "re:.*k_proj$"}}}},
      "g_modifiers");
  add(SmoothQuantArgs{0.65, {{"re:.*post_attention_layernorm$", {"re:.*up_proj$"}}}},
      "s_modifiers");
  add(PalettizationArgs{2, PaletteGranularity::kPerGroupedChannel, 4, PaletteWeighting::kNone},
      "s_modifiers");
  add(LowRankArgs{LowRankMethod::kSvdWhitened, 0.25, 0, 0}, "l_modifiers");
  r.stages.push_back(s);
  const std::string yaml = r.to_yaml();
  EXPECT_EQ(Recipe::from_yaml(yaml, "stored"), r) << yaml;
}

struct Bad {
  std::string yaml;
  std::string expected;  // a substring of the error
};

TEST(Recipe, RejectsMalformedRecipesNamingTheField) {
  const std::string sg = "SparseGPTModifier";
  const std::vector<Bad> cases = {
      {one(sg, "      sparsity: 1.5\n"),
       "recipes/x.yaml: stage 'oneshot_stage', modifier 'SparseGPTModifier', field 'sparsity': "
       "must be in [0, 1), got 1.5 (line 4)"},
      {one("SparseGptModifier", "      sparsity: 0.5\n"),
       "modifier 'SparseGptModifier': unknown modifier (did you mean 'SparseGPTModifier'?)"},
      {one(sg, "      sparsty: 0.5\n"),
       "field 'sparsty': unknown field (did you mean 'sparsity'?)"},
      {one(sg, "      sparsity: 0.5\n      dampening: 0.01\n"),
       "field 'dampening': unknown field (did you mean 'dampening_frac'?)"},
      {one(sg, "      sparsity: half\n"), "field 'sparsity': must be a number, got half"},
      {one(sg, "      sparsity: \"0.5\"\n"), "field 'sparsity': must be a number, got '0.5'"},
      {one(sg, "      sparsity: [0.5]\n"), "field 'sparsity': must be a number, got a list"},
      {"oneshot_stage:\n  pruning_modifiers: [\n    SparseGPTModifier\n",
       "recipes/x.yaml: YAML syntax error at line"},
      {"oneshot_stage:\n  pruning_modifiers:\n    SparseGPTModifier: {sparsity: 0.5\n",
       "YAML syntax error at line"},
      {one(sg, "      sparsity: 0.5\n      mask_structure: \"3:2\"\n"),
       "field 'mask_structure': must be 'N:M' with 0 < N < M (e.g. \"2:4\"), or \"0:0\" for "
       "unstructured, got '3:2'"},
      {one(sg, "      mask_structure: \"2-4\"\n"), "field 'mask_structure': must be 'N:M'"},
      {one(sg, "      sparsity: 0.7\n      mask_structure: \"2:4\"\n"),
       "field 'sparsity': must equal 0.5 for mask_structure '2:4'"},
      {one(sg, "      mask_structure: \"0:0\"\n"), "field 'sparsity': missing required field"},
      {one(sg, "      sparsity: 0.5\n      block_size: 0\n"), "field 'block_size': must be in 1.."},
      {one(sg, "      sparsity: 0.5\n      dampening_frac: -0.1\n"),
       "field 'dampening_frac': must be in [0, 1], got -0.1"},
      {one(sg, "      sparsity: 0.5\n      mask_structure: \"2:4\"\n      owl: {lambda: 0.1}\n"),
       "field 'owl': OWL needs an unstructured mask_structure"},
      {one(sg, "      sparsity: 0.95\n      owl: {lambda: 0.08, m: 5}\n"),
       "field 'owl': layer sparsities 0.95 ± lambda 0.08 must stay in [0, 1)"},
      {one(sg, "      sparsity: 0.5\n      owl: {lamda: 0.1}\n"),
       "field 'owl.lamda': unknown field (did you mean 'lambda'?)"},
      {one(sg, "      sparsity: 0.5\n      owl_m: 5\n"),
       "field 'owl_m': needs sparsity_profile: owl"},
      {one(sg, "      sparsity: 0.5\n      quantize: {bits: 4, actorder: group, group_size: 8}\n"),
       "field 'quantize': actorder applies only to GPTQModifier"},
      {one("GPTQModifier", "      scheme: {bits: 9, group_size: 128}\n"),
       "modifier 'GPTQModifier', field 'scheme.bits': must be in 2..8, got 9"},
      {one("GPTQModifier", "      scheme: {bits: 1, group_size: 128}\n"),
       "field 'scheme.bits': must be in 2..8, got 1"},
      {one("GPTQModifier", "      scheme: {bits: 4, group_size: 0}\n"),
       "field 'scheme.group_size': must be > 0 (input columns per scale), or -1 for per output "
       "channel, got 0"},
      {one("GPTQModifier", "      scheme: {bits: 4, group_size: -8}\n"),
       "field 'scheme.group_size': must be > 0"},
      {one("GPTQModifier", "      scheme: {bits: 4, group_size: 64, strategy: channel}\n"),
       "field 'scheme.strategy': contradicts group_size 64"},
      {one("GPTQModifier", "      scheme: {group_size: 128}\n"),
       "field 'scheme.bits': missing required field"},
      {one("GPTQModifier", "      scheme: {bits: 4, grupsize: 128}\n"),
       "field 'scheme.grupsize': unknown field"},
      {one("GPTQModifier", "      scheme: W5A16\n"), "field 'scheme': must be a map"},
      {one("GPTQModifier", "      block_size: 128\n"), "field 'scheme': missing required field"},
      {one("GPTQModifier", "      scheme: {bits: 4, actorder: group}\n"),
       "field 'scheme': actorder 'group' needs a group_size"},
      {one("GPTQModifier", "      scheme: {bits: 4, group_size: 128, actorder: sometimes}\n"),
       "field 'scheme.actorder': must be false, true, 'group' or 'weight', got sometimes"},
      {one("GPTQModifier",
           "      scheme: {bits: 4, group_size: 128, actorder: weight}\n      actorder: group\n"),
       "field 'actorder': contradicts the scheme's actorder 'weight'"},
      {one("GPTQModifier", "      scheme: W4A16\n      config_groups: {}\n"),
       "field 'config_groups': give either 'scheme' or 'config_groups', not both"},
      {one("GPTQModifier",
           "      config_groups:\n        group_0:\n          targets: [Linear]\n"
           "          weights: {num_bits: 4, strategy: group, group_size: 128}\n"
           "        group_1:\n          targets: [lm_head]\n"
           "          weights: {num_bits: 8, strategy: channel}\n"),
       "field 'config_groups': must be a map holding exactly one group"},
      {one("GPTQModifier",
           "      config_groups:\n        group_0:\n          targets: [Linear]\n"
           "          weights: {num_bits: 4, type: float, strategy: channel}\n"),
       "field 'config_groups.group_0.weights.type': must be 'int'"},
      {one("GPTQModifier",
           "      targets: [Linear]\n      config_groups:\n        group_0:\n"
           "          targets: [Linear]\n          weights: {num_bits: 4, strategy: channel}\n"),
       "field 'targets': give targets either in the modifier or in its config group"},
      {one("QuantizationModifier", "      scheme: {bits: 4, group_size: 128, actorder: true}\n"),
       "modifier 'QuantizationModifier', field 'scheme': actorder applies only to GPTQModifier"},
      {one("AWQModifier", "      scheme: W8A8\n"),
       "field 'scheme': activation quantization (W8A8) is given with QuantizationModifier"},
      {one("AWQModifier", "      scheme: W4A16\n      n_grid: 0\n"), "field 'n_grid': must be in"},
      {one("AWQModifier", "      scheme: W4A16\n      mappings: [{smooth_layer: x}]\n"),
       "field 'mappings[0].balance_layers': missing required field"},
      {one("SmoothQuantModifier", "      mappings: [[[\"re:*q\"], \"re:.*norm\"]]\n"),
       "field 'mappings': bad regex 're:*q'"},
      {one("SmoothQuantModifier", "      smoothing_strength: 1.2\n"),
       "field 'smoothing_strength': must be in [0, 1], got 1.2"},
      {one("SmoothQuantModifier", "      mappings: [[a, b, c]]\n"),
       "field 'mappings': must be a list of [[balance layers...], smooth layer] pairs"},
      {one("PalettizationModifier", "      bits: 9\n"), "field 'bits': must be in 2..8, got 9"},
      {one("PalettizationModifier", "      granularity: per_channel\n"),
       "field 'granularity': must be one of per_tensor, per_grouped_channel, got per_channel"},
      {one("PalettizationModifier", "      granularity: per_grouped_channel\n"),
       "field 'group_size': missing required field"},
      {one("PalettizationModifier", "      group_size: 8\n"),
       "field 'group_size': needs granularity: per_grouped_channel"},
      {one("PalettizationModifier", "      weight: fisher\n"),
       "field 'weight': must be one of none, hessian, got fisher"},
      {one("LowRankModifier", "      method: svd\n"),
       "field 'rank_fraction': give exactly one of rank_fraction, param_fraction and energy"},
      {one("LowRankModifier", "      rank_fraction: 0.5\n      energy: 0.9\n"),
       "give exactly one of rank_fraction, param_fraction and energy"},
      {one("LowRankModifier", "      rank_fraction: 0\n"),
       "field 'rank_fraction': must be in (0, 1], got 0"},
      {one("LowRankModifier", "      method: qr\n      energy: 0.9\n"),
       "field 'method': must be one of svd, svd_whitened, got qr"},
      {one("StructuredPruningModifier", "      importance: magnitude\n"),
       "field 'mlp_sparsity': at least one of head_sparsity and mlp_sparsity must be > 0"},
      {one(sg, "      sparsity: 0.5\n      targets: [\"re:(q|k_proj\"]\n"),
       "field 'targets': bad regex 're:(q|k_proj'"},
      {one(sg, "      sparsity: 0.5\n      ignore: [\"re:[lm_head\"]\n"),
       "field 'ignore': bad regex 're:[lm_head'"},
      {one(sg, "      sparsity: 0.5\n      targets: []\n"),
       "field 'targets': must name at least one module"},
      {one(sg, "      sparsity: 0.5\n      targets: {a: b}\n"),
       "field 'targets': must be a list of strings, got a map"},
      {one(sg, "      sparsity: 0.5\n      sequential_update: false\n"),
       "field 'sequential_update': must be true"},
      {one(sg, "      sparsity: 0.5\n      sparsity: 0.6\n"), "given twice"},
      {one(sg, "      - 0.5\n"),
       "modifier 'SparseGPTModifier': arguments must be a map, got a list"},
      {"", "recipes/x.yaml: the recipe is empty"},
      {"# nothing but a comment\n", "the recipe is empty"},
      {"calibration: {samples: 8}\n", "recipes/x.yaml: the recipe has no stages"},
      {"- oneshot_stage\n", "a recipe is a map of stages"},
      {"oneshot:\n  pruning_modifiers:\n    WandaPruningModifier: {sparsity: 0.5}\n",
       "unknown top-level key 'oneshot'"},
      {"oneshot_stage: {}\n", "stage 'oneshot_stage': a stage is a map of modifier groups"},
      {"oneshot_stage:\n  pruning_modifiers: {}\n",
       "group 'pruning_modifiers' must map modifier names to arguments"},
      {"oneshot_stage:\n  pruning:\n    WandaPruningModifier: {sparsity: 0.5}\n",
       "stage 'oneshot_stage': unknown key 'pruning'"},
      {"oneshot_stage:\n  run_type: train\n  m_modifiers:\n    WandaPruningModifier: {sparsity: "
       "0.5}\n",
       "field 'run_type': must be 'oneshot', got train"},
      {"calibration: {samples: 0}\n" + one(sg, "      sparsity: 0.5\n"),
       "recipes/x.yaml: calibration, field 'samples': must be in 1..16777216, got 0 (line 1)"},
      {"calibration: {samples: 128, seqlen: 512}\n" + one(sg, "      sparsity: 0.5\n"),
       "calibration, field 'seqlen': unknown field (did you mean 'seq_len'?)"},
  };
  ASSERT_GE(cases.size(), 12u);
  for (const Bad& c : cases) {
    SCOPED_TRACE(c.yaml);
    const std::string e = error_of(c.yaml);
    EXPECT_NE(e.find(c.expected), std::string::npos) << "error: " << e;
    EXPECT_EQ(e.rfind("recipes/x.yaml: ", 0), 0u) << "error: " << e;
  }
}

TEST(Recipe, FromFileNamesAMissingFile) {
  try {
    Recipe::from_file("/nonexistent/r.yaml");
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.what()).find("/nonexistent/r.yaml"), std::string::npos);
  }
}

TEST(Recipe, MaskStructureParses) {
  EXPECT_EQ(MaskStructure::parse("2:4"), (MaskStructure{2, 4}));
  EXPECT_EQ(MaskStructure::parse("0:0"), (MaskStructure{0, 0}));
  EXPECT_DOUBLE_EQ(MaskStructure::parse("4:8")->sparsity(), 0.5);
  for (const char* bad : {"", "2", "4:2", "2:2", "0:4", "-1:4", "2:4:8", "a:b", "2:4 "}) {
    EXPECT_FALSE(MaskStructure::parse(bad).has_value()) << bad;
  }
}

TEST(Matches, RegexIsAnchoredAtTheStartLikeReMatch) {
  const std::string q = "model.layers.0.self_attn.q_proj";
  EXPECT_TRUE(matches({"re:.*q_proj$"}, q));
  EXPECT_TRUE(matches({"re:.*q_proj$"}, q + ".weight"));  // through the module name
  EXPECT_TRUE(matches({"re:model\\.layers\\.0\\."}, q));
  EXPECT_FALSE(matches({"re:q_proj"}, q));  // re.match, not re.search
  EXPECT_FALSE(matches({"re:.*k_proj$"}, q));
  EXPECT_TRUE(matches({kProjections}, "model.layers.11.mlp.down_proj.weight"));
  EXPECT_FALSE(matches({kProjections}, "model.layers.11.mlp.down_proj.bias.extra"));
  EXPECT_FALSE(matches({kProjections}, "lm_head.weight"));
}

TEST(Matches, LinearMeansEveryProjection) {
  EXPECT_TRUE(matches({"Linear"}, "model.layers.1.mlp.gate_proj"));
  EXPECT_TRUE(matches({"Linear"}, "model.layers.1.self_attn.o_proj.weight"));
  EXPECT_TRUE(matches({"Linear"}, "lm_head.weight"));
  EXPECT_TRUE(matches({"Linear"}, "model.layers.1.mlp.up_proj.weight_packed"));
  EXPECT_FALSE(matches({"Linear"}, "model.embed_tokens.weight"));
  EXPECT_FALSE(matches({"Linear"}, "model.layers.1.input_layernorm.weight"));
  EXPECT_FALSE(matches({"Linear"}, "model.norm.weight"));
}

TEST(Matches, PlainNamesMatchTheModuleASuffixOrAParent) {
  const std::string down = "model.layers.10.mlp.down_proj";
  EXPECT_TRUE(matches({"lm_head"}, "lm_head"));
  EXPECT_TRUE(matches({"lm_head"}, "lm_head.weight"));
  EXPECT_TRUE(matches({down}, down));
  EXPECT_TRUE(matches({down}, down + ".weight"));
  EXPECT_TRUE(matches({"mlp.down_proj"}, down));
  EXPECT_TRUE(matches({"model.layers.10"}, down + ".weight"));
  EXPECT_FALSE(matches({"model.layers.1"}, down));
  EXPECT_FALSE(matches({"model.layers.0.mlp.down_proj"}, down));
  EXPECT_FALSE(matches({"own_proj"}, down));
  EXPECT_FALSE(matches({}, down));
  Modifier m;
  m.targets = {"Linear"};
  m.ignore = {"lm_head", "re:model\\.layers\\.0\\."};
  EXPECT_TRUE(m.applies_to(down + ".weight"));
  EXPECT_FALSE(m.applies_to("lm_head.weight"));
  EXPECT_FALSE(m.applies_to("model.layers.0.mlp.down_proj.weight"));
}

TEST(Matches, CheckPatternRejectsBadRegexes) {
  EXPECT_NO_THROW(check_pattern("re:.*"));
  EXPECT_NO_THROW(check_pattern("lm_head"));
  EXPECT_THROW(check_pattern("re:(("), Error);
  EXPECT_THROW(check_pattern(""), Error);
}

}  // namespace
}  // namespace sparsa::compress
