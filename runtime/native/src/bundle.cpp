#include "bundle.hpp"

#include <filesystem>
#include <fstream>

#include "errors.hpp"
#include "sha256.hpp"

namespace fs = std::filesystem;

namespace odlora {

Json read_json(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error(path + ": cannot open");
  try {
    return Json::parse(in);
  } catch (const Json::exception& e) {
    throw Error(path + ": invalid JSON (" + e.what() + ")");
  }
}

namespace {

const char* kManifest = "bundle.json";

// root/name, refusing absolute paths, `..` and links that lead out of the bundle.
std::string safe_path(const std::string& root, const std::string& name) {
  const std::string where = root + "/" + kManifest + ": path '" + name + "'";
  fs::path relative(name);
  bool climbs = false;
  for (const auto& part : relative) climbs |= part == "..";
  if (name.empty() || relative.is_absolute() || climbs || name.find('\\') != std::string::npos)
    throw Error(where + " leaves the bundle");
  const fs::path base = fs::weakly_canonical(root);
  const fs::path full = fs::weakly_canonical(fs::path(root) / relative);
  auto [end, _] = std::mismatch(base.begin(), base.end(), full.begin(), full.end());
  if (end != base.end()) throw Error(where + " leaves the bundle (through a link)");
  return (fs::path(root) / relative).string();
}

void verify_files(const std::string& root, const Json& files) {
  if (!files.is_object() || files.empty()) throw Error(root + "/" + kManifest + ": 'files' must list the bundle's files");
  for (const auto& [name, entry] : files.items()) {
    const std::string path = safe_path(root, name);
    if (!fs::is_regular_file(path)) throw Error(root + ": file " + name + " listed in bundle.json is missing");
    if (fs::file_size(path) != entry.value("size", uint64_t{0}) || sha256_file(path) != entry.value("sha256", ""))
      throw Error(root + ": file " + name + " does not match its sha256 in bundle.json (corrupt or changed)");
  }
}

const Json& field(const Json& manifest, const char* name, const std::string& where) {
  if (!manifest.contains(name)) throw Error(where + ": field '" + name + "' is missing");
  return manifest.at(name);
}

}  // namespace

Bundle open_bundle(const std::string& path) {
  const std::string where = path + "/" + kManifest;
  if (!fs::is_regular_file(where)) throw Error(path + ": not an odlora bundle (no bundle.json)");
  const Json m = read_json(where);
  if (!m.is_object() || m.value("format", "") != "odlora-bundle") throw Error(where + ": not an odlora bundle manifest");
  if (!m.contains("format_version") || m["format_version"] != kBundleVersion)
    throw Error(where + ": unknown bundle format version " + (m.contains("format_version") ? m["format_version"].dump() : "null") +
                " (this runtime reads version " + std::to_string(kBundleVersion) + ")");
  try {
    Bundle b;
    b.root = path;
    b.kind = field(m, "kind", where).get<std::string>();
    b.target = field(m, "target", where).get<std::string>();
    b.base_fingerprint = field(m, "base_fingerprint", where).get<std::string>();
    b.slots = field(m, "slots", where);
    verify_files(path, field(m, "files", where));
    for (const auto& a : field(m, "adapters", where)) {
      const std::string file = a.at("file").get<std::string>();
      const std::string blob = safe_path(path, file);
      if (!m["files"].contains(file)) throw Error(where + ": adapter file " + file + " is not listed in files");
      const std::string format = a.value("prompt_format", "chat");
      if (format != "chat" && format != "raw")
        throw Error(where + ": adapter " + file + ": unknown prompt_format '" + format + "' (chat or raw)");
      b.adapters.push_back({a.at("id").get<std::string>(), blob, format == "raw"});
    }
    const Json& prompt = field(m, "prompt", where);
    b.chat_prefix = prompt.at("chat_prefix").get<std::string>();
    b.chat_suffix = prompt.at("chat_suffix").get<std::string>();
    b.stop_ids = prompt.at("stop_ids").get<std::vector<int64_t>>();
    if (b.kind == "base") {
      b.export_info = read_json(b.base_dir() + "/manifest.json");
      if (b.export_info.value("base_fingerprint", "") != b.base_fingerprint)
        throw Error(path + ": base/manifest.json's fingerprint differs from bundle.json's");
    } else if (b.kind != "adapters") {
      throw Error(where + ": unknown bundle kind '" + b.kind + "'");
    }
    return b;
  } catch (const Json::exception& e) {
    throw Error(where + ": malformed manifest (" + e.what() + ")");
  }
}

void check_same_base(const Bundle& adapters, const Bundle& base) {
  const char* field = adapters.base_fingerprint != base.base_fingerprint ? "base_fingerprint"
                      : adapters.target != base.target                   ? "target"
                      : adapters.slots != base.slots                     ? "slots"
                                                                         : nullptr;
  if (field)
    throw Error(adapters.root + ": packed for a different base than the installed bundle " + base.root + " (" + field +
                " differs); bundle the adapters against the app's export");
}

}  // namespace odlora
