#include "sparsa/compress/recipe.h"

#include <fmt/ranges.h>
#include <yaml-cpp/yaml.h>

#include <algorithm>
#include <array>
#include <cctype>
#include <charconv>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <mutex>
#include <nlohmann/json.hpp>
#include <regex>
#include <set>
#include <sstream>
#include <unordered_map>

#include "sparsa/core/error.h"

namespace sparsa::compress {

namespace {

constexpr std::array<std::string_view, 13> kModifierNames = {"MagnitudePruningModifier",
                                                             "WandaPruningModifier",
                                                             "SparseGPTModifier",
                                                             "StructuredPruningModifier",
                                                             "QuantizationModifier",
                                                             "GPTQModifier",
                                                             "AWQModifier",
                                                             "SmoothQuantModifier",
                                                             "PalettizationModifier",
                                                             "LowRankModifier",
                                                             "ConstantMaskModifier",
                                                             "GradualPruningModifier",
                                                             "DistillationModifier"};
static_assert(std::variant_size_v<ModifierArgs> == kModifierNames.size());

bool ends_with(std::string_view s, std::string_view suffix) {
  return s.size() >= suffix.size() && s.substr(s.size() - suffix.size()) == suffix;
}

bool starts_with(std::string_view s, std::string_view prefix) {
  return s.substr(0, prefix.size()) == prefix;
}

size_t edit_distance(std::string_view a, std::string_view b) {
  std::vector<size_t> row(b.size() + 1);
  for (size_t j = 0; j <= b.size(); ++j) row[j] = j;
  for (size_t i = 1; i <= a.size(); ++i) {
    size_t diag = row[0];
    row[0] = i;
    for (size_t j = 1; j <= b.size(); ++j) {
      const size_t up = row[j];
      const bool same = std::tolower(static_cast<unsigned char>(a[i - 1])) ==
                        std::tolower(static_cast<unsigned char>(b[j - 1]));
      row[j] = std::min({row[j] + 1, row[j - 1] + 1, diag + (same ? 0 : 1)});
      diag = up;
    }
  }
  return row[b.size()];
}

template <typename Names>
std::string did_you_mean(std::string_view word, const Names& names) {
  std::string_view best;
  size_t best_d = std::max<size_t>(2, word.size() / 3) + 1;
  for (std::string_view n : names) {
    const bool prefix = word.size() >= 4 && (starts_with(n, word) || starts_with(word, n));
    const size_t d = prefix ? 1 : edit_distance(word, n);
    if (d < best_d) best_d = d, best = n;
  }
  return best.empty() ? std::string() : fmt::format(" (did you mean '{}'?)", best);
}

std::string describe(const YAML::Node& n) {
  if (!n.IsDefined() || n.IsNull()) return "null";
  if (n.IsSequence()) return "a list";
  if (n.IsMap()) return "a map";
  return n.Tag() == "!" ? fmt::format("'{}'", n.Scalar()) : n.Scalar();
}

// Where in the recipe a message is about: "stage 'S', modifier 'M'".
struct Where {
  const std::string* source = nullptr;
  std::vector<std::string> parts;

  Where with(std::string part) const {
    Where w = *this;
    w.parts.push_back(std::move(part));
    return w;
  }

  [[noreturn]] void fail(std::string_view field, const YAML::Node* node,
                         std::string_view message) const {
    std::vector<std::string> p = parts;
    if (!field.empty()) p.push_back(fmt::format("field '{}'", field));
    std::string line;
    if (node != nullptr && node->IsDefined() && node->Mark().line >= 0) {
      line = fmt::format(" (line {})", node->Mark().line + 1);
    }
    if (p.empty()) sparsa::fail("{}: {}{}", *source, message, line);
    sparsa::fail("{}: {}: {}{}", *source, fmt::join(p, ", "), message, line);
  }
};

// The arguments of one map node: unknown and duplicate keys are rejected up front, then each
// field is read with its type checked.
class Fields {
 public:
  Fields(const YAML::Node& map, Where where, std::string prefix,
         std::vector<std::string_view> allowed)
      : where_(std::move(where)), prefix_(std::move(prefix)) {
    if (!map.IsMap()) {
      const std::string what = prefix_.empty() ? "arguments" : prefix_;
      where_.fail(prefix_.empty() ? "" : prefix_, &map,
                  fmt::format("{} must be a map, got {}", what, describe(map)));
    }
    for (auto it = map.begin(); it != map.end(); ++it) {
      const YAML::Node key_node = it->first;
      const std::string key = key_node.IsScalar() ? key_node.Scalar() : std::string();
      if (!key_node.IsScalar()) where_.fail(prefix_, &key_node, "keys must be names");
      if (std::find(allowed.begin(), allowed.end(), key) == allowed.end()) {
        where_.fail(full(key), &key_node,
                    fmt::format("unknown field{}; known: {}", did_you_mean(key, allowed),
                                fmt::join(allowed, ", ")));
      }
      if (!nodes_.emplace(key, it->second).second) {
        where_.fail(full(key), &key_node, "given twice");
      }
    }
  }

  const Where& where() const { return where_; }
  std::string full(std::string_view key) const {
    return prefix_.empty() ? std::string(key) : fmt::format("{}.{}", prefix_, key);
  }
  bool has(const std::string& key) const { return nodes_.count(key) != 0; }
  // Present and not null.
  bool given(const std::string& key) const { return has(key) && !nodes_.at(key).IsNull(); }
  const YAML::Node& node(const std::string& key) const { return nodes_.at(key); }

  [[noreturn]] void fail(const std::string& key, std::string_view message) const {
    where_.fail(full(key), has(key) ? &nodes_.at(key) : nullptr, message);
  }
  [[noreturn]] void fail_got(const std::string& key, std::string_view message) const {
    fail(key, fmt::format("{}, got {}", message, describe(nodes_.at(key))));
  }
  void require(const std::string& key) const {
    if (!has(key)) where_.fail(full(key), nullptr, "missing required field");
  }

  std::optional<double> number(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const YAML::Node& n = nodes_.at(key);
    double x = 0;
    if (!n.IsScalar() || n.Tag() == "!" || !parse_double(n.Scalar(), &x)) {
      fail_got(key, "must be a number");
    }
    return x;
  }

  std::optional<int64_t> integer(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const YAML::Node& n = nodes_.at(key);
    int64_t x = 0;
    if (!n.IsScalar() || n.Tag() == "!" || !parse_int(n.Scalar(), &x)) {
      fail_got(key, "must be an integer");
    }
    return x;
  }

  std::optional<bool> boolean(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const YAML::Node& n = nodes_.at(key);
    if (n.IsScalar() && n.Tag() != "!") {
      const std::string& s = n.Scalar();
      if (s == "true" || s == "True" || s == "TRUE") return true;
      if (s == "false" || s == "False" || s == "FALSE") return false;
    }
    fail_got(key, "must be true or false");
  }

