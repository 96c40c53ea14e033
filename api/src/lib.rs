//! The HTTP API of cgvm (Firecracker-compatible, on a Unix socket). It arrives with issue 3
//! of 6; until then this crate holds nothing, so that the workspace has its final shape.

#![deny(missing_docs)]
