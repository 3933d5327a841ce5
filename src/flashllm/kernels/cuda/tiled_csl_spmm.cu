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
// FLASHLLM_CORES = 1 multiplies one activation row (N = 1, a decode step at batch 1) on the CUDA
// cores instead, from the words themselves: no dense tile, no zeroing, no ldmatrix, no mma, so the
// work per tile follows the non-zeros alone (the tensor-core path pays per element for the dense
// tile's reads and re-zeroing, and at N = 1 uses 1 of the 16 rows of each mma). Each thread takes
// words as the scatter would and adds value * x[column] into the tile row's fp32 sum in shared
// memory. The sums are kept per lane (sums[row][lane]: a warp's 32 adds hit 32 different words in
// 32 different banks, whatever their rows), added by a compare-and-swap loop (no shared-memory
// float add exists) that repeats only when another warp changed the same word in between, and
// folded over the lanes once per block. The sentinel words add their zero to row 0. The
// activations are staged as 8 copies of the row, copy r with its 16-byte chunks permuted as the
// tile rows r, r + 8, ... are swizzled, so a word's slot (masked to 10 bits) is the byte offset of
// its activation: no column arithmetic per word. The block traps if asked for more than one
// activation row (the launcher never does). FLASHLLM_CORES = 2 gives each warp its own sums
// instead (4 x 16 KB): no compare-and-swap, a plain load, fma and store per word (a thread's own
// words of one row stay in program order), for 48 KB more shared memory per block (2 resident
// blocks instead of 5) and a fold over the 4 warps' sums too.
//
// FLASHLLM_WGMMA = 1 (sm_90a: H100, H200) runs the tensor cores as Hopper's warpgroup MMA instead
// of ldmatrix + mma.sync: the 4 warps are one warpgroup, which per tile issues 8 wgmma.m64nNk16
// (two 64-row halves x four k16 steps, N = NROWS) that read the dense tile and the activations
// straight from shared memory, asynchronously. The warps scatter the next tile into the other dense
// tile while the tensor cores read this one, then wait for them and zero the tile they read. The
// kernel is latency-bound (BENCHMARKS.md, sixteenth session: no warp eligible in 58-72% of cycles
// at N = 8), and this takes the ldmatrix -> mma dependency chains, the fragment registers and their
// address arithmetic off the warps; at N = 8 no half of an mma is wasted (n8 is a wgmma shape), and
// each activation row is read once per 64 weight rows instead of once per warp's 16 or 32. The
// dense tile's XOR swizzle is exactly the tensor cores' 128-byte swizzle, so the format does not
// change; the activations are staged in it too (XStagerT<true>), and every operand starts 1024-byte
// aligned (the swizzle's period: the block's first up to 1024 bytes of shared memory are slack).
//
// Extra compile-time parameter: FLASHLLM_CAPW, words per stage buffer (a multiple of 4); optional
// FLASHLLM_WARPS 4 (default) or 8, FLASHLLM_DENSE_TILES 2 (default) or 1, FLASHLLM_CORES 0
// (default), 1 or 2 (4 warps, NROWS 8, DENSE_TILES ignored: no dense tile), FLASHLLM_WGMMA 0
// (default) or 1 (4 warps, two dense tiles, NROWS <= 64, no prefetch or probe). FLASHLLM_PROBE
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
#ifndef FLASHLLM_CORES
#define FLASHLLM_CORES 0
#endif
constexpr bool CORES = FLASHLLM_CORES != 0;
constexpr bool WARP_SUMS = FLASHLLM_CORES == 2;  // per-warp sums, no compare-and-swap
static_assert(FLASHLLM_CORES >= 0 && FLASHLLM_CORES <= 2, "CORES: 0, 1 or 2");
static_assert(!CORES || (WARPS == 4 && NROWS == 8), "CORES: 4 warps, NROWS 8");
// Dense tiles laid out: none on the CUDA-core path.
constexpr int DENSE_TILES = CORES ? 0 : FLASHLLM_DENSE_TILES;
static_assert(CORES || DENSE_TILES == 1 || DENSE_TILES == 2, "DENSE_TILES");
constexpr bool SCATTER_AHEAD = DENSE_TILES == 2;  // scatter tile i + 1 while reading tile i
// k16 steps per A-fragment load (common.cuh, load_a_frags): two at NROWS == 8, except with 8 warps
// and one dense tile. The paired steps' second set of accumulators costs registers: 8 warps with
// one dense tile went from 64 to 72 (4 resident blocks down to 3; capped at 64 the pairing saved
// 4 instructions of 18), so they keep one step per load; 4 warps (two 16-row halves each) take
// 92-111 under the launch bounds below, which keep their resident blocks.
[[maybe_unused]] constexpr int A_STEPS = HALF_A && (HALVES == 2 || DENSE_TILES == 2) ? 2 : 1;
#ifndef FLASHLLM_PROBE
#define FLASHLLM_PROBE 0
#endif
static_assert(FLASHLLM_PROBE >= 0 && FLASHLLM_PROBE <= 2, "PROBE");
static_assert(FLASHLLM_PROBE == 0 || !CORES, "PROBE: the CUDA-core path has no levels to leave out");
constexpr bool RUN_SCATTER = FLASHLLM_PROBE != 1 && !CORES;
[[maybe_unused]] constexpr bool RUN_MMA = FLASHLLM_PROBE == 0 && !CORES && !FLASHLLM_WGMMA;  // (mma.sync path)
static_assert(STAGES >= (SCATTER_AHEAD ? 3 : 2), "STAGES: 3 or more to scatter ahead, 2 otherwise");
constexpr int DENSE_BYTES = (TILE_ELEMS + 8) * 2;  // the tile plus the sentinel's slot
constexpr bool WGMMA = FLASHLLM_WGMMA != 0;  // (common.cuh: 0 unless defined)
static_assert(!WGMMA || (WARPS == 4 && DENSE_TILES == 2 && NROWS <= 64 && PREFETCH == 0 && FLASHLLM_PROBE == 0),
              "WGMMA: one warpgroup (4 warps), two dense tiles, NROWS <= 64, no prefetch, no probe");
