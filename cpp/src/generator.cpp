#include "generator.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "sampling.h"

namespace llmbuild {

void check_request(const std::vector<int64_t>& prompt, int64_t max_new_tokens, const Limits& limits,
                   int64_t vocab_size) {
  const auto n = static_cast<int64_t>(prompt.size());
  if (n == 0) throw RequestError("empty prompt: at least one token is needed");
  if (n > limits.max_input_len) {
    throw RequestError("prompt has " + std::to_string(n) + " tokens; this artifact accepts at most max_input_len=" +
                       std::to_string(limits.max_input_len));
  }
  if (max_new_tokens < 0) throw RequestError("max_new_tokens must be >= 0, got " + std::to_string(max_new_tokens));
  if (n + max_new_tokens > limits.max_seq_len) {
    throw RequestError("prompt (" + std::to_string(n) + " tokens) + max_new_tokens (" +
                       std::to_string(max_new_tokens) + ") exceeds max_seq_len=" +
                       std::to_string(limits.max_seq_len));
  }
  for (int64_t i = 0; i < n; ++i) {
    if (prompt[i] < 0 || prompt[i] >= vocab_size) {
      throw RequestError("prompt token " + std::to_string(i) + " is id " + std::to_string(prompt[i]) +
                         ", outside the vocabulary 0.." + std::to_string(vocab_size - 1));
    }
  }
}

namespace {

StepInputs prefill(const std::vector<int64_t>& prompt) {
  StepInputs step;
  step.seq = static_cast<int64_t>(prompt.size());
  step.input_ids = prompt;
  step.position_ids.resize(prompt.size());
  std::iota(step.position_ids.begin(), step.position_ids.end(), 0);
  step.write_indices = {0};
  step.logits_indices = {step.seq - 1};
  return step;
}

StepInputs decode(int64_t token, int64_t length) {
  StepInputs step;
  step.seq = 1;
  step.input_ids = {token};
  step.position_ids = {length};
  step.write_indices = {length};
  step.logits_indices = {0};
  return step;
}

}  // namespace

Generation generate_tokens(Executor& executor, const std::vector<int64_t>& prompt, const GenerateOptions& options,
                           const std::vector<int64_t>& eos_token_ids, const Limits& limits, int64_t vocab_size,
                           const TokenCallback& on_token) {
  check_sampling(options.sampling);
  check_request(prompt, options.max_new_tokens, limits, vocab_size);
  // No cache reset between requests (as in Python): a pass reads only the rows below its
  // write index plus its own, and every one of those was written by this request.
  SplitMix64 rng(options.sampling.seed);
  Generation gen;
  auto length = static_cast<int64_t>(prompt.size());
  std::vector<float> logits = executor.forward(prefill(prompt));
  while (static_cast<int64_t>(gen.token_ids.size()) < options.max_new_tokens) {
    const int64_t token = sample(logits.data(), logits.size(), options.sampling, rng);
    if (std::find(eos_token_ids.begin(), eos_token_ids.end(), token) != eos_token_ids.end()) {
      gen.finish_reason = FinishReason::kEos;
      return gen;
    }
    gen.token_ids.push_back(token);
    if (on_token) on_token(token);
    if (static_cast<int64_t>(gen.token_ids.size()) == options.max_new_tokens) break;
    logits = executor.forward(decode(token, length));
    ++length;
  }
  gen.finish_reason = FinishReason::kLength;
  return gen;
}

}  // namespace llmbuild
