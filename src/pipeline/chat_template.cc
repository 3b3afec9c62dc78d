// A small Jinja interpreter for chat templates (see sparsa/pipeline/chat_template.h).
//
// Three stages: the lexer cuts the source into text and tag tokens (applying whitespace control,
// trim_blocks and lstrip_blocks), the parser builds a tree of statements and expressions, and
// the renderer walks the tree over dynamically typed values that behave like Python's.
#include "sparsa/pipeline/chat_template.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <unordered_map>
#include <variant>
#include <vector>

#include "sparsa/core/error.h"

namespace sparsa::pipeline {

namespace {

using ojson = nlohmann::ordered_json;

// ---------------------------------------------------------------------------------------------
// Values

struct Value;
using List = std::vector<Value>;
struct Dict;

struct Value {
  enum class Kind { Undefined, None, Bool, Int, Float, String, List, Dict };
  Kind kind = Kind::Undefined;
  bool b = false;
  int64_t i = 0;
  double f = 0;
  std::string s;
  std::shared_ptr<List> list;
  std::shared_ptr<Dict> dict;

  static Value none() { Value v; v.kind = Kind::None; return v; }
  static Value boolean(bool x) { Value v; v.kind = Kind::Bool; v.b = x; return v; }
  static Value integer(int64_t x) { Value v; v.kind = Kind::Int; v.i = x; return v; }
  static Value real(double x) { Value v; v.kind = Kind::Float; v.f = x; return v; }
  static Value str(std::string x) { Value v; v.kind = Kind::String; v.s = std::move(x); return v; }
  static Value make_list(List items = {}) {
    Value v;
    v.kind = Kind::List;
    v.list = std::make_shared<List>(std::move(items));
    return v;
  }
  static Value make_dict();

  bool is_undefined() const { return kind == Kind::Undefined; }
  bool is_number() const { return kind == Kind::Int || kind == Kind::Float || kind == Kind::Bool; }
  double number() const { return kind == Kind::Float ? f : kind == Kind::Int ? static_cast<double>(i) : b; }
};

struct Dict {
  std::vector<std::pair<std::string, Value>> items;
  bool is_namespace = false;
  const Value* find(const std::string& key) const {
    for (const auto& [k, v] : items)
      if (k == key) return &v;
    return nullptr;
  }
  void set(const std::string& key, Value v) {
    for (auto& [k, old] : items)
      if (k == key) {
        old = std::move(v);
        return;
      }
    items.emplace_back(key, std::move(v));
  }
};

Value Value::make_dict() {
  Value v;
  v.kind = Kind::Dict;
  v.dict = std::make_shared<Dict>();
  return v;
}

const char* kind_name(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "undefined";
    case Value::Kind::None: return "none";
    case Value::Kind::Bool: return "boolean";
    case Value::Kind::Int: return "integer";
    case Value::Kind::Float: return "float";
    case Value::Kind::String: return "string";
    case Value::Kind::List: return "list";
    case Value::Kind::Dict: return "dict";
  }
  return "?";
}

Value from_json(const ojson& j) {
  switch (j.type()) {
    case ojson::value_t::null: return Value::none();
    case ojson::value_t::boolean: return Value::boolean(j.get<bool>());
    case ojson::value_t::number_integer: return Value::integer(j.get<int64_t>());
    case ojson::value_t::number_unsigned: {
      const uint64_t u = j.get<uint64_t>();
      return u > static_cast<uint64_t>(INT64_MAX) ? Value::real(static_cast<double>(u))
                                                  : Value::integer(static_cast<int64_t>(u));
    }
    case ojson::value_t::number_float: return Value::real(j.get<double>());
    case ojson::value_t::string: return Value::str(j.get<std::string>());
    case ojson::value_t::array: {
      List l;
      l.reserve(j.size());
      for (const auto& e : j) l.push_back(from_json(e));
      return Value::make_list(std::move(l));
    }
    case ojson::value_t::object: {
      Value d = Value::make_dict();
      for (auto it = j.begin(); it != j.end(); ++it) d.dict->items.emplace_back(it.key(), from_json(it.value()));
      return d;
    }
    default: return Value::none();
  }
}

bool truthy(const Value& v) {
  switch (v.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: return false;
    case Value::Kind::Bool: return v.b;
    case Value::Kind::Int: return v.i != 0;
    case Value::Kind::Float: return v.f != 0;
    case Value::Kind::String: return !v.s.empty();
    case Value::Kind::List: return !v.list->empty();
    case Value::Kind::Dict: return !v.dict->items.empty();
  }
  return false;
}

// Python's repr() of a float: shortest round trip, with ".0" for integral values.
std::string float_repr(double d) {
  if (std::isnan(d)) return "nan";
  if (std::isinf(d)) return d > 0 ? "inf" : "-inf";
  std::string s = fmt::format("{}", d);
  if (s.find_first_of(".en") == std::string::npos) s += ".0";
  return s;
}

std::string py_str_repr(const std::string& s) {
  const bool dq = s.find('\'') != std::string::npos && s.find('"') == std::string::npos;
  const char q = dq ? '"' : '\'';
  std::string out(1, q);
  for (char c : s) {
    switch (c) {
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (c == q) out += '\\';
        out += c;
    }
  }
  return out + q;
}

std::string to_str(const Value& v, bool repr = false);

std::string to_str(const Value& v, bool repr) {
  switch (v.kind) {
    case Value::Kind::Undefined: return "";
    case Value::Kind::None: return "None";
    case Value::Kind::Bool: return v.b ? "True" : "False";
    case Value::Kind::Int: return std::to_string(v.i);
    case Value::Kind::Float: return float_repr(v.f);
    case Value::Kind::String: return repr ? py_str_repr(v.s) : v.s;
    case Value::Kind::List: {
      std::string out = "[";
      for (size_t k = 0; k < v.list->size(); ++k) out += (k ? ", " : "") + to_str((*v.list)[k], true);
      return out + "]";
    }
    case Value::Kind::Dict: {
      std::string out = "{";
      bool first = true;
      for (const auto& [k, e] : v.dict->items) {
        out += (first ? "" : ", ") + py_str_repr(k) + ": " + to_str(e, true);
        first = false;
      }
      return out + "}";
    }
  }
  return "";
}

// json.dumps(value, ensure_ascii=False, indent=indent) as Hugging Face's tojson filter calls it.
void json_string(const std::string& s, std::string& out) {
  out += '"';
  for (unsigned char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      case '\b': out += "\\b"; break;
      case '\f': out += "\\f"; break;
      default:
        if (c < 0x20) out += fmt::format("\\u{:04x}", c);
        else out += static_cast<char>(c);
    }
  }
  out += '"';
}

void to_json_text(const Value& v, int indent, int level, std::string& out) {
  const std::string item_sep = indent >= 0 ? "," : ", ";
  auto newline = [&](int lvl) {
    if (indent >= 0) {
      out += '\n';
      out.append(static_cast<size_t>(indent * lvl), ' ');
    }
  };
  switch (v.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: out += "null"; return;
    case Value::Kind::Bool: out += v.b ? "true" : "false"; return;
    case Value::Kind::Int: out += std::to_string(v.i); return;
    case Value::Kind::Float:
      out += std::isnan(v.f) ? "NaN" : std::isinf(v.f) ? (v.f > 0 ? "Infinity" : "-Infinity") : float_repr(v.f);
      return;
    case Value::Kind::String: json_string(v.s, out); return;
    case Value::Kind::List:
      if (v.list->empty()) { out += "[]"; return; }
      out += '[';
      for (size_t k = 0; k < v.list->size(); ++k) {
        if (k) out += item_sep;
        newline(level + 1);
        to_json_text((*v.list)[k], indent, level + 1, out);
      }
      newline(level);
      out += ']';
      return;
    case Value::Kind::Dict:
      if (v.dict->items.empty()) { out += "{}"; return; }
      out += '{';
      for (size_t k = 0; k < v.dict->items.size(); ++k) {
        if (k) out += item_sep;
        newline(level + 1);
        json_string(v.dict->items[k].first, out);
        out += ": ";
        to_json_text(v.dict->items[k].second, indent, level + 1, out);
      }
      newline(level);
      out += '}';
      return;
  }
}

bool equal(const Value& a, const Value& b) {
  if (a.is_number() && b.is_number()) {
    if (a.kind == Value::Kind::Float || b.kind == Value::Kind::Float) return a.number() == b.number();
    const int64_t x = a.kind == Value::Kind::Bool ? a.b : a.i;
    const int64_t y = b.kind == Value::Kind::Bool ? b.b : b.i;
    return x == y;
  }
  if (a.kind != b.kind) return false;
  switch (a.kind) {
    case Value::Kind::Undefined:
    case Value::Kind::None: return true;
    case Value::Kind::String: return a.s == b.s;
    case Value::Kind::List:
      if (a.list->size() != b.list->size()) return false;
      for (size_t k = 0; k < a.list->size(); ++k)
        if (!equal((*a.list)[k], (*b.list)[k])) return false;
      return true;
    case Value::Kind::Dict:
      if (a.dict->items.size() != b.dict->items.size()) return false;
      for (const auto& [k, v] : a.dict->items) {
        const Value* o = b.dict->find(k);
        if (o == nullptr || !equal(v, *o)) return false;
      }
      return true;
    default: return false;
  }
}

