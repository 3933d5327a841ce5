// y = x @ W.T for W in the Tiled-CSL format (layout version 2, see formats/tiled_csl.py), the
// Flash-LLM design without its density cap.
//
// Design. A block of 4 warps (or 8, FLASHLLM_WARPS) owns one strip of 128 weight rows and a range
// of 128 x 64 tiles along K (split-K: blockIdx.y). Each tile's words (value | slot << 16)
// stream into shared memory with cp.async, STAGES deep, CAPW words per stage; a tile with more
// words than CAPW (denser than CAPW / 8192) loads the rest synchronously in CAPW pieces, so every
// density from 0 to 100% is exact. The block scatters tile i + 1's words into a zeroed 128 x 64
// shared-memory tile while the warps run the tensor cores on tile i from the other one (double
// buffer, one barrier per tile): the work per tile is one 2-byte store per non-zero, not per
// element. Each warp then reads its 32 rows (16 with 8 warps) with ldmatrix and zeroes them again
// right after, so no block-wide clearing pass is needed. The kernel is latency-bound (its 64 KB of
// shared memory allow 3 blocks per SM): 8 warps per block put twice the warps in flight on the
// same shared memory. The tile is XOR-swizzled by 16-byte chunk (chunk ^= row % 8) so ldmatrix is
// conflict-free. A word's slot is its value's byte offset in that swizzled tile, computed ahead of
// time (the sentinel's, 16384, is a spare slot past the tile that is never read), and a tile's
// words are ordered so that each warp-wide store of the scatter hits 32 different banks: the
// scatter is a clamp and a store per word, without bank conflicts (layout version 1 stored the
// location, which took 6.5 instructions per word and 3.0-3.3 shared-memory wavefronts per store).
//
// FLASHLLM_DENSE_TILES = 1 trades that overlap for memory-level parallelism: one dense tile, and
// per tile the block scatters, synchronizes, then runs the tensor cores (two barriers per tile).
// Scattering one tile ahead consumes a stage: with two dense tiles only STAGES - 2 tiles are in
// flight while the warps work (one at 3 stages), with one tile STAGES - 1, and the 16 KB freed
// fit more stages or blocks. At high sparsity the scatter is short and the kernel waits on the
// weight stream (BENCHMARKS.md: 10-13 KB in flight per SM at 90%), which this addresses.
//
// Extra compile-time parameter: FLASHLLM_CAPW, words per stage buffer (a multiple of 4); optional
// FLASHLLM_WARPS 4 (default) or 8, FLASHLLM_DENSE_TILES 2 (default) or 1. FLASHLLM_PROBE
// (diagnostics only, python -m flashllm.bench.probes; the output is then not the product): 1
// streams the stages and reloads the pieces of dense tiles but scatters nothing, 2 adds the scatter
// and the re-zeroing, without the ldmatrix and mma; 0 (default) is the kernel.
#include "common.cuh"

#ifndef FLASHLLM_CAPW
#error "FLASHLLM_CAPW must be defined (words per stage, a multiple of 4)"
#endif

