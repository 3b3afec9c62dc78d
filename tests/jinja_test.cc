// The chat-template interpreter: published Llama-3, Mistral, Qwen2 and Qwen2.5 templates render
// exactly what Hugging Face's Jinja environment renders (expected texts in
// tests/fixtures/chat_templates/cases.json were produced by jinja2 3.1 with transformers'
// settings), language features, errors with their line, and the sandbox's limits.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"
#include "sparsa/pipeline/chat_template.h"
#include "test_util.h"

namespace sparsa {
namespace {

using pipeline::ChatTemplate;
using pipeline::TemplateLimits;
using ojson = nlohmann::ordered_json;

std::string render(const std::string& src, const ojson& ctx = ojson::object(), TemplateLimits lim = {}) {
  return ChatTemplate(src, "test", lim).render(ctx);
}

std::string error_of(const std::string& src, const ojson& ctx = ojson::object(), TemplateLimits lim = {}) {
  try {
    render(src, ctx, lim);
  } catch (const Error& e) {
    return e.what();
  }
  return "(no error)";
}

TEST(ChatTemplate, PublishedTemplatesRenderExactly) {
  const std::string dir = testing::fixtures_dir() + "/chat_templates/";
  const ojson cases = ojson::parse(read_text_file(dir + "cases.json"));
  ASSERT_GE(cases.size(), 8u);
  for (const auto& c : cases) {
    SCOPED_TRACE(c["template"].get<std::string>());
    const ChatTemplate t(read_text_file(dir + c["template"].get<std::string>()), c["template"].get<std::string>());
    if (c.contains("error")) {
      try {
        t.render(c["context"]);
        ADD_FAILURE() << "expected an error";
      } catch (const Error& e) {
        EXPECT_NE(std::string(e.what()).find(c["error"].get<std::string>()), std::string::npos) << e.what();
      }
      continue;
    }
    EXPECT_EQ(t.render(c["context"]), c["expected"].get<std::string>());
  }
}

TEST(ChatTemplate, ReadsTheTinyModelsTemplate) {
  auto t = ChatTemplate::from_model_dir(testing::tiny_model_dir());
  ASSERT_TRUE(t.has_value());
  const ojson ctx = {{"bos_token", "<s>"}, {"add_generation_prompt", true},
                     {"messages", {{{"role", "user"}, {"content", " hi "}}}}};
  EXPECT_EQ(t->render(ctx), "<s>### User:\nhi\n\n### Assistant:\n");
}

TEST(ChatTemplate, Expressions) {
  EXPECT_EQ(render("{{ 1 + 2 * 3 }} {{ (1 + 2) * 3 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 1 / 2 }}"),
            "7 9 3 -4 1 0.5");
  EXPECT_EQ(render("{{ 1.0 }} {{ [1, 'a', none, true] }} {{ {'a': 1} }} {{ 'ab' * 2 }} {{ 2 ** 10 }}"),
            "1.0 [1, 'a', None, True] {'a': 1} abab 1024");
  EXPECT_EQ(render("{{ 'a' ~ 1 ~ none }} {{ 'x' if false else 'y' }} {{ 'x' if true }}|{{ 'q' if false }}|"),
            "a1None y x||");
  EXPECT_EQ(render("{{ 'b' in 'abc' }} {{ 2 in [1, 2] }} {{ 'k' in {'k': 1} }} {{ 3 not in [1] }}"),
            "True True True True");
  EXPECT_EQ(render("{{ not 1 == 2 and (2 > 1 or x) }} {{ 1 < 2 <= 2 }} {{ none or 'd' }}"), "True True d");
  EXPECT_EQ(render("{{ s[1:3] }} {{ s[-2:] }} {{ s[::-1] }} {{ l[1:] }} {{ l[-1] }} {{ l[9] }}|",
                   {{"s", "hello"}, {"l", {1, 2, 3}}}),
            "el lo olleh [2, 3] 3 |");
  EXPECT_EQ(render("{{ m.role }} {{ m['content'] }} {{ m.missing }}|{{ m.missing is defined }}",
                   {{"m", {{"role", "user"}, {"content", "c"}}}}),
            "user c |False");
}

TEST(ChatTemplate, FiltersTestsAndMethods) {
  EXPECT_EQ(render("{{ '  hi  ' | trim }}|{{ 'hELLO wORLD' | capitalize }}|{{ 'a b' | title }}|{{ 'X' | lower }}"),
            "hi|Hello world|A B|x");
  EXPECT_EQ(render("{{ d | tojson }}|{{ d | tojson(indent=2) }}", {{"d", {{"b", 1}, {"a", {true, nullptr, "é\"\n"}}}}}),
            "{\"b\": 1, \"a\": [true, null, \"é\\\"\\n\"]}|{\n  \"b\": 1,\n  \"a\": [\n    true,\n    null,\n    \"é\\\"\\n\"\n  ]\n}");
  EXPECT_EQ(render("{{ [1, 2, 3] | length }} {{ [1, 2] | join(', ') }} {{ x | default('dflt') }} {{ [3, 4] | first }} "
                   "{{ [3, 4] | last }} {{ 'ab' | upper }} {{ '5' | int + 1 }}"),
            "3 1, 2 dflt 3 4 AB 6");
  EXPECT_EQ(render("{{ ms | selectattr('role', 'equalto', 'user') | map(attribute='c') | join }}",
                   {{"ms", {{{"role", "user"}, {"c", "a"}}, {{"role", "bot"}, {"c", "b"}}, {{"role", "user"}, {"c", "c"}}}}}),
            "ac");
  EXPECT_EQ(render("{{ ' x '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'abc'.startswith('ab') }}|{{ 'abc'.endswith('bc') }}|"
                   "{{ 'aXa'.replace('a', 'b') }}|{% for k, v in d.items() %}{{ k }}={{ v }};{% endfor %}|{{ d.get('z', 0) }}",
                   {{"d", {{"x", 1}, {"y", 2}}}}),
            "x|['a', 'b']|True|True|bXb|x=1;y=2;|0");
  EXPECT_EQ(render("{{ 4 is even }} {{ 3 is odd }} {{ 9 is divisibleby(3) }} {{ none is none }} {{ 'a' is string }} "
                   "{{ 1 is number }} {{ {} is mapping }} {{ x is not defined }}"),
            "True True True True True True True True");
}

TEST(ChatTemplate, StatementsAndScoping) {
  EXPECT_EQ(render("{% for x in [1, 2, 3] %}{{ loop.index }}{{ loop.first }}{{ loop.last }}{{ loop.length }} {% endfor %}"),
            "1TrueFalse3 2FalseFalse3 3FalseTrue3 ");
  EXPECT_EQ(render("{% for x in [] %}a{% else %}empty{% endfor %}"), "empty");
  EXPECT_EQ(render("{% for x in range(10) if x is odd %}{% if x > 6 %}{% break %}{% endif %}{{ x }}{% endfor %}"),
            "135");
  EXPECT_EQ(render("{% for x in range(5) %}{% if x == 2 %}{% continue %}{% endif %}{{ x }}{% endfor %}"), "0134");
  // Assignments inside a loop stay inside it; namespace() carries values out.
  EXPECT_EQ(render("{% set x = 0 %}{% for i in [1, 2] %}{% set x = i %}{% endfor %}{{ x }}"), "0");
  EXPECT_EQ(render("{% set ns = namespace(n=0) %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}"),
            "6");
  EXPECT_EQ(render("{% set b %}x{{ 1 + 1 }}{% endset %}[{{ b }}]"), "[x2]");
  EXPECT_EQ(render("{% if a %}A{% elif b %}B{% else %}C{% endif %}", {{"b", 1}}), "B");
  EXPECT_EQ(render("{# comment #}{%- generation -%} g {%- endgeneration %}"), "g");
}

TEST(ChatTemplate, WhitespaceControlAsHuggingFace) {
  // trim_blocks drops the newline after a block tag; lstrip_blocks the indentation before one.
  EXPECT_EQ(render("{% if true %}\n  a\n  {% endif %}\nb"), "  a\nb");
  EXPECT_EQ(render("x  {{- ' y ' -}}  z"), "x y z");
  EXPECT_EQ(render("a\n{# c #}\nb"), "a\nb");
}

TEST(ChatTemplate, ErrorsNameTheLine) {
  EXPECT_NE(error_of("line1\n{% if %}").find("test: line 2"), std::string::npos) << error_of("line1\n{% if %}");
  EXPECT_NE(error_of("{% for x in y %}").find("missing '{% endfor %}'"), std::string::npos);
  EXPECT_NE(error_of("{{ 1 + }}").find("expected an expression"), std::string::npos);
  EXPECT_NE(error_of("{% macro m() %}{% endmacro %}").find("unsupported tag 'macro'"), std::string::npos);
  EXPECT_NE(error_of("{{ x | nosuchfilter }}").find("unknown filter 'nosuchfilter'"), std::string::npos);
  EXPECT_NE(error_of("{{ 'a' + 1 }}").find("unsupported operand types"), std::string::npos);
  EXPECT_NE(error_of("{{ raise_exception('no system role') }}").find("no system role"), std::string::npos);
  EXPECT_NE(error_of("{% break %}").find("outside a loop"), std::string::npos);
  EXPECT_NE(error_of("{{ 'unterminated }}").find("unterminated string"), std::string::npos);
  EXPECT_NE(error_of("{{ 1 / 0 }}").find("division by zero"), std::string::npos);
}

TEST(ChatTemplate, SandboxHasNoFilesAndBoundsWork) {
  for (const char* tag : {"include 'x'", "import 'x' as y", "extends 'x'", "from 'x' import y"})
    EXPECT_NE(error_of(std::string("{% ") + tag + " %}").find("sandboxed"), std::string::npos) << tag;
  EXPECT_NE(error_of("{{ open('/etc/passwd') }}").find("'open' is undefined"), std::string::npos);
  EXPECT_EQ(render("{{ ''.__class__ }}|{{ m.items.__globals__ }}", {{"m", ojson::object()}}), "|");

  TemplateLimits lim;
  lim.max_loop_iterations = 1000;
  EXPECT_NE(error_of("{% for i in range(100) %}{% for j in range(100) %}{% endfor %}{% endfor %}", {}, lim)
                .find("more than 1000 loop iterations"), std::string::npos);
  EXPECT_NE(error_of("{{ range(1000000000) }}", {}, lim).find("range() longer"), std::string::npos);
  lim.max_output_bytes = 4096;
  EXPECT_NE(error_of("{% for i in range(900) %}xxxxxxxx{% endfor %}", {}, lim).find("exceeds the limit"),
            std::string::npos);
  EXPECT_NE(error_of("{{ 'x' * 100000000 }}", {}, lim).find("exceeds the limit"), std::string::npos);
  EXPECT_NE(error_of("{% set ns = namespace(s='xx') %}{% for i in range(40) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
                     {}, lim).find("exceeds the limit"), std::string::npos);
  lim.max_depth = 16;
  std::string nested;
  for (int i = 0; i < 100; ++i) nested += "{% if true %}";
  for (int i = 0; i < 100; ++i) nested += "{% endif %}";
  EXPECT_NE(error_of(nested, {}, lim).find("nesting deeper"), std::string::npos);
  EXPECT_NE(error_of("{{" + std::string(200, '(') + "1" + std::string(200, ')') + "}}", {}, lim).find("nesting deeper"),
            std::string::npos);
}

}  // namespace
}  // namespace sparsa
