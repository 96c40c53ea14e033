//! What the virtio transports share: the state machine a driver walks through, whatever
//! registers it uses to do so. Feature negotiation (the device's features offered a 32-bit
//! word at a time, the driver's accepted ones written the same way until FEATURES_OK), queue
//! configuration (the selected queue's size, addresses and readiness, frozen once the queue is
//! ready or the device is live), device status transitions (FEATURES_OK refused without
//! VERSION_1 or with features that were not offered, activation at DRIVER_OK with an
//! [`ActivateContext`], reset on zero), DEVICE_NEEDS_RESET from [`DeviceHealth`], and the
//! configuration generation.
//!
//! What is not here: register layouts and interrupts. `virtio::mmio` and `virtio::pci` own
//! their registers and their [`VirtioInterrupt`], and drive the same `TransportCore` (crate
//! private).

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::activator::Activator;
use super::{
    status, ActivateContext, ActiveQueue, DeviceHealth, VirtioDevice, VirtioInterrupt,
    VIRTIO_F_VERSION_1,
};

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue size the virtio-queue crate refuses.
    #[error("queue {index} of size {size}: {reason}")]
    Queue {
        /// Queue index.
        index: usize,
        /// Its size.
        size: u16,
        /// Why.
        reason: String,
    },
    /// An eventfd.
    #[error("cannot create a queue eventfd: {0}")]
    EventFd(#[from] std::io::Error),
}

/// A 64-bit queue address register, as a transport names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QueueAddress {
    /// The descriptor table.
    Desc,
    /// The available (driver) ring.
    Avail,
    /// The used (device) ring.
    Used,
}

/// The shared state of one virtio device behind a transport.
pub(crate) struct TransportCore {
    /// "virtio-mmio" or "virtio-pci", for logs.
    name: &'static str,
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    health: DeviceHealth,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    active: bool,
    /// Where DRIVER_OK sends the activation (the VMM loop); `None`: at once, on the thread
    /// that wrote it.
    activator: Option<Arc<Activator>>,
    /// DRIVER_OK was written and the activator has not run the activation yet.
    activation_requested: bool,
}

