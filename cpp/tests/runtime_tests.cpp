// Tests of the C++ runtime; each TEST_CASE is one ctest entry (`llmbuild_tests NAME`).
//
// Expected sampling values come from the Python runtime (llmbuild/runtime/sampling.py);
// the script that printed them is quoted above each table. Tests that need a compiled
// artifact read its path from the environment (tests/test_cpp.py sets both) and report
// "skipped" (exit 77) without it:
//   LLMBUILD_TEST_ARTIFACT          tiny float32 artifact (ONNX Runtime)
//   LLMBUILD_TEST_ENGINE_ARTIFACT   tiny float16 artifact with a tensorrt-rtx engine
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iostream>
#include <map>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "executor.h"
#include "generator.h"
#include "llmbuild/runtime.h"
#include "manifest.h"
#include "sampling.h"
#include "tensorrt_plan.h"

namespace fs = std::filesystem;
using namespace llmbuild;

// -- a minimal harness -------------------------------------------------------------------------

namespace {

std::map<std::string, std::function<void()>>& registry() {
  static std::map<std::string, std::function<void()>> tests;
  return tests;
}

struct Register {
  Register(const char* name, void (*fn)()) { registry()[name] = fn; }
};

struct Failure : std::runtime_error {
  using std::runtime_error::runtime_error;
};
struct Skip : std::runtime_error {
  using std::runtime_error::runtime_error;
};

template <typename A, typename B>
void check_equal(const A& a, const B& b, const char* expr, int line) {
  if (a == b) return;
  std::ostringstream out;
  out << "line " << line << ": " << expr << " is false";
  if constexpr (std::is_arithmetic_v<A> && std::is_arithmetic_v<B>) out << " (" << a << " vs " << b << ")";
  throw Failure(out.str());
}

// Runs `fn`, which must throw E with a message containing every fragment.
template <typename E>
void check_throws(const std::function<void()>& fn, const std::vector<std::string>& fragments, int line) {
  try {
    fn();
  } catch (const E& e) {
    for (const std::string& f : fragments) {
      if (std::string(e.what()).find(f) == std::string::npos) {
        throw Failure("line " + std::to_string(line) + ": message lacks '" + f + "': " + e.what());
      }
    }
    return;
  }
  throw Failure("line " + std::to_string(line) + ": no exception of the expected type");
}

std::string env_path(const char* name) {
  const char* value = std::getenv(name);
  if (!value || !*value) throw Skip(std::string(name) + " is not set (tests/test_cpp.py sets it)");
  return value;
}

void require_onnxruntime() {
  const auto b = available_backends();
  if (std::find(b.begin(), b.end(), "onnxruntime") == b.end()) throw Skip("built without ONNX Runtime");
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::random_device random;
    path = fs::temp_directory_path() / ("llmbuild-test-" + std::to_string(random()));
    fs::create_directories(path);
  }
  ~TempDir() { fs::remove_all(path); }
  void write(const std::string& name, const std::string& text) const {
    fs::create_directories((path / name).parent_path());
    std::ofstream(path / name) << text;
  }
};

// A manifest with every field the runtime reads (the graph file itself is not written).
std::string manifest_json(const std::string& schema_version) {
  return R"({"schema_version": )" + schema_version + R"(, "name": "synthetic",
    "model": {"num_layers": 2, "vocab_size": 256},
    "limits": {"max_batch_size": 1, "max_input_len": 8, "max_seq_len": 16},
    "graph": {"file": "model/model.onnx"}, "tokenizer": {"eos_token_ids": [2]}, "engines": []})";
}

// An executor whose logits make the scripted tokens the greedy choices; records each pass.
class ScriptedExecutor : public Executor {
 public:
  ScriptedExecutor(std::vector<int64_t> script, size_t vocab) : script_(std::move(script)), vocab_(vocab) {}
  const std::string& name() const override { return name_; }
  void reset(int64_t) override {}
  std::vector<float> forward(const StepInputs& step) override {
    steps.push_back(step);
    std::vector<float> logits(vocab_, 0.0f);
    logits.at(script_.at(steps.size() - 1)) = 1.0f;
    return logits;
  }
  std::vector<StepInputs> steps;

 private:
  const std::string name_ = "scripted";
  std::vector<int64_t> script_;
  size_t vocab_;
};

}  // namespace

#define TEST_CASE(name)                              \
  static void name();                                \
  static const Register name##_register(#name, name); \
  static void name()
