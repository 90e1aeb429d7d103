// Runs a bundle's model.pt2 (torch.export + AOTInductor) with LibTorch's AOTIModelPackageLoader:
// run({input, lengths, h0, c0}) -> {output, hn, cn}, on the CPU (the package is compiled for it).
// Usage: lstm_aoti --model model.pt2 --inputs DIR --outputs DIR [--repeat N] (see --help).
// The few headers it needs, not <torch/torch.h>: this is the slowest file of the build to compile.
#include <ATen/Parallel.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#include <torch/version.h>
#if defined(__GLIBC__)
#include <malloc.h>
#endif

#include <cstdlib>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "lstm_cli.hpp"
#include "lstm_torch.hpp"

namespace {

using lstm_torch::describe;
using lstm_torch::to_tensor;

// The package's input shapes (metadata "lstm_deploy.inputs", written by the export:
// "input:-1,-1,32;lengths:-1;h0:-1,2,64;c0:-1,2,64", -1 for a dynamic axis), in signature order.
std::vector<std::vector<int64_t>> declared_shapes(const std::string& model, const std::string& text) {
  std::vector<std::vector<int64_t>> shapes;
  std::stringstream entries(text);
  std::string entry;
  for (const auto& name : lstm_cli::kInputNames) {
    if (!std::getline(entries, entry, ';') || entry.rfind(name + ":", 0) != 0)
      throw std::runtime_error(model + ": its metadata lstm_deploy.inputs (\"" + text +
                               "\") does not list " + name + "; re-export the bundle");
    std::vector<int64_t> shape;
    std::stringstream dims(entry.substr(name.size() + 1));
    for (std::string dim; std::getline(dims, dim, ',');) shape.push_back(std::stoll(dim));
    shapes.push_back(shape);
  }
  return shapes;
}

// The compiled code trusts its inputs' sizes (AOTInductor checks them only when the environment
// sets AOTI_RUNTIME_CHECK_INPUTS): a mismatch is refused here, named, before it can read past a
// buffer.
void check_shapes(const lstm_cli::Args& args, const std::vector<std::vector<int64_t>>& declared,
                  const std::vector<const npy::Array*>& inputs) {
  for (size_t i = 0; i < inputs.size(); ++i) {
    const auto& want = declared[i];
    const auto& got = inputs[i]->shape;
    bool ok = want.size() == got.size();
    for (size_t d = 0; ok && d < want.size(); ++d) ok = want[d] < 0 || want[d] == got[d];
    if (!ok) {
      std::string expected = "(";  // as npy::shape_str writes shapes, dynamic axes named
      for (size_t d = 0; d < want.size(); ++d)
        expected += (d ? ", " : "") + (want[d] < 0 ? std::string(d == 0 ? "batch" : "sequence")
                                                   : std::to_string(want[d]));
      throw std::runtime_error(args.inputs + "/" + lstm_cli::kInputNames[i] + ".npy: shape " +
                               npy::shape_str(got) + ", " + args.model + " takes " + expected +
                               ")");
    }
  }
}

// The compiled graph allocates its buffers at every call (the input projection of all steps: 64
// MiB at batch 64, T 512, hidden 128) and its loop each step's gates and state afresh (AOTInductor
// has no buffer pool). With glibc's defaults the large ones are mmap'd and unmapped every time, and
// the heap is trimmed as soon as 128 KiB lie free at its top: page faults on every fresh page,
// ~30% of the time at batch 64 (measured: 109 -> 78 ms at batch 64, T 512, hidden 128). Heap-only
// allocation that keeps freed memory for reuse avoids them. An application embedding model.pt2
// wants the same: these calls, or MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<bytes> in its
// environment (when either is set, this program leaves glibc's settings as they are).
void keep_freed_memory() {
#if defined(__GLIBC__)
  if (std::getenv("MALLOC_MMAP_MAX_") || std::getenv("MALLOC_TRIM_THRESHOLD_")) return;
  mallopt(M_MMAP_MAX, 0);                // every allocation from the heap
  mallopt(M_TRIM_THRESHOLD, 1 << 30);    // freed memory stays, up to 1 GiB at the top
#endif
}

void run(const lstm_cli::Args& args) {
  keep_freed_memory();
  lstm_cli::Inputs in = lstm_cli::load_inputs(args.inputs);
  if (args.threads > 0) at::set_num_threads(args.threads);
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(args.model);
  } catch (const std::exception& e) {
    throw std::runtime_error(args.model + ": cannot load an AOTInductor package (" + describe(e) +
                             ")");
  }
  const auto metadata = loader->get_metadata();
  const auto found = metadata.find("lstm_deploy.inputs");
  if (found == metadata.end())
    throw std::runtime_error(args.model + ": no lstm_deploy.inputs in its metadata; is it an "
                             "lstm-deploy model.pt2?");
  check_shapes(args, declared_shapes(args.model, found->second),
               {&in.input, &in.lengths, &in.h0, &in.c0});

  c10::InferenceMode inference;
  const std::vector<at::Tensor> inputs = {
      to_tensor(in.input, at::kFloat), to_tensor(in.lengths, at::kLong),
      to_tensor(in.h0, at::kFloat), to_tensor(in.c0, at::kFloat)};
  const auto forward = [&] {
    try {
      return loader->run(inputs);
    } catch (const std::exception& e) {
      throw std::runtime_error(args.model + ": run failed: " + describe(e));
    }
  };
  const auto write = [&](const std::vector<at::Tensor>& outputs) {
    if (outputs.size() != lstm_cli::kOutputNames.size())
      throw std::runtime_error(args.model + ": run returned " + std::to_string(outputs.size()) +
                               " tensors, expected 3 (output, hn, cn)");
    lstm_torch::save_outputs(args, outputs);
  };
  lstm_cli::run_forward(args, forward, write);
}

}  // namespace

int main(int argc, char** argv) {
  const lstm_cli::Program program{"lstm_aoti", "LibTorch AOTInductor", "model.pt2",
                                  [] { return std::string(TORCH_VERSION); }};
  return lstm_cli::run_main(argc, argv, program, run);
}
