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

/// The message of a caught panic (its `&str` or `String` payload).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}
