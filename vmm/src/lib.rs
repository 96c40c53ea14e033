//! The machine: a `VmConfig` becomes a KVM VM with memory, devices and vCPU threads, run
//! until the guest stops, with the reason as a [`RunOutcome`].
//!
//! `boot` computes what the guest sees at its first instruction and `devices` answers its
//! port and MMIO accesses; this crate owns the KVM file descriptors, the threads and the
//! event loop. HTTP lives in `api`, terminal flags and exit statuses in the binary.

#![deny(missing_docs)]

pub mod builder;
pub mod config;
pub mod console;
pub mod controller;
pub mod device_manager;
pub mod logger;
pub mod metrics;
pub mod outcome;
pub mod passt;
pub mod pci_manager;
pub mod resources;
pub mod rpc;
pub mod runner;
pub mod seccomp;
pub mod timeline;
pub mod vstate;
