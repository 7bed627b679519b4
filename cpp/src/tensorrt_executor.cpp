// TensorRT executor (NVIDIA GPU): the artifact's engine with an in-place KV cache.
//
// Written against the TensorRT 10/11 and TensorRT-RTX C++ API (nvinfer1::IRuntime,
// ICudaEngine, IExecutionContext::enqueueV3). Compiled only where CMake finds TensorRT
// and the CUDA runtime; it has not been compiled on the CPU-only development machine.
//
//   manifest engine contract ──binding_plan──► one cudaMalloc per owning binding;
//                                              present_* gets its past_* address
//   each pass:  select_profile ──► setOptimizationProfileAsync (when the phase changes)
//               int64 inputs host→device, setInputShape for every input
//               enqueueV3 ──► logits device→host ──► stream synchronize
#include <algorithm>
#include <fstream>
#include <iostream>
#include <iterator>
#include <map>
#include <memory>
#include <type_traits>

#include <NvInfer.h>
#include <cuda_runtime_api.h>

#include "executor.h"
#include "tensorrt_plan.h"

#ifndef LLMBUILD_TENSORRT_FLAVOUR
#define LLMBUILD_TENSORRT_FLAVOUR "tensorrt"
#endif

namespace llmbuild {
namespace {

void check_cuda(cudaError_t status, const char* what) {
  if (status != cudaSuccess) throw Error(std::string(what) + " failed: " + cudaGetErrorString(status));
}

class Logger : public nvinfer1::ILogger {
  void log(Severity severity, const char* msg) noexcept override {
    if (severity <= Severity::kWARNING) std::cerr << "[TensorRT] " << msg << "\n";
  }
};

struct CudaFree {
  void operator()(void* ptr) const { cudaFree(ptr); }
};
struct StreamDestroy {
  void operator()(cudaStream_t stream) const {
    cudaStreamSynchronize(stream);
    cudaStreamDestroy(stream);
  }
};

nvinfer1::Dims to_dims(const Shape& shape) {
  nvinfer1::Dims dims{};
  dims.nbDims = static_cast<int32_t>(shape.size());
  std::copy(shape.begin(), shape.end(), dims.d);
  return dims;
}

class TensorRTExecutor : public Executor {
 public:
  TensorRTExecutor(const Manifest& manifest, const EngineEntry& entry) : entry_(entry), plan_(binding_plan(entry)) {
    const auto path = manifest.directory / entry.file;
    std::ifstream in(path, std::ios::binary);
    if (!in) throw ArtifactError(path.string() + ": the artifact's engine file is missing");
    const std::vector<char> blob{std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>()};
    runtime_.reset(nvinfer1::createInferRuntime(logger_));
    if (runtime_) engine_.reset(runtime_->deserializeCudaEngine(blob.data(), blob.size()));
    if (!engine_) {
      throw ArtifactError(path.string() + ": TensorRT could not load this engine (built with " + entry.backend + " " +
                          entry.trt_version + "); rebuild it for this GPU and TensorRT version");
    }
    check_contract();
    context_.reset(engine_->createExecutionContext());
    if (!context_) throw Error("TensorRT could not create an execution context");
    cudaStream_t stream = nullptr;
    check_cuda(cudaStreamCreate(&stream), "cudaStreamCreate");
    stream_.reset(stream);
    for (const Binding& b : plan_) {
      if (!b.alias_of.empty()) continue;
      void* ptr = nullptr;
      check_cuda(cudaMalloc(&ptr, b.nbytes()), "cudaMalloc");
      owned_.emplace_back(ptr);
      buffers_[b.name] = ptr;
    }
    for (const Binding& b : plan_) {
      if (!b.alias_of.empty()) buffers_[b.name] = buffers_.at(b.alias_of);  // KV cache updated in place
    }
    reset(1);
  }

  const std::string& name() const override { return name_; }

  void reset(int64_t batch) override {
    for (const Binding& b : plan_) {
      if (b.name.rfind("past_", 0) == 0) {
        check_cuda(cudaMemsetAsync(buffers_.at(b.name), 0, b.nbytes(), stream_.get()), "cudaMemsetAsync");
      }
    }
    batch_ = batch;
  }