namespace flashllm {
namespace csl {

constexpr int TILE_M = 128;
constexpr int TILE_K = 64;
constexpr int TILE_ELEMS = TILE_M * TILE_K;
constexpr u32 SENTINEL_SLOT = 2 * TILE_ELEMS;  // byte offset of the spare slot
constexpr int CAPW = FLASHLLM_CAPW;
constexpr int WARP_ROWS = TILE_M / WARPS;  // 32 or 16 rows of the tile per warp
constexpr int HALVES = WARP_ROWS / 16;     // 16-row mma rows per warp
static_assert(CAPW % 4 == 0 && CAPW >= 256 && CAPW <= TILE_ELEMS, "CAPW");
#ifndef FLASHLLM_DENSE_TILES
#define FLASHLLM_DENSE_TILES 2
#endif
constexpr int DENSE_TILES = FLASHLLM_DENSE_TILES;
static_assert(DENSE_TILES == 1 || DENSE_TILES == 2, "DENSE_TILES");
constexpr bool SCATTER_AHEAD = DENSE_TILES == 2;  // scatter tile i + 1 while reading tile i
#ifndef FLASHLLM_PROBE
#define FLASHLLM_PROBE 0
#endif
static_assert(FLASHLLM_PROBE >= 0 && FLASHLLM_PROBE <= 2, "PROBE");
constexpr bool RUN_SCATTER = FLASHLLM_PROBE != 1;
constexpr bool RUN_MMA = FLASHLLM_PROBE == 0;
static_assert(STAGES >= (SCATTER_AHEAD ? 3 : 2), "STAGES: 3 or more to scatter ahead, 2 with one dense tile");
constexpr int DENSE_BYTES = (TILE_ELEMS + 8) * 2;  // the tile plus the sentinel's slot
constexpr int STAGE0_OFF = DENSE_TILES * DENSE_BYTES;
constexpr int WORDS_BYTES = CAPW * 4;
constexpr int STAGE_BYTES = WORDS_BYTES + X_STAGE_BYTES;
constexpr int INFO_OFF = STAGE0_OFF + STAGES * STAGE_BYTES;
constexpr int SMEM_BYTES = INFO_OFF + STAGES * 8;
static_assert(DENSE_BYTES % 16 == 0 && STAGE_BYTES % 16 == 0, "16-byte aligned buffers");
#ifdef FLASHLLM_SMEM_BYTES  // the launcher's size (kernels/configs.py) must match this layout
static_assert(SMEM_BYTES == FLASHLLM_SMEM_BYTES, "configs.LaunchConfig.smem_bytes disagrees with the kernel");
#endif

struct alignas(16) U4 {
  u32 x, y, z, w;
};
struct alignas(8) RunInfo {
  int start;  // first word of the tile
  int count;  // words of the tile, padding included
};

// The value of word w lands at byte (w >> 16) of the dense tile at shared address `base`. Clamped
// (to `limit`, the spare slot's address) so that corrupt data, which the format's validation
// refuses, lands there instead of outside the buffer. The slot is added before the clamp, so a word
// costs two instructions (LEA.HI, VIMNMX) and the store; no memory clobber, so the next words'
// loads may move above the stores (__syncthreads orders them with the ldmatrix reads).
__device__ __forceinline__ void store_word(u32 base, u32 limit, u32 w) {
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(min(base + (w >> 16), limit)), "h"(static_cast<unsigned short>(w)));
}

__device__ __forceinline__ void scatter_words(const unsigned char* words, int n, u16* dense, int tid) {
  if constexpr (!RUN_SCATTER) return;
  const U4* w4 = reinterpret_cast<const U4*>(words);
  const u32 base = smem_u32(dense);
  const u32 limit = base + SENTINEL_SLOT;
  for (int q = tid; q < (n >> 2); q += THREADS) {
    const U4 v = w4[q];
    store_word(base, limit, v.x);
    store_word(base, limit, v.y);
    store_word(base, limit, v.z);
    store_word(base, limit, v.w);
  }
}

}  // namespace csl
}  // namespace flashllm

// With 8 warps ptxas otherwise caps the registers at 64 and spills (the 4-warp variants keep the
// bounds they were validated with).
#if FLASHLLM_WARPS == 8
#define FLASHLLM_CSL_BOUNDS __launch_bounds__(flashllm::THREADS, 1)
#else
#define FLASHLLM_CSL_BOUNDS __launch_bounds__(flashllm::THREADS)
#endif