#define CHECK(cond)                                                                          \
  do {                                                                                       \
    if (!(cond)) throw Failure("line " + std::to_string(__LINE__) + ": " #cond " is false"); \
  } while (0)
#define CHECK_EQ(a, b) check_equal((a), (b), #a " == " #b, __LINE__)
#define CHECK_THROWS(E, stmt, ...) check_throws<E>([&] { stmt; }, {__VA_ARGS__}, __LINE__)

// -- sampling: the Python specification, value for value ------------------------------------------

// SplitMix64(0) / SplitMix64(-1).next_u64() and SplitMix64(42).uniform() in Python.
TEST_CASE(splitmix64_matches_python) {
  SplitMix64 zero(0);
  CHECK_EQ(zero.next_u64(), 0xe220a8397b1dcdafULL);
  CHECK_EQ(zero.next_u64(), 0x6e789e6aa1b965f4ULL);
  CHECK_EQ(zero.next_u64(), 0x06c45d188009454fULL);
  SplitMix64 minus_one(static_cast<uint64_t>(-1));
  CHECK_EQ(minus_one.next_u64(), 0xe4d971771b652c20ULL);
  CHECK_EQ(minus_one.next_u64(), 0xe99ff867dbf682c9ULL);
  SplitMix64 rng(42);
  CHECK_EQ(rng.uniform(), 0.7415648787718233);
  CHECK_EQ(rng.uniform(), 0.1599103928769201);
  CHECK_EQ(rng.uniform(), 0.27860113025513866);
}

// logits = np.array([1.5, -0.25, 3.0, 3.0, 0.5, 2.75, -1.0, 0.0, 1.25, 2.0, -2.5, 0.75, 3.0, 1.0, -0.5, 2.5],
//                   np.float32)
// r = SplitMix64(p.seed); [sample(logits, p, r) for _ in range(20)]; candidate_probabilities(logits, p)
const std::vector<float> kLogits = {1.5f, -0.25f, 3.0f, 3.0f,  0.5f, 2.75f, -1.0f, 0.0f,
                                    1.25f, 2.0f, -2.5f, 0.75f, 3.0f, 1.0f, -0.5f, 2.5f};

struct SamplingCase {
  SamplingOptions options;
  std::vector<int64_t> tokens;  // 20 draws
  std::vector<int64_t> candidates;
  std::vector<double> probs;
};

const std::vector<SamplingCase> kSamplingCases = {
    {{1.0, 0, 1.0, 7},
     {12, 2, 8, 5, 12, 3, 12, 3, 2, 12, 2, 11, 13, 0, 0, 5, 0, 3, 5, 15},
     {2, 3, 12, 5, 15, 9, 0, 8, 13, 11, 4, 7, 1, 14, 6, 10},
     {0.17812308120040593, 0.17812308120040593, 0.17812308120040593, 0.13872239512196757, 0.10803710995052918,
      0.06552781957174078, 0.039744631634378344, 0.030953150239738388, 0.0241063376452351, 0.01877403463509278,
      0.014621232875219934, 0.00886822602161919, 0.006906581370091235, 0.00537885097937343, 0.003262438033015311,
      0.0007279483207810346}},
    {{0.7, 5, 1.0, 123},
     {12, 15, 5, 12, 12, 12, 15, 12, 12, 2, 5, 15, 3, 2, 15, 3, 3, 3, 2, 12},
     {2, 3, 12, 5, 15},
     {0.2387082524289011, 0.2387082524289011, 0.2387082524289011, 0.1670176086693124, 0.11685763404398436}},
    {{1.3, 0, 0.8, 2024},
     {5, 2, 3, 2, 15, 12, 2, 5, 2, 12, 12, 15, 15, 5, 2, 5, 0, 3, 15, 12},
     {2, 3, 12, 5, 15, 9, 0},
     {0.18923065594611727, 0.18923065594611727, 0.18923065594611727, 0.1561253141320171, 0.12881165364538888,
      0.08768368968495391, 0.05968737469928847}},
    {{0.9, 4, 0.6, 99},
     {2, 2, 12, 2, 2, 2, 12, 12, 3, 3, 3, 12, 2, 3, 2, 12, 2, 3, 2, 2},
     {2, 3, 12},
     {1.0 / 3, 1.0 / 3, 1.0 / 3}},
};

TEST_CASE(sampling_matches_python) {
  for (const SamplingCase& c : kSamplingCases) {
    SplitMix64 rng(c.options.seed);
    std::vector<int64_t> drawn;
    for (int i = 0; i < 20; ++i) drawn.push_back(sample(kLogits.data(), kLogits.size(), c.options, rng));
    CHECK(drawn == c.tokens);
    const Candidates got = candidate_probabilities(kLogits.data(), kLogits.size(), c.options);
    CHECK(got.ids == c.candidates);
    for (size_t i = 0; i < c.probs.size(); ++i) CHECK(std::fabs(got.probs[i] - c.probs[i]) <= 1e-15);
  }
}

TEST_CASE(greedy_takes_the_first_maximum_and_draws_nothing) {
  SplitMix64 rng(5);
  CHECK_EQ(sample(kLogits.data(), kLogits.size(), SamplingOptions{}, rng), 2);  // 3.0 at ids 2, 3 and 12
  CHECK_EQ(rng.next_u64(), SplitMix64(5).next_u64());
}

TEST_CASE(sampling_options_are_checked) {
  CHECK_THROWS(RequestError, check_sampling({-1.0, 0, 1.0, 0}), "temperature must be >= 0");
  CHECK_THROWS(RequestError, check_sampling({1.0, -1, 0.0, 0}), "top_k must be >= 0", "; top_p must be in (0, 1]");
  CHECK_THROWS(RequestError, check_sampling({1.0, 0, 1.5, 0}), "top_p must be in (0, 1], got 1.5");
  check_sampling({0.0, 0, 1.0, 0});
}

// -- generation over an executor -------------------------------------------------------------------

TEST_CASE(generator_sends_prefill_then_one_token_per_step) {
  ScriptedExecutor exec({7, 8, 9, 10, 11}, 16);
  std::vector<int64_t> streamed;
  GenerateOptions options;
  options.max_new_tokens = 3;
  const Generation g = generate_tokens(exec, {4, 5, 6}, options, {2}, {1, 8, 16}, 16,
                                       [&](int64_t t) { streamed.push_back(t); });
  CHECK((g.token_ids == std::vector<int64_t>{7, 8, 9}));
  CHECK(streamed == g.token_ids);
  CHECK(g.finish_reason == FinishReason::kLength);
  CHECK_EQ(exec.steps.size(), 3u);  // the last token is not fed back
  const StepInputs& prefill = exec.steps[0];
  CHECK((prefill.input_ids == std::vector<int64_t>{4, 5, 6}));
  CHECK((prefill.position_ids == std::vector<int64_t>{0, 1, 2}));
  CHECK((prefill.write_indices == std::vector<int64_t>{0}));
  CHECK((prefill.logits_indices == std::vector<int64_t>{2}));
  for (size_t i = 1; i < exec.steps.size(); ++i) {
    const StepInputs& step = exec.steps[i];
    const auto length = static_cast<int64_t>(3 + i - 1);
    CHECK_EQ(step.seq, 1);
    CHECK((step.input_ids == std::vector<int64_t>{g.token_ids[i - 1]}));
    CHECK((step.position_ids == std::vector<int64_t>{length}));
    CHECK((step.write_indices == std::vector<int64_t>{length}));
    CHECK((step.logits_indices == std::vector<int64_t>{0}));
  }
}

TEST_CASE(generator_stops_at_eos_without_returning_it) {
  ScriptedExecutor exec({7, 8, 3, 9}, 16);
  std::vector<int64_t> streamed;
  GenerateOptions options;
  options.max_new_tokens = 10;
  const Generation g = generate_tokens(exec, {4}, options, {2, 3}, {1, 8, 16}, 16,
                                       [&](int64_t t) { streamed.push_back(t); });
  CHECK((g.token_ids == std::vector<int64_t>{7, 8}));
  CHECK(streamed == g.token_ids);
  CHECK(g.finish_reason == FinishReason::kEos);
  CHECK_EQ(exec.steps.size(), 3u);
}

TEST_CASE(generator_with_zero_new_tokens_only_prefills) {
  ScriptedExecutor exec({7}, 16);
  GenerateOptions options;
  options.max_new_tokens = 0;
  const Generation g = generate_tokens(exec, {4, 5}, options, {2}, {1, 8, 16}, 16, nullptr);
  CHECK(g.token_ids.empty());
  CHECK(g.finish_reason == FinishReason::kLength);
  CHECK_EQ(exec.steps.size(), 1u);
}

TEST_CASE(requests_beyond_the_limits_are_rejected) {
  const Limits limits{1, 8, 16};
  CHECK_THROWS(RequestError, check_request({}, 4, limits, 256), "empty prompt");
  CHECK_THROWS(RequestError, check_request(std::vector<int64_t>(9, 1), 4, limits, 256), "prompt has 9 tokens",
               "max_input_len=8");
  CHECK_THROWS(RequestError, check_request(std::vector<int64_t>(8, 1), 9, limits, 256),
               "prompt (8 tokens) + max_new_tokens (9) exceeds max_seq_len=16");
  CHECK_THROWS(RequestError, check_request({1, 256}, 4, limits, 256), "prompt token 1 is id 256",
               "outside the vocabulary 0..255");
  CHECK_THROWS(RequestError, check_request({1}, -1, limits, 256), "max_new_tokens must be >= 0");
  check_request(std::vector<int64_t>(8, 1), 8, limits, 256);
}

// -- artifacts: clear errors --------------------------------------------------------------------------

TEST_CASE(missing_artifact_is_a_clear_error) {
  TempDir dir;
  CHECK_THROWS(ArtifactError, read_manifest(dir.path / "nope"), "artifact", "nope", "does not exist");
  CHECK_THROWS(ArtifactError, read_manifest(dir.path), "is not a complete llmbuild artifact (no manifest.json)");
  dir.write("manifest.json", "{ not json");
  CHECK_THROWS(ArtifactError, read_manifest(dir.path), "manifest.json: cannot read the manifest");
}

TEST_CASE(incompatible_schema_version_is_a_clear_error) {
  TempDir dir;
  dir.write("manifest.json", manifest_json("2"));
  CHECK_THROWS(ArtifactError, Model(dir.path.string()), "manifest schema version 2 is not supported",
               "(expected 1)");
  dir.write("manifest.json", R"({"name": "x"})");
  CHECK_THROWS(ArtifactError, read_manifest(dir.path), "manifest schema version null is not supported");
  dir.write("manifest.json", manifest_json("1"));
  const Manifest m = read_manifest(dir.path / "manifest.json");  // the file itself is accepted too
  CHECK_EQ(m.limits.max_seq_len, 16);
  CHECK((m.eos_token_ids == std::vector<int64_t>{2}));
}

TEST_CASE(incomplete_manifest_is_a_clear_error) {
  TempDir dir;
  dir.write("manifest.json", R"({"schema_version": 1, "name": "x", "model": {}})");
  CHECK_THROWS(ArtifactError, read_manifest(dir.path), "manifest lacks limits, graph, tokenizer, engines");
  std::string text = manifest_json("1");
  text.replace(text.find("\"max_seq_len\": 16"), 17, "\"max_seq_len\": \"16\"");
  dir.write("manifest.json", text);
  CHECK_THROWS(ArtifactError, read_manifest(dir.path), "manifest field limits.max_seq_len has the wrong type");
}

TEST_CASE(missing_or_broken_graph_is_a_clear_error) {
  require_onnxruntime();
  TempDir dir;
  dir.write("manifest.json", manifest_json("1"));
  CHECK_THROWS(ArtifactError, Model(dir.path.string(), {"onnxruntime", 1, ""}), "model/model.onnx",
               "the artifact's ONNX graph is missing");
  dir.write("model/model.onnx", "not a protobuf");
  CHECK_THROWS(ArtifactError, Model(dir.path.string(), {"onnxruntime", 1, ""}),
               "ONNX Runtime cannot load the graph");
  CHECK_THROWS(ArtifactError, Model(dir.path.string(), {"onnxruntime", 1, "model/lowered.onnx"}),
               "model/lowered.onnx: the artifact's ONNX graph is missing (graph_file = model/lowered.onnx)");
  CHECK_THROWS(RequestError, Model(dir.path.string(), {"bogus", 1, ""}), "runtime backend 'bogus' is not available");
}

// -- TensorRT binding plan and profile choice (no GPU needed) -------------------------------------------

// One layer, two profiles: 0 tuned for prompts (opt seq 16), 1 for decode (seq 1 only).
const char* kTwoProfileEngine = R"({
  "backend": "tensorrt", "file": "engines/x.engine", "trt_version": "10.15",
  "aliases": {"present_key.0": "past_key.0", "present_value.0": "past_value.0"},
  "io": [
    {"name": "input_ids", "mode": "input", "dtype": "int64", "shape": [-1, -1],
     "profile_shapes": [[[1, 1], [2, 16], [2, 32]], [[1, 1], [2, 1], [2, 1]]]},
    {"name": "position_ids", "mode": "input", "dtype": "int64", "shape": [-1, -1],
     "profile_shapes": [[[1, 1], [2, 16], [2, 32]], [[1, 1], [2, 1], [2, 1]]]},
    {"name": "write_indices", "mode": "input", "dtype": "int64", "shape": [-1],
     "profile_shapes": [[[1], [2], [2]], [[1], [2], [2]]]},
    {"name": "logits_indices", "mode": "input", "dtype": "int64", "shape": [-1, -1],
     "profile_shapes": [[[1, 1], [2, 1], [2, 32]], [[1, 1], [2, 1], [2, 1]]]},
    {"name": "past_key.0", "mode": "input", "dtype": "float16", "shape": [-1, 3, 64, 8],
     "profile_shapes": [[[1, 3, 64, 8], [2, 3, 64, 8], [2, 3, 64, 8]], [[1, 3, 64, 8], [2, 3, 64, 8], [2, 3, 64, 8]]]},
    {"name": "past_value.0", "mode": "input", "dtype": "float16", "shape": [-1, 3, 64, 8],
     "profile_shapes": [[[1, 3, 64, 8], [2, 3, 64, 8], [2, 3, 64, 8]], [[1, 3, 64, 8], [2, 3, 64, 8], [2, 3, 64, 8]]]},
    {"name": "logits", "mode": "output", "dtype": "float32", "shape": [-1, -1, 100]},
    {"name": "present_key.0", "mode": "output", "dtype": "float16", "shape": [-1, 3, 64, 8]},
    {"name": "present_value.0", "mode": "output", "dtype": "float16", "shape": [-1, 3, 64, 8]}
  ]})";

