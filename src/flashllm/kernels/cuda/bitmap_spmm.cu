// y = x @ W.T for W in the bitmap format (layout version 1, see formats/bitmap.py), SpInfer style.
//
// Design. A block of 4 warps owns STRIPS strips of 64 weight rows (one group-tile row each) and a
// range of group tiles along K (split-K: blockIdx.y). The compressed bytes stream through a
// STAGES-deep cp.async pipeline: per stage, each strip's 512 mask bytes and its tile's run of
// values (16-byte aligned, exact length from `offsets`), plus the activations' 64-column slice. No
// dense tile is ever built: each warp owns one 16-row mma row of every strip, and each lane builds
// its tensor-core B fragments straight from the bitmap, where lane l holds elements 2l and 2l+1 of
// every 8x8 block:
//   rank  = (start of the block's half-word in the tile's run) + popc(word & bits below 2l)
//   pair  = values[rank], values[rank + 1], selected by the lane's 2 mask bits with one PRMT
// The per-block starts come from a per-warp prefix sum over the 32 mask words of its row (one
// popcount and a 5-step shuffle scan per stage), stored in shared memory as {word, start} pairs, two
// blocks' pairs per 16-byte load. Per 8x8 block and lane that is 9 instructions (the PRMT selector
// is one 64-bit shift of a constant table) and 3 shared-memory wavefronts for 64 elements,
// independent of N; the activations' A fragments (ldmatrix) are shared by every strip and both
// 8-row halves of the warp's rows, and every decoded fragment feeds 2 * NT mma instructions.
//
// FLASHLLM_DECODE = 1 replaces that fragment assembly by a scatter whose cost follows the
// non-zeros instead of the elements (the fragment path costs the same at any sparsity, which made
// it instruction-bound on an H200; the scatter wins from ~85%): each lane walks the set bits of its
// half-block's mask word from the highest down, so a value's index is a pointer stepping back from
// the end of its run, and stores each value into a zeroed dense copy of the warp's 16 rows; one
// ldmatrix.x4 per 16x16 piece then reads the B fragments. Each lane's work is its word's popcount
// (the warp waits for the fullest word); the warp zeroes its rows again after the mma.
//
// Extra compile-time parameters (besides common.cuh's): FLASHLLM_STRIPS (1 or 2) strips of 64
// rows per block; FLASHLLM_DECODE 0 (fragment assembly) or 1 (scatter into a dense tile);
// FLASHLLM_VALCAP, the values a stage buffer holds per strip (default 4096, a full tile). A smaller
// buffer, fitted by the launcher to the weight's largest tile (configs.VALUE_CAPS), leaves room for
// more resident blocks (the kernel is latency-bound; at 50% sparsity 9 blocks per SM fit instead
// of 6); a tile with a longer run stops the kernel (trap) instead of being decoded from a
// truncated copy.
//
// FLASHLLM_PERSISTENT = 1 (stream-K; one strip per block) launches as many blocks as are
// resident at once (gridDim.x) and gives each an equal share of the tile sequence flattened strip
// by strip: block b runs tiles [b T / G, (b + 1) T / G) of T = MT * KT, which is exactly the
// layout's tile order, so the copies address them as one consecutive range. Its pipeline runs on
// across strip boundaries; at each boundary (and at the end of its range) the block adds the
// finished strip's sums into the split-K workspace and starts the next strip from zero. The launch
// always passes the workspace, and the finalize launch rounds it; with FLASHLLM_FIXUP as well, the
// block then counts the strip's tiles it added, and the one that brings the count to KT rounds
// the strip itself (one launch per product: no memset, no finalize). One pipeline fill per
// resident slot instead of one per (strip, split) block, and no partial last wave.
//
// FLASHLLM_OFFSET_RING = 1 keeps the tiles' run bounds (`offsets`) in a small shared-memory ring
// filled by cp.async 2 * (STAGES - 1) tiles ahead of their use, instead of loading the next
// tile's bounds into registers one iteration ahead: that load is a dependent L2 round trip per
// tile and block, which a loop whose iterations are shorter than it waits for every tile, however
// deep the pipeline. The ring's entries travel in the stage groups the loop already waits on.
//
// FLASHLLM_BULK = 1 moves each tile's masks and value run with Hopper's bulk copies (TMA): one
// thread issues one copy per strip and kind, completing on the stage's mbarrier, instead of every
// thread issuing 16-byte cp.async chunks (84-288 per tile for the weight at 90-50% sparsity). The
// stream's time per tile did not fall with a deeper pipeline on an H200 (BENCHMARKS.md, tenth
// session): if what it waits for is the number of copy requests an SM keeps in flight rather than
// their bytes, a few large requests instead of hundreds of small ones lift it. The activations
// keep cp.async. Below sm_90 the option compiles to the cp.async path (same layout, barriers unused).
//
// FLASHLLM_TPS = 2 (tiles per stage) makes each pipeline stage TPS consecutive tiles, each in its
// own slot of the usual layout: one wait, one barrier, TPS tiles issued and one commit per TPS
// tiles instead of per tile. If what the stream's per-tile period waits on is the iteration's own
// synchronization (the period did not fall with a deeper pipeline, BENCHMARKS.md, tenth session),
// that cost is then shared by TPS tiles. Not with the ring, bulk copies, stream-K or the prefetch.
//
// FLASHLLM_WGMMA = 1 (sm_90a: H100, H200; one strip, the fragment decode) hands each k16 step's
// decoded fragments to Hopper's warpgroup MMA as its A operand (registers) and reads the
// activations as B straight from shared memory (staged in the tensor cores' 128-byte swizzle), so
// there are no activation ldmatrix per warp and one wgmma.m64nNk16 per step in place of 2 NT
// mma.sync; the tensor cores run a step while the warp decodes the next. The activations were read
// by each warp for its own 16 rows (shared-memory bound from N = 32); the warpgroup reads them once.
//
// FLASHLLM_PROBE (diagnostics only, python -m flashllm.bench.probes; the output is then not the
// product) leaves out the later parts of the work, so that timing each level shows where the time
// goes: 1 streams the stages (copies, waits, barriers) and nothing else, 2 adds the per-warp scan
// (and the scatter decode's scatter), 3 adds the B-fragment assembly but not the activations'
// loads and the mma, 0 (default) is the kernel.
#include "common.cuh"

