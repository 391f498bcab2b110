//! f32 CPU kernels on slices (row-major), each the oracle for its CUDA twin.
