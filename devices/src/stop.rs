//! How a device tells the VMM that the guest asked to stop (exit device, ACPI poweroff, reset,
//! pvpanic) and why. The first request wins; later ones are ignored.

use std::sync::{Arc, Mutex};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Why the guest stopped, as far as a device can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GuestStop {
    /// The guest wrote a status byte to the exit device.
    ExitDevice(u8),
    /// ACPI S5 through the FADT sleep control register.
    Poweroff,
    /// A reset: i8042 pulse, ACPI reset register. Treated as the end of the run.
    Reset,
    /// The guest kernel reported a panic through pvpanic.
    Panic,
}

/// Shared by every device that can stop the guest; the VMM polls [`StopNotifier::event`].
#[derive(Clone)]
pub struct StopNotifier {
    reason: Arc<Mutex<Option<GuestStop>>>,
    event: Arc<EventFd>,
}

impl StopNotifier {
    /// A notifier with a fresh non-blocking eventfd.
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            reason: Arc::new(Mutex::new(None)),
            event: Arc::new(EventFd::new(EFD_NONBLOCK)?),
        })
    }

    /// Records `why` unless a stop was already recorded, and wakes the VMM.
    pub fn request(&self, why: GuestStop) {
        let mut r = self.reason.lock().unwrap_or_else(|e| e.into_inner());
        if r.is_none() {
            *r = Some(why);
            if let Err(e) = self.event.write(1) {
                log::error!("cannot signal guest stop: {e}");
            }
        }
    }

    /// The stop recorded so far, if any.
    pub fn reason(&self) -> Option<GuestStop> {
        *self.reason.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The eventfd that becomes readable on the first request.
    pub fn event(&self) -> &EventFd {
        &self.event
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_request_wins_and_wakes() {
        let s = StopNotifier::new().unwrap();
        assert_eq!(s.reason(), None);
        s.clone().request(GuestStop::ExitDevice(7));
        s.request(GuestStop::Reset);
        assert_eq!(s.reason(), Some(GuestStop::ExitDevice(7)));
        assert_eq!(s.event().read().unwrap(), 1);
    }
}
