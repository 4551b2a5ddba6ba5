import CryptoKit
import Foundation

/// An `odlora bundle` directory (see runtime/bundle.py for the format), verified as the Python and
/// native runtimes verify it: format version, paths inside the bundle, every file's sha256, and for
/// an adapter bundle the base it was packed for.
public struct AppBundle {
    public struct Manifest: Decodable {
        public struct Adapter: Decodable {
            public let id: String
            public let file: String
            /// "chat" (asked inside the chat template) or "raw" (`personalize --format raw`); absent: "chat".
            public let prompt_format: String?
        }
        public struct Prompt: Decodable {
            public let chat_prefix: String
            public let chat_suffix: String
            public let stop_ids: [Int]
        }
        public struct FileEntry: Decodable { public let sha256: String; public let size: Int }
        public let format: String
        public let format_version: Int
        public let kind: String
        public let target: String
        /// An ExecuTorch base's delegate ("xnnpack", "coreml", ...), which the app must link; nil for other targets.
        public let delegate: String?
        public let base_fingerprint: String
        public let max_seq_len: Int
        public let prompt: Prompt
        public let adapters: [Adapter]
        public let files: [String: FileEntry]
    }

    public enum Failure: Error, CustomStringConvertible {
        case invalid(String)
        public var description: String { if case .invalid(let message) = self { return message }; return "" }
    }

    public let root: URL
    public let manifest: Manifest

    public init(at root: URL) throws {
        self.root = root
        let data = try Data(contentsOf: root.appendingPathComponent("bundle.json"))
        manifest = try JSONDecoder().decode(Manifest.self, from: data)
        guard manifest.format == "odlora-bundle" else { throw Failure.invalid("\(root.path): not an odlora bundle") }
        guard manifest.format_version == 1 else {
            throw Failure.invalid("\(root.path): unknown bundle format version \(manifest.format_version)")
        }
        for (name, entry) in manifest.files {
            let url = try file(name)
            let bytes = try Data(contentsOf: url, options: .mappedIfSafe)
            let digest = SHA256.hash(data: bytes).map { String(format: "%02x", $0) }.joined()
            guard bytes.count == entry.size, digest == entry.sha256 else {
                throw Failure.invalid("\(root.path): file \(name) does not match its sha256 in bundle.json")
            }
        }
    }

    /// root/name, refusing absolute paths, `..` and links that lead out of the bundle.
    public func file(_ name: String) throws -> URL {
        let parts = name.split(separator: "/")
        guard !name.hasPrefix("/"), !parts.contains(".."), !name.contains("\\") else {
            throw Failure.invalid("\(root.path): path '\(name)' leaves the bundle")
        }
        let url = root.appendingPathComponent(name).resolvingSymlinksInPath()
        guard url.path.hasPrefix(root.resolvingSymlinksInPath().path + "/") else {
            throw Failure.invalid("\(root.path): path '\(name)' leaves the bundle (through a link)")
        }
        return url
    }

    /// An adapter bundle must be for this base and runtime target.
    public func checkAdapters(_ other: AppBundle) throws {
        guard other.manifest.base_fingerprint == manifest.base_fingerprint, other.manifest.target == manifest.target else {
            throw Failure.invalid("\(other.root.path): packed for a different base than the installed bundle")
        }
    }
}
