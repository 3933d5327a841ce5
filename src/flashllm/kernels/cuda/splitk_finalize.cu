// Split-K epilogue: y = round(ws + bias) for the fp32 workspace the split blocks added into.
// A separate launch keeps the main kernels free of inter-block synchronization; its cost is one
// read of N x M floats and one write of the output, small next to the weight for the decode batch
// sizes split-K is chosen for, plus the launch itself and the workspace's memset. FLASHLLM_REZERO=1
// writes zeros back as it reads, so a workspace kept per stream (launch.splitk_workspace) needs no
// memset before the next launch: one graph node fewer per product, at the cost of N x M more
// float stores. (FLASHLLM_FIXUP, splitk_fixup in common.cuh, ends in the last block instead: on an
// H200 it was slower than this launch and the memset.)
// The tile parameters of common.cuh do not apply here; fixed values keep it compiling.
#ifndef FLASHLLM_NROWS
#define FLASHLLM_NROWS 16
#endif
#ifndef FLASHLLM_STAGES
#define FLASHLLM_STAGES 2
#endif
#include "common.cuh"
#ifndef FLASHLLM_REZERO
#define FLASHLLM_REZERO 0
#endif

extern "C" __global__ void __launch_bounds__(256) flashllm_splitk_finalize(
    float* __restrict__ ws,        // (N, M); zeroed again with FLASHLLM_REZERO
    const u16* __restrict__ bias,  // (M,) or null
    u16* __restrict__ y,           // (N, M)
    int M, long long total) {
  using namespace flashllm;
  // FLASHLLM_PDL: launched while the split blocks finish; the workspace is read after they have.
  wait_for_prior_grids();
  allow_dependent_grids();
  const long long stride = static_cast<long long>(gridDim.x) * blockDim.x;
  for (long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x; i < total;
       i += stride) {
    float v = ws[i];
#if FLASHLLM_REZERO
    ws[i] = 0.f;
#endif
    if (bias != nullptr) v += to_float(bias[i % M]);
    y[i] = from_float(v);
  }
}
