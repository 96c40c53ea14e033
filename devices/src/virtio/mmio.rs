//! The virtio-mmio transport, register layout version 2 (modern devices only): the guest's
//! driver negotiates features and sets up queues through these registers; at DRIVER_OK the
//! device is activated with its queues. Queue notifications are KVM ioeventfds on the
//! QueueNotify register (one per queue, matched on the queue index), so they never reach
//! this code; the interrupt is an irqfd, with the reason in InterruptStatus. The state
//! machine behind the registers is the one virtio-pci uses too ([`super::transport`]).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::activator::{Activator, DeferredActivation};
use super::transport::{QueueAddress, TransportCore, TransportError};
use super::{InterruptReason, VirtioDevice, VirtioInterrupt};
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
    core: TransportCore,
    interrupt: Arc<MmioInterrupt>,
}

/// Why a transport could not be created (the same reasons for either transport).
pub type MmioError = TransportError;

impl MmioTransport {
    /// Wraps `device`; `irq` is the eventfd registered as its interrupt line.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        irq: EventFd,
    ) -> Result<Self, MmioError> {
        Ok(Self {
            core: TransportCore::new("virtio-mmio", device, mem)?,
            interrupt: Arc::new(MmioInterrupt::new(irq)),
        })
    }

    /// The eventfds to register with KVM_IOEVENTFD at QueueNotify, datamatch = queue index.
    pub fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    /// The device's virtio type.
    pub fn device_type(&self) -> u32 {
        self.core.device_type()
    }

    /// Whether the device is active (DRIVER_OK and activated).
    pub fn is_active(&self) -> bool {
        self.core.is_active()
    }

    /// Leaves activation to `activator`'s thread instead of the vCPU that writes DRIVER_OK.
    pub fn set_activator(&mut self, activator: Arc<Activator>) {
        self.core.set_activator(activator);
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        let core = &self.core;
        match offset {
            0x00 => MAGIC,
            0x04 => VERSION,
            0x08 => core.device_type(),
            0x0c => VENDOR_ID,
            0x10 => core.device_features_word(),
            0x34 => core.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            0x44 => core.selected_queue().map_or(0, |q| u32::from(q.ready())),
            0x60 => self.interrupt.status.load(Ordering::Acquire),
            0x70 => core.status(),
            0xfc => core.config_generation(),
            _ => {
                log::debug!("virtio-mmio: read of unknown register {offset:#x}");
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        let core = &mut self.core;
        match offset {
            0x14 => core.set_device_features_select(v),
            0x20 => core.write_driver_features_word(v),
            0x24 => core.set_driver_features_select(v),
            0x30 => core.set_queue_select(v),
            0x38 => core.set_queue_size(v as u16),
            0x44 => core.set_queue_ready(v == 1),
            0x80 => core.set_queue_address(QueueAddress::Desc, Some(v), None),
            0x84 => core.set_queue_address(QueueAddress::Desc, None, Some(v)),
            0x90 => core.set_queue_address(QueueAddress::Avail, Some(v), None),
            0x94 => core.set_queue_address(QueueAddress::Avail, None, Some(v)),
            0xa0 => core.set_queue_address(QueueAddress::Used, Some(v), None),
            0xa4 => core.set_queue_address(QueueAddress::Used, None, Some(v)),
            // Normally caught by the ioeventfd; forward it if it ever gets here.
            QUEUE_NOTIFY_OFFSET => core.notify_queue(v),
            0x64 => {
                self.interrupt.status.fetch_and(!v, Ordering::AcqRel);
            }
            0x70 => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if core.write_status(v, &interrupt) {
                    self.interrupt.status.store(0, Ordering::Release);
                }
            }
            _ => log::debug!("virtio-mmio: write {v:#x} to unknown register {offset:#x}"),
        }
    }
}

