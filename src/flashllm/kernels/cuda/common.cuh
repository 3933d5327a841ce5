// Shared device code of the flashllm kernels.
//
// Self-contained on purpose: no CUDA header is included (fp16/bf16 values travel as raw 16-bit
// words and every conversion is one PTX instruction), so NVRTC compiles these files with no include
// path and a user needs neither the CUDA toolkit nor CuPy, only the NVRTC library that PyTorch's
// CUDA wheels already ship. nvcc compiles them unchanged (scripts/compile_check.sh).
//
// Compile-time parameters (NVRTC -D options, chosen by kernels/configs.py):
//   FLASHLLM_DTYPE  1 = float16, 2 = bfloat16 (weights, activations and output share it)
//   FLASHLLM_NROWS  activation rows per block: 8, 16, 32, 64 or 128 (N is padded up to it)
//   FLASHLLM_STAGES cp.async pipeline depth
//   FLASHLLM_WARPS  warps per block (optional, default 4)
//   FLASHLLM_PREFETCH tiles past the cp.async frontier whose compressed weight thread 0 asks L2 to
//                   fetch, one tile per stage (optional, default 0 = none)
//   FLASHLLM_FIXUP  1 = split-K ends in the last block of each output tile (`splitk_fixup`), 0 = in
//                   a separate finalize launch (optional, default 0)
//   FLASHLLM_PDL    1 = programmatic dependent launch (sm_90 and later; `wait_for_prior_grids`),
//                   optional, default 0
// plus kernel-specific ones documented in each .cu file.
//
// Conventions shared by both kernels. The product is y = x @ W.T with x (N x K) and W (M x K).
// The tensor-core instruction is mma.m16n8k16 with the *activations as the A operand* (16 rows of
// x) and the *weight as the B operand* (8 rows of W, i.e. B[k][n'] = W[m0 + n'][k]); then the
// accumulator element (row, col) is y[n][m] with consecutive m in consecutive registers, so the
// output is written as aligned pairs along M (coalesced) instead of scattered single elements.
// A B fragment of W holds, in lane l, row l/4 and columns 2(l%4), 2(l%4)+1 of an 8x8 block: the
// elements 2l and 2l+1 of the block in row-major order (what the bitmap layout is built around).
#pragma once

typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned long long u64;

#ifndef FLASHLLM_DTYPE
#error "FLASHLLM_DTYPE must be defined (1 = float16, 2 = bfloat16)"
#endif
#ifndef FLASHLLM_NROWS
#error "FLASHLLM_NROWS must be defined (8, 16, 32, 64 or 128)"
#endif
#ifndef FLASHLLM_STAGES
#error "FLASHLLM_STAGES must be defined"
#endif

