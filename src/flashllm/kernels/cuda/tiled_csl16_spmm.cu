// y = x @ W.T for W in the tiled_csl16 format (layout version 1, see formats/tiled_csl16.py):
// Tiled-CSL with 16 x 64 tiles, each tile read by one warp that never waits for the others.
//
// Why. The Tiled-CSL kernel (tiled_csl_spmm.cu) issues few instructions per weight (0.13-0.18
// warp instructions at 80%, Nsight Compute on an H200), but its schedulers sit idle in 58-72% of
// cycles: its 128 x 64 tiles are copied, scattered and multiplied by the whole block, with one or
// two block barriers per tile, and the grid gives each scheduler only 2.6-5.2 warps, each waiting on
// its own shared-memory loads and on the slowest warp at every barrier (BENCHMARKS.md, sixteenth
// session). Here a warp owns 16 weight rows and streams its own tiles: it copies a tile's words
// into its private stage buffers (cp.async, STAGES deep), waits for its own copies, scatters them
// into its private dense tile and reads its tensor-core B fragments back, with warp barriers
// (__syncwarp) only. Warps of a block share nothing but the activations, which the block stages
// once per XT tiles (one block barrier per chunk, usually one per launch), so a slow warp holds up
// no other, and the small per-warp footprint puts 16-20 warps on an SM.
//
// The dense tile is laid out in the order of the mma's B fragments (the format's slots are byte
// offsets in it): lane l's registers for k16 steps 2q and 2q + 1 of 8-row half h are the 16 bytes at
// 1024 h + 512 q + 16 l, so a lane reads all of a tile's B fragments with four 16-byte loads (each
// a conflict-free warp access of 512 contiguous bytes) and zeroes them with four 16-byte stores: no
// swizzle, no ldmatrix addressing. A tile's words are ordered so that each warp-wide store of the
// scatter hits 32 different banks (as in Tiled-CSL layout 2). Over-full tiles (more words than a
// stage holds, CAPW) scatter the rest straight from global memory: every density is exact.
//
// Compile-time parameters (besides common.cuh's): FLASHLLM_CAPW, words per warp stage (a multiple
// of 32, 64..1024); FLASHLLM_WARPS 4 (default) or 8, row groups per block; FLASHLLM_XROWS 128
// (default) or 64, the activation rows staged per chunk: XT = XROWS / NROWS tiles, 18 or 9 KB of
// shared memory (the smaller chunk, one more barrier per chunk for a resident block more);
// FLASHLLM_BULK 1: from sm_90, a tile's words come by one bulk copy (TMA) that lane 0 issues and the
// warp waits for on the stage's mbarrier, instead of every lane's 16-byte cp.async chunks: one
// memory request per tile instead of one per 16 bytes, for about as many instructions (ptxas wraps
// the bulk copy in an elect loop); the layout keeps the barriers on every architecture, below sm_90
// the same build runs the cp.async path.
#include "common.cuh"

#ifndef FLASHLLM_CAPW
#error "FLASHLLM_CAPW must be defined (words per warp stage, a multiple of 32)"
#endif

