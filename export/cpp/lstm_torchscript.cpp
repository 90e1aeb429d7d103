// Runs a bundle's model.pt with LibTorch: forward(input, lengths, h0, c0) -> (output, hn, cn).
// Usage: lstm_torchscript --model model.pt --inputs DIR --outputs DIR [--repeat N] (see --help).
#include <ATen/Parallel.h>
#include <torch/csrc/jit/runtime/graph_executor.h>
#include <torch/script.h>
#include <torch/version.h>

#include <string>
#include <vector>

#include "lstm_cli.hpp"

namespace {

torch::Tensor to_tensor(npy::Array& a, torch::Dtype dtype) {  // no copy
  return torch::from_blob(a.data.data(), a.shape, torch::TensorOptions().dtype(dtype));
}

// A LibTorch error in one line. A TorchScript interpreter error (torch::jit::JITException, a
// std::runtime_error) is two tracebacks whose last line is the cause:
// "builtins.RuntimeError: LSTM: input.size(-1) must be equal to input_size. Expected 5, got 6".
std::string describe(const std::exception& e) {
  const auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string m = c10_error ? c10_error->what_without_backtrace() : e.what();
  while (!m.empty() && m.back() == '\n') m.pop_back();
  if (m.find("Traceback of TorchScript") != std::string::npos) {
    m = m.substr(m.rfind('\n') + 1);
    if (m.rfind("builtins.", 0) == 0) m = m.substr(std::string("builtins.").size());
  }
  return lstm_cli::one_line(m);
}

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
    const auto& outputs = result.toTupleRef().elements();
    for (size_t i = 0; i < outputs.size(); ++i) {
      const std::string& name = lstm_cli::kOutputNames[i];
      const torch::Tensor t = outputs[i].toTensor().to(torch::kCPU).contiguous();
      if (t.scalar_type() != torch::kFloat32)
        throw std::runtime_error(args.model + ": output " + name + " is " +
                                 c10::toString(t.scalar_type()) + ", expected float32");
      lstm_cli::save_output(args.outputs, name, t.sizes().vec(), t.const_data_ptr<float>());
    }
  };
  lstm_cli::run_forward(args, forward, write);
}

}  // namespace

int main(int argc, char** argv) {
  const lstm_cli::Program program{"lstm_torchscript", "LibTorch", "model.pt",
                                  [] { return std::string(TORCH_VERSION); }};
  return lstm_cli::run_main(argc, argv, program, run);
}
