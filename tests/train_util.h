// Helpers shared by the training tests: a token stream from the repository's README and models/tiny
// pruned to 50% by magnitude.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "sparsa/core/mapped_file.h"
#include "sparsa/runtime/perplexity.h"
#include "sparsa/runtime/tokenizer.h"
#include "sparsa/train/trainer.h"
#include "test_util.h"

namespace sparsa::testing {

/// README.md tokenized with models/tiny's tokenizer (one document).
inline std::vector<int32_t> readme_tokens() {
  const Tokenizer tok = Tokenizer::from_file(tiny_model_dir() + "/tokenizer.json");
  return tokenize_corpus(tok, {read_text_file(source_dir() + "/README.md")}, 1);
}

/// models/tiny with every decoder projection pruned to 50% by magnitude.
inline train::Model half_pruned_tiny() {
  train::Model m = train::Model::load(tiny_model_dir());
  for (const train::ParamTensor& t : m.tensors()) {
    if (!t.linear) continue;
    std::vector<uint8_t> keep(static_cast<size_t>(t.numel), 1);
    train::magnitude_prune(m.params() + t.offset, keep.data(), t.numel, 0.5);
  }
  return m;
}

}  // namespace sparsa::testing
