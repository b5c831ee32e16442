// THE schema file: every loraport op's signature, on one screen.
//
// Kernels live beside their device: csrc/cpu/ops_cpu.cpp (CPU), csrc/cuda/ops_cuda.cpp and
// csrc/cuda/kernels.cu (CUDA); the device-generic math is in csrc/linalg/. Fake (meta)
// kernels for torch.compile are registered from Python in python/loraport/_fake.py, and the
// pure-PyTorch float64 oracles are in python/loraport/reference.py.
#include <torch/library.h>

#include <string>

#include "config.h"
#include "linalg.h"

namespace loraport {

// Build facts, so Python can say "built for torch X, you have Y" instead of failing later.
std::string build_info() {
  std::string info = "torch=" LORAPORT_TORCH_VERSION;
#ifdef LORAPORT_WITH_CUDA
  info += ";cuda=" LORAPORT_CUDA_VERSION;
#else
  info += ";cuda=";
#endif
#ifdef LORAPORT_CUDA_KERNELS
  info += ";archs=" LORAPORT_CUDA_ARCHS;
#else
  info += ";archs=";
#endif
  return info;
}

}  // namespace loraport

TORCH_LIBRARY(loraport, m) {
  // Randomized SVD of a batch. A: [..., m, n] (fp16/bf16/fp32/fp64); sketch: [min(m, n), l]
  // Gaussian (shared by the batch; it sketches A, or A^T when m < n), l <= min(m, n);
  // method "power" (rank <= l) or "krylov" (block size l; rank <= the Krylov space's width).
  // Returns U [..., m, rank], S [..., rank] (descending), V [..., n, rank]; fp32 (fp64 for fp64 A).
  m.def("rsvd(Tensor A, Tensor sketch, int rank, int power_iters, str method) "
        "-> (Tensor U, Tensor S, Tensor V)");
  // LoRA projection U U^T (up @ down) V V^T as factors, never forming the m x n product.
  // up: [..., m, r], down: [..., r, n], U: [..., m, k], V: [..., n, k], 1 <= rank <= min(r, k).
  // Returns up2 [..., m, rank], down2 [..., rank, n] in the dtype of up/down.
  m.def("project_lora(Tensor up, Tensor down, Tensor U, Tensor V, int rank) "
        "-> (Tensor up2, Tensor down2)");
  // The SVD of the low-rank products up @ down from the factors, up: [..., m, p], down: [..., p, n]:
  // A [..., p, p], S [..., p] descending, B [..., p, p], all float64, with
  // up @ down = (up @ A) diag(S) (down^T @ B)^T, the columns of up @ A and down^T @ B orthonormal
  // (zero for directions beyond the factors' numerical rank). project_lora's core.
  m.def("product_svd(Tensor up, Tensor down) -> (Tensor A, Tensor S, Tensor B)");
  // ||U1^T U2||_F^2 / min(k1, k2) in [0, 1]. U1: [..., m, k1], U2: [..., m, k2] -> [...].
  m.def("subspace_similarity(Tensor U1, Tensor U2) -> Tensor");
  m.def("weight_times(Tensor A, Tensor basis, bool transpose) -> Tensor");
  m.def("bf16_kernels() -> bool", &loraport::bf16_kernels_in_use);
  // Facts of rsvd that Python sizes its work with (csrc/linalg/rsvd.cpp), so they live in one
  // place: the Krylov space's block count for a matrix with short side min_dim, and the bytes one
  // rsvd call on batch x [m, n] of dtype allocates (its workspace, upcast chunk and outputs).
  m.def("krylov_blocks(int power_iters, int min_dim, int block) -> int", &loraport::krylov_blocks);
  m.def("rsvd_workspace_bytes(int batch, int m, int n, ScalarType dtype, int rank, int width, int power_iters, "
        "str method) -> int",
        [](int64_t batch, int64_t m, int64_t n, c10::ScalarType dtype, int64_t rank, int64_t width, int64_t power_iters,
           c10::string_view method) {
          return loraport::rsvd_workspace_bytes(batch, m, n, dtype, rank, width, power_iters,
                                                std::string_view(method.data(), method.size()));
        });
  // "torch=<version built against>;cuda=<torch's CUDA version, empty for a CPU-only build>;
  // archs=<our kernels' architectures: sm_NN (SASS), compute_NN (PTX); empty without them>".
  m.def("build_info() -> str", &loraport::build_info);
  // TEST HOOK: sets an engine knob (docs/engine-knobs.md; "" = its default) for the rest of the
  // process and returns its previous value. Production code reads the knobs from the environment.
  m.def("_testing_set_knob(str name, str value) -> str", [](c10::string_view name, c10::string_view value) {
    return loraport::set_knob_for_testing(std::string_view(name.data(), name.size()),
                                          std::string_view(value.data(), value.size()));
  });
}
