// Run a ptq2tvm bundle's model.so from C++ (no Python): load the library with the TVM runtime that ships in the
// bundle (lib/libtvm_runtime.so) and tvm-ffi (libtvm_ffi.so), start its Relax VM, feed uint8 input codes, and
// write the integer output codes of every output.
//
//   run_model MODEL.so INPUT.npy OUT_PREFIX BATCH
//
// INPUT.npy: uint8 (N, C, H, W) input codes, e.g. the bundle's check_input.npy (float images are quantized with
// the input scale / zero point in model.json: q = clamp(rint(x / scale) + zero_point, 0, 255), or call the .so's
// "main_float" entry with float32 instead of "main"). BATCH: the batch the .so was compiled for (model.json
// "batch"); N must be a multiple of it. Output k's codes, all N images, go to OUT_PREFIX<k>.bin (raw, C order,
// the dtype and shape model.json's "outputs" gives). Build: deploy_examples/cpp/build.sh. Errors: a message on
// stderr and exit status 1 (2 for bad arguments or input).
#include <dlpack/dlpack.h>
#include <tvm/ffi/container/array.h>
#include <tvm/ffi/container/shape.h>
#include <tvm/ffi/container/tensor.h>
#include <tvm/ffi/extra/module.h>
#include <tvm/ffi/function.h>

#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

namespace ffi = tvm::ffi;

namespace {

constexpr int kPooledAllocator = 2;  // tvm::runtime::memory::AllocatorType::kPooled

// A uint8 .npy file (format 1.0 / 2.0, C order): its shape and bytes.
bool ReadNpyUint8(const std::string& path, std::vector<int64_t>* shape, std::vector<uint8_t>* data,
                  std::string* why) {
  std::ifstream f(path, std::ios::binary);
  if (!f) { *why = "cannot open " + path; return false; }
  char magic[8];
  f.read(magic, 8);
  if (!f || std::memcmp(magic, "\x93NUMPY", 6) != 0) { *why = path + " is not a .npy file"; return false; }
  uint32_t header_len = 0;
  if (magic[6] == 1) {
    uint16_t n = 0;
    f.read(reinterpret_cast<char*>(&n), 2);
    header_len = n;
  } else {
    f.read(reinterpret_cast<char*>(&header_len), 4);
  }
  std::string header(header_len, ' ');
  f.read(&header[0], header_len);
  if (header.find("'descr': '|u1'") == std::string::npos) {
    *why = path + ": expected uint8 codes (dtype |u1), header " + header;
    return false;
  }
  if (header.find("'fortran_order': False") == std::string::npos) { *why = path + " is not C order"; return false; }
  size_t open = header.find('(', header.find("'shape'")), close = header.find(')', open);
  std::stringstream dims(header.substr(open + 1, close - open - 1));
  std::string dim;
  int64_t count = 1;
  while (std::getline(dims, dim, ',')) {
    if (dim.find_first_not_of(" ") == std::string::npos) continue;
    shape->push_back(std::stoll(dim));
    count *= shape->back();
  }
  data->resize(count);
  f.read(reinterpret_cast<char*>(data->data()), count);
  if (!f) { *why = path + " is truncated"; return false; }
  return true;
}

size_t Bytes(const ffi::Tensor& t) { return ffi::GetDataSize(static_cast<size_t>(t.numel()), t.dtype()); }

}  // namespace

int main(int argc, char** argv) {
  if (argc != 5) {
    std::cerr << "usage: " << argv[0] << " MODEL.so INPUT.npy OUT_PREFIX BATCH\n";
    return 2;
  }
  std::string so = argv[1];
  const std::string input = argv[2], prefix = argv[3];
  if (so.find('/') == std::string::npos) so = "./" + so;  // dlopen searches the library path for a bare name
  const int64_t batch = std::stoll(argv[4]);
  std::vector<int64_t> shape;
  std::vector<uint8_t> codes;
  std::string why;
  if (!ReadNpyUint8(input, &shape, &codes, &why)) { std::cerr << "error: " << why << "\n"; return 2; }
  if (shape.size() != 4 || batch < 1 || shape[0] % batch != 0) {
    std::cerr << "error: " << input << " must be (N, C, H, W) with N a multiple of the batch " << batch << "\n";
    return 2;
  }
  try {
    // the .so holds a Relax VM executable: load it, then one VM on CPU device 0 with the pooled allocator
    ffi::Module lib = ffi::Module::LoadFromFile(so);
    ffi::Module vm = lib->GetFunction("vm_load_executable").value()().cast<ffi::Module>();
    vm->GetFunction("vm_initialization").value()(static_cast<int>(kDLCPU), 0, kPooledAllocator);
    ffi::Function run = vm->GetFunction("main").value();
    // TVM's kernels assume its 64-byte aligned allocations: allocate the input through the runtime, refill it
    ffi::Function alloc = ffi::Function::GetGlobalRequired("runtime.TVMTensorAllocWithScope");
    ffi::Shape in_shape({batch, shape[1], shape[2], shape[3]});
    ffi::Tensor x = alloc(in_shape, DLDataType{kDLUInt, 8, 1}, DLDevice{kDLCPU, 0}, nullptr).cast<ffi::Tensor>();
    const size_t per_batch = codes.size() / (shape[0] / batch);
    std::vector<std::ofstream> outs;
    for (int64_t i = 0; i < shape[0]; i += batch) {
      std::memcpy(x.data_ptr(), codes.data() + (i / batch) * per_batch, per_batch);
      ffi::Any res = run(x);
      std::vector<ffi::Tensor> ys;
      if (auto t = res.try_cast<ffi::Tensor>()) {
        ys.push_back(*t);
      } else {
        for (const ffi::Any& y : res.cast<ffi::Array<ffi::Any>>()) ys.push_back(y.cast<ffi::Tensor>());
      }
      if (outs.empty()) {
        for (size_t k = 0; k < ys.size(); ++k) outs.emplace_back(prefix + std::to_string(k) + ".bin", std::ios::binary);
      }
      for (size_t k = 0; k < ys.size(); ++k) {
        outs[k].write(static_cast<const char*>(ys[k].data_ptr()), static_cast<std::streamsize>(Bytes(ys[k])));
      }
    }
    for (size_t k = 0; k < outs.size(); ++k) {
      if (!outs[k]) { std::cerr << "error: cannot write " << prefix << k << ".bin\n"; return 1; }
    }
    std::cout << "ran " << shape[0] << " inputs in batches of " << batch << "; " << outs.size()
              << " output(s) written to " << prefix << "0.bin ...\n";
  } catch (const std::exception& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