// ---------------------------------------------------------------------------------------------
// Lexer

enum class Tok { Text, VarBegin, VarEnd, BlockBegin, BlockEnd, Name, Int, Float, String, Op, End };

struct Token {
  Tok type;
  std::string text;
  int line;
};

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

class Lexer {
 public:
  Lexer(const std::string& src, const std::string& name) : src_(src), name_(name) {}

  std::vector<Token> run() {
    size_t pos = 0;
    const size_t n = src_.size();
    while (pos < n) {
      size_t at = pos;
      while (at < n && !(src_[at] == '{' && at + 1 < n &&
                         (src_[at + 1] == '{' || src_[at + 1] == '%' || src_[at + 1] == '#')))
        ++at;
      std::string text = src_.substr(pos, at - pos);
      if (at >= n) {
        emit_text(std::move(text), pos);
        break;
      }
      const char kind = src_[at + 1];
      size_t body = at + 2;
      const bool strip_before = body < n && src_[body] == '-';
      const bool plus = body < n && src_[body] == '+';
      if (strip_before || plus) ++body;
      if (strip_before) {
        while (!text.empty() && is_space(text.back())) text.pop_back();
      } else if (kind != '{' && !plus) {
        // lstrip_blocks: spaces and tabs between the start of the line and a block tag go.
        size_t k = text.size();
        while (k > 0 && (text[k - 1] == ' ' || text[k - 1] == '\t')) --k;
        const bool line_start = k > 0 ? text[k - 1] == '\n' : (pos == 0 || src_[pos - 1] == '\n');
        if (line_start) text.resize(k);
      }
      emit_text(std::move(text), pos);
      bool strip_after = false;
      if (kind == '#') {
        const size_t end = src_.find("#}", body);
        if (end == std::string::npos) error(at, "unterminated comment");
        strip_after = end > body && src_[end - 1] == '-';
        pos = end + 2;
      } else {
        tokens_.push_back({kind == '{' ? Tok::VarBegin : Tok::BlockBegin, "", line_of(at)});
        pos = lex_tag(body, kind == '{' ? '}' : '%', strip_after);
        tokens_.push_back({kind == '{' ? Tok::VarEnd : Tok::BlockEnd, "", line_of(pos)});
      }
      if (strip_after) {
        while (pos < n && is_space(src_[pos])) ++pos;
      } else if (kind != '{') {
        // trim_blocks: the first newline after a block tag or comment goes.
        if (pos < n && src_[pos] == '\n') ++pos;
        else if (pos + 1 < n && src_[pos] == '\r' && src_[pos + 1] == '\n') pos += 2;
      }
    }
    tokens_.push_back({Tok::End, "", line_of(src_.size())});
    return std::move(tokens_);
  }

 private:
  [[noreturn]] void error(size_t at, const std::string& what) {
    fail("{}: line {}: {}", name_, line_of(at), what);
  }
  int line_of(size_t at) {
    // Lines counted incrementally: tags are visited in order.
    while (line_pos_ < at && line_pos_ < src_.size()) {
      if (src_[line_pos_] == '\n') ++line_;
      ++line_pos_;
    }
    return line_;
  }
  void emit_text(std::string text, size_t at) {
    if (!text.empty()) tokens_.push_back({Tok::Text, std::move(text), line_of(at)});
  }

