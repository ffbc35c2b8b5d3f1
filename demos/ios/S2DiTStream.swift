// S2DiT streaming text-to-video on iOS 18 / macOS 15 with Core ML states.
//
// NOT COMPILED OR RUN HERE: written on Linux next to a verified exporter; see README.md.
//
// Inputs: the folder written by `s2dit export coreml --prompt "..."`:
//   S2DiT.mlpackage (functions `denoise` and `write`), VAEDecoder.mlpackage, manifest.json,
//   prompt.f16 (text encoder output, fp16, zero-padded to text_len).
// The loop (manifest "loop"):
//   for chunk c: x = noise; for each t: x0 = denoise(x, t, context, c).x0, then either re-noise
//   x0 to the next t (schedule.sampler "few-step") or take an Euler step with v = (x - x0) / s
//   over schedule.sigmas ("euler"; the last step gives the chunk)
//   write(x0, t = 0, context, c)  -> updates the KV windows / LCHA means / conv frames in place
//   decode each latent frame of x0 with the VAE decoder (its causal history is a state too)

import CoreML
import Foundation

// MARK: - Manifest

struct Manifest: Decodable {
    struct Video: Decodable { let height: Int; let width: Int; let fps: Double }
    struct Latent: Decodable {
        let channels: Int; let height: Int; let width: Int
        let frames_per_chunk: Int
    }
    struct Schedule: Decodable {
        let timesteps: [Float]
        let sampler: String?  // "few-step" (also when absent) or "euler"
        let sigmas: [Float]?  // euler: the noise levels, one more than timesteps (last 0)
    }
    struct Text: Decodable {
        struct PromptFile: Decodable { let file: String; let shape: [Int] }
        let text_len: Int; let text_dim: Int
        let prompt_files: [String: PromptFile]
    }
    struct StateSpec: Decodable { let name: String; let shape: [Int] }
    struct Function: Decodable {}
    struct Package: Decodable {
        let file: String; let states: [StateSpec]; let functions: [String: Function]?
    }
    struct Packages: Decodable { let dit: Package; let vae_decoder: Package }
    let video: Video
    let latent: Latent
    let schedule: Schedule
    let text: Text
    let packages: Packages
}

// MARK: - Small helpers

/// Deterministic standard normals (SplitMix64 + Box-Muller), so runs can be reproduced.
struct GaussianNoise {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    private mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    private mutating func uniform() -> Float { Float(next() >> 40) / Float(1 << 24) }
    mutating func fill(_ buffer: inout [Float]) {
        var i = 0
        while i < buffer.count {
            let u1 = max(uniform(), 1e-7), u2 = uniform()
            let r = (-2 * log(u1)).squareRoot()
            buffer[i] = r * cos(2 * .pi * u2)
            if i + 1 < buffer.count { buffer[i + 1] = r * sin(2 * .pi * u2) }
            i += 2
        }
    }
}

func makeArray(_ values: [Float], shape: [Int], type: MLMultiArrayDataType) throws -> MLMultiArray {
    let array = try MLMultiArray(shape: shape.map { NSNumber(value: $0) }, dataType: type)
    switch type {
    case .float16:
        array.withUnsafeMutableBufferPointer(ofType: Float16.self) { ptr, _ in
            for i in 0..<values.count { ptr[i] = Float16(values[i]) }
        }
    default:
        array.withUnsafeMutableBufferPointer(ofType: Float.self) { ptr, _ in
            for i in 0..<values.count { ptr[i] = values[i] }
        }
    }
    return array
}

func floats(_ array: MLMultiArray) -> [Float] {
    var out = [Float](repeating: 0, count: array.count)
    if array.dataType == .float16 {
        array.withUnsafeBufferPointer(ofType: Float16.self) { ptr in
            for i in 0..<out.count { out[i] = Float(ptr[i]) }
        }
    } else {
        array.withUnsafeBufferPointer(ofType: Float.self) { ptr in
            for i in 0..<out.count { out[i] = ptr[i] }
        }
    }
    return out
}

/// States must start at zero (the exporter's contract); zero them explicitly.
func zero(_ state: MLState, names: [String]) {
    for name in names {
        state.withMultiArray(for: name) { array in
            array.withUnsafeMutableBytes { raw, _ in
                raw.initializeMemory(as: UInt8.self, repeating: 0)
            }
        }
    }
}

// MARK: - The streamer

final class S2DiTStreamer {
    let manifest: Manifest
    let denoise: MLModel
    let write: MLModel
    let vae: MLModel
    let vaeFirst: MLModel?  // Wan VAE: latent frame 0 -> 1 pixel frame; (re)starts the states
    let context: MLMultiArray
    let inputType: MLMultiArrayDataType

