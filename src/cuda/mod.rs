//! STAND-IN (runtime helper): the build helper's `mod.rs` replaces this at merge; it must keep
//! `pub mod device; pub mod ops; pub mod raw;` (the runtime helper's files).
//!
//! The CUDA kernels' Rust side: [`abi`] (params.h through bindgen), [`images`] (the compiled
//! kernels), [`device`] (probe, context, module loading), [`raw`] (unsafe launches on raw
//! pointers) and [`ops`] (safe, validated ops on owned device buffers).

pub mod abi;
pub mod device;
pub mod ops;
pub mod raw;

/// STAND-IN: the compiled kernels embedded by build.rs (`$OUT_DIR/kernels.rs`).
pub mod images {
    /// One compiled kernel file for one target.
    #[derive(Debug, Clone, Copy)]
    pub struct KernelImage {
        /// The source file, e.g. `attention.cu`.
        pub file: &'static str,
        /// `sm_80`, `sm_90`, `sm_90a` (cubin) or `compute_90` (PTX, NUL-terminated).
        pub target: &'static str,
        /// The image.
        pub bytes: &'static [u8],
    }

    /// Every embedded image.
    pub const KERNEL_IMAGES: &[KernelImage] = &[];

    /// Why no kernels were built (no nvcc at build time), if so.
    pub const KERNELS_MISSING: Option<&str> =
        Some("CUDA kernels were not compiled into this build (stand-in images module)");
}