// The dense tiles, the stages (each its words, then its activations), the run bounds. WGMMA's
// operands start on 1024-byte boundaries (the 128-byte swizzle's period) from the block's first
// one: the dense tiles padded to 1024 bytes, then the activation stages in a region of their own
// (NROWS unpadded 128-byte rows each), then stages of words alone.
constexpr int DENSE_STRIDE = WGMMA ? (DENSE_BYTES + 1023) / 1024 * 1024 : DENSE_BYTES;
constexpr int X_REGION_OFF = DENSE_TILES * DENSE_STRIDE;  // WGMMA
constexpr int W_X_BYTES = NROWS * 128;                      // WGMMA: one stage's activations
constexpr int STAGE0_OFF = X_REGION_OFF + (WGMMA ? STAGES * W_X_BYTES : 0);
constexpr int WORDS_BYTES = CAPW * 4;
constexpr int STAGE_BYTES = WORDS_BYTES + (WGMMA ? 0 : X_STAGE_BYTES);
constexpr int INFO_OFF = STAGE0_OFF + STAGES * STAGE_BYTES;
static_assert(!WGMMA || (X_REGION_OFF % 1024 == 0 && W_X_BYTES % 1024 == 0 && TILE_K * 2 == 128),
              "WGMMA: 1024-byte aligned operands, 128-byte rows");
// CORES: the per-lane row sums after the run bounds (16-byte aligned), 128 rows of 32 lanes' floats
// (one such array per warp with WARP_SUMS, warp w's at + SUMS_BYTES w).
constexpr int SUMS_OFF = INFO_OFF + (STAGES * 8 + 15) / 16 * 16;
constexpr int SUM_ROWS = TILE_M;
constexpr int SUMS_BYTES = SUM_ROWS * 32 * 4;
constexpr int SUM_ARRAYS = WARP_SUMS ? WARPS : 1;
constexpr int SMEM_BYTES = WGMMA ? 1024 + INFO_OFF + STAGES * 8  // (+ the slack before the first boundary)
                           : CORES ? SUMS_OFF + SUM_ARRAYS * SUMS_BYTES : INFO_OFF + STAGES * 8;
