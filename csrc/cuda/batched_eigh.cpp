// cuSOLVER's batched eigensolver for the Rayleigh-Ritz step on CUDA (batched_eigh.h).
//
// Why not at::linalg_eigh: for a batch of matrices larger than 32 x 32, torch up to 2.11 runs
// cuSOLVER's syevd once per matrix, one call after another (linalg_eigh_cusolver in ATen's
// cuda/linalg/BatchLinearAlgebraLib.cpp; pytorch issue 175585, changed by pull request 175403).
// The 3.2 ms (L = 72) and 6.8 ms (L = 216) that the H100 profile of 4 x [12288, 3072] gave the
// eigensolver (benchmarks/RESULTS.md, torch 2.11) were four such calls, and a batch of 16
// makes sixteen. cusolverDnXsyevBatched (cuSOLVER >= 11.7.1, CUDA >= 12.6) takes the whole batch
// in one call, for any n.
//
// Why dlsym: torch's wheels load cuSOLVER with their lazily loaded linalg library, so linking
// it here would make this extension's import depend on where a wheel keeps it. The entry points
// are looked up in the libcusolver already in the process (torch's first linalg call loads it;
// CholeskyQR's at::linalg_cholesky_ex always runs before the Rayleigh-Ritz step); anything
// missing means at::linalg_eigh.
#include "cuda/batched_eigh.h"

#include "config.h"

#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cusolverDn.h>
#include <dlfcn.h>
#include <link.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <string_view>
#include <type_traits>
#include <unordered_map>
#include <vector>

