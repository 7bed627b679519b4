// What the TensorRT executor allocates and selects, computed from the manifest's engine
// contract alone (no GPU, no TensorRT headers), so it is tested on any machine.
#pragma once

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "manifest.h"

namespace llmbuild {

// One device buffer: inputs sized for their profile maxima, present_* outputs bound to
// their past_* input (alias_of), logits for [max batch, max num_logits, vocab].
struct Binding {
  std::string name;
  std::string dtype;
  Shape max_shape;
  std::string alias_of;  // empty: owns its buffer
  size_t nbytes() const;
};

size_t dtype_size(const std::string& dtype);  // ArtifactError for sub-byte / unknown types

// The binding plan, as llmbuild/runtime/executors/tensorrt.py's binding_plan.
std::vector<Binding> binding_plan(const EngineEntry& engine);

// The optimization profile for a pass of `batch` sequences x `seq` new tokens with
// `num_logits` logit rows each ("profile selection by phase"), as
// llmbuild/engine/profiles.py's select_profile: the tightest profile (smallest max
// batch x tokens of input_ids) whose ranges take the pass, so the decode profile for
// one-token steps and the prefill profile otherwise. RequestError if none takes it.
int select_profile(const EngineEntry& engine, int64_t batch, int64_t seq, int64_t num_logits);

}  // namespace llmbuild
