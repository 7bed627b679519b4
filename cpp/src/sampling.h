// Token sampling, exactly as specified in llmbuild/runtime/sampling.py:
//
//   1. temperature == 0: greedy, the index of the first maximum.
//   2. x = double(logits) / temperature.
//   3. candidates sorted by x descending, ties by ascending id (stable sort).
//   4. top_k > 0: keep the first top_k candidates.
//   5. p = softmax(x) over the kept candidates in double (x - max, exp, divide by sum).
//   6. top_p < 1: keep the shortest prefix whose cumulative probability is >= top_p
//      (at least one candidate) and renormalise.
//   7. u = next uniform double of the request's SplitMix64; the token is the first
//      candidate whose cumulative probability exceeds u (the last one if none does).
//
// Sums use numpy's pairwise summation so the arithmetic follows the Python runtime's;
// `exp` may still differ from numpy's vectorised exp in the last bit.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "llmbuild/runtime.h"

namespace llmbuild {

class SplitMix64 {
 public:
  explicit SplitMix64(uint64_t seed) : state_(seed) {}
  uint64_t next_u64();
  double uniform();  // (next_u64() >> 11) * 2^-53

 private:
  uint64_t state_;
};

struct Candidates {
  std::vector<int64_t> ids;
  std::vector<double> probs;
};

// RequestError unless temperature >= 0, top_k >= 0 and 0 < top_p <= 1.
void check_sampling(const SamplingOptions& options);

int64_t argmax(const float* logits, size_t vocab);

// Steps 2-6: the candidates left after temperature, top-k and top-p, with probabilities.
Candidates candidate_probabilities(const float* logits, size_t vocab, const SamplingOptions& options);

// One token; greedy steps draw nothing from `rng`.
int64_t sample(const float* logits, size_t vocab, const SamplingOptions& options, SplitMix64& rng);

}  // namespace llmbuild
