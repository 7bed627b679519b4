// llmbuild-generate ARTIFACT --prompt-ids IDS... [options]: token ids in, token ids out.
//
//   ids=$(llmbuild tokenize out/smollm2 "What is the capital of France?" --chat)
//   llmbuild-generate out/smollm2 --prompt-ids $ids | xargs llmbuild detokenize out/smollm2
//
// Exit status 0 on success, 2 for a user error (bad arguments, missing or incompatible
// artifact, request beyond the limits), 1 for anything else.
#include <chrono>
#include <cstdlib>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

#include <nlohmann/json.hpp>

#include "llmbuild/runtime.h"

namespace {

constexpr const char* kUsage = R"(usage: llmbuild-generate ARTIFACT --prompt-ids ID [ID ...] [options]

Generates token ids for a prompt given as token ids (`llmbuild tokenize ARTIFACT TEXT`)
and prints them space-separated (for `llmbuild detokenize ARTIFACT IDS...`).

options:
  --prompt-ids ID...      prompt token ids (separated by spaces or commas)
  --max-new-tokens N      default 64
  --temperature T         default 0 (greedy)
  --top-k K               default 0 (off)
  --top-p P               default 1 (off)
  --seed S                default 0
  --backend NAME          auto (default), onnxruntime or tensorrt
  --threads N             ONNX Runtime threads (default min(cores, 8))
  --graph FILE            ONNX Runtime: run FILE instead of the artifact's graph
  --standard-graph        ONNX Runtime: run graph.file (what TensorRT parses), not the
                          artifact's CPU-ready graph (graph.cpu.file, the default if present)
  --stream                print each id as it is generated
  --json                  print one JSON object: ids, finish reason, timings
  -h, --help
)";

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Args {
  std::string artifact;
  std::vector<int64_t> prompt;
  llmbuild::GenerateOptions generate;
  llmbuild::LoadOptions load;
  bool stream = false;
  bool json = false;
};

template <typename T>
T number(const std::string& option, const std::string& text) {
  std::istringstream in(text);
  T value{};
  if (!(in >> value) || !in.eof()) throw UsageError(option + ": not a number: '" + text + "'");
  return value;
}

void add_ids(const std::string& text, std::vector<int64_t>& ids) {
  std::string token;
  std::istringstream in(text);
  while (std::getline(in, token, ',')) {
    std::istringstream words(token);
    for (std::string word; words >> word;) ids.push_back(number<int64_t>("--prompt-ids", word));
  }
}

Args parse(int argc, char** argv) {
  Args args;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    auto value = [&]() -> std::string {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      return argv[++i];
    };
    if (arg == "-h" || arg == "--help") {
      std::cout << kUsage;
      std::exit(0);
    } else if (arg == "--prompt-ids") {
      while (i + 1 < argc && std::string(argv[i + 1]).rfind("--", 0) != 0) add_ids(argv[++i], args.prompt);
    } else if (arg == "--max-new-tokens") {
      args.generate.max_new_tokens = number<int64_t>(arg, value());
    } else if (arg == "--temperature") {
      args.generate.sampling.temperature = number<double>(arg, value());
    } else if (arg == "--top-k") {
      args.generate.sampling.top_k = number<int64_t>(arg, value());
    } else if (arg == "--top-p") {
      args.generate.sampling.top_p = number<double>(arg, value());
    } else if (arg == "--seed") {  // like Python, a negative seed is taken modulo 2^64
      const std::string text = value();
      args.generate.sampling.seed = text.rfind("-", 0) == 0 ? static_cast<uint64_t>(number<int64_t>(arg, text))
                                                             : number<uint64_t>(arg, text);
    } else if (arg == "--backend") {
      args.load.backend = value();
    } else if (arg == "--graph") {
      args.load.graph_file = value();
    } else if (arg == "--standard-graph") {
      args.load.standard_graph = true;
    } else if (arg == "--threads") {
      args.load.threads = number<int>(arg, value());
    } else if (arg == "--stream") {
      args.stream = true;
    } else if (arg == "--json") {
      args.json = true;
    } else if (arg.rfind("-", 0) == 0) {
      throw UsageError("unknown option " + arg);
    } else if (args.artifact.empty()) {
      args.artifact = arg;
    } else {
      throw UsageError("unexpected argument '" + arg + "'");
    }
  }
  if (args.artifact.empty()) throw UsageError("missing ARTIFACT");
  if (args.prompt.empty()) throw UsageError("missing --prompt-ids");
  return args;
}

int run(const Args& args) {
  using Clock = std::chrono::steady_clock;
  const auto load_start = Clock::now();
  llmbuild::Model model(args.artifact, args.load);
  const double load_seconds = std::chrono::duration<double>(Clock::now() - load_start).count();
  std::vector<Clock::time_point> times;
  const auto start = Clock::now();
  bool first = true;
  const llmbuild::Generation g = model.generate(args.prompt, args.generate, [&](int64_t token) {
    times.push_back(Clock::now());
    if (args.stream && !args.json) {
      std::cout << (first ? "" : " ") << token << std::flush;
      first = false;
    }
  });
  if (args.json) {
    const auto seconds = [](Clock::time_point a, Clock::time_point b) {
      return std::chrono::duration<double>(b - a).count();
    };
    nlohmann::json out = {
        {"backend", model.backend()},
        {"graph", model.graph()},
        {"seconds_to_load", load_seconds},  // manifest + ONNX Runtime session (or engine)
        {"prompt_tokens", args.prompt.size()},
        {"token_ids", g.token_ids},
        {"finish_reason", llmbuild::to_string(g.finish_reason)},
        {"seconds_to_first_token", times.empty() ? 0.0 : seconds(start, times.front())},
        // Decode rate: tokens after the first over the time between the first and the last.
        {"decode_tokens_per_second",
         times.size() < 2 ? 0.0 : (times.size() - 1) / seconds(times.front(), times.back())},
    };
    std::cout << out.dump() << "\n";
  } else if (args.stream) {
    std::cout << "\n";
  } else {
    for (size_t i = 0; i < g.token_ids.size(); ++i) std::cout << (i ? " " : "") << g.token_ids[i];
    std::cout << "\n";
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    return run(parse(argc, argv));
  } catch (const UsageError& e) {
    std::cerr << "llmbuild-generate: error: " << e.what() << "\n(run with --help for usage)\n";
    return 2;
  } catch (const llmbuild::Error& e) {
    std::cerr << "llmbuild-generate: error: " << e.what() << "\n";
    return dynamic_cast<const llmbuild::ArtifactError*>(&e) || dynamic_cast<const llmbuild::RequestError*>(&e) ? 2
                                                                                                              : 1;
  } catch (const std::exception& e) {
    std::cerr << "llmbuild-generate: error: " << e.what() << "\n";
    return 1;
  }
}