impl TransportCore {
    /// Wraps `device`: one queue (at its largest size) and one notification eventfd per queue
    /// the device has.
    pub(crate) fn new(
        name: &'static str,
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
    ) -> Result<Self, TransportError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let q = Queue::new(size).map_err(|e| TransportError::Queue {
                index,
                size,
                reason: e.to_string(),
            })?;
            queues.push(q);
            notify.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            name,
            device,
            mem,
            health: DeviceHealth::new(),
            queues,
            notify,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            active: false,
            activator: None,
            activation_requested: false,
        })
    }

    /// The queues' notification eventfds, in queue order.
    pub(crate) fn queue_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device's virtio type.
    pub(crate) fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// How many queues the device has.
    pub(crate) fn num_queues(&self) -> usize {
        self.queues.len()
    }

    /// Whether the device is active (DRIVER_OK and activated).
    pub(crate) fn is_active(&self) -> bool {
        self.active
    }

    /// The features offered: the device's and VERSION_1.
    fn offered_features(&self) -> u64 {
        self.device.features() | (1 << VIRTIO_F_VERSION_1)
    }

    /// The device-feature selector.
    pub(crate) fn device_features_select(&self) -> u32 {
        self.device_features_sel
    }

    /// Sets the device-feature selector.
    pub(crate) fn set_device_features_select(&mut self, v: u32) {
        self.device_features_sel = v;
    }

    /// The word of offered features the selector names (zero past the second).
    pub(crate) fn device_features_word(&self) -> u32 {
        let f = self.offered_features();
        match self.device_features_sel {
            0 => f as u32,
            1 => (f >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver-feature selector.
    pub(crate) fn driver_features_select(&self) -> u32 {
        self.driver_features_sel
    }

    /// Sets the driver-feature selector.
    pub(crate) fn set_driver_features_select(&mut self, v: u32) {
        self.driver_features_sel = v;
    }

    /// The word of accepted features the selector names.
    pub(crate) fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes a word of accepted features: taken only between DRIVER and
    /// FEATURES_OK.
    pub(crate) fn write_driver_features_word(&mut self, v: u32) {
        if self.status & status::DRIVER == 0 || self.status & status::FEATURES_OK != 0 {
            log::warn!(
                "{}: driver features written in status {:#x}",
                self.name,
                self.status
            );
            return;
        }
        match self.driver_features_sel {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// The queue selector.
    pub(crate) fn queue_select(&self) -> u32 {
        self.queue_sel
    }

    /// Sets the queue selector (any value: one past the queues selects nothing).
    pub(crate) fn set_queue_select(&mut self, v: u32) {
        self.queue_sel = v;
    }

    /// The selected queue's index, if it exists.
    pub(crate) fn selected_index(&self) -> Option<usize> {
        let i = usize::try_from(self.queue_sel).ok()?;
        (i < self.queues.len()).then_some(i)
    }

    /// The selected queue, if it exists.
    pub(crate) fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::try_from(self.queue_sel).ok()?)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(usize::try_from(self.queue_sel).ok()?)
    }

    /// Whether the selected queue's set-up registers may change: before DRIVER_OK, on a
    /// queue that exists and is not ready yet.
    pub(crate) fn queue_writable(&self) -> bool {
        self.status & status::DRIVER_OK == 0 && self.selected_queue().is_some_and(|q| !q.ready())
    }

    /// Applies `f` to the selected queue if its set-up may change; logs `what` otherwise.
    fn with_writable_queue(&mut self, what: &str, f: impl FnOnce(&mut Queue)) {
        if !self.queue_writable() {
            log::warn!(
                "{}: {what} of queue {} written while the queue is live or absent",
                self.name,
                self.queue_sel
            );
            return;
        }
        if let Some(q) = self.selected_queue_mut() {
            f(q);
        }
    }

    /// The driver sets the selected queue's size (refused unless a power of two no larger
    /// than the maximum: the queue keeps its size).
    pub(crate) fn set_queue_size(&mut self, size: u16) {
        self.with_writable_queue("size", |q| q.set_size(size));
    }

    /// The driver marks the selected queue ready (or not).
    pub(crate) fn set_queue_ready(&mut self, ready: bool) {
        self.with_writable_queue("readiness", |q| q.set_ready(ready));
    }

    /// The driver writes the low and/or high half of one of the selected queue's addresses.
    pub(crate) fn set_queue_address(
        &mut self,
        which: QueueAddress,
        low: Option<u32>,
        high: Option<u32>,
    ) {
        self.with_writable_queue("an address", |q| match which {
            QueueAddress::Desc => q.set_desc_table_address(low, high),
            QueueAddress::Avail => q.set_avail_ring_address(low, high),
            QueueAddress::Used => q.set_used_ring_address(low, high),
        });
    }

    /// One of the selected queue's addresses (zero when no queue is selected).
    pub(crate) fn queue_address(&self, which: QueueAddress) -> u64 {
        self.selected_queue().map_or(0, |q| match which {
            QueueAddress::Desc => q.desc_table(),
            QueueAddress::Avail => q.avail_ring(),
            QueueAddress::Used => q.used_ring(),
        })
    }

    /// A notification that reached the registers instead of an ioeventfd: forwarded.
    pub(crate) fn notify_queue(&self, index: u32) {
        if let Some(e) = usize::try_from(index).ok().and_then(|i| self.notify.get(i)) {
            let _ = e.write(1);
        }
    }

    /// The device status as the driver reads it: what it wrote, and DEVICE_NEEDS_RESET once
    /// the device is broken.
    pub(crate) fn status(&self) -> u32 {
        if self.health.is_broken() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    /// The configuration generation: the transport's own count (resets, driver writes) plus
    /// the device's (changes it makes on its own), so that the sum changes whenever either
    /// does.
    pub(crate) fn config_generation(&self) -> u32 {
        self.config_generation
            .wrapping_add(self.device.config_generation())
    }

    /// The driver reads the device's configuration space.
    pub(crate) fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.device.read_config(offset, data);
    }

    /// The driver writes the device's configuration space.
    pub(crate) fn write_config(&mut self, offset: u64, data: &[u8]) {
        self.device.write_config(offset, data);
        self.config_generation = self.config_generation.wrapping_add(1);
    }

    /// The driver writes the device status; `interrupt` is what the device gets if this
    /// activates it. Returns true when the write was a reset (zero): the transport then
    /// resets its own state (interrupt status, vectors) too.
    pub(crate) fn write_status(&mut self, v: u32, interrupt: &Arc<dyn VirtioInterrupt>) -> bool {
        if v == 0 {
            self.reset();
            return true;
        }
        let new_bits = v & !self.status;
        if new_bits & status::FEATURES_OK != 0 {
            let offered = self.offered_features();
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                log::warn!(
                    "{}: driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.name,
                    self.driver_features
                );
                self.status = v & !status::FEATURES_OK;
                return false;
            }
        }
        self.status = v;
        if new_bits & status::DRIVER_OK != 0 && !self.active {
            match &self.activator {
                Some(a) => {
                    self.activation_requested = true;
                    a.request();
                }
                None => self.activate(interrupt),
            }
        }
        false
    }

    /// Sends activations to `activator` from now on (see [`Activator`]).
    pub(crate) fn set_activator(&mut self, activator: Arc<Activator>) {
        self.activator = Some(activator);
    }

    /// Runs an activation the driver requested, unless it reset the device since.
    pub(crate) fn activate_pending(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) {
        if std::mem::take(&mut self.activation_requested)
            && !self.active
            && self.status & status::DRIVER_OK != 0
        {
            self.activate(interrupt);
        }
    }

    fn activate(&mut self, interrupt: &Arc<dyn VirtioInterrupt>) {
        let name = self.name;
        if self.status & status::FEATURES_OK == 0 {
            log::warn!("{name}: DRIVER_OK without FEATURES_OK; device not started");
            self.health.mark_broken();
            return;
        }
        let mut queues = Vec::new();
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                log::warn!(
                    "{name}: queue {i} is not valid (size or addresses); device not started"
                );
                self.health.mark_broken();
                return;
            }
            let notify = match self.notify[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    log::error!("{name}: {e}");
                    self.health.mark_broken();
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(q) => q,
                Err(e) => {
                    log::warn!("{name}: queue {i}: {e}; device not started");
                    self.health.mark_broken();
                    return;
                }
            };
            queues.push(ActiveQueue {
                index: i as u16,
                queue,
                notify,
            });
        }
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            queues,
            interrupt: interrupt.clone(),
            acked_features: self.driver_features,
            health: self.health.clone(),
        };
        match self.device.activate(ctx) {
            Ok(()) => self.active = true,
            Err(e) => {
                log::error!(
                    "virtio type {}: activation failed: {e}",
                    self.device.device_type()
                );
                self.health.mark_broken();
            }
        }
    }

    /// Device reset: the device stops, queues and negotiation start over, the generation
    /// moves on.
    pub(crate) fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.activation_requested = false;
        for q in &mut self.queues {
            q.reset();
        }
        for e in &self.notify {
            let _ = e.read();
        }
        self.status = 0;
        self.driver_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.health.clear();
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