  // Lexes the inside of a tag up to its closer ("}}" or "%}"); returns the position after it.
  size_t lex_tag(size_t pos, char closer, bool& strip_after) {
    const size_t n = src_.size();
    for (;;) {
      while (pos < n && is_space(src_[pos])) ++pos;
      if (pos >= n) error(pos, "unterminated tag");
      auto closes_at = [&](size_t p) { return p + 1 < n && src_[p] == closer && src_[p + 1] == '}'; };
      if (closes_at(pos)) return pos + 2;
      if ((src_[pos] == '-' || src_[pos] == '+') && closes_at(pos + 1)) {
        strip_after = src_[pos] == '-';
        return pos + 3;
      }
      const char c = src_[pos];
      const int line = line_of(pos);
      if (std::isalpha(static_cast<unsigned char>(c)) || c == '_') {
        size_t e = pos;
        while (e < n && (std::isalnum(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        tokens_.push_back({Tok::Name, src_.substr(pos, e - pos), line});
        pos = e;
      } else if (std::isdigit(static_cast<unsigned char>(c))) {
        size_t e = pos;
        bool is_float = false;
        while (e < n && (std::isdigit(static_cast<unsigned char>(src_[e])) || src_[e] == '_')) ++e;
        if (e + 1 < n && src_[e] == '.' && std::isdigit(static_cast<unsigned char>(src_[e + 1]))) {
          is_float = true;
          ++e;
          while (e < n && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
        }
        if (e < n && (src_[e] == 'e' || src_[e] == 'E')) {
          size_t k = e + 1;
          if (k < n && (src_[k] == '+' || src_[k] == '-')) ++k;
          if (k < n && std::isdigit(static_cast<unsigned char>(src_[k]))) {
            is_float = true;
            e = k;
            while (e < n && std::isdigit(static_cast<unsigned char>(src_[e]))) ++e;
          }
        }
        std::string num = src_.substr(pos, e - pos);
        num.erase(std::remove(num.begin(), num.end(), '_'), num.end());
        tokens_.push_back({is_float ? Tok::Float : Tok::Int, num, line});
        pos = e;
      } else if (c == '\'' || c == '"') {
        std::string s;
        size_t e = pos + 1;
        for (;; ++e) {
          if (e >= n) error(pos, "unterminated string literal");
          if (src_[e] == c) break;
          if (src_[e] == '\\' && e + 1 < n) {
            const char x = src_[++e];
            switch (x) {
              case 'n': s += '\n'; break;
              case 't': s += '\t'; break;
              case 'r': s += '\r'; break;
              case '\\': s += '\\'; break;
              case '\'': s += '\''; break;
              case '"': s += '"'; break;
              case '\n': break;
              default: s += '\\'; s += x;
            }
          } else {
            s += src_[e];
          }
        }
        tokens_.push_back({Tok::String, std::move(s), line});
        pos = e + 1;
      } else {
        static const char* kOps[] = {"**", "//", "==", "!=", "<=", ">=", "+", "-", "*", "/", "%",
                                     "<",  ">",  "=",  "(",  ")",  "[",  "]", "{", "}", ",", ".",
                                     ":",  "|",  "~"};
        bool matched = false;
        for (const char* op : kOps) {
          const size_t len = std::char_traits<char>::length(op);
          if (src_.compare(pos, len, op) == 0) {
            tokens_.push_back({Tok::Op, op, line});
            pos += len;
            matched = true;
            break;
          }
        }
        if (!matched) error(pos, fmt::format("unexpected character '{}'", c));
      }
    }
  }

  const std::string& src_;
  const std::string& name_;
  std::vector<Token> tokens_;
  size_t line_pos_ = 0;
  int line_ = 1;
};

// ---------------------------------------------------------------------------------------------
// Syntax tree

struct Expr {
  enum class Op {
    Literal, Name, Attr, Index, Slice, Call, Filter, Test, Not, Neg, Pos, Binary, And, Or, Cond,
    ListLit, DictLit
  };
  Op op = Op::Literal;
  Value literal;
  std::string name;  // Name, Attr, Filter, Test; Binary: the operator
  std::vector<std::unique_ptr<Expr>> args;  // operands and positional arguments
  std::vector<std::pair<std::string, std::unique_ptr<Expr>>> kwargs;
  bool negated = false;  // Test: `is not`
  int line = 0;
};
using ExprPtr = std::unique_ptr<Expr>;

struct Node;
using Body = std::vector<std::unique_ptr<Node>>;

struct Node {
  enum class Kind { Text, Output, If, For, Set, SetBlock, Break, Continue };
  Kind kind = Kind::Text;
  int line = 0;
  std::string text;                                  // Text
  ExprPtr expr;                                      // Output, Set, For (iterable)
  std::vector<std::pair<ExprPtr, Body>> branches;    // If: conditions and bodies
  Body body, else_body;                              // For, SetBlock; If/For else
  std::vector<std::string> targets;                  // For, Set, SetBlock
  std::string attr;                                  // Set: `set ns.attr = ...`
  ExprPtr filter;                                    // For: `for x in xs if cond`
};

class Parser {
 public:
  Parser(std::vector<Token> tokens, const std::string& name, int max_depth)
      : t_(std::move(tokens)), name_(name), max_depth_(max_depth) {}

  Body parse_template() {
    std::string stopped_at;
    Body b = parse_body({}, stopped_at);
    return b;
  }

 private:
  [[noreturn]] void error(const std::string& what) { fail("{}: line {}: {}", name_, cur().line, what); }
  const Token& cur() const { return t_[i_]; }
  const Token& peek(size_t k = 1) const { return t_[std::min(i_ + k, t_.size() - 1)]; }
  bool is_op(const char* op) const { return cur().type == Tok::Op && cur().text == op; }
  bool is_name(const char* n) const { return cur().type == Tok::Name && cur().text == n; }
  void expect_op(const char* op) {
    if (!is_op(op)) error(fmt::format("expected '{}'{}", op, describe()));
    ++i_;
  }
  std::string describe() const {
    switch (cur().type) {
      case Tok::VarEnd: return ", found the end of '{{ }}'";
      case Tok::BlockEnd: return ", found the end of the tag";
      case Tok::End: return ", found the end of the template";
      case Tok::Text: return ", found text";
      default: return fmt::format(", found '{}'", cur().text);
    }
  }
  std::string expect_name() {
    if (cur().type != Tok::Name) error("expected a name" + describe());
    return t_[i_++].text;
  }
  void expect_block_end() {
    if (cur().type != Tok::BlockEnd) error("expected the end of the tag" + describe());
    ++i_;
  }
  struct DepthGuard {
    Parser& p;
    explicit DepthGuard(Parser& parser) : p(parser) {
      if (++p.depth_ > p.max_depth_) p.error(fmt::format("nesting deeper than {} levels", p.max_depth_));
    }
    ~DepthGuard() { --p.depth_; }
  };

  // Parses statements until one of `stops` (a block tag name) begins; its name goes to
  // `stopped_at` and the parser stands on that name.
  Body parse_body(const std::vector<std::string>& stops, std::string& stopped_at) {
    DepthGuard guard(*this);
    Body body;
    for (;;) {
      const Token& tk = cur();
      if (tk.type == Tok::End) {
        if (!stops.empty()) error(fmt::format("missing '{{% {} %}}'", stops.back()));
        return body;
      }
      if (tk.type == Tok::Text) {
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::Text;
        n->text = tk.text;
        n->line = tk.line;
        body.push_back(std::move(n));
        ++i_;
      } else if (tk.type == Tok::VarBegin) {
        ++i_;
        auto n = std::make_unique<Node>();
        n->kind = Node::Kind::Output;
        n->line = tk.line;
        n->expr = parse_expr();
        if (cur().type != Tok::VarEnd) error("expected '}}'" + describe());
        ++i_;
        body.push_back(std::move(n));
      } else if (tk.type == Tok::BlockBegin) {
        ++i_;
        const std::string kw = expect_name();
        if (std::find(stops.begin(), stops.end(), kw) != stops.end()) {
          stopped_at = kw;
          return body;
        }
        --i_;
        body.push_back(parse_statement());
      } else {
        error("unexpected token" + describe());
      }
    }
  }

  std::unique_ptr<Node> parse_statement() {
    const int line = cur().line;
    const std::string kw = expect_name();
    auto n = std::make_unique<Node>();
    n->line = line;
    std::string stop;
    if (kw == "if") {
      n->kind = Node::Kind::If;
      ExprPtr cond = parse_expr();
      expect_block_end();
      for (;;) {
        Body b = parse_body({"elif", "else", "endif"}, stop);
        n->branches.emplace_back(std::move(cond), std::move(b));
        if (stop == "elif") {
          cond = parse_expr();
          expect_block_end();
          continue;
        }
        if (stop == "else") {
          expect_block_end();
          n->else_body = parse_body({"endif"}, stop);
        }
        expect_block_end();
        return n;
      }
    }
    if (kw == "for") {
      n->kind = Node::Kind::For;
      n->targets.push_back(expect_name());
      while (is_op(",")) {
        ++i_;
        n->targets.push_back(expect_name());
      }
      if (!is_name("in")) error("expected 'in' in the for loop" + describe());
      ++i_;
      n->expr = parse_or_cond(false);
      if (is_name("if")) {
        ++i_;
        n->filter = parse_or_cond(false);
      }
      if (is_name("recursive")) error("recursive loops are not supported");
      expect_block_end();
      ++loop_depth_;
      n->body = parse_body({"else", "endfor"}, stop);
      --loop_depth_;
      if (stop == "else") {
        expect_block_end();
        n->else_body = parse_body({"endfor"}, stop);
      }
      expect_block_end();
      return n;
    }
    if (kw == "set") {
      const std::string target = expect_name();
      if (is_op(".")) {
        ++i_;
        n->attr = expect_name();
      }
      n->targets.push_back(target);
      if (is_op("=")) {
        ++i_;
        n->kind = Node::Kind::Set;
        n->expr = parse_expr();
        expect_block_end();
        return n;
      }
      if (!n->attr.empty() || cur().type != Tok::BlockEnd) error("expected '=' in set" + describe());
      ++i_;
      n->kind = Node::Kind::SetBlock;
      n->body = parse_body({"endset"}, stop);
      expect_block_end();
      return n;
    }
    if (kw == "generation") {
      // Hugging Face's marker of assistant text (for training masks); renders its body as is.
      expect_block_end();
      n->kind = Node::Kind::If;
      auto always = std::make_unique<Expr>();
      always->literal = Value::boolean(true);
      n->branches.emplace_back(std::move(always), parse_body({"endgeneration"}, stop));
      expect_block_end();
      return n;
    }
    if (kw == "break" || kw == "continue") {
      if (loop_depth_ == 0) error(fmt::format("'{}' outside a loop", kw));
      n->kind = kw == "break" ? Node::Kind::Break : Node::Kind::Continue;
      expect_block_end();
      return n;
    }
    if (kw == "include" || kw == "import" || kw == "from" || kw == "extends")
      error(fmt::format("'{}' is not allowed: chat templates are sandboxed and read no files", kw));
    error(fmt::format("unsupported tag '{}'", kw));
  }

 public:
  // ---- expressions
  ExprPtr parse_expr() { return parse_or_cond(true); }

 private:
  ExprPtr make(Expr::Op op, int line) {
    auto e = std::make_unique<Expr>();
    e->op = op;
    e->line = line;
    return e;
  }

  ExprPtr parse_or_cond(bool with_cond) {
    DepthGuard guard(*this);
    ExprPtr e = parse_or();
    while (with_cond && is_name("if")) {
      const int line = cur().line;
      ++i_;
      ExprPtr c = make(Expr::Op::Cond, line);
      ExprPtr cond = parse_or();
      ExprPtr other;
      if (is_name("else")) {
        ++i_;
        other = parse_or_cond(true);
      } else {
        other = make(Expr::Op::Literal, line);  // undefined
      }
      c->args.push_back(std::move(cond));
      c->args.push_back(std::move(e));
      c->args.push_back(std::move(other));
      e = std::move(c);
    }
    return e;
  }
  ExprPtr parse_or() {
    ExprPtr e = parse_and();
    while (is_name("or")) {
      ExprPtr o = make(Expr::Op::Or, cur().line);
      ++i_;
      o->args.push_back(std::move(e));
      o->args.push_back(parse_and());
      e = std::move(o);
    }
    return e;
  }
  ExprPtr parse_and() {
    ExprPtr e = parse_not();
    while (is_name("and")) {
      ExprPtr o = make(Expr::Op::And, cur().line);
      ++i_;
      o->args.push_back(std::move(e));
      o->args.push_back(parse_not());
      e = std::move(o);
    }
    return e;
  }
  ExprPtr parse_not() {
    if (is_name("not")) {
      DepthGuard guard(*this);
      ExprPtr o = make(Expr::Op::Not, cur().line);
      ++i_;
      o->args.push_back(parse_not());
      return o;
    }
    return parse_compare();
  }
  ExprPtr parse_compare() {
    ExprPtr e = parse_concat();
    for (;;) {
      std::string op;
      if (cur().type == Tok::Op &&
          (cur().text == "==" || cur().text == "!=" || cur().text == "<" || cur().text == ">" ||
           cur().text == "<=" || cur().text == ">=")) {
        op = cur().text;
        ++i_;
      } else if (is_name("in")) {
        op = "in";
        ++i_;
      } else if (is_name("not") && peek().type == Tok::Name && peek().text == "in") {
        op = "not in";
        i_ += 2;
      } else {
        return e;
      }
      ExprPtr b = make(Expr::Op::Binary, cur().line);
      b->name = op;
      b->args.push_back(std::move(e));
      b->args.push_back(parse_concat());
      e = std::move(b);
    }
  }
  ExprPtr binary(const std::string& op, ExprPtr a, ExprPtr b) {
    ExprPtr e = make(Expr::Op::Binary, a->line);
    e->name = op;
    e->args.push_back(std::move(a));
    e->args.push_back(std::move(b));
    return e;
  }
  ExprPtr parse_concat() {
    ExprPtr e = parse_sum();
    while (is_op("~")) {
      ++i_;
      e = binary("~", std::move(e), parse_sum());
    }
    return e;
  }
  ExprPtr parse_sum() {
    ExprPtr e = parse_product();
    while (is_op("+") || is_op("-")) {
      const std::string op = t_[i_++].text;
      e = binary(op, std::move(e), parse_product());
    }
    return e;
  }
  ExprPtr parse_product() {
    ExprPtr e = parse_power();
    while (is_op("*") || is_op("/") || is_op("//") || is_op("%")) {
      const std::string op = t_[i_++].text;
      e = binary(op, std::move(e), parse_power());
    }
    return e;
  }
  ExprPtr parse_power() {
    ExprPtr e = parse_unary();
    while (is_op("**")) {
      ++i_;
      e = binary("**", std::move(e), parse_unary());
    }
    return e;
  }
  ExprPtr parse_unary() {
    DepthGuard guard(*this);
    if (is_op("-") || is_op("+")) {
      ExprPtr o = make(is_op("-") ? Expr::Op::Neg : Expr::Op::Pos, cur().line);
      ++i_;
      o->args.push_back(parse_unary());
      return o;
    }
    ExprPtr e = parse_postfix(parse_primary());
    // Filters and tests bind tighter than any binary operator.
    for (;;) {
      if (is_op("|")) {
        ++i_;
        ExprPtr f = make(Expr::Op::Filter, cur().line);
        f->name = expect_name();
        f->args.push_back(std::move(e));
        if (is_op("(")) parse_call_args(*f);
        e = std::move(f);
      } else if (is_name("is")) {
        ++i_;
        ExprPtr t = make(Expr::Op::Test, cur().line);
        if (is_name("not")) {
          t->negated = true;
          ++i_;
        }
        t->name = expect_name();
        t->args.push_back(std::move(e));
        if (is_op("(")) {
          parse_call_args(*t);
        } else if (cur().type == Tok::Int || cur().type == Tok::Float || cur().type == Tok::String ||
                   (cur().type == Tok::Name && cur().text != "and" && cur().text != "or" &&
                    cur().text != "else" && cur().text != "if" && cur().text != "is" &&
                    cur().text != "in" && cur().text != "not")) {
          t->args.push_back(parse_postfix(parse_primary()));
        }
        e = std::move(t);
      } else {
        return e;
      }
    }
  }
  void parse_call_args(Expr& call) {
    expect_op("(");
    while (!is_op(")")) {
      if (cur().type == Tok::Name && peek().type == Tok::Op && peek().text == "=") {
        std::string key = t_[i_].text;
        i_ += 2;
        call.kwargs.emplace_back(std::move(key), parse_expr());
      } else {
        if (!call.kwargs.empty()) error("positional argument after keyword argument");
        call.args.push_back(parse_expr());
      }
      if (!is_op(",")) break;
      ++i_;
    }
    expect_op(")");
  }
  ExprPtr parse_postfix(ExprPtr e) {
    for (;;) {
      if (is_op(".")) {
        ++i_;
        ExprPtr a = make(Expr::Op::Attr, cur().line);
        if (cur().type == Tok::Int) a->name = t_[i_++].text;
        else a->name = expect_name();
        a->args.push_back(std::move(e));
        e = std::move(a);
      } else if (is_op("[")) {
        ++i_;
        const int line = cur().line;
        ExprPtr parts[3];
        int colons = 0;
        for (;;) {
          if (is_op(":")) {
            if (++colons > 2) error("too many ':' in a slice");
            ++i_;
          } else if (is_op("]")) {
            break;
          } else {
            if (parts[colons]) error("expected ':' or ']'" + describe());
            parts[colons] = parse_expr();
          }
        }
        expect_op("]");
        if (colons == 0) {
          if (!parts[0]) error("empty subscript");
          ExprPtr ix = make(Expr::Op::Index, line);
          ix->args.push_back(std::move(e));
          ix->args.push_back(std::move(parts[0]));
          e = std::move(ix);
        } else {
          ExprPtr sl = make(Expr::Op::Slice, line);
          sl->args.push_back(std::move(e));
          for (auto& p : parts) sl->args.push_back(p ? std::move(p) : make(Expr::Op::Literal, line));
          e = std::move(sl);
        }
      } else if (is_op("(")) {
        ExprPtr c = make(Expr::Op::Call, cur().line);
        c->args.push_back(std::move(e));
        parse_call_args(*c);
        e = std::move(c);
      } else {
        return e;
      }
    }
  }
  ExprPtr parse_primary() {
    DepthGuard guard(*this);
    const Token& tk = cur();
    ExprPtr e = make(Expr::Op::Literal, tk.line);
    switch (tk.type) {
      case Tok::Int:
        try {
          e->literal = Value::integer(std::stoll(tk.text));
        } catch (const std::exception&) {
          error(fmt::format("integer literal '{}' is too large", tk.text));
        }
        ++i_;
        return e;
      case Tok::Float:
        e->literal = Value::real(std::strtod(tk.text.c_str(), nullptr));
        ++i_;
        return e;
      case Tok::String: {
        std::string s = tk.text;
        ++i_;
        while (cur().type == Tok::String) s += t_[i_++].text;  // adjacent literals join
        e->literal = Value::str(std::move(s));
        return e;
      }
      case Tok::Name: {
        const std::string& n = tk.text;
        if (n == "true" || n == "True") e->literal = Value::boolean(true);
        else if (n == "false" || n == "False") e->literal = Value::boolean(false);
        else if (n == "none" || n == "None") e->literal = Value::none();
        else {
          e->op = Expr::Op::Name;
          e->name = n;
        }
        ++i_;
        return e;
      }
      case Tok::Op:
        if (tk.text == "(") {
          ++i_;
          if (is_op(")")) error("empty parentheses (tuples are not supported)");
          ExprPtr inner = parse_expr();
          if (is_op(",")) {  // a tuple behaves as a list here
            ExprPtr l = make(Expr::Op::ListLit, tk.line);
            l->args.push_back(std::move(inner));
            while (is_op(",")) {
              ++i_;
              if (is_op(")")) break;
              l->args.push_back(parse_expr());
            }
            inner = std::move(l);
          }
          expect_op(")");
          return inner;
        }
        if (tk.text == "[") {
          ++i_;
          e->op = Expr::Op::ListLit;
          while (!is_op("]")) {
            e->args.push_back(parse_expr());
            if (!is_op(",")) break;
            ++i_;
          }
          expect_op("]");
          return e;
        }
        if (tk.text == "{") {
          ++i_;
          e->op = Expr::Op::DictLit;
          while (!is_op("}")) {
            e->args.push_back(parse_expr());
            expect_op(":");
            e->args.push_back(parse_expr());
            if (!is_op(",")) break;
            ++i_;
          }
          expect_op("}");
          return e;
        }
        break;
      default: break;
    }
    error("expected an expression" + describe());
  }

  std::vector<Token> t_;
  size_t i_ = 0;
  const std::string& name_;
  int max_depth_;
  int depth_ = 0;
  int loop_depth_ = 0;  // for loops around the statement being parsed (break/continue)
};

// ---------------------------------------------------------------------------------------------
// Renderer

struct BreakSignal {};
struct ContinueSignal {};

class Renderer {
 public:
  Renderer(const std::string& name, const TemplateLimits& limits) : name_(name), limits_(limits) {}

  std::string render(const Body& body, const ojson& context) {
    frames_.emplace_back();
    if (context.is_object())
      for (auto it = context.begin(); it != context.end(); ++it)
        frames_.back()[it.key()] = from_json(it.value());
    std::string out;
    exec(body, out);
    return out;
  }

 private:
  [[noreturn]] void error(int line, const std::string& what) const {
    fail("{}: line {}: {}", name_, line, what);
  }

  void check_size(size_t bytes, int line) const {
    if (bytes > limits_.max_output_bytes)
      error(line, fmt::format("output or value exceeds the limit of {} bytes", limits_.max_output_bytes));
  }

  void append(std::string& out, const std::string& s, int line) {
    out += s;
    check_size(out.size(), line);
  }

  struct DepthGuard {
    Renderer& r;
    DepthGuard(Renderer& renderer, int line) : r(renderer) {
      if (++r.depth_ > r.limits_.max_depth * 4)
        r.error(line, fmt::format("evaluation nested deeper than {} levels", r.limits_.max_depth * 4));
    }
    ~DepthGuard() { --r.depth_; }
  };

  Value lookup(const std::string& name) const {
    for (auto it = frames_.rbegin(); it != frames_.rend(); ++it) {
      auto f = it->find(name);
      if (f != it->end()) return f->second;
    }
    return Value();
  }

  void exec(const Body& body, std::string& out) {
    for (const auto& n : body) exec(*n, out);
  }

  void exec(const Node& n, std::string& out) {
    DepthGuard guard(*this, n.line);
    switch (n.kind) {
      case Node::Kind::Text: append(out, n.text, n.line); return;
      case Node::Kind::Output: append(out, to_str(eval(*n.expr)), n.line); return;
      case Node::Kind::If:
        for (const auto& [cond, body] : n.branches)
          if (truthy(eval(*cond))) {
            exec(body, out);
            return;
          }
        exec(n.else_body, out);
        return;
      case Node::Kind::Set: {
        Value v = eval(*n.expr);
        if (n.attr.empty()) {
          frames_.back()[n.targets[0]] = std::move(v);
          return;
        }
        Value ns = lookup(n.targets[0]);
        if (ns.kind != Value::Kind::Dict || !ns.dict->is_namespace)
          error(n.line, fmt::format("cannot set attribute '{}' of '{}': only namespace() objects "
                                    "can be changed", n.attr, n.targets[0]));
        ns.dict->set(n.attr, std::move(v));
        return;
      }
      case Node::Kind::SetBlock: {
        std::string captured;
        exec(n.body, captured);
        frames_.back()[n.targets[0]] = Value::str(std::move(captured));
        return;
      }
      case Node::Kind::Break: throw BreakSignal{};
      case Node::Kind::Continue: throw ContinueSignal{};
      case Node::Kind::For: exec_for(n, out); return;
    }
  }

  void count_iteration(int line) {
    if (++iterations_ > limits_.max_loop_iterations)
      error(line, fmt::format("more than {} loop iterations", limits_.max_loop_iterations));
  }

  void bind_targets(const Node& n, const Value& item, std::unordered_map<std::string, Value>& frame) {
    if (n.targets.size() == 1) {
      frame[n.targets[0]] = item;
      return;
    }
    if (item.kind != Value::Kind::List || item.list->size() != n.targets.size())
      error(n.line, fmt::format("cannot unpack a {} into {} loop variables", kind_name(item), n.targets.size()));
    for (size_t k = 0; k < n.targets.size(); ++k) frame[n.targets[k]] = (*item.list)[k];
  }

  void exec_for(const Node& n, std::string& out) {
    const Value seq = eval(*n.expr);
    List items = iterate(seq, n.line);
    if (n.filter) {
      List kept;
      for (const Value& item : items) {
        count_iteration(n.line);
        frames_.emplace_back();
        bind_targets(n, item, frames_.back());
        const bool keep = truthy(eval(*n.filter));
        frames_.pop_back();
        if (keep) kept.push_back(item);
      }
      items = std::move(kept);
    }
    if (items.empty()) {
      exec(n.else_body, out);
      return;
    }
    const int64_t len = static_cast<int64_t>(items.size());
    for (int64_t k = 0; k < len; ++k) {
      count_iteration(n.line);
      frames_.emplace_back();
      auto& frame = frames_.back();
      bind_targets(n, items[static_cast<size_t>(k)], frame);
      Value loop = Value::make_dict();
      loop.dict->set("index", Value::integer(k + 1));
      loop.dict->set("index0", Value::integer(k));
      loop.dict->set("revindex", Value::integer(len - k));
      loop.dict->set("revindex0", Value::integer(len - k - 1));
      loop.dict->set("first", Value::boolean(k == 0));
      loop.dict->set("last", Value::boolean(k == len - 1));
      loop.dict->set("length", Value::integer(len));
      loop.dict->set("previtem", k > 0 ? items[static_cast<size_t>(k - 1)] : Value());
      loop.dict->set("nextitem", k + 1 < len ? items[static_cast<size_t>(k + 1)] : Value());
      frame["loop"] = std::move(loop);
      bool stop = false;
      try {
        exec(n.body, out);
      } catch (const BreakSignal&) {
        stop = true;
      } catch (const ContinueSignal&) {
      }
      frames_.pop_back();
      if (stop) break;
    }
  }

  List iterate(const Value& v, int line) const {
    switch (v.kind) {
      case Value::Kind::List: return *v.list;
      case Value::Kind::Dict: {
        List keys;
        for (const auto& [k, e] : v.dict->items) keys.push_back(Value::str(k));
        return keys;
      }
      case Value::Kind::String: {
        List chars;
        for (size_t k = 0; k < v.s.size();) {  // one UTF-8 character at a time
          size_t len = 1;
          const unsigned char c = static_cast<unsigned char>(v.s[k]);
          if (c >= 0xF0) len = 4;
          else if (c >= 0xE0) len = 3;
          else if (c >= 0xC0) len = 2;
          chars.push_back(Value::str(v.s.substr(k, len)));
          k += len;
        }
        return chars;
      }
      case Value::Kind::Undefined:
      case Value::Kind::None: return {};
      default: error(line, fmt::format("cannot iterate over a {}", kind_name(v)));
    }
  }

  Value get_item(const Value& obj, const Value& key, int line) const {
    if (obj.kind == Value::Kind::Dict) {
      if (key.kind != Value::Kind::String) return Value();
      const Value* v = obj.dict->find(key.s);
      return v ? *v : Value();
    }
    if (obj.kind == Value::Kind::List || obj.kind == Value::Kind::String) {
      if (key.kind != Value::Kind::Int) return Value();
      const int64_t size = obj.kind == Value::Kind::List ? static_cast<int64_t>(obj.list->size())
                                                         : static_cast<int64_t>(obj.s.size());
      int64_t k = key.i < 0 ? key.i + size : key.i;
      if (k < 0 || k >= size) return Value();
      return obj.kind == Value::Kind::List ? (*obj.list)[static_cast<size_t>(k)]
                                           : Value::str(obj.s.substr(static_cast<size_t>(k), 1));
    }
    return Value();
  }

  Value eval(const Expr& e) {
    DepthGuard guard(*this, e.line);
    switch (e.op) {
      case Expr::Op::Literal: return e.literal;
      case Expr::Op::Name: return lookup(e.name);
      case Expr::Op::Attr: {
        const Value obj = eval(*e.args[0]);
        if (obj.kind == Value::Kind::List && !e.name.empty() && std::isdigit(static_cast<unsigned char>(e.name[0])))
          return get_item(obj, Value::integer(std::stoll(e.name)), e.line);
        return get_item(obj, Value::str(e.name), e.line);
      }
      case Expr::Op::Index: return get_item(eval(*e.args[0]), eval(*e.args[1]), e.line);
      case Expr::Op::Slice: return slice(eval(*e.args[0]), eval(*e.args[1]), eval(*e.args[2]),
                                         eval(*e.args[3]), e.line);
      case Expr::Op::Call: return call(e);
      case Expr::Op::Filter: return filter(e);
      case Expr::Op::Test: {
        const bool r = test(e);
        return Value::boolean(e.negated ? !r : r);
      }
      case Expr::Op::Not: return Value::boolean(!truthy(eval(*e.args[0])));
      case Expr::Op::Neg:
      case Expr::Op::Pos: {
        const Value v = eval(*e.args[0]);
        if (v.kind == Value::Kind::Int) return Value::integer(e.op == Expr::Op::Neg ? -v.i : v.i);
        if (v.kind == Value::Kind::Float) return Value::real(e.op == Expr::Op::Neg ? -v.f : v.f);
        error(e.line, fmt::format("bad operand type for unary minus or plus: {}", kind_name(v)));
      }
      case Expr::Op::And: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? eval(*e.args[1]) : a;
      }
      case Expr::Op::Or: {
        Value a = eval(*e.args[0]);
        return truthy(a) ? a : eval(*e.args[1]);
      }
      case Expr::Op::Cond: return truthy(eval(*e.args[0])) ? eval(*e.args[1]) : eval(*e.args[2]);
      case Expr::Op::ListLit: {
        List l;
        for (const auto& a : e.args) l.push_back(eval(*a));
        return Value::make_list(std::move(l));
      }
      case Expr::Op::DictLit: {
        Value d = Value::make_dict();
        for (size_t k = 0; k + 1 < e.args.size(); k += 2) {
          const Value key = eval(*e.args[k]);
          if (key.kind != Value::Kind::String) error(e.line, "dict keys must be strings");
          d.dict->set(key.s, eval(*e.args[k + 1]));
        }
        return d;
      }
      case Expr::Op::Binary: return binary(e);
    }
    return Value();
  }

  Value slice(const Value& obj, const Value& a, const Value& b, const Value& c, int line) const {
    auto bound = [&](const Value& v, int64_t def) -> int64_t {
      if (v.kind == Value::Kind::Undefined || v.kind == Value::Kind::None) return def;
      if (v.kind != Value::Kind::Int) error(line, "slice indices must be integers");
      return v.i;
    };
    int64_t size;
    if (obj.kind == Value::Kind::List) size = static_cast<int64_t>(obj.list->size());
    else if (obj.kind == Value::Kind::String) size = static_cast<int64_t>(obj.s.size());
    else error(line, fmt::format("cannot slice a {}", kind_name(obj)));
    const int64_t step = bound(c, 1);
    if (step == 0) error(line, "slice step cannot be zero");
    auto norm = [&](int64_t k, int64_t lo, int64_t hi) {
      if (k < 0) k += size;
      return std::clamp(k, lo, hi);
    };
    int64_t start, stop;
    if (step > 0) {
      start = norm(bound(a, 0), 0, size);
      stop = norm(bound(b, size), 0, size);
    } else {
      start = norm(bound(a, size - 1), -1, size - 1);
      stop = b.kind == Value::Kind::Undefined || b.kind == Value::Kind::None ? -1 : norm(b.i, -1, size - 1);
    }
    List l;
    std::string s;
    for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
      if (obj.kind == Value::Kind::List) l.push_back((*obj.list)[static_cast<size_t>(k)]);
      else s += obj.s[static_cast<size_t>(k)];
    }
    return obj.kind == Value::Kind::List ? Value::make_list(std::move(l)) : Value::str(std::move(s));
  }

  Value binary(const Expr& e) {
    const std::string& op = e.name;
    const Value a = eval(*e.args[0]);
    const Value b = eval(*e.args[1]);
    if (op == "==") return Value::boolean(equal(a, b));
    if (op == "!=") return Value::boolean(!equal(a, b));
    if (op == "in" || op == "not in") {
      bool found = false;
      if (b.kind == Value::Kind::String) {
        if (a.kind != Value::Kind::String) error(e.line, "'in <string>' needs a string on the left");
        found = b.s.find(a.s) != std::string::npos;
      } else if (b.kind == Value::Kind::List) {
        for (const Value& x : *b.list) found = found || equal(a, x);
      } else if (b.kind == Value::Kind::Dict) {
        found = a.kind == Value::Kind::String && b.dict->find(a.s) != nullptr;
      } else if (b.kind != Value::Kind::Undefined && b.kind != Value::Kind::None) {
        error(e.line, fmt::format("'in' needs a string, list or dict on the right, not a {}", kind_name(b)));
      }
      return Value::boolean(op == "in" ? found : !found);
    }
    if (op == "<" || op == ">" || op == "<=" || op == ">=") {
      int c;
      if (a.is_number() && b.is_number()) c = a.number() < b.number() ? -1 : a.number() > b.number() ? 1 : 0;
      else if (a.kind == Value::Kind::String && b.kind == Value::Kind::String) c = a.s.compare(b.s);
      else error(e.line, fmt::format("cannot compare a {} with a {}", kind_name(a), kind_name(b)));
      return Value::boolean(op == "<" ? c < 0 : op == ">" ? c > 0 : op == "<=" ? c <= 0 : c >= 0);
    }
    if (op == "~") {
      std::string s = to_str(a) + to_str(b);
      check_size(s.size(), e.line);
      return Value::str(std::move(s));
    }
    if (op == "+") {
      if (a.kind == Value::Kind::String && b.kind == Value::Kind::String) {
        check_size(a.s.size() + b.s.size(), e.line);
        return Value::str(a.s + b.s);
      }
      if (a.kind == Value::Kind::List && b.kind == Value::Kind::List) {
        check_size(a.list->size() + b.list->size(), e.line);
        List l = *a.list;
        l.insert(l.end(), b.list->begin(), b.list->end());
        return Value::make_list(std::move(l));
      }
    }
    if (op == "*" && ((a.kind == Value::Kind::String && b.kind == Value::Kind::Int) ||
                      (a.kind == Value::Kind::Int && b.kind == Value::Kind::String))) {
      const std::string& s = a.kind == Value::Kind::String ? a.s : b.s;
      const int64_t times = std::max<int64_t>(0, a.kind == Value::Kind::Int ? a.i : b.i);
      if (times > 0 && s.size() > limits_.max_output_bytes / static_cast<size_t>(times))
        check_size(limits_.max_output_bytes + 1, e.line);
      std::string r;
      for (int64_t k = 0; k < times; ++k) r += s;
      return Value::str(std::move(r));
    }
    if (!a.is_number() || !b.is_number())
      error(e.line, fmt::format("unsupported operand types for {}: {} and {}", op, kind_name(a), kind_name(b)));
    const bool ints = a.kind != Value::Kind::Float && b.kind != Value::Kind::Float;
    const double x = a.number(), y = b.number();
    const int64_t xi = a.kind == Value::Kind::Bool ? a.b : a.i, yi = b.kind == Value::Kind::Bool ? b.b : b.i;
    if (op == "+") return ints ? Value::integer(xi + yi) : Value::real(x + y);
    if (op == "-") return ints ? Value::integer(xi - yi) : Value::real(x - y);
    if (op == "*") return ints ? Value::integer(xi * yi) : Value::real(x * y);
    if (op == "/") {
      if (y == 0) error(e.line, "division by zero");
      return Value::real(x / y);
    }
    if (op == "//" || op == "%") {
      if (y == 0) error(e.line, "division by zero");
      if (ints) {
        int64_t q = xi / yi, r = xi % yi;
        if (r != 0 && ((r < 0) != (yi < 0))) {
          --q;
          r += yi;
        }
        return Value::integer(op == "//" ? q : r);
      }
      const double q = std::floor(x / y);
      return Value::real(op == "//" ? q : x - q * y);
    }
    if (op == "**") {
      if (ints && yi >= 0 && yi < 64) {
        const double r = std::pow(x, y);
        if (std::abs(r) < 9.2e18) return Value::integer(static_cast<int64_t>(r));
      }
      return Value::real(std::pow(x, y));
    }
    error(e.line, fmt::format("unknown operator {}", op));
  }

  struct Args {
    std::vector<Value> pos;
    std::vector<std::pair<std::string, Value>> kw;
    const Value* get(size_t i, const char* name) const {
      if (i < pos.size()) return &pos[i];
      for (const auto& [k, v] : kw)
        if (k == name) return &v;
      return nullptr;
    }
  };

  Args eval_args(const Expr& e, size_t first) {
    Args a;
    for (size_t k = first; k < e.args.size(); ++k) a.pos.push_back(eval(*e.args[k]));
    for (const auto& [k, v] : e.kwargs) a.kw.emplace_back(k, eval(*v));
    return a;
  }

  static std::string strip_chars(const std::string& s, const std::string& chars, bool left, bool right) {
    size_t b = 0, e = s.size();
    auto is_strip = [&](char c) { return chars.empty() ? is_space(c) || c == '\f' || c == '\v' : chars.find(c) != std::string::npos; };
    if (left) while (b < e && is_strip(s[b])) ++b;
    if (right) while (e > b && is_strip(s[e - 1])) --e;
    return s.substr(b, e - b);
  }
  static std::string lower(std::string s) {
    for (char& c : s) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    return s;
  }
  static std::string upper(std::string s) {
    for (char& c : s) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    return s;
  }
  static std::string capitalize(const std::string& s) {
    std::string r = lower(s);
    if (!r.empty()) r[0] = static_cast<char>(std::toupper(static_cast<unsigned char>(r[0])));
    return r;
  }
  static std::string title(const std::string& s) {
    std::string r = s;
    bool start = true;
    for (char& c : r) {
      const unsigned char u = static_cast<unsigned char>(c);
      if (std::isalpha(u)) {
        c = static_cast<char>(start ? std::toupper(u) : std::tolower(u));
        start = false;
      } else {
        start = !std::isdigit(u) && u < 0x80;
      }
    }
    return r;
  }

  std::string string_arg(const Args& a, size_t i, const char* name, int line, const char* fn) const {
    const Value* v = a.get(i, name);
    if (v == nullptr || v->kind != Value::Kind::String)
      error(line, fmt::format("{}() needs a string argument '{}'", fn, name));
    return v->s;
  }

  Value call_method(const Value& obj, const std::string& m, const Args& a, int line) {
    if (obj.kind == Value::Kind::String) {
      const std::string& s = obj.s;
      if (m == "strip" || m == "lstrip" || m == "rstrip") {
        const Value* c = a.get(0, "chars");
        const std::string chars = c && c->kind == Value::Kind::String ? c->s : "";
        return Value::str(strip_chars(s, chars, m != "rstrip", m != "lstrip"));
      }
      if (m == "upper") return Value::str(upper(s));
      if (m == "lower") return Value::str(lower(s));
      if (m == "title") return Value::str(title(s));
      if (m == "capitalize") return Value::str(capitalize(s));
      if (m == "startswith") return Value::boolean(s.rfind(string_arg(a, 0, "prefix", line, m.c_str()), 0) == 0);
      if (m == "endswith") {
        const std::string x = string_arg(a, 0, "suffix", line, m.c_str());
        return Value::boolean(s.size() >= x.size() && s.compare(s.size() - x.size(), x.size(), x) == 0);
      }
      if (m == "replace") return Value::str(replace(s, string_arg(a, 0, "old", line, "replace"),
                                                    string_arg(a, 1, "new", line, "replace"), line));
      if (m == "find") return Value::integer(static_cast<int64_t>(s.find(string_arg(a, 0, "sub", line, "find"))));
      if (m == "split") {
        const Value* sep = a.get(0, "sep");
        List parts;
        if (sep == nullptr || sep->kind == Value::Kind::None) {
          std::istringstream in(s);
          std::string w;
          while (in >> w) parts.push_back(Value::str(w));
        } else {
          if (sep->kind != Value::Kind::String || sep->s.empty()) error(line, "split() needs a non-empty separator");
          size_t p = 0;
          for (;;) {
            const size_t q = s.find(sep->s, p);
            parts.push_back(Value::str(s.substr(p, q == std::string::npos ? std::string::npos : q - p)));
            if (q == std::string::npos) break;
            p = q + sep->s.size();
          }
        }
        return Value::make_list(std::move(parts));
      }
    }
    if (obj.kind == Value::Kind::Dict) {
      if (m == "items") {
        List l;
        for (const auto& [k, v] : obj.dict->items) l.push_back(Value::make_list({Value::str(k), v}));
        return Value::make_list(std::move(l));
      }
      if (m == "keys" || m == "values") {
        List l;
        for (const auto& [k, v] : obj.dict->items) l.push_back(m == "keys" ? Value::str(k) : v);
        return Value::make_list(std::move(l));
      }
      if (m == "get") {
        const Value* k = a.get(0, "key");
        if (k && k->kind == Value::Kind::String)
          if (const Value* v = obj.dict->find(k->s)) return *v;
        const Value* d = a.get(1, "default");
        return d ? *d : Value::none();
      }
    }
    error(line, fmt::format("a {} has no method '{}'", kind_name(obj), m));
  }

  std::string replace(const std::string& s, const std::string& from, const std::string& to, int line) const {
    if (from.empty()) return s;
    std::string r;
    size_t p = 0;
    for (;;) {
      const size_t q = s.find(from, p);
      if (q == std::string::npos) break;
      r.append(s, p, q - p);
      r += to;
      check_size(r.size(), line);
      p = q + from.size();
    }
    r.append(s, p, std::string::npos);
    return r;
  }

  Value call(const Expr& e) {
    const Expr& callee = *e.args[0];
    if (callee.op == Expr::Op::Attr) {
      const Value obj = eval(*callee.args[0]);
      return call_method(obj, callee.name, eval_args(e, 1), e.line);
    }
    if (callee.op != Expr::Op::Name) error(e.line, "only named functions and methods can be called");
    const std::string& fn = callee.name;
    const Args a = eval_args(e, 1);
    if (fn == "raise_exception") {
      const Value* msg = a.get(0, "message");
      fail("{}: the template refused the conversation: {}", name_, msg ? to_str(*msg) : "(no message)");
    }
    if (fn == "namespace" || fn == "dict") {
      Value d = Value::make_dict();
      d.dict->is_namespace = fn == "namespace";
      for (const auto& [k, v] : a.kw) d.dict->set(k, v);
      return d;
    }
    if (fn == "range") {
      int64_t start = 0, stop = 0, step = 1;
      auto as_int = [&](size_t k) {
        if (a.pos[k].kind != Value::Kind::Int) error(e.line, "range() needs integers");
        return a.pos[k].i;
      };
      if (a.pos.size() == 1) stop = as_int(0);
      else if (a.pos.size() >= 2) {
        start = as_int(0);
        stop = as_int(1);
        if (a.pos.size() >= 3) step = as_int(2);
      } else error(e.line, "range() needs 1 to 3 arguments");
      if (step == 0) error(e.line, "range() step cannot be zero");
      List l;
      for (int64_t k = start; step > 0 ? k < stop : k > stop; k += step) {
        if (static_cast<int64_t>(l.size()) >= limits_.max_loop_iterations)
          error(e.line, fmt::format("range() longer than {} items", limits_.max_loop_iterations));
        l.push_back(Value::integer(k));
      }
      return Value::make_list(std::move(l));
    }
    if (fn == "strftime_now") {
      const std::string f = string_arg(a, 0, "format", e.line, "strftime_now");
      const std::time_t t = std::time(nullptr);
      std::tm tm{};
      localtime_r(&t, &tm);
      char buf[256];
      const size_t n = std::strftime(buf, sizeof buf, f.c_str(), &tm);
      return Value::str(std::string(buf, n));
    }
    const Value v = lookup(fn);
    if (v.is_undefined()) error(e.line, fmt::format("'{}' is undefined", fn));
    error(e.line, fmt::format("'{}' is not callable", fn));
  }

  Value filter(const Expr& e) {
    const Value v = eval(*e.args[0]);
    const Args a = eval_args(e, 1);
    const std::string& f = e.name;
    auto need_string = [&]() -> const std::string& {
      if (v.kind != Value::Kind::String) error(e.line, fmt::format("filter '{}' needs a string, got a {}", f, kind_name(v)));
      return v.s;
    };
    if (f == "trim") return Value::str(strip_chars(v.kind == Value::Kind::String ? v.s : to_str(v), "", true, true));
    if (f == "capitalize") return Value::str(capitalize(to_str(v)));
    if (f == "upper") return Value::str(upper(to_str(v)));
    if (f == "lower") return Value::str(lower(to_str(v)));
    if (f == "title") return Value::str(title(to_str(v)));
    if (f == "string") return Value::str(to_str(v));
    if (f == "safe" || f == "e" || f == "escape" || f == "forceescape") {
      if (f == "safe") return v;
      std::string r;
      for (char c : to_str(v)) {
        switch (c) {
          case '&': r += "&amp;"; break;
          case '<': r += "&lt;"; break;
          case '>': r += "&gt;"; break;
          case '"': r += "&#34;"; break;
          case '\'': r += "&#39;"; break;
          default: r += c;
        }
      }
      return Value::str(std::move(r));
    }
    if (f == "length" || f == "count") {
      if (v.kind == Value::Kind::String) return Value::integer(static_cast<int64_t>(v.s.size()));
      if (v.kind == Value::Kind::List) return Value::integer(static_cast<int64_t>(v.list->size()));
      if (v.kind == Value::Kind::Dict) return Value::integer(static_cast<int64_t>(v.dict->items.size()));
      if (v.is_undefined()) return Value::integer(0);
      error(e.line, fmt::format("a {} has no length", kind_name(v)));
    }
    if (f == "tojson") {
      const Value* ind = a.get(0, "indent");
      int indent = -1;
      if (ind && ind->kind == Value::Kind::Int) indent = static_cast<int>(std::clamp<int64_t>(ind->i, 0, 16));
      std::string out;
      to_json_text(v, indent, 0, out);
      check_size(out.size(), e.line);
      return Value::str(std::move(out));
    }
    if (f == "default" || f == "d") {
      const Value* def = a.get(0, "default_value");
      const Value* boolean = a.get(1, "boolean");
      const bool use = v.is_undefined() || (boolean && truthy(*boolean) && !truthy(v));
      return use ? (def ? *def : Value::str("")) : v;
    }
    if (f == "join") {
      const Value* sep = a.get(0, "d");
      const std::string s = sep ? to_str(*sep) : "";
      std::string r;
      List items = iterate(v, e.line);
      for (size_t k = 0; k < items.size(); ++k) {
        if (k) r += s;
        r += to_str(items[k]);
        check_size(r.size(), e.line);
      }
      return Value::str(std::move(r));
    }
    if (f == "first" || f == "last") {
      List items = iterate(v, e.line);
      if (items.empty()) return Value();
      return f == "first" ? items.front() : items.back();
    }
    if (f == "list") return Value::make_list(iterate(v, e.line));
    if (f == "reverse") {
      if (v.kind == Value::Kind::String) return Value::str(std::string(v.s.rbegin(), v.s.rend()));
      List items = iterate(v, e.line);
      std::reverse(items.begin(), items.end());
      return Value::make_list(std::move(items));
    }
    if (f == "items") {
      if (v.kind != Value::Kind::Dict) error(e.line, "filter 'items' needs a dict");
      return call_method(v, "items", {}, e.line);
    }
    if (f == "replace") return Value::str(replace(need_string(), string_arg(a, 0, "old", e.line, "replace"),
                                                  string_arg(a, 1, "new", e.line, "replace"), e.line));
    if (f == "int") {
      if (v.kind == Value::Kind::Int) return v;
      if (v.kind == Value::Kind::Float) return Value::integer(static_cast<int64_t>(v.f));
      if (v.kind == Value::Kind::Bool) return Value::integer(v.b);
      if (v.kind == Value::Kind::String) {
        try {
          return Value::integer(std::stoll(v.s));
        } catch (const std::exception&) {
        }
      }
      return Value::integer(0);
    }
    if (f == "float") {
      if (v.is_number()) return Value::real(v.number());
      if (v.kind == Value::Kind::String) return Value::real(std::strtod(v.s.c_str(), nullptr));
      return Value::real(0);
    }
    if (f == "abs") {
      if (v.kind == Value::Kind::Int) return Value::integer(v.i < 0 ? -v.i : v.i);
      if (v.kind == Value::Kind::Float) return Value::real(std::abs(v.f));
      error(e.line, "filter 'abs' needs a number");
    }
    if (f == "selectattr" || f == "rejectattr") {
      const Value* attr = a.get(0, "attr");
      if (attr == nullptr || attr->kind != Value::Kind::String) error(e.line, fmt::format("{}() needs an attribute name", f));
      List out;
      for (const Value& item : iterate(v, e.line)) {
        const Value field = get_item(item, *attr, e.line);
        bool r;
        if (a.pos.size() < 2) {
          r = truthy(field);
        } else {
          if (a.pos[1].kind != Value::Kind::String) error(e.line, fmt::format("{}() needs a test name", f));
          r = apply_test(a.pos[1].s, field, std::vector<Value>(a.pos.begin() + 2, a.pos.end()), e.line);
        }
        if (r == (f == "selectattr")) out.push_back(item);
      }
      return Value::make_list(std::move(out));
    }
    if (f == "map") {
      const Value* attr = a.get(99, "attribute");
      List out;
      for (const Value& item : iterate(v, e.line)) {
        if (attr) out.push_back(get_item(item, *attr, e.line));
        else if (!a.pos.empty() && a.pos[0].kind == Value::Kind::String) {
          Expr fake;
          fake.op = Expr::Op::Filter;
          fake.name = a.pos[0].s;
          fake.line = e.line;
          auto lit = std::make_unique<Expr>();
          lit->literal = item;
          fake.args.push_back(std::move(lit));
          out.push_back(filter(fake));
        } else {
          error(e.line, "map() needs attribute= or a filter name");
        }
      }
      return Value::make_list(std::move(out));
    }
    if (f == "indent") {
      const Value* w = a.get(0, "width");
      const std::string pad(static_cast<size_t>(w && w->kind == Value::Kind::Int ? std::clamp<int64_t>(w->i, 0, 64) : 4), ' ');
      const Value* first = a.get(1, "first");
      std::string r = first && truthy(*first) ? pad : "";
      for (char c : need_string()) {
        r += c;
        if (c == '\n') r += pad;
      }
      check_size(r.size(), e.line);
      return Value::str(std::move(r));
    }
    error(e.line, fmt::format("unknown filter '{}'", f));
  }

  bool apply_test(const std::string& t, const Value& v, const std::vector<Value>& args, int line) const {
    auto arg = [&](size_t k) -> const Value& {
      if (k >= args.size()) error(line, fmt::format("test '{}' needs an argument", t));
      return args[k];
    };
    if (t == "defined") return !v.is_undefined();
    if (t == "undefined") return v.is_undefined();
    if (t == "none") return v.kind == Value::Kind::None;
    if (t == "string") return v.kind == Value::Kind::String;
    if (t == "number") return v.kind == Value::Kind::Int || v.kind == Value::Kind::Float;
    if (t == "integer") return v.kind == Value::Kind::Int;
    if (t == "float") return v.kind == Value::Kind::Float;
    if (t == "boolean") return v.kind == Value::Kind::Bool;
    if (t == "true") return v.kind == Value::Kind::Bool && v.b;
    if (t == "false") return v.kind == Value::Kind::Bool && !v.b;
    if (t == "mapping") return v.kind == Value::Kind::Dict;
    if (t == "sequence") return v.kind == Value::Kind::List || v.kind == Value::Kind::String || v.kind == Value::Kind::Dict;
    if (t == "iterable") return v.kind == Value::Kind::List || v.kind == Value::Kind::String || v.kind == Value::Kind::Dict;
    if (t == "callable") return false;
    if (t == "even" || t == "odd") {
      if (v.kind != Value::Kind::Int) error(line, fmt::format("test '{}' needs an integer", t));
      return (v.i % 2 == 0) == (t == "even");
    }
    if (t == "divisibleby") {
      const Value& d = arg(0);
      if (v.kind != Value::Kind::Int || d.kind != Value::Kind::Int || d.i == 0)
        error(line, "test 'divisibleby' needs integers (and a non-zero divisor)");
      return v.i % d.i == 0;
    }
    if (t == "equalto" || t == "eq" || t == "==" || t == "sameas") return equal(v, arg(0));
    if (t == "ne" || t == "!=") return !equal(v, arg(0));
    if (t == "in") {
      const Value& c = arg(0);
      if (c.kind == Value::Kind::List) {
        for (const Value& x : *c.list) if (equal(v, x)) return true;
        return false;
      }
      if (c.kind == Value::Kind::String && v.kind == Value::Kind::String) return c.s.find(v.s) != std::string::npos;
      if (c.kind == Value::Kind::Dict && v.kind == Value::Kind::String) return c.dict->find(v.s) != nullptr;
      return false;
    }
    if (t == "lt" || t == "gt" || t == "le" || t == "ge" || t == "lessthan" || t == "greaterthan") {
      const Value& o = arg(0);
      if (!v.is_number() || !o.is_number()) error(line, fmt::format("test '{}' needs numbers", t));
      const double x = v.number(), y = o.number();
      if (t == "lt" || t == "lessthan") return x < y;
      if (t == "gt" || t == "greaterthan") return x > y;
      return t == "le" ? x <= y : x >= y;
    }
    error(line, fmt::format("unknown test '{}'", t));
  }

  bool test(const Expr& e) {
    const Value v = eval(*e.args[0]);
    std::vector<Value> args;
    for (size_t k = 1; k < e.args.size(); ++k) args.push_back(eval(*e.args[k]));
    return apply_test(e.name, v, args, e.line);
  }

  const std::string& name_;
  const TemplateLimits& limits_;
  std::vector<std::unordered_map<std::string, Value>> frames_;
  int64_t iterations_ = 0;
  int depth_ = 0;
};

}  // namespace

struct ChatTemplate::Impl {
  std::string source, name;
  TemplateLimits limits;
  Body body;
};

ChatTemplate::ChatTemplate(const std::string& source, const std::string& name,
                           const TemplateLimits& limits)
    : impl_(std::make_unique<Impl>()) {
  impl_->source = source;
  impl_->name = name;
  impl_->limits = limits;
  SPARSA_CHECK(source.size() <= limits.max_output_bytes, "{}: the template is {} bytes; the limit is {}",
               name, source.size(), limits.max_output_bytes);
  Lexer lexer(impl_->source, impl_->name);
  Parser parser(lexer.run(), impl_->name, limits.max_depth);
  impl_->body = parser.parse_template();
}

ChatTemplate::~ChatTemplate() = default;
ChatTemplate::ChatTemplate(ChatTemplate&&) noexcept = default;
ChatTemplate& ChatTemplate::operator=(ChatTemplate&&) noexcept = default;

const std::string& ChatTemplate::source() const { return impl_->source; }

std::string ChatTemplate::render(const nlohmann::ordered_json& context) const {
  Renderer r(impl_->name, impl_->limits);
  try {
    return r.render(impl_->body, context);
  } catch (const BreakSignal&) {
    fail("{}: 'break' outside a loop", impl_->name);
  } catch (const ContinueSignal&) {
    fail("{}: 'continue' outside a loop", impl_->name);
  }
}

std::optional<ChatTemplate> ChatTemplate::from_model_dir(const std::string& dir) {
  namespace fs = std::filesystem;
  auto read = [](const fs::path& p) {
    std::ifstream in(p, std::ios::binary);
    SPARSA_CHECK(in.good(), "{}: cannot read the file", p.string());
    std::ostringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  const fs::path jinja = fs::path(dir) / "chat_template.jinja";
  if (fs::exists(jinja)) return ChatTemplate(read(jinja), jinja.string());
  const fs::path cfg = fs::path(dir) / "tokenizer_config.json";
  if (!fs::exists(cfg)) return std::nullopt;
  ojson j;
  try {
    j = ojson::parse(read(cfg));
  } catch (const std::exception& e) {
    fail("{}: not valid JSON: {}", cfg.string(), e.what());
  }
  if (!j.is_object() || !j.contains("chat_template")) return std::nullopt;
  const ojson& t = j["chat_template"];
  const std::string name = cfg.string() + " (chat_template)";
  if (t.is_string()) return ChatTemplate(t.get<std::string>(), name);
  if (t.is_array()) {
    for (const auto& e : t)
      if (e.is_object() && e.value("name", "") == "default" && e.contains("template") && e["template"].is_string())
        return ChatTemplate(e["template"].get<std::string>(), name);
  }
  fail("{}: chat_template must be a string or a list with a \"default\" entry", cfg.string());
}

}  // namespace sparsa::pipeline
