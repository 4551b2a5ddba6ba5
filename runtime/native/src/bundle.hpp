// An app bundle (`odlora bundle`, described in runtime/bundle.py): read and verified with the
// same rules as the Python runtime: format version, paths that stay inside the bundle, every
// file's size and sha256, and for an adapter bundle the base it was packed for.
#pragma once

#include <nlohmann/json.hpp>

#include <cstdint>
#include <string>
#include <vector>

namespace odlora {

using Json = nlohmann::ordered_json;  // ordered: the slot layout's order is the program's input order

constexpr int kBundleVersion = 1;

struct BundledAdapter {
  std::string id;
  std::string path;  // the packed blob, inside the bundle
  bool raw = false;  // prompt_format "raw": trained on raw text, asked without the chat template
};

struct Bundle {
  std::string root;
  std::string kind;  // "base" or "adapters"
  std::string target;
  std::string base_fingerprint;
  Json slots;        // the export's slot spec
  Json export_info;  // base/manifest.json (a base bundle only)
  std::string chat_prefix, chat_suffix;
  std::vector<int64_t> stop_ids;
  std::vector<BundledAdapter> adapters;

  std::string base_dir() const { return root + "/base"; }
};

// Reads `path`/bundle.json and checks everything in it; throws odlora::Error naming the problem.
Bundle open_bundle(const std::string& path);

// An adapter bundle must be for the same base, runtime target and slots as the installed base.
void check_same_base(const Bundle& adapters, const Bundle& base);

// One line of JSON; bytes that are not UTF-8 (a model may stop inside a character) become U+FFFD.
inline std::string dump(const Json& j) { return j.dump(-1, ' ', false, Json::error_handler_t::replace); }

// Parses a JSON file, or throws an Error naming it.
Json read_json(const std::string& path);

}  // namespace odlora
