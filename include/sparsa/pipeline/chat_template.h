// Chat templates: the Jinja subset that published Llama, Mistral and Qwen templates use, run by
// our own small interpreter in a sandbox.
//
//   auto tmpl = sparsa::pipeline::ChatTemplate::from_model_dir("models/tiny");   // optional
//   nlohmann::ordered_json ctx = {{"messages", messages}, {"add_generation_prompt", true},
//                                 {"bos_token", "<s>"}};
//   std::string prompt = tmpl->render(ctx);
//
// Rendering follows Hugging Face's apply_chat_template environment: trim_blocks and lstrip_blocks
// on, the loop controls break/continue, raise_exception(), namespace(), range(), strftime_now(),
// and a tojson that keeps key order and non-ASCII text (json.dumps with ensure_ascii=False).
// Supported: {{ }}, {% if/elif/else %}, {% for %} (tuple targets, `if` filters, else, loop.*),
// {% set %} (names, namespace attributes, blocks), {% generation %}, comments and whitespace
// control; expressions with literals, lists, dicts, attributes, subscripts, slices, calls,
// filters, tests, arithmetic, comparisons, `in`, `~`, boolean operators and `a if c else b`;
// common string and dict methods (strip, split, startswith, items, get, ...). Anything else is
// refused when the template is parsed, with the line at fault.
//
// Sandbox: no file, import or system access exists at all; output, loop iterations, string and
// list sizes, and nesting depth are bounded (TemplateLimits), and exceeding one is an error.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <memory>
#include <optional>
#include <string>

namespace sparsa::pipeline {

struct TemplateLimits {
  size_t max_output_bytes = size_t{1} << 20;  // also bounds any one string or list
  int64_t max_loop_iterations = 100000;       // for all loops of one render together
  int max_depth = 64;                         // nesting of statements and expressions
};

class ChatTemplate {
 public:
  /// Parses `source`; throws sparsa::Error naming `name` and the line on a syntax error or an
  /// unsupported construct.
  explicit ChatTemplate(const std::string& source, const std::string& name = "chat template",
                        const TemplateLimits& limits = {});
  ~ChatTemplate();
  ChatTemplate(ChatTemplate&&) noexcept;
  ChatTemplate& operator=(ChatTemplate&&) noexcept;

  /// Renders with the variables of `context` (a JSON object). Throws sparsa::Error on a runtime
  /// error, a limit exceeded, or raise_exception() called by the template.
  std::string render(const nlohmann::ordered_json& context) const;

  const std::string& source() const;

  /// DIR/chat_template.jinja, else the "chat_template" of DIR/tokenizer_config.json (a string,
  /// or a list of {name, template} where "default" is taken); nullopt when there is none.
  static std::optional<ChatTemplate> from_model_dir(const std::string& dir);

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace sparsa::pipeline
