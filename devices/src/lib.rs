//! Guest-visible devices of cgvm: the I/O bus, the legacy platform devices, PCI (the root
//! complex, configuration space, MSI-X) and virtio (devices and their MMIO and PCI transports).
//!
//! Nothing here knows about KVM or threads: a device answers reads and writes, raises its
//! interrupt through an eventfd, and reports a guest stop through a [`stop::StopNotifier`].

#![deny(missing_docs)]

pub mod bus;
pub mod legacy;
pub mod pci;
pub mod rate_limiter;
pub mod seccomp;
pub mod stop;
#[cfg(test)]
mod temp_dir;
pub mod virtio;

/// The message of a caught panic (its `&str` or `String` payload).
pub fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

std::thread_local! {
    static CONFINED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Marks the calling thread as running under a tight seccomp filter, so that a panic there is
/// reported by [`install_panic_hook`]'s hook without the calls a backtrace makes.
pub fn mark_confined_thread() {
    CONFINED.with(|c| c.set(true));
}

/// Installs a panic hook that, in a thread marked by [`mark_confined_thread`], prints one line
/// (thread, location, message) with a single write: the default hook would open
/// /proc/self/maps for a backtrace when RUST_BACKTRACE is set, which a device thread's filter
/// forbids. Other threads keep the previous hook.
pub fn install_panic_hook() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if CONFINED.with(|c| c.get()) {
            use std::io::Write;
            let thread = std::thread::current();
            let name = thread.name().unwrap_or("unnamed");
            let place = info
                .location()
                .map(|l| format!(" at {l}"))
                .unwrap_or_default();
            let line = format!(
                "cgvm: thread '{name}' panicked{place}: {}\n",
                panic_message(info.payload())
            );
            let _ = std::io::stderr().write_all(line.as_bytes());
        } else {
            previous(info);
        }
    }));
}
