//! Guest-visible devices of cgvm: the I/O bus, the legacy platform devices and (later) virtio.
//!
//! Nothing here knows about KVM or threads: a device answers reads and writes, raises its
//! interrupt through an eventfd, and reports a guest stop through a [`stop::StopNotifier`].

#![deny(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod rate_limiter;
pub mod seccomp;
pub mod stop;
pub mod virtio;