namespace flashllm {

// Warps per block: 4 unless a kernel's FLASHLLM_WARPS says otherwise (Tiled-CSL may use 8).
#ifndef FLASHLLM_WARPS
#define FLASHLLM_WARPS 4
#endif
constexpr int WARPS = FLASHLLM_WARPS;
constexpr int THREADS = 32 * WARPS;
static_assert(WARPS == 4 || WARPS == 8, "WARPS");
constexpr u32 FULL = 0xffffffffu;

constexpr int NROWS = FLASHLLM_NROWS;
constexpr int STAGES = FLASHLLM_STAGES;
#ifndef FLASHLLM_PREFETCH
#define FLASHLLM_PREFETCH 0
#endif
constexpr int PREFETCH = FLASHLLM_PREFETCH;
#ifndef FLASHLLM_FIXUP
#define FLASHLLM_FIXUP 0
#endif
#ifndef FLASHLLM_PDL
#define FLASHLLM_PDL 0
#endif
static_assert(PREFETCH >= 0 && PREFETCH <= 16, "PREFETCH");
static_assert(NROWS == 8 || NROWS == 16 || NROWS == 32 || NROWS == 64 || NROWS == 128, "NROWS");
static_assert(STAGES >= 2 && STAGES <= 6, "STAGES");
// n16 tiles of activations per block; NROWS == 8 uses only the upper half of one A fragment.
constexpr int NT = NROWS >= 16 ? NROWS / 16 : 1;
constexpr bool HALF_A = NROWS == 8;

// Staged activations: NROWS rows of 64 k-values. A row is 144 bytes (64 + 8 halves), an odd
// multiple of 16 bytes, so the 8 row addresses of one ldmatrix phase fall in 8 different 16-byte
// bank groups (conflict-free) while every row stays 16-byte aligned for cp.async.
constexpr int XS_STRIDE = 72;  // halves
constexpr int X_STAGE_BYTES = NROWS * XS_STRIDE * 2;

// ---------------------------------------------------------------------------------------------
// PTX wrappers
// ---------------------------------------------------------------------------------------------
__device__ __forceinline__ u32 smem_u32(const void* p) {
  return static_cast<u32>(__cvta_generic_to_shared(p));
}

// 16-byte asynchronous copy global -> shared; src_bytes < 16 zero-fills the rest (0 = all zeros,
// nothing read). .cg: bypass L1, the streamed weight is read exactly once.
__device__ __forceinline__ void cp_async16(u32 dst, const void* src, u32 src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
               : "memory");
}
// The same, always 16 bytes: the compressed weight's runs. (An L2 evict-first cache hint here,
// createpolicy + cp.async.L2::cache_hint, made ptxas move the per-thread policy into uniform
// registers before every copy, and one variant hit an illegal instruction on an H200 in the
// dense-tile reload path: removed, it also saves those moves.)
__device__ __forceinline__ void cp_async16_full(u32 dst, const void* src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(src) : "memory");
}
// Ask L2 to fetch [p, p + bytes) from DRAM now: a hint with no result and no wait, so a pipeline
// can reach further ahead than its shared-memory stages allow (FLASHLLM_PREFETCH in the kernels).
// One thread issues it; p is 16-byte aligned (the runs' copies need that too) and bytes is rounded
// down to the 16 the bulk form requires. sm_90: one bulk prefetch (TMA); older GPUs: one per
// 128-byte line, the last byte's line included.
__device__ __forceinline__ void prefetch_l2(const void* p, u32 bytes) {
  bytes &= ~15u;
  if (bytes == 0u) return;
#if __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;\n" ::"l"(p), "r"(bytes) : "memory");
#else
  const unsigned char* c = static_cast<const unsigned char*>(p);
  for (u32 o = 0; o < bytes; o += 128u) {
    asm volatile("prefetch.global.L2 [%0];\n" ::"l"(c + o) : "memory");
  }
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(c + bytes - 1u) : "memory");
#endif
}
// Programmatic dependent launch (FLASHLLM_PDL; the launcher sets the programmatic stream
// serialization attribute, launch.Driver.launch). The grid may then start while the kernel before
// it in the stream is still finishing: its blocks launch, run what depends on nothing that kernel
// writes, and wait here until every prior grid has completed and its writes are visible. Anything
// read before the wait may be stale, so before it the kernels only ask L2 for the weight's first
// tiles (a hint: a stale line is replaced by the writer's, L2 being where global memory is
// coherent) and read nothing into registers or shared memory. Without the attribute, or below
// sm_90, the wait returns at once (and is compiled out below sm_90).
__device__ __forceinline__ void wait_for_prior_grids() {
#if FLASHLLM_PDL && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
#endif
}
// Lets the next kernel in the stream (if launched with the attribute) start its blocks once every
// block of this grid has called it or exited: they then overlap this grid's tail. It orders nothing:
// the next kernel still waits for this one's completion before it reads what this one writes.
__device__ __forceinline__ void allow_dependent_grids() {
#if FLASHLLM_PDL && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
#endif
}
// Before the wait, every thread of the block asks L2 for one 128-byte line of [p, end): line
// `tid`, if it starts before `end` (a predicated prefetch, not a branch: see prefetch_first_tiles).
// A hint: nothing waits for it.
__device__ __forceinline__ void prefetch_l2_line(const void* p, const void* end, int tid) {
  const unsigned char* line = static_cast<const unsigned char*>(p) + tid * 128;
  asm volatile(
      "{\n .reg .pred q;\n setp.lt.u64 q, %0, %1;\n @q prefetch.global.L2 [%0];\n}\n" ::"l"(line), "l"(end));
}
__device__ __forceinline__ int load_l2(const int* p) {  // .cg: leaves no line in L1 to go stale
  int v;
  asm volatile("ld.global.cg.s32 %0, [%1];\n" : "=r"(v) : "l"(p));
  return v;
}
// Before the wait: line `tid` of the run of a block's first `tiles` tiles (`bounds` = their
// offsets, `last` = the format's last offset, the payload's length), located by a look at the
// offsets that may be stale (if the kernel before rewrote the weight, which nothing does between
// products); clamped to the payload and to full tiles, so even then it stays inside the payload.
// Every thread reads the same three offsets: one request per warp. FIXED_BYTES > 0: line `tid` of
// the tiles' fixed-size part too (the bitmap's masks, `fixed`), its address made to depend on the
// loaded length (by a zero ptxas cannot fold). A prefetch address computed from the parameters
// alone, like any branch on the thread index here, made ptxas keep the copies' memory descriptor
// out of the uniform registers in the bitmap kernel's main loop: 10 `R2UR`, 11-17 instructions
// more per tile.
template <int ELEM_BYTES, int FIXED_BYTES>
__device__ __forceinline__ void prefetch_first_tiles(const int* bounds, int tiles, const int* last,
                                                     const void* payload, int tile_elems,
                                                     const unsigned char* fixed, int tid) {
  const int total = load_l2(last);
  const int lo = min(max(load_l2(bounds), 0), max(total, 0));
  const int hi = min(max(load_l2(bounds + tiles), lo), min(total, lo + tiles * tile_elems));
  const unsigned char* p = static_cast<const unsigned char*>(payload);
  prefetch_l2_line(p + static_cast<size_t>(lo) * ELEM_BYTES, p + static_cast<size_t>(hi) * ELEM_BYTES, tid);
  if constexpr (FIXED_BYTES > 0) {
    const unsigned char* f = fixed + min(max(total, 0), 0);
    prefetch_l2_line(f, f + static_cast<size_t>(tiles) * FIXED_BYTES, tid);
  }
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(u32 addr, u32& r0, u32& r1, u32& r2, u32& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr)
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x2(u32 addr, u32& r0, u32& r1) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(r0), "=r"(r1)
               : "r"(addr)
               : "memory");
}