static_assert(!CORES || X_STAGE_BYTES >= 8 * TILE_K * 2, "CORES: 8 copies of the row fit a stage's activations");
static_assert(SUMS_OFF % 16 == 0, "CORES: the sums are zeroed 16 bytes at a time");
static_assert(DENSE_BYTES % 16 == 0 && STAGE_BYTES % 16 == 0, "16-byte aligned buffers");
#ifdef FLASHLLM_SMEM_BYTES  // the launcher's size (kernels/configs.py) must match this layout
static_assert(SMEM_BYTES == FLASHLLM_SMEM_BYTES, "configs.LaunchConfig.smem_bytes disagrees with the kernel");
#endif

struct alignas(8) RunInfo {
  int start;  // first word of the tile
  int count;  // words of the tile, padding included
};

// A thread's 16-byte word loads per batch, all issued before the batch's stores: ptxas keeps a
// shared load below any earlier shared store (they might alias), so a loop of load-then-stores
// waited out each load's latency in turn, with only a few warps per scheduler to hide it (Nsight
// Compute: 72% of issue cycles idle at 80%, N = 8). A stage's words take CAPW / (4 THREADS) loads
// per thread (4 at 2048 words and 4 warps); at most 4 per batch, 2 with 8 warps (3 cost an 8-warp
// build a resident block).
constexpr int SCATTER_LOADS = (CAPW / 4 + THREADS - 1) / THREADS;  // per thread, a full stage
constexpr int SCATTER_MAX_BATCH = WARPS == 8 ? 2 : 4;
constexpr int SCATTER_BATCH = SCATTER_LOADS < SCATTER_MAX_BATCH ? SCATTER_LOADS : SCATTER_MAX_BATCH;

__device__ __forceinline__ void scatter_words(const unsigned char* words, int n, u16* dense, int tid) {
  if constexpr (!RUN_SCATTER) return;
  const U4* w4 = reinterpret_cast<const U4*>(words);
  const u32 base = smem_u32(dense);
  const u32 limit = base + SENTINEL_SLOT;
  const int quads = n >> 2;
  for (int q0 = tid; q0 < quads; q0 += SCATTER_BATCH * THREADS) {
    U4 v[SCATTER_BATCH];
#pragma unroll
    for (int b = 0; b < SCATTER_BATCH; ++b) {
      if (q0 + b * THREADS < quads) v[b] = w4[q0 + b * THREADS];
    }
#pragma unroll
    for (int b = 0; b < SCATTER_BATCH; ++b) {
      store_quad_if(base, limit, v[b], q0 + b * THREADS < quads);
    }
  }
}

// CORES: stage the activation row x[n, k0 : k0 + 64] as 8 copies, copy r's 16-byte chunk c being
// the row's chunk c ^ r, the order of a swizzled tile row r (mod 8): the word of element (r, c)
// then finds its activation at byte (slot & 0x3fe) of the copies. Thread t < 64 copies chunk t;
// columns at or past kx are zero-filled, and nothing is read for a row at or past N.
struct RowCopiesStager {
  const u16* x;
  const u16* row;  // x[n] (only dereferenced when n < N)
  u32 dst;         // byte offset of this thread's chunk in a stage's activations
  int col;         // the row's column this thread copies, relative to k0
  int kx;
  bool mine, live;

  __device__ __forceinline__ RowCopiesStager(const u16* __restrict__ x_, int ldx, int n, int N, int kx_, int tid)
      : x(x_), row(x_ + static_cast<size_t>(n) * ldx), dst(tid * 16u), col(((tid & 7) ^ ((tid >> 3) & 7)) * 8),
        kx(kx_), mine(tid < 64), live(n < N) {}

