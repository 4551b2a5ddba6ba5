import Foundation

/// A safetensors file: an 8-byte little-endian header length, a JSON header, then the raw tensors.
struct Safetensors {
    struct Tensor { let dtype: String; let shape: [Int]; let bytes: Data }
    let metadata: [String: String]
    let tensors: [String: Tensor]

    static func read(_ url: URL) throws -> Safetensors {
        let data = try Data(contentsOf: url, options: .mappedIfSafe)
        guard data.count >= 8 else { throw AppBundle.Failure.invalid("\(url.path): not a safetensors file") }
        let length = data.prefix(8).withUnsafeBytes { Int($0.loadUnaligned(as: UInt64.self).littleEndian) }
        guard length <= data.count - 8,
              let header = try JSONSerialization.jsonObject(with: data.subdata(in: 8..<(8 + length))) as? [String: Any]
        else { throw AppBundle.Failure.invalid("\(url.path): bad safetensors header") }
        var tensors: [String: Tensor] = [:]
        for (name, value) in header where name != "__metadata__" {
            guard let info = value as? [String: Any], let dtype = info["dtype"] as? String, let shape = info["shape"] as? [Int],
                  let offsets = info["data_offsets"] as? [Int], offsets.count == 2, offsets[1] <= data.count - 8 - length
            else { throw AppBundle.Failure.invalid("\(url.path): bad entry \(name)") }
            tensors[name] = Tensor(dtype: dtype, shape: shape, bytes: data.subdata(in: (8 + length + offsets[0])..<(8 + length + offsets[1])))
        }
        return Safetensors(metadata: header["__metadata__"] as? [String: String] ?? [:], tensors: tensors)
    }
}