namespace loraport {
namespace {

using at::Tensor;

using Mode = EngineConfig::CusolverEigh;

// The knob LORAPORT_CUSOLVER_EIGH (config.h), parsed once.
Mode configured_mode() { return engine_config().cusolver_eigh; }

// at::linalg_eigh's turn (undefined tensors); an error instead under LORAPORT_CUSOLVER_EIGH=require.
std::tuple<Tensor, Tensor> fall_back(Mode mode, const char* why) {
  TORCH_CHECK(mode != Mode::Require,
              "loraport: LORAPORT_CUSOLVER_EIGH=require, but cuSOLVER's batched eigensolver was not used: ", why);
  return {};
}

bool takes(const Tensor& G) {
  return G.dim() == 3 && G.size(0) >= 2 && G.size(-1) >= kBatchedEighMinSize && G.scalar_type() == at::kDouble &&
         G.is_cuda();
}

}  // namespace

#if defined(CUSOLVER_VERSION) && CUSOLVER_VERSION >= 11701

namespace {

// The cuSOLVER entry points used here, with the header's own signatures.
struct CusolverApi {
  decltype(&cusolverDnCreate) create = nullptr;
  decltype(&cusolverDnSetStream) set_stream = nullptr;
  decltype(&cusolverDnCreateParams) create_params = nullptr;
  decltype(&cusolverDnXsyevBatched_bufferSize) buffer_size = nullptr;
  decltype(&cusolverDnXsyevBatched) syev_batched = nullptr;
};

int remember_cusolver_path(dl_phdr_info* info, size_t, void* path) {
  const char* name = info->dlpi_name;
  const char* slash = name ? std::strrchr(name, '/') : nullptr;
  const char* base = slash ? slash + 1 : name;
  if (!base || std::strncmp(base, "libcusolver.so", 14) != 0) return 0;
  *static_cast<std::string*>(path) = name;
  return 1;
}

// The entry points of the libcusolver loaded into this process; nullptr while none is loaded
// (looked for again on the next call) or when it lacks one of them (for good).
const CusolverApi* cusolver_api() {
  static std::mutex mutex;
  static CusolverApi api;
  static bool found = false, lacking = false;
  const std::lock_guard<std::mutex> lock(mutex);
  if (found) return &api;
  if (lacking) return nullptr;
  std::string path;
  dl_iterate_phdr(&remember_cusolver_path, &path);
  void* library = path.empty() ? nullptr : dlopen(path.c_str(), RTLD_NOW | RTLD_NOLOAD);
  if (!library) return nullptr;
  auto resolve = [library](auto& entry, const char* name) {
    entry = reinterpret_cast<std::remove_reference_t<decltype(entry)>>(dlsym(library, name));
    return entry != nullptr;
  };
  CusolverApi candidate;
  if (!(resolve(candidate.create, "cusolverDnCreate") && resolve(candidate.set_stream, "cusolverDnSetStream") &&
        resolve(candidate.create_params, "cusolverDnCreateParams") &&
        resolve(candidate.buffer_size, "cusolverDnXsyevBatched_bufferSize") &&
        resolve(candidate.syev_batched, "cusolverDnXsyevBatched"))) {
    lacking = true;
    return nullptr;
  }
  api = candidate;
  found = true;
  return &api;
}

struct Solver {
  cusolverDnHandle_t handle = nullptr;
  cusolverDnParams_t params = nullptr;
};

// This thread's cuSOLVER handle for the current device (created on first use, kept for the
// thread's life, as ATen keeps its own), or nullptr if cuSOLVER would not create one.
const Solver* solver_for_device(const CusolverApi& api, c10::DeviceIndex device) {
  thread_local std::unordered_map<c10::DeviceIndex, Solver> solvers;
  if (auto it = solvers.find(device); it != solvers.end()) return &it->second;
  Solver solver;
  if (api.create(&solver.handle) != CUSOLVER_STATUS_SUCCESS) return nullptr;
  if (api.create_params(&solver.params) != CUSOLVER_STATUS_SUCCESS) return nullptr;
  return &solvers.emplace(device, solver).first->second;
}

// Set when a result of finite input failed its check: from then on at::linalg_eigh only.
std::atomic<bool> distrusted{false};

// The check's bound on the residual max |G v - lambda v| / ||G||_F and on max |V^T V - I|:
// syevd's are ~n * u64 (1e-13 at n = 1000).
constexpr double kCheckTolerance = 1e-10;

}  // namespace

std::tuple<Tensor, Tensor> batched_eigh_cusolver(const Tensor& G) {
  const Mode mode = configured_mode();
  if (mode == Mode::Off || !takes(G)) return {};
  auto fallback = [mode](const char* why) { return fall_back(mode, why); };
  if (distrusted.load()) return fallback("an earlier result failed its check");
  const CusolverApi* api = cusolver_api();
  if (!api) return fallback("no libcusolver with cusolverDnXsyevBatched is loaded");
  const Solver* solver = solver_for_device(*api, G.device().index());
  if (!solver) return fallback("cusolverDnCreate failed");
  if (api->set_stream(solver->handle, c10::cuda::getCurrentCUDAStream(G.device().index()).stream()) != CUSOLVER_STATUS_SUCCESS)
    return fallback("cusolverDnSetStream failed");

  const int64_t b = G.size(0), n = G.size(-1);
  // G is symmetric: its row-major storage is G in column-major order too. cuSOLVER overwrites
  // it with the eigenvectors, column-major.
  Tensor vectors = G.contiguous().clone();                         // [b, n, n]
  Tensor values = at::empty({b, n}, G.options());                  // [b, n]
  Tensor info = at::zeros({b}, G.options().dtype(at::kInt));       // [b]
  size_t device_bytes = 0, host_bytes = 0;
  if (api->buffer_size(solver->handle, solver->params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F,
                       vectors.data_ptr(), n, CUDA_R_64F, values.data_ptr(), CUDA_R_64F, &device_bytes, &host_bytes,
                       b) != CUSOLVER_STATUS_SUCCESS)
    return fallback("cusolverDnXsyevBatched_bufferSize failed");
  Tensor device_work = at::empty({static_cast<int64_t>(std::max<size_t>(device_bytes, 1))}, G.options().dtype(at::kByte));
  thread_local std::vector<unsigned char> host_work;  // outlives the call: the check below waits for it
  host_work.resize(std::max<size_t>(host_bytes, 1));
  if (api->syev_batched(solver->handle, solver->params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_LOWER, n, CUDA_R_64F,
                        vectors.data_ptr(), n, CUDA_R_64F, values.data_ptr(), CUDA_R_64F, device_work.data_ptr(),
                        device_bytes, host_work.data(), host_bytes, info.data_ptr<int>(), b) != CUSOLVER_STATUS_SUCCESS)
    return fallback("cusolverDnXsyevBatched failed");
  const Tensor V = vectors.mT();  // column-major V_j read row-major is V_j^T

  // Check every matrix on the device, then synchronize once (ATen's eigensolver synchronizes
  // for its own info check): G V = V diag(values), V^T V = I, ascending values, info 0.
  const Tensor residual = (at::matmul(G, V) - V * values.unsqueeze(-2)).abs().amax({-2, -1});  // [b]
  const Tensor scale = at::linalg_vector_norm(G, 2, {-2, -1});                                   // [b], ||G||_F
  const Tensor orthogonality = (at::matmul(V.mT(), V) - at::eye(n, G.options())).abs().amax({-2, -1});
  const Tensor ascending = values.narrow(-1, 1, n - 1).ge(values.narrow(-1, 0, n - 1)).all(-1);
  const Tensor good = info.eq(0)
                          .logical_and_(residual.le(scale * kCheckTolerance))
                          .logical_and_(orthogonality.le(kCheckTolerance))
                          .logical_and_(ascending);
  if (good.all().item<bool>()) return {values, V};
  // The rare failure: was it the input's (a second synchronization, on this path only)?
  const Tensor finite_input = G.isfinite().flatten(1).all(-1);
  if (good.logical_not().logical_and_(finite_input).any().item<bool>()) {
    distrusted.store(true);
    TORCH_WARN_ONCE("loraport: cuSOLVER's batched eigensolver (cusolverDnXsyevBatched) returned a result that "
                    "failed its check; the Rayleigh-Ritz step uses torch.linalg.eigh from now on in this process");
    return fallback("a result failed its check");
  }
  return fallback("non-finite input");  // at::linalg_eigh reports it as it always has
}

#else  // cuSOLVER headers without cusolverDnXsyevBatched (CUDA < 12.6): at::linalg_eigh only

std::tuple<Tensor, Tensor> batched_eigh_cusolver(const Tensor& G) {
  const Mode mode = configured_mode();
  return mode == Mode::Off || !takes(G) ? std::tuple<Tensor, Tensor>() : fall_back(mode, "built without it (CUDA < 12.6)");
}

#endif

}  // namespace loraport
