//! Edge interrupts for the legacy devices: [`EventFdTrigger`] wraps the eventfd that the VMM
//! registers as a KVM irqfd, so that a device raises its ISA line by writing 1 to it.

use std::io;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// An interrupt line backed by an eventfd: [`Trigger::trigger`] writes 1 to it.
///
/// The VMM registers [`EventFdTrigger::event_fd`] with `KVM_IRQFD` for the device's GSI (IRQ 4
/// for COM1, IRQ 1 for the i8042); each write then injects one edge on that line.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// A trigger over a fresh non-blocking eventfd.
    pub fn new() -> io::Result<Self> {
        EventFd::new(EFD_NONBLOCK).map(Self)
    }

    /// A trigger over an eventfd the caller already has.
    pub fn from_event_fd(event: EventFd) -> Self {
        Self(event)
    }

    /// Another trigger writing to the same eventfd (a `dup` of the descriptor).
    pub fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// The eventfd to register as an irqfd.
    pub fn event_fd(&self) -> &EventFd {
        &self.0
    }
}

impl Trigger for EventFdTrigger {
    type E = io::Error;

    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_writes_one_and_clones_share_the_counter() {
        let t = EventFdTrigger::new().expect("eventfd");
        let c = t.try_clone().expect("clone");
        t.trigger().expect("trigger");
        c.trigger().expect("trigger");
        assert_eq!(t.event_fd().read().expect("read"), 2);
        assert!(
            c.event_fd().read().is_err(),
            "counter reset, non-blocking read fails"
        );
    }
}