  std::vector<float> forward(const StepInputs& step) override {
    if (step.batch != batch_) {
      throw Error("executor: batch " + std::to_string(step.batch) + " != cache slots " + std::to_string(batch_));
    }
    const std::map<std::string, const std::vector<int64_t>*> host = {
        {io::kInputIds, &step.input_ids},
        {io::kPositionIds, &step.position_ids},
        {io::kWriteIndices, &step.write_indices},
        {io::kLogitsIndices, &step.logits_indices},
    };
    std::map<std::string, Shape> shapes = {
        {io::kInputIds, {step.batch, step.seq}},
        {io::kPositionIds, {step.batch, step.seq}},
        {io::kWriteIndices, {step.batch}},
        {io::kLogitsIndices, {step.batch, step.num_logits}},
    };
    for (const Binding& b : plan_) {
      if (b.name.rfind("past_", 0) == 0) shapes[b.name] = {batch_, b.max_shape[1], b.max_shape[2], b.max_shape[3]};
    }
    const int profile = select_profile(entry_, step.batch, step.seq, step.num_logits);
    if (profile != profile_) {
      if (!context_->setOptimizationProfileAsync(profile, stream_.get())) {
        throw Error("TensorRT rejected optimization profile " + std::to_string(profile));
      }
      profile_ = profile;
    }
    for (const auto& [name, values] : host) {
      check_cuda(cudaMemcpyAsync(buffers_.at(name), values->data(), values->size() * sizeof(int64_t),
                                 cudaMemcpyHostToDevice, stream_.get()),
                 "cudaMemcpyAsync (inputs)");
    }
    for (const auto& [name, shape] : shapes) {
      if (!context_->setInputShape(name.c_str(), to_dims(shape))) {
        throw Error("TensorRT rejected the shape of input " + name);
      }
    }
    for (const auto& [name, ptr] : buffers_) context_->setTensorAddress(name.c_str(), ptr);
    if (!context_->enqueueV3(stream_.get())) throw Error("TensorRT execution failed (enqueueV3)");

    const Binding& logits = *std::find_if(plan_.begin(), plan_.end(), [](const Binding& b) {
      return b.name == io::kLogits;
    });
    std::vector<float> out(step.batch * step.num_logits * logits.max_shape[2]);
    check_cuda(cudaMemcpyAsync(out.data(), buffers_.at(io::kLogits), out.size() * sizeof(float),
                               cudaMemcpyDeviceToHost, stream_.get()),
               "cudaMemcpyAsync (logits)");
    check_cuda(cudaStreamSynchronize(stream_.get()), "cudaStreamSynchronize");
    return out;
  }

 private:
  // The engine must expose exactly the manifest's tensors, with float32 logits.
  void check_contract() const {
    std::map<std::string, bool> seen;
    for (int32_t i = 0; i < engine_->getNbIOTensors(); ++i) seen[engine_->getIOTensorName(i)] = true;
    for (const Binding& b : plan_) {
      if (!seen.count(b.name)) {
        throw ArtifactError(entry_.file + ": the engine has no tensor " + b.name + " recorded in the manifest");
      }
      if (b.name == io::kLogits && b.dtype != "float32") {
        throw ArtifactError(entry_.file + ": logits are " + b.dtype + ", this runtime reads float32");
      }
    }
    if (seen.size() != plan_.size() || !seen.count(io::kLogits)) {
      throw ArtifactError(entry_.file + ": the engine's tensors do not match the manifest's I/O contract");
    }
  }

  const std::string name_ = "tensorrt";
  EngineEntry entry_;
  std::vector<Binding> plan_;
  Logger logger_;
  std::unique_ptr<nvinfer1::IRuntime> runtime_;
  std::unique_ptr<nvinfer1::ICudaEngine> engine_;
  std::unique_ptr<nvinfer1::IExecutionContext> context_;
  // Declared after the TensorRT objects, so destroyed first: synchronize, then free.
  std::vector<std::unique_ptr<void, CudaFree>> owned_;
  std::unique_ptr<std::remove_pointer_t<cudaStream_t>, StreamDestroy> stream_;
  std::map<std::string, void*> buffers_;
  int profile_ = 0;
  int64_t batch_ = 1;
};

}  // namespace

const char* tensorrt_flavour() { return LLMBUILD_TENSORRT_FLAVOUR; }

bool cuda_device_available() {
  int count = 0;
  return cudaGetDeviceCount(&count) == cudaSuccess && count > 0;
}

std::unique_ptr<Executor> open_tensorrt_executor(const Manifest& manifest) {
  std::string found;
  for (const EngineEntry& entry : manifest.engines) {
    if (entry.backend == LLMBUILD_TENSORRT_FLAVOUR) return std::make_unique<TensorRTExecutor>(manifest, entry);
    found += (found.empty() ? "" : ", ") + entry.backend;
  }
  throw ArtifactError(manifest.directory.string() + ": no engine for " LLMBUILD_TENSORRT_FLAVOUR
                      " (this runtime's TensorRT flavour); the artifact has: " +
                      (found.empty() ? std::string("no engines") : found));
}

}  // namespace llmbuild
