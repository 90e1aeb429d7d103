// What the programs share: the command line, the timing mode (--repeat) and the error convention
// (one line on stderr; exit 0 success, 1 error, 2 usage error). The signature, its files and
// their checks are bundle.hpp's.
#pragma once

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <ctime>
#include <exception>
#include <filesystem>
#include <functional>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#include "bundle.hpp"

namespace lstm_cli {

struct Args {
  std::string program;  // the program's name, for the timing line
  std::string model, inputs, outputs;
  std::string manifest;  // default: manifest.json beside --model
  int threads = 0;       // 0: the library's default
  int repeat = 0;        // timed runs after the first (0: no timing)
  int warmup = 1;        // untimed runs before the timed ones
};

struct Program {
  std::string name;     // e.g. "lstm_torchscript"
  std::string runtime;  // e.g. "LibTorch"
  std::string model;    // e.g. "model.pt"
  std::function<std::string()> version;
};

class UsageError : public std::runtime_error {
  using std::runtime_error::runtime_error;
};

inline std::string usage(const Program& p) {
  return "usage: " + p.name + " --model " + p.model +
         " --inputs DIR --outputs DIR [--manifest PATH] [--threads N] [--repeat N [--warmup K]]\n";
}

inline std::string help(const Program& p) {
  return usage(p) + "\nRuns the " + p.model + " of an lstm-deploy bundle with " + p.runtime +
         " on the CPU. The tensors it takes and\n"
         "returns are those of the signature in the bundle's manifest.json, by name.\n\n"
         "  --model PATH     the bundle's " + p.model + "\n"
         "  --inputs DIR     one .npy file (C order) per input of the signature: DIR/<name>.npy,\n"
         "                   of the input's dtype and shape\n"
         "  --outputs DIR    where to write each output of the signature as DIR/<name>.npy, of its\n"
         "                   dtype (the directory is created if missing)\n"
         "  --manifest PATH  the bundle's manifest.json (default: the one beside --model)\n"
         "  --threads N      intra-op threads (default: " + p.runtime + "'s choice)\n"
         "  --repeat N       timing mode: after the run whose outputs are written, K untimed and\n"
         "                   N timed runs in this process (inputs loaded once), then one JSON line\n"
         "                   on stdout: each run's wall and CPU milliseconds (times_ms,\n"
         "                   cpu_times_ms) and the wall times' median_ms, min_ms, p90_ms, max_ms\n"
         "  --warmup K       untimed runs before the timed ones (default 1; with --repeat)\n"
         "  --version        print the " + p.runtime + " version\n"
         "  -h, --help       show this help\n\n"
         "The signature (manifest.json's \"signature\") lists each input and output's name, dtype\n"
         "(" + npy::dtype_names() + ") and shape, whose named axes\n"
         "(batch, sequence) take any size >= 1, the same in every input. The input that carries\n"
         "each sequence's length (an LSTM bundle's lengths, a whole model's \"model\": \"lengths\")\n"
         "holds values in [1, sequence]; integer inputs with a declared range (\"model\":\n"
         "\"ranges\", e.g. token ids) must lie in it. An LSTM bundle's signature, for example:\n"
         "  inputs   input.npy    float32 [batch, sequence, input_size]\n"
         "           lengths.npy  int64   [batch]\n"
         "           h0.npy       float32 [batch, L * D, H_out]\n"
         "           c0.npy       float32 [batch, L * D, hidden_size]\n"
         "  outputs  output.npy   float32 [batch, sequence, D * H_out]\n"
         "           hn.npy, cn.npy as h0.npy, c0.npy\n"
         "  (L = num_layers, D = 2 if bidirectional else 1,\n"
         "  H_out = proj_size if proj_size > 0 else hidden_size)\n\n"
         "Make the inputs with numpy, e.g. numpy.save(\"in/input.npy\", x.astype(numpy.float32)).\n\n"
         "Exit status: 0 success, 1 error (files, manifest, model, run), 2 usage error.\n";
}

// A count flag's value: an integer >= minimum, or a UsageError that names the flag.
inline int parse_count(const std::string& flag, const std::string& text, int minimum) {
  size_t used = 0;
  int value = -1;
  try {
    value = std::stoi(text, &used);
  } catch (const std::exception&) {
  }
  if (used != text.size() || value < minimum)
    throw UsageError(flag + " needs a " + (minimum > 0 ? "positive" : "non-negative") +
                     " integer, got " + text);
  return value;
}

// Parses argv; prints help or the version and exits 0, throws UsageError on a bad command line.
inline Args parse_args(int argc, char** argv, const Program& p) {
  Args a;
  a.program = p.name;
  std::string threads, repeat, warmup;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i], value;
    if (arg == "-h" || arg == "--help") {
      std::cout << help(p);
      std::exit(0);
    }
    if (arg == "--version") {
      std::cout << p.name << ": " << p.runtime << " " << p.version() << "\n";
      std::exit(0);
    }
    const size_t eq = arg.find('=');
    const bool inline_value = arg.rfind("--", 0) == 0 && eq != std::string::npos;
    if (inline_value) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    }
    std::string* slot = arg == "--model"      ? &a.model
                        : arg == "--inputs"   ? &a.inputs
                        : arg == "--outputs"  ? &a.outputs
                        : arg == "--manifest" ? &a.manifest
                        : arg == "--threads"  ? &threads
                        : arg == "--repeat"   ? &repeat
                        : arg == "--warmup"   ? &warmup
                                              : nullptr;
    if (!slot) throw UsageError("unrecognized argument " + arg);
    if (!inline_value) {
      if (i + 1 >= argc) throw UsageError(arg + " needs a value");
      value = argv[++i];
    }
    *slot = value;
  }
  for (auto [flag, value] :
       {std::pair{"--model", &a.model}, {"--inputs", &a.inputs}, {"--outputs", &a.outputs}})
    if (value->empty()) throw UsageError(std::string(flag) + " is required");
  if (a.manifest.empty())
    a.manifest = (std::filesystem::path(a.model).parent_path() / bundle::kManifest).string();
  if (!threads.empty()) a.threads = parse_count("--threads", threads, 1);
  if (!repeat.empty()) a.repeat = parse_count("--repeat", repeat, 1);
  if (!warmup.empty()) {
    if (repeat.empty()) throw UsageError("--warmup needs --repeat (it warms up the timed runs)");
    a.warmup = parse_count("--warmup", warmup, 0);
  }
  return a;
}

