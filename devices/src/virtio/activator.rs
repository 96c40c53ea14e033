//! Device activation off the vCPU threads. A driver's DRIVER_OK write reaches a transport on
//! the vCPU thread that made it; starting the device (its thread, its eventfds, an io_uring,
//! tap offloads, timers) takes system calls a vCPU thread has no business making. With an
//! [`Activator`], the transport only records the request and pokes an eventfd; the VMM loop
//! then calls [`Activator::run_pending`], which activates every transport with a request.
//!
//! The driver sees no difference: the status reads back as written, and queue notifications
//! sent before the device thread runs stay counted in their eventfds until it does.

use std::sync::{Arc, Mutex, Weak};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// A transport whose activation may wait for the VMM loop.
pub trait DeferredActivation: Send {
    /// Activates the device if the driver asked for it since the last call (and has not
    /// reset it since).
    fn activate_pending(&mut self);
}

/// The activation requests of one machine's transports, for its VMM loop.
pub struct Activator {
    event: EventFd,
    targets: Mutex<Vec<Weak<Mutex<dyn DeferredActivation>>>>,
}

impl Activator {
    /// An activator with no transports yet.
    pub fn new() -> std::io::Result<Arc<Self>> {
        Ok(Arc::new(Self {
            event: EventFd::new(EFD_NONBLOCK)?,
            targets: Mutex::new(Vec::new()),
        }))
    }

    /// Adds a transport (held weakly: the bus owns it).
    pub fn register(&self, target: Weak<Mutex<dyn DeferredActivation>>) {
        self.targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(target);
    }

    /// Readable when a transport has a request; the VMM loop watches it.
    pub fn event(&self) -> &EventFd {
        &self.event
    }

    /// Called by a transport (on a vCPU thread): a request is waiting.
    pub(crate) fn request(&self) {
        if let Err(e) = self.event.write(1) {
            log::error!("cannot request a device activation: {e}");
        }
    }

    /// Activates every transport with a request (on the VMM thread).
    pub fn run_pending(&self) {
        let _ = self.event.read();
        let targets: Vec<_> = self
            .targets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter_map(Weak::upgrade)
            .collect();
        for t in targets {
            t.lock()
                .unwrap_or_else(|e| e.into_inner())
                .activate_pending();
        }
    }
}
