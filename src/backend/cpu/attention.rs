//! Tiled split-KV attention over a K/V pool, the CPU twin of the CUDA kernel.
