// Runs a TVM Relax executable (an exported model.so) once, linked against the TVM runtime only.
// redux-edge cross-compiles this for aarch64 and runs it under qemu-aarch64 to check an aarch64
// artifact on an x86-64 machine: the same runtime code path a board would take, without Python.
//
// usage: tvm_host MODEL.so OUT_DIR INPUT...   where INPUT is  path:dtype:d0xd1x...  (raw little-endian)
// writes OUT_DIR/output_<i>.bin and prints one line per output: "<i> <dtype> <d0>x<d1>..."
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdio>
#include <cstdlib>
#include <algorithm>
#include <cstring>
#include <fstream>
#include <iterator>
#include <sstream>
#include <string>
#include <vector>

namespace {

using tvm::ffi::Tensor;

// Host memory for the input tensors: the wheel's runtime headers need TVM's sources, the FFI ones do not.
struct HostAlloc {
  void AllocData(DLTensor* tensor) { tensor->data = std::malloc(tvm::ffi::GetDataSize(*tensor)); }
  void FreeData(DLTensor* tensor) { std::free(tensor->data); }
};

std::vector<std::string> Split(const std::string& text, char sep) {
  std::vector<std::string> parts;
  std::stringstream stream(text);
  for (std::string part; std::getline(stream, part, sep);) parts.push_back(part);
  return parts;
}

Tensor ReadInput(const std::string& spec) {
  std::vector<std::string> fields = Split(spec, ':');
  std::vector<int64_t> dims;
  for (const std::string& dim : Split(fields[2], 'x')) dims.push_back(std::stoll(dim));
  DLDataType dtype = tvm::ffi::StringToDLDataType(fields[1]);
  Tensor tensor = Tensor::FromNDAlloc(HostAlloc(), tvm::ffi::ShapeView(dims.data(), dims.size()), dtype,
                                      DLDevice{kDLCPU, 0});
  std::ifstream file(fields[0], std::ios::binary);
  std::vector<char> bytes((std::istreambuf_iterator<char>(file)), std::istreambuf_iterator<char>());
  std::memcpy(tensor.data_ptr(), bytes.data(),
              std::min(bytes.size(), tvm::ffi::GetDataSize(tensor.numel(), dtype)));
  return tensor;
}

void WriteOutput(const Tensor& tensor, const std::string& out_dir, size_t index) {
  size_t nbytes = tvm::ffi::GetDataSize(tensor.numel(), tensor.dtype());
  std::ofstream(out_dir + "/output_" + std::to_string(index) + ".bin", std::ios::binary)
      .write(static_cast<const char*>(tensor.data_ptr()), static_cast<std::streamsize>(nbytes));
  std::printf("%zu %s ", index, std::string(tvm::ffi::DLDataTypeToString(tensor.dtype())).c_str());
  for (int axis = 0; axis < tensor.ndim(); ++axis) {
    std::printf(axis ? "x%lld" : "%lld", static_cast<long long>(tensor.shape()[axis]));
  }
  std::printf("\n");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) {
    std::fprintf(stderr, "usage: %s MODEL.so OUT_DIR path:dtype:shape...\n", argv[0]);
    return 2;
  }
  tvm::ffi::Module library = tvm::ffi::Module::LoadFromFile(argv[1]);
  tvm::ffi::Module vm = library->GetFunction("vm_load_executable").value()().cast<tvm::ffi::Module>();
  constexpr int kPooledAllocator = 2;
  vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
  tvm::ffi::Function entry = vm->GetFunction("main").value();

  std::vector<Tensor> inputs;
  for (int i = 3; i < argc; ++i) inputs.push_back(ReadInput(argv[i]));
  std::vector<tvm::ffi::AnyView> args(inputs.begin(), inputs.end());
  tvm::ffi::Any result;
  entry.CallPacked(args.data(), static_cast<int32_t>(args.size()), &result);

  if (auto single = result.as<Tensor>()) {
    WriteOutput(*single, argv[2], 0);
  } else {
    tvm::ffi::Array<tvm::ffi::Any> outputs = result.cast<tvm::ffi::Array<tvm::ffi::Any>>();
    for (size_t i = 0; i < outputs.size(); ++i) WriteOutput(outputs[i].cast<Tensor>(), argv[2], i);
  }
  return 0;
}
