// The Rayleigh-Ritz step of rsvd: the top singular triplets of the small L x L factor X, by the
// device policy's choice (RsvdPolicy::SmallSvd): one SVD in the working precision, the fp64
// eigendecomposition of X^T X on the tensor's device, or the same on the host.
#pragma once

#include <tuple>

#include "linalg/orthonormalize.h"

namespace loraport::detail {

// X [b, L, L] -> Ur [b, L, rank], S [b, rank] descending, Vr [b, L, rank]; `orth` is the op's
// orthonormalizer (its CholeskyQR2, checks and fallback) for the Eigh choice.
std::tuple<Tensor, Tensor, Tensor> rayleigh_ritz_svd(const Tensor& X, int64_t rank, const RsvdPolicy& policy,
                                                     Orthonormalizer& orth);

}  // namespace loraport::detail