    init(folder: URL, computeUnits: MLComputeUnits = .all) async throws {
        let data = try Data(contentsOf: folder.appendingPathComponent("manifest.json"))
        manifest = try JSONDecoder().decode(Manifest.self, from: data)

        let ditURL = try await MLModel.compileModel(
            at: folder.appendingPathComponent(manifest.packages.dit.file))
        func load(_ url: URL, function: String?) async throws -> MLModel {
            let config = MLModelConfiguration()
            config.computeUnits = computeUnits
            config.functionName = function  // multifunction package (iOS 18)
            return try await MLModel.load(contentsOf: url, configuration: config)
        }
        denoise = try await load(ditURL, function: "denoise")
        write = try await load(ditURL, function: "write")
        let vaeURL = try await MLModel.compileModel(
            at: folder.appendingPathComponent(manifest.packages.vae_decoder.file))
        vae = try await load(vaeURL, function: nil)
        vaeFirst = manifest.packages.vae_decoder.functions?["first"] != nil
            ? try await load(vaeURL, function: "first") : nil

        let latentInput = denoise.modelDescription.inputDescriptionsByName["latents"]
        inputType = latentInput?.multiArrayConstraint?.dataType ?? .float16
        guard let prompt = manifest.text.prompt_files["prompt"] else {
            throw NSError(domain: "S2DiT", code: 1, userInfo: [
                NSLocalizedDescriptionKey: "export with --prompt to get prompt.f16"])
        }
        let raw = try Data(contentsOf: folder.appendingPathComponent(prompt.file))
        let halves = raw.withUnsafeBytes { Array($0.bindMemory(to: Float16.self)) }
        context = try makeArray(halves.map { Float($0) }, shape: prompt.shape, type: inputType)
    }

    /// Generate `chunks` chunks; `onFrames` gets each decoded pixel frame [1, 4 or 1, H, W, 3].
    func run(chunks: Int, seed: UInt64 = 0, onFrames: ([Float], Int) -> Void) async throws {
        let lat = manifest.latent
        let shape = [1, lat.frames_per_chunk, lat.height, lat.width, lat.channels]
        let count = shape.reduce(1, *)
        // One state for the DiT shared by `denoise` and `write` (ASSUMPTION: a state made by one
        // function of a multifunction model is accepted by its sibling; unverified here).
        let ditState = denoise.makeState()
        zero(ditState, names: manifest.packages.dit.states.map(\.name))
        let vaeState = vae.makeState()
        zero(vaeState, names: manifest.packages.vae_decoder.states.map(\.name))
        var noise = GaussianNoise(seed: seed)
        var buffer = [Float](repeating: 0, count: count)
        var firstFrame = true
        let timesteps = manifest.schedule.timesteps

        for c in 0..<chunks {
            let chunk = try MLMultiArray(shape: [1], dataType: .int32)
            chunk[0] = NSNumber(value: Int32(c))
            noise.fill(&buffer)
            var x = buffer
            var x0 = x
            for (i, t) in timesteps.enumerated() {
                let features = try MLDictionaryFeatureProvider(dictionary: [
                    "latents": try makeArray(x, shape: shape, type: inputType),
                    "t": try makeArray([t], shape: [1], type: .float32),
                    "context": context,
                    "chunk": chunk,
                ])
                let out = try await denoise.prediction(from: features, using: ditState)
                x0 = floats(out.featureValue(for: "x0")!.multiArrayValue!)
                if let sigmas = manifest.schedule.sigmas, manifest.schedule.sampler == "euler" {
                    // Euler on the flow: v = (x - x0) / (t / 1000), x += (s_next - s) * v.
                    let step = (sigmas[i + 1] - sigmas[i]) * 1000 / t
                    for j in 0..<count { x[j] += step * (x[j] - x0[j]) }
                    if i + 1 == timesteps.count { x0 = x }
                } else if i + 1 < timesteps.count {
                    let s = timesteps[i + 1] / 1000
                    noise.fill(&buffer)
                    for j in 0..<count { x[j] = (1 - s) * x0[j] + s * buffer[j] }
                }
            }
            // The clean pass at t = 0 writes this chunk into the streaming state.
            let clean = try MLDictionaryFeatureProvider(dictionary: [
                "latents": try makeArray(x0, shape: shape, type: inputType),
                "t": try makeArray([0], shape: [1], type: .float32),
                "context": context,
                "chunk": chunk,
            ])
            _ = try await write.prediction(from: clean, using: ditState)

            // Decode latent frame by latent frame, showing frames as they come.
            let perFrame = lat.height * lat.width * lat.channels
            for f in 0..<lat.frames_per_chunk {
                let slice = Array(x0[(f * perFrame)..<((f + 1) * perFrame)])
                let z = try makeArray(
                    slice, shape: [1, 1, lat.height, lat.width, lat.channels], type: inputType)
                let input = try MLDictionaryFeatureProvider(dictionary: ["latents": z])
                let model = (firstFrame ? vaeFirst : nil) ?? vae
                let out = try await model.prediction(from: input, using: vaeState)
                let frames = floats(out.featureValue(for: "frames")!.multiArrayValue!)
                let pixels = manifest.video.height * manifest.video.width * 3
                // The first latent frame ever stands for one pixel frame: keep its last frame.
                let start = firstFrame ? frames.count - pixels : 0
                onFrames(Array(frames[start...]), (frames.count - start) / pixels)
                firstFrame = false
            }
        }
    }
}

// MARK: - Command line entry (macOS: `swift S2DiTStream.swift path/to/export 5`)

@main
struct S2DiTStreamCLI {
    static func main() async throws {
        let args = CommandLine.arguments
        guard args.count >= 2 else {
            print("usage: S2DiTStream EXPORT_FOLDER [CHUNKS]")
            return
        }
        let chunks = args.count > 2 ? Int(args[2]) ?? 4 : 4
        let streamer = try await S2DiTStreamer(folder: URL(fileURLWithPath: args[1]))
        let start = Date()
        var frames = 0
        try await streamer.run(chunks: chunks) { _, n in
            frames += n
            let fps = Double(frames) / Date().timeIntervalSince(start)
            print("frames \(frames)  \(String(format: "%.2f", fps)) frames/s")
        }
    }
}