extern "C" __global__ void FLASHLLM_CSL_BOUNDS flashllm_tiled_csl_spmm(
    // pointers
    const u16* __restrict__ x,       // (N, ldx) activations, row-major
    const u32* __restrict__ words,   // packed value | slot << 16
    const int* __restrict__ offsets,  // tiles + 1 run starts, in words
    const u16* __restrict__ bias,    // (M,) or null
    u16* __restrict__ y,             // (N, M) output when ws is null
    float* __restrict__ ws,          // (N, M) zeroed fp32 split-K workspace, or null
    // sizes
    int M, int N, int ldx, int kx,  // kx: valid activation columns, a multiple of 8
    int KT, int MT,                 // tiles along K and along M
    int kt_per_split,
    // last, so that the parameters above keep their offsets in the variants without it
    int* __restrict__ counters) {  // FIXUP: zeroed split-K arrival counts, one per output tile
  using namespace flashllm;
  using namespace flashllm::csl;
  extern __shared__ __align__(16) unsigned char smem[];

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int strip = blockIdx.x;
  const int kt0 = blockIdx.y * kt_per_split;
  const int nk = min(KT - kt0, kt_per_split);
  const int n0 = blockIdx.z * NROWS;
  if (nk <= 0 || strip >= MT) return;  // block-uniform, before any barrier

  trap_unless_smem(SMEM_BYTES, tid);

  const u32 sbase = smem_u32(smem);
  RunInfo* info = reinterpret_cast<RunInfo*>(smem + INFO_OFF);
  auto stage_words = [&](int st) { return smem + STAGE0_OFF + st * STAGE_BYTES; };
  auto dense = [&](int b) { return reinterpret_cast<u16*>(smem + b * DENSE_BYTES); };

  // The dense tiles start zeroed; afterwards each warp re-zeroes the rows it consumed.
  for (int c = tid; c < DENSE_TILES * DENSE_BYTES / 16; c += THREADS) {
    reinterpret_cast<U4*>(smem)[c] = U4{0u, 0u, 0u, 0u};
  }

  const int* tile_offsets = offsets + static_cast<size_t>(strip) * KT + kt0;  // this block's tiles
  const XStager xstage(x, ldx, n0, N, kx, tid);
  auto load_offsets = [&](int j, int& lo, int& hi) {
    lo = tile_offsets[j];
    hi = tile_offsets[j + 1];
  };
  auto issue = [&](int j, int st, int lo, int hi) {
    const int count = min(max(hi - lo, 0), TILE_ELEMS);
    const int first = min(count, CAPW);
    const u32 dst = smem_u32(stage_words(st));
    copy_run<CAPW / 4>(dst, words + lo, first >> 2, tid);
    xstage.stage(dst + WORDS_BYTES, (kt0 + j) * TILE_K);
    if (tid == 0) info[st] = RunInfo{lo, count};  // read after at least one barrier
  };
  // FLASHLLM_PREFETCH: thread 0 asks L2 for tile t's words, PREFETCH tiles past the copies (see the
  // bitmap kernel); the run's bounds are loaded a stage ahead (pf_lo, pf_hi).
  int pf_lo = 0, pf_hi = 0;
  auto prefetch = [&](int lo, int hi) {
    prefetch_l2(words + lo, static_cast<u32>(min(max(hi - lo, 0), TILE_ELEMS)) * 4u);
  };
  // Scatter the tile held by stage st into a dense buffer; a tile over CAPW words reloads the
  // stage's word buffer in pieces (block-uniform branch: every thread sees the same count).
  auto scatter = [&](int st, u16* d) {
    const RunInfo run = info[st];
    unsigned char* buf = stage_words(st);
    const int first = min(run.count, CAPW);
    scatter_words(buf, first, d, tid);
    for (int done = first; done < run.count; done += CAPW) {
      __syncthreads();  // everyone is done reading the previous piece
      const int piece = min(CAPW, run.count - done);
      copy_run<CAPW / 4>(smem_u32(buf), words + run.start + done, piece >> 2, tid);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
      scatter_words(buf, piece, d, tid);
    }
  };

  int nlo = 0, nhi = 0;  // run of the next tile to issue
  {
    int plo[STAGES] = {}, phi[STAGES] = {};
#pragma unroll
    for (int p = 0; p < STAGES; ++p) {
      if (p < nk) load_offsets(p, plo[p], phi[p]);
    }
#pragma unroll
    for (int p = 0; p < STAGES - 1; ++p) {
      if (p < nk) issue(p, p, plo[p], phi[p]);
      cp_async_commit();
    }
    nlo = plo[STAGES - 1];
    nhi = phi[STAGES - 1];
  }
  // The tiles between the prologue's copies and the loop's first prefetch.
  if (PREFETCH > 0 && tid == 0) {
    for (int t = STAGES - 1; t < min(STAGES - 1 + PREFETCH, nk); ++t) {
      prefetch(tile_offsets[t], tile_offsets[t + 1]);
    }
    if (STAGES - 1 + PREFETCH < nk) load_offsets(STAGES - 1 + PREFETCH, pf_lo, pf_hi);
  }
  if constexpr (SCATTER_AHEAD) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile 0 landed, both dense tiles zeroed, info[0] visible
    scatter(0, dense(0));
  }

  float acc[2 * HALVES][NT][4];