impl DeferredActivation for MmioTransport {
    fn activate_pending(&mut self) {
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.core.activate_pending(&interrupt);
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_OFFSET {
            self.core.read_config(offset - CONFIG_OFFSET, data);
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
            self.core.write_config(offset - CONFIG_OFFSET, data);
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

#[cfg(test)]
mod tests {
    use vm_memory::GuestAddress;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::virtio::transport::fake::{FakeDevice, Slot, FAKE_FEATURE};
    use crate::virtio::{status, TYPE_RNG};

    fn transport(queues: usize) -> (MmioTransport, Slot, EventFd) {
        let (dev, given) = FakeDevice::new(TYPE_RNG, queues);
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let irq = EventFd::new(EFD_NONBLOCK).unwrap();
        let t = MmioTransport::new(Box::new(dev), mem, irq.try_clone().unwrap()).unwrap();
        (t, given, irq)
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    const ACK_DRIVER: u32 = status::ACKNOWLEDGE | status::DRIVER;
    const FEATURES_OK: u32 = ACK_DRIVER | status::FEATURES_OK;
    const DRIVER_OK: u32 = FEATURES_OK | status::DRIVER_OK;

    fn negotiate(t: &mut MmioTransport) {
        w(t, 0x70, ACK_DRIVER);
        w(t, 0x24, 0);
        w(t, 0x20, FAKE_FEATURE as u32);
        w(t, 0x24, 1);
        w(t, 0x20, 1);
        w(t, 0x70, FEATURES_OK);
    }

    fn setup_queue(t: &mut MmioTransport, q: u32, base: u32) {
        w(t, 0x30, q);
        w(t, 0x38, 16);
        for (reg, addr) in [(0x80, base), (0x90, base + 0x1000), (0xa0, base + 0x2000)] {
            w(t, reg, addr);
            w(t, reg + 4, 0);
        }
        w(t, 0x44, 1);
    }

    #[test]
    fn mmio_identity_and_feature_negotiation() {
        let (mut t, given, _) = transport(1);
        assert_eq!(r(&mut t, 0x00), MAGIC);
        assert_eq!(r(&mut t, 0x04), 2);
        assert_eq!(r(&mut t, 0x08), TYPE_RNG);
        w(&mut t, 0x14, 0);
        assert_eq!(r(&mut t, 0x10), FAKE_FEATURE as u32);
        w(&mut t, 0x14, 1);
        assert_eq!(r(&mut t, 0x10), 1, "VERSION_1");
        // Features before DRIVER are ignored; without VERSION_1 FEATURES_OK does not stick.
        w(&mut t, 0x20, 1);
        w(&mut t, 0x70, ACK_DRIVER);
        w(&mut t, 0x24, 0);
        w(&mut t, 0x20, FAKE_FEATURE as u32);
        w(&mut t, 0x70, FEATURES_OK);
        assert_eq!(r(&mut t, 0x70), ACK_DRIVER);
        negotiate(&mut t);
        assert_eq!(r(&mut t, 0x70), FEATURES_OK);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, 0x70, DRIVER_OK);
        assert!(t.is_active());
        assert_eq!(
            given.lock().unwrap().as_ref().unwrap().features,
            FAKE_FEATURE | 1 << 32
        );
    }

    #[test]
    fn mmio_queue_registers_freeze_once_ready_and_reset_starts_over() {
        let (mut t, given, _) = transport(2);
        w(&mut t, 0x30, 7);
        assert_eq!(r(&mut t, 0x34), 0, "no queue 7");
        w(&mut t, 0x44, 1);
        assert_eq!(r(&mut t, 0x44), 0);
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x34), 64);
        negotiate(&mut t);
        setup_queue(&mut t, 1, 0x20000);
        assert_eq!(r(&mut t, 0x44), 1);
        // Ready: its registers are frozen (it stays valid, so activation works).
        w(&mut t, 0x80, 0xdead_0000);
        w(&mut t, 0x44, 0);
        assert_eq!(r(&mut t, 0x44), 1);
        let gen = r(&mut t, 0xfc);
        w(&mut t, 0x70, DRIVER_OK);
        assert!(t.is_active());
        assert_eq!(given.lock().unwrap().as_ref().unwrap().queues, [1]);
        w(&mut t, 0x70, 0);
        assert!(!t.is_active());
        assert!(given.lock().unwrap().is_none());
        assert_eq!(r(&mut t, 0x70), 0);
        assert_ne!(r(&mut t, 0xfc), gen, "a reset moves the generation");
        w(&mut t, 0x30, 1);
        assert_eq!(r(&mut t, 0x44), 0);
    }

    #[test]
    fn with_an_activator_driver_ok_waits_for_the_loop_and_a_reset_cancels_it() {
        let activator = Activator::new().unwrap();
        let (t, given, _) = transport(1);
        let t = Arc::new(std::sync::Mutex::new(t));
        t.lock().unwrap().set_activator(activator.clone());
        let deferred: Arc<std::sync::Mutex<dyn DeferredActivation>> = t.clone();
        activator.register(Arc::downgrade(&deferred));
        let mut g = t.lock().unwrap();
        negotiate(&mut g);
        setup_queue(&mut g, 0, 0x10000);
        w(&mut g, 0x70, DRIVER_OK);
        // Recorded, not run: the vCPU thread that wrote it starts nothing.
        assert!(!g.is_active());
        assert!(given.lock().unwrap().is_none());
        assert_eq!(
            r(&mut g, 0x70),
            DRIVER_OK,
            "the status reads back as written"
        );
        assert_eq!(activator.event().read().unwrap(), 1, "the loop is woken");
        activator.event().write(1).unwrap();
        drop(g);
        activator.run_pending();
        assert!(t.lock().unwrap().is_active());
        assert!(given.lock().unwrap().is_some());
        // Once is enough: another run changes nothing.
        activator.run_pending();
        assert!(t.lock().unwrap().is_active());

        // A reset before the loop gets to it: no activation.
        let mut g = t.lock().unwrap();
        w(&mut g, 0x70, 0);
        assert!(given.lock().unwrap().is_none());
        negotiate(&mut g);
        setup_queue(&mut g, 0, 0x10000);
        w(&mut g, 0x70, DRIVER_OK);
        w(&mut g, 0x70, 0);
        drop(g);
        activator.run_pending();
        assert!(!t.lock().unwrap().is_active());
        assert!(given.lock().unwrap().is_none());
        // A transport that is gone is skipped.
        drop(deferred);
        drop(t);
        activator.run_pending();
    }

    #[test]
    fn mmio_interrupts_needs_reset_and_notify_fallback() {
        let (mut t, given, irq) = transport(1);
        negotiate(&mut t);
        setup_queue(&mut t, 0, 0x10000);
        w(&mut t, 0x70, DRIVER_OK);
        let g = given.lock().unwrap().take().unwrap();
        g.interrupt.trigger(InterruptReason::Queue(0)).unwrap();
        g.interrupt.trigger(InterruptReason::Config).unwrap();
        assert_eq!(irq.read().unwrap(), 2);
        assert_eq!(r(&mut t, 0x60), 3);
        w(&mut t, 0x64, 1);
        assert_eq!(r(&mut t, 0x60), 2);
        g.health.mark_broken();
        assert_eq!(r(&mut t, 0x70), DRIVER_OK | status::DEVICE_NEEDS_RESET);
        // A notification that reaches the register instead of the ioeventfd.
        w(&mut t, QUEUE_NOTIFY_OFFSET, 0);
        assert_eq!(t.queue_events()[0].read().unwrap(), 1);
        w(&mut t, QUEUE_NOTIFY_OFFSET, 9);
        w(&mut t, 0x70, 0);
        assert_eq!(r(&mut t, 0x60), 0);
        assert_eq!(r(&mut t, 0x70), 0);
    }

    #[test]
    fn mmio_hostile_accesses_are_harmless() {
        let (mut t, _, _) = transport(1);
        // DRIVER_OK without FEATURES_OK.
        w(&mut t, 0x70, ACK_DRIVER | status::DRIVER_OK);
        assert!(!t.is_active());
        assert_ne!(r(&mut t, 0x70) & status::DEVICE_NEEDS_RESET, 0);
        w(&mut t, 0x70, 0);
        for len in [1usize, 2, 3, 4, 8] {
            for off in 0..0x120u64 {
                let mut d = vec![0u8; len];
                t.read(off, &mut d);
                if off < CONFIG_OFFSET && (len != 4 || off % 4 != 0) {
                    assert!(d.iter().all(|&b| b == 0), "{len} bytes at {off:#x}");
                }
                if off != 0x70 {
                    t.write(off, &vec![0xff; len]);
                }
            }
        }
        assert_eq!(r(&mut t, 0x00), MAGIC);
        w(&mut t, 0x70, 0);
        negotiate(&mut t);
        w(&mut t, 0x30, 0);
        w(&mut t, 0x38, 3);
        assert_eq!(r(&mut t, 0x34), 64, "max size is read-only");
    }
}
