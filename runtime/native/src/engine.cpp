#include "engine.hpp"

#include <executorch/runtime/backend/interface.h>
#include <executorch/runtime/backend/options.h>
#include <executorch/runtime/platform/platform.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <regex>

#include "errors.hpp"

namespace odlora {

using executorch::aten::ScalarType;
using executorch::extension::from_blob;
using executorch::extension::Module;
using executorch::extension::TensorPtr;
using executorch::runtime::EValue;

struct Engine::LoadedSlots {
  SlotTensors tensors;                         // an older export's inputs view these per layer
  std::vector<std::vector<float>> fused;       // the fused layout's inputs, built once: a swap is a lookup
  std::vector<TensorPtr> inputs;               // one per program slot input, in its order

  LoadedSlots(SlotTensors t, const SlotSpec& spec, const std::vector<std::pair<std::string, int64_t>>& order)
      : tensors(std::move(t)) {
    fused.reserve(order.size());
    for (const auto& [name, layer] : order) {
      if (spec.fused()) {
        std::vector<int64_t> shape;
        fused.push_back(transposed_input(tensors, spec, name, layer, shape));
        inputs.push_back(from_blob(fused.back().data(), {1, int(shape[0]), int(shape[1])}, ScalarType::Float));
      } else {
        const auto& s = spec.shape.at(name);
        float* layer_data = tensors.data.at(name).data() + layer * s[1] * s[2];
        inputs.push_back(from_blob(layer_data, {int(s[1]), int(s[2])}, ScalarType::Float));
      }
    }
    if (spec.fused()) tensors.data.clear();  // not held twice
  }
};

namespace {

double ms_since(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count();
}

// "lora_A_qkv.3" -> ("lora_A_qkv", 3)
std::pair<std::string, int64_t> split_input(const std::string& name) {
  const auto dot = name.rfind('.');
  return {name.substr(0, dot), std::stoll(name.substr(dot + 1))};
}

// ExecuTorch's log, without its info lines (CPU probing on every start): an app shows errors only.
void log_errors_only(et_timestamp_t, et_pal_log_level_t level, const char* file, const char*, size_t line,
                     const char* message, size_t length) {
  if (level == kInfo || level == kDebug) return;
  std::fprintf(stderr, "executorch %c %s:%zu] %.*s\n", char(level), file, line, int(length), message);
}

// XNNPACK packs each linear's weights for every method that uses them: with its weight cache the
// decode and prefill methods share one packed copy instead of two.
void share_packed_weights() {
  executorch::runtime::BackendOptions<1> options;
  options.set_option("weight_cache_enabled", true);
  if (executorch::runtime::set_option("XnnpackBackend", options.view()) != executorch::runtime::Error::Ok)
    std::fprintf(stderr, "odlora: XNNPACK's weight cache is not available; each method packs its own weights\n");
}

// The delegate the program was lowered to (the manifest's "backend") must be linked into this
// build: ExecuTorch registers a backend as "<Name>Backend" when its library is linked.
void check_backend(const std::string& backend, const std::string& dir) {
  std::string linked;
  for (size_t i = 0; i < executorch::runtime::get_num_registered_backends(); ++i) {
    auto name = executorch::runtime::get_backend_name(i);
    if (!name.ok()) continue;
    std::string id = *name, lower = id;
    std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
    if (lower.rfind(backend, 0) == 0) return;
    linked += (linked.empty() ? "" : ", ") + id;
  }
  throw Error(dir + ": lowered to ExecuTorch's " + backend + " delegate, which this build does not include (it has " +
              linked + ")");
}

}  // namespace

Engine::Engine(const std::string& bundle_path) : bundle_(open_bundle(bundle_path)) {
  static const bool quiet = executorch::runtime::register_pal(
      executorch::runtime::PalImpl::create(log_errors_only, __FILE__));
  (void)quiet;
  share_packed_weights();
  if (bundle_.kind != "base") throw Error(bundle_path + ": an adapter bundle has no base; open the app's base bundle");
  if (bundle_.target != "executorch")
    throw Error(bundle_path + ": a " + bundle_.target + " bundle; the native runtime runs ExecuTorch bundles");
  const Json& info = bundle_.export_info;
  const Json& et = info.at("executorch");
  spec_ = SlotSpec::from_json(info.at("slots"), et.value("slot_feed", Json()));
  for (const auto& name : et.at("inputs")) {
    const std::string input = name.get<std::string>();
    if (input != "tokens" && input != "input_pos") slot_inputs_.push_back(split_input(input));
  }
  chunk_ = et.at("methods").at("prefill").get<int64_t>();
  max_seq_len_ = info.at("max_seq_len").get<int64_t>();
  vocab_ = info.at("config").at("vocab_size").get<int64_t>();
  const std::string dir = bundle_.base_dir() + "/";
  delegate_ = et.value("backend", std::string("xnnpack"));
  check_backend(delegate_, dir);
  // A delegate that compiles the weights into its own blob (all but XNNPACK) writes no data file.
  std::vector<std::string> data;
  if (et.contains("data") && !et.at("data").is_null()) data.push_back(dir + et.at("data").get<std::string>());
  // Shared arenas: the export keeps one KV cache for both methods (share_mutable_buffers).
  module_ = std::make_unique<Module>(dir + et.at("program").get<std::string>(), data, Module::LoadMode::Mmap, nullptr,
                                     nullptr, nullptr, /*share_memory_arenas=*/true);
  for (const char* method : {"forward", "prefill"})
    if (module_->load_method(method) != executorch::runtime::Error::Ok)
      throw Error(dir + ": cannot load method '" + method + "' of the program");
  if (tokenizer_.load(dir + "tokenizer/tokenizer.json") != tokenizers::Error::Ok)
    throw Error(dir + "tokenizer/tokenizer.json: cannot load the tokenizer");
  zeros_ = std::make_unique<LoadedSlots>(SlotTensors::zeros(spec_), spec_, slot_inputs_);
  for (const auto& a : bundle_.adapters) register_adapter(a.id, a.path, a.raw);
}

Engine::~Engine() = default;

void Engine::add_adapter_bundle(const std::string& path) {
  const Bundle extra = open_bundle(path);
  check_same_base(extra, bundle_);
  for (const auto& a : extra.adapters) register_adapter(a.id, a.path, a.raw);
}

// The rule of ondevice_lora/formats/adapter_ids.py: an id a request can name and a file can carry.
static void check_adapter_id(const std::string& id) {
  static const std::regex pattern("[A-Za-z0-9][A-Za-z0-9_.-]{0,63}");
  if (id == "base" || !std::regex_match(id, pattern))
    throw Error("adapter id '" + id + "': use 1-64 letters, digits, '_', '-' or '.', starting with a letter or "
                "digit, and not `base` (`base` names the model without adapters; ':' and '+' write blends)");
}

void Engine::register_adapter(const std::string& id, const std::string& blob_path, bool raw) {
  check_adapter_id(id);
  auto slots = SlotTensors::read(blob_path, spec_, bundle_.base_fingerprint);
  adapters_[id] = std::make_unique<LoadedSlots>(std::move(slots), spec_, slot_inputs_);
  if (raw) raw_adapters_.insert(id);
  else raw_adapters_.erase(id);
}

std::vector<std::string> Engine::adapter_ids() const {
  std::vector<std::string> ids;
  for (const auto& [id, _] : adapters_) ids.push_back(id);
  return ids;
}

const Engine::LoadedSlots& Engine::slots_for(const std::string& adapter) const {
  if (adapter.empty() || adapter == "base") return *zeros_;
  auto it = adapters_.find(adapter);
  if (it == adapters_.end()) throw Error("unknown adapter '" + adapter + "' (registered: " + Json(adapter_ids()).dump() + ")");
  return *it->second;
}

std::vector<uint64_t> Engine::encode(const std::string& prompt, bool chat) const {
  const std::string text = chat ? bundle_.chat_prefix + prompt + bundle_.chat_suffix : prompt;
  auto ids = tokenizer_.encode(text, /*bos=*/0, /*eos=*/0);
  if (!ids.ok()) throw Error("cannot tokenise the prompt");
  return ids.get();
}

std::vector<float> Engine::run(const std::string& method, const std::vector<int64_t>& tokens, int64_t start,
                               size_t row, const LoadedSlots& slots) {
  std::vector<int64_t> token_data(tokens), positions(tokens.size());
  for (size_t i = 0; i < positions.size(); ++i) positions[i] = start + int64_t(i);
  const int T = int(tokens.size());
  auto token_tensor = from_blob(token_data.data(), {1, T}, ScalarType::Long);
  auto position_tensor = from_blob(positions.data(), {T}, ScalarType::Long);
  std::vector<EValue> inputs{*token_tensor, *position_tensor};
  for (const auto& t : slots.inputs) inputs.emplace_back(*t);
  auto outputs = module_->execute(method, inputs);
  if (!outputs.ok()) throw Error("the program's '" + method + "' method failed (error " + std::to_string(int(outputs.error())) + ")");
  // Copied out at once: with shared arenas the next call may reuse the output's memory.
  const float* logits = outputs.get()[0].toTensor().const_data_ptr<float>();
  return std::vector<float>(logits + row * vocab_, logits + (row + 1) * vocab_);
}

std::vector<float> Engine::forward(const std::vector<uint64_t>& tokens, int64_t start, const std::string& adapter) {
  return forward(tokens, start, slots_for(adapter));
}

// The prompt in chunks of the prefill method's fixed length, as the Python runtime does: whole
// chunks, then the last chunk right-aligned (recomputing a few positions), or a short prompt padded
// (the pad positions are written but never read), or one token at a time near the cache's end.
std::vector<float> Engine::forward(const std::vector<uint64_t>& tokens, int64_t start, const LoadedSlots& slots) {
  const int64_t T = tokens.size(), C = chunk_;
  if (T == 0 || start < 0 || start + T > max_seq_len_)
    throw Error("positions " + std::to_string(start) + ".." + std::to_string(start + T - 1) + " are outside this export's " +
                std::to_string(max_seq_len_));
  std::vector<int64_t> ids(tokens.begin(), tokens.end());
  auto slice = [&](int64_t from, int64_t to) { return std::vector<int64_t>(ids.begin() + from, ids.begin() + to); };
  if (T == 1) return run("forward", ids, start, 0, slots);
  std::vector<float> last;
  int64_t done = 0;
  for (; T - done >= C; done += C) last = run("prefill", slice(done, done + C), start + done, C - 1, slots);
  const int64_t rest = T - done;
  if (rest == 0) return last;
  if (T >= C) return run("prefill", slice(T - C, T), start + T - C, C - 1, slots);
  if (start + C <= max_seq_len_) {
    std::vector<int64_t> padded(ids);
    padded.resize(C, 0);
    return run("prefill", padded, start, rest - 1, slots);
  }
  for (int64_t i = 0; i < T; ++i) last = run("forward", slice(i, i + 1), start + i, 0, slots);
  return last;
}

Generation Engine::generate(const std::string& prompt, const std::string& adapter, int max_new_tokens,
                            std::optional<bool> chat) {
  const auto started = std::chrono::steady_clock::now();
  const LoadedSlots& slots = slots_for(adapter);
  Generation g;
  g.swap_us = ms_since(started) * 1000;
  if (max_new_tokens < 1) throw Error("max_new_tokens must be >= 1");
  const std::vector<uint64_t> ids = encode(prompt, chat.value_or(!raw_adapters_.count(adapter)));
  g.prompt_tokens = ids.size();
  const int64_t n = ids.size();
  if (n >= max_seq_len_)
    throw Error("the prompt has " + std::to_string(n) + " tokens; this export's --max-seq-len " + std::to_string(max_seq_len_) +
                " leaves room for at most " + std::to_string(max_seq_len_ - 1) + " before generating");
  std::vector<float> logits = forward(ids, 0, slots);
  g.prefill_ms = ms_since(started);
  g.finish_reason = "length";
  uint64_t previous = ids.back();
  for (int64_t pos = n; pos < std::min(max_seq_len_, n + max_new_tokens); ++pos) {
    const uint64_t token = std::max_element(logits.begin(), logits.end()) - logits.begin();  // first maximum
    if (std::find(bundle_.stop_ids.begin(), bundle_.stop_ids.end(), int64_t(token)) != bundle_.stop_ids.end()) {
      g.finish_reason = "stop";
      break;
    }
    g.tokens.push_back(token);
    auto piece = tokenizer_.decode(previous, token);
    if (piece.ok()) g.text += piece.get();
    previous = token;
    if (pos + 1 < max_seq_len_ && int64_t(g.tokens.size()) < max_new_tokens) logits = forward({token}, pos, slots);
  }
  g.total_ms = ms_since(started);
  return g;
}

}  // namespace odlora