  __device__ __forceinline__ void stage(u32 xs, int k0) const {
    if (!mine) return;
    const bool ok = live && k0 + col < kx;
    cp_async16(xs + dst, ok ? row + k0 + col : x, ok ? 16u : 0u);  // as XStager: nothing read when !ok
  }
};

template <bool ROW_COPIES>
struct StagerOf {
  using type = XStagerT<WGMMA>;  // (WGMMA: the 128-byte swizzle)
};
template <>
struct StagerOf<true> {
  using type = RowCopiesStager;
};

// CORES: shared-memory word access for the sums (volatile: they stay in program order with the
// compare-and-swaps around them).
__device__ __forceinline__ u32 lds_u32(u32 addr) {
  u32 v;
  asm volatile("ld.shared.u32 %0, [%1];\n" : "=r"(v) : "r"(addr) : "memory");
  return v;
}
// The word at `addr` becomes `next` if it still holds `expected`; returns what it held.
__device__ __forceinline__ u32 cas_shared(u32 addr, u32 expected, u32 next) {
  u32 seen;
  asm volatile("atom.shared.cas.b32 %0, [%1], %2, %3;\n" : "=r"(seen) : "r"(addr), "r"(expected), "r"(next) : "memory");
  return seen;
}
__device__ __forceinline__ u32 fma_bits(float a, float b, u32 sum) {
  return __float_as_uint(fmaf(a, b, __uint_as_float(sum)));
}

// CORES: sums[row][lane] += value * x[column] for the 4 words of one 16-byte load, `sums` the shared
// address of this lane's column of sums (row r's float at + 128 r), `xs` of the staged row copies.
// There is no shared-memory float add: each sum is read, and a compare-and-swap writes the new
// one if it is unchanged, else the swap repeats with what it found. All four words' activations
// and sums are loaded first (their latencies overlap); a swap finds its sum changed only after
// another warp's add in between, or this thread's own earlier word of the same row (one more try).
// (Issuing the four swaps before checking any, with a shared retry path, compiled to more
// instructions: a warp takes that path whenever any lane has two words of one row, most quads.)
// A word's row is its slot rounded down to 128 bytes, masked to the tile: the sentinel (slot
// 16384) adds its zero to row 0, and a corrupt slot (which validation refuses) stays in the sums.
__device__ __forceinline__ void add_quad(const U4& q, u32 sums, u32 xs) {
  const u32 w[4] = {q.x, q.y, q.z, q.w};
  u32 at[4], seen[4];
  float value[4], act[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const u32 slot = w[e] >> 16;
    at[e] = sums + (slot & 0x3f80u);
    value[e] = to_float(static_cast<u16>(w[e]));
    act[e] = to_float(lds_u16(xs + (slot & 0x3feu)));
    seen[e] = lds_u32(at[e]);
  }
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    for (u32 expected = seen[e];; expected = seen[e]) {
      seen[e] = cas_shared(at[e], expected, fma_bits(value[e], act[e], expected));
      if (seen[e] == expected) break;
    }
  }
}