// A message on one line: library errors (ONNX Runtime's shape errors) span several.
inline std::string one_line(const std::string& message) {
  std::string out;
  for (char c : message) {
    const bool space = c == '\n' || c == '\r' || c == '\t' || c == ' ';
    if (!space) out += c;
    else if (!out.empty() && out.back() != ' ') out += ' ';
  }
  if (!out.empty() && out.back() == ' ') out.pop_back();
  return out;
}

// --- the timing mode (--repeat) ---------------------------------------------------------------

// numpy.percentile's default (linear interpolation between the closest ranks), q in [0, 1].
inline double quantile(std::vector<double> values, double q) {
  std::sort(values.begin(), values.end());
  const double position = q * double(values.size() - 1);
  const size_t low = size_t(position);
  const size_t high = std::min(low + 1, values.size() - 1);
  return values[low] + (position - double(low)) * (values[high] - values[low]);
}

inline std::string json_list(const std::vector<double>& values) {
  std::ostringstream out;
  out << std::setprecision(6) << std::fixed << "[";
  for (size_t i = 0; i < values.size(); ++i) out << (i ? ", " : "") << values[i];
  return out.str() + "]";
}

// The timing line: one JSON object on stdout, read by lstm-deploy bench (tools/cpp.py).
inline void print_timing(const Args& a, const std::vector<double>& wall_ms,
                         const std::vector<double>& cpu_ms) {
  std::ostringstream out;
  out << std::setprecision(6) << std::fixed;
  out << "{\"program\": \"" << a.program << "\", \"threads\": ";
  if (a.threads > 0)
    out << a.threads;
  else
    out << "null";
  out << ", \"warmup\": " << a.warmup << ", \"repeat\": " << a.repeat
      << ", \"median_ms\": " << quantile(wall_ms, 0.5) << ", \"min_ms\": " << quantile(wall_ms, 0)
      << ", \"p90_ms\": " << quantile(wall_ms, 0.9) << ", \"max_ms\": " << quantile(wall_ms, 1)
      << ", \"times_ms\": " << json_list(wall_ms) << ", \"cpu_times_ms\": " << json_list(cpu_ms)
      << "}";
  std::cout << out.str() << std::endl;
}

namespace detail {
inline bool& forward_ran() {  // whether the program went through run_forward (run_main checks)
  static bool ran = false;
  return ran;
}
}  // namespace detail

// Every program's forward pass goes through here: `forward()` runs the model on the loaded inputs
// and `write(result)` saves the outputs, once. With --repeat, `forward` then runs --warmup times
// untimed and --repeat times timed (wall: steady_clock; CPU: std::clock, all threads of the
// process, as Python's time.process_time), and the timing line is printed. The inputs stay loaded
// and bound, so what is timed is the runtime's forward alone, as bench times its Python rows.
template <typename Forward, typename Write>
void run_forward(const Args& a, Forward&& forward, Write&& write) {
  write(forward());
  detail::forward_ran() = true;
  if (a.repeat == 0) return;
  for (int i = 0; i < a.warmup; ++i) forward();
  std::vector<double> wall_ms, cpu_ms;
  for (int i = 0; i < a.repeat; ++i) {
    const auto wall = std::chrono::steady_clock::now();
    const std::clock_t cpu = std::clock();
    forward();
    cpu_ms.push_back(1e3 * double(std::clock() - cpu) / CLOCKS_PER_SEC);
    wall_ms.push_back(
        std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - wall).count());
  }
  print_timing(a, wall_ms, cpu_ms);
}

// Runs `body` and turns every exception into one line on stderr and an exit status.
inline int run_main(int argc, char** argv, const Program& p,
                    const std::function<void(const Args&)>& body) {
  Args args;
  try {
    args = parse_args(argc, argv, p);
  } catch (const UsageError& e) {
    std::cerr << usage(p) << p.name << ": error: " << e.what() << " (see --help)\n";
    return 2;
  }
  try {
    body(args);
    if (args.repeat > 0 && !detail::forward_ran())
      throw std::logic_error("--repeat: this program does not run its model through "
                             "lstm_cli::run_forward, so nothing was timed");
  } catch (const std::exception& e) {
    std::cerr << p.name << ": error: " << one_line(e.what()) << "\n";
    return 1;
  }
  return 0;
}

}  // namespace lstm_cli
