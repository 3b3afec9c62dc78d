#include "sparsa/io/text_data.h"

#include <nlohmann/json.hpp>

#include "sparsa/core/error.h"
#include "sparsa/core/mapped_file.h"

namespace sparsa::io {

namespace {
bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}
}  // namespace

std::vector<std::string> read_documents(const std::string& path) {
  const std::string all = read_text_file(path);
  if (!ends_with(path, ".jsonl") && !ends_with(path, ".ndjson")) {
    SPARSA_CHECK(!all.empty(), "{}: the file is empty", path);
    return {all};
  }
  std::vector<std::string> docs;
  size_t line_no = 0, begin = 0;
  while (begin < all.size()) {
    size_t end = all.find('\n', begin);
    if (end == std::string::npos) end = all.size();
    ++line_no;
    const std::string_view line(all.data() + begin, end - begin);
    begin = end + 1;
    if (line.find_first_not_of(" \t\r") == std::string_view::npos) continue;
    nlohmann::json j;
    try {
      j = nlohmann::json::parse(line);
    } catch (const nlohmann::json::exception& e) {
      fail("{}:{}: not valid JSON: {}", path, line_no, e.what());
    }
    SPARSA_CHECK(j.is_object(), "{}:{}: each line must be a JSON object with a \"text\" field",
                 path, line_no);
    auto it = j.find("text");
    SPARSA_CHECK(it != j.end() && it->is_string(), "{}:{}: missing string field \"text\"", path,
                 line_no);
    docs.push_back(it->get<std::string>());
  }
  SPARSA_CHECK(!docs.empty(), "{}: no documents found", path);
  return docs;
}

}  // namespace sparsa::io
