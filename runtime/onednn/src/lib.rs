//! Stack Runtime's stand-in for the `onednn-src` crate: nothing to call,
//! only the link to oneDNN (see `build.rs`).
//!
//! ct2rs's `dnnl` feature depends on `onednn-src`, which compiles oneDNN
//! from source: about half an hour on two cores, more than the CI budget
//! allows. The workspace patches it with this crate, which links the
//! oneDNN 3.2 shared library that `scripts/setup` fetched, pinned by
//! sha256, from Intel's PyPI wheels (`onednn-cpu-gomp` and
//! `onednn-devel-cpu-gomp` 2023.2.0), and gives CTranslate2's build the
//! same metadata (`DEP_DNNL_INCLUDE_PATH`, `DEP_DNNL_LIBRARY_PATH`) the
//! original does.

#![no_std]