TEST_CASE(tensorrt_plan_sizes_buffers_and_aliases_the_cache) {
  const EngineEntry engine = parse_engine_entry(kTwoProfileEngine);
  std::map<std::string, Binding> plan;
  for (const Binding& b : binding_plan(engine)) plan[b.name] = b;
  CHECK_EQ(plan.size(), 9u);
  CHECK((plan["input_ids"].max_shape == Shape{2, 32}));
  CHECK_EQ(plan["input_ids"].nbytes(), 2u * 32 * 8);
  CHECK((plan["logits"].max_shape == Shape{2, 32, 100}));
  CHECK_EQ(plan["logits"].nbytes(), 2u * 32 * 100 * 4);
  CHECK_EQ(plan["past_key.0"].nbytes(), 2u * 3 * 64 * 8 * 2);
  CHECK(plan["past_key.0"].alias_of.empty());
  CHECK_EQ(plan["present_key.0"].alias_of, std::string("past_key.0"));
  CHECK_EQ(plan["present_value.0"].alias_of, std::string("past_value.0"));
  CHECK((plan["present_value.0"].max_shape == Shape{2, 3, 64, 8}));
}

TEST_CASE(tensorrt_profile_follows_the_phase) {
  const EngineEntry engine = parse_engine_entry(kTwoProfileEngine);
  CHECK_EQ(select_profile(engine, 1, 12, 1), 0);  // prefill
  CHECK_EQ(select_profile(engine, 2, 2, 1), 0);   // only profile 0 takes 2 tokens
  CHECK_EQ(select_profile(engine, 1, 1, 1), 1);   // decode: the tighter profile
  CHECK_EQ(select_profile(engine, 2, 1, 1), 1);
  CHECK_THROWS(RequestError, select_profile(engine, 1, 33, 1), "engines/x.engine: no optimization profile takes",
               "1 sequence(s) x 33 token(s)", "profile 0: batch <= 2, tokens <= 32, logits <= 32",
               "profile 1: batch <= 2, tokens <= 1, logits <= 1");
  CHECK_THROWS(RequestError, select_profile(engine, 3, 1, 1), "3 sequence(s) x 1 token(s)");
}

