//! Criterion benchmarks of the qcow2 engine live in `benches/`; this library is empty.
