#include "tensorrt_plan.h"

#include <algorithm>
#include <functional>
#include <limits>
#include <numeric>
#include <string>

#include "executor.h"

namespace llmbuild {

size_t dtype_size(const std::string& dtype) {
  static const std::map<std::string, size_t> sizes = {
      {"float32", 4}, {"float16", 2}, {"bfloat16", 2}, {"int64", 8},         {"int32", 4},
      {"int8", 1},    {"uint8", 1},   {"bool", 1},     {"float8_e4m3fn", 1},
  };
  const auto it = sizes.find(dtype);
  if (it == sizes.end()) throw ArtifactError("engine contract: no buffer size for I/O dtype " + dtype);
  return it->second;
}

size_t Binding::nbytes() const {
  return std::accumulate(max_shape.begin(), max_shape.end(), dtype_size(dtype), std::multiplies<size_t>());
}

namespace {

const TensorSpec& find(const EngineEntry& engine, const std::string& name) {
  for (const TensorSpec& t : engine.io) {
    if (t.name == name) return t;
  }
  throw ArtifactError("engine contract has no tensor " + name);
}

Shape profile_max(const TensorSpec& t) {
  if (t.profile_shapes.empty()) throw ArtifactError("engine contract: input " + t.name + " has no profile shapes");
  Shape maxima(t.shape.size(), 0);
  for (const auto& profile : t.profile_shapes) {
    for (size_t d = 0; d < maxima.size(); ++d) maxima[d] = std::max(maxima[d], profile[2].at(d));
  }
  return maxima;
}

}  // namespace

std::vector<Binding> binding_plan(const EngineEntry& engine) {
  const int64_t batch = profile_max(find(engine, io::kInputIds))[0];
  const int64_t num_logits = profile_max(find(engine, io::kLogitsIndices))[1];
  std::vector<Binding> plan;
  for (const TensorSpec& t : engine.io) {
    Binding b{t.name, t.dtype, {}, {}};
    const auto alias = engine.aliases.find(t.name);
    if (t.is_input) {
      b.max_shape = profile_max(t);
    } else if (alias != engine.aliases.end()) {
      b.alias_of = alias->second;
      b.max_shape = profile_max(find(engine, alias->second));
    } else {  // logits [batch, num_logits, vocab]
      b.max_shape = t.shape;
      if (b.max_shape.size() >= 2) {
        b.max_shape[0] = batch;
        b.max_shape[1] = num_logits;
      }
    }
    if (std::any_of(b.max_shape.begin(), b.max_shape.end(), [](int64_t d) { return d < 0; })) {
      throw ArtifactError("engine contract: cannot size a buffer for " + t.name);
    }
    plan.push_back(std::move(b));
  }
  return plan;
}

int select_profile(const EngineEntry& engine, int64_t batch, int64_t seq, int64_t num_logits) {
  const auto& ids = find(engine, io::kInputIds).profile_shapes;
  const auto& logits = find(engine, io::kLogitsIndices).profile_shapes;
  int best = -1;
  int64_t best_size = std::numeric_limits<int64_t>::max();
  std::string ranges;
  for (size_t p = 0; p < ids.size() && p < logits.size(); ++p) {
    const Shape &lo = ids[p][0], &hi = ids[p][2];
    const bool takes = lo.at(0) <= batch && batch <= hi.at(0) && lo.at(1) <= seq && seq <= hi.at(1) &&
                       logits[p][0].at(1) <= num_logits && num_logits <= logits[p][2].at(1);
    if (takes && hi[0] * hi[1] < best_size) {
      best = static_cast<int>(p);
      best_size = hi[0] * hi[1];
    }
    ranges += (p ? "; " : "") + ("profile " + std::to_string(p)) + ": batch <= " + std::to_string(hi[0]) +
              ", tokens <= " + std::to_string(hi[1]) + ", logits <= " + std::to_string(logits[p][2].at(1));
  }
  if (best < 0) {
    throw RequestError("engine " + engine.file + ": no optimization profile takes " + std::to_string(batch) +
                       " sequence(s) x " + std::to_string(seq) + " token(s) with " + std::to_string(num_logits) +
                       " logit row(s); profiles: " + ranges);
  }
  return best;
}

}  // namespace llmbuild
