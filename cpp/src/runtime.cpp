// llmbuild::Model: an artifact's manifest + an executor + generation.
#include "llmbuild/runtime.h"

#include <algorithm>

#include "executor.h"
#include "generator.h"
#include "manifest.h"

namespace llmbuild {

const char* to_string(FinishReason reason) { return reason == FinishReason::kEos ? "eos" : "length"; }

std::vector<std::string> available_backends() {
  std::vector<std::string> backends;
#ifdef LLMBUILD_WITH_TENSORRT
  backends.push_back("tensorrt");
#endif
#ifdef LLMBUILD_WITH_ONNXRUNTIME
  backends.push_back("onnxruntime");
#endif
  return backends;
}

namespace {

// "auto": TensorRT when it is compiled in, the artifact has an engine of its flavour and
// a GPU answers; otherwise ONNX Runtime.
std::unique_ptr<Executor> open_executor(const Manifest& manifest, const LoadOptions& options) {
  std::string backend = options.backend;
  if (backend == "auto") {
    backend = "onnxruntime";
#ifdef LLMBUILD_WITH_TENSORRT
    const auto& engines = manifest.engines;
    const bool runnable = std::any_of(engines.begin(), engines.end(),
                                      [](const EngineEntry& e) { return e.backend == tensorrt_flavour(); });
    if (runnable && cuda_device_available()) backend = "tensorrt";
#endif
  }
#ifdef LLMBUILD_WITH_TENSORRT
  if (backend == "tensorrt") return open_tensorrt_executor(manifest);
#endif
#ifdef LLMBUILD_WITH_ONNXRUNTIME
  if (backend == "onnxruntime") return open_onnxruntime_executor(manifest, options);
#endif
  std::string built;
  for (const std::string& b : available_backends()) built += (built.empty() ? "" : ", ") + b;
  throw RequestError("runtime backend '" + backend + "' is not available; this build has: " +
              (built.empty() ? std::string("none") : built) + " (choose auto, onnxruntime or tensorrt)");
}

}  // namespace

struct Model::Impl {
  Manifest manifest;
  std::unique_ptr<Executor> executor;
  std::string graph;
};

Model::Model(const std::string& artifact_dir, const LoadOptions& options) : impl_(std::make_unique<Impl>()) {
  impl_->manifest = read_manifest(artifact_dir);
  impl_->executor = open_executor(impl_->manifest, options);
  if (impl_->executor->name() == "onnxruntime") impl_->graph = onnx_graph_file(impl_->manifest, options);
}

Model::~Model() = default;
Model::Model(Model&&) noexcept = default;
Model& Model::operator=(Model&&) noexcept = default;

Generation Model::generate(const std::vector<int64_t>& prompt_token_ids, const GenerateOptions& options) {
  return generate(prompt_token_ids, options, nullptr);
}

Generation Model::generate(const std::vector<int64_t>& prompt_token_ids, const GenerateOptions& options,
                           const TokenCallback& on_token) {
  const Manifest& m = impl_->manifest;
  return generate_tokens(*impl_->executor, prompt_token_ids, options, m.eos_token_ids, m.limits, m.vocab_size,
                         on_token);
}

const std::string& Model::name() const { return impl_->manifest.name; }
const std::string& Model::backend() const { return impl_->executor->name(); }
const std::string& Model::graph() const { return impl_->graph; }
const Limits& Model::limits() const { return impl_->manifest.limits; }
const std::vector<int64_t>& Model::eos_token_ids() const { return impl_->manifest.eos_token_ids; }

}  // namespace llmbuild
