// Bitmap weight -> dense row-major weight, for products too tall for the fused kernels (prefill,
// more than FLASHLLM_KERNEL_MAX_N rows): there the weight is expanded once and cuBLAS multiplies,
// and this kernel makes the expansion one pass that reads the compressed bytes and writes the
// dense ones, where the reference decode in torch takes several passes over 4-byte indices.
//
// One block per 64 x 64 group tile, one thread per two of its 512 mask bytes (layout version 1,
// formats/bitmap.py): a mask byte is one 8-element row of an 8 x 8 block, so each thread writes
// two 16-byte row pieces. A value's index is its tile's offset, plus the set bits of the tile's
// earlier bytes (a block-wide scan of popcounts), plus its rank within its byte. The values are
// copied as bits: one kernel serves fp16 and bf16.
//
// Byte b of a tile (storage order) holds: row b & 7 of the 8 x 8 block, block row (b >> 3) & 1,
// block column (b >> 4) & 1 of its 16 x 16 tensor-core tile, whose column is (b >> 5) & 3 and
// row b >> 7 within the 64 x 64 tile.

// 16 bytes moved by one instruction (NVRTC's built-in vector types are not relied on).
struct alignas(16) Chunk16 {
  unsigned int x, y, z, w;
};

extern "C" __global__ void __launch_bounds__(256) flashllm_bitmap_expand(
    const unsigned char* __restrict__ masks,   // tiles * 512, 2-byte aligned
    const unsigned short* __restrict__ values,  // the non-zeros, tile runs at `offsets`
    const int* __restrict__ offsets,            // tiles + 1
    unsigned short* __restrict__ dense,         // M x K, row-major
    int M, int K, int k_tiles) {
  const int tile = blockIdx.x;
  const int t = threadIdx.x;
  const unsigned int pair =
      *reinterpret_cast<const unsigned short*>(masks + static_cast<long long>(tile) * 512 + 2 * t);
  const int count = __popc(pair);

  // Exclusive scan of `count` over the block: within each warp by shuffles, then across warps.
  __shared__ int warp_totals[8];
  const int lane = t & 31;
  int inclusive = count;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, d);
    if (lane >= d) inclusive += v;
  }
  if (lane == 31) warp_totals[t >> 5] = inclusive;
  __syncthreads();
  int source = offsets[tile] + inclusive - count;
  for (int w = 0; w < (t >> 5); ++w) source += warp_totals[w];

  const int tile_row = tile / k_tiles;
  const int tile_col = tile - tile_row * k_tiles;
  // 16-byte stores need the row piece to start on 16 bytes: K a multiple of 8 and an aligned base.
  const bool vector_ok = (K & 7) == 0 && (reinterpret_cast<unsigned long long>(dense) & 15) == 0;
#pragma unroll
  for (int j = 0; j < 2; ++j) {
    const int b = 2 * t + j;
    const unsigned int byte = (pair >> (8 * j)) & 0xffu;
    const int row = tile_row * 64 + (b >> 7) * 16 + ((b >> 3) & 1) * 8 + (b & 7);
    const int col = tile_col * 64 + ((b >> 5) & 3) * 16 + ((b >> 4) & 1) * 8;
    unsigned short piece[8];
    int next = source;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      piece[c] = (byte >> c) & 1u ? values[next] : static_cast<unsigned short>(0);
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
