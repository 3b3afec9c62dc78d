#include "sparsa/runtime/engine.h"

#include <algorithm>

#include "sparsa/core/error.h"

namespace sparsa {

Engine::Engine(std::unique_ptr<model::Model> model, const EngineOptions& options)
    : model_(std::move(model)), pool_(options.threads) {
  SPARSA_CHECK(model_ != nullptr, "Engine: no model given");
  SPARSA_CHECK(options.max_sequences >= 1 && options.max_sequences <= 4096,
               "the number of concurrent sequences must be in [1, 4096], got {}",
               options.max_sequences);
  SPARSA_CHECK(options.context >= 0, "the context must be non-negative, got {}", options.context);
  const int64_t model_ctx = model_->config().max_context();
  context_ = options.context == 0 ? model_ctx : std::min(options.context, model_ctx);
  slots_.reserve(static_cast<size_t>(options.max_sequences));
  for (int i = 0; i < options.max_sequences; ++i)
    slots_.push_back(std::make_unique<model::KvCache>(model_->config(), context_, options.kv_cache));
  in_use_.assign(slots_.size(), false);
  // Handed out lowest first (free_ is used as a stack).
  for (int i = options.max_sequences - 1; i >= 0; --i) free_.push_back(i);
}

int Engine::acquire() {
  if (free_.empty()) return -1;
  const int slot = free_.back();
  free_.pop_back();
  in_use_[static_cast<size_t>(slot)] = true;
  slots_[static_cast<size_t>(slot)]->clear();
  return slot;
}

void Engine::release(int slot) {
  SPARSA_CHECK(slot >= 0 && slot < max_sequences() && in_use_[static_cast<size_t>(slot)],
               "Engine::release: slot {} is not in use", slot);
  in_use_[static_cast<size_t>(slot)] = false;
  free_.push_back(slot);
}

int64_t Engine::length(int slot) const {
  SPARSA_CHECK(slot >= 0 && slot < max_sequences(), "Engine: no slot {}", slot);
  return slots_[static_cast<size_t>(slot)]->size();
}

void Engine::step(std::span<const Item> items) {
  batch_.clear();
  for (const Item& it : items) {
    SPARSA_CHECK(it.slot >= 0 && it.slot < max_sequences() && in_use_[static_cast<size_t>(it.slot)],
                 "Engine::step: slot {} is not in use", it.slot);
    batch_.push_back({it.tokens, slots_[static_cast<size_t>(it.slot)].get(), it.logits});
  }
  model::forward_batch(*model_, batch_, ws_, pool_);
}

}  // namespace sparsa
