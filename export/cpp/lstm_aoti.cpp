// Runs a bundle's model.pt2 (torch.export + AOTInductor) with LibTorch's AOTIModelPackageLoader,
// on the CPU (the package is compiled for it): run(inputs) with the signature's inputs in order (an
// LSTM bundle's: input, lengths, h0, c0), its flat list of tensors written as the signature's
// outputs. Usage: lstm_aoti --model model.pt2 --inputs DIR --outputs DIR [--repeat N] (see --help).
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
#include <string>
#include <vector>

#include "bundle.hpp"
#include "lstm_cli.hpp"
#include "lstm_torch.hpp"

namespace {

using lstm_torch::describe;

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
  if (args.threads > 0) at::set_num_threads(args.threads);
  std::unique_ptr<torch::inductor::AOTIModelPackageLoader> loader;
  try {
    loader = std::make_unique<torch::inductor::AOTIModelPackageLoader>(args.model);
  } catch (const std::exception& e) {
    throw std::runtime_error(args.model + ": cannot load an AOTInductor package (" + describe(e) +
                             ")");
  }
  // The compiled code trusts its inputs' sizes (AOTInductor checks them only when the environment
  // sets AOTI_RUNTIME_CHECK_INPUTS): load_inputs refuses a mismatch against the signature, named,
  // before it can read past a buffer.
  const bundle::Signature signature = bundle::read_signature(args.manifest);
  std::vector<npy::Array> arrays = bundle::load_inputs(signature, args.inputs, args.model);

  c10::InferenceMode inference;
  const std::vector<at::Tensor> inputs = lstm_torch::to_tensors(arrays);
  const auto forward = [&] {
    try {
      return loader->run(inputs);
    } catch (const std::exception& e) {
      throw std::runtime_error(args.model + ": run failed: " + describe(e));
    }
  };
  const auto write = [&](const std::vector<at::Tensor>& outputs) {
    lstm_torch::save_outputs(args, signature, outputs);
  };
  lstm_cli::run_forward(args, forward, write);
}

}  // namespace

int main(int argc, char** argv) {
  const lstm_cli::Program program{"lstm_aoti", "LibTorch AOTInductor", "model.pt2",
                                  [] { return std::string(TORCH_VERSION); }};
  return lstm_cli::run_main(argc, argv, program, run);
}
