//! Shared helpers of the criterion benchmarks in `benches/`.

pub use qcow2_io::SparseStorage;
