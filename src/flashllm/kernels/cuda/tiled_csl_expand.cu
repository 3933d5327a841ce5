// Tiled-CSL weight -> dense row-major weight, for products too tall for the fused kernels (prefill,
// more than FLASHLLM_KERNEL_MAX_N rows): the counterpart of bitmap_expand.cu (see there and
// docs/kernels.md, "Prefill"): one pass that reads the words and writes the dense bytes.
//
// One block per 128 x 64 tile (layout version 2, formats/tiled_csl.py): the block zeroes the tile
// in shared memory, scatters its words into it at the byte offset each word gives (four per 16-byte
// load; a sentinel word, slot 16384, lands in the spare slot past the tile), which places the tile's
// 16-byte chunks swizzled by row (chunk ^= row % 8, as the product kernel's tile), then writes the
// tile out row by row, reading each row's chunks back in order, 16 bytes per thread and store, so a
// warp writes four whole 128-byte rows. Values are copied as bits: one kernel serves fp16 and bf16.

// 16 bytes moved by one instruction (NVRTC's built-in vector types are not relied on).
struct alignas(16) Chunk16 {
  unsigned int x, y, z, w;
};

extern "C" __global__ void __launch_bounds__(256) flashllm_tiled_csl_expand(
    const Chunk16* __restrict__ words,         // 4 words per chunk: value bits low, slot high
    const int* __restrict__ offsets,           // tiles + 1, in words, multiples of 4
    unsigned short* __restrict__ dense,        // M x K, row-major
    int M, int K, int k_tiles) {
  constexpr int TILE_M = 128, TILE_K = 64, CHUNKS = TILE_M * TILE_K / 8;  // 16-byte chunks per tile
  constexpr unsigned int SENTINEL_SLOT = CHUNKS * 16;  // bytes: the spare chunk past the tile
  __shared__ Chunk16 tile_chunks[CHUNKS + 1];  // + the sentinel's slot
  unsigned char* tile_bytes = reinterpret_cast<unsigned char*>(tile_chunks);
  const unsigned short* tile_values = reinterpret_cast<const unsigned short*>(tile_chunks);
  const int tile = blockIdx.x;
  const int t = threadIdx.x;

  for (int c = t; c <= CHUNKS; c += 256) tile_chunks[c] = Chunk16{0, 0, 0, 0};
  __syncthreads();
  const int begin = offsets[tile] >> 2, end = offsets[tile + 1] >> 2;
  for (int q = begin + t; q < end; q += 256) {
    const Chunk16 four = words[q];
    // Clamped: corrupt data (refused by the format's validation) lands in the spare slot.
    *reinterpret_cast<unsigned short*>(tile_bytes + min(four.x >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.x);
    *reinterpret_cast<unsigned short*>(tile_bytes + min(four.y >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.y);
    *reinterpret_cast<unsigned short*>(tile_bytes + min(four.z >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.z);
    *reinterpret_cast<unsigned short*>(tile_bytes + min(four.w >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.w);
  }
  __syncthreads();

  const int tile_row = tile / k_tiles;
  const int tile_col = tile - tile_row * k_tiles;
  // 16-byte stores need each chunk to start on 16 bytes: K a multiple of 8 and an aligned base.
  const bool vector_ok = (K & 7) == 0 && (reinterpret_cast<unsigned long long>(dense) & 15) == 0;
  for (int c = t; c < CHUNKS; c += 256) {
    const int row = tile_row * TILE_M + c / (TILE_K / 8);
    const int col = tile_col * TILE_K + (c % (TILE_K / 8)) * 8;
    if (row >= M) break;  // chunks go row by row: every later one is past M too
    unsigned short* out = dense + static_cast<long long>(row) * K + col;
    const int held = c ^ ((c >> 3) & 7);  // where the swizzle put chunk c: row c / 8, chunk ^ row % 8
    if (vector_ok && col + 8 <= K) {
      *reinterpret_cast<Chunk16*>(out) = tile_chunks[held];
    } else {
      for (int e = 0; e < 8 && col + e < K; ++e) out[e] = tile_values[held * 8 + e];
    }
  }
}
