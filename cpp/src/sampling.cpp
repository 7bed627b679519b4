#include "sampling.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <sstream>
#include <string>

namespace llmbuild {

uint64_t SplitMix64::next_u64() {
  state_ += 0x9E3779B97F4A7C15ULL;
  uint64_t z = state_;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
  return z ^ (z >> 31);
}

double SplitMix64::uniform() { return static_cast<double>(next_u64() >> 11) * (1.0 / 9007199254740992.0); }

namespace {

// numpy's pairwise summation (float64 add.reduce): blocks of up to 128 summed with eight
// running partial sums, larger arrays split in halves aligned to 8.
double pairwise_sum(const double* a, size_t n) {
  if (n < 8) {
    double sum = 0.0;
    for (size_t i = 0; i < n; ++i) sum += a[i];
    return sum;
  }
  if (n <= 128) {
    double r[8];
    std::copy(a, a + 8, r);
    size_t i = 8;
    for (; i < n - n % 8; i += 8) {
      for (size_t j = 0; j < 8; ++j) r[j] += a[i + j];
    }
    double sum = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
    for (; i < n; ++i) sum += a[i];
    return sum;
  }
  size_t half = n / 2;
  half -= half % 8;
  return pairwise_sum(a, half) + pairwise_sum(a + half, n - half);
}

void normalise(std::vector<double>& p) {
  const double total = pairwise_sum(p.data(), p.size());
  for (double& v : p) v /= total;
}

}  // namespace

void check_sampling(const SamplingOptions& o) {
  auto str = [](double v) {
    std::ostringstream out;
    out << v;
    return out.str();
  };
  std::string problems;
  auto problem = [&problems](const std::string& text) { problems += (problems.empty() ? "" : "; ") + text; };
  if (!(o.temperature >= 0.0)) problem("temperature must be >= 0, got " + str(o.temperature));
  if (o.top_k < 0) problem("top_k must be >= 0, got " + std::to_string(o.top_k));
  if (!(o.top_p > 0.0 && o.top_p <= 1.0)) problem("top_p must be in (0, 1], got " + str(o.top_p));
  if (!problems.empty()) throw RequestError(problems);
}

int64_t argmax(const float* logits, size_t vocab) {
  return std::max_element(logits, logits + vocab) - logits;  // first maximum
}

Candidates candidate_probabilities(const float* logits, size_t vocab, const SamplingOptions& options) {
  std::vector<double> x(vocab);
  for (size_t i = 0; i < vocab; ++i) x[i] = static_cast<double>(logits[i]) / options.temperature;
  std::vector<int64_t> order(vocab);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&x](int64_t a, int64_t b) { return x[a] > x[b]; });
  if (options.top_k > 0 && static_cast<size_t>(options.top_k) < order.size()) order.resize(options.top_k);

  std::vector<double> p(order.size());
  const double top = x[order[0]];
  for (size_t i = 0; i < order.size(); ++i) p[i] = std::exp(x[order[i]] - top);
  normalise(p);
  if (options.top_p < 1.0) {
    size_t n = 0;  // shortest prefix whose cumulative probability is >= top_p
    double cum = 0.0;
    while (n < p.size()) {
      cum += p[n++];
      if (cum >= options.top_p) break;
    }
    order.resize(n);
    p.resize(n);
    normalise(p);
  }
  return {std::move(order), std::move(p)};
}

int64_t sample(const float* logits, size_t vocab, const SamplingOptions& options, SplitMix64& rng) {
  if (options.temperature == 0.0) return argmax(logits, vocab);
  const Candidates c = candidate_probabilities(logits, vocab, options);
  const double u = rng.uniform();
  double cum = 0.0;
  for (size_t i = 0; i < c.probs.size(); ++i) {
    cum += c.probs[i];
    if (cum > u) return c.ids[i];
  }
  return c.ids.back();
}

}  // namespace llmbuild