TEST_CASE(tensorrt_plan_of_a_built_engine) {
  const Manifest m = read_manifest(env_path("LLMBUILD_TEST_ENGINE_ARTIFACT"));
  CHECK_EQ(m.engines.size(), 1u);
  const EngineEntry& engine = m.engines[0];
  const std::vector<Binding> plan = binding_plan(engine);
  CHECK_EQ(plan.size(), 4 + 1 + 4 * static_cast<size_t>(m.num_layers));
  const Limits& l = m.limits;
  for (const Binding& b : plan) {
    if (b.name == io::kLogits) {
      CHECK((b.max_shape == Shape{l.max_batch_size, l.max_input_len, m.vocab_size}));
    } else if (b.name.rfind("present_", 0) == 0) {
      CHECK_EQ(b.alias_of, "past_" + b.name.substr(8));
    } else if (b.name.rfind("past_", 0) == 0) {
      CHECK_EQ(b.max_shape[0], l.max_batch_size);
      CHECK_EQ(b.max_shape[2], l.max_seq_len);
      CHECK_EQ(b.dtype, std::string("float16"));
    }
  }
  // Prefill and decode profiles (llmbuild/engine/profiles.py), or one profile for both.
  const auto& ids = std::find_if(engine.io.begin(), engine.io.end(), [](const TensorSpec& t) {
                      return t.name == io::kInputIds;
                    })->profile_shapes;
  const int prefill = select_profile(engine, 1, l.max_input_len, 1);
  CHECK_EQ(ids.at(prefill)[2][1], l.max_input_len);
  const int decode = select_profile(engine, l.max_batch_size, 1, 1);
  CHECK_EQ(decode, static_cast<int>(ids.size()) - 1);
  if (ids.size() == 2) CHECK((ids[1][2] == Shape{l.max_batch_size, 1}));
}