/// A device for transport tests: it keeps what activation gives it, so that a test raises its
/// interrupts and breaks it by hand, without a worker thread.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::{Arc, Mutex};

    use crate::virtio::{
        read_config_bytes, ActivateContext, ActivateError, DeviceHealth, VirtioDevice,
        VirtioInterrupt,
    };

    /// The one device feature a fake offers.
    pub(crate) const FAKE_FEATURE: u64 = 1 << 5;

    /// What a [`FakeDevice`] was given at activation.
    pub(crate) struct Given {
        pub(crate) interrupt: Arc<dyn VirtioInterrupt>,
        pub(crate) health: DeviceHealth,
        pub(crate) queues: Vec<u16>,
        pub(crate) features: u64,
    }

    /// Where a test finds what its fake was given (`None` before activation or after reset).
    pub(crate) type Slot = Arc<Mutex<Option<Given>>>;

    /// A fake device of type `kind` with `queues` queues of 64 entries and a 16-byte
    /// configuration space holding 0, 1, .., 15.
    pub(crate) struct FakeDevice {
        kind: u32,
        sizes: Vec<u16>,
        config: Vec<u8>,
        given: Slot,
        pub(crate) generation: Arc<AtomicU32>,
    }

    impl FakeDevice {
        pub(crate) fn new(kind: u32, queues: usize) -> (Self, Slot) {
            let given = Slot::default();
            let dev = Self {
                kind,
                sizes: vec![64; queues],
                config: (0..16).collect(),
                given: given.clone(),
                generation: Arc::default(),
            };
            (dev, given)
        }
    }

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            self.kind
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &self.sizes
        }
        fn features(&self) -> u64 {
            FAKE_FEATURE
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            read_config_bytes(&self.config, offset, data);
        }
        fn config_generation(&self) -> u32 {
            self.generation.load(Ordering::Acquire)
        }
        fn write_config(&mut self, offset: u64, data: &[u8]) {
            for (i, &b) in data.iter().enumerate() {
                let slot = usize::try_from(offset)
                    .ok()
                    .and_then(|o| o.checked_add(i))
                    .and_then(|o| self.config.get_mut(o));
                if let Some(c) = slot {
                    *c = b;
                }
            }
        }
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            *self.given.lock().unwrap() = Some(Given {
                interrupt: ctx.interrupt,
                health: ctx.health,
                queues: ctx.queues.iter().map(|q| q.index).collect(),
                features: ctx.acked_features,
            });
            Ok(())
        }
        fn reset(&mut self) {
            *self.given.lock().unwrap() = None;
        }
    }
}
