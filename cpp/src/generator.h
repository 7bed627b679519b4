// Generation over an executor, as llmbuild/runtime/generator.py does it for one sequence:
//
//   prefill   input_ids = prompt, positions 0..n-1, write_indices [0], logits_indices [[n-1]]
//   decode    input_ids = [[token]], position = write index = current length, logits_indices [[0]]
//
// Sampling happens on each pass's logits; a sampled EOS ends the request without being
// returned, and max_new_tokens ends it with finish reason "length".
#pragma once

#include <cstdint>
#include <vector>

#include "executor.h"
#include "llmbuild/runtime.h"

namespace llmbuild {

// RequestError with the Python runtime's wording: empty prompt, prompt longer than
// max_input_len, prompt + max_new_tokens beyond max_seq_len, ids outside the vocabulary.
void check_request(const std::vector<int64_t>& prompt, int64_t max_new_tokens, const Limits& limits,
                   int64_t vocab_size);

Generation generate_tokens(Executor& executor, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                           const std::vector<int64_t>& eos_token_ids, const Limits& limits, int64_t vocab_size,
                           const TokenCallback& on_token);

}  // namespace llmbuild
