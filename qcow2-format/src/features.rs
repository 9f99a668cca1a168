//! Being built: see lib.rs.
