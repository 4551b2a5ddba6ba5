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
  std::vector<std::string> targets;                   // the slotted projections, in slot order
  std::map<std::string, std::vector<int64_t>> features;  // projection -> (in, out)
  // The fused layout (exporters/projections.py; the manifest's "slot_feed"): per group its fused
  // output width and each slotted member's first column. Empty: the program takes A and B per layer.
  std::map<std::string, int64_t> feed_width;
  std::map<std::string, std::map<std::string, int64_t>> feed_columns;

  // `slot_feed`: the export's "slot_feed", or null for an export with per-layer A and B inputs.
  static SlotSpec from_json(const Json& slots, const Json& slot_feed);
  bool fused() const { return !feed_width.empty(); }
  // A group's slotted members in slot order (formats/slots.py GROUPS, filtered by the targets).
  std::vector<std::string> members(const std::string& group) const;
};

// One adapter (or none: all zeros, exactly the base) as full-rank slot tensors, layer-major.
struct SlotTensors {
  std::map<std::string, std::vector<float>> data;  // name -> layers * rows * cols floats

  static SlotTensors zeros(const SlotSpec& spec);
  // Reads a packed blob; checks its format, that it was packed for `base_fingerprint`, and its shapes.
  static SlotTensors read(const std::string& path, const SlotSpec& spec, const std::string& base_fingerprint);

  size_t nbytes() const;
};

// One program input of the fused layout for `layer` (exporters/projections.py): `lora_AT_<group>`
// (in, m·R), each member's Aᵀ in its R columns, or `lora_BT_<group>` (m·R, width), each member's Bᵀ
// at its own output columns, from the slot tensors A (L, m·R, in) and B (L, Σout, R). `shape`
// receives the input's shape (the program takes it as a batch of one).
std::vector<float> transposed_input(const SlotTensors& t, const SlotSpec& spec, const std::string& name, int64_t layer,
                                    std::vector<int64_t>& shape);

}  // namespace odlora
