// manifest.json of an artifact: the fields the runtime needs, checked as the Python
// runtime checks them (llmbuild/artifact/manifest.py).
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <map>
#include <string>
#include <vector>

#include "llmbuild/runtime.h"

namespace llmbuild {

constexpr int kSchemaVersion = 1;
constexpr const char* kManifestFile = "manifest.json";

using Shape = std::vector<int64_t>;

// One tensor of an engine's I/O contract (build_engine's "io" entries).
struct TensorSpec {
  std::string name;
  bool is_input = false;
  std::string dtype;  // numpy-style name: "float16", "int64", ...
  Shape shape;        // -1 = dynamic
  std::vector<std::array<Shape, 3>> profile_shapes;  // per profile: min, opt, max (inputs)
};

struct EngineEntry {
  std::string backend;  // "tensorrt-rtx" or "tensorrt"
  std::string file;     // relative to the artifact
  std::string trt_version;
  std::vector<TensorSpec> io;
  std::map<std::string, std::string> aliases;  // present_* output -> past_* input
};

struct Manifest {
  std::filesystem::path directory;
  std::string name;
  std::string graph_file;      // relative to the artifact
  std::string cpu_graph_file;  // graph.cpu.file: the CPU-ready graph, "" if the artifact has none
  Limits limits;
  int64_t num_layers = 0;
  int64_t vocab_size = 0;
  std::vector<int64_t> eos_token_ids;
  std::vector<EngineEntry> engines;
};

// Throws ArtifactError: no directory, no manifest, unparsable JSON, another schema
// version, missing or mistyped fields.
Manifest read_manifest(const std::filesystem::path& artifact);

// The ONNX file ONNX Runtime runs, relative to the artifact (or absolute): options.graph_file
// if set; else the CPU-ready graph (graph.cpu.file) unless options.standard_graph; else graph.file.
std::string onnx_graph_file(const Manifest& manifest, const LoadOptions& options);

// Parses one engine entry (exposed for tests of the TensorRT binding plan).
EngineEntry parse_engine_entry(const std::string& json_text);

}  // namespace llmbuild