// Shared-memory accesses by 32-bit shared-window address (what cp.async and ldmatrix take), so a
// loop that walks an address needs no generic-to-shared conversion per access. Volatile: they
// must stay ordered against the cp.async waits and warp barriers around them.
__device__ __forceinline__ u32 lds_u16(u32 addr) {
  unsigned short v;
  asm volatile("ld.shared.u16 %0, [%1];\n" : "=h"(v) : "r"(addr) : "memory");
  return v;
}
__device__ __forceinline__ void sts_u16(u32 addr, u32 v) {
  asm volatile("st.shared.u16 [%0], %1;\n" ::"r"(addr), "h"(static_cast<unsigned short>(v)) : "memory");
}
__device__ __forceinline__ void sts_zero16(u32 addr) {
  asm volatile("st.shared.v4.u32 [%0], {%1, %1, %1, %1};\n" ::"r"(addr), "r"(0u) : "memory");
}

// Sixteen bytes moved by one instruction (NVRTC's built-in vector types are not relied on).
struct alignas(16) U4 {
  u32 x, y, z, w;
};

// The Tiled-CSL scatter's store (tiled_csl_spmm.cu, tiled_csl16_spmm.cu): the value of word w (value
// | slot << 16) lands at byte (w >> 16) of the dense tile at shared address `base`, if `ok`. Clamped
// (to `limit`, the spare slot's address) so that corrupt data, which the formats' validation
// refuses, lands there instead of outside the tile. The slot is added before the clamp, so a word
// costs two instructions (LEA.HI, VIMNMX) and the store; no memory clobber (the kernels' barriers
// order the stores with the reads), though ptxas still keeps a later shared load below them.
// Predicated, not branched: a batch's last loads are past the words for some threads, and a branch
// around each quad's stores cost three instructions more per quad.
__device__ __forceinline__ void store_word_if(u32 base, u32 limit, u32 w, bool ok) {
  asm volatile(
      "{\n .reg .pred p;\n setp.ne.u32 p, %2, 0;\n @p st.shared.u16 [%0], %1;\n}\n" ::"r"(min(base + (w >> 16), limit)),
      "h"(static_cast<unsigned short>(w)), "r"(static_cast<u32>(ok)));
}
// The four words of one 16-byte load.
__device__ __forceinline__ void store_quad_if(u32 base, u32 limit, const U4& v, bool ok) {
  store_word_if(base, limit, v.x, ok);
  store_word_if(base, limit, v.y, ok);
  store_word_if(base, limit, v.z, ok);
  store_word_if(base, limit, v.w, ok);
}

// FLASHLLM_BULK (bitmap and tiled_csl16): a kernel's layout keeps the bulk copies' mbarriers on every
// architecture; FLASHLLM_USE_BULK says whether its code uses them (sm_90 and later), else the same
// build copies by cp.async.
#ifndef FLASHLLM_BULK
#define FLASHLLM_BULK 0
#endif
#if FLASHLLM_BULK && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define FLASHLLM_USE_BULK 1
#else
#define FLASHLLM_USE_BULK 0
#endif

#if FLASHLLM_USE_BULK
// Hopper's bulk copies and the mbarriers they complete on (one barrier per stage, one arrival per
// use: the issuing thread's, which also announces the bytes to expect).
__device__ __forceinline__ void mbar_init(u32 bar) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n" ::"r"(bar) : "memory");
}
// STAGES mbarriers from `bars` (8 bytes apart), each expecting one arrival, made visible to the bulk
// copies; by one thread, before a barrier that shows them to the others.
__device__ __forceinline__ void init_stage_barriers(u32 bars) {
#pragma unroll
  for (int st = 0; st < STAGES; ++st) mbar_init(bars + st * 8);
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}
__device__ __forceinline__ void mbar_arrive_expect(u32 bar, u32 bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
// Wait for the barrier's phase `parity` (0, 1, 0, ... for a stage's successive tiles) to complete.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra WAIT;\n"
      "}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}
// `bytes` (a nonzero multiple of 16, both addresses 16-byte aligned) global -> shared, counted
// against `bar`'s expected bytes.
__device__ __forceinline__ void bulk_copy(u32 dst, const void* src, u32 bytes, u32 bar) {
  asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(dst),
               "l"(src), "r"(bytes), "r"(bar)
               : "memory");
}
#endif

// PRMT in its default mode. CUDA's __byte_perm masks every selector nibble to 3 bits first (one
// extra LOP3 per call); the selectors here never set a nibble's mode bit.
__device__ __forceinline__ u32 prmt(u32 a, u32 b, u32 sel) {
  u32 r;
  asm("prmt.b32 %0, %1, %2, %3;\n" : "=r"(r) : "r"(a), "r"(b), "r"(sel));
  return r;
}

