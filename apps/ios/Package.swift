// swift-tools-version:5.9
// OdloraKit: the odlora runtime for iOS apps. Two ways to run the base, same bundle format:
//   OdloraKit     Core ML (`odlora export --target coreml`): adapter slots as model inputs, KV cache as states
//   OdloraNative  the native runtime (runtime/native, C++) on ExecuTorch, through an Objective-C++ bridge
import PackageDescription

let package = Package(
    name: "OdloraKit",
    platforms: [.iOS(.v18), .macOS(.v15)],  // stateful Core ML models need Core ML 8
    products: [
        .library(name: "OdloraKit", targets: ["OdloraKit"]),
        .library(name: "OdloraNative", targets: ["OdloraNative"]),
    ],
    dependencies: [
        // Hugging Face tokenizers in Swift: reads the bundle's tokenizer.json.
        .package(url: "https://github.com/huggingface/swift-transformers", from: "0.1.14"),
    ],
    targets: [
        .target(name: "OdloraKit", dependencies: [.product(name: "Tokenizers", package: "swift-transformers")]),
        // Links the ExecuTorch iOS frameworks (executorch, backend_xnnpack, kernels_optimized,
        // kernels_quantized) and runtime/native's sources: see README.md.
        .target(name: "OdloraNative", cxxSettings: [.unsafeFlags(["-std=c++17"])]),
    ]
)
