// tiled_csl16 weight -> dense row-major weight, for products too tall for the fused kernel (prefill,
// more than FLASHLLM_KERNEL_MAX_N rows): the counterpart of tiled_csl_expand.cu (see there and
// docs/kernels.md, "Prefill").
//
// A block of 8 warps expands 8 consecutive tiles of 16 x 64 (layout version 1, formats/tiled_csl16.py),
// one per warp: the warp zeroes its 2 KB shared tile, scatters the tile's words into it at the byte
// offset each word gives (the fragment order of the product kernel; a sentinel word, slot 2048,
// lands in the spare slot past the tile), then writes the tile out as 128 chunks of 8 values, a
// chunk's 8 values gathered as 4 pairs (the two columns 2t, 2t + 1 of a k16 step are adjacent in the
// fragment order) and stored with one 16-byte store. Values are copied as bits: one kernel serves
// fp16 and bf16.

struct alignas(16) Chunk16 {
  unsigned int x, y, z, w;
};

extern "C" __global__ void __launch_bounds__(256) flashllm_tiled_csl16_expand(
    const Chunk16* __restrict__ words,   // 4 words per chunk: value bits low, slot high
    const int* __restrict__ offsets,     // tiles + 1, in words, multiples of 4
    unsigned short* __restrict__ dense,  // M x K, row-major
    int M, int K, int k_tiles) {
  constexpr int TILE_M = 16, TILE_K = 64, TILES = 8, CHUNKS = TILE_M * TILE_K / 8;  // 16-byte chunks per tile
  constexpr unsigned int SENTINEL_SLOT = CHUNKS * 16;
  __shared__ Chunk16 tiles[TILES][CHUNKS + 1];  // each with the sentinel's slot
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int tile = blockIdx.x * TILES + warp;
  const int row_tiles = (M + TILE_M - 1) / TILE_M;
  if (tile >= row_tiles * k_tiles) return;  // warp-uniform, and only warp barriers follow
  Chunk16* mine = tiles[warp];
  unsigned char* bytes = reinterpret_cast<unsigned char*>(mine);
  const unsigned int* pairs = reinterpret_cast<const unsigned int*>(mine);

  for (int c = lane; c <= CHUNKS; c += 32) mine[c] = Chunk16{0, 0, 0, 0};
  __syncwarp();
  const int begin = offsets[tile] >> 2, end = offsets[tile + 1] >> 2;
  for (int q = begin + lane; q < end; q += 32) {
    const Chunk16 four = words[q];
    // Clamped: corrupt data (refused by the format's validation) lands in the spare slot.
    *reinterpret_cast<unsigned short*>(bytes + min(four.x >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.x);
    *reinterpret_cast<unsigned short*>(bytes + min(four.y >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.y);
    *reinterpret_cast<unsigned short*>(bytes + min(four.z >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.z);
    *reinterpret_cast<unsigned short*>(bytes + min(four.w >> 16, SENTINEL_SLOT)) = static_cast<unsigned short>(four.w);
  }
  __syncwarp();

  const int tile_row = tile / k_tiles;
  const int tile_col = tile - tile_row * k_tiles;
  // 16-byte stores need each chunk to start on 16 bytes: K a multiple of 8 and an aligned base.
  const bool vector_ok = (K & 7) == 0 && (reinterpret_cast<unsigned long long>(dense) & 15) == 0;
  for (int c = lane; c < CHUNKS; c += 32) {
    const int r = c >> 3, m = c & 7;  // tile row r, columns 8 m .. 8 m + 7
    const int row = tile_row * TILE_M + r;
    const int col = tile_col * TILE_K + m * 8;
    if (row >= M) break;  // chunks go row by row: every later one is past M too
    // Columns 8 m + 2 t, + 1 of step s = m / 2 (hi = m % 2): the 32-bit pair at byte
    // 1024 (r / 8) + 512 (s / 2) + 16 (4 (r % 8) + t) + 4 (2 (s % 2) + hi).
    const int s = m >> 1, hi = m & 1;
    const int first = (1024 * (r >> 3) + 512 * (s >> 1) + 64 * (r & 7) + 4 * (2 * (s & 1) + hi)) >> 2;
    const Chunk16 out_chunk{pairs[first], pairs[first + 4], pairs[first + 8], pairs[first + 12]};
    unsigned short* out = dense + static_cast<long long>(row) * K + col;
    if (vector_ok && col + 8 <= K) {
      *reinterpret_cast<Chunk16*>(out) = out_chunk;
    } else {
      for (int e = 0; e < 8 && col + e < K; ++e) {  // (from shared memory: no local copy of the chunk)
        out[e] = static_cast<unsigned short>(pairs[first + 4 * (e >> 1)] >> (16 * (e & 1)));
      }
    }
  }
}
