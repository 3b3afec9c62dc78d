// Text corpora for evaluation and calibration: JSON lines with one {"text": ...} object per
// line, or plain text (the whole file is one document).
//
//   std::vector<std::string> docs = sparsa::io::read_documents("valid.jsonl");
#pragma once

#include <string>
#include <vector>

namespace sparsa::io {

/// Files ending in .jsonl / .json lines are read as JSON lines (blank lines skipped); anything
/// else as plain text. Errors name the file and the line.
std::vector<std::string> read_documents(const std::string& path);

}  // namespace sparsa::io