#ifndef FLASHLLM_STRIPS
#error "FLASHLLM_STRIPS must be defined (1 or 2)"
#endif
#ifndef FLASHLLM_DECODE
#error "FLASHLLM_DECODE must be defined (0 = fragment assembly, 1 = scatter)"
#endif

namespace flashllm {
namespace bitmap {

constexpr int STRIPS = FLASHLLM_STRIPS;
static_assert(STRIPS == 1 || STRIPS == 2, "STRIPS");
#ifndef FLASHLLM_PERSISTENT
#define FLASHLLM_PERSISTENT 0
#endif
static_assert(!FLASHLLM_PERSISTENT || STRIPS == 1, "stream-K blocks run one strip at a time");
static_assert(WARPS == 4, "each of the 4 warps owns one 16-row mma row of a 64-row strip");
constexpr int GROUP = 64;                    // group tile: 64 x 64
constexpr int MASK_BYTES = GROUP * GROUP / 8;  // 512
#ifndef FLASHLLM_VALCAP
#define FLASHLLM_VALCAP 4096
#endif
constexpr int VALCAP = FLASHLLM_VALCAP;
static_assert(VALCAP % 8 == 0 && VALCAP >= 512 && VALCAP <= GROUP * GROUP, "VALCAP");
constexpr bool FULL_TILES = VALCAP == GROUP * GROUP;
constexpr int MAX_VALUE_CHUNKS = VALCAP / 8;  // 16-byte chunks of the longest run a stage takes
// The longest run plus slack: a lane reads values[rank + 1] with rank <= nnz <= VALCAP.
constexpr int VAL_BYTES = (VALCAP + 8) * 2;
// FLASHLLM_WGMMA (sm_90a; one strip, the fragment decode): the tensor cores as Hopper's warpgroup
// MMA, A (the decoded fragments) from registers, B (the activations) from shared memory in the
// 128-byte swizzle. A stage then starts with its activations (NROWS rows of 128 bytes) and is a
// multiple of 1024 bytes, from the block's first 1024-byte boundary (the swizzle's period).
constexpr bool WGMMA = FLASHLLM_WGMMA != 0;  // (common.cuh: 0 unless defined)
constexpr int W_X_BYTES = NROWS * 128;
constexpr int MASKS_OFF = WGMMA ? W_X_BYTES : 0;
constexpr int VALS_OFF = MASKS_OFF + STRIPS * MASK_BYTES;
constexpr int X_OFF = WGMMA ? 0 : VALS_OFF + STRIPS * VAL_BYTES;
constexpr int STAGE_BYTES = WGMMA ? (VALS_OFF + STRIPS * VAL_BYTES + 1023) / 1024 * 1024 : X_OFF + X_STAGE_BYTES;
constexpr bool SCATTER = FLASHLLM_DECODE == 1;
#ifndef FLASHLLM_TPS
#define FLASHLLM_TPS 1
#endif
constexpr int TPS = FLASHLLM_TPS;  // tiles per pipeline stage, each in its own slot
constexpr int SLOTS = STAGES * TPS;  // tile-sized stage buffers
static_assert(TPS == 1 || TPS == 2, "TPS");
#ifndef FLASHLLM_PROBE
#define FLASHLLM_PROBE 0
#endif
static_assert(FLASHLLM_PROBE >= 0 && FLASHLLM_PROBE <= 3, "PROBE");
constexpr bool RUN_SCAN = FLASHLLM_PROBE == 0 || FLASHLLM_PROBE >= 2;
constexpr bool RUN_DECODE = FLASHLLM_PROBE == 0 || FLASHLLM_PROBE >= 3;
constexpr bool RUN_MMA = FLASHLLM_PROBE == 0 && !WGMMA;  // (the mma.sync path's A loads)
// k16 steps per A-fragment load (common.cuh, load_a_frags): two at NROWS == 8.
constexpr int A_STEPS = HALF_A ? 2 : 1;
static_assert(FLASHLLM_DECODE == 0 || FLASHLLM_DECODE == 1, "DECODE");
// After the stages: the fragment path's {word, start} table, or the scatter path's dense tiles
// (per strip 64 x 64 values; warp w's 16 rows at 2048 w, half-block j of its mask row at 64 j,
// i.e. each 8x8 block as 8 rows of 16 bytes, which ldmatrix reads without bank conflicts).
constexpr int DECODE_OFF = SLOTS * STAGE_BYTES;
constexpr int TILE_BYTES = GROUP * GROUP * 2;
constexpr int WARP_ROWS_BYTES = TILE_BYTES / WARPS;
#ifndef FLASHLLM_OFFSET_RING
#define FLASHLLM_OFFSET_RING 0
#endif
// The run-bound ring (FLASHLLM_OFFSET_RING) after the decode area: RING entries per strip, a power
// of two that holds the AHEAD + 1 entries in flight or in use.
constexpr int RING = 16;
constexpr int AHEAD = 2 * (STAGES - 1);
static_assert(AHEAD + 2 <= RING && (RING & (RING - 1)) == 0, "RING");
constexpr int RING_OFF = DECODE_OFF + (SCATTER ? STRIPS * TILE_BYTES : WARPS * STRIPS * 32 * 8);
// The bulk copies' per-stage mbarriers (FLASHLLM_BULK) after the ring, 8 bytes each; the layout
// keeps them on every architecture, the code uses them from sm_90.
constexpr int BARS_OFF = RING_OFF + (FLASHLLM_OFFSET_RING ? STRIPS * RING * 4 : 0);
// Stream-K blocks ending split-K themselves (FLASHLLM_PERSISTENT and FLASHLLM_FIXUP) need a flag
// of their own: they finish strips while their pipeline still fills the stages.
constexpr int FLAG_OFF = BARS_OFF + (FLASHLLM_BULK ? STAGES * 8 : 0);
constexpr int SMEM_BYTES = FLAG_OFF + (FLASHLLM_PERSISTENT && FLASHLLM_FIXUP ? 16 : 0) + (WGMMA ? 1024 : 0);
static_assert(BARS_OFF % 8 == 0, "mbarriers are 8-byte aligned");
static_assert(TPS == 1 || !(FLASHLLM_OFFSET_RING || FLASHLLM_BULK || FLASHLLM_PERSISTENT || FLASHLLM_PREFETCH),
              "tiles per stage: the plain pipeline only");
static_assert(!WGMMA || (STRIPS == 1 && !SCATTER && TPS == 1 && !FLASHLLM_PERSISTENT && !FLASHLLM_OFFSET_RING &&
                         !FLASHLLM_BULK && PREFETCH == 0 && FLASHLLM_PROBE == 0),
              "WGMMA: one strip, the fragment decode, the plain pipeline");
static_assert(VAL_BYTES % 16 == 0 && STAGE_BYTES % 16 == 0, "16-byte aligned stage buffers");
#ifdef FLASHLLM_SMEM_BYTES  // the launcher's size (kernels/configs.py) must match this layout
static_assert(SMEM_BYTES == FLASHLLM_SMEM_BYTES, "configs.LaunchConfig.smem_bytes disagrees with the kernel");
#endif

// The 4 PRMT selectors that place (values[rank], values[rank + 1]) by the lane's 2 mask bits,
// 16 bits each, indexed by the bits: none -> 0; low only -> (v0, 0); high only -> (0, v0);
// both -> (v0, v1). Byte 2 of a zero-extended 16-bit load is the zero byte.
constexpr u32 SEL_LO = 0x22102222u;  // bits 0, 1
constexpr u32 SEL_HI = 0x54101022u;  // bits 2, 3
constexpr u64 SEL_TABLE = static_cast<u64>(SEL_HI) << 32 | SEL_LO;  // selector for bits b at 16 b

#if FLASHLLM_OFFSET_RING
// 4-byte asynchronous copy global -> shared (one run bound of the ring; .ca: 4 bytes may not bypass L1).
__device__ __forceinline__ void cp_async4(u32 dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
#endif


// Every accumulator to zero: at the start, and in stream-K blocks at each strip boundary. A macro,
// not a function or lambda: a shared lambda changed 18 default variants' SASS.
#define FLASHLLM_ZERO_ACC(acc)                                                    \
  _Pragma("unroll") for (int p_ = 0; p_ < A_STEPS; ++p_)                           \
    _Pragma("unroll") for (int s_ = 0; s_ < STRIPS; ++s_)                          \
      _Pragma("unroll") for (int j_ = 0; j_ < 2; ++j_)                             \
        _Pragma("unroll") for (int nt_ = 0; nt_ < NT; ++nt_)                       \
          _Pragma("unroll") for (int e_ = 0; e_ < 4; ++e_) acc[p_][s_][j_][nt_][e_] = 0.f

struct alignas(8) Entry {
  u32 word;  // the mask half-word (rows 0-3 or 4-7 of the block) a lane of that half-warp decodes
  u32 addr;  // shared-window address of the value of its first set bit
};
// The table holds a warp's 32 entries half-major (entry 16 * half + block), so the entries of two
// consecutive blocks that a lane decodes are adjacent: one 16-byte load for both.
struct alignas(16) EntryPair {
  Entry first, second;
};
__device__ __forceinline__ int table_slot(int half, int block) { return 16 * half + block; }

// Scatter one half-block: `word` is its mask (bit p = element p, rows of 8), `src` the shared
// address one past its last value, `dst` the shared address of its element 0 in the zeroed dense
// tile. Two bits per trip, both loads before the stores so their latencies overlap; the second
// load may read the value before the run (harmless, in the stage buffer) when one bit is left.
__device__ __forceinline__ void scatter_half(u32 word, u32 src, u32 dst) {
  for (; word != 0u; src -= 4u) {
    const u32 p0 = 31u - __clz(word);  // one FLO: the highest bit left
    word ^= 1u << p0;
    const u32 p1 = 31u - __clz(word);  // 0xffffffff when p0 was the last
    const u32 v0 = lds_u16(src - 2u);
    const u32 v1 = lds_u16(src - 4u);
    sts_u16(dst + 2u * p0, v0);
    if (p1 < 32u) {
      word ^= 1u << p1;
      sts_u16(dst + 2u * p1, v1);
    }
  }
}

}  // namespace bitmap
}  // namespace flashllm

// The 128-row build with the split-K fixup spilled 3 registers under NVRTC at ptxas's default cap
// of 128; its shared memory (over 80 KB) allows only 2 resident blocks anyway, and telling ptxas so
// lifts the cap (the other variants keep the bounds they were validated with).
#if FLASHLLM_FIXUP && FLASHLLM_NROWS == 128
#define FLASHLLM_BITMAP_BOUNDS __launch_bounds__(flashllm::THREADS, 2)
#elif FLASHLLM_FIXUP && FLASHLLM_PERSISTENT && FLASHLLM_NROWS == 64
// Likewise stream-K blocks ending their own strips at 64 rows: 4 bytes spilled at the 96
// registers ptxas chose; under this cap (170) it takes 128, which still fits the 4 resident blocks
// their 55 KB of shared memory allow.
#define FLASHLLM_BITMAP_BOUNDS __launch_bounds__(flashllm::THREADS, 3)
#else
#define FLASHLLM_BITMAP_BOUNDS __launch_bounds__(flashllm::THREADS)
#endif

extern "C" __global__ void FLASHLLM_BITMAP_BOUNDS flashllm_bitmap_spmm(
    // pointers
    const u16* __restrict__ x,               // (N, ldx) activations, row-major
    const unsigned char* __restrict__ masks,  // tiles * 512 bytes
    const u16* __restrict__ values,           // packed non-zeros
    const int* __restrict__ offsets,          // tiles + 1 run starts, in values
    const u16* __restrict__ bias,             // (M,) or null
    u16* __restrict__ y,                      // (N, M) output when ws is null
    float* __restrict__ ws,                   // (N, M) zeroed fp32 split-K workspace, or null
    // sizes
    int M, int N, int ldx, int kx,  // kx: valid activation columns, a multiple of 8
    int KT, int MT,                 // group tiles along K and along M
    int kt_per_split,
    // last, so that the parameters above keep their offsets in the variants without it
    int* __restrict__ counters) {  // FIXUP: zeroed split-K arrival counts, one per output tile
  using namespace flashllm;
  using namespace flashllm::bitmap;
#if FLASHLLM_WGMMA
  extern __shared__ __align__(16) unsigned char smem_raw[];
  unsigned char* const smem = swizzle_aligned(smem_raw);
#else
  extern __shared__ __align__(16) unsigned char smem[];
#endif

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
#if FLASHLLM_PERSISTENT
  // This block's share of the strip-major tile sequence; tile f is (strip f / KT, k tile f % KT).
  const long long total_tiles = static_cast<long long>(MT) * KT;
  const int f0 = static_cast<int>(total_tiles * blockIdx.x / gridDim.x);
  const int f1 = static_cast<int>(total_tiles * (blockIdx.x + 1) / gridDim.x);
  const int strip0 = f0 / KT;
  const int kt0 = f0 - strip0 * KT;
  const int nk = f1 - f0;
#else
  const int strip0 = blockIdx.x * STRIPS;
  const int kt0 = blockIdx.y * kt_per_split;
  const int nk = min(KT - kt0, kt_per_split);
#endif
  const int n0 = blockIdx.z * NROWS;
  if (nk <= 0) {  // block-uniform, before any barrier
    wait_for_prior_grids();  // (a grid that completes has waited: the next one's wait covers this one's)
    return;
  }

  trap_unless_smem(SMEM_BYTES, tid);

  const u32 sbase = smem_u32(smem);
#if FLASHLLM_USE_BULK
  const u32 bars = sbase + BARS_OFF;  // stage st's mbarrier at bars + 8 st
  if (tid == 0) init_stage_barriers(bars);
  __syncthreads();  // and to every thread before it waits on one
#endif

  // This block's tiles of each strip start at tile (strip0 + s) * KT + kt0: their run bounds and
  // masks are addressed from there, so a stage adds only its own index. A strip past the last
  // (two strips per block, an odd strip count) decodes the last strip again and stores nothing:
  // the main loop then has no branch on it, and ptxas schedules its four k16 steps as one block,
  // interleaving one step's table and value loads with another's arithmetic and mma (a `valid`
  // test in each step had cut them into separate basic blocks: 10% more instructions, no overlap).
  bool valid[STRIPS];
  const int* tile_offsets[STRIPS];
  const unsigned char* tile_masks0[STRIPS];  // the block's first tile's masks (prefetch)
#if !FLASHLLM_USE_BULK
  const unsigned char* tile_masks[STRIPS];   // this thread's 16 bytes of them (copies)
#endif
#pragma unroll
  for (int s = 0; s < STRIPS; ++s) {
    valid[s] = STRIPS == 1 || strip0 + s < MT;  // one strip: the grid has exactly MT blocks
    const size_t t0 = static_cast<size_t>(valid[s] ? strip0 + s : MT - 1) * KT + kt0;
    tile_offsets[s] = offsets + t0;
    tile_masks0[s] = masks + t0 * MASK_BYTES;
#if !FLASHLLM_USE_BULK
    tile_masks[s] = tile_masks0[s] + (tid % (MASK_BYTES / 16)) * 16;
#endif
  }
#if FLASHLLM_PDL
  // Launched while the kernel before may still run: only the weight's first tiles asked of L2
  // (masks, runs) until the wait; everything this kernel reads comes after it.
  const int first_tiles = min(nk, (STAGES - 1) * TPS + 1);
#pragma unroll
  for (int s = 0; s < STRIPS; ++s) {
    prefetch_first_tiles<2, MASK_BYTES>(tile_offsets[s], first_tiles, offsets + static_cast<size_t>(MT) * KT,
                                        values, GROUP * GROUP, tile_masks0[s], tid);
  }
  wait_for_prior_grids();
#endif
  const XStagerT<WGMMA> xstage(x, ldx, n0, N, kx, tid);

  // Run bounds of the next tile(s) to issue, loaded one iteration (stage) before their use so the
  // load's latency hides behind a stage of work instead of stalling the copy loop.
#if !FLASHLLM_OFFSET_RING
  int nlo[TPS][STRIPS], nhi[TPS][STRIPS];
#endif
  auto load_offsets = [&](int j, int (&lo)[STRIPS], int (&hi)[STRIPS]) {
#if FLASHLLM_USE_BULK
    if (tid != 0) return;  // only the thread that issues the bulk copies uses them
#endif
#pragma unroll
    for (int s = 0; s < STRIPS; ++s) {
      lo[s] = tile_offsets[s][j];
      hi[s] = tile_offsets[s][j + 1];
    }
  };
  auto issue = [&](int j, int st, const int (&lo)[STRIPS], const int (&hi)[STRIPS]) {
    const u32 stage = sbase + st * STAGE_BYTES;
#if FLASHLLM_USE_BULK
    if (tid == 0) {
      int chunks[STRIPS];
      u32 bytes = 0u;
#pragma unroll
      for (int s = 0; s < STRIPS; ++s) {
        if (!FULL_TILES && hi[s] - lo[s] > VALCAP) __trap();  // as below
        chunks[s] = min(max((hi[s] - lo[s]) >> 3, 0), MAX_VALUE_CHUNKS);
        bytes += MASK_BYTES + 16u * chunks[s];
      }
      const u32 bar = bars + st * 8;
      // The stage's last reads (ld.shared and ldmatrix, the generic proxy), which the barrier at
      // the top of this iteration closed, are ordered before the bulk copies (the async proxy).
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      mbar_arrive_expect(bar, bytes);
#pragma unroll
      for (int s = 0; s < STRIPS; ++s) {
        bulk_copy(stage + MASKS_OFF + s * MASK_BYTES, tile_masks0[s] + static_cast<size_t>(j) * MASK_BYTES,
                  MASK_BYTES, bar);
        if (chunks[s] > 0) bulk_copy(stage + VALS_OFF + s * VAL_BYTES, values + lo[s], 16u * chunks[s], bar);
      }
    }
#else
#pragma unroll
    for (int s = 0; s < STRIPS; ++s) {
      if (tid < MASK_BYTES / 16) {
        cp_async16_full(stage + MASKS_OFF + s * MASK_BYTES + tid * 16,
                        tile_masks[s] + static_cast<size_t>(j) * MASK_BYTES);
      }
      // Clamped so that corrupt offsets cannot write past the stage buffer. A fitted buffer is
      // sized to the weight's largest run (read from these offsets): a longer one means they
      // changed since, and decoding a truncated run would be silently wrong.
      if (!FULL_TILES && hi[s] - lo[s] > VALCAP) __trap();
      const int chunks = min(max((hi[s] - lo[s]) >> 3, 0), MAX_VALUE_CHUNKS);
      copy_run<MAX_VALUE_CHUNKS>(stage + VALS_OFF + s * VAL_BYTES, values + lo[s], chunks, tid);
    }
#endif
#if FLASHLLM_PERSISTENT
    xstage.stage(stage + X_OFF, ((kt0 + j) % KT) * GROUP);  // the range wraps from strip to strip
#else
    xstage.stage(stage + X_OFF, (kt0 + j) * GROUP);
#endif
  };
  // FLASHLLM_PREFETCH: thread 0 asks L2 for tile t's masks and value run (bounds clamped like the
  // copies'), PREFETCH tiles past the copies, so the copies find them in L2: more bytes in flight
  // than the shared-memory stages hold. Its run bounds are loaded a stage ahead (pf_lo, pf_hi).
  int pf_lo[STRIPS] = {}, pf_hi[STRIPS] = {};
  auto prefetch = [&](int t, const int (&lo)[STRIPS], const int (&hi)[STRIPS]) {
#pragma unroll
    for (int s = 0; s < STRIPS; ++s) {
      prefetch_l2(tile_masks0[s] + static_cast<size_t>(t) * MASK_BYTES, MASK_BYTES);
      prefetch_l2(values + lo[s], static_cast<u32>(min(max(hi[s] - lo[s], 0), GROUP * GROUP)) * 2u);
    }
  };

#if FLASHLLM_OFFSET_RING
  // Entries 0..AHEAD of the ring, one thread each (one round trip for all), before any copy needs
  // them; the loop's cp.async brings entry i + AHEAD + 1 in iteration i, in the group that the
  // iteration issuing the tile that needs it has already waited for.
  const u32 ring = sbase + RING_OFF;
  const int* ring_smem = reinterpret_cast<const int*>(smem + RING_OFF);
  auto ring_bounds = [&](int j, int (&lo)[STRIPS], int (&hi)[STRIPS]) {
#pragma unroll
    for (int s = 0; s < STRIPS; ++s) {
      lo[s] = ring_smem[s * RING + (j & (RING - 1))];
      hi[s] = ring_smem[s * RING + ((j + 1) & (RING - 1))];
    }
  };
  if (tid <= AHEAD && tid <= nk) {
#pragma unroll
    for (int s = 0; s < STRIPS; ++s) reinterpret_cast<int*>(smem + RING_OFF)[s * RING + tid] = tile_offsets[s][tid];
  }
  __syncthreads();
#pragma unroll
  for (int p = 0; p < STAGES - 1; ++p) {
    if (p < nk) {
      int lo[STRIPS], hi[STRIPS];
      ring_bounds(p, lo, hi);
      issue(p, p, lo, hi);
    }
    cp_async_commit();
  }
#else
  // Prologue: STAGES - 1 stages of TPS tiles in flight (tile t in slot t), their run bounds and the
  // next stage's loaded together first. One commit per stage, empty or not, keeps the wait_group
  // arithmetic uniform.
  {
    int plo[SLOTS][STRIPS] = {}, phi[SLOTS][STRIPS] = {};
#pragma unroll
    for (int t = 0; t < SLOTS; ++t) {
      if (t < nk) load_offsets(t, plo[t], phi[t]);
    }
#pragma unroll
    for (int p = 0; p < STAGES - 1; ++p) {
#pragma unroll
      for (int u = 0; u < TPS; ++u) {
        if (p * TPS + u < nk) issue(p * TPS + u, p * TPS + u, plo[p * TPS + u], phi[p * TPS + u]);
      }
      cp_async_commit();
    }
#pragma unroll
    for (int u = 0; u < TPS; ++u)
#pragma unroll
      for (int s = 0; s < STRIPS; ++s) {
        nlo[u][s] = plo[(STAGES - 1) * TPS + u][s];
        nhi[u][s] = phi[(STAGES - 1) * TPS + u][s];
      }
  }
#endif
  // The tiles between the prologue's copies and the loop's first prefetch.
  if (PREFETCH > 0 && tid == 0) {
    for (int t = STAGES - 1; t < min(STAGES - 1 + PREFETCH, nk); ++t) {
      int lo[STRIPS], hi[STRIPS];
      load_offsets(t, lo, hi);
      prefetch(t, lo, hi);
    }
    if (STAGES - 1 + PREFETCH < nk) load_offsets(STAGES - 1 + PREFETCH, pf_lo, pf_hi);
  }

  // Lane constants: which mask half-word it decodes, where its 2 bits sit, the bits below them.
  const int half = lane >> 4;
  const u32 sh = (2u * lane) & 31u;
  const u32 below_mask = (1u << sh) - 1u;
  const u32 sh_sel = (sh - 4u) & 31u;  // rotating right by this puts the lane's bits at 4-5

#if FLASHLLM_WGMMA
  float acc_w[NROWS / 2];  // the warpgroup's m64nN accumulators (common.cuh, store_half)
#pragma unroll
  for (int e = 0; e < NROWS / 2; ++e) acc_w[e] = 0.f;
#else
  float acc[A_STEPS][STRIPS][2][NT][4];
  FLASHLLM_ZERO_ACC(acc);
#endif

  Entry* table = reinterpret_cast<Entry*>(smem + DECODE_OFF) + warp * STRIPS * 32;
  // Scatter path: this warp's rows of strip 0's dense tile (strip s at + s * TILE_BYTES), zeroed
  // once here and again after each stage's mma, 16 bytes per lane and store.
  const u32 rows = sbase + DECODE_OFF + warp * WARP_ROWS_BYTES;
  auto zero_rows = [&]() {
#pragma unroll
    for (int s = 0; s < STRIPS; ++s)
#pragma unroll
      for (int c = 0; c < WARP_ROWS_BYTES / 16 / 32; ++c) {
        sts_zero16(rows + s * TILE_BYTES + (c * 32 + lane) * 16);
      }
  };
  if constexpr (SCATTER && RUN_SCAN) zero_rows();
  // FLASHLLM_PROBE == 3: `sink` keeps the assembled fragments alive without the mma. Under #if, not
  // `if constexpr`: even discarded, those statements changed the default kernel's SASS.
#if FLASHLLM_PROBE
  u32 sink = 0u;
#endif
  int st = 0;                 // stage holding tile i
#if FLASHLLM_TPS == 1
  int st_issue = STAGES - 1;  // stage receiving tile i + STAGES - 1 (the one tile i - 1 freed)
#endif
#if FLASHLLM_PERSISTENT
  int cur_strip = strip0, cur_kt = kt0;  // tile i's strip and k tile
#if FLASHLLM_FIXUP
  int strip_tiles = 0;  // tiles of the current strip this block has added
#endif
#endif

#if FLASHLLM_USE_BULK
  u32 phase = 0u;  // parity of stage st's current use: its tiles st, st + STAGES, ... alternate
#endif
  for (int i = 0; i < nk; ++i) {
#if FLASHLLM_TPS > 1
    if (i % TPS == 0) {  // a stage: one wait, one barrier, TPS tiles issued, one commit
      cp_async_wait<STAGES - 2>();
      // Tiles i .. i + TPS - 1 have landed for every thread, and every warp is done with the
      // previous stage's tiles, whose slots the next issue refills.
      __syncthreads();
      const int j0 = i + (STAGES - 1) * TPS;
#pragma unroll
      for (int u = 0; u < TPS; ++u) {
        const int slot = st + (STAGES - 1) * TPS + u;
        if (j0 + u < nk) issue(j0 + u, slot >= SLOTS ? slot - SLOTS : slot, nlo[u], nhi[u]);
      }
#pragma unroll
      for (int u = 0; u < TPS; ++u) {
        if (j0 + TPS + u < nk) load_offsets(j0 + TPS + u, nlo[u], nhi[u]);
      }
      cp_async_commit();
    }
#else
    cp_async_wait<STAGES - 2>();
#if FLASHLLM_USE_BULK
    mbar_wait(bars + st * 8, phase);  // tile i's bulk copies (cp.async: its activations, above)
#endif
#if FLASHLLM_WGMMA
    fence_proxy_async();  // this thread's copies of tile i's activations, for the tensor cores' reads
#endif
    // Tile i has landed for every thread, and every warp is done with tile i - 1's stage.
    __syncthreads();
    const int j = i + STAGES - 1;
#if FLASHLLM_OFFSET_RING
    if (j < nk) {
      int lo[STRIPS], hi[STRIPS];
      ring_bounds(j, lo, hi);
      issue(j, st_issue, lo, hi);
    }
    if (tid < STRIPS && i + AHEAD + 1 <= nk) {  // thread s: strip s's entry i + AHEAD + 1
      const int e = i + AHEAD + 1;
      cp_async4(ring + (tid * RING + (e & (RING - 1))) * 4, (tid == 0 ? tile_offsets[0] : tile_offsets[STRIPS - 1]) + e);
    }
#else
    if (j < nk) {
      issue(j, st_issue, nlo[0], nhi[0]);
      if (j + 1 < nk) load_offsets(j + 1, nlo[0], nhi[0]);
    }
#endif
    if (PREFETCH > 0 && tid == 0 && j + PREFETCH < nk) {
      prefetch(j + PREFETCH, pf_lo, pf_hi);
      if (j + PREFETCH + 1 < nk) load_offsets(j + PREFETCH + 1, pf_lo, pf_hi);
    }
    cp_async_commit();
#endif  // FLASHLLM_TPS

    const unsigned char* stage = smem + st * STAGE_BYTES;
    // Per-warp prefix sum: lane l takes word l of the warp's row (block l/2, half l%2); its
    // exclusive scan plus the popcount of the rows above is where that half-block's values start.
#pragma unroll
    for (int s = 0; s < (RUN_SCAN ? STRIPS : 0); ++s) {
      const u32* words = reinterpret_cast<const u32*>(stage + MASKS_OFF + s * MASK_BYTES);
      const u32 word = words[warp * 32 + lane];
      const u32 count = __popc(word);
      u32 above = 0;
#pragma unroll
      for (int r = 0; r < WARPS - 1; ++r) {
        if (r < warp) above += __popc(words[r * 32 + lane]);
      }
      const u32 row_base = __reduce_add_sync(FULL, above);
      // One strip: each step is a shuffle and an add predicated on the shuffle's own in-range bit
      // (scan_step). Two strips keep the lane compares: with the predicated steps ptxas took two
      // of those builds down to 64-80 registers and spilled, and launch bounds that stopped it
      // cost them resident blocks.
      u32 inclusive = count;
      if constexpr (STRIPS == 1) {
        inclusive = scan_step<16>(scan_step<8>(scan_step<4>(scan_step<2>(scan_step<1>(count)))));
      } else {
#pragma unroll
        for (int d = 1; d < 32; d <<= 1) {
          const u32 v = __shfl_up_sync(FULL, inclusive, d);
          if (lane >= d) inclusive += v;
        }
      }
      const u32 run = st * STAGE_BYTES + VALS_OFF + s * VAL_BYTES;
      const u32 start = run + 2u * (row_base + inclusive - count);
      if constexpr (SCATTER) {
        scatter_half(word, sbase + start + 2u * count, rows + s * TILE_BYTES + lane * 64);
      } else {
        table[s * 32 + table_slot(lane & 1, lane >> 1)] = Entry{word, sbase + start};
      }
    }
    __syncwarp();

    const u32 xs = sbase + st * STAGE_BYTES + X_OFF;
    u32 a[NT][4];
#if FLASHLLM_WGMMA
    // Each k16 step's fragments go to the tensor cores as A of one wgmma.m64nNk16 (B: the staged
    // activations), which runs while the warp decodes the next step; its own registers per step,
    // held until the tile's wait.
    const u64 x_desc = sw128_desc(desc_lo(xs));
    u32 a_w[4][4];
#endif
#pragma unroll
    for (int kc = 0; kc < (RUN_DECODE ? 4 : 0); ++kc) {
      if (RUN_MMA && acc_step<A_STEPS>(kc) == 0) load_a_frags<A_STEPS>(xs, kc, lane, a);
#pragma unroll
      for (int s = 0; s < STRIPS; ++s) {
        // B fragments of the two 8-row halves j of this 16 x 16 piece: b0 from block (cols 0-7,
        // rows 8j..), b1 from block (cols 8-15, rows 8j..); local block index kc*4 + bc*2 + j.
        u32 b[2][2];
        if constexpr (SCATTER) {
          // Matrix q of the x4 is block kc*4 + q = (bc = q / 2, jj = q % 2); lane l addresses row
          // l % 8 of matrix l / 8, i.e. byte 16 l of the piece's 512.
          ldmatrix_x4(rows + s * TILE_BYTES + kc * 512 + lane * 16, b[0][0], b[1][0], b[0][1], b[1][1]);
        } else {
          const EntryPair* pairs = reinterpret_cast<const EntryPair*>(table + s * 32 + table_slot(half, kc * 4));
          const EntryPair pair[2] = {pairs[0], pairs[1]};  // blocks kc*4 + {0, 1} and {2, 3}
#pragma unroll
          for (int jj = 0; jj < 2; ++jj) {
#pragma unroll
            for (int bc = 0; bc < 2; ++bc) {
              const Entry e = jj == 0 ? pair[bc].first : pair[bc].second;
              const u32 v = e.addr + 2u * __popc(e.word & below_mask);
              const u32 v0 = lds_u16(v);
              const u32 v1 = lds_u16(v + 2u);
              // The lane's 2 mask bits rotated to bits 4-5 are 16 x bits: the shift that takes
              // their 16-bit selector out of the 64-bit table {SEL_HI, SEL_LO} (one SHF.U64).
              const u32 amount = __funnelshift_r(e.word, e.word, sh_sel) & 0x30u;
              const u32 sel = static_cast<u32>(SEL_TABLE >> amount);
              b[jj][bc] = prmt(v0, v1, sel);
            }
          }
        }
#if FLASHLLM_PROBE
        sink ^= b[0][0] ^ b[0][1] ^ b[1][0] ^ b[1][1];
#elif FLASHLLM_WGMMA
        // The A layout's registers: rows 0-7 / 8-15 of the warp's 16 x k 0-7, then x k 8-15, i.e.
        // blocks (jj, bc) = (0, 0), (1, 0), (0, 1), (1, 1), each lane's 2 elements as decoded.
        a_w[kc][0] = b[0][0];
        a_w[kc][1] = b[1][0];
        a_w[kc][2] = b[0][1];
        a_w[kc][3] = b[1][1];
        wgmma_fence();  // the registers just written, before the wgmma that reads them
        wgmma_k16_rs<NROWS>(acc_w, a_w[kc], x_desc + kc * 2);  // + 32 bytes per k16 step
#else
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            mma16816(acc[acc_step<A_STEPS>(kc)][s][jj][nt], a[nt], b[jj][0], b[jj][1]);
          }
#endif
      }
    }
#if FLASHLLM_WGMMA
    wgmma_commit();
    wgmma_wait_all();  // before the next tile's copies reuse a stage and before its barrier
    pin(acc_w);
#endif
    if constexpr (SCATTER && RUN_SCAN) {
      __syncwarp();  // every lane's ldmatrix has read the rows before any lane clears them
      zero_rows();
    }
#if FLASHLLM_TPS > 1
    // The next tile of the stage follows without a barrier: the warp's lanes must be done with
    // this tile's table (or dense rows) before any rewrites it.
    __syncwarp();
    st = st + 1 == SLOTS ? 0 : st + 1;
#else
    st = st + 1 == STAGES ? 0 : st + 1;
    st_issue = st_issue + 1 == STAGES ? 0 : st_issue + 1;
#endif
#if FLASHLLM_USE_BULK
    phase ^= st == 0 ? 1u : 0u;
#endif
#if FLASHLLM_PERSISTENT
    // The strip's last K tile, or this block's last tile: its sums go into the workspace (another
    // block may hold the strip's other tiles), and the next strip starts from zero.
#if FLASHLLM_FIXUP
    ++strip_tiles;
#endif
    if (++cur_kt == KT || i == nk - 1) {
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          if constexpr (HALF_A) fold_steps(acc[0][0][jj][nt], acc[1][0][jj][nt]);
          store_acc(acc[0][0][jj][nt], cur_strip * GROUP + warp * 16 + jj * 8, n0 + nt * 16, lane, M, N, bias, y,
                    ws);
        }
#if FLASHLLM_FIXUP
      // The strip's tiles are counted per (strip, activation block); the block that completes
      // the count has every other block's sums in the workspace and rounds the strip.
      fixup_tile<GROUP>(ws, counters, bias, y, M, N, cur_strip * GROUP, n0,
                        [&] { return static_cast<int>(blockIdx.z) * MT + cur_strip; }, strip_tiles, KT,
                        reinterpret_cast<volatile int*>(smem + FLAG_OFF));
      strip_tiles = 0;
#endif
      FLASHLLM_ZERO_ACC(acc);
      cur_kt = 0;
      ++cur_strip;
    }
#endif
  }
  cp_async_wait<0>();  // nothing may be left writing shared memory when the block exits
  allow_dependent_grids();  // FLASHLLM_PDL: the next kernel's blocks may start during the epilogue
