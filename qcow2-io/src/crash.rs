//! Crash simulation (placeholder module; the crash-simulating backend is being built).
