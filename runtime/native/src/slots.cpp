#include "slots.hpp"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <fstream>

#include "errors.hpp"

namespace odlora {

SlotSpec SlotSpec::from_json(const Json& slots, const Json& slot_feed) {
  SlotSpec spec;
  spec.max_rank = slots.at("max_rank").get<int>();
  spec.n_layers = slots.at("n_layers").get<int>();
  for (const auto& [name, shape] : slots.at("layout").items()) {
    spec.names.push_back(name);
    spec.shape[name] = shape.get<std::vector<int64_t>>();
  }
  spec.targets = slots.at("targets").get<std::vector<std::string>>();
  for (const auto& [projection, in_out] : slots.at("features").items())
    spec.features[projection] = in_out.get<std::vector<int64_t>>();
  if (!slot_feed.is_null()) {
    for (const auto& [group, feed] : slot_feed.items()) {
      spec.feed_width[group] = feed.at("width").get<int64_t>();
      for (const auto& [member, column] : feed.at("columns").items()) spec.feed_columns[group][member] = column.get<int64_t>();
    }
  }
  return spec;
}

std::vector<std::string> SlotSpec::members(const std::string& group) const {
  static const std::map<std::string, std::vector<std::string>> groups = {
      {"qkv", {"q_proj", "k_proj", "v_proj"}}, {"o", {"o_proj"}}, {"gate_up", {"gate_proj", "up_proj"}},
      {"down", {"down_proj"}}};
  std::vector<std::string> present;
  for (const auto& m : groups.at(group))
    if (std::find(targets.begin(), targets.end(), m) != targets.end()) present.push_back(m);
  return present;
}

std::vector<float> transposed_input(const SlotTensors& t, const SlotSpec& spec, const std::string& name, int64_t layer,
                                    std::vector<int64_t>& shape) {
  const bool is_a = name.rfind("lora_AT_", 0) == 0;
  if (!is_a && name.rfind("lora_BT_", 0) != 0) throw Error("unknown slot input '" + name + "'");
  const std::string group = name.substr(8);
  const std::vector<std::string> members = spec.members(group);
  const int64_t R = spec.max_rank, m = int64_t(members.size());
  const auto& a_shape = spec.shape.at("lora_A_" + group);  // (L, m·R, in)
  const auto& b_shape = spec.shape.at("lora_B_" + group);  // (L, Σout, R)
  const float* A = t.data.at("lora_A_" + group).data() + layer * a_shape[1] * a_shape[2];
  const float* B = t.data.at("lora_B_" + group).data() + layer * b_shape[1] * b_shape[2];
  const int64_t in = a_shape[2], width = spec.feed_width.at(group);
  shape = is_a ? std::vector<int64_t>{in, m * R} : std::vector<int64_t>{m * R, width};
  std::vector<float> out(shape[0] * shape[1], 0.0f);
  int64_t row = 0;  // the member's first row of B
  for (int64_t j = 0; j < m; ++j) {
    const int64_t out_features = spec.features.at(members[j])[1], column = spec.feed_columns.at(group).at(members[j]);
    for (int64_t r = 0; r < R; ++r) {
      if (is_a) {
        for (int64_t i = 0; i < in; ++i) out[i * m * R + j * R + r] = A[(j * R + r) * in + i];
      } else {
        for (int64_t o = 0; o < out_features; ++o) out[(j * R + r) * width + column + o] = B[(row + o) * R + r];
      }
    }
    row += out_features;
  }
  return out;
}

SlotTensors SlotTensors::zeros(const SlotSpec& spec) {
  SlotTensors t;
  for (const auto& name : spec.names) {
    const auto& s = spec.shape.at(name);
    t.data[name].assign(s[0] * s[1] * s[2], 0.0f);
  }
  return t;
}

size_t SlotTensors::nbytes() const {
  size_t n = 0;
  for (const auto& [_, values] : data) n += values.size() * sizeof(float);
  return n;
}

namespace {

// IEEE half -> float, exactly (every half is a float): zeros, subnormals, normals, inf and NaN.
float half_to_float(uint16_t h) {
  const uint32_t sign = (h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu, mantissa = h & 0x3ffu, bits;
  if (exponent == 0x1f) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else if (exponent != 0) {
    bits = sign | ((exponent + 112) << 23) | (mantissa << 13);  // rebias 15 -> 127
  } else if (mantissa == 0) {
    bits = sign;
  } else {  // subnormal: m * 2^-24; shift m up to its leading 1
    uint32_t shift = 0;
    while (!(mantissa & 0x400u)) mantissa <<= 1, ++shift;
    bits = sign | ((113 - shift) << 23) | ((mantissa & 0x3ffu) << 13);
  }
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

struct SafetensorsFile {
  Json header;
  std::vector<char> bytes;  // the data section

  // Tensor `name` of `shape` as floats: F16 (what odlora packs) widened, or F32 (older blobs) as is.
  std::vector<float> floats(const std::string& name, const std::vector<int64_t>& shape, const std::string& where) const {
    if (!header.contains(name)) throw Error(where + ": slot tensor " + name + " is missing");
    const Json& info = header[name];
    const auto offsets = info.at("data_offsets").get<std::vector<uint64_t>>();
    const std::string dtype = info.at("dtype").get<std::string>();
    const size_t width = dtype == "F16" ? 2 : dtype == "F32" ? 4 : 0;
    int64_t count = 1;
    for (auto d : shape) count *= d;
    if (width == 0 || info.at("shape").get<std::vector<int64_t>>() != shape || offsets.size() != 2 ||
        offsets[1] > bytes.size() || offsets[0] > offsets[1] || offsets[1] - offsets[0] != count * width)
      throw Error(where + ": slot tensor " + name + " is not F16 or F32 " + Json(shape).dump());
    std::vector<float> out(count);
    const char* src = bytes.data() + offsets[0];
    if (width == 4) {
      std::memcpy(out.data(), src, count * sizeof(float));
    } else {
      for (int64_t i = 0; i < count; ++i) {
        uint16_t h;
        std::memcpy(&h, src + 2 * i, 2);
        out[i] = half_to_float(h);
      }
    }
    return out;
  }
};

SafetensorsFile read_safetensors(const std::string& path) {
  std::ifstream in(path, std::ios::binary | std::ios::ate);
  if (!in) throw Error(path + ": no such packed adapter");
  const uint64_t size = in.tellg();
  in.seekg(0);
  uint64_t header_size = 0;
  in.read(reinterpret_cast<char*>(&header_size), 8);  // little-endian, as every target we build for
  if (!in || header_size > size - 8) throw Error(path + ": not a packed ExecuTorch adapter (bad safetensors header)");
  std::string text(header_size, '\0');
  in.read(text.data(), header_size);
  SafetensorsFile f;
  try {
    f.header = Json::parse(text);
  } catch (const Json::exception& e) {
    throw Error(path + ": not a packed ExecuTorch adapter (" + e.what() + ")");
  }
  f.bytes.resize(size - 8 - header_size);
  in.read(f.bytes.data(), f.bytes.size());
  if (!in) throw Error(path + ": truncated");
  return f;
}

}  // namespace

SlotTensors SlotTensors::read(const std::string& path, const SlotSpec& spec, const std::string& base_fingerprint) {
  const SafetensorsFile f = read_safetensors(path);
  const Json meta = f.header.value("__metadata__", Json::object());
  if (meta.value("format", "") != "odlora-executorch-slots")
    throw Error(path + ": not a packed ExecuTorch adapter (format '" + meta.value("format", "") + "')");
  if (meta.value("base_fingerprint", "") != base_fingerprint)
    throw Error(path + ": packed for base " + meta.value("base_fingerprint", "").substr(0, 19) +
                "..., this export is " + base_fingerprint.substr(0, 19) + "... (a different base)");
  const int R = spec.max_rank;
  const int rank = std::stoi(meta.value("rank", std::to_string(R)));
  if (rank < 1 || rank > R) throw Error(path + ": rank " + std::to_string(rank) + " does not fit slots of rank " + std::to_string(R));
  SlotTensors t = zeros(spec);
  for (const auto& name : spec.names) {
    const auto& s = spec.shape.at(name);  // A: (L, members * R, in), B: (L, out, R)
    const bool is_a = name.rfind("lora_A", 0) == 0;
    const std::vector<int64_t> stored = is_a ? std::vector<int64_t>{s[0], s[1] / R * rank, s[2]}
                                             : std::vector<int64_t>{s[0], s[1], rank};
    const std::vector<float> values = f.floats(name, stored, path);
    const float* src = values.data();
    float* dst = t.data[name].data();
    if (is_a) {  // each member's `rank` rows go to the start of its R rows
      for (int64_t row = 0; row < stored[0] * stored[1]; ++row) {
        const int64_t layer = row / stored[1], member = row % stored[1] / rank, r = row % rank;
        std::memcpy(dst + ((layer * s[1]) + member * R + r) * s[2], src + row * s[2], s[2] * sizeof(float));
      }
    } else {  // each row's `rank` columns go to the start of its R columns
      for (int64_t row = 0; row < s[0] * s[1]; ++row) std::memcpy(dst + row * R, src + row * rank, rank * sizeof(float));
    }
  }
  return t;
}

}  // namespace odlora
