//! The checker and repairer.
//!
//! **Status: skeleton.** This crate is not built yet; it exposes nothing and claims nothing.
//! See the workspace `ARCHITECTURE.md` for the role it will play.