  std::optional<std::string> string(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const YAML::Node& n = nodes_.at(key);
    if (!n.IsScalar()) fail_got(key, "must be a string");
    return n.Scalar();
  }

  std::optional<std::vector<std::string>> strings(const std::string& key) const {
    if (!has(key)) return std::nullopt;
    const YAML::Node& n = nodes_.at(key);
    if (n.IsScalar()) return std::vector<std::string>{n.Scalar()};
    if (!n.IsSequence()) fail_got(key, "must be a list of strings");
    std::vector<std::string> out;
    for (const YAML::Node& s : n) {
      if (!s.IsScalar()) fail_got(key, "must be a list of strings");
      out.push_back(s.Scalar());
    }
    return out;
  }

  // A number in [lo, hi) or [lo, hi]; `hi_open` picks which.
  std::optional<double> fraction(const std::string& key, double lo, double hi, bool lo_open,
                                 bool hi_open) const {
    const std::optional<double> x = number(key);
    if (x && ((lo_open ? *x <= lo : *x < lo) || (hi_open ? *x >= hi : *x > hi))) {
      fail_got(key, fmt::format("must be in {}{}, {}{}", lo_open ? '(' : '[', lo, hi,
                                hi_open ? ')' : ']'));
    }
    return x;
  }

  std::optional<int64_t> integer_in(const std::string& key, int64_t lo, int64_t hi) const {
    const std::optional<int64_t> x = integer(key);
    if (x && (*x < lo || *x > hi)) fail_got(key, fmt::format("must be in {}..{}", lo, hi));
    return x;
  }

  template <typename E>
  std::optional<E> choice(const std::string& key,
                          std::initializer_list<std::pair<std::string_view, E>> options) const {
    const std::optional<std::string> s = string(key);
    if (!s) return std::nullopt;
    std::vector<std::string_view> names;
    for (const auto& [name, value] : options) {
      if (*s == name) return value;
      names.push_back(name);
    }
    fail_got(key, fmt::format("must be one of {}", fmt::join(names, ", ")));
  }

 private:
  static bool parse_double(const std::string& s, double* x) {
    if (s.empty()) return false;
    const char* b = s.data() + (s[0] == '+' ? 1 : 0);
    auto [p, ec] = std::from_chars(b, s.data() + s.size(), *x);
    return ec == std::errc() && p == s.data() + s.size() && std::isfinite(*x);
  }
  static bool parse_int(const std::string& s, int64_t* x) {
    if (s.empty()) return false;
    const char* b = s.data() + (s[0] == '+' ? 1 : 0);
    auto [p, ec] = std::from_chars(b, s.data() + s.size(), *x);
    return ec == std::errc() && p == s.data() + s.size();
  }

