// Bitmap weight -> dense row-major weight, for products too tall for the fused kernels (prefill,
// more than FLASHLLM_KERNEL_MAX_N rows): there the weight is expanded once and cuBLAS multiplies,
// and this kernel makes the expansion one pass that reads the compressed bytes and writes the
// dense ones, where the reference decode in torch takes several passes over 4-byte indices.
//
// One block per TILES consecutive 64 x 64 group tiles (layout version 1, formats/bitmap.py), one
// thread per two of each tile's 512 mask bytes: a mask byte is one 8-element row of an 8 x 8 block,
// so each thread writes two 16-byte row pieces per tile. The tiles' value runs follow each other in
// `values`, so the block copies them into shared memory as one run of 16-byte chunks (cp.async)
// while its threads load their mask bytes and scan their popcounts; a value's index is its tile's
// offset, plus the set bits of the tile's earlier bytes (a block-wide scan of popcounts), plus its
// rank within its byte. Values are copied as bits: one kernel serves fp16 and bf16.
//
// Why TILES tiles: one tile per block (8 KB written) spent most of its life waiting on two
// dependent memory round trips (the masks and offsets, then the values), and the blocks resident
// on an SM could not keep enough bytes in flight: 51-58% of copy bandwidth on an H200, where the
// Tiled-CSL expansion (16 KB per block) reached 86-92%. Four tiles share the two round trips.
//
// Byte b of a tile (storage order) holds: row b & 7 of the 8 x 8 block, block row (b >> 3) & 1,
// block column (b >> 4) & 1 of its 16 x 16 tensor-core tile, whose column is (b >> 5) & 3 and
// row b >> 7 within the 64 x 64 tile.

// 16 bytes moved by one instruction (NVRTC's built-in vector types are not relied on).
struct alignas(16) Chunk16 {
  unsigned int x, y, z, w;
};

constexpr int TILES = 4;                     // group tiles per block (cuda_op: expand_tiles)
constexpr int TILE_CHUNKS = 64 * 64 / 8;     // a full tile's run in 16-byte chunks
constexpr int STAGE_CHUNKS = TILES * TILE_CHUNKS;

// 6 blocks per SM on an H100/H200, as many as the 32.9 KB stage allows there: 40 registers (ptxas
// took 42 without the bound, a block fewer). An A100's 164 KB of shared memory holds 4.
extern "C" __global__ void __launch_bounds__(256, 6) flashllm_bitmap_expand(
    const unsigned char* __restrict__ masks,   // tiles * 512, 16-byte aligned
    const unsigned short* __restrict__ values,  // the non-zeros, tile runs at `offsets`, 16-byte aligned
    const int* __restrict__ offsets,            // tiles + 1, multiples of 8
    unsigned short* __restrict__ dense,         // M x K, row-major
    int M, int K, int k_tiles) {
  __shared__ Chunk16 staged[STAGE_CHUNKS];
  __shared__ int warp_totals[TILES][8];
  const int t = threadIdx.x;
  const int lane = t & 31, warp = t >> 5;
  const int first = blockIdx.x * TILES;
  const int here = min(TILES, ((M + 63) >> 6) * k_tiles - first);  // the last block may hold fewer

  // Every load before the copies (whose asm orders memory accesses): the masks' and the offsets'
  // round trips overlap, and the copies wait only for the offsets.
  const unsigned short* mask_pairs =
      reinterpret_cast<const unsigned short*>(masks) + static_cast<long long>(first) * 256 + t;
  unsigned int pair[TILES];
#pragma unroll
  for (int i = 0; i < TILES; ++i) pair[i] = i < here ? mask_pairs[i * 256] : 0u;
  const int run_begin = offsets[first];
  const int chunks = (offsets[first + here] - run_begin) >> 3;
  // Validated weights never exceed a full tile's run per tile; anything else stops the kernel
  // instead of writing past the stage.
  if (chunks < 0 || chunks > here * TILE_CHUNKS) __trap();
  const Chunk16* run = reinterpret_cast<const Chunk16*>(values + run_begin);
  const unsigned int stage = static_cast<unsigned int>(__cvta_generic_to_shared(staged));
  for (int c = t; c < chunks; c += 256)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(stage + 16u * c), "l"(run + c)
                 : "memory");
  asm volatile("cp.async.commit_group;\n" ::: "memory");

  int inclusive[TILES];
#pragma unroll
  for (int i = 0; i < TILES; ++i) inclusive[i] = __popc(pair[i]);
  // Exclusive scan of each tile's counts over the block: within each warp by shuffles (the tiles'
  // scans interleaved), then across warps through shared memory.
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
#pragma unroll
    for (int i = 0; i < TILES; ++i) {
      const int v = __shfl_up_sync(0xffffffffu, inclusive[i], d);
      if (lane >= d) inclusive[i] += v;
    }
  }
  if (lane == 31) {
#pragma unroll
    for (int i = 0; i < TILES; ++i) warp_totals[i][warp] = inclusive[i];
  }
  // What the decode needs of each tile in one register (held apart, the counts spilled under the
  // launch bounds): the mask pair low, the warp's exclusive count (at most 31 * 16) high.
#pragma unroll
  for (int i = 0; i < TILES; ++i) pair[i] |= static_cast<unsigned int>(inclusive[i] - __popc(pair[i])) << 16;
  asm volatile("cp.async.wait_all;\n" ::: "memory");
  __syncthreads();

  const unsigned short* stage_values = reinterpret_cast<const unsigned short*>(staged);
  // 16-byte stores need the row piece to start on 16 bytes: K a multiple of 8 and an aligned base.
  const bool vector_ok = (K & 7) == 0 && (reinterpret_cast<unsigned long long>(dense) & 15) == 0;
#pragma unroll
  for (int i = 0; i < TILES; ++i) {
    if (i >= here) break;
    // (each tile's offset read again here, from cache, rather than held through the scan in registers)
    int source = offsets[first + i] - run_begin + static_cast<int>(pair[i] >> 16);
    for (int w = 0; w < warp; ++w) source += warp_totals[i][w];
    const int tile = first + i;
    const int tile_row = tile / k_tiles;
    const int tile_col = tile - tile_row * k_tiles;
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int b = 2 * t + j;
      const unsigned int byte = (pair[i] >> (8 * j)) & 0xffu;
      const int row = tile_row * 64 + (b >> 7) * 16 + ((b >> 3) & 1) * 8 + (b & 7);
      const int col = tile_col * 64 + ((b >> 5) & 3) * 16 + ((b >> 4) & 1) * 8;
      unsigned short piece[8];
      int next = source;
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        piece[c] = (byte >> c) & 1u ? stage_values[next] : static_cast<unsigned short>(0);
        next += (byte >> c) & 1u;
      }
      source = next;
      if (row >= M) continue;  // the padding holds no values (validated at load), so nothing is skipped
      unsigned short* out = dense + static_cast<long long>(row) * K + col;
      if (vector_ok && col + 8 <= K) {
        Chunk16 v;
        v.x = piece[0] | (static_cast<unsigned int>(piece[1]) << 16);
        v.y = piece[2] | (static_cast<unsigned int>(piece[3]) << 16);
        v.z = piece[4] | (static_cast<unsigned int>(piece[5]) << 16);
        v.w = piece[6] | (static_cast<unsigned int>(piece[7]) << 16);
        *reinterpret_cast<Chunk16*>(out) = v;
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c)
          if (col + c < K) out[c] = piece[c];
      }
    }
  }
}
