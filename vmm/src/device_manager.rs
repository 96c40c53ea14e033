//! Places virtio-mmio devices: a 4 KiB window each after the boot timer in the 32-bit MMIO
//! hole, an interrupt line each, a KVM ioeventfd on QueueNotify for each queue (so queue
//! notifications go straight to the device thread) and an irqfd for the line. It also says
//! how the guest finds them: `virtio_mmio.device=` command-line entries and DSDT entries.

use std::sync::{Arc, Mutex};

use boot::layout;
use devices::bus::{Bus, SharedDevice};
use devices::virtio::activator::{Activator, DeferredActivation};
use devices::virtio::mmio::{MmioTransport, MMIO_WINDOW_SIZE, QUEUE_NOTIFY_OFFSET};
use devices::virtio::VirtioDevice;
use kvm_ioctls::IoEventAddress;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::vstate::vm::Vm;

/// Interrupt lines free for virtio-mmio devices: the IOAPIC's 24 pins less the legacy ones
/// (0 PIT, 1 keyboard, 2 cascade, 3/4 serial, 8 RTC).
const VIRTIO_IRQS: [u32; 17] = [
    5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
];
/// First device window, right after the boot timer.
const FIRST_WINDOW: u64 = layout::BOOT_TIMER_START + layout::BOOT_TIMER_SIZE;

/// Why a device could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum DeviceManagerError {
    /// All interrupt lines are taken.
    #[error("too many virtio-mmio devices: only {} interrupt lines are free", VIRTIO_IRQS.len())]
    OutOfIrqs,
    /// The transport could not be created.
    #[error("virtio-mmio transport: {0}")]
    Transport(#[from] devices::virtio::mmio::MmioError),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The step.
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// The window overlaps another device.
    #[error(transparent)]
    Bus(#[from] devices::bus::BusError),
}

/// One placed device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioSlot {
    /// Its window.
    pub base: u64,
    /// Its interrupt line (GSI).
    pub irq: u32,
    /// Its virtio type.
    pub device_type: u32,
}

/// The virtio-mmio devices of a machine.
#[derive(Default)]
pub struct MmioDeviceManager {
    slots: Vec<MmioSlot>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl MmioDeviceManager {
    /// No devices yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `device` on `bus` with its own window, interrupt and ioeventfds.
    pub fn add(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        bus: &mut Bus,
        device: Box<dyn VirtioDevice>,
        activator: &Arc<Activator>,
    ) -> Result<MmioSlot, DeviceManagerError> {
        let n = self.slots.len();
        let irq = *VIRTIO_IRQS.get(n).ok_or(DeviceManagerError::OutOfIrqs)?;
        let base = FIRST_WINDOW + n as u64 * MMIO_WINDOW_SIZE;
        let irq_evt = EventFd::new(EFD_NONBLOCK)?;
        vm.fd
            .register_irqfd(&irq_evt, irq)
            .map_err(|source| DeviceManagerError::Kvm {
                what: format!("KVM_IRQFD for GSI {irq}"),
                source,
            })?;
        let mut transport = MmioTransport::new(device, mem.clone(), irq_evt)?;
        transport.set_activator(activator.clone());
        let device_type = transport.device_type();
        for (i, evt) in transport.queue_events().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + QUEUE_NOTIFY_OFFSET);
            vm.fd
                .register_ioevent(evt, &addr, i as u32)
                .map_err(|source| DeviceManagerError::Kvm {
                    what: format!("KVM_IOEVENTFD for queue {i} at {base:#x}"),
                    source,
                })?;
        }
        let transport = Arc::new(Mutex::new(transport));
        let deferred: Arc<Mutex<dyn DeferredActivation>> = transport.clone();
        activator.register(Arc::downgrade(&deferred));
        bus.insert(transport.clone() as SharedDevice, base, MMIO_WINDOW_SIZE)?;
        let slot = MmioSlot {
            base,
            irq,
            device_type,
        };
        self.slots.push(slot);
        self.transports.push(transport);
        Ok(slot)
    }

    /// The placed devices, in order.
    pub fn slots(&self) -> &[MmioSlot] {
        &self.slots
    }

    /// The kernel command-line entries that describe the devices, as Linux's virtio_mmio
    /// parses them (`virtio_mmio.device=4K@0xc0001000:5`).
    pub fn cmdline_entries(&self) -> Vec<String> {
        self.slots
            .iter()
            .map(|s| {
                format!(
                    "virtio_mmio.device={}K@{:#x}:{}",
                    MMIO_WINDOW_SIZE / 1024,
                    s.base,
                    s.irq
                )
            })
            .collect()
    }

    /// The devices as the DSDT describes them.
    pub fn acpi_devices(&self) -> Vec<boot::acpi::VirtioMmioDevice> {
        self.slots
            .iter()
            .map(|s| boot::acpi::VirtioMmioDevice {
                base: s.base,
                size: MMIO_WINDOW_SIZE,
                irq: s.irq,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn irq_lines_avoid_the_legacy_devices() {
        for legacy in [0, 1, 2, 3, 4, 8] {
            assert!(!VIRTIO_IRQS.contains(&legacy));
        }
        assert!(VIRTIO_IRQS.iter().all(|&i| i < boot::acpi::IOAPIC_PINS));
        assert_eq!(FIRST_WINDOW, 0xc000_1000);
    }

    #[test]
    fn cmdline_entries_use_linux_syntax() {
        let mut m = MmioDeviceManager::new();
        m.slots.push(MmioSlot {
            base: 0xc000_1000,
            irq: 5,
            device_type: 4,
        });
        m.slots.push(MmioSlot {
            base: 0xc000_2000,
            irq: 6,
            device_type: 2,
        });
        assert_eq!(
            m.cmdline_entries(),
            [
                "virtio_mmio.device=4K@0xc0001000:5",
                "virtio_mmio.device=4K@0xc0002000:6"
            ]
        );
        assert_eq!(m.acpi_devices()[1].base, 0xc000_2000);
    }
}