// WARP_SUMS: add_quad without the swaps, the sums this warp's alone. Plain C++ accesses, not the
// volatile shared ones: the compiler may then load the activations (read-only here) ahead of the
// stores, while a thread's own words of one row keep their order (a float store and load may alias).
__device__ __forceinline__ void add_quad_to_warp_sums(const U4& q, unsigned char* sums, const unsigned char* xs) {
  const u32 w[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
  for (int e = 0; e < 4; ++e) {
    const u32 slot = w[e] >> 16;
    float* sum = reinterpret_cast<float*>(sums + (slot & 0x3f80u));
    const u16 act = *reinterpret_cast<const u16*>(xs + (slot & 0x3feu));
    *sum = fmaf(to_float(static_cast<u16>(w[e])), to_float(act), *sum);
  }
}

// CORES: add_quad (or add_quad_to_warp_sums) over a piece's n words (n a multiple of 4), quad q by
// thread q % THREADS; `sums` this lane's column of sums, `xs` the staged row copies.
__device__ __forceinline__ void add_words(const unsigned char* words, int n, unsigned char* sums,
                                          const unsigned char* xs, int tid) {
  const U4* w4 = reinterpret_cast<const U4*>(words);
  for (int q = tid; q < (n >> 2); q += THREADS) {
    if constexpr (WARP_SUMS) {
      add_quad_to_warp_sums(w4[q], sums, xs);
    } else {
      add_quad(w4[q], smem_u32(sums), smem_u32(xs));
    }
  }
}

// Run `use(buf, count)` on the words of a tile whose run is `run` and whose stage buffer is `buf`:
// the words already there, then, for a tile over CAPW words, the rest reloaded into `buf` in CAPW
// pieces (a block-uniform branch: every thread sees the same count). The stage's activations, after
// the words, stay where they are.
template <typename Use>
__device__ __forceinline__ void each_piece(const RunInfo run, unsigned char* buf, const u32* __restrict__ words,
                                           int tid, Use&& use) {
  const int first = min(run.count, CAPW);
  use(buf, first);
  for (int done = first; done < run.count; done += CAPW) {
    __syncthreads();  // everyone is done reading the previous piece
    const int piece = min(CAPW, run.count - done);
    copy_run<CAPW / 4>(smem_u32(buf), words + run.start + done, piece >> 2, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    use(buf, piece);
  }
}

}  // namespace csl
}  // namespace flashllm

// With 8 warps ptxas otherwise caps the registers at 64 and spills.
#if FLASHLLM_WARPS == 8
#define FLASHLLM_CSL_BOUNDS __launch_bounds__(flashllm::THREADS, 1)
#elif FLASHLLM_NROWS == 8 && !FLASHLLM_CORES
// 4 warps at 8 activation rows, whose paired k16 steps (A_STEPS) double the accumulators: without
// a minimum ptxas capped one build at 64 registers and spilled. Asking for 3 blocks per SM (two
// dense tiles) or the 5 that one dense tile's shared memory allows on an H100/H200 (4 from 3072
// words per stage) lets them take the 92-111 registers they need without losing a block.
#define FLASHLLM_CSL_BOUNDS __launch_bounds__(flashllm::THREADS, FLASHLLM_DENSE_TILES == 1 && FLASHLLM_CAPW <= 2048 ? 5 : FLASHLLM_DENSE_TILES == 1 ? 4 : 3)
#elif FLASHLLM_CORES
// The CUDA-core path with the last-block split-K spilled 12 bytes at the 40 registers ptxas chose
// for sm_80; asking for 4 resident blocks caps it at 128, more than it needs.
#define FLASHLLM_CSL_BOUNDS __launch_bounds__(flashllm::THREADS, 4)
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
#if FLASHLLM_WGMMA
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* const smem = swizzle_aligned(smem_raw);
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int strip = blockIdx.x;
  const int kt0 = blockIdx.y * kt_per_split;
  const int nk = min(KT - kt0, kt_per_split);
  const int n0 = blockIdx.z * NROWS;
  if (nk <= 0 || strip >= MT) {  // block-uniform, before any barrier
    wait_for_prior_grids();  // (as in the bitmap kernel)
    return;
  }

  trap_unless_smem(SMEM_BYTES, tid);
  if (CORES && N - n0 > 1) __trap();  // one activation row per block: more would be dropped

  const u32 sbase = smem_u32(smem);
  RunInfo* info = reinterpret_cast<RunInfo*>(smem + INFO_OFF);
  auto stage_words = [&](int st) { return smem + STAGE0_OFF + st * STAGE_BYTES; };
  auto dense = [&](int b) { return reinterpret_cast<u16*>(smem + b * DENSE_STRIDE); };

