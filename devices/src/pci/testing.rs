//! A [`PciHost`] that records what it is asked, for tests here and in the VMM: which
//! ioeventfds are registered where, and which MSI routes are set. It keeps the registered
//! ioeventfds, so a test can play KVM and find the eventfd a guest write at an address would
//! signal.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

use vmm_sys_util::eventfd::EventFd;

use super::{MsiMessage, PciHost};

/// One call a [`RecordingHost`] accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostEvent {
    /// An ioeventfd registered at `addr`.
    RegisterIoevent {
        /// The guest physical address.
        addr: u64,
    },
    /// An ioeventfd removed from `addr`.
    UnregisterIoevent {
        /// The guest physical address.
        addr: u64,
    },
    /// The route of `gsi` set (`None`: removed).
    MsiRoute {
        /// The GSI.
        gsi: u32,
        /// The message.
        msg: Option<MsiMessage>,
    },
}

/// The recording fake; see the module documentation.
#[derive(Default)]
pub struct RecordingHost {
    events: Mutex<Vec<HostEvent>>,
    /// Live ioeventfds: address and a duplicate of the eventfd.
    ioevents: Mutex<Vec<(u64, RawFd, EventFd)>>,
    fail_ioevents: AtomicBool,
    fail_routes: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl RecordingHost {
    /// A host that accepts everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// The calls accepted so far, in order.
    pub fn events(&self) -> Vec<HostEvent> {
        lock(&self.events).clone()
    }

    /// Forgets the calls recorded so far (the live ioeventfds stay).
    pub fn clear_events(&self) {
        lock(&self.events).clear();
    }

    /// The addresses that have an ioeventfd now, sorted.
    pub fn ioevent_addresses(&self) -> Vec<u64> {
        let mut a: Vec<u64> = lock(&self.ioevents).iter().map(|e| e.0).collect();
        a.sort_unstable();
        a
    }

    /// Plays KVM: a guest write at `addr` signals the ioeventfd there. Returns false when
    /// none is registered at `addr`.
    pub fn guest_write(&self, addr: u64) -> bool {
        match lock(&self.ioevents).iter().find(|e| e.0 == addr) {
            Some(e) => e.2.write(1).is_ok(),
            None => false,
        }
    }

    /// Makes ioeventfd calls fail (EEXIST) from now on, or succeed again.
    pub fn fail_ioevents(&self, fail: bool) {
        self.fail_ioevents.store(fail, Ordering::Release);
    }

    /// Makes route calls fail (EINVAL) from now on, or succeed again.
    pub fn fail_routes(&self, fail: bool) {
        self.fail_routes.store(fail, Ordering::Release);
    }
}

impl PciHost for RecordingHost {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        if self.fail_ioevents.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        let mut live = lock(&self.ioevents);
        if live.iter().any(|e| e.0 == addr) {
            // KVM refuses a second ioeventfd with the same address, length and datamatch.
            return Err(io::Error::from_raw_os_error(libc::EEXIST));
        }
        live.push((addr, evt.as_raw_fd(), evt.try_clone()?));
        lock(&self.events).push(HostEvent::RegisterIoevent { addr });
        Ok(())
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        if self.fail_ioevents.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let mut live = lock(&self.ioevents);
        let Some(i) = live
            .iter()
            .position(|e| e.0 == addr && e.1 == evt.as_raw_fd())
        else {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        };
        live.swap_remove(i);
        lock(&self.events).push(HostEvent::UnregisterIoevent { addr });
        Ok(())
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        if self.fail_routes.load(Ordering::Acquire) {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        lock(&self.events).push(HostEvent::MsiRoute { gsi, msg });
        Ok(())
    }
}
