// Runs a bundle's model.pt with LibTorch: forward(input, lengths, h0, c0) -> (output, hn, cn).
// Usage: lstm_torchscript --model model.pt --inputs DIR --outputs DIR [--repeat N] (see --help).
#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "lstm_cli.hpp"
#include "lstm_torch.hpp"

namespace {

using lstm_torch::describe;
using lstm_torch::to_tensor;

void run(const lstm_cli::Args& args) {
  lstm_cli::Inputs in = lstm_cli::load_inputs(args.inputs);
  if (args.threads > 0) at::set_num_threads(args.threads);
  torch::jit::Module module;
  try {
    module = torch::jit::load(args.model, torch::kCPU);
  } catch (const std::exception& e) {
    throw std::runtime_error(args.model + ": cannot load a TorchScript module (" + describe(e) +
                             ")");
  }
  module.eval();

  c10::InferenceMode inference;
  // One forward per process: the graph executor's first call only profiles shapes for optimizing
  // later calls, which never come, and costs seconds at long sequences. Off, the first call runs
  // the same ops without profiling. With --repeat the later calls come: on, as for a module that
  // torch.jit.load gives Python (bench's model.pt row), so that both languages time the same.
  torch::jit::GraphOptimizerEnabledGuard optimizer(args.repeat > 0);
  const std::vector<c10::IValue> inputs = {
      to_tensor(in.input, torch::kFloat32), to_tensor(in.lengths, torch::kInt64),
      to_tensor(in.h0, torch::kFloat32), to_tensor(in.c0, torch::kFloat32)};
  const auto forward = [&] {
    try {
      return module.forward(inputs);
    } catch (const std::exception& e) {
      throw std::runtime_error(args.model + ": forward failed: " + describe(e));
    }
  };
  const auto write = [&](const c10::IValue& result) {
    if (!result.isTuple() ||
        result.toTupleRef().elements().size() != lstm_cli::kOutputNames.size())
      throw std::runtime_error(args.model + ": forward returned " + result.tagKind() +
                               ", expected a tuple (output, hn, cn); is it an lstm-deploy "
                               "model.pt?");
    std::vector<torch::Tensor> outputs;
    for (const auto& value : result.toTupleRef().elements()) outputs.push_back(value.toTensor());
    lstm_torch::save_outputs(args, outputs);
  };
  lstm_cli::run_forward(args, forward, write);
}

}  // namespace

int main(int argc, char** argv) {
  const lstm_cli::Program program{"lstm_torchscript", "LibTorch", "model.pt",
                                  [] { return std::string(TORCH_VERSION); }};
  return lstm_cli::run_main(argc, argv, program, run);
}