#if FLASHLLM_WGMMA
  // Zeroes dense tile b's 128 rows (not its spare slot): 8 16-byte stores per thread. The tiles
  // start zeroed; afterwards the block zeroes a tile once the tensor cores are done with it.
  auto zero_tile = [&](int b) {
    U4* rows = reinterpret_cast<U4*>(smem + b * DENSE_STRIDE) + tid;
#pragma unroll
    for (int c = 0; c < TILE_ELEMS * 2 / 16 / THREADS; ++c) rows[c * THREADS] = U4{0u, 0u, 0u, 0u};
  };
  zero_tile(0);
  zero_tile(1);
#else
  // The dense tiles start zeroed; afterwards each warp re-zeroes the rows it consumed.
  for (int c = tid; c < DENSE_TILES * DENSE_BYTES / 16; c += THREADS) {
    reinterpret_cast<U4*>(smem)[c] = U4{0u, 0u, 0u, 0u};
  }
#endif
  // CORES: the sums start at zero (the loop's first barrier orders this before any add); this
  // lane's column of them (of its warp's array with WARP_SUMS).
  unsigned char* sums = smem + SUMS_OFF + (WARP_SUMS ? warp * SUMS_BYTES : 0) + lane * 4;
  if constexpr (CORES) {
    for (int c = tid; c < SUM_ARRAYS * SUMS_BYTES / 16; c += THREADS) {
      reinterpret_cast<U4*>(smem + SUMS_OFF)[c] = U4{0u, 0u, 0u, 0u};
    }
  }

  const int* tile_offsets = offsets + static_cast<size_t>(strip) * KT + kt0;  // this block's tiles
#if FLASHLLM_PDL
  // Until the wait only the first tiles' words asked of L2 (see the bitmap kernel).
  prefetch_first_tiles<4, 0>(tile_offsets, min(nk, STAGES), offsets + static_cast<size_t>(MT) * KT, words,
                             TILE_ELEMS, nullptr, tid);
  wait_for_prior_grids();
#endif
  const typename StagerOf<CORES>::type xstage(x, ldx, n0, N, kx, tid);
  auto load_offsets = [&](int j, int& lo, int& hi) {
    lo = tile_offsets[j];
    hi = tile_offsets[j + 1];
  };
  auto issue = [&](int j, int st, int lo, int hi) {
    const int count = min(max(hi - lo, 0), TILE_ELEMS);
    const int first = min(count, CAPW);
    const u32 dst = smem_u32(stage_words(st));
    copy_run<CAPW / 4>(dst, words + lo, first >> 2, tid);
#if FLASHLLM_WGMMA
    xstage.stage(sbase + X_REGION_OFF + st * W_X_BYTES, (kt0 + j) * TILE_K);
#else
    xstage.stage(dst + WORDS_BYTES, (kt0 + j) * TILE_K);
#endif
    if (tid == 0) info[st] = RunInfo{lo, count};  // read after at least one barrier
  };
  // FLASHLLM_PREFETCH: thread 0 asks L2 for tile t's words, PREFETCH tiles past the copies (see the
  // bitmap kernel); the run's bounds are loaded a stage ahead (pf_lo, pf_hi).
  int pf_lo = 0, pf_hi = 0;
  auto prefetch = [&](int lo, int hi) {
    prefetch_l2(words + lo, static_cast<u32>(min(max(hi - lo, 0), TILE_ELEMS)) * 4u);
  };
  // Scatter the tile held by stage st, whose run is `run` (info[st]), into a dense buffer.
  auto scatter = [&](const RunInfo run, int st, u16* d) {
    each_piece(run, stage_words(st), words, tid,
               [&](const unsigned char* buf, int count) { scatter_words(buf, count, d, tid); });
  };
  // CORES: add the tile held by stage st into the sums.
  auto add_tile = [&](int st) {
    each_piece(info[st], stage_words(st), words, tid, [&](unsigned char* buf, int count) {
      add_words(buf, count, sums, buf + WORDS_BYTES, tid);
    });
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
    scatter(info[0], 0, dense(0));
  }

#if FLASHLLM_WGMMA
  float acc_w[2][NROWS / 2];  // the strip's two 64-row halves (common.cuh, store_half)
#pragma unroll
  for (int h = 0; h < 2; ++h)