  Where where_;
  std::string prefix_;
  std::map<std::string, YAML::Node> nodes_;
};

// ---- pattern matching ---------------------------------------------------------------------------

std::shared_ptr<const std::regex> compiled(const std::string& pattern) {
  static std::mutex mu;
  static std::unordered_map<std::string, std::shared_ptr<const std::regex>> cache;
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(pattern);
  if (it != cache.end()) return it->second;
  auto re = std::make_shared<const std::regex>(pattern, std::regex::ECMAScript);
  if (cache.size() > 4096) cache.clear();
  cache.emplace(pattern, re);
  return re;
}

// "model.layers.0.mlp.up_proj.weight" -> "model.layers.0.mlp.up_proj"; names of modules pass.
std::string module_of(const std::string& name) {
  const size_t dot = name.rfind('.');
  if (dot == std::string::npos) return name;
  const std::string_view last = std::string_view(name).substr(dot + 1);
  if (last == "weight" || last == "bias" || starts_with(last, "weight_")) {
    return name.substr(0, dot);
  }
  return name;
}

bool is_linear(const std::string& module) {
  const size_t dot = module.rfind('.');
  const std::string_view last = dot == std::string::npos ? std::string_view(module)
                                                         : std::string_view(module).substr(dot + 1);
  return last == "lm_head" || ends_with(last, "_proj");
}

bool match_one(const std::string& pattern, const std::string& name) {
  if (starts_with(pattern, "re:")) {
    return std::regex_search(name, *compiled(pattern.substr(3)),
                             std::regex_constants::match_continuous);
  }
  return name == pattern || ends_with(name, "." + pattern) || starts_with(name, pattern + ".");
}

// ---- scalars shared by several modifiers --------------------------------------------------------

std::string_view actorder_name(ActOrder a) {
  switch (a) {
    case ActOrder::kGroup:
      return "group";
    case ActOrder::kWeight:
      return "weight";
    case ActOrder::kNone:
      break;
  }
  return "false";
}

ActOrder read_actorder(const Fields& f, const std::string& key) {
  if (!f.given(key)) return ActOrder::kNone;
  const YAML::Node& n = f.node(key);
  if (n.IsScalar() && n.Tag() != "!") {
    const std::string& s = n.Scalar();
    if (s == "true" || s == "True") return ActOrder::kGroup;
    if (s == "false" || s == "False") return ActOrder::kNone;
  }
  if (n.IsScalar()) {
    const std::string& s = n.Scalar();
    if (s == "group" || s == "dynamic") return ActOrder::kGroup;
    if (s == "weight" || s == "static") return ActOrder::kWeight;
  }
  f.fail_got(key, "must be false, true, 'group' or 'weight'");
}

// group_size > 0, or -1 (compressed-tensors' spelling of per channel) -> 0.
int64_t read_group_size(const Fields& f, const std::string& key) {
  const int64_t g = *f.integer(key);
  if (g == -1) return 0;
  if (g <= 0 || g > (int64_t{1} << 30)) {
    f.fail_got(key, "must be > 0 (input columns per scale), or -1 for per output channel");
  }
  return g;
}

void apply_strategy(const Fields& f, const std::string& key, bool group_given, QuantScheme& s) {
  if (!f.has(key)) return;
  const std::string st = *f.string(key);
  if (st == "channel") {
    if (group_given && s.group_size != 0) {
      f.fail_got(key, fmt::format("contradicts group_size {}", s.group_size));
    }
    s.group_size = 0;
  } else if (st == "group") {
    if (!group_given || s.group_size == 0) f.fail_got(key, "needs a group_size > 0");
  } else {
    f.fail_got(key, "must be 'group' or 'channel'");
  }
}

QuantScheme preset_scheme(const Fields& f, const std::string& key) {
  const std::string p = *f.string(key);
  QuantScheme s;
  if (p == "W4A16") {
    s = {.bits = 4, .group_size = 128, .symmetric = true};
  } else if (p == "W4A16_ASYM") {
    s = {.bits = 4, .group_size = 128, .symmetric = false};
  } else if (p == "W8A16") {
    s = {.bits = 8, .group_size = 128, .symmetric = true};
  } else if (p == "W8A8" || p == "INT8") {
    s = {.bits = 8, .group_size = 0, .symmetric = true, .input_activation_bits = 8};
  } else {
    f.fail_got(key,
               "must be a map {bits, group_size, symmetric, actorder} or one of the presets "
               "W4A16, W4A16_ASYM, W8A16, W8A8");
  }
  return s;
}

// scheme: {bits, group_size, strategy, symmetric, actorder, input_activations} or a preset name.
QuantScheme read_scheme(const Fields& parent, const std::string& key) {
  const YAML::Node& n = parent.node(key);
  if (n.IsScalar()) return preset_scheme(parent, key);
  const Fields f(n, parent.where(), parent.full(key),
                 {"bits", "group_size", "strategy", "symmetric", "actorder", "input_activations"});
  f.require("bits");
  QuantScheme s;
  s.bits = static_cast<int>(*f.integer_in("bits", 2, 8));
  s.group_size = f.has("group_size") ? read_group_size(f, "group_size") : 0;
  apply_strategy(f, "strategy", f.has("group_size"), s);
  s.symmetric = f.boolean("symmetric").value_or(true);
  s.actorder = read_actorder(f, "actorder");
  if (f.given("input_activations")) {
    s.input_activation_bits = static_cast<int>(*f.integer_in("input_activations", 8, 8));
  }
  return s;
}

// config_groups: {group_0: {targets, weights: {...}, input_activations: {...}}} (one group).
QuantScheme read_config_groups(const Fields& parent, std::optional<std::vector<std::string>>* t) {
  const YAML::Node& n = parent.node("config_groups");
  if (!n.IsMap() || n.size() != 1) {
    parent.fail_got("config_groups", "must be a map holding exactly one group");
  }
  const YAML::Node group = n.begin()->second;
  const std::string name = n.begin()->first.Scalar();
  const std::string gkey = "config_groups." + name;
  const Fields g(group, parent.where(), parent.full(gkey),
                 {"targets", "weights", "input_activations", "output_activations"});
  g.require("targets");
  *t = g.strings("targets");
  g.require("weights");
  const Fields w(g.node("weights"), parent.where(), g.full("weights"),
                 {"num_bits", "type", "symmetric", "strategy", "group_size", "actorder", "dynamic",
                  "observer", "observer_kwargs", "block_structure"});
  QuantScheme s;
  w.require("num_bits");
  s.bits = static_cast<int>(*w.integer_in("num_bits", 2, 8));
  if (w.has("type") && *w.string("type") != "int") w.fail_got("type", "must be 'int'");
  s.symmetric = w.boolean("symmetric").value_or(true);
  const bool group_given = w.given("group_size");
  s.group_size = group_given ? read_group_size(w, "group_size") : 0;
  if (!w.has("strategy") && !group_given)
    w.fail("strategy", "missing (give strategy or group_size)");
  apply_strategy(w, "strategy", group_given, s);
  s.actorder = read_actorder(w, "actorder");
  if (w.given("dynamic") && *w.boolean("dynamic")) w.fail_got("dynamic", "must be false");
  if (w.given("observer")) {
    const std::string o = *w.string("observer");
    if (o != "minmax" && o != "memoryless_minmax") {
      w.fail_got("observer", "must be 'minmax' (the protocol's min-max grid)");
    }
  }
  if (w.given("observer_kwargs") && w.node("observer_kwargs").size() != 0) {
    w.fail_got("observer_kwargs", "must be empty");
  }
  if (w.given("block_structure")) w.fail_got("block_structure", "is not supported");
  if (g.given("input_activations")) {
    const Fields a(g.node("input_activations"), parent.where(), g.full("input_activations"),
                   {"num_bits", "type", "symmetric", "strategy", "dynamic", "observer",
                    "group_size", "actorder", "block_structure", "observer_kwargs"});
    const bool ok =
        a.integer("num_bits").value_or(0) == 8 && a.string("strategy").value_or("") == "token" &&
        a.boolean("dynamic").value_or(false) && a.string("type").value_or("int") == "int" &&
        a.boolean("symmetric").value_or(true);
    if (!ok) {
      g.fail("input_activations",
             "only {num_bits: 8, type: int, strategy: token, dynamic: true, symmetric: true} "
             "(W8A8) is supported");
    }
    s.input_activation_bits = 8;
  }
  if (g.given("output_activations")) g.fail_got("output_activations", "must be null");
  return s;
}

// Reads `scheme` or `config_groups` (exactly one), moving config_groups' targets into `targets`.
QuantScheme read_any_scheme(const Fields& f, std::optional<std::vector<std::string>>* targets) {
  if (f.has("scheme") && f.has("config_groups")) {
    f.fail("config_groups", "give either 'scheme' or 'config_groups', not both");
  }
  if (f.has("config_groups")) {
    std::optional<std::vector<std::string>> group_targets;
    QuantScheme s = read_config_groups(f, &group_targets);
    if (targets->has_value()) {
      f.fail("targets", "give targets either in the modifier or in its config group, not both");
    }
    *targets = group_targets;
    return s;
  }
  if (!f.has("scheme")) f.fail("scheme", "missing required field (or give 'config_groups')");
  return read_scheme(f, "scheme");
}

void check_scheme(const Fields& f, const std::string& key, const QuantScheme& s, ModifierType t) {
  if (s.actorder != ActOrder::kNone && t != ModifierType::kGPTQ) {
    f.fail(key, "actorder applies only to GPTQModifier");
  }
  if (s.actorder == ActOrder::kGroup && s.group_size == 0) {
    f.fail(key, "actorder 'group' needs a group_size (per-channel schemes have one group)");
  }
  if (s.input_activation_bits != 0 && t != ModifierType::kQuantization &&
      t != ModifierType::kGPTQ) {
    f.fail(key,
           "activation quantization (W8A8) is given with QuantizationModifier or "
           "GPTQModifier");
  }
}

void read_sparsity(const Fields& f, double* sparsity, MaskStructure* mask) {
  if (f.given("mask_structure")) {
    const std::string s = *f.string("mask_structure");
    const std::optional<MaskStructure> m = MaskStructure::parse(s);
    if (!m) {
      f.fail("mask_structure", fmt::format("must be 'N:M' with 0 < N < M (e.g. \"2:4\"), or "
                                           "\"0:0\" for unstructured, got '{}'",
                                           s));
    }
    *mask = *m;
  }
  const std::optional<double> s = f.fraction("sparsity", 0, 1, false, true);
  if (!mask->unstructured()) {
    if (s && std::abs(*s - mask->sparsity()) > 1e-9) {
      f.fail_got("sparsity", fmt::format("must equal {} for mask_structure '{}' (or be left out)",
                                         mask->sparsity(), mask->to_string()));
    }
    *sparsity = mask->sparsity();
  } else {
    f.require("sparsity");
    *sparsity = *s;
  }
}

std::optional<Owl> read_owl(const Fields& f, double sparsity, const MaskStructure& mask) {
  std::optional<Owl> owl;
  if (f.given("owl")) {
    if (f.has("sparsity_profile")) f.fail("sparsity_profile", "give either 'owl' or it, not both");
    const Fields o(f.node("owl"), f.where(), f.full("owl"), {"lambda", "m"});
    owl = Owl{};
    owl->lambda = o.fraction("lambda", 0, 1, false, true).value_or(owl->lambda);
    owl->m = o.fraction("m", 0, 1e9, true, false).value_or(owl->m);
  } else if (f.given("sparsity_profile")) {
    const std::string p = *f.string("sparsity_profile");
    if (p != "owl") f.fail_got("sparsity_profile", "must be 'owl' or null");
    owl = Owl{};
    owl->lambda = f.fraction("owl_lmbda", 0, 1, false, true).value_or(owl->lambda);
    owl->m = f.fraction("owl_m", 0, 1e9, true, false).value_or(owl->m);
  } else if (f.has("owl_lmbda") || f.has("owl_m")) {
    f.fail(f.has("owl_m") ? "owl_m" : "owl_lmbda", "needs sparsity_profile: owl");
  }
  if (owl) {
    const std::string key = f.given("owl") ? "owl" : "sparsity_profile";
    if (!mask.unstructured()) {
      f.fail(key,
             fmt::format("OWL needs an unstructured mask_structure, got '{}'", mask.to_string()));
    }
    if (sparsity - owl->lambda < 0 || sparsity + owl->lambda >= 1) {
      f.fail(key, fmt::format("layer sparsities {} ± lambda {} must stay in [0, 1)", sparsity,
                              owl->lambda));
    }
  }
  return owl;
}

void check_patterns(const Fields& f, const std::string& key,
                    const std::vector<std::string>& patterns) {
  for (const std::string& p : patterns) {
    try {
      check_pattern(p);
    } catch (const Error& e) {
      f.fail(key, e.what());
    }
  }
}

std::vector<LayerMapping> read_awq_mappings(const Fields& f) {
  std::vector<LayerMapping> out;
  if (!f.given("mappings")) return out;
  const YAML::Node& n = f.node("mappings");
  if (!n.IsSequence()) f.fail_got("mappings", "must be a list of {smooth_layer, balance_layers}");
  for (size_t i = 0; i < n.size(); ++i) {
    const Fields m(n[i], f.where(), fmt::format("{}[{}]", f.full("mappings"), i),
                   {"smooth_layer", "balance_layers"});
    m.require("smooth_layer");
    m.require("balance_layers");
    out.push_back({*m.string("smooth_layer"), *m.strings("balance_layers")});
    check_patterns(m, "smooth_layer", {out.back().smooth_layer});
    check_patterns(m, "balance_layers", out.back().balance_layers);
  }
  return out;
}

// llm-compressor's SmoothQuant spelling: [[balance_layers...], smooth_layer] pairs.
std::vector<LayerMapping> read_smoothquant_mappings(const Fields& f) {
  std::vector<LayerMapping> out;
  if (!f.given("mappings")) return out;
  const YAML::Node& n = f.node("mappings");
  const char* shape = "must be a list of [[balance layers...], smooth layer] pairs";
  if (!n.IsSequence()) f.fail_got("mappings", shape);
  for (const YAML::Node& pair : n) {
    if (!pair.IsSequence() || pair.size() != 2 || !pair[1].IsScalar()) {
      f.fail_got("mappings", shape);
    }
    LayerMapping m;
    m.smooth_layer = pair[1].Scalar();
    if (pair[0].IsScalar()) {
      m.balance_layers.push_back(pair[0].Scalar());
    } else if (pair[0].IsSequence()) {
      for (const YAML::Node& b : pair[0]) {
        if (!b.IsScalar()) f.fail_got("mappings", shape);
        m.balance_layers.push_back(b.Scalar());
      }
    } else {
      f.fail_got("mappings", shape);
    }
    check_patterns(f, "mappings", m.balance_layers);
    check_patterns(f, "mappings", {m.smooth_layer});
    out.push_back(std::move(m));
  }
  return out;
}

TrainingArgs read_training(const YAML::Node& node, const Where& where) {
  const Fields f(node, where, "training",
                 {"lr", "min_lr_ratio", "warmup_steps", "steps", "max_tokens", "batch_size",
                  "seq_len", "grad_accum", "weight_decay", "beta1", "beta2", "eps", "clip", "seed",
                  "checkpoint_every", "eval_every", "eval_windows"});
  TrainingArgs t;
  constexpr int64_t kBig = int64_t{1} << 50;
  t.lr = f.fraction("lr", 0, 10, true, false).value_or(t.lr);
  t.min_lr_ratio = f.fraction("min_lr_ratio", 0, 1, false, false).value_or(t.min_lr_ratio);
  t.warmup_steps = f.integer_in("warmup_steps", 0, kBig).value_or(t.warmup_steps);
  t.steps = f.integer_in("steps", 0, kBig).value_or(t.steps);
  t.max_tokens = f.integer_in("max_tokens", 0, kBig).value_or(t.max_tokens);
  if (t.steps > 0 && t.max_tokens > 0) {
    f.fail("max_tokens", "give either steps or max_tokens, not both");
  }
  t.batch_size = f.integer_in("batch_size", 1, 1 << 20).value_or(t.batch_size);
  t.seq_len = f.integer_in("seq_len", 2, 1 << 20).value_or(t.seq_len);
  t.grad_accum = f.integer_in("grad_accum", 1, 1 << 20).value_or(t.grad_accum);
  t.weight_decay = f.fraction("weight_decay", 0, 10, false, false).value_or(t.weight_decay);
  t.beta1 = f.fraction("beta1", 0, 1, false, true).value_or(t.beta1);
  t.beta2 = f.fraction("beta2", 0, 1, false, true).value_or(t.beta2);
  t.eps = f.fraction("eps", 0, 1, true, false).value_or(t.eps);
  t.clip = f.fraction("clip", 0, 1e9, false, false).value_or(t.clip);
  t.seed = f.integer_in("seed", 0, kBig).value_or(t.seed);
  t.checkpoint_every = f.integer_in("checkpoint_every", 0, kBig).value_or(t.checkpoint_every);
  t.eval_every = f.integer_in("eval_every", 0, kBig).value_or(t.eval_every);
  t.eval_windows = f.integer_in("eval_windows", 0, 1 << 20).value_or(t.eval_windows);
  return t;
}

Modifier read_modifier(const YAML::Node& args, ModifierType type, const Where& where) {
  std::vector<std::string_view> allowed = {"targets", "ignore", "sequential_update"};
  auto allow = [&](std::initializer_list<std::string_view> keys) {
    allowed.insert(allowed.end(), keys.begin(), keys.end());
  };
  switch (type) {
    case ModifierType::kMagnitudePruning:
      allow({"sparsity", "mask_structure"});
      break;
    case ModifierType::kWandaPruning:
      allow({"sparsity", "mask_structure", "owl", "sparsity_profile", "owl_m", "owl_lmbda"});
      break;
    case ModifierType::kSparseGPT:
      allow({"sparsity", "mask_structure", "owl", "sparsity_profile", "owl_m", "owl_lmbda",
             "block_size", "dampening_frac", "quantize"});
      break;
    case ModifierType::kStructuredPruning:
      allow({"head_sparsity", "mlp_sparsity", "importance", "bias_compensation"});
      break;
    case ModifierType::kQuantization:
      allow({"scheme", "config_groups"});
      break;
    case ModifierType::kGPTQ:
      allow({"scheme", "config_groups", "block_size", "dampening_frac", "actorder"});
      break;
    case ModifierType::kAWQ:
      allow({"scheme", "config_groups", "n_grid", "duo_scaling", "apply_clip", "mappings"});
      break;
    case ModifierType::kSmoothQuant:
      allow({"smoothing_strength", "mappings"});
      break;
    case ModifierType::kPalettization:
      allow({"bits", "granularity", "group_size", "weight", "temperature", "iterations"});
      break;
    case ModifierType::kLowRank:
      allow({"method", "rank_fraction", "param_fraction", "energy"});
      break;
    case ModifierType::kConstantMask:
      break;
    case ModifierType::kGradualPruning:
      allow({"init_sparsity", "final_sparsity", "start_step", "end_step", "update_frequency"});
      break;
    case ModifierType::kDistillation:
      allow({"ce", "kl", "squarehead", "temperature"});
      break;
  }
  const YAML::Node empty_map(YAML::NodeType::Map);
  const Fields f(args.IsNull() ? empty_map : args, where, "", allowed);

  if (f.given("sequential_update") && !*f.boolean("sequential_update")) {
    f.fail("sequential_update", "must be true: calibration is always layer-sequential");
  }
  std::optional<std::vector<std::string>> targets = f.strings("targets");
  Modifier m;
  auto block = [&](int64_t* block_size, double* damp) {
    *block_size = f.integer_in("block_size", 1, 1 << 20).value_or(*block_size);
    *damp = f.fraction("dampening_frac", 0, 1, false, false).value_or(*damp);
  };
  switch (type) {
    case ModifierType::kMagnitudePruning: {
      MagnitudePruningArgs a;
      read_sparsity(f, &a.sparsity, &a.mask_structure);
      m.args = a;
      break;
    }
    case ModifierType::kWandaPruning: {
      WandaPruningArgs a;
      read_sparsity(f, &a.sparsity, &a.mask_structure);
      a.owl = read_owl(f, a.sparsity, a.mask_structure);
      m.args = a;
      break;
    }
    case ModifierType::kSparseGPT: {
      SparseGPTArgs a;
      read_sparsity(f, &a.sparsity, &a.mask_structure);
      a.owl = read_owl(f, a.sparsity, a.mask_structure);
      block(&a.block_size, &a.dampening_frac);
      if (f.given("quantize")) {
        const YAML::Node& q = f.node("quantize");
        if (q.IsScalar() && (q.Scalar() == "false" || q.Scalar() == "False")) {
        } else if (q.IsMap()) {
          a.quantize = read_scheme(f, "quantize");
          check_scheme(f, "quantize", *a.quantize, type);
        } else {
          f.fail_got("quantize", "must be false or a scheme {bits, group_size, symmetric}");
        }
      }
      m.args = a;
      break;
    }
    case ModifierType::kStructuredPruning: {
      StructuredPruningArgs a;
      a.head_sparsity = f.fraction("head_sparsity", 0, 1, false, true).value_or(0);
      a.mlp_sparsity = f.fraction("mlp_sparsity", 0, 1, false, true).value_or(0);
      if (a.head_sparsity == 0 && a.mlp_sparsity == 0) {
        f.fail(f.has("head_sparsity") ? "head_sparsity" : "mlp_sparsity",
               "at least one of head_sparsity and mlp_sparsity must be > 0");
      }
      a.importance = f.choice<Importance>("importance", {{"activation", Importance::kActivation},
                                                         {"fluctuation", Importance::kFluctuation},
                                                         {"magnitude", Importance::kMagnitude}})
                         .value_or(a.importance);
      a.bias_compensation = f.boolean("bias_compensation").value_or(a.bias_compensation);
      m.args = a;
      break;
    }
    case ModifierType::kQuantization: {
      QuantizationArgs a;
      a.scheme = read_any_scheme(f, &targets);
      check_scheme(f, f.has("scheme") ? "scheme" : "config_groups", a.scheme, type);
      m.args = a;
      break;
    }
    case ModifierType::kGPTQ: {
      GPTQArgs a;
      a.scheme = read_any_scheme(f, &targets);
      if (f.given("actorder")) {
        const ActOrder o = read_actorder(f, "actorder");
        if (a.scheme.actorder != ActOrder::kNone && a.scheme.actorder != o) {
          f.fail_got("actorder", fmt::format("contradicts the scheme's actorder '{}'",
                                             actorder_name(a.scheme.actorder)));
        }
        a.scheme.actorder = o;
      }
      check_scheme(f, f.has("scheme") ? "scheme" : "config_groups", a.scheme, type);
      block(&a.block_size, &a.dampening_frac);
      m.args = a;
      break;
    }
    case ModifierType::kAWQ: {
      AWQArgs a;
      a.scheme = read_any_scheme(f, &targets);
      check_scheme(f, f.has("scheme") ? "scheme" : "config_groups", a.scheme, type);
      a.n_grid = static_cast<int>(f.integer_in("n_grid", 1, 1000).value_or(a.n_grid));
      a.duo_scaling = f.boolean("duo_scaling").value_or(a.duo_scaling);
      a.apply_clip = f.boolean("apply_clip").value_or(a.apply_clip);
      a.mappings = read_awq_mappings(f);
      m.args = a;
      break;
    }
    case ModifierType::kSmoothQuant: {
      SmoothQuantArgs a;
      a.smoothing_strength =
          f.fraction("smoothing_strength", 0, 1, false, false).value_or(a.smoothing_strength);
      a.mappings = read_smoothquant_mappings(f);
      m.args = a;
      break;
    }
    case ModifierType::kPalettization: {
      PalettizationArgs a;
      a.bits = static_cast<int>(f.integer_in("bits", 2, 8).value_or(a.bits));
      a.granularity =
          f.choice<PaletteGranularity>(
               "granularity", {{"per_tensor", PaletteGranularity::kPerTensor},
                               {"per_grouped_channel", PaletteGranularity::kPerGroupedChannel}})
              .value_or(a.granularity);
      if (a.granularity == PaletteGranularity::kPerGroupedChannel) {
        f.require("group_size");
        a.group_size = *f.integer("group_size");
        if (a.group_size <= 0) f.fail_got("group_size", "must be > 0 (output rows per palette)");
      } else if (f.has("group_size")) {
        f.fail("group_size", "needs granularity: per_grouped_channel");
      }
      a.weight = f.choice<PaletteWeighting>("weight", {{"none", PaletteWeighting::kNone},
                                                       {"hessian", PaletteWeighting::kHessian}})
                     .value_or(a.weight);
      if (const std::optional<double> t = f.number("temperature")) {
        if (!(*t > 0) || !std::isfinite(*t)) f.fail_got("temperature", "must be > 0");
        a.temperature = *t;
      }
      a.iterations = f.integer_in("iterations", 0, 100).value_or(a.iterations);
      m.args = a;
      break;
    }
    case ModifierType::kLowRank: {
      LowRankArgs a;
      a.method = f.choice<LowRankMethod>("method", {{"svd", LowRankMethod::kSvd},
                                                    {"svd_whitened", LowRankMethod::kSvdWhitened}})
                     .value_or(a.method);
      a.rank_fraction = f.fraction("rank_fraction", 0, 1, true, false).value_or(0);
      a.param_fraction = f.fraction("param_fraction", 0, 1, true, false).value_or(0);
      a.energy = f.fraction("energy", 0, 1, true, false).value_or(0);
      const int n = (a.rank_fraction > 0) + (a.param_fraction > 0) + (a.energy > 0);
      if (n != 1) {
        f.fail(n == 0 ? "rank_fraction" : (a.rank_fraction > 0 ? "param_fraction" : "energy"),
               "give exactly one of rank_fraction, param_fraction and energy");
      }
      m.args = a;
      break;
    }
    case ModifierType::kConstantMask:
      m.args = ConstantMaskArgs{};
      break;
    case ModifierType::kGradualPruning: {
      GradualPruningArgs a;
      f.require("final_sparsity");
      f.require("end_step");
      a.final_sparsity = *f.fraction("final_sparsity", 0, 1, false, true);
      a.init_sparsity = f.fraction("init_sparsity", 0, 1, false, true).value_or(0.0);
      if (a.init_sparsity > a.final_sparsity) {
        f.fail_got("init_sparsity", fmt::format("must be <= final_sparsity {}", a.final_sparsity));
      }
      a.start_step = f.integer_in("start_step", 0, int64_t{1} << 40).value_or(0);
      a.end_step = *f.integer_in("end_step", 0, int64_t{1} << 40);
      if (a.end_step < a.start_step) {
        f.fail_got("end_step", fmt::format("must be >= start_step {}", a.start_step));
      }
      a.update_frequency = f.integer_in("update_frequency", 1, int64_t{1} << 40).value_or(1);
      m.args = a;
      break;
    }
    case ModifierType::kDistillation: {
      DistillationArgs a;
      a.ce = f.fraction("ce", 0, 1e6, false, false).value_or(a.ce);
      a.kl = f.fraction("kl", 0, 1e6, false, false).value_or(a.kl);
      a.squarehead = f.fraction("squarehead", 0, 1e6, false, false).value_or(a.squarehead);
      if (a.ce == 0 && a.kl == 0 && a.squarehead == 0) {
        f.fail(f.has("ce") ? "ce" : (f.has("kl") ? "kl" : "squarehead"),
               "at least one of ce, kl and squarehead must be > 0");
      }
      a.temperature = f.fraction("temperature", 0, 1e3, true, false).value_or(a.temperature);
      m.args = a;
      break;
    }
  }
  if (targets) {
    if (targets->empty()) f.fail("targets", "must name at least one module");
    m.targets = *targets;
  }
  m.ignore = f.strings("ignore").value_or(std::vector<std::string>{});
  check_patterns(f, "targets", m.targets);
  check_patterns(f, "ignore", m.ignore);
  return m;
}

// ---- YAML writer --------------------------------------------------------------------------------

std::string quoted(const std::string& s) { return nlohmann::json(s).dump(); }

std::string list(const std::vector<std::string>& v) {
  std::vector<std::string> q;
  for (const std::string& s : v) q.push_back(quoted(s));
  return fmt::format("[{}]", fmt::join(q, ", "));
}

std::string number(double x) { return fmt::format("{}", x); }

std::string scheme_yaml(const QuantScheme& s) {
  std::string out = fmt::format("{{bits: {}", s.bits);
  out += s.group_size > 0 ? fmt::format(", group_size: {}", s.group_size) : ", strategy: channel";
  out += fmt::format(", symmetric: {}", s.symmetric);
  if (s.actorder != ActOrder::kNone)
    out += fmt::format(", actorder: {}", actorder_name(s.actorder));
  if (s.input_activation_bits)
    out += fmt::format(", input_activations: {}", s.input_activation_bits);
  return out + "}";
}

void write_owl(std::string& out, const std::optional<Owl>& owl, const std::string& ind) {
  if (owl)
    out += fmt::format("{}owl: {{lambda: {}, m: {}}}\n", ind, number(owl->lambda), number(owl->m));
}

void write_mappings(std::string& out, const std::vector<LayerMapping>& ms, const std::string& ind,
                    bool smoothquant) {
  if (ms.empty()) return;
  out += ind + "mappings:\n";
  for (const LayerMapping& m : ms) {
    if (smoothquant) {
      out += fmt::format("{}  - [{}, {}]\n", ind, list(m.balance_layers), quoted(m.smooth_layer));
    } else {
      out += fmt::format("{}  - {{smooth_layer: {}, balance_layers: {}}}\n", ind,
                         quoted(m.smooth_layer), list(m.balance_layers));
    }
  }
}

void write_args(std::string& out, const ModifierArgs& args, const std::string& ind) {
  auto line = [&](std::string_view key, const std::string& value) {
    out += fmt::format("{}{}: {}\n", ind, key, value);
  };
  std::visit(
      [&](const auto& a) {
        using T = std::decay_t<decltype(a)>;
        if constexpr (std::is_same_v<T, MagnitudePruningArgs> ||
                      std::is_same_v<T, WandaPruningArgs> || std::is_same_v<T, SparseGPTArgs>) {
          line("sparsity", number(a.sparsity));
          line("mask_structure", quoted(a.mask_structure.to_string()));
          if constexpr (!std::is_same_v<T, MagnitudePruningArgs>) write_owl(out, a.owl, ind);
          if constexpr (std::is_same_v<T, SparseGPTArgs>) {
            line("block_size", fmt::format("{}", a.block_size));
            line("dampening_frac", number(a.dampening_frac));
            if (a.quantize) line("quantize", scheme_yaml(*a.quantize));
          }
        } else if constexpr (std::is_same_v<T, StructuredPruningArgs>) {
          line("head_sparsity", number(a.head_sparsity));
          line("mlp_sparsity", number(a.mlp_sparsity));
          line("importance", a.importance == Importance::kActivation    ? "activation"
                             : a.importance == Importance::kFluctuation ? "fluctuation"
                                                                        : "magnitude");
          line("bias_compensation", fmt::format("{}", a.bias_compensation));
        } else if constexpr (std::is_same_v<T, QuantizationArgs>) {
          line("scheme", scheme_yaml(a.scheme));
        } else if constexpr (std::is_same_v<T, GPTQArgs>) {
          line("scheme", scheme_yaml(a.scheme));
          line("block_size", fmt::format("{}", a.block_size));
          line("dampening_frac", number(a.dampening_frac));
        } else if constexpr (std::is_same_v<T, AWQArgs>) {
          line("scheme", scheme_yaml(a.scheme));
          line("n_grid", fmt::format("{}", a.n_grid));
          line("duo_scaling", fmt::format("{}", a.duo_scaling));
          line("apply_clip", fmt::format("{}", a.apply_clip));
          write_mappings(out, a.mappings, ind, false);
        } else if constexpr (std::is_same_v<T, SmoothQuantArgs>) {
          line("smoothing_strength", number(a.smoothing_strength));
          write_mappings(out, a.mappings, ind, true);
        } else if constexpr (std::is_same_v<T, PalettizationArgs>) {
          line("bits", fmt::format("{}", a.bits));
          if (a.granularity == PaletteGranularity::kPerTensor) {
            line("granularity", "per_tensor");
          } else {
            line("granularity", "per_grouped_channel");
            line("group_size", fmt::format("{}", a.group_size));
          }
          line("weight", a.weight == PaletteWeighting::kNone ? "none" : "hessian");
          if (a.temperature != PalettizationArgs{}.temperature)
            line("temperature", number(a.temperature));
          if (a.iterations != PalettizationArgs{}.iterations)
            line("iterations", fmt::format("{}", a.iterations));
        } else if constexpr (std::is_same_v<T, LowRankArgs>) {
          line("method", a.method == LowRankMethod::kSvd ? "svd" : "svd_whitened");
          if (a.rank_fraction > 0) line("rank_fraction", number(a.rank_fraction));
          if (a.param_fraction > 0) line("param_fraction", number(a.param_fraction));
          if (a.energy > 0) line("energy", number(a.energy));
        } else if constexpr (std::is_same_v<T, GradualPruningArgs>) {
          line("init_sparsity", number(a.init_sparsity));
          line("final_sparsity", number(a.final_sparsity));
          line("start_step", fmt::format("{}", a.start_step));
          line("end_step", fmt::format("{}", a.end_step));
          line("update_frequency", fmt::format("{}", a.update_frequency));
        } else if constexpr (std::is_same_v<T, DistillationArgs>) {
          line("ce", number(a.ce));
          line("kl", number(a.kl));
          line("squarehead", number(a.squarehead));
          line("temperature", number(a.temperature));
        }
      },
      args);
}

}  // namespace

// ---- public -------------------------------------------------------------------------------------

std::string MaskStructure::to_string() const { return fmt::format("{}:{}", n, m); }

std::optional<MaskStructure> MaskStructure::parse(std::string_view s) {
  const size_t colon = s.find(':');
  if (colon == std::string_view::npos) return std::nullopt;
  MaskStructure ms;
  auto num = [](std::string_view t, int* out) {
    auto [p, ec] = std::from_chars(t.data(), t.data() + t.size(), *out);
    return !t.empty() && ec == std::errc() && p == t.data() + t.size();
  };
  if (!num(s.substr(0, colon), &ms.n) || !num(s.substr(colon + 1), &ms.m)) return std::nullopt;
  if (ms.n == 0 && ms.m == 0) return ms;
  if (ms.n <= 0 || ms.n >= ms.m || ms.m > 1024) return std::nullopt;
  return ms;
}

std::string_view modifier_name(ModifierType t) { return kModifierNames.at(static_cast<size_t>(t)); }

std::optional<ModifierType> parse_modifier_name(std::string_view name) {
  for (size_t i = 0; i < kModifierNames.size(); ++i) {
    if (kModifierNames[i] == name) return static_cast<ModifierType>(i);
  }
  return std::nullopt;
}

bool is_finetune_modifier(ModifierType t) {
  return t == ModifierType::kConstantMask || t == ModifierType::kGradualPruning ||
         t == ModifierType::kDistillation;
}

bool Modifier::applies_to(const std::string& tensor_or_module_name) const {
  return matches(targets, tensor_or_module_name) && !matches(ignore, tensor_or_module_name);
}

void check_pattern(const std::string& pattern) {
  if (!starts_with(pattern, "re:")) {
    SPARSA_CHECK(!pattern.empty(), "empty pattern");
    return;
  }
  try {
    compiled(pattern.substr(3));
  } catch (const std::regex_error& e) {
    fail("bad regex '{}': {}", pattern, e.what());
  }
}

bool matches(const std::vector<std::string>& patterns, const std::string& tensor_or_module_name) {
  const std::string module = module_of(tensor_or_module_name);
  for (const std::string& p : patterns) {
    if (p == "Linear") {
      if (is_linear(module)) return true;
      continue;
    }
    if (match_one(p, tensor_or_module_name)) return true;
    if (module != tensor_or_module_name && match_one(p, module)) return true;
  }
  return false;
}

Recipe Recipe::from_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  SPARSA_CHECK(in.good(), "cannot open recipe '{}'", path);
  std::ostringstream text;
  text << in.rdbuf();
  SPARSA_CHECK(!in.bad(), "cannot read recipe '{}'", path);
  return from_yaml(text.str(), path);
}

