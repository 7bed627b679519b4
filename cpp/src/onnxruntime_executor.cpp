// ONNX Runtime executor (CPU): the artifact's ONNX graph with an in-place KV cache.
//
// Each layer's past_* input and present_* output are bound (IoBinding) to the same
// Ort::Value over one preallocated buffer [batch, kv_heads, max_seq_len, head_dim], so
// TensorScatter writes the new rows into it instead of copying the cache every step.
#include <algorithm>
#include <cstring>
#include <thread>

#include <onnxruntime_cxx_api.h>

#include "executor.h"

namespace llmbuild {
namespace {

size_t element_size(ONNXTensorElementDataType type) {
  switch (type) {
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT:
      return 4;
    case ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16:
      return 2;
    default:
      return 0;  // not runnable on the CPU here
  }
}

Ort::Env& environment() {
  static Ort::Env env(ORT_LOGGING_LEVEL_ERROR, "llmbuild");
  return env;
}

class OnnxRuntimeExecutor : public Executor {
 public:
  OnnxRuntimeExecutor(const Manifest& manifest, const LoadOptions& load)
      : num_layers_(manifest.num_layers), cache_len_(manifest.limits.max_seq_len) {
    const std::string file = onnx_graph_file(manifest, load);
    const auto path = manifest.directory / file;  // an absolute `file` replaces the directory
    if (!std::filesystem::is_regular_file(path)) {
      const char* which = !load.graph_file.empty() ? "graph_file"
                          : file == manifest.graph_file ? "manifest graph.file" : "manifest graph.cpu.file";
      throw ArtifactError(path.string() + ": the artifact's ONNX graph is missing (" + which + " = " + file + ")");
    }
    Ort::SessionOptions options;
    const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
    options.SetIntraOpNumThreads(load.threads > 0 ? load.threads : std::min(cores, 8));
    options.SetInterOpNumThreads(1);
    options.SetGraphOptimizationLevel(GraphOptimizationLevel::ORT_ENABLE_ALL);
    options.SetLogSeverityLevel(3);
    try {
      session_ = Ort::Session(environment(), path.c_str(), options);
    } catch (const Ort::Exception& e) {
      throw ArtifactError(path.string() + ": ONNX Runtime cannot load the graph: " + e.what());
    }
    read_cache_layout();
    reset(1);
  }

  const std::string& name() const override { return name_; }

  void reset(int64_t batch) override {
    const std::vector<int64_t> shape{batch, kv_heads_, cache_len_, head_dim_};
    const size_t bytes = batch * kv_heads_ * cache_len_ * head_dim_ * element_size(cache_type_);
    binding_ = Ort::IoBinding(session_);
    cache_.clear();
    cache_values_.clear();
    for (int64_t layer = 0; layer < num_layers_; ++layer) {
      for (const auto& [past, present] : {std::pair(io::past_key(layer), io::present_key(layer)),
                                          std::pair(io::past_value(layer), io::present_value(layer))}) {
        cache_.emplace_back(bytes, 0);
        cache_values_.push_back(Ort::Value::CreateTensor(cpu_, cache_.back().data(), bytes, shape.data(),
                                                         shape.size(), cache_type_));
        binding_.BindInput(past.c_str(), cache_values_.back());
        binding_.BindOutput(present.c_str(), cache_values_.back());
      }
    }
    batch_ = batch;
  }

  std::vector<float> forward(const StepInputs& step) override {
    if (step.batch != batch_) {
      throw Error("executor: batch " + std::to_string(step.batch) + " != cache slots " + std::to_string(batch_));
    }
    step_ = step;  // the bound values point into this copy until the next call
    const int64_t tokens[] = {step.batch, step.seq};
    const int64_t logits_shape[] = {step.batch, step.num_logits};
    bind(io::kInputIds, step_.input_ids, tokens, 2);
    bind(io::kPositionIds, step_.position_ids, tokens, 2);
    bind(io::kWriteIndices, step_.write_indices, tokens, 1);
    bind(io::kLogitsIndices, step_.logits_indices, logits_shape, 2);
    binding_.BindOutput(io::kLogits, cpu_);  // ORT allocates it: the shape changes between steps
    session_.Run(Ort::RunOptions{nullptr}, binding_);

    const std::vector<std::string> names = binding_.GetOutputNames();
    const auto at = std::find(names.begin(), names.end(), io::kLogits) - names.begin();
    Ort::Value logits = std::move(binding_.GetOutputValues()[at]);
    const auto info = logits.GetTensorTypeAndShapeInfo();
    if (info.GetElementType() != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT) {
      throw ArtifactError("the graph's logits are not float32");
    }
    const float* data = logits.GetTensorData<float>();
    return std::vector<float>(data, data + info.GetElementCount());
  }

 private:
  void read_cache_layout() {
    const std::string want = io::past_key(0);
    Ort::AllocatorWithDefaultOptions allocator;
    for (size_t i = 0; i < session_.GetInputCount(); ++i) {
      if (want != session_.GetInputNameAllocated(i, allocator).get()) continue;
      const Ort::TypeInfo type = session_.GetInputTypeInfo(i);
      const auto info = type.GetTensorTypeAndShapeInfo();  // a view into `type`
      const std::vector<int64_t> shape = info.GetShape();
      cache_type_ = info.GetElementType();
      if (element_size(cache_type_) == 0) {
        throw ArtifactError("ONNX Runtime (CPU) cannot run a graph whose KV cache is element type " +
                            std::to_string(cache_type_) +
                            "; build a float32 or float16 artifact for CPU execution");
      }
      if (shape.size() != 4 || shape[1] <= 0 || shape[3] <= 0) {
        throw ArtifactError(want + " must have a static shape [batch, kv_heads, cache_len, head_dim]");
      }
      kv_heads_ = shape[1];
      head_dim_ = shape[3];
      return;
    }
    throw ArtifactError("the ONNX graph has no input " + want + " (not an llmbuild decoder graph)");
  }

  void bind(const char* name, std::vector<int64_t>& data, const int64_t* shape, size_t rank) {
    binding_.BindInput(name, Ort::Value::CreateTensor<int64_t>(cpu_, data.data(), data.size(), shape, rank));
  }

  const std::string name_ = "onnxruntime";
  int64_t num_layers_, cache_len_;
  int64_t kv_heads_ = 0, head_dim_ = 0, batch_ = 0;
  ONNXTensorElementDataType cache_type_ = ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;
  Ort::MemoryInfo cpu_ = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Session session_{nullptr};
  Ort::IoBinding binding_{nullptr};
  std::vector<std::vector<char>> cache_;  // one buffer per past/present pair
  std::vector<Ort::Value> cache_values_;
  StepInputs step_;
};

}  // namespace

std::unique_ptr<Executor> open_onnxruntime_executor(const Manifest& manifest, const LoadOptions& options) {
  return std::make_unique<OnnxRuntimeExecutor>(manifest, options);
}

}  // namespace llmbuild