#pragma unroll
    for (int e = 0; e < NROWS / 2; ++e) acc_w[h][e] = 0.f;
  const u32 dense_lo = desc_lo(sbase);             // dense tile 0, rows 0-63, k 0-15
  const u32 x_lo = desc_lo(sbase + X_REGION_OFF);  // stage 0's activations, k 0-15
#else
  float acc[A_STEPS][2 * HALVES][NT][4];
#pragma unroll
  for (int p = 0; p < A_STEPS; ++p)
#pragma unroll
    for (int mt = 0; mt < 2 * HALVES; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[p][mt][nt][e] = 0.f;

  // Byte offset in a dense tile of the row and swizzled 16-byte chunk this lane addresses for the
  // ldmatrix of k16 step 0, per 16-row half: lane l gives row l % 8 of matrix l / 8 (rows + 8 for
  // matrices 2-3, k 8-15 for 1 and 3). The rows are 128 bytes and step kc's chunk is 2 kc + (q & 1),
  // so step kc's offset is step 0's XOR 32 kc: one LOP3 per step instead of the swizzle's
  // arithmetic, which ptxas otherwise recomputed from the lane index in every tile (`kept`).
  u32 b_offsets[HALVES];
#pragma unroll
  for (int h = 0; h < (RUN_MMA ? HALVES : 0); ++h) {
    const int q = lane >> 3;
    const int row = warp * WARP_ROWS + h * 16 + (q >> 1) * 8 + (lane & 7);
    b_offsets[h] = kept(static_cast<u32>(row * TILE_K + (((q & 1) ^ (lane & 7)) << 3)) * 2u);
  }
  static_assert(TILE_K * 2 == 128, "b_offsets: step kc's chunk bits 1-2 are address bits 5-6 of a 128-byte row");
#endif

  int st = 0;                 // stage of tile i (its activations)
  int st_next = 1;            // stage of tile i + 1 (its words)
  int st_issue = STAGES - 1;  // stage receiving tile i + STAGES - 1 (the one tile i - 1 freed)
  for (int i = 0; i < nk; ++i) {
    // Scatter ahead: tile i + 1 has landed and tile i is scattered. One dense tile: tile i has
    // landed. Either way tile i - 1's stage and dense rows are free.
    cp_async_wait<SCATTER_AHEAD ? STAGES - 3 : STAGES - 2>();
#if FLASHLLM_WGMMA
    fence_proxy_async();  // this thread's scatter of tile i and its copies of tile i's activations
#endif
    __syncthreads();
    // Scatter ahead: tile i + 1's run, read here (its writer passed at least one barrier ago): read
    // where it is used, ptxas kept the load below the re-zeroing stores and the scatter waited on it.
    const RunInfo next_run = info[st_next];
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
    if constexpr (CORES) {
      add_tile(st);
    } else if constexpr (!SCATTER_AHEAD) {
      scatter(info[st], st, dense(0));
      __syncthreads();  // every word of tile i is in the dense tile
    }

#if FLASHLLM_WGMMA
    // Tensor cores on tile i, asynchronously: two 64-row halves x four k16 steps; meanwhile the
    // next tile into the other dense tile (zeroed after its last reading); then this tile zeroed
    // for tile i + 2 (the next barrier orders that before its scatter).
    const u64 a_desc = sw128_desc(dense_lo + dense_i * (DENSE_STRIDE >> 4));
    const u64 b_desc = sw128_desc(x_lo + st * (W_X_BYTES >> 4));
    wgmma_fence();
#pragma unroll
    for (int kc = 0; kc < 4; ++kc) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        wgmma_k16<NROWS>(acc_w[h], a_desc + (h * 64 * 128 + kc * 32) / 16, b_desc + kc * 32 / 16);
      }
    }
    wgmma_commit();
    if (i + 1 < nk) scatter(next_run, st_next, dense(dense_i ^ 1));
    wgmma_wait_all();
    pin(acc_w[0]);
    pin(acc_w[1]);
    zero_tile(dense_i);
