// The native engine: one bundle's base loaded once, adapters registered by id, and greedy
// generation with any of them (or none) per request. The same contract as the Python runtime's
// ExecuTorch backend (runtime/backends.py, exporters/executorch.py): the program takes the tokens,
// their positions and every layer's slot tensors as inputs; all-zero slots are exactly the base.
#pragma once

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor.h>
#include <pytorch/tokenizers/hf_tokenizer.h>

#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <vector>

#include "bundle.hpp"
#include "slots.hpp"

namespace odlora {

struct Generation {
  std::vector<uint64_t> tokens;  // generated, a stop token excluded
  std::string text;
  size_t prompt_tokens = 0;
  std::string finish_reason;  // "stop" or "length"
  double swap_us = 0;  // finding the adapter's program inputs (built when it was registered)
  double prefill_ms = 0, total_ms = 0;
};

class Engine {
 public:
  // Verifies the base bundle, loads its program once (weights memory-mapped), its tokenizer and
  // every adapter it carries.
  explicit Engine(const std::string& bundle_path);
  ~Engine();

  // Verifies an adapter bundle against the base and registers its adapters.
  void add_adapter_bundle(const std::string& path);
  // Loads a packed blob (checked against the base) as `id`; an id registered again is replaced.
  // `raw`: the adapter was trained on raw prompts (prompt_format "raw"), so it is asked without the template.
  void register_adapter(const std::string& id, const std::string& blob_path, bool raw = false);
  std::vector<std::string> adapter_ids() const;
  const Bundle& bundle() const { return bundle_; }
  int max_seq_len() const { return max_seq_len_; }
  // The ExecuTorch delegate the base program runs on (bundle.json's "delegate"; "xnnpack" before it).
  const std::string& delegate() const { return delegate_; }

  // Prompt token ids: the user's text inside the chat template (`chat`), or the raw text.
  std::vector<uint64_t> encode(const std::string& prompt, bool chat) const;
  // Greedy generation from position 0 with `adapter` ("" or "base": no adapter). `chat` unset: the
  // prompt format the adapter was trained with (the chat template for the base and chat adapters).
  Generation generate(const std::string& prompt, const std::string& adapter, int max_new_tokens,
                      std::optional<bool> chat = std::nullopt);
  // Logits of the last of `tokens` at positions start.., writing their keys and values to the cache.
  std::vector<float> forward(const std::vector<uint64_t>& tokens, int64_t start, const std::string& adapter);

 private:
  struct LoadedSlots;  // an adapter's slot tensors and the program inputs that view them

  const LoadedSlots& slots_for(const std::string& adapter) const;
  std::vector<float> run(const std::string& method, const std::vector<int64_t>& tokens, int64_t start,
                         size_t row, const LoadedSlots& slots);
  std::vector<float> forward(const std::vector<uint64_t>& tokens, int64_t start, const LoadedSlots& slots);

  Bundle bundle_;
  SlotSpec spec_;
  std::vector<std::pair<std::string, int64_t>> slot_inputs_;  // (slot name, layer) in program input order
  std::unique_ptr<executorch::extension::Module> module_;
  tokenizers::HFTokenizer tokenizer_;
  std::unique_ptr<LoadedSlots> zeros_;
  std::map<std::string, std::unique_ptr<LoadedSlots>> adapters_;
  std::set<std::string> raw_adapters_;  // ids trained on raw prompts
  int64_t chunk_ = 1, max_seq_len_ = 0, vocab_ = 0;
  std::string delegate_;
};

}  // namespace odlora
