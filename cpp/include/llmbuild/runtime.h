// llmbuild C++ runtime: load a compiled artifact and generate token ids.
//
//   llmbuild::Model model("out/smollm2-135m-instruct");
//   llmbuild::GenerateOptions options;
//   options.max_new_tokens = 32;
//   llmbuild::Generation g = model.generate(prompt_ids, options,
//                                           [](int64_t token) { /* streamed */ });
//
// Semantics match the Python runtime (llmbuild/runtime/generator.py, sampling.py): one
// prefill pass, then one token per decode step; a request stops at any EOS id (not
// included) or after max_new_tokens; sampling follows the exact specification in
// sampling.py, so greedy and seeded runs give the same ids as `llmbuild.load(...)`.
// Tokenization stays on the Python side (`llmbuild tokenize` / `llmbuild detokenize`).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

namespace llmbuild {

// Every error this library raises on purpose.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The artifact is missing, incomplete, unreadable, or built for another schema/runtime.
class ArtifactError : public Error {
 public:
  using Error::Error;
};

// A request this artifact or build cannot serve: empty prompt, beyond the limits, bad
// sampling options, a backend that is not compiled in.
class RequestError : public Error {
 public:
  using Error::Error;
};

struct Limits {
  int64_t max_batch_size = 0;
  int64_t max_input_len = 0;
  int64_t max_seq_len = 0;
};

// temperature 0 is greedy (first maximum). Otherwise: temperature, then top_k (0 = off),
// then top_p (1 = off), drawn with SplitMix64 seeded by `seed`.
struct SamplingOptions {
  double temperature = 0.0;
  int64_t top_k = 0;
  double top_p = 1.0;
  uint64_t seed = 0;
};

struct GenerateOptions {
  int64_t max_new_tokens = 64;
  SamplingOptions sampling;
};

enum class FinishReason { kEos, kLength };
const char* to_string(FinishReason reason);

struct Generation {
  std::vector<int64_t> token_ids;  // generated ids, EOS excluded
  FinishReason finish_reason = FinishReason::kLength;
};

struct LoadOptions {
  std::string backend = "auto";  // "auto", "onnxruntime" or "tensorrt"
  int threads = 0;               // ONNX Runtime intra-op threads; 0 = min(cores, 8)
  // ONNX Runtime runs the artifact's CPU-ready graph (manifest graph.cpu.file, lowered for
  // ONNX Runtime's CPU kernels at compile time) when it has one, else graph.file.
  // graph_file: an ONNX file to run instead (absolute or relative to the artifact), with the
  // same I/O contract. standard_graph: run graph.file (what TensorRT parses) even when the
  // artifact has a CPU-ready graph.
  std::string graph_file;
  bool standard_graph = false;
};

// Called with each generated token as soon as it is produced.
using TokenCallback = std::function<void(int64_t token_id)>;

// Executors compiled into this build, e.g. {"onnxruntime"}.
std::vector<std::string> available_backends();

class Model {
 public:
  // Reads <artifact>/manifest.json and opens the graph (ONNX Runtime) or engine (TensorRT).
  // Throws ArtifactError for a missing or incompatible artifact.
  explicit Model(const std::string& artifact_dir, const LoadOptions& options = {});
  ~Model();
  Model(Model&&) noexcept;
  Model& operator=(Model&&) noexcept;

  // Throws RequestError for requests outside the artifact's limits.
  Generation generate(const std::vector<int64_t>& prompt_token_ids, const GenerateOptions& options = {});
  Generation generate(const std::vector<int64_t>& prompt_token_ids, const GenerateOptions& options,
                      const TokenCallback& on_token);

  const std::string& name() const;
  const std::string& backend() const;  // the executor in use
  const std::string& graph() const;    // the ONNX file ONNX Runtime runs ("" on TensorRT)
  const Limits& limits() const;
  const std::vector<int64_t>& eos_token_ids() const;

 private:
  struct Impl;
  std::unique_ptr<Impl> impl_;
};

}  // namespace llmbuild