#else
    // Tensor cores on tile i: warp w owns rows WARP_ROWS w.. as HALVES 16-row halves; one
    // ldmatrix.x4 gives the B fragments (k 0-7 and 8-15) of both 8-row groups of a half.
    const u32 d_addr = sbase + dense_i * DENSE_STRIDE;
    const u32 xs = sbase + STAGE0_OFF + st * STAGE_BYTES + WORDS_BYTES;
    u32 a[NT][4];
#pragma unroll
    for (int kc = 0; kc < (RUN_MMA ? 4 : 0); ++kc) {
      if (acc_step<A_STEPS>(kc) == 0) load_a_frags<A_STEPS>(xs, kc, lane, a);
#pragma unroll
      for (int h = 0; h < HALVES; ++h) {
        u32 b00, b01, b10, b11;
        ldmatrix_x4(d_addr + (b_offsets[h] ^ (kc << 5)), b00, b01, b10, b11);
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          mma16816(acc[acc_step<A_STEPS>(kc)][2 * h][nt], a[nt], b00, b01);
          mma16816(acc[acc_step<A_STEPS>(kc)][2 * h + 1][nt], a[nt], b10, b11);
        }
      }
    }
    __syncwarp();
    if constexpr (RUN_SCATTER) {
      U4* rows = reinterpret_cast<U4*>(smem + dense_i * DENSE_STRIDE + warp * WARP_ROWS * TILE_K * 2);
#pragma unroll
      for (int c = lane; c < WARP_ROWS * TILE_K * 2 / 16; c += 32) rows[c] = U4{0u, 0u, 0u, 0u};
    }

    if (SCATTER_AHEAD && i + 1 < nk) scatter(next_run, st_next, dense((i + 1) & 1));
#endif

    st = st_next;
    st_next = st_next + 1 == STAGES ? 0 : st_next + 1;
    st_issue = st_issue + 1 == STAGES ? 0 : st_issue + 1;
  }
  cp_async_wait<0>();
  allow_dependent_grids();  // FLASHLLM_PDL: the next kernel's blocks may start during the epilogue

  if constexpr (CORES) {
    // Thread r folds row r's 32 lane sums (of every warp's array with WARP_SUMS), rotated by r so
    // that a warp's 32 reads hit 32 banks, and rounds or adds it like store_acc.
    __syncthreads();  // every add is in
    float total = 0.f;
#pragma unroll
    for (int a = 0; a < SUM_ARRAYS; ++a) {
      const float* row_sums = reinterpret_cast<const float*>(smem + SUMS_OFF + a * SUMS_BYTES) + tid * 32;
#pragma unroll
      for (int l = 0; l < 32; ++l) total += row_sums[(l + tid) & 31];
    }
    const int m = strip * TILE_M + tid;
    if (m < M && n0 < N) {
      const size_t i = static_cast<size_t>(n0) * M + m;
      if (ws == nullptr) {
        y[i] = from_float(bias != nullptr ? total + to_float(bias[m]) : total);
      } else {
        atomicAdd(ws + i, total);
      }
    }
  } else {
#if FLASHLLM_WGMMA
#pragma unroll
    for (int h = 0; h < 2; ++h) store_half(acc_w[h], strip * TILE_M + 64 * h, n0, lane, M, N, bias, y, ws);
#else
#pragma unroll
    for (int mt = 0; mt < 2 * HALVES; ++mt)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (A_STEPS == 2) fold_steps(acc[0][mt][nt], acc[1][mt][nt]);
        store_acc(acc[0][mt][nt], strip * TILE_M + warp * WARP_ROWS + mt * 8, n0 + nt * 16, lane, M, N,
                  bias, y, ws);
      }
#endif
  }
#if FLASHLLM_FIXUP  // (an `if constexpr` would do, but it changes the other variants' SASS)
  if (ws != nullptr) {
    splitk_fixup<TILE_M>(ws, counters, bias, y, M, N, KT, kt_per_split, reinterpret_cast<volatile int*>(smem));
  }
#endif
}
