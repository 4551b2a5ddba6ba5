// Adapter slots on the native side: the export's slot layout, and one adapter's slot tensors read
// from its packed blob (safetensors, written by `odlora adapter pack` for ExecuTorch; see
// exporters/executorch.py: stored at the adapter's own rank, zero-padded here to the slots' rank).
#pragma once

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "bundle.hpp"

namespace odlora {

struct SlotSpec {
  int max_rank = 0;
  int n_layers = 0;
  std::vector<std::string> names;                     // layout order: lora_A_qkv, lora_B_qkv, ...
  std::map<std::string, std::vector<int64_t>> shape;  // name -> (layers, rows, cols)

  static SlotSpec from_json(const Json& slots);
};

// One adapter (or none: all zeros, exactly the base) as full-rank slot tensors, layer-major.
struct SlotTensors {
  std::map<std::string, std::vector<float>> data;  // name -> layers * rows * cols floats

  static SlotTensors zeros(const SlotSpec& spec);
  // Reads a packed blob; checks its format, that it was packed for `base_fingerprint`, and its shapes.
  static SlotTensors read(const std::string& path, const SlotSpec& spec, const std::string& base_fingerprint);

  size_t nbytes() const;
};

}  // namespace odlora
