// odlora-native: the native runtime from the command line.
//
//   odlora-native BUNDLE --prompt TEXT [--adapter ID] [--max-new-tokens N] [--chat | --no-chat] [--json]
//   odlora-native BUNDLE --requests FILE      one JSON request a line: {"prompt", "adapter", "max_new_tokens", "chat"}
//   odlora-native BUNDLE --verify             check the bundle and its adapters, print what it holds
//   ... [--adapters ADAPTER_BUNDLE]...        adapter bundles downloaded later, checked against BUNDLE
//
// The base loads once; each request names its adapter, and is asked the way that adapter was
// trained (bundle.json's prompt_format) unless --chat/--no-chat or the request's "chat" says
// otherwise. Errors print one line and exit 2.
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "engine.hpp"
#include "errors.hpp"

namespace {

struct Options {
  std::string bundle, prompt, adapter, requests;
  std::vector<std::string> adapter_bundles;
  int max_new_tokens = 128;
  std::optional<bool> chat;  // unset: each adapter's own prompt format
  bool json = false, verify = false;
};

const char* kUsage =
    "usage: odlora-native BUNDLE (--prompt TEXT | --requests FILE | --verify) [--adapter ID]\n"
    "                     [--adapters ADAPTER_BUNDLE]... [--max-new-tokens N] [--chat | --no-chat] [--json]\n";

Options parse(int argc, char** argv) {
  Options o;
  auto value = [&](int& i) -> std::string {
    if (i + 1 >= argc) throw odlora::Error(std::string(argv[i]) + " needs a value");
    return argv[++i];
  };
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--prompt") o.prompt = value(i);
    else if (arg == "--adapter") o.adapter = value(i);
    else if (arg == "--adapters") o.adapter_bundles.push_back(value(i));
    else if (arg == "--requests") o.requests = value(i);
    else if (arg == "--max-new-tokens") o.max_new_tokens = std::stoi(value(i));
    else if (arg == "--no-chat") o.chat = false;
    else if (arg == "--chat") o.chat = true;
    else if (arg == "--json") o.json = true;
    else if (arg == "--verify") o.verify = true;
    else if (arg == "-h" || arg == "--help") { std::cout << kUsage; std::exit(0); }
    else if (arg.rfind("--", 0) == 0 || !o.bundle.empty()) throw odlora::Error("unexpected argument '" + arg + "'");
    else o.bundle = arg;
  }
  if (o.bundle.empty() || (o.prompt.empty() && o.requests.empty() && !o.verify))
    throw odlora::Error("give a BUNDLE and --prompt, --requests or --verify");
  return o;
}

odlora::Json to_json(const odlora::Generation& g, const std::string& adapter) {
  return {{"adapter", adapter.empty() ? "base" : adapter}, {"text", g.text}, {"token_ids", g.tokens},
          {"prompt_tokens", g.prompt_tokens}, {"finish_reason", g.finish_reason},
          {"swap_us", g.swap_us}, {"prefill_ms", g.prefill_ms}, {"total_ms", g.total_ms}};
}

// One request a line, answered in order on stdout; a bad request answers {"error"} and the rest go on.
void serve_requests(odlora::Engine& engine, const std::string& path, std::optional<bool> chat) {
  std::ifstream in(path);
  if (!in) throw odlora::Error(path + ": cannot open");
  std::string line;
  for (int number = 1; std::getline(in, line); ++number) {
    if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
    try {
      const auto request = odlora::Json::parse(line);
      const std::string adapter = request.value("adapter", "");
      const auto g = engine.generate(request.at("prompt").get<std::string>(), adapter,
                                     request.value("max_new_tokens", 128),
                                     request.contains("chat") ? std::optional<bool>(request.at("chat").get<bool>()) : chat);
      std::cout << odlora::dump(to_json(g, adapter)) << std::endl;
    } catch (const std::exception& e) {
      std::cout << odlora::dump({{"error", path + ":" + std::to_string(number) + ": " + e.what()}}) << std::endl;
    }
  }
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const Options o = parse(argc, argv);
    odlora::Engine engine(o.bundle);
    for (const auto& path : o.adapter_bundles) engine.add_adapter_bundle(path);
    if (o.verify) {
      std::cout << o.bundle << ": ok (" << engine.bundle().target << ", adapters: " << odlora::dump(engine.adapter_ids())
                << ")" << std::endl;
    } else if (!o.requests.empty()) {
      serve_requests(engine, o.requests, o.chat);
    } else {
      const auto g = engine.generate(o.prompt, o.adapter, o.max_new_tokens, o.chat);
      std::cout << (o.json ? odlora::dump(to_json(g, o.adapter)) : g.text) << std::endl;
    }
    return 0;
  } catch (const std::exception& e) {
    std::cerr << "odlora-native: error: " << e.what() << "\n" << kUsage;
    return 2;
  }
}
