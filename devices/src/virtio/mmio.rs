//! The virtio-mmio transport, register layout version 2 (modern devices only): the guest's
//! driver negotiates features and sets up queues through these registers; at DRIVER_OK the
//! device is activated with its queues. Queue notifications are KVM ioeventfds on the
//! QueueNotify register (one per queue, matched on the queue index), so they never reach
//! this code; the interrupt is an irqfd, with the reason in InterruptStatus.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{
    status, ActivateContext, ActiveQueue, DeviceHealth, InterruptReason, VirtioDevice,
    VirtioInterrupt, VIRTIO_F_VERSION_1,
};
use crate::bus::BusDevice;

/// Size of a device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the QueueNotify register (where the ioeventfds sit).
pub const QUEUE_NOTIFY_OFFSET: u64 = 0x50;
/// "virt", little endian.
const MAGIC: u32 = 0x7472_6976;
/// Register layout version 2: modern virtio-mmio.
const VERSION: u32 = 2;
/// Vendor id reported to the guest ("CGVM" is not a PCI vendor; virtio-mmio has no registry).
const VENDOR_ID: u32 = 0x4d56_4743;
/// InterruptStatus bits.
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;
/// Where the device configuration space starts.
const CONFIG_OFFSET: u64 = 0x100;

/// The MMIO interrupt: a status word the guest reads and acknowledges, and an irqfd.
pub struct MmioInterrupt {
    status: AtomicU32,
    irq: EventFd,
}

impl MmioInterrupt {
    /// An interrupt that writes `irq` (registered with KVM_IRQFD) when raised.
    pub fn new(irq: EventFd) -> Self {
        Self {
            status: AtomicU32::new(0),
            irq,
        }
    }
}

impl VirtioInterrupt for MmioInterrupt {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        let bit = match reason {
            InterruptReason::Queue(_) => INT_VRING,
            InterruptReason::Config => INT_CONFIG,
        };
        self.status.fetch_or(bit, Ordering::AcqRel);
        self.irq.write(1)
    }
}

/// A virtio device behind virtio-mmio registers.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemoryMmap,
    interrupt: Arc<MmioInterrupt>,
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
}

/// Why a transport could not be created.
#[derive(Debug, thiserror::Error)]
pub enum MmioError {
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

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd registered as its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        let mut queues = Vec::new();
        let mut notify = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let q = Queue::new(size).map_err(|e| MmioError::Queue {
                index,
                size,
                reason: e.to_string(),
            })?;
            queues.push(q);
            notify.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(Self {
            device,
            mem,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
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
        })
    }

    /// The eventfds to register with KVM_IOEVENTFD at QueueNotify, datamatch = queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.notify
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    /// Whether the device is active (DRIVER_OK and activated).
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn current_status(&self) -> u32 {
        if self.health.is_broken() {
            self.status | status::DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => self.device.device_type(),
            0x0c => VENDOR_ID,
            0x10 => {
                let f = self.device.features() | (1 << VIRTIO_F_VERSION_1);
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::Acquire),
            0x70 => self.current_status(),
            // The transport's own count (resets, driver writes) plus the device's (changes it
            // makes on its own): the sum changes whenever either does.
            0xfc => self
                .config_generation
                .wrapping_add(self.device.config_generation()),
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    /// Queue set-up registers may change only before DRIVER_OK on a queue not yet ready.
    fn queue_writable(&mut self) -> bool {
        self.status & status::DRIVER_OK == 0 && self.selected_queue().is_some_and(|q| !q.ready())
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                if self.status & status::DRIVER != 0 && self.status & status::FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => {
                            self.driver_features =
                                (self.driver_features & !0xffff_ffff) | u64::from(v)
                        }
                        1 => {
                            self.driver_features =
                                (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                } else {
                    log::warn!(
                        "virtio-mmio: driver features written in status {:#x}",
                        self.status
                    );
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 | 0x44 | 0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if !self.queue_writable() => {
                log::warn!(
                    "virtio-mmio: queue register {offset:#x} written while the queue is live"
                );
            }
            0x38 => self.with_queue(|q| q.set_size(v as u16)),
            0x44 => self.with_queue(|q| q.set_ready(v == 1)),
            0x80 => self.with_queue(|q| q.set_desc_table_address(Some(v), None)),
            0x84 => self.with_queue(|q| q.set_desc_table_address(None, Some(v))),
            0x90 => self.with_queue(|q| q.set_avail_ring_address(Some(v), None)),
            0x94 => self.with_queue(|q| q.set_avail_ring_address(None, Some(v))),
            0xa0 => self.with_queue(|q| q.set_used_ring_address(Some(v), None)),
            0xa4 => self.with_queue(|q| q.set_used_ring_address(None, Some(v))),
            QUEUE_NOTIFY_OFFSET => {
                // Normally caught by the ioeventfd; forward it if it ever gets here.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => self.write_status(v),
            _ => log::debug!("virtio-mmio: write {v:#x} to unknown register {offset:#x}"),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut Queue)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new_bits = v & !self.status;
        if new_bits & status::FEATURES_OK != 0 {
            let offered = self.device.features() | (1 << VIRTIO_F_VERSION_1);
            if self.driver_features & !offered != 0
                || self.driver_features & (1 << VIRTIO_F_VERSION_1) == 0
            {
                log::warn!(
                    "virtio-mmio: driver features {:#x} refused (offered {offered:#x}, VERSION_1 required)",
                    self.driver_features
                );
                self.status = v & !status::FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new_bits & status::DRIVER_OK != 0 && !self.active {
            self.activate();
        }
    }

    fn activate(&mut self) {
        if self.status & status::FEATURES_OK == 0 {
            log::warn!("virtio-mmio: DRIVER_OK without FEATURES_OK; device not started");
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
                    "virtio-mmio: queue {i} is not valid (size or addresses); device not started"
                );
                self.health.mark_broken();
                return;
            }
            let notify = match self.notify[i].try_clone() {
                Ok(e) => e,
                Err(e) => {
                    log::error!("virtio-mmio: {e}");
                    self.health.mark_broken();
                    return;
                }
            };
            let queue = match Queue::try_from(q.state()) {
                Ok(q) => q,
                Err(e) => {
                    log::warn!("virtio-mmio: queue {i}: {e}; device not started");
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
            interrupt: self.interrupt.clone(),
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

    fn reset(&mut self) {
        if self.active {
            self.device.reset();
            self.active = false;
        }
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
        self.interrupt.status.store(0, Ordering::Release);
        self.health.clear();
        self.config_generation = self.config_generation.wrapping_add(1);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            log::debug!(
                "virtio-mmio: {}-byte read at {offset:#x} ignored",
                data.len()
            );
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_OFFSET {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            self.config_generation = self.config_generation.wrapping_add(1);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            log::debug!(
                "virtio-mmio: {}-byte write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        if offset % 4 != 0 {
            return;
        }
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}