// -- a real artifact on ONNX Runtime -----------------------------------------------------------------------

TEST_CASE(model_generates_repeatably_and_streams) {
  require_onnxruntime();
  Model model(env_path("LLMBUILD_TEST_ARTIFACT"), {"auto", 1, ""});
  CHECK_EQ(model.backend(), std::string("onnxruntime"));
  GenerateOptions greedy;
  greedy.max_new_tokens = 12;
  std::vector<int64_t> streamed;
  const Generation first = model.generate({5, 40, 41, 42}, greedy, [&](int64_t t) { streamed.push_back(t); });
  CHECK(!first.token_ids.empty());
  CHECK(streamed == first.token_ids);
  model.generate({9, 9, 9, 9, 9, 9, 9, 9, 9, 9}, greedy);  // leaves other rows in the cache
  CHECK(model.generate({5, 40, 41, 42}, greedy).token_ids == first.token_ids);

  GenerateOptions seeded;
  seeded.max_new_tokens = 12;
  seeded.sampling = {1.0, 0, 1.0, 1234};
  const Generation a = model.generate({5, 40, 41, 42}, seeded);
  CHECK(model.generate({5, 40, 41, 42}, seeded).token_ids == a.token_ids);
  seeded.sampling.seed = 4321;
  CHECK(model.generate({5, 40, 41, 42}, seeded).token_ids != a.token_ids);
}

