// What the programs share: the command line, the signature's files, the input checks, the timing
// mode (--repeat) and the error convention (one line on stderr; exit 0 success, 1 error, 2 usage
// error).
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

#include "npy.hpp"

namespace lstm_cli {

// The deployed signature (export/lstm_deploy_export/signature.py): names, in order.
inline const std::vector<std::string> kInputNames = {"input", "lengths", "h0", "c0"};
inline const std::vector<std::string> kOutputNames = {"output", "hn", "cn"};

struct Args {
  std::string program;  // the program's name, for the timing line
  std::string model, inputs, outputs;
  int threads = 0;  // 0: the library's default
  int repeat = 0;   // timed runs after the first (0: no timing)
  int warmup = 1;   // untimed runs before the timed ones
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
         " --inputs DIR --outputs DIR [--threads N] [--repeat N [--warmup K]]\n";
}

inline std::string help(const Program& p) {
  return usage(p) + "\nRuns the " + p.model + " of an lstm-deploy bundle with " + p.runtime +
         " on the CPU.\n\n"
         "  --model PATH   the bundle's " + p.model + "\n"
         "  --inputs DIR   a directory holding the four inputs as .npy files (C order):\n"
         "                   input.npy    float32 [batch, sequence, input_size]\n"
         "                   lengths.npy  int64   [batch], each in [1, sequence]\n"
         "                   h0.npy       float32 [batch, L * D, H_out]\n"
         "                   c0.npy       float32 [batch, L * D, hidden_size]\n"
         "                 L = num_layers, D = 2 if bidirectional else 1,\n"
         "                 H_out = proj_size if proj_size > 0 else hidden_size\n"
         "  --outputs DIR  where to write output.npy [batch, sequence, D * H_out],\n"
         "                 hn.npy [batch, L * D, H_out] and cn.npy [batch, L * D, hidden_size]\n"
         "                 (float32; the directory is created if missing)\n"
         "  --threads N    intra-op threads (default: " + p.runtime + "'s choice)\n"
         "  --repeat N     timing mode: after the run whose outputs are written, K untimed and\n"
         "                 N timed runs in this process (inputs loaded once), then one JSON line\n"
         "                 on stdout: each run's wall and CPU milliseconds (times_ms,\n"
         "                 cpu_times_ms) and the wall times' median_ms, min_ms, p90_ms, max_ms\n"
         "  --warmup K     untimed runs before the timed ones (default 1; with --repeat)\n"
         "  --version      print the " + p.runtime + " version\n"
         "  -h, --help     show this help\n\n"
         "Make the inputs with numpy, e.g. numpy.save(\"in/input.npy\", x.astype(numpy.float32)).\n"
         "Outputs at steps t >= lengths[b] are zeros; hn, cn are the state after each sequence's\n"
         "last valid step.\n\n"
         "Exit status: 0 success, 1 error (files, model, run), 2 usage error.\n";
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
    std::string* slot = arg == "--model" ? &a.model
                        : arg == "--inputs" ? &a.inputs
                        : arg == "--outputs" ? &a.outputs
                        : arg == "--threads" ? &threads
                        : arg == "--repeat"  ? &repeat
                        : arg == "--warmup"  ? &warmup
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
  if (!threads.empty()) a.threads = parse_count("--threads", threads, 1);
  if (!repeat.empty()) a.repeat = parse_count("--repeat", repeat, 1);
  if (!warmup.empty()) {
    if (repeat.empty()) throw UsageError("--warmup needs --repeat (it warms up the timed runs)");
    a.warmup = parse_count("--warmup", warmup, 0);
  }
  return a;
}

// The four inputs, read from DIR and checked against each other (the model checks its own sizes).
struct Inputs {
  npy::Array input, lengths, h0, c0;
  int64_t batch = 0, steps = 0;
};

inline void expect_rank(const npy::Array& a, const std::string& file, size_t rank,
                        const std::string& dims) {
  if (a.shape.size() != rank)
    throw std::runtime_error(file + ": shape " + npy::shape_str(a.shape) + ", expected " + dims);
}

inline Inputs load_inputs(const std::string& dir) {
  namespace fs = std::filesystem;
  if (!fs::is_directory(dir)) throw std::runtime_error(dir + ": not a directory (--inputs)");
  auto path = [&](const std::string& name) { return (fs::path(dir) / (name + ".npy")).string(); };
  Inputs in;
  in.input = npy::load(path("input"), "<f4");
  in.lengths = npy::load(path("lengths"), "<i8");
  in.h0 = npy::load(path("h0"), "<f4");
  in.c0 = npy::load(path("c0"), "<f4");
  expect_rank(in.input, path("input"), 3, "[batch, sequence, input_size]");
  expect_rank(in.lengths, path("lengths"), 1, "[batch]");
  expect_rank(in.h0, path("h0"), 3, "[batch, num_layers * num_directions, H_out]");
  expect_rank(in.c0, path("c0"), 3, "[batch, num_layers * num_directions, hidden_size]");
  in.batch = in.input.shape[0];
  in.steps = in.input.shape[1];
  if (in.batch < 1 || in.steps < 1)
    throw std::runtime_error(path("input") + ": shape " + npy::shape_str(in.input.shape) +
                             ", batch and sequence must be at least 1");
  for (const auto& [name, a] : {std::pair<std::string, const npy::Array*>{"lengths", &in.lengths},
                                {"h0", &in.h0}, {"c0", &in.c0}})
    if (a->shape[0] != in.batch)
      throw std::runtime_error(path(name) + ": batch " + std::to_string(a->shape[0]) +
                               ", input.npy has batch " + std::to_string(in.batch));
  if (in.h0.shape[1] != in.c0.shape[1])
    throw std::runtime_error(path("c0") + ": shape " + npy::shape_str(in.c0.shape) +
                             ", its dimension 1 must equal h0's " + npy::shape_str(in.h0.shape));
  const int64_t* lengths = in.lengths.as<int64_t>();
  for (int64_t b = 0; b < in.batch; ++b)
    if (lengths[b] < 1 || lengths[b] > in.steps)
      throw std::runtime_error(path("lengths") + ": lengths[" + std::to_string(b) + "] = " +
                               std::to_string(lengths[b]) + " is outside [1, " +
                               std::to_string(in.steps) + "] (sequence = input.npy's dimension 1)");
  return in;
}

// One output of the signature, float32 in C order; creates `dir` if missing.
inline void save_output(const std::string& dir, const std::string& name,
                        const std::vector<int64_t>& shape, const float* data) {
  std::filesystem::create_directories(dir);
  npy::save((std::filesystem::path(dir) / (name + ".npy")).string(), "<f4", shape, data);
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
