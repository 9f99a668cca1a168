//! Fault injection (placeholder module; the fault-injecting backend is being built).