TEST_CASE(model_rejects_requests_beyond_its_limits) {
  require_onnxruntime();
  Model model(env_path("LLMBUILD_TEST_ARTIFACT"), {"onnxruntime", 1, ""});
  const Limits l = model.limits();
  GenerateOptions options;
  options.max_new_tokens = 1;
  CHECK_THROWS(RequestError, model.generate(std::vector<int64_t>(l.max_input_len + 1, 5), options),
               "max_input_len=" + std::to_string(l.max_input_len));
  options.max_new_tokens = l.max_seq_len;
  CHECK_THROWS(RequestError, model.generate({5}, options), "exceeds max_seq_len=" + std::to_string(l.max_seq_len));
  options.max_new_tokens = l.max_seq_len - l.max_input_len;  // the largest request that fits
  const Generation g = model.generate(std::vector<int64_t>(l.max_input_len, 5), options);
  CHECK(g.token_ids.size() <= static_cast<size_t>(options.max_new_tokens));
}

// -- main ----------------------------------------------------------------------------------------------------

int main(int argc, char** argv) {
  if (argc != 2 || !registry().count(argv[1])) {
    std::cerr << "usage: llmbuild_tests TEST_CASE\ncases:";
    for (const auto& [name, fn] : registry()) std::cerr << " " << name;
    std::cerr << "\n";
    return 2;
  }
  try {
    registry()[argv[1]]();
  } catch (const Skip& s) {
    std::cout << "SKIP " << argv[1] << ": " << s.what() << "\n";
    return 77;
  } catch (const std::exception& e) {
    std::cout << "FAIL " << argv[1] << ": " << e.what() << "\n";
    return 1;
  }
  std::cout << "PASS " << argv[1] << "\n";
  return 0;
}
