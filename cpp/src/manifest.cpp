#include "manifest.h"

#include <fstream>
#include <sstream>

#include <nlohmann/json.hpp>

namespace llmbuild {
namespace fs = std::filesystem;
using json = nlohmann::json;

namespace {

const char* kRequiredKeys[] = {"schema_version", "name", "model", "limits", "graph", "tokenizer", "engines"};

// Typed access by dotted path ("limits.max_seq_len"); every failure names the file and field.
class Fields {
 public:
  Fields(const json& root, std::string where) : root_(root), where_(std::move(where)) {}

  template <typename T>
  T get(const std::string& dotted) const {
    const json* node = &root_;
    std::istringstream parts(dotted);
    for (std::string key; std::getline(parts, key, '.');) {
      if (!node->is_object() || !node->contains(key)) {
        throw ArtifactError(where_ + ": manifest lacks " + dotted);
      }
      node = &(*node)[key];
    }
    try {
      return node->get<T>();
    } catch (const json::exception& e) {
      throw ArtifactError(where_ + ": manifest field " + dotted + " has the wrong type (" + node->type_name() +
                          "): " + e.what());
    }
  }

 private:
  const json& root_;
  std::string where_;
};

EngineEntry engine_entry(const json& entry, const std::string& where) {
  Fields f(entry, where);
  EngineEntry e;
  e.backend = f.get<std::string>("backend");
  e.file = f.get<std::string>("file");
  e.trt_version = entry.value("trt_version", "");
  for (const json& t : f.get<json>("io")) {
    Fields tf(t, where + " (engine io)");
    TensorSpec spec;
    spec.name = tf.get<std::string>("name");
    spec.is_input = tf.get<std::string>("mode") == "input";
    spec.dtype = tf.get<std::string>("dtype");
    spec.shape = tf.get<Shape>("shape");
    if (spec.is_input) spec.profile_shapes = tf.get<std::vector<std::array<Shape, 3>>>("profile_shapes");
    e.io.push_back(std::move(spec));
  }
  e.aliases = entry.value("aliases", std::map<std::string, std::string>{});
  return e;
}

json parse_file(const fs::path& path) {
  std::ifstream in(path);
  if (!in) throw ArtifactError(path.string() + ": cannot read the manifest");
  try {
    return json::parse(in);
  } catch (const json::exception& e) {
    throw ArtifactError(path.string() + ": cannot read the manifest: " + e.what());
  }
}

}  // namespace

Manifest read_manifest(const fs::path& artifact) {
  fs::path directory = artifact;
  if (!fs::exists(directory)) throw ArtifactError("artifact " + directory.string() + " does not exist");
  if (fs::is_regular_file(directory) && directory.filename() == kManifestFile) directory = directory.parent_path();
  const fs::path path = directory / kManifestFile;
  if (!fs::is_regular_file(path)) {
    throw ArtifactError(directory.string() + " is not a complete llmbuild artifact (no " + kManifestFile +
                        "); an interrupted compile leaves no manifest — run `llmbuild compile` again");
  }
  const json root = parse_file(path);
  const json version = root.is_object() ? root.value("schema_version", json()) : json();
  if (version != kSchemaVersion) {
    throw ArtifactError(path.string() + ": manifest schema version " + version.dump() +
                        " is not supported by this llmbuild runtime (expected " + std::to_string(kSchemaVersion) +
                        "); rebuild the artifact with a matching llmbuild version");
  }
  std::string missing;
  for (const char* key : kRequiredKeys) {
    if (!root.contains(key)) missing += (missing.empty() ? "" : ", ") + std::string(key);
  }
  if (!missing.empty()) throw ArtifactError(path.string() + ": manifest lacks " + missing);

  Fields f(root, path.string());
  Manifest m;
  m.directory = directory;
  m.name = f.get<std::string>("name");
  m.graph_file = f.get<std::string>("graph.file");
  const json& graph = root["graph"];
  if (graph.is_object() && graph.contains("cpu") && !graph["cpu"].is_null()) {
    m.cpu_graph_file = f.get<std::string>("graph.cpu.file");
  }
  m.limits.max_batch_size = f.get<int64_t>("limits.max_batch_size");
  m.limits.max_input_len = f.get<int64_t>("limits.max_input_len");
  m.limits.max_seq_len = f.get<int64_t>("limits.max_seq_len");
  m.num_layers = f.get<int64_t>("model.num_layers");
  m.vocab_size = f.get<int64_t>("model.vocab_size");
  m.eos_token_ids = f.get<std::vector<int64_t>>("tokenizer.eos_token_ids");
  for (const json& entry : f.get<json>("engines")) m.engines.push_back(engine_entry(entry, path.string()));
  return m;
}

std::string onnx_graph_file(const Manifest& manifest, const LoadOptions& options) {
  if (!options.graph_file.empty()) return options.graph_file;
  if (!options.standard_graph && !manifest.cpu_graph_file.empty()) return manifest.cpu_graph_file;
  return manifest.graph_file;
}

EngineEntry parse_engine_entry(const std::string& json_text) {
  return engine_entry(json::parse(json_text), "engine entry");
}

}  // namespace llmbuild