namespace flashllm {
namespace csl16 {

constexpr int TILE_M = 16;
constexpr int TILE_K = 64;
constexpr int TILE_ELEMS = TILE_M * TILE_K;
constexpr u32 SENTINEL_SLOT = 2 * TILE_ELEMS;  // the spare slot past the tile
constexpr int CAPW = FLASHLLM_CAPW;
static_assert(CAPW % 32 == 0 && CAPW >= 64 && CAPW <= TILE_ELEMS, "CAPW");
#ifndef FLASHLLM_XROWS
#define FLASHLLM_XROWS 128
#endif
static_assert(NROWS <= 64, "NROWS: at most 64");
static_assert((FLASHLLM_XROWS == 128 || FLASHLLM_XROWS == 64) && FLASHLLM_XROWS >= NROWS, "XROWS: 128 or 64, >= NROWS");
constexpr int XT = FLASHLLM_XROWS / NROWS;  // activation tiles per chunk
// The paired k16 steps of common.cuh's load_a_frags at NROWS == 8 (the accumulators are few here).
constexpr int A_STEPS = HALF_A ? 2 : 1;
constexpr int DENSE_BYTES = 2 * TILE_ELEMS + 16;  // the tile, then the sentinel's slot (16-byte aligned)
constexpr int WORDS_BYTES = CAPW * 4;
// Per warp: two dense tiles (scatter tile i + 1 while tile i's fragments are still being read by
// lanes that lag), then its stages. The block's activation chunk first.
constexpr int X_BYTES = XT * X_STAGE_BYTES;
constexpr bool BULK = FLASHLLM_USE_BULK;  // (common.cuh: FLASHLLM_BULK from sm_90)
constexpr int BARS_BYTES = FLASHLLM_BULK ? STAGES * 8 : 0;  // after the stages, one mbarrier per stage
constexpr int WARP_BYTES = 2 * DENSE_BYTES + STAGES * WORDS_BYTES + (BARS_BYTES + 15) / 16 * 16;
constexpr int SMEM_BYTES = X_BYTES + WARPS * WARP_BYTES;
static_assert(X_BYTES % 16 == 0 && DENSE_BYTES % 16 == 0 && WORDS_BYTES % 16 == 0, "16-byte aligned buffers");
#ifdef FLASHLLM_SMEM_BYTES  // the launcher's size (kernels/configs.py) must match this layout
static_assert(SMEM_BYTES == FLASHLLM_SMEM_BYTES, "configs.LaunchConfig.smem_bytes disagrees with the kernel");
#endif
// A lane's 16-byte word loads per scatter batch, all issued before their stores (ptxas keeps a
// shared load below earlier shared stores it cannot prove disjoint, tiled_csl_spmm.cu).
constexpr int SCATTER_LOADS = CAPW / 128;  // a full stage: CAPW / 4 quads over 32 lanes
constexpr int SCATTER_BATCH = SCATTER_LOADS < 4 ? (SCATTER_LOADS > 0 ? SCATTER_LOADS : 1) : 4;

__device__ __forceinline__ U4 lds_u4(u32 addr) {
  U4 v;
  asm volatile("ld.shared.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "r"(addr)
               : "memory");
  return v;
}
__device__ __forceinline__ U4 ldg_u4(const U4* p) {
  U4 v;
  asm volatile("ld.global.cg.v4.u32 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// cp.async the first `chunks` (<= CAPW / 4) 16-byte chunks of a run, chunk c by lane c % 32; `src`
// is the run's start plus this lane's first chunk, `dst` the stage plus the same.
// Predicated rather than branched (a lane's last chunks are past the run): a branch per chunk cost
// the loop its convergence bookkeeping (BSSY, BSYNC) and two branches.
__device__ __forceinline__ void copy_run_warp(u32 dst, const unsigned char* src, int chunks, int lane) {
#pragma unroll
  for (int i = 0; i < CAPW / 128; ++i) {
    asm volatile("{\n .reg .pred p;\n setp.lt.s32 p, %2, %3;\n @p cp.async.cg.shared.global [%0], [%1], 16;\n}\n"
                 ::"r"(dst + i * 512), "l"(src + i * 512), "r"(lane + i * 32), "r"(chunks) : "memory");
  }
}

// Scatter a tile's run: its first `staged` words from the stage buffer at `stage`, the rest (an
// over-full tile) straight from global memory, into the dense tile at `base`. `count` words in
// all, a multiple of 4 (sentinels included).
__device__ __forceinline__ void scatter_run(u32 stage, const u32* __restrict__ run, int staged, int count,
                                            u32 base, int lane) {
  const u32 limit = base + SENTINEL_SLOT;
  const int quads = staged >> 2;
  for (int q0 = lane; q0 < quads; q0 += SCATTER_BATCH * 32) {
    U4 v[SCATTER_BATCH];
#pragma unroll
    for (int b = 0; b < SCATTER_BATCH; ++b) {
      v[b] = lds_u4(stage + static_cast<u32>(min(q0 + b * 32, CAPW / 4 - 1)) * 16u);  // in the buffer
    }
#pragma unroll
    for (int b = 0; b < SCATTER_BATCH; ++b) store_quad_if(base, limit, v[b], q0 + b * 32 < quads);
  }
  const U4* rest = reinterpret_cast<const U4*>(run);
  for (int q = quads + lane; q < (count >> 2); q += 32) store_quad_if(base, limit, ldg_u4(rest + q), true);
}

}  // namespace csl16
}  // namespace flashllm

extern "C" __global__ void __launch_bounds__(flashllm::THREADS) flashllm_tiled_csl16_spmm(
    // pointers
    const u16* __restrict__ x,        // (N, ldx) activations, row-major
    const u32* __restrict__ words,    // packed value | slot << 16
    const int* __restrict__ offsets,  // tiles + 1 run starts, in words
    const u16* __restrict__ bias,     // (M,) or null
    u16* __restrict__ y,              // (N, M) output when ws is null
    float* __restrict__ ws,           // (N, M) zeroed fp32 split-K workspace, or null
    // sizes
    int M, int N, int ldx, int kx,  // kx: valid activation columns, a multiple of 8
    int KT, int MT,                 // tiles along K and along M (16-row groups)
    int kt_per_split,
    int* __restrict__ counters) {  // unused (no last-block split-K here); keeps the common layout
  using namespace flashllm;
  using namespace flashllm::csl16;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int kt0 = blockIdx.y * kt_per_split;
  const int nk = min(KT - kt0, kt_per_split);
  const int n0 = blockIdx.z * NROWS;
  if (nk <= 0 || static_cast<int>(blockIdx.x) * WARPS >= MT) return;  // block-uniform, before any barrier
  trap_unless_smem(SMEM_BYTES, tid);

  const int group = blockIdx.x * WARPS + warp;  // this warp's 16 weight rows
  const bool live = group < MT;                 // (a warp past M runs empty tiles: it joins the barriers)
  const u32 sbase = smem_u32(smem);
  const u32 xbase = sbase;
  const u32 wbase = sbase + X_BYTES + warp * WARP_BYTES;  // dense tiles 0, 1, then the stages
  const u32 stage0 = wbase + 2 * DENSE_BYTES;

  // The dense tiles start zeroed; afterwards each lane zeroes the fragments it read.
  for (int c = lane; c < 2 * DENSE_BYTES / 16; c += 32) sts_zero16(wbase + c * 16);

  // Run bounds in registers, one per lane: lane l holds the offset of the window's tile l, windows
  // of 32 tiles starting at a multiple of 16 (the scatter's tile i and the copy's tile
  // i + STAGES - 1 < i + 16 both fall in the current one), the next window loaded 16 tiles ahead;
  // a tile's bounds are two shuffles. Clamped to the split's end, whose bound exists.
  const int* tile_offsets = offsets + static_cast<size_t>(live ? group : 0) * KT + kt0;
  auto load_window = [&](int first) { return live ? tile_offsets[min(first + lane, nk)] : 0; };
  const XStager xstage(x, ldx, n0, N, kx, tid);
  auto stage_chunk = [&](int c) {  // the activations of tiles c XT .. c XT + XT - 1 of the split
#pragma unroll 1
    for (int t = 0; t < min(XT, nk - c * XT); ++t) xstage.stage(xbase + t * X_STAGE_BYTES, (kt0 + c * XT + t) * TILE_K);
  };
  // This lane's first chunk of a run starting at word 0, and of its stage buffers.
  [[maybe_unused]] const unsigned char* lane_words = reinterpret_cast<const unsigned char*>(words) + lane * 16;
  [[maybe_unused]] const u32 lane_stage0 = stage0 + lane * 16;
  [[maybe_unused]] const u32 bars = stage0 + STAGES * WORDS_BYTES;  // BULK: stage st's mbarrier at bars + 8 st
  auto issue = [&](int st, int lo, int hi) {
    const int count = min(max(hi - lo, 0), TILE_ELEMS);
#if FLASHLLM_USE_BULK
    if (lane == 0) {  // one arrival per use, with the bytes to expect (none: the phase completes at once)
      const u32 bytes = static_cast<u32>(min(count, CAPW)) * 4u;
      mbar_arrive_expect(bars + st * 8, bytes);
      if (bytes > 0) bulk_copy(stage0 + st * WORDS_BYTES, words + lo, bytes, bars + st * 8);
    }
#else
    copy_run_warp(lane_stage0 + st * WORDS_BYTES, lane_words + static_cast<size_t>(static_cast<u32>(lo)) * 4,
                  min(count, CAPW) >> 2, lane);
#endif
  };

#if FLASHLLM_USE_BULK
  if (lane == 0) init_stage_barriers(bars);
  __syncwarp();  // and to every lane before it waits on one
#endif
  // Prologue: the first activation chunk (its own cp.async group, the oldest), then STAGES - 1
  // tiles' words.
  stage_chunk(0);
  cp_async_commit();
  int window = 0;  // the first tile of the current window
  int bounds = load_window(0), bounds_next = load_window(16);
  auto lo_of = [&](int t) { return __shfl_sync(FULL, bounds, t - window); };
  auto hi_of = [&](int t) { return __shfl_sync(FULL, bounds, t + 1 - window); };
#pragma unroll
  for (int p = 0; p < STAGES - 1; ++p) {
    if (p < nk) issue(p, lo_of(p), hi_of(p));
    cp_async_commit();
  }

  float acc[A_STEPS][2][NT][4];
#pragma unroll
  for (int p = 0; p < A_STEPS; ++p)
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[p][h][nt][e] = 0.f;

  const u32 frag = kept(static_cast<u32>(lane) * 16u);  // this lane's 16 bytes of each 512-byte quarter
  // Tiles in windows of 16 (an outer loop, so the next window's load is not if-converted into
  // every tile's path).
#pragma unroll 1
  for (int first = 0; first < nk; first += 16) {
    if (first > 0) {
      window = first;
      bounds = bounds_next;
      bounds_next = load_window(first + 16);
    }
#pragma unroll 1
    for (int i = first; i < min(first + 16, nk); ++i) {
      const int st = i % STAGES;
      if (i > 0 && i % XT == 0) {  // the next activation chunk (block-wide; rare with split-K)
        __syncthreads();            // every warp is done with the previous chunk
        stage_chunk(i / XT);
        cp_async_commit();
        cp_async_wait<0>();
        __syncthreads();
      } else if (BULK) {
        if (i == 0) {  // the activation chunk, the only cp.async group
          cp_async_wait<0>();
          __syncthreads();
        }
      } else {
        cp_async_wait<STAGES - 2>();  // this lane's copies of tile i (and of chunk 0) have landed
        if (i == 0) __syncthreads();  // everyone's copies of chunk 0
      }
#if FLASHLLM_USE_BULK
      mbar_wait(bars + st * 8, static_cast<u32>(i / STAGES) & 1u);  // tile i's words (its stage's phase)
#endif
      __syncwarp();  // the warp's copies of tile i are visible to every lane; tile i - 1's stage is free
      const int j = i + STAGES - 1;
      const int jlo = lo_of(j), jhi = hi_of(j);  // (all lanes shuffle, whether or not j < nk)
      if (j < nk) issue(j % STAGES, jlo, jhi);
      cp_async_commit();
      const int lo = lo_of(i);
      const int count = min(max(hi_of(i) - lo, 0), TILE_ELEMS);

      const u32 dense = wbase + (i & 1) * DENSE_BYTES;
      scatter_run(stage0 + st * WORDS_BYTES, words + lo, min(count, CAPW), count, dense, lane);
      __syncwarp();  // every word of tile i is in the dense tile

      // B fragments of the 16 rows x 4 k16 steps: b[h][q] holds steps 2q, 2q + 1 of half h, each as
      // (b0, b1); zeroed right after (the next scatter into this tile is two tiles away, after a
      // __syncwarp).
      U4 b[2][2];
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const u32 at = dense + static_cast<u32>(h * 1024 + q * 512) + frag;
          b[h][q] = lds_u4(at);
          sts_zero16(at);
        }
      const u32 xs = xbase + (i % XT) * X_STAGE_BYTES;
      u32 a[NT][4];
#pragma unroll
      for (int kc = 0; kc < 4; ++kc) {
        if (acc_step<A_STEPS>(kc) == 0) load_a_frags<A_STEPS>(xs, kc, lane, a);
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const U4& bq = b[h][kc >> 1];
          const u32 b0 = (kc & 1) ? bq.z : bq.x;
          const u32 b1 = (kc & 1) ? bq.w : bq.y;
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) mma16816(acc[acc_step<A_STEPS>(kc)][h][nt], a[nt], b0, b1);
        }
      }
    }
  }
  cp_async_wait<0>();

#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      if constexpr (A_STEPS == 2) fold_steps(acc[0][h][nt], acc[1][h][nt]);
      if (live) store_acc(acc[0][h][nt], group * TILE_M + h * 8, n0 + nt * 16, lane, M, N, bias, y, ws);
    }
}