#if FLASHLLM_PROBE
  if (sink == 0x9e3779b9u) acc[0][0][0][0][0] += 1.f;  // a use of `sink` the compiler cannot drop
#endif

#if FLASHLLM_WGMMA
  store_half(acc_w, strip0 * GROUP, n0, lane, M, N, bias, y, ws);
#elif !FLASHLLM_PERSISTENT  // (stored strip by strip in the loop)
#pragma unroll
  for (int s = 0; s < STRIPS; ++s) {
    if (!valid[s]) continue;
#pragma unroll
    for (int jj = 0; jj < 2; ++jj)
#pragma unroll
      for (int nt = 0; nt < NT; ++nt) {
        if constexpr (HALF_A) fold_steps(acc[0][s][jj][nt], acc[1][s][jj][nt]);
        store_acc(acc[0][s][jj][nt], (strip0 + s) * GROUP + warp * 16 + jj * 8, n0 + nt * 16, lane, M,
                  N, bias, y, ws);
      }
  }
#endif
// (Preprocessor, not `if constexpr`, which changed the other variants' SASS; stream-K blocks ended
// their strips in the loop.)
#if FLASHLLM_FIXUP && !FLASHLLM_PERSISTENT
  if (ws != nullptr) {
    splitk_fixup<STRIPS * GROUP>(ws, counters, bias, y, M, N, KT, kt_per_split,
                                 reinterpret_cast<volatile int*>(smem));
  }
#endif
}