Recipe Recipe::from_yaml(const std::string& text, const std::string& source) {
  Recipe r;
  r.source = source;
  const Where top{&r.source, {}};
  YAML::Node root;
  try {
    root = YAML::Load(text);
  } catch (const YAML::Exception& e) {
    fail("{}: YAML syntax error at line {}, column {}: {}", source, e.mark.line + 1,
         e.mark.column + 1, e.msg);
  }
  if (!root.IsDefined() || root.IsNull()) top.fail("", nullptr, "the recipe is empty");
  if (!root.IsMap()) {
    top.fail("", &root, "a recipe is a map of stages ('<name>_stage: ...'), got " + describe(root));
  }
  std::set<std::string> seen;
  for (auto it = root.begin(); it != root.end(); ++it) {
    const YAML::Node key_node = it->first;
    const YAML::Node value = it->second;
    const std::string key = key_node.Scalar();
    if (!seen.insert(key).second) top.fail("", &key_node, fmt::format("'{}' given twice", key));
    if (key == "calibration") {
      const Fields f(value, top.with("calibration"), "", {"samples", "seq_len"});
      r.calibration.samples = f.integer_in("samples", 1, 1 << 24).value_or(128);
      r.calibration.seq_len = f.integer_in("seq_len", 1, 1 << 24).value_or(512);
      continue;
    }
    if (!ends_with(key, "stage")) {
      top.fail("", &key_node,
               fmt::format("unknown top-level key '{}' (expected 'calibration' or a stage named "
                           "'<name>_stage')",
                           key));
    }
    Stage stage;
    stage.name = key;
    const Where sw = top.with(fmt::format("stage '{}'", key));
    const YAML::Node& groups = value;
    if (!groups.IsMap() || groups.size() == 0) {
      sw.fail("", &key_node, "a stage is a map of modifier groups ('<name>_modifiers: ...')");
    }
    // run_type first: it decides which modifiers and keys the stage may hold.
    for (auto g = groups.begin(); g != groups.end(); ++g) {
      if (g->first.Scalar() != "run_type") continue;
      const YAML::Node rt = g->second;
      if (rt.IsScalar() && rt.Scalar() == "oneshot") {
        stage.run_type = RunType::kOneshot;
      } else if (rt.IsScalar() && rt.Scalar() == "finetune") {
        stage.run_type = RunType::kFinetune;
      } else {
        sw.fail("run_type", &rt,
                fmt::format("must be 'oneshot', got {} ('finetune' marks a fine-tuning stage)",
                            describe(rt)));
      }
    }
    const bool finetune = stage.run_type == RunType::kFinetune;
    if (finetune && r.finetune_stage() != nullptr) {
      sw.fail("run_type", &key_node,
              fmt::format("a recipe holds one finetune stage ('{}' is one already)",
                          r.finetune_stage()->name));
    }
    std::set<std::string> seen_groups;
    for (auto g = groups.begin(); g != groups.end(); ++g) {
      const YAML::Node gkey = g->first;
      const YAML::Node mods = g->second;
      const std::string gname = gkey.Scalar();
      if (!seen_groups.insert(gname).second) {
        sw.fail("", &gkey, fmt::format("group '{}' given twice", gname));
      }
      if (gname == "run_type") continue;
      if (gname == "training") {
        if (!finetune) sw.fail("training", &gkey, "needs run_type: finetune in the stage");
        stage.training = read_training(mods, sw);
        continue;
      }
      if (!ends_with(gname, "modifiers")) {
        sw.fail("", &gkey,
                fmt::format("unknown key '{}' (expected a group named '<name>_modifiers')", gname));
      }
      if (!mods.IsMap() || mods.size() == 0) {
        sw.fail("", &gkey, fmt::format("group '{}' must map modifier names to arguments", gname));
      }
      std::set<std::string> seen_mods;
      for (auto m = mods.begin(); m != mods.end(); ++m) {
        const YAML::Node mkey = m->first;
        const YAML::Node margs = m->second;
        const std::string mname = mkey.Scalar();
        const Where mw = sw.with(fmt::format("modifier '{}'", mname));
        if (!seen_mods.insert(mname).second) mw.fail("", &mkey, "given twice in one group");
        const std::optional<ModifierType> type = parse_modifier_name(mname);
        if (!type) {
          mw.fail("", &mkey,
                  fmt::format("unknown modifier{}; known: {}", did_you_mean(mname, kModifierNames),
                              fmt::join(kModifierNames, ", ")));
        }
        // QuantizationModifier and PalettizationModifier go in both: one-shot, or quantization-
        // and clustering-aware training.
        const bool allowed = finetune ? (is_finetune_modifier(*type) ||
                                         *type == ModifierType::kQuantization ||
                                         *type == ModifierType::kPalettization)
                                      : !is_finetune_modifier(*type);
        if (!allowed) {
          mw.fail("", &mkey,
                  finetune ? "is not a fine-tuning modifier (a stage with run_type: finetune "
                             "holds ConstantMaskModifier, GradualPruningModifier, "
                             "DistillationModifier, QuantizationModifier and "
                             "PalettizationModifier)"
                           : "belongs in a stage with run_type: finetune");
        }
        Modifier mod = read_modifier(margs, *type, mw);
        mod.group = gname;
        if (*type == ModifierType::kDistillation)
          for (const Modifier& other : stage.modifiers)
            if (other.type() == ModifierType::kDistillation)
              mw.fail("", &mkey, "a stage holds one DistillationModifier");
        stage.modifiers.push_back(std::move(mod));
      }
    }
    if (stage.modifiers.empty()) sw.fail("", &key_node, "the stage has no modifiers");
    r.stages.push_back(std::move(stage));
  }
  if (r.stages.empty()) top.fail("", &root, "the recipe has no stages");
  return r;
}

