import CoreML
import Foundation
import Tokenizers

/// The Core ML export of a bundle (`odlora export --target coreml`, then `odlora bundle`): one
/// compiled model, loaded once; each request picks an adapter, fed as the model's slot inputs
/// (all zeros: exactly the base). Decodes one token per call, the KV cache in the model's states.
public final class CoreMLRuntime {
    public let bundle: AppBundle
    private let model: MLModel
    private let tokenizer: Tokenizer
    private var adapters: [String: [String: MLMultiArray]] = [:]  // id -> slot input -> fp16 array
    private var rawAdapters: Set<String> = []  // ids trained on raw prompts (prompt_format "raw")
    private let zeros: [String: MLMultiArray]

    public init(bundle: AppBundle) async throws {
        self.bundle = bundle
        guard bundle.manifest.kind == "base", bundle.manifest.target == "coreml" else {
            throw AppBundle.Failure.invalid("\(bundle.root.path): not a Core ML base bundle")
        }
        let package = try bundle.file("base/model.mlpackage")
        let compiled = try await MLModel.compileModel(at: package)  // once per install in a real app: cache it
        model = try MLModel(contentsOf: compiled)
        tokenizer = try await AutoTokenizer.from(modelFolder: try bundle.file("base/tokenizer"))
        var zeros: [String: MLMultiArray] = [:]
        for (name, input) in model.modelDescription.inputDescriptionsByName where name.hasPrefix("lora_") {
            let constraint = input.multiArrayConstraint!
            let array = try MLMultiArray(shape: constraint.shape, dataType: .float16)
            memset(array.dataPointer, 0, array.count * 2)
            zeros[name] = array
        }
        self.zeros = zeros
        for adapter in bundle.manifest.adapters { try register(adapter, from: bundle) }
    }

    public var adapterIds: [String] { adapters.keys.sorted() }

    /// Registers the adapters of a bundle downloaded later, after checking it is for this base.
    public func add(adapterBundle: AppBundle) throws {
        try bundle.checkAdapters(adapterBundle)
        for adapter in adapterBundle.manifest.adapters { try register(adapter, from: adapterBundle) }
    }

    private func register(_ adapter: AppBundle.Manifest.Adapter, from bundle: AppBundle) throws {
        try register(adapter.id, blob: try bundle.file(adapter.file))
        if adapter.prompt_format == "raw" { rawAdapters.insert(adapter.id) } else { rawAdapters.remove(adapter.id) }
    }

    /// A packed Core ML adapter: safetensors, one fp16 tensor per slot input (exporters/coreml.py),
    /// stored at the adapter's own rank r (metadata "rank"; blobs without it are at the inputs' full
    /// rank R) and padded here to the input's shape, zeros elsewhere: member j's r rows of
    /// `lora_A_<g>` [L, m·r, in] go to rows j·R …, and the r columns of `lora_B_<g>` [L, Σout, r] to
    /// the first r of R.
    public func register(_ id: String, blob: URL) throws {
        let tensors = try Safetensors.read(blob)
        guard tensors.metadata["base_fingerprint"] == bundle.manifest.base_fingerprint else {
            throw AppBundle.Failure.invalid("\(blob.path): packed for another base")
        }
        var feeds: [String: MLMultiArray] = [:]
        for (name, zero) in zeros {
            let full = zero.shape.map(\.intValue)  // A: [L, m·R, in]; B: [L, Σout, R]
            let group = name.hasPrefix("lora_A_") ? String(name.dropFirst("lora_A_".count)) : String(name.dropFirst("lora_B_".count))
            guard let b = zeros["lora_B_" + group] else { throw AppBundle.Failure.invalid("\(name): no lora_B_\(group) input") }
            let R = b.shape[2].intValue
            let r = tensors.metadata["rank"].flatMap { Int($0) } ?? R
            let isA = name.hasPrefix("lora_A_")
            let stored = isA ? [full[0], full[1] / R * r, full[2]] : [full[0], full[1], r]
            guard (1...R).contains(r), let tensor = tensors.tensors[name], tensor.dtype == "F16", tensor.shape == stored else {
                throw AppBundle.Failure.invalid("\(blob.path): slot \(name) is missing or not \(stored)")
            }
            let array = try MLMultiArray(shape: zero.shape, dataType: .float16)
            memset(array.dataPointer, 0, array.count * 2)
            let destination = array.dataPointer.bindMemory(to: Float16.self, capacity: array.count)
            tensor.bytes.withUnsafeBytes { raw in
                let source = raw.bindMemory(to: Float16.self).baseAddress!
                if isA {  // blocks of r rows x in, one per (layer, member)
                    let (members, width) = (full[1] / R, full[2])
                    for block in 0..<(full[0] * members) {
                        (destination + block * R * width).update(from: source + block * r * width, count: r * width)
                    }
                } else {  // rows of r values, one per (layer, output)
                    for row in 0..<(full[0] * full[1]) {
                        (destination + row * R).update(from: source + row * r, count: r)
                    }
                }
            }
            feeds[name] = array
        }
        adapters[id] = feeds
    }

    /// Greedy answer to `prompt` with `adapter` (nil: the base), asked the way the adapter was trained:
    /// inside the base's chat template, or as raw text for a `prompt_format` "raw" adapter.
    public func generate(_ prompt: String, adapter: String? = nil, maxNewTokens: Int = 128) throws -> String {
        let p = bundle.manifest.prompt
        let raw = adapter.map { rawAdapters.contains($0) } ?? false
        let ids = tokenizer.encode(text: raw ? prompt : p.chat_prefix + prompt + p.chat_suffix, addSpecialTokens: false)
        let slots = try adapter.map { id in
            guard let feeds = adapters[id] else { throw AppBundle.Failure.invalid("unknown adapter '\(id)'") }
            return feeds
        } ?? zeros
        let state = model.makeState()  // a new KV cache per request
        var logits = try step(ids[0], position: 0, slots: slots, state: state)
        for (position, token) in ids.enumerated().dropFirst() {
            logits = try step(token, position: position, slots: slots, state: state)
        }
        var output: [Int] = []
        for position in ids.count..<min(bundle.manifest.max_seq_len, ids.count + maxNewTokens) {
            let next = argmax(logits)
            if p.stop_ids.contains(next) { break }
            output.append(next)
            logits = try step(next, position: position, slots: slots, state: state)
        }
        return tokenizer.decode(tokens: output)
    }

    private func step(_ token: Int, position: Int, slots: [String: MLMultiArray], state: MLState) throws -> MLMultiArray {
        var features: [String: MLFeatureValue] = slots.mapValues { MLFeatureValue(multiArray: $0) }
        features["tokens"] = MLFeatureValue(multiArray: try MLMultiArray([NSNumber(value: Int32(token))]).reshaped(to: [1, 1]))
        features["input_pos"] = MLFeatureValue(multiArray: try MLMultiArray([NSNumber(value: Int32(position))]))
        let output = try model.prediction(from: try MLDictionaryFeatureProvider(dictionary: features), using: state)
        return output.featureValue(for: "logits")!.multiArrayValue!
    }

    private func argmax(_ logits: MLMultiArray) -> Int {
        let values = logits.dataPointer.bindMemory(to: Float16.self, capacity: logits.count)
        var best = 0
        for i in 1..<logits.count where values[i] > values[best] { best = i }
        return best
    }
}

private extension MLMultiArray {
    func reshaped(to shape: [Int]) throws -> MLMultiArray {
        try MLMultiArray(dataPointer: dataPointer, shape: shape.map { NSNumber(value: $0) }, dataType: dataType,
                         strides: [NSNumber(value: shape.last!), 1])
    }
}
