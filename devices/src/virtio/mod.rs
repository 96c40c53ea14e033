//! Virtio: what every device shares, whatever the transport. A device says what it is
//! (type, queues, features, configuration space) and, when the driver sets DRIVER_OK, gets
//! its queues, their notification eventfds and an interrupt, and starts its worker thread.
//! The transport (`mmio` or `pci`, the VMM's choice; the device does not know which) owns the
//! registers and never touches the queues once the device is active; the state machine both
//! transports drive is `transport`.

pub mod activator;
pub mod block;
pub mod mmio;
pub mod net;
pub mod pci;
pub mod rng;
#[cfg(test)]
pub(crate) mod test_driver;
pub mod transport;
pub mod vsock;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Every kind of device thread, each with its seccomp list: block per engine, net per
/// backend, vsock, rng.
pub fn device_kinds() -> Vec<&'static crate::seccomp::DeviceKind> {
    let mut v = Vec::new();
    v.extend(block::seccomp_kinds());
    v.extend(net::seccomp_kinds());
    v.push(vsock::seccomp_kind());
    v.push(rng::seccomp_kind());
    v
}

/// Device type: network card.
pub const TYPE_NET: u32 = 1;
/// Device type: block device.
pub const TYPE_BLOCK: u32 = 2;
/// Device type: entropy source.
pub const TYPE_RNG: u32 = 4;
/// Device type: socket device.
pub const TYPE_VSOCK: u32 = 19;

/// Feature bit: the device is modern (virtio 1.x); cgvm offers nothing else.
pub const VIRTIO_F_VERSION_1: u32 = 32;
/// Feature bit: the driver may use the event index mechanism.
pub const VIRTIO_RING_F_EVENT_IDX: u32 = 29;

/// Device status bits (virtio 1.2, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u32 = 0x80;
}

/// Why a device interrupt is raised.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptReason {
    /// A used buffer was added to this queue.
    Queue(u16),
    /// The configuration space (or the device status) changed.
    Config,
}

/// How a device interrupts the guest; the transport decides what that means (an ISR bit
/// and a line through irqfd for MMIO, an MSI-X vector or INTx for PCI).
pub trait VirtioInterrupt: Send + Sync {
    /// Raises the interrupt for `reason`.
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()>;
}

/// Whether a device is still usable. A worker that fails for good (a panic, a fatal backend
/// error) marks it broken; the transport then reports DEVICE_NEEDS_RESET.
#[derive(Debug, Default, Clone)]
pub struct DeviceHealth(Arc<AtomicBool>);

impl DeviceHealth {
    /// A healthy device.
    pub fn new() -> Self {
        Self::default()
    }
    /// Marks the device as needing a reset.
    pub fn mark_broken(&self) {
        self.0.store(true, Ordering::Release);
    }
    /// True once the device needs a reset.
    pub fn is_broken(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
    /// Back to healthy (on device reset).
    pub fn clear(&self) {
        self.0.store(false, Ordering::Release);
    }
}

/// One queue handed to a device at activation.
pub struct ActiveQueue {
    /// The queue's index in the device.
    pub index: u16,
    /// The queue, as the driver configured it.
    pub queue: Queue,
    /// Becomes readable when the driver notifies this queue (a KVM ioeventfd).
    pub notify: EventFd,
}

/// Everything a device needs to start working.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The driver's queues, in index order (only those it made ready).
    pub queues: Vec<ActiveQueue>,
    /// The device's interrupt.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// Where a worker reports that the device is broken.
    pub health: DeviceHealth,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver did not set up the queues the device needs.
    #[error("the driver made {got} of the {want} queues ready")]
    MissingQueues {
        /// Queues the device needs.
        want: usize,
        /// Queues that are ready.
        got: usize,
    },
    /// The worker thread could not be started.
    #[error("cannot start the device thread: {0}")]
    Worker(#[from] std::io::Error),
    /// A backend error.
    #[error("{0}")]
    Backend(String),
}

/// A virtio device, independent of its transport.
pub trait VirtioDevice: Send {
    /// The virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// The largest size of each of its queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// The features it offers (VERSION_1 included).
    fn features(&self) -> u64;
    /// Reads its configuration space; bytes past the end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// A counter that changes whenever the device changes its configuration space on its own
    /// (a disk resized by a backing-file swap, say): the transport adds it to its own
    /// configuration generation, which a driver reads before and after reading the
    /// configuration space to know whether it read a consistent copy. A device must change
    /// the counter and the configuration space together, atomically with respect to
    /// [`read_config`](Self::read_config) and this method. Devices whose configuration
    /// space only changes through the driver keep the default, 0.
    fn config_generation(&self) -> u32 {
        0
    }
    /// Writes its configuration space; most devices ignore writes.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        log::debug!(
            "virtio type {}: ignored config write of {} bytes at {offset:#x}",
            self.device_type(),
            data.len()
        );
    }
    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;
    /// Stops the device (its worker thread ends) so it can be activated again.
    fn reset(&mut self);
}

/// Copies the bytes of `config` at `offset` into `data`; bytes past the end read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_reads_past_the_end_are_zero_and_never_panic() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [0xffu8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }

    #[test]
    fn health_is_shared_and_resettable() {
        let h = DeviceHealth::new();
        let w = h.clone();
        assert!(!h.is_broken());
        w.mark_broken();
        assert!(h.is_broken());
        h.clear();
        assert!(!w.is_broken());
    }
}
