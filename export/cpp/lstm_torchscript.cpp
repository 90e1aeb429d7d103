// Runs a bundle's model.pt with LibTorch: forward(*inputs) with the signature's inputs in order
// (an LSTM bundle's: input, lengths, h0, c0), its result (a tensor, or tuples of them) written as
// the signature's outputs. Usage: lstm_torchscript --model model.pt --inputs DIR --outputs DIR
// [--repeat N] (see --help).
#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "bundle.hpp"
#include "lstm_cli.hpp"
#include "lstm_torch.hpp"

namespace {

using lstm_torch::describe;

// The tensors of forward's result, depth first: a tensor, or tuples and lists of them.
void flatten(const c10::IValue& value, const std::string& model, std::vector<at::Tensor>& out) {
  if (value.isTensor()) {
    out.push_back(value.toTensor());
  } else if (value.isTuple()) {
    for (const auto& element : value.toTupleRef().elements()) flatten(element, model, out);
  } else if (value.isList()) {
    for (const auto& element : value.toListRef()) flatten(element, model, out);
  } else {
    throw std::runtime_error(model + ": forward returned a " + value.tagKind() +
                             "; the programs take a tensor or (nested) tuples of tensors");
  }
}

void run(const lstm_cli::Args& args) {
  if (args.threads > 0) at::set_num_threads(args.threads);
  torch::jit::Module module;
  try {
    module = torch::jit::load(args.model, torch::kCPU);
  } catch (const std::exception& e) {
    throw std::runtime_error(args.model + ": cannot load a TorchScript module (" + describe(e) +
                             ")");
  }
  module.eval();
  const bundle::Signature signature = bundle::read_signature(args.manifest);
  std::vector<npy::Array> arrays = bundle::load_inputs(signature, args.inputs, args.model);

  c10::InferenceMode inference;
  // One forward per process: the graph executor's first call only profiles shapes for optimizing
  // later calls, which never come, and costs seconds at long sequences. Off, the first call runs
  // the same ops without profiling. With --repeat the later calls come: on, as for a module that
  // torch.jit.load gives Python (bench's model.pt row), so that both languages time the same.
  torch::jit::GraphOptimizerEnabledGuard optimizer(args.repeat > 0);
  std::vector<c10::IValue> inputs;
  for (const auto& t : lstm_torch::to_tensors(arrays)) inputs.emplace_back(t);
  const auto forward = [&] {
    try {
      return module.forward(inputs);
    } catch (const std::exception& e) {
      throw std::runtime_error(args.model + ": forward failed: " + describe(e));
    }
  };
  const auto write = [&](const c10::IValue& result) {
    std::vector<at::Tensor> outputs;
    flatten(result, args.model, outputs);
    lstm_torch::save_outputs(args, signature, outputs);
  };
  lstm_cli::run_forward(args, forward, write);
}

}  // namespace

int main(int argc, char** argv) {
  const lstm_cli::Program program{"lstm_torchscript", "LibTorch", "model.pt",
                                  [] { return std::string(TORCH_VERSION); }};
  return lstm_cli::run_main(argc, argv, program, run);
}