#pragma unroll
  for (int mt = 0; mt < 2 * HALVES; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mt][nt][e] = 0.f;

  int st = 0;                 // stage of tile i (its activations)
  int st_next = 1;            // stage of tile i + 1 (its words)
  int st_issue = STAGES - 1;  // stage receiving tile i + STAGES - 1 (the one tile i - 1 freed)
  for (int i = 0; i < nk; ++i) {
    // Scatter ahead: tile i + 1 has landed and tile i is scattered. One dense tile: tile i has
    // landed. Either way tile i - 1's stage and dense rows are free.
    cp_async_wait<SCATTER_AHEAD ? STAGES - 3 : STAGES - 2>();
    __syncthreads();
    const int j = i + STAGES - 1;
    if (j < nk) issue(j, st_issue, nlo, nhi);
    // Unconditional (clamped to the last tile): loaded under a branch, the bounds were kept on the
    // stack by some variants, and the store waited for the load it was meant to hide.
    load_offsets(min(j + 1, nk - 1), nlo, nhi);
    if (PREFETCH > 0 && tid == 0 && j + PREFETCH < nk) {
      prefetch(pf_lo, pf_hi);
      if (j + PREFETCH + 1 < nk) load_offsets(j + PREFETCH + 1, pf_lo, pf_hi);
    }
    cp_async_commit();
    const int dense_i = SCATTER_AHEAD ? i & 1 : 0;  // the dense tile holding tile i
    if constexpr (!SCATTER_AHEAD) {
      scatter(st, dense(0));
      __syncthreads();  // every word of tile i is in the dense tile
    }

    // Tensor cores on tile i: warp w owns rows WARP_ROWS w.. as HALVES 16-row halves; one
    // ldmatrix.x4 gives the B fragments (k 0-7 and 8-15) of both 8-row groups of a half.
    const u32 d_addr = sbase + dense_i * DENSE_BYTES;
    const u32 xs = sbase + STAGE0_OFF + st * STAGE_BYTES + WORDS_BYTES;
#pragma unroll
    for (int kc = 0; kc < (RUN_MMA ? 4 : 0); ++kc) {
      u32 a[NT][4];
      load_a_frags<1>(xs, kc, lane, a);
#pragma unroll
      for (int h = 0; h < HALVES; ++h) {
        const int q = lane >> 3;
        const int row = warp * WARP_ROWS + h * 16 + (q >> 1) * 8 + (lane & 7);
        const int chunk = kc * 2 + (q & 1);
        u32 b00, b01, b10, b11;
        ldmatrix_x4(d_addr + static_cast<u32>(row * TILE_K + ((chunk ^ (lane & 7)) << 3)) * 2u, b00,
                    b01, b10, b11);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma16816(acc[2 * h][nt], a[nt], b00, b01);
          mma16816(acc[2 * h + 1][nt], a[nt], b10, b11);
        }
      }
    }
    __syncwarp();
    if constexpr (RUN_SCATTER) {
      U4* rows = reinterpret_cast<U4*>(smem + dense_i * DENSE_BYTES + warp * WARP_ROWS * TILE_K * 2);
#pragma unroll
      for (int c = lane; c < WARP_ROWS * TILE_K * 2 / 16; c += 32) rows[c] = U4{0u, 0u, 0u, 0u};
    }

    if (SCATTER_AHEAD && i + 1 < nk) scatter(st_next, dense((i + 1) & 1));

    st = st_next;
    st_next = st_next + 1 == STAGES ? 0 : st_next + 1;
    st_issue = st_issue + 1 == STAGES ? 0 : st_issue + 1;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int mt = 0; mt < 2 * HALVES; ++mt)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
      store_acc(acc[mt][nt], strip * TILE_M + warp * WARP_ROWS + mt * 8, n0 + nt * 16, lane, M, N,
                bias, y, ws);
#if FLASHLLM_FIXUP  // (an `if constexpr` would do, but it changes the other variants' SASS)
  if (ws != nullptr) {
    splitk_fixup<TILE_M>(ws, counters, bias, y, M, N, KT, kt_per_split, reinterpret_cast<volatile int*>(smem));
  }
#endif
}