std::string Recipe::to_yaml() const {
  std::string out = fmt::format("calibration: {{samples: {}, seq_len: {}}}\n", calibration.samples,
                                calibration.seq_len);
  for (const Stage& stage : stages) {
    SPARSA_CHECK(ends_with(stage.name, "stage"), "to_yaml: stage name '{}' must end in 'stage'",
                 stage.name);
    out += stage.name + ":\n";
    if (stage.run_type == RunType::kFinetune) {
      const TrainingArgs& t = stage.training;
      out += "  run_type: finetune\n";
      out += fmt::format(
          "  training: {{lr: {}, min_lr_ratio: {}, warmup_steps: {}, steps: {}, max_tokens: {}, "
          "batch_size: {}, seq_len: {}, grad_accum: {}, weight_decay: {}, beta1: {}, beta2: {}, "
          "eps: {}, clip: {}, seed: {}, checkpoint_every: {}, eval_every: {}, eval_windows: {}}}\n",
          number(t.lr), number(t.min_lr_ratio), t.warmup_steps, t.steps, t.max_tokens,
          t.batch_size, t.seq_len, t.grad_accum, number(t.weight_decay), number(t.beta1),
          number(t.beta2), number(t.eps), number(t.clip), t.seed, t.checkpoint_every,
          t.eval_every, t.eval_windows);
    }
    std::set<std::string> groups_done;
    std::string group;
    std::set<ModifierType> in_group;
    for (const Modifier& m : stage.modifiers) {
      if (m.group != group) {
        SPARSA_CHECK(ends_with(m.group, "modifiers") && groups_done.insert(m.group).second,
                     "to_yaml: stage '{}': group '{}' must end in 'modifiers' and its modifiers "
                     "must be consecutive",
                     stage.name, m.group);
        group = m.group;
        in_group.clear();
        out += "  " + group + ":\n";
      }
      SPARSA_CHECK(in_group.insert(m.type()).second,
                   "to_yaml: stage '{}', group '{}' holds {} twice", stage.name, group, m.name());
      out += fmt::format("    {}:\n", m.name());
      write_args(out, m.args, "      ");
      out += fmt::format("      targets: {}\n", list(m.targets));
      out += fmt::format("      ignore: {}\n", list(m.ignore));
    }
  }
  return out;
}

const Stage* Recipe::finetune_stage() const {
  for (const Stage& s : stages)
    if (s.run_type == RunType::kFinetune) return &s;
  return nullptr;
}

std::vector<const Modifier*> Recipe::modifiers() const {
  std::vector<const Modifier*> out;
  for (const Stage& s : stages) {
    for (const Modifier& m : s.modifiers) out.push_back(&m);
  }
  return out;
}

}  // namespace sparsa::compress
