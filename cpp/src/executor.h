// The executor interface: one forward pass of the decoder graph over a KV cache that the
// executor owns and updates in place (the I/O contract is llmbuild/graph/io.py).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "manifest.h"

namespace llmbuild {

// Graph input and output names (llmbuild/graph/io.py).
namespace io {
constexpr const char* kInputIds = "input_ids";
constexpr const char* kPositionIds = "position_ids";
constexpr const char* kWriteIndices = "write_indices";
constexpr const char* kLogitsIndices = "logits_indices";
constexpr const char* kLogits = "logits";
inline std::string past_key(int64_t layer) { return "past_key." + std::to_string(layer); }
inline std::string past_value(int64_t layer) { return "past_value." + std::to_string(layer); }
inline std::string present_key(int64_t layer) { return "present_key." + std::to_string(layer); }
inline std::string present_value(int64_t layer) { return "present_value." + std::to_string(layer); }
}  // namespace io

// One pass for `batch` sequences of `seq` new tokens each, row-major.
struct StepInputs {
  int64_t batch = 1;
  int64_t seq = 0;
  int64_t num_logits = 1;
  std::vector<int64_t> input_ids;       // [batch, seq]
  std::vector<int64_t> position_ids;    // [batch, seq]
  std::vector<int64_t> write_indices;   // [batch]
  std::vector<int64_t> logits_indices;  // [batch, num_logits]
};

class Executor {
 public:
  virtual ~Executor() = default;
  virtual const std::string& name() const = 0;
  // Zeroes the cache for `batch` sequences.
  virtual void reset(int64_t batch) = 0;
  // Runs one pass; returns float32 logits [batch, num_logits, vocab].
  virtual std::vector<float> forward(const StepInputs& step) = 0;
};

#ifdef LLMBUILD_WITH_ONNXRUNTIME
// The artifact's ONNX graph (or `graph_file`, see LoadOptions) on ONNX Runtime (CPU).
std::unique_ptr<Executor> open_onnxruntime_executor(const Manifest& manifest, const LoadOptions& options);
#endif

#ifdef LLMBUILD_WITH_TENSORRT
// The artifact's first engine built with this runtime's TensorRT flavour.
std::unique_ptr<Executor> open_tensorrt_executor(const Manifest& manifest);
const char* tensorrt_flavour();  // "tensorrt" or "tensorrt-rtx": the engines this build runs
bool cuda_device_available();
#endif

}  // namespace llmbuild