// d += A * B, fp32 accumulation; a: 4 registers of A (16 x 16), b: 2 registers of B (16 x 8).
__device__ __forceinline__ void mma16816(float* d, const u32* a, u32 b0, u32 b1) {
#if FLASHLLM_DTYPE == 1
  asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

__device__ __forceinline__ float to_float(u16 h) {
#if FLASHLLM_DTYPE == 1
  float f;
  asm("cvt.f32.f16 %0, %1;\n" : "=f"(f) : "h"(h));
  return f;
#else
  return __uint_as_float(static_cast<u32>(h) << 16);
#endif
}

__device__ __forceinline__ u16 from_float(float f) {
  u16 h;
#if FLASHLLM_DTYPE == 1
  asm("cvt.rn.f16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
#else
  asm("cvt.rn.bf16.f32 %0, %1;\n" : "=h"(h) : "f"(f));
#endif
  return h;
}

// (lo, hi) -> one 32-bit word holding two rounded 16-bit values, lo in the low half.
__device__ __forceinline__ u32 pack_float2(float lo, float hi) {
  u32 r;
#if FLASHLLM_DTYPE == 1
  asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#else
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
#endif
  return r;
}

__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
  atomicAdd(p, a);
  atomicAdd(p + 1, b);
#endif
}

// Stop the kernel if the launch provided less dynamic shared memory than it lays out: the launcher
// (kernels/configs.py) and the kernel disagree on the layout, and running on would corrupt memory.
__device__ __forceinline__ void trap_unless_smem(u32 bytes, int tid) {
  if (tid == 0) {
    u32 dyn;
    asm("mov.u32 %0, %%dynamic_smem_size;\n" : "=r"(dyn));
    if (dyn < bytes) __trap();
  }
}

// ---------------------------------------------------------------------------------------------
// Warp helpers
// ---------------------------------------------------------------------------------------------

// `v` itself, in a register ptxas will not rematerialize. ptxas recomputes values it can derive
// from threadIdx and the kernel parameters (addresses, swizzles) at every use inside a loop, even
// with registers to spare: a few instructions per use and tile. A shuffle from the thread's own
// lane is an identity it cannot see through, so the value is computed once. All 32 lanes must
// call it together.
__device__ __forceinline__ u32 kept(u32 v) { return __shfl_sync(FULL, v, threadIdx.x & 31u); }
// One step of a warp-wide inclusive scan: x plus x of the lane `D` below, where there is one. The
// shuffle's own in-range predicate decides (as CUB's warp scan does), so a step is the shuffle and
// one predicated add, with no compare of the lane index (ptxas recomputed those compares in every
// iteration of a loop: predicate registers are few).
template <int D>
__device__ __forceinline__ u32 scan_step(u32 x) {
  asm volatile(
      "{\n"
      ".reg .u32 below;\n"
      ".reg .pred in_range;\n"
      "shfl.sync.up.b32 below|in_range, %0, %1, 0, -1;\n"
      "@in_range add.u32 %0, %0, below;\n"
      "}\n"
      : "+r"(x)
      : "n"(D));
  return x;
}

// ---------------------------------------------------------------------------------------------
// Activations: staging and A fragments
// ---------------------------------------------------------------------------------------------
// Stage x[n0 : n0 + NROWS, k0 : k0 + 64] into a stage buffer (row stride XS_STRIDE halves), one
// 16-byte chunk (8 k-values) per cp.async. A thread copies the same chunks every stage: column
// chunk tid % 8 of rows tid / 8 + ROWS_PER_PASS * p, so their pointers, destinations and row
// bounds are computed once and a stage costs a pointer offset, a select and one cp.async per chunk
// (the generic loop this replaced redid 64-bit addressing and bounds for every chunk of every
// stage, a large share of a memory-bound kernel's instructions). Rows at or past N and columns at
// or past kx are zero-filled by the copy itself (src-size 0: nothing read, and the address is x),
// so padding rows and the K tail multiply as exact zeros. Needs ldx % 8 == 0, kx % 8 == 0 and a
// 16-byte aligned x. With fewer chunks than threads (NROWS * 8 < THREADS) the rest sit idle.
// SW128 lays the stage out for the tensor cores' 128-byte swizzle instead (the wgmma paths):
// rows of 128 bytes, 16-byte chunk c of row r at chunk c ^ (r % 8), no padding.
template <bool SW128 = false>
struct XStagerT {
  static constexpr int CHUNKS = NROWS * 8;
  static constexpr int ROW_BYTES = SW128 ? 128 : XS_STRIDE * 2;
  static constexpr int ROWS_PER_PASS = THREADS / 8;
  static_assert(!SW128 || ROWS_PER_PASS % 8 == 0, "SW128: every pass's rows share the first row's swizzle");
  static constexpr int PASSES = CHUNKS >= THREADS ? CHUNKS / THREADS : 1;
  static_assert(CHUNKS % THREADS == 0 || THREADS % CHUNKS == 0, "chunks and threads are powers of two");

  const u16* x;
  const u16* first;  // x[n0 + tid / 8][8 * (tid % 8)] (only dereferenced for rows < N)
  size_t pass_step;  // elements from one pass's row to the next: ROWS_PER_PASS * ldx
  u32 dst;           // byte offset of this thread's first chunk in a stage buffer
  u32 live;          // bit p: pass p's row is < N
  int col;           // 8 * (tid % 8)
  int kx;
  bool mine;         // this thread has chunks to copy

  __device__ __forceinline__ XStagerT(const u16* __restrict__ x_, int ldx, int n0, int N, int kx_, int tid)
      : x(x_), pass_step(static_cast<size_t>(ROWS_PER_PASS) * ldx), col((tid & 7) * 8), kx(kx_),
        mine(tid < CHUNKS) {
    const int r0 = tid >> 3;
    first = x_ + static_cast<size_t>(n0 + r0) * ldx + col;
    // (ROWS_PER_PASS is a multiple of 8: a pass's rows keep the first row's swizzle.)
    dst = SW128 ? static_cast<u32>(r0 * ROW_BYTES + (((tid & 7) ^ (r0 & 7)) << 4))
                : static_cast<u32>(r0 * XS_STRIDE + col) * 2u;
    live = 0u;
#pragma unroll
    for (int p = 0; p < PASSES; ++p) live |= (n0 + r0 + p * ROWS_PER_PASS < N ? 1u : 0u) << p;
  }

  __device__ __forceinline__ void stage(u32 xs, int k0) const {
    if (CHUNKS < THREADS && !mine) return;
    const bool col_ok = k0 + col < kx;
#pragma unroll
    for (int p = 0; p < PASSES; ++p) {
      const bool ok = col_ok && ((live >> p) & 1u);
      const u16* src = ok ? first + p * pass_step + k0 : x;
      cp_async16(xs + dst + static_cast<u32>(p * ROWS_PER_PASS * ROW_BYTES), src, ok ? 16u : 0u);
    }
  }
};
using XStager = XStagerT<false>;

// cp.async a contiguous run of `chunks` <= MAX_CHUNKS 16-byte chunks (the compressed weight of a
// tile), chunk c by thread c % THREADS. Unrolled to the largest run, each chunk addressed as a
// constant offset from the thread's first, leaving at the first chunk past the run: per chunk a
// compare, a branch and the copy, no 64-bit arithmetic (a counted loop paid ~13 instructions).
template <int MAX_CHUNKS>
__device__ __forceinline__ void copy_run(u32 dst, const void* src, int chunks, int tid) {
  const unsigned char* s = static_cast<const unsigned char*>(src) + tid * 16;
  const u32 d = dst + tid * 16;
#pragma unroll
  for (int i = 0; i < (MAX_CHUNKS + THREADS - 1) / THREADS; ++i) {
    if (tid + i * THREADS >= chunks) break;
    cp_async16_full(d + i * THREADS * 16, s + i * THREADS * 16);
  }
}

// A fragments (16 activation rows x 16 k) of k16 step kc for every n16 tile, from staged x.
// ldmatrix.x4: lanes 0-7 address rows 0-7/k 0-7 (a0), 8-15 rows 8-15/k 0-7 (a1), 16-23 rows
// 0-7/k 8-15 (a2), 24-31 rows 8-15/k 8-15 (a3).
//
// NROWS == 8 (HALF_A): rows 8-15 do not exist. With STEPS == 1 an x2 loads a0 and a2 and a1 = a3
// = 0, which costs ptxas 4 register moves per mma to assemble {a0, 0, a2, 0} (a tenth of the
// bitmap kernel's instructions at N <= 8). With STEPS == 2 one x4 every second step (kc even)
// loads the 8 rows for steps kc and kc + 1 as {k 0-7, k 16-23, k 8-15, k 24-31} of their 32
// columns, straight into the register quad both steps use: step kc's products with a0, a2 land in
// accumulator rows 0-7, step kc + 1's with a1, a3 in rows 8-15 of a second accumulator
// (`acc_step`); the cross terms in the other rows are never stored, and `fold_steps` adds the
// second accumulator's rows 8-15 to the first's rows 0-7 before the epilogue. Same shared-memory
// wavefronts (one x4 for two x2), half the ldmatrix instructions, no moves, 8 more registers per
// 16 output rows (the Tiled-CSL kernel pairs them too, except with 8 warps and one dense tile,
// where those registers would cost a resident block; see A_STEPS there).
template <int STEPS>
__device__ __forceinline__ void load_a_frags(u32 xs, int kc, int lane, u32 (&a)[NT][4]) {
  static_assert(STEPS == 1 || (STEPS == 2 && HALF_A), "paired k16 steps are for NROWS == 8");
  const int q = lane >> 3;
  if constexpr (STEPS == 2) {
    const int k = kc * 16 + (q & 1) * 16 + (q >> 1) * 8;  // kc even
    ldmatrix_x4(xs + static_cast<u32>((lane & 7) * XS_STRIDE + k) * 2u, a[0][0], a[0][1], a[0][2], a[0][3]);
  } else if constexpr (HALF_A) {
    const int k = kc * 16 + (q & 1) * 8;
    ldmatrix_x2(xs + static_cast<u32>((lane & 7) * XS_STRIDE + k) * 2u, a[0][0], a[0][2]);
    a[0][1] = 0u;
    a[0][3] = 0u;
  } else {
    const int r = (q & 1) * 8 + (lane & 7);
    const int k = kc * 16 + (q >> 1) * 8;
#pragma unroll
    for (int nt = 0; nt < NT; ++nt) {
      ldmatrix_x4(xs + static_cast<u32>((nt * 16 + r) * XS_STRIDE + k) * 2u, a[nt][0], a[nt][1],
                  a[nt][2], a[nt][3]);
    }
  }
}

// Which of the STEPS accumulators k16 step kc adds into.
template <int STEPS>
__device__ __forceinline__ constexpr int acc_step(int kc) { return kc % STEPS; }

// STEPS == 2: the odd steps' results (rows 8-15 of acc_odd) join the even steps' (rows 0-7 of acc).
__device__ __forceinline__ void fold_steps(float* acc, const float* acc_odd) {
  acc[0] += acc_odd[2];
  acc[1] += acc_odd[3];
}

// ---------------------------------------------------------------------------------------------
// Epilogue
// ---------------------------------------------------------------------------------------------
// y[n][m], y[n][m + 1] = v0, v1 (the second only if `pair`, i.e. m + 1 < M), with b0, b1 the bias
// of m, m + 1 (0 with split-K). Without split-K (ws == null) the result is rounded once into y; with
// split-K it is added into the fp32 workspace and flashllm_splitk_finalize rounds it.
__device__ __forceinline__ void store_pair(float v0, float v1, float b0, float b1, int m, int n, int M, bool pair,
                                           u16* __restrict__ y, float* __restrict__ ws) {
  const size_t i = static_cast<size_t>(n) * M + m;
  if (ws == nullptr) {
    if (pair && (M & 1) == 0) {
      *reinterpret_cast<u32*>(y + i) = pack_float2(v0 + b0, v1 + b1);
    } else {
      y[i] = from_float(v0 + b0);
      if (pair) y[i + 1] = from_float(v1 + b1);
    }
  } else {
    if (pair && (M & 1) == 0) {
      red_add_f32x2(ws + i, v0, v1);
    } else {
      atomicAdd(ws + i, v0);
      if (pair) atomicAdd(ws + i + 1, v1);
    }
  }
}

// One accumulator of an (n16, m8) tile: acc[0], acc[1] are y[n][m], y[n][m + 1]; acc[2], acc[3]
// the same for n + 8; m = m8 + 2 * (lane % 4), n = n16 + lane / 4.
__device__ __forceinline__ void store_acc(const float* acc, int m8, int n16, int lane, int M, int N,
                                          const u16* __restrict__ bias, u16* __restrict__ y,
                                          float* __restrict__ ws) {
  const int m = m8 + 2 * (lane & 3);
  if (m >= M) return;
  const bool pair = m + 1 < M;
  float b0 = 0.f, b1 = 0.f;
  if (ws == nullptr && bias != nullptr) {
    b0 = to_float(bias[m]);
    if (pair) b1 = to_float(bias[m + 1]);
  }
  // With NROWS == 8 the rows n16 + 8.. belong to the next block along N (their A rows were 0).
#pragma unroll
  for (int h = 0; h < (HALF_A ? 1 : 2); ++h) {
    const int n = n16 + (lane >> 2) + 8 * h;
    if (n >= N) continue;
    store_pair(acc[2 * h], acc[2 * h + 1], b0, b1, m, n, M, pair, y, ws);
  }
}

// ---------------------------------------------------------------------------------------------
// Split-K ending in the last block (FLASHLLM_FIXUP)
// ---------------------------------------------------------------------------------------------
// Every block of an output tile has added its partial sums into the fp32 workspace (store_acc);
// the last of them to arrive rounds the tile (bias included) into y and writes zeros back, so the
// workspace is zero again for the next launch without a memset (kernels/launch.py keeps one per
// stream, zeroed once). `counters` holds one arrival count per output tile (blockIdx.x, blockIdx.z),
// also left at zero. Every block along K runs (none returns early: launch.split_plan), the block
// owns rows [ROWS * blockIdx.x, + ROWS) x activation rows [NROWS * blockIdx.z, + NROWS), clipped
// to M x N, and `flag` is 4 bytes of shared memory the block no longer uses. The memory order is
// the classic one of a last-block reduction: the adds are fenced before the block counts itself
// in, and the last block fences again before it reads the workspace from L2 (.cg: no stale L1).
__device__ __forceinline__ float ld_cg_f32(const float* p) {
  float v;
  asm volatile("ld.global.cg.f32 %0, [%1];\n" : "=f"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void st_cg_f32(float* p, float v) {
  asm volatile("st.global.cg.f32 [%0], %1;\n" ::"l"(p), "f"(v) : "memory");
}

// One output tile (ROWS weight rows from m0 x NROWS activation rows from n0): the block adds
// `amount` to its arrival count `counters[counter]`; the block that brings it to `total` has every
// other block's sums in the workspace and rounds the tile.
template <int ROWS, typename Counter>
__device__ __forceinline__ void fixup_tile(float* __restrict__ ws, int* __restrict__ counters,
                                           const u16* __restrict__ bias, u16* __restrict__ y, int M, int N,
                                           int m0, int n0, Counter counter_of, int amount, int total,
                                           volatile int* flag) {
  const int tid = threadIdx.x;
  __threadfence();  // this thread's adds are visible GPU-wide ...
  __syncthreads();
  if (tid == 0) {
    __threadfence();  // ... and, through the barrier, ordered before the count (release)
    const int counter = counter_of();  // (computed here: before the fence it changed the SASS)
    const int arrived = atomicAdd(counters + counter, amount);
    const bool last = arrived == total - amount;
    if (last) counters[counter] = 0;  // every other block of the tile has counted itself in already
    *flag = last ? 1 : 0;
  }
  __syncthreads();
  if (*flag == 0) return;
  __threadfence();  // (acquire) the other blocks' adds, counted in before ours, are in L2
  const int rows = min(ROWS, M - m0);
  const int cols = min(NROWS, N - n0);
  for (int i = tid; i < rows * cols; i += THREADS) {
    const int m = m0 + i % rows;  // consecutive threads along M: coalesced
    const size_t at = static_cast<size_t>(n0 + i / rows) * M + m;
    float v = ld_cg_f32(ws + at);
    if (bias != nullptr) v += to_float(bias[m]);
    y[at] = from_float(v);
    st_cg_f32(ws + at, 0.f);
  }
}

// Split-K: each of the blocks along K counts one arrival on its output tile.
template <int ROWS>
__device__ __forceinline__ void splitk_fixup(float* __restrict__ ws, int* __restrict__ counters,
                                             const u16* __restrict__ bias, u16* __restrict__ y,
                                             int M, int N, int KT, int kt_per_split, volatile int* flag) {
  // The tile and the split count follow from the launch, the same way for both kernels.
  const int splits = (KT + kt_per_split - 1) / kt_per_split;  // blocks along K that run
  fixup_tile<ROWS>(ws, counters, bias, y, M, N, blockIdx.x * ROWS, blockIdx.z * NROWS,
                   [] { return static_cast<int>(blockIdx.z * gridDim.x + blockIdx.x); }, 1, splits, flag);
}

// ---------------------------------------------------------------------------------------------
// Hopper's warpgroup MMA (FLASHLLM_WGMMA; sm_90a only): the block's 4 warps are one warpgroup
// ---------------------------------------------------------------------------------------------
#ifndef FLASHLLM_WGMMA
#define FLASHLLM_WGMMA 0
#endif
#if FLASHLLM_WGMMA
#if defined(__CUDA_ARCH__) && !defined(__CUDA_ARCH_FEAT_SM90_ALL)
#error "FLASHLLM_WGMMA needs the sm_90a target (launch.compile_options picks it for an H100 or H200)"
#endif

// The block's dynamic shared memory from its first 1024-byte boundary, where a kernel's wgmma layout
// starts (the swizzle's period; the launch provides up to 1024 bytes of slack before it).
__device__ __forceinline__ unsigned char* swizzle_aligned(unsigned char* smem_raw) {
  return smem_raw + ((1024u - (smem_u32(smem_raw) & 1023u)) & 1023u);
}

// A K-major operand in the tensor cores' 128-byte swizzle: rows of 128 bytes (64 k values), 16-byte
// chunk c of row r stored at chunk c ^ (r % 8), 8-row groups 1024 bytes apart from a 1024-byte
// aligned base. The descriptor of the 16-k slice at `addr` (a group's base plus 32 bytes per k16
// step, which the hardware swizzles with the row as it addresses): start address, leading offset
// (unused in this swizzle, 1 by convention), stride offset 1024 bytes, swizzle mode 1 (128 bytes);
// addresses in 16-byte units, so a later slice is the descriptor plus its byte offset / 16. A tile's
// descriptor is assembled from its low word (`desc_lo`) and the fixed high word in one move.
constexpr u32 SW128_DESC_HI = (1024u >> 4) | (1u << 30);
__device__ __forceinline__ u32 desc_lo(u32 addr) { return ((addr & 0x3FFFFu) >> 4) | (1u << 16); }
__device__ __forceinline__ u64 sw128_desc(u32 lo) {
  u64 d;
  asm("mov.b64 %0, {%1, %2};\n" : "=l"(d) : "r"(lo), "r"(SW128_DESC_HI));
  return d;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait_all() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
// Shared memory written by ordinary stores (the scatter; cp.async's activations) and read next by
// the tensor cores (the async proxy): each writing thread fences before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// The compiler must not read, move or reuse the accumulators while the tensor cores write them
// (from a wgmma to its wait): an empty asm claiming to change each one pins them there.
template <int R>
__device__ __forceinline__ void pin(float (&d)[R]) {
#pragma unroll
  for (int i = 0; i < R; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

#if FLASHLLM_DTYPE == 1
#define FLASHLLM_WGMMA_TYPES ".f32.f16.f16"
#else
#define FLASHLLM_WGMMA_TYPES ".f32.bf16.bf16"
#endif
#define FLASHLLM_F4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define FLASHLLM_F16(i) FLASHLLM_F4(i), FLASHLLM_F4(i + 4), FLASHLLM_F4(i + 8), FLASHLLM_F4(i + 12)
// (scale-d is a predicate: set true, D += A B; both operands K-major, neither negated nor transposed.)
#define FLASHLLM_WGMMA_ASM(shape, regs, a, b) \
  "{\n.reg .pred acc;\nsetp.ne.b32 acc, 1, 0;\nwgmma.mma_async.sync.aligned." shape FLASHLLM_WGMMA_TYPES " " regs \
  ", " a ", " b ", acc, 1, 1, 0, 0;\n}\n"

// d (this thread's m64nNk16 accumulators, N = NROWS) += A (64 weight rows x 16 k, descriptor a) *
// B (16 k x N activation rows, descriptor b), issued asynchronously (wgmma_commit, wgmma_wait_all).
template <int N>
__device__ __forceinline__ void wgmma_k16(float (&d)[N / 2], u64 a, u64 b) {
  if constexpr (N == 8) {
    asm volatile(FLASHLLM_WGMMA_ASM("m64n8k16", "{%0, %1, %2, %3}", "%4", "%5")
                 : FLASHLLM_F4(0)
                 : "l"(a), "l"(b));
  } else if constexpr (N == 16) {
    asm volatile(FLASHLLM_WGMMA_ASM("m64n16k16", "{%0, %1, %2, %3, %4, %5, %6, %7}", "%8", "%9")
                 : FLASHLLM_F4(0), FLASHLLM_F4(4)
                 : "l"(a), "l"(b));
  } else if constexpr (N == 32) {
    asm volatile(FLASHLLM_WGMMA_ASM("m64n32k16",
                                    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}",
                                    "%16", "%17")
                 : FLASHLLM_F16(0)
                 : "l"(a), "l"(b));
  } else {
    static_assert(N == 64, "wgmma_k16: N is 8, 16, 32 or 64");
    asm volatile(FLASHLLM_WGMMA_ASM("m64n64k16",
                                    "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                                    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}",
                                    "%32", "%33")
                 : FLASHLLM_F16(0), FLASHLLM_F16(16)
                 : "l"(a), "l"(b));
  }
}

// The same with A from registers: a[0..3] of this warp's 16 rows x 16 k in mma.m16n8k16's A layout
// (rows g, g + 8 and k 2 t.., 8 + 2 t.. of lane 4 g + t), written before a wgmma_fence. ptxas keeps
// them (and the accumulators) until the wgmma_wait that follows.
#define FLASHLLM_WGMMA_RS_ASM(shape, regs, a, b) \
  "{\n.reg .pred acc;\nsetp.ne.b32 acc, 1, 0;\nwgmma.mma_async.sync.aligned." shape FLASHLLM_WGMMA_TYPES " " regs \
  ", " a ", " b ", acc, 1, 1, 0;\n}\n"
#define FLASHLLM_A4 "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3])
template <int N>
__device__ __forceinline__ void wgmma_k16_rs(float (&d)[N / 2], const u32 (&a)[4], u64 b) {
  if constexpr (N == 8) {
    asm volatile(FLASHLLM_WGMMA_RS_ASM("m64n8k16", "{%0, %1, %2, %3}", "{%4, %5, %6, %7}", "%8")
                 : FLASHLLM_F4(0)
                 : FLASHLLM_A4, "l"(b));
  } else if constexpr (N == 16) {
    asm volatile(FLASHLLM_WGMMA_RS_ASM("m64n16k16", "{%0, %1, %2, %3, %4, %5, %6, %7}", "{%8, %9, %10, %11}", "%12")
                 : FLASHLLM_F4(0), FLASHLLM_F4(4)
                 : FLASHLLM_A4, "l"(b));
  } else if constexpr (N == 32) {
    asm volatile(FLASHLLM_WGMMA_RS_ASM("m64n32k16",
                                       "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}",
                                       "{%16, %17, %18, %19}", "%20")
                 : FLASHLLM_F16(0)
                 : FLASHLLM_A4, "l"(b));
  } else if constexpr (N == 64) {
    asm volatile(FLASHLLM_WGMMA_RS_ASM("m64n64k16",
                                       "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}",
                                       "{%32, %33, %34, %35}", "%36")
                 : FLASHLLM_F16(0), FLASHLLM_F16(16)
                 : FLASHLLM_A4, "l"(b));
  } else {
    static_assert(N == 128, "wgmma_k16_rs: N is 8, 16, 32, 64 or 128");
    asm volatile(FLASHLLM_WGMMA_RS_ASM("m64n128k16",
                                       "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
                                       "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
                                       "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
                                       "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}",
                                       "{%64, %65, %66, %67}", "%68")
                 : FLASHLLM_F16(0), FLASHLLM_F16(16), FLASHLLM_F16(32), FLASHLLM_F16(48)
                 : FLASHLLM_A4, "l"(b));
  }
}

// One 64-row half's sums into y (or the split-K workspace). Thread (warp w, lane l) holds d[4 j + e]
// of weight row m = m0 + 16 w + l / 4 + 8 (e / 2) and activation row n = n0 + 8 j + 2 (l % 4) + e % 2.
// Lanes l and l ^ 4 hold rows m and m ^ 1 of the same activation rows: one shuffle hands each the
// value the other stores, so the lane of the even row stores (m, m + 1) of activation row n and the
// other those of n + 1, as aligned pairs along M like the mma.sync path's.
__device__ __forceinline__ void store_half(const float (&d)[NROWS / 2], int m0, int n0, int lane, int M, int N,
                                           const u16* __restrict__ bias, u16* __restrict__ y,
                                           float* __restrict__ ws) {
  const bool odd = (lane >> 2) & 1;
#pragma unroll
  for (int e2 = 0; e2 < 2; ++e2) {
    const int m = m0 + 16 * (threadIdx.x >> 5) + (lane >> 2) + 8 * e2 - (odd ? 1 : 0);  // the pair's even row
    const bool pair = m + 1 < M;
    float b0 = 0.f, b1 = 0.f;
    if (m < M && ws == nullptr && bias != nullptr) {
      b0 = to_float(bias[m]);
      if (pair) b1 = to_float(bias[m + 1]);
    }
#pragma unroll
    for (int j = 0; j < NROWS / 8; ++j) {
      const float at_n = d[4 * j + 2 * e2], at_n1 = d[4 * j + 2 * e2 + 1];
      const float other = __shfl_xor_sync(FULL, odd ? at_n : at_n1, 4);
      const int n = n0 + 8 * j + 2 * (lane & 3) + (odd ? 1 : 0);
      if (m < M && n < N) store_pair(odd ? other : at_n, odd ? at_n1 : other, b0, b1, m, n, M, pair, y, ws);
    }
  }
}
#endif  // FLASHLLM_WGMMA

}  // namespace flashllm
