import OdloraKit
import SwiftUI

/// The sample app's one screen: pick an adapter (or the base), ask, read the answer. The base
/// bundle ships in the app (a folder reference named "bundle"); adapter bundles downloaded later
/// go to Application Support/adapters.
struct ContentView: View {
    @State private var runtime: CoreMLRuntime?
    @State private var adapter = "base"
    @State private var prompt = ""
    @State private var answer = "Loading the base…"

    var body: some View {
        VStack(alignment: .leading, spacing: 12) {
            Picker("Adapter", selection: $adapter) {
                ForEach(["base"] + (runtime?.adapterIds ?? []), id: \.self) { Text($0) }
            }
            TextField("Ask something", text: $prompt).textFieldStyle(.roundedBorder)
            Button("Send") { Task { await send() } }.disabled(runtime == nil)
            ScrollView { Text(answer).frame(maxWidth: .infinity, alignment: .leading) }
        }
        .padding()
        .task { await open() }
    }

    private func open() async {
        do {
            let bundle = try AppBundle(at: Bundle.main.url(forResource: "bundle", withExtension: nil)!)
            let rt = try await CoreMLRuntime(bundle: bundle)
            let downloads = FileManager.default.urls(for: .applicationSupportDirectory, in: .userDomainMask)[0]
                .appendingPathComponent("adapters")
            for dir in (try? FileManager.default.contentsOfDirectory(at: downloads, includingPropertiesForKeys: nil)) ?? [] {
                try rt.add(adapterBundle: try AppBundle(at: dir))
            }
            runtime = rt
            answer = ""
        } catch {
            answer = "Cannot open the bundle: \(error)"
        }
    }

    private func send() async {
        guard let runtime else { return }
        do {
            answer = try runtime.generate(prompt, adapter: adapter == "base" ? nil : adapter)
        } catch {
            answer = "Error: \(error)"
        }
    }
}

@main
struct OdloraSampleApp: App {
    var body: some Scene { WindowGroup { ContentView() } }
}
