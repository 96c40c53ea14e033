//! The virtio-pci transport, modern only (virtio 1.2, 4.1): a PCI function 1af4:(1040 + type)
//! whose one 64-bit memory BAR (BAR 0, not prefetchable, allocated below 4 GiB) holds every
//! structure the vendor capabilities point at:
//!
//! | BAR 0 offset | what |
//! |---|---|
//! | 0x0000 | common configuration (features, status, queue set-up, MSI-X vectors) |
//! | 0x1000 | ISR status (a read clears it) |
//! | 0x2000 | the device's configuration space |
//! | 0x3000 | notifications: queue `i` at `0x3000 + 4 * i`, a KVM ioeventfd each |
//! | 0x4000 | the MSI-X table (a vector per queue, one for configuration), then the PBA |
//!
//! plus the VIRTIO_PCI_CAP_PCI_CFG window, which reaches BAR 0 through configuration space.
//! The state machine (features, queues, status, activation, reset, DEVICE_NEEDS_RESET) is the
//! one virtio-mmio uses ([`super::transport`]); the device does not know which transport
//! carries it.
//!
//! Interrupts: with MSI-X enabled, a queue's or the configuration's vector is an eventfd the
//! VMM registered with KVM_IRQFD on a GSI it gave us; its route follows the table entry
//! ([`crate::pci::msix`]). Otherwise INTx: the ISR bits and a level-triggered irqfd with a
//! resample eventfd ([`VirtioPciInterrupt::resample_intx`]).

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use virtio_queue::QueueT;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::activator::{Activator, DeferredActivation};
use super::transport::{QueueAddress, TransportCore, TransportError};
use super::{
    InterruptReason, VirtioDevice, VirtioInterrupt, TYPE_BLOCK, TYPE_NET, TYPE_RNG, TYPE_VSOCK,
};
use crate::pci::config::{self, command, BarKind, BarSpec, BarWindow, ConfigSpace, PciIds};
use crate::pci::msix::{Msix, MsixDelivery, MsixVector};
use crate::pci::{PciDevice, PciError, PciHost};

/// PCI vendor ID of virtio devices (Red Hat, Inc.).
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Device ID of a modern virtio device: this plus its virtio type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// Subsystem ID of a modern device: this plus its virtio type (0x40 or more, as 4.1.2.1 asks).
pub const VIRTIO_PCI_SUBSYSTEM_ID_BASE: u16 = 0x40;
/// A vector field that names no vector.
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;
/// The BAR that holds everything.
pub const VIRTIO_BAR: usize = 0;
/// Offset of the common configuration structure in BAR 0.
pub const COMMON_CFG_OFFSET: u64 = 0x0000;
/// Offset of the ISR status byte in BAR 0.
pub const ISR_OFFSET: u64 = 0x1000;
/// Offset of the device configuration space in BAR 0.
pub const DEVICE_CFG_OFFSET: u64 = 0x2000;
/// Offset of the notification region in BAR 0.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' notification addresses.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
/// Offset of the MSI-X table in BAR 0; the PBA follows it, page-aligned.
pub const MSIX_TABLE_OFFSET: u64 = 0x4000;
/// Size of each of the first four regions.
const REGION_SIZE: u64 = 0x1000;
/// The most queues the notification region holds.
pub const MAX_QUEUES: usize = (REGION_SIZE / NOTIFY_OFF_MULTIPLIER as u64) as usize;

/// Vendor capability ID.
const CAP_VENDOR: u8 = 0x09;
/// virtio_pci_cap.cfg_type values.
const CAP_COMMON_CFG: u8 = 1;
const CAP_NOTIFY_CFG: u8 = 2;
const CAP_ISR_CFG: u8 = 3;
const CAP_DEVICE_CFG: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// Offsets inside a virtio_pci_cap.
const CAP_BAR: usize = 4;
const CAP_OFFSET: usize = 8;
const CAP_LENGTH: usize = 12;
/// Offset of pci_cfg_data inside the PCI_CFG capability.
const CAP_PCI_CFG_DATA: usize = 16;

/// ISR bits.
const ISR_QUEUE: u8 = 1;
const ISR_CONFIG: u8 = 2;

/// Why a virtio-pci device could not be created.
#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    /// The queues or their eventfds.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// An interrupt eventfd.
    #[error("cannot create an interrupt eventfd: {0}")]
    EventFd(#[from] std::io::Error),
    /// More queues than the notification region and the MSI-X table hold.
    #[error("{0} queues: virtio-pci here takes at most {MAX_QUEUES}")]
    TooManyQueues(usize),
    /// The MSI-X GSIs run past u32.
    #[error("MSI-X GSIs from {0} overflow")]
    GsiOverflow(u32),
    /// The configuration space.
    #[error("configuration space: {0}")]
    Pci(#[from] PciError),
}

/// The interrupts the VMM gives a virtio-pci device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VirtioPciIrqs {
    /// The first of the [`msix_vectors_for`] consecutive GSIs (from `layout::MSI_GSI_START`),
    /// one per MSI-X vector in table order.
    pub msix_gsi_base: u32,
    /// The IOAPIC pin (GSI) INTA is wired to; the interrupt line register says it, and the
    /// DSDT's `_PRT` must say the same for the device's slot.
    pub intx_gsi: u8,
}

/// How many MSI-X vectors (and so GSIs) a virtio-pci device for `device` needs: one per queue
/// and one for configuration changes.
pub fn msix_vectors_for(device: &dyn VirtioDevice) -> u32 {
    device.queue_max_sizes().len() as u32 + 1
}

/// The class code a device type shows: (class, subclass, prog-if), as QEMU's virtio-pci
/// devices do.
fn class_code(device_type: u32) -> (u8, u8, u8) {
    match device_type {
        TYPE_NET => (0x02, 0x00, 0x00),   // network controller, Ethernet
        TYPE_BLOCK => (0x01, 0x00, 0x00), // mass storage, SCSI
        TYPE_VSOCK => (0x07, 0x80, 0x00), // communication controller, other
        TYPE_RNG => (0x00, 0xff, 0x00),   // QEMU's PCI_CLASS_OTHERS: class 00, subclass ff
        _ => (0x00, 0xff, 0x00),
    }
}

/// The interrupt a virtio-pci device raises: an MSI-X vector when MSI-X is enabled, INTx
/// (ISR bit + level-triggered irqfd) otherwise. Shared by the transport (the guest's register
/// accesses), the device's worker (which raises it) and the VMM (which handles INTx
/// resampling on its event loop).
pub struct VirtioPciInterrupt {
    msix: Msix,
    isr: AtomicU8,
    intx: EventFd,
    intx_resample: EventFd,
    intx_disabled: AtomicBool,
    config_vector: AtomicU16,
    queue_vectors: Vec<AtomicU16>,
}

impl VirtioPciInterrupt {
    /// The eventfd to register with KVM_IRQFD on the INTx GSI, with
    /// [`intx_resample_event`](Self::intx_resample_event) as its resample eventfd
    /// (KVM_IRQFD_FLAG_RESAMPLE: a level-triggered line KVM lowers at the guest's EOI).
    pub fn intx_event(&self) -> &EventFd {
        &self.intx
    }

    /// The resample eventfd: KVM writes it when the guest has acknowledged INTx. The VMM
    /// watches it and calls [`resample_intx`](Self::resample_intx).
    pub fn intx_resample_event(&self) -> &EventFd {
        &self.intx_resample
    }

    /// After the guest's EOI: reads the resample eventfd and raises INTx again if the ISR
    /// still holds a reason (an interrupt raised after the guest read the ISR, or never
    /// read).
    pub fn resample_intx(&self) {
        let _ = self.intx_resample.read();
        if self.intx_wanted() {
            self.assert_intx();
        }
    }

    /// The ISR status, without clearing it.
    pub fn isr(&self) -> u8 {
        self.isr.load(Ordering::Acquire)
    }

    fn intx_wanted(&self) -> bool {
        self.isr() != 0 && !self.intx_disabled.load(Ordering::Acquire) && !self.msix.enabled()
    }

    fn assert_intx(&self) {
        if let Err(e) = self.intx.write(1) {
            log::error!("virtio-pci: cannot raise INTx: {e}");
        }
    }

    fn vector_of(&self, reason: InterruptReason) -> u16 {
        match reason {
            InterruptReason::Queue(i) => self
                .queue_vectors
                .get(usize::from(i))
                .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire)),
            InterruptReason::Config => self.config_vector.load(Ordering::Acquire),
        }
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::Release);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        for v in &self.queue_vectors {
            v.store(VIRTIO_MSI_NO_VECTOR, Ordering::Release);
        }
    }
}

impl VirtioInterrupt for VirtioPciInterrupt {
    fn trigger(&self, reason: InterruptReason) -> std::io::Result<()> {
        let vector = self.vector_of(reason);
        let delivery = if vector == VIRTIO_MSI_NO_VECTOR {
            if self.msix.enabled() {
                // 4.1.5: with MSI-X enabled, an event without a vector interrupts nobody.
                return Ok(());
            }
            MsixDelivery::Disabled
        } else {
            self.msix.trigger(vector)
        };
        match delivery {
            MsixDelivery::Sent | MsixDelivery::Pending | MsixDelivery::NoVector => Ok(()),
            MsixDelivery::Disabled => {
                let bit = match reason {
                    InterruptReason::Queue(_) => ISR_QUEUE,
                    InterruptReason::Config => ISR_CONFIG,
                };
                self.isr.fetch_or(bit, Ordering::AcqRel);
                if !self.intx_disabled.load(Ordering::Acquire) {
                    self.intx.write(1)?;
                }
                Ok(())
            }
        }
    }
}

/// Where each region of BAR 0 is.
#[derive(Debug, Clone, Copy)]
struct Layout {
    msix_table: u64,
    msix_pba: u64,
    pba_end: u64,
    bar_size: u64,
}

/// What a BAR 0 offset falls in.
enum Region {
    Common(u64),
    Isr(u64),
    Device(u64),
    Notify(u64),
    MsixTable(u64),
    MsixPba(u64),
}

/// A virtio device on the PCI bus; see the module documentation.
pub struct VirtioPciDevice {
    core: TransportCore,
    config: ConfigSpace,
    interrupt: Arc<VirtioPciInterrupt>,
    host: Arc<dyn PciHost>,
    layout: Layout,
    msix_cap: usize,
    pci_cfg_cap: usize,
    /// Where BAR 0 decodes, and which queues have their ioeventfd registered there.
    bar0: Option<u64>,
    ioevents: Vec<bool>,
}

impl VirtioPciDevice {
    /// Wraps `device`. `host` registers the notification ioeventfds (when BAR 0 is placed)
    /// and sets MSI routes; `irqs` are the GSIs the VMM wires the interrupts to.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemoryMmap,
        host: Arc<dyn PciHost>,
        irqs: VirtioPciIrqs,
    ) -> Result<Self, VirtioPciError> {
        let core = TransportCore::new("virtio-pci", device, mem)?;
        let queues = core.num_queues();
        if queues > MAX_QUEUES {
            return Err(VirtioPciError::TooManyQueues(queues));
        }
        let mut vectors = Vec::with_capacity(queues + 1);
        for i in 0..=queues as u32 {
            let gsi = irqs
                .msix_gsi_base
                .checked_add(i)
                .ok_or(VirtioPciError::GsiOverflow(irqs.msix_gsi_base))?;
            vectors.push(MsixVector {
                gsi,
                event: EventFd::new(EFD_NONBLOCK)?,
            });
        }
        let msix = Msix::new(host.clone(), vectors);
        let msix_pba = MSIX_TABLE_OFFSET + msix.table_size().next_multiple_of(REGION_SIZE);
        let pba_end = msix_pba + msix.pba_size().next_multiple_of(REGION_SIZE);
        let layout = Layout {
            msix_table: MSIX_TABLE_OFFSET,
            msix_pba,
            pba_end,
            bar_size: pba_end.next_power_of_two(),
        };

        let device_type = core.device_type();
        let (class, subclass, prog_if) = class_code(device_type);
        let type16 = u16::try_from(device_type).unwrap_or(u16::MAX);
        let ids = PciIds {
            vendor: VIRTIO_PCI_VENDOR_ID,
            device: VIRTIO_PCI_DEVICE_ID_BASE.saturating_add(type16),
            revision: 1,
            class,
            subclass,
            prog_if,
            subsystem_vendor: VIRTIO_PCI_VENDOR_ID,
            subsystem: VIRTIO_PCI_SUBSYSTEM_ID_BASE.saturating_add(type16),
        };
        let mut config = ConfigSpace::new(ids, 1);
        config.set_u8(config::INTERRUPT_LINE, irqs.intx_gsi);
        config.add_bar(
            VIRTIO_BAR,
            BarSpec {
                kind: BarKind::Memory64,
                size: layout.bar_size,
                prefetchable: false,
                window: BarWindow::Mmio32,
            },
        )?;
        let region =
            |cfg_type, offset: u64, length: u64| virtio_cap(cfg_type, offset as u32, length as u32);
        config.add_capability(&region(CAP_COMMON_CFG, COMMON_CFG_OFFSET, REGION_SIZE), &[])?;
        let mut notify = region(CAP_NOTIFY_CFG, NOTIFY_OFFSET, REGION_SIZE).to_vec();
        notify.extend_from_slice(&NOTIFY_OFF_MULTIPLIER.to_le_bytes());
        notify[2] = notify.len() as u8;
        config.add_capability(&notify, &[])?;
        config.add_capability(&region(CAP_ISR_CFG, ISR_OFFSET, REGION_SIZE), &[])?;
        config.add_capability(&region(CAP_DEVICE_CFG, DEVICE_CFG_OFFSET, REGION_SIZE), &[])?;
        let mut pci_cfg = region(CAP_PCI_CFG, 0, 0).to_vec();
        pci_cfg.extend_from_slice(&[0; 4]);
        pci_cfg[2] = pci_cfg.len() as u8;
        let mut pci_cfg_mask = vec![0u8; pci_cfg.len()];
        pci_cfg_mask[CAP_BAR] = 0xff;
        pci_cfg_mask[CAP_OFFSET..].fill(0xff);
        let pci_cfg_cap = config.add_capability(&pci_cfg, &pci_cfg_mask)?;
        let (body, mask) = msix.capability(
            VIRTIO_BAR as u8,
            layout.msix_table as u32,
            layout.msix_pba as u32,
        );
        let msix_cap = config.add_capability(&body, &mask)?;

        let interrupt = Arc::new(VirtioPciInterrupt {
            msix,
            isr: AtomicU8::new(0),
            intx: EventFd::new(EFD_NONBLOCK)?,
            intx_resample: EventFd::new(EFD_NONBLOCK)?,
            intx_disabled: AtomicBool::new(false),
            config_vector: AtomicU16::new(VIRTIO_MSI_NO_VECTOR),
            queue_vectors: (0..queues)
                .map(|_| AtomicU16::new(VIRTIO_MSI_NO_VECTOR))
                .collect(),
        });
        Ok(Self {
            core,
            config,
            interrupt,
            host,
            layout,
            msix_cap,
            pci_cfg_cap,
            bar0: None,
            ioevents: vec![false; queues],
        })
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

    /// The interrupt, for the VMM: INTx eventfds and resampling.
    pub fn interrupt(&self) -> Arc<VirtioPciInterrupt> {
        self.interrupt.clone()
    }

    /// The MSI-X vectors in table order: register each `event` with KVM_IRQFD on its `gsi`.
    pub fn msix_vectors(&self) -> &[MsixVector] {
        self.interrupt.msix.vectors()
    }

    /// The queues' notification eventfds (registered through [`PciHost`] at
    /// `BAR 0 + NOTIFY_OFFSET + 4 * queue` whenever BAR 0 is placed; the VMM does nothing with
    /// them).
    pub fn queue_events(&self) -> &[EventFd] {
        self.core.queue_events()
    }

    /// Where BAR 0 decodes now.
    pub fn bar0(&self) -> Option<u64> {
        self.bar0
    }

    /// Size of BAR 0.
    pub fn bar0_size(&self) -> u64 {
        self.layout.bar_size
    }

    fn region(&self, offset: u64, len: usize) -> Option<Region> {
        let end = offset.checked_add(len as u64)?;
        let within = |start: u64, size: u64| offset >= start && end <= start + size;
        let l = &self.layout;
        if within(COMMON_CFG_OFFSET, REGION_SIZE) {
            Some(Region::Common(offset - COMMON_CFG_OFFSET))
        } else if within(ISR_OFFSET, REGION_SIZE) {
            Some(Region::Isr(offset - ISR_OFFSET))
        } else if within(DEVICE_CFG_OFFSET, REGION_SIZE) {
            Some(Region::Device(offset - DEVICE_CFG_OFFSET))
        } else if within(NOTIFY_OFFSET, REGION_SIZE) {
            Some(Region::Notify(offset - NOTIFY_OFFSET))
        } else if within(l.msix_table, l.msix_pba - l.msix_table) {
            Some(Region::MsixTable(offset - l.msix_table))
        } else if within(l.msix_pba, l.pba_end - l.msix_pba) {
            Some(Region::MsixPba(offset - l.msix_pba))
        } else {
            None
        }
    }

    fn bar0_read(&mut self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        match self.region(offset, data.len()) {
            Some(Region::Common(o)) => self.read_common(o, data),
            Some(Region::Isr(0)) => {
                // Reading the ISR acknowledges it; KVM lowers INTx at the guest's EOI.
                if let Some(b) = data.first_mut() {
                    *b = self.interrupt.isr.swap(0, Ordering::AcqRel);
                }
            }
            Some(Region::Device(o)) => self.core.read_config(o, data),
            Some(Region::MsixTable(o)) => self.interrupt.msix.read_table(o, data),
            Some(Region::MsixPba(o)) => self.interrupt.msix.read_pba(o, data),
            Some(Region::Isr(_)) | Some(Region::Notify(_)) | None => {}
        }
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        match self.region(offset, data.len()) {
            Some(Region::Common(o)) => self.write_common(o, data),
            Some(Region::Device(o)) => self.core.write_config(o, data),
            Some(Region::Notify(o)) => {
                // Normally caught by the ioeventfd; forward it if it ever gets here.
                if o % u64::from(NOTIFY_OFF_MULTIPLIER) == 0 {
                    self.core
                        .notify_queue((o / u64::from(NOTIFY_OFF_MULTIPLIER)) as u32);
                }
            }
            Some(Region::MsixTable(o)) => self.interrupt.msix.write_table(o, data),
            Some(Region::MsixPba(o)) => self.interrupt.msix.write_pba(o, data),
            Some(Region::Isr(_)) | None => log::debug!(
                "virtio-pci: {}-byte write at BAR 0 offset {offset:#x} ignored",
                data.len()
            ),
        }
    }

    /// The common configuration field an access at `offset` of `len` bytes names: (field
    /// start, field width). Each field must be accessed whole, except that 64-bit fields may
    /// be accessed a 32-bit half at a time (4.1.3.1).
    fn common_field(offset: u64, len: usize) -> Option<(u64, usize)> {
        const FIELDS: [(u64, usize); 18] = [
            (0x00, 4), // device_feature_select
            (0x04, 4), // device_feature
            (0x08, 4), // driver_feature_select
            (0x0c, 4), // driver_feature
            (0x10, 2), // config_msix_vector
            (0x12, 2), // num_queues
            (0x14, 1), // device_status
            (0x15, 1), // config_generation
            (0x16, 2), // queue_select
            (0x18, 2), // queue_size
            (0x1a, 2), // queue_msix_vector
            (0x1c, 2), // queue_enable
            (0x1e, 2), // queue_notify_off
            (0x20, 8), // queue_desc
            (0x28, 8), // queue_driver
            (0x30, 8), // queue_device
            (0x38, 2), // queue_notify_data
            (0x3a, 2), // queue_reset
        ];
        let &(start, width) = FIELDS
            .iter()
            .find(|&&(s, w)| offset >= s && offset < s + w as u64)?;
        let whole = offset == start && len == width;
        let half = width == 8 && len == 4 && (offset - start) % 4 == 0;
        (whole || half).then_some((start, width))
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let Some((start, _)) = Self::common_field(offset, data.len()) else {
            log::debug!(
                "virtio-pci: {}-byte common configuration read at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let core = &self.core;
        let q = core.selected_queue();
        let v: u64 = match start {
            0x00 => core.device_features_select().into(),
            0x04 => core.device_features_word().into(),
            0x08 => core.driver_features_select().into(),
            0x0c => core.driver_features_word().into(),
            0x10 => self.interrupt.config_vector.load(Ordering::Acquire).into(),
            0x12 => core.num_queues() as u64,
            0x14 => (core.status() & 0xff).into(),
            0x15 => (core.config_generation() & 0xff).into(),
            0x16 => (core.queue_select() & 0xffff).into(),
            0x18 => q.map_or(0, |q| q.size()).into(),
            0x1a => core
                .selected_index()
                .and_then(|i| self.interrupt.queue_vectors.get(i))
                .map_or(VIRTIO_MSI_NO_VECTOR, |v| v.load(Ordering::Acquire))
                .into(),
            0x1c => q.map_or(0, |q| u64::from(q.ready())),
            // Queue i notifies at i * multiplier: queue_notify_off is the index.
            0x1e => core.selected_index().map_or(0, |i| i as u64),
            0x20 => core.queue_address(QueueAddress::Desc),
            0x28 => core.queue_address(QueueAddress::Avail),
            0x30 => core.queue_address(QueueAddress::Used),
            _ => 0,
        };
        let shift = 8 * (offset - start);
        let bytes = (v >> shift).to_le_bytes();
        data.copy_from_slice(&bytes[..data.len()]);
    }

    /// A vector number the driver wrote, as the device keeps it: one that names no vector of
    /// ours reads back as NO_VECTOR (4.1.5.1.2: the mapping failed).
    fn checked_vector(&self, v: u16) -> u16 {
        if v == VIRTIO_MSI_NO_VECTOR || usize::from(v) < self.interrupt.msix.vectors().len() {
            v
        } else {
            log::warn!("virtio-pci: MSI-X vector {v} does not exist; mapped to none");
            VIRTIO_MSI_NO_VECTOR
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let Some((start, width)) = Self::common_field(offset, data.len()) else {
            log::debug!(
                "virtio-pci: {}-byte common configuration write at {offset:#x} ignored",
                data.len()
            );
            return;
        };
        let mut b = [0u8; 8];
        b[..data.len()].copy_from_slice(data);
        let v = u64::from_le_bytes(b);
        let (low, high) = if width == 8 && data.len() == 4 {
            if offset == start {
                (Some(v as u32), None)
            } else {
                (None, Some(v as u32))
            }
        } else {
            (Some(v as u32), Some((v >> 32) as u32))
        };
        let core = &mut self.core;
        match start {
            0x00 => core.set_device_features_select(v as u32),
            0x08 => core.set_driver_features_select(v as u32),
            0x0c => core.write_driver_features_word(v as u32),
            0x10 => {
                let vector = self.checked_vector(v as u16);
                self.interrupt
                    .config_vector
                    .store(vector, Ordering::Release);
            }
            0x14 => {
                let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
                if core.write_status(v as u32, &interrupt) {
                    self.interrupt.reset();
                }
            }
            0x16 => core.set_queue_select(v as u32),
            0x18 => core.set_queue_size(v as u16),
            0x1a => match core.selected_index().filter(|_| core.queue_writable()) {
                Some(i) => {
                    let vector = self.checked_vector(v as u16);
                    self.interrupt.queue_vectors[i].store(vector, Ordering::Release);
                }
                None => log::warn!(
                    "virtio-pci: MSI-X vector of queue {} written while the queue is live or \
                     absent",
                    core.queue_select()
                ),
            },
            0x1c => {
                if v == 1 {
                    core.set_queue_ready(true);
                } else {
                    log::warn!("virtio-pci: queue_enable written with {v}; only 1 is allowed");
                }
            }
            0x20 => core.set_queue_address(QueueAddress::Desc, low, high),
            0x28 => core.set_queue_address(QueueAddress::Avail, low, high),
            0x30 => core.set_queue_address(QueueAddress::Used, low, high),
            // queue_reset: VIRTIO_F_RING_RESET is not offered.
            _ => log::debug!("virtio-pci: write {v:#x} to read-only common field {start:#x}"),
        }
    }

    /// The PCI_CFG window's BAR access, if the capability names a valid one: (offset, length).
    fn pci_cfg_window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.u8_at(cap + CAP_BAR);
        let offset = u64::from(self.config.u32_at(cap + CAP_OFFSET));
        let len = self.config.u32_at(cap + CAP_LENGTH) as usize;
        let ok = usize::from(bar) == VIRTIO_BAR
            && matches!(len, 1 | 2 | 4)
            && offset % len as u64 == 0
            && offset + len as u64 <= self.layout.bar_size;
        if !ok {
            log::debug!("virtio-pci: PCI_CFG window (BAR {bar}, {offset:#x}, {len} bytes) ignored");
        }
        ok.then_some((offset, len))
    }
}

/// A virtio_pci_cap (16 bytes) for a structure of `cfg_type` at `offset` of BAR 0.
fn virtio_cap(cfg_type: u8, offset: u32, length: u32) -> [u8; 16] {
    let mut c = [0u8; 16];
    c[0] = CAP_VENDOR;
    c[2] = 16;
    c[3] = cfg_type;
    c[CAP_BAR] = VIRTIO_BAR as u8;
    c[CAP_OFFSET..CAP_OFFSET + 4].copy_from_slice(&offset.to_le_bytes());
    c[CAP_LENGTH..CAP_LENGTH + 4].copy_from_slice(&length.to_le_bytes());
    c
}

/// Whether `[offset, offset + len)` and `[start, start + size)` share a byte.
fn overlaps(offset: usize, len: usize, start: usize, size: usize) -> bool {
    offset < start + size && start < offset.saturating_add(len)
}

impl DeferredActivation for VirtioPciDevice {
    fn activate_pending(&mut self) {
        let interrupt: Arc<dyn VirtioInterrupt> = self.interrupt.clone();
        self.core.activate_pending(&interrupt);
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.config
    }

    fn read_config(&mut self, offset: usize, data: &mut [u8]) {
        let data_field = self.pci_cfg_cap + CAP_PCI_CFG_DATA;
        if overlaps(offset, data.len(), data_field, 4) {
            if let Some((o, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.bar0_read(o, &mut buf[..len]);
                self.config.set_bytes(data_field, &buf[..len]);
            }
        }
        if overlaps(offset, data.len(), config::STATUS, 2) {
            let mut s = self.config.u16_at(config::STATUS) & !config::status::INTERRUPT;
            if self.interrupt.intx_wanted() {
                s |= config::status::INTERRUPT;
            }
            self.config.set_u16(config::STATUS, s);
        }
        self.config.read(offset, data);
    }

    fn write_config(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        let len = data.len();
        if overlaps(offset, len, config::COMMAND, 2) {
            let disabled = self.config.command() & command::INTX_DISABLE != 0;
            let was = self
                .interrupt
                .intx_disabled
                .swap(disabled, Ordering::AcqRel);
            if was && !disabled && self.interrupt.intx_wanted() {
                self.interrupt.assert_intx();
            }
        }
        if overlaps(offset, len, self.msix_cap + 2, 2) {
            let control = self.config.u16_at(self.msix_cap + 2);
            self.interrupt.msix.set_control(control);
        }
        let data_field = self.pci_cfg_cap + CAP_PCI_CFG_DATA;
        if overlaps(offset, len, data_field, 4) {
            if let Some((o, len)) = self.pci_cfg_window() {
                let mut buf = [0u8; 4];
                self.config.read(data_field, &mut buf);
                self.bar0_write(o, &buf[..len]);
            }
        }
    }

    fn read_bar(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == VIRTIO_BAR {
            self.bar0_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }

    fn write_bar(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == VIRTIO_BAR {
            self.bar0_write(offset, data);
        }
    }

    fn bar_moved(&mut self, bar: usize, old: Option<u64>, new: Option<u64>) {
        if bar != VIRTIO_BAR {
            return;
        }
        let notify_addr = |base: u64, i: usize| {
            base + NOTIFY_OFFSET + i as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
        };
        if old != self.bar0 {
            log::debug!(
                "virtio-pci: BAR 0 moves from {old:x?}, but was at {:x?}",
                self.bar0
            );
        }
        if let Some(base) = self.bar0 {
            for (i, evt) in self.core.queue_events().iter().enumerate() {
                if !std::mem::take(&mut self.ioevents[i]) {
                    continue;
                }
                if let Err(e) = self.host.unregister_ioevent(evt, notify_addr(base, i)) {
                    log::error!("virtio-pci: cannot remove the ioeventfd of queue {i}: {e}");
                }
            }
        }
        if let Some(base) = new {
            for (i, evt) in self.core.queue_events().iter().enumerate() {
                match self.host.register_ioevent(evt, notify_addr(base, i)) {
                    Ok(()) => self.ioevents[i] = true,
                    // Notifications still work, through a vCPU exit and `bar0_write`.
                    Err(e) => log::error!(
                        "virtio-pci: cannot register the ioeventfd of queue {i} at {:#x}: {e}",
                        notify_addr(base, i)
                    ),
                }
            }
        }
        self.bar0 = new;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::bus::BusDevice;
    use crate::pci::msix::{MSIX_ENABLE, MSIX_FUNCTION_MASK};
    use crate::pci::root::{PciEcam, PciMmioWindow, PciRoot, PciWindows};
    use crate::pci::testing::{HostEvent, RecordingHost};
    use crate::pci::MsiMessage;
    use crate::virtio::rng::Rng;
    use crate::virtio::status;
    use crate::virtio::test_driver::RingDriver;
    use crate::virtio::transport::fake::{FakeDevice, Slot, FAKE_FEATURE};

    const BAR: u64 = 0xd000_0000;
    const GSI: u32 = 24;
    const INTX: u8 = 10;
    const ACK_DRIVER: u64 = (status::ACKNOWLEDGE | status::DRIVER) as u64;
    const FEATURES_OK: u64 = ACK_DRIVER | status::FEATURES_OK as u64;
    const DRIVER_OK: u64 = FEATURES_OK | status::DRIVER_OK as u64;
    const PBA: u64 = 0x5000;

    struct Guest {
        dev: VirtioPciDevice,
        host: Arc<RecordingHost>,
        mem: GuestMemoryMmap,
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    /// `device` on virtio-pci with BAR 0 placed at [`BAR`] and memory decode on.
    fn guest(device: Box<dyn VirtioDevice>) -> Guest {
        let host = Arc::new(RecordingHost::new());
        let mem = memory();
        let irqs = VirtioPciIrqs {
            msix_gsi_base: GSI,
            intx_gsi: INTX,
        };
        let mut dev = VirtioPciDevice::new(device, mem.clone(), host.clone(), irqs).unwrap();
        dev.config_mut().set_bar_address(0, BAR);
        dev.bar_moved(0, None, Some(BAR));
        let mut g = Guest { dev, host, mem };
        g.cfg_w(
            config::COMMAND,
            2,
            u32::from(command::MEMORY_SPACE | command::BUS_MASTER),
        );
        g
    }

    fn fake(kind: u32, queues: usize) -> (Guest, Slot) {
        let (dev, given) = FakeDevice::new(kind, queues);
        (guest(Box::new(dev)), given)
    }

    fn fired(e: &EventFd) -> bool {
        e.read().is_ok()
    }

    fn wait_until(mut f: impl FnMut() -> bool) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        false
    }

    impl Guest {
        fn r(&mut self, off: u64, len: usize) -> u64 {
            let mut b = [0u8; 8];
            self.dev.read_bar(0, off, &mut b[..len]);
            u64::from_le_bytes(b)
        }

        fn w(&mut self, off: u64, len: usize, v: u64) {
            self.dev.write_bar(0, off, &v.to_le_bytes()[..len]);
        }

        fn cfg_r(&mut self, off: usize, len: usize) -> u32 {
            let mut b = [0u8; 4];
            self.dev.read_config(off, &mut b[..len]);
            u32::from_le_bytes(b)
        }

        fn cfg_w(&mut self, off: usize, len: usize, v: u32) {
            self.dev.write_config(off, &v.to_le_bytes()[..len]);
        }

        /// The vendor capability of `cfg_type`, found as a driver finds it.
        fn cap(&mut self, cfg_type: u8) -> usize {
            self.dev
                .config()
                .capabilities()
                .into_iter()
                .find(|&(o, id)| id == CAP_VENDOR && self.dev.config().u8_at(o + 3) == cfg_type)
                .map(|(o, _)| o)
                .unwrap()
        }

        fn msix_cap(&self) -> usize {
            self.dev
                .config()
                .capabilities()
                .into_iter()
                .find(|&(_, id)| id == 0x11)
                .unwrap()
                .0
        }

        fn msix_control(&mut self, control: u16) {
            let c = self.msix_cap();
            self.cfg_w(c + 2, 2, u32::from(control));
        }

        /// Programs vector `v` (address 0xfee0_0000 + v << 12, data 0x30 + v), masked or not.
        fn vector(&mut self, v: u64, masked: bool) {
            let e = MSIX_TABLE_OFFSET + 16 * v;
            self.w(e, 8, 0xfee0_0000 | v << 12);
            self.w(e + 8, 4, 0x30 + v);
            self.w(e + 12, 4, u64::from(masked));
        }

        fn pba(&mut self) -> u64 {
            self.r(PBA, 8)
        }

        fn status(&mut self) -> u64 {
            self.r(0x14, 1)
        }

        fn set_status(&mut self, s: u64) {
            self.w(0x14, 1, s);
        }

        fn negotiate(&mut self) {
            self.set_status(1);
            self.set_status(ACK_DRIVER);
            self.w(0x00, 4, 0);
            let lo = self.r(0x04, 4);
            self.w(0x08, 4, 0);
            self.w(0x0c, 4, lo);
            self.w(0x08, 4, 1);
            self.w(0x0c, 4, 1);
            self.set_status(FEATURES_OK);
            assert_eq!(self.status(), FEATURES_OK);
        }

        fn setup_queue(&mut self, q: u16, base: u64, size: u16, vector: u16) {
            self.w(0x16, 2, q.into());
            self.w(0x18, 2, size.into());
            self.w(0x1a, 2, vector.into());
            self.w(0x20, 8, base);
            self.w(0x28, 4, base + 0x1000);
            self.w(0x2c, 4, 0);
            self.w(0x30, 8, base + 0x2000);
            self.w(0x1c, 2, 1);
        }

        fn vector_event(&self, v: usize) -> &EventFd {
            &self.dev.msix_vectors()[v].event
        }
    }

    #[test]
    fn identity_bar_and_capabilities() {
        for (kind, class) in [
            (TYPE_RNG, 0x00_ff00),
            (TYPE_NET, 0x02_0000),
            (TYPE_BLOCK, 0x01_0000),
            (TYPE_VSOCK, 0x07_8000),
        ] {
            let (mut g, _) = fake(kind, 2);
            assert_eq!(g.cfg_r(0, 4), (0x1040 + kind) << 16 | 0x1af4);
            assert_eq!(g.cfg_r(8, 4), class << 8 | 1, "class code and revision 1");
            assert_eq!(g.cfg_r(0x2c, 4), (0x40 + kind) << 16 | 0x1af4);
        }
        let (mut g, _) = fake(TYPE_RNG, 2);
        assert_eq!(g.cfg_r(config::HEADER_TYPE, 1), 0);
        assert_eq!(g.cfg_r(config::INTERRUPT_LINE, 2), 0x0100 | u32::from(INTX));
        assert_ne!(
            g.cfg_r(config::STATUS, 2) & u32::from(config::status::CAPABILITY_LIST),
            0
        );
        // BAR 0: 64-bit, not prefetchable, holding the whole layout.
        assert_eq!(g.cfg_r(0x10, 4), BAR as u32 | 0b100);
        assert_eq!(g.cfg_r(0x14, 4), 0);
        assert_eq!(g.dev.bar0_size(), 0x8000);
        assert_eq!(g.dev.config().bar(0).unwrap().window, BarWindow::Mmio32);
        g.cfg_w(0x10, 4, 0xffff_ffff);
        g.cfg_w(0x14, 4, 0xffff_ffff);
        assert_eq!(g.cfg_r(0x10, 4), 0xffff_8004, "sizing: 32 KiB");
        assert_eq!(g.cfg_r(0x14, 4), 0xffff_ffff);
        for r in 0x18..0x28 {
            assert_eq!(g.cfg_r(r, 1), 0, "only BAR 0 exists");
        }
        // The capabilities a driver looks for.
        let caps = g.dev.config().capabilities();
        assert_eq!(
            caps.iter().map(|c| c.1).collect::<Vec<_>>(),
            [9, 9, 9, 9, 9, 0x11]
        );
        for (cfg_type, offset, len) in [
            (CAP_COMMON_CFG, 0, 16),
            (CAP_NOTIFY_CFG, 0x3000, 20),
            (CAP_ISR_CFG, 0x1000, 16),
            (CAP_DEVICE_CFG, 0x2000, 16),
        ] {
            let c = g.cap(cfg_type);
            assert_eq!(g.cfg_r(c + 2, 1), len);
            assert_eq!(g.cfg_r(c + CAP_BAR, 1), 0);
            assert_eq!(g.cfg_r(c + CAP_OFFSET, 4), offset);
            assert_eq!(g.cfg_r(c + CAP_LENGTH, 4), 0x1000);
        }
        let notify = g.cap(CAP_NOTIFY_CFG);
        assert_eq!(g.cfg_r(notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
        let pci_cfg = g.cap(CAP_PCI_CFG);
        assert_eq!(g.cfg_r(pci_cfg + 2, 1), 20);
        let m = g.msix_cap();
        assert_eq!(
            g.cfg_r(m + 2, 2),
            2,
            "3 vectors: 2 queues and configuration"
        );
        assert_eq!(g.cfg_r(m + 4, 4), 0x4000, "table in BAR 0");
        assert_eq!(g.cfg_r(m + 8, 4), 0x5000, "PBA in BAR 0");
        // The capabilities are read-only, but for the PCI_CFG window and MSI-X control.
        g.cfg_w(notify + 16, 4, 0);
        assert_eq!(g.cfg_r(notify + 16, 4), NOTIFY_OFF_MULTIPLIER);
        g.cfg_w(m + 2, 2, 0xffff);
        assert_eq!(g.cfg_r(m + 2, 2), 0xc002);
        assert_eq!(msix_vectors_for(&FakeDevice::new(TYPE_RNG, 3).0), 4);
        assert_eq!(
            g.dev
                .msix_vectors()
                .iter()
                .map(|v| v.gsi)
                .collect::<Vec<_>>(),
            [24, 25, 26]
        );
    }

    #[test]
    fn feature_negotiation() {
        let (mut g, given) = fake(TYPE_RNG, 1);
        g.w(0x00, 4, 0);
        assert_eq!(g.r(0x04, 4), FAKE_FEATURE);
        g.w(0x00, 4, 1);
        assert_eq!(g.r(0x04, 4), 1, "VERSION_1");
        g.w(0x00, 4, 2);
        assert_eq!(g.r(0x04, 4), 0);
        assert_eq!(g.r(0x00, 4), 2, "the selector reads back");
        // Before DRIVER, accepted features are ignored.
        g.w(0x08, 4, 1);
        g.w(0x0c, 4, 1);
        assert_eq!(g.r(0x0c, 4), 0);
        g.set_status(ACK_DRIVER);
        g.w(0x0c, 4, 1);
        g.w(0x08, 4, 0);
        g.w(0x0c, 4, FAKE_FEATURE);
        assert_eq!(g.r(0x0c, 4), FAKE_FEATURE);
        g.w(0x08, 4, 1);
        assert_eq!(g.r(0x0c, 4), 1);
        g.set_status(FEATURES_OK);
        assert_eq!(g.status(), FEATURES_OK);
        // Frozen after FEATURES_OK.
        g.w(0x0c, 4, 0);
        assert_eq!(g.r(0x0c, 4), 1);
        g.setup_queue(0, 0x10000, 16, VIRTIO_MSI_NO_VECTOR);
        g.set_status(DRIVER_OK);
        assert!(g.dev.is_active());
        assert_eq!(
            given.lock().unwrap().as_ref().unwrap().features,
            FAKE_FEATURE | 1 << 32
        );

        // Without VERSION_1, or with a feature not offered: FEATURES_OK does not stick.
        for (lo, hi) in [(FAKE_FEATURE, 0), (FAKE_FEATURE | 1 << 7, 1)] {
            let (mut g, _) = fake(TYPE_RNG, 1);
            g.set_status(ACK_DRIVER);
            g.w(0x08, 4, 0);
            g.w(0x0c, 4, lo);
            g.w(0x08, 4, 1);
            g.w(0x0c, 4, hi);
            g.set_status(FEATURES_OK);
            assert_eq!(g.status(), ACK_DRIVER, "{lo:#x} {hi:#x} refused");
        }
    }

    #[test]
    fn queues_set_up_through_common_cfg_and_activation() {
        let (mut g, given) = fake(TYPE_NET, 2);
        assert_eq!(g.r(0x12, 2), 2, "num_queues");
        g.w(0x16, 2, 1);
        assert_eq!(g.r(0x16, 2), 1);
        assert_eq!(g.r(0x18, 2), 64, "max size until set");
        assert_eq!(g.r(0x1e, 2), 1, "notify offset = queue index");
        assert_eq!(g.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, 0);
        g.setup_queue(1, 0x20000, 32, 1);
        g.w(0x10, 2, 2);
        assert_eq!(g.r(0x10, 2), 2, "config vector");
        g.w(0x16, 2, 0);
        assert_eq!(g.r(0x18, 2), 16);
        assert_eq!(g.r(0x1a, 2), 0);
        assert_eq!(g.r(0x1c, 2), 1);
        assert_eq!(g.r(0x20, 8), 0x10000);
        assert_eq!(g.r(0x28, 8), 0x11000);
        assert_eq!(g.r(0x30, 4), 0x12000);
        assert_eq!(g.r(0x34, 4), 0);
        g.w(0x16, 2, 1);
        assert_eq!(g.r(0x18, 2), 32);
        assert_eq!(g.r(0x1a, 2), 1);
        // The 64-bit fields take their halves separately.
        let gen = g.r(0x15, 1);
        g.set_status(DRIVER_OK);
        assert!(g.dev.is_active());
        assert_eq!(g.status(), DRIVER_OK);
        assert_eq!(given.lock().unwrap().as_ref().unwrap().queues, [0, 1]);
        // The device's configuration space, and its generation.
        assert_eq!(g.r(DEVICE_CFG_OFFSET + 4, 4), 0x0706_0504);
        assert_eq!(
            g.r(DEVICE_CFG_OFFSET + 14, 4),
            0x0f0e,
            "past the end reads zero"
        );
        g.w(DEVICE_CFG_OFFSET + 1, 1, 0xaa);
        assert_eq!(g.r(DEVICE_CFG_OFFSET, 2), 0xaa00);
        assert_ne!(g.r(0x15, 1), gen, "a config write moves the generation");
        // Reset: the device stops, vectors and queues start over.
        g.set_status(0);
        assert!(!g.dev.is_active());
        assert!(given.lock().unwrap().is_none());
        assert_eq!(g.status(), 0);
        assert_eq!(g.r(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(g.r(0x16, 2), 0);
        assert_eq!(g.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(g.r(0x1c, 2), 0);
        assert_eq!(g.r(0x18, 2), 64);
    }

    #[test]
    fn msix_vectors_masks_and_pending_bits() {
        let (mut g, given) = fake(TYPE_RNG, 1);
        g.msix_control(MSIX_ENABLE);
        g.vector(0, false);
        g.vector(1, false);
        assert_eq!(
            g.host.events(),
            [
                HostEvent::RegisterIoevent {
                    addr: BAR + NOTIFY_OFFSET
                },
                HostEvent::MsiRoute {
                    gsi: GSI,
                    msg: Some(MsiMessage {
                        address: 0xfee0_0000,
                        data: 0x30
                    })
                },
                HostEvent::MsiRoute {
                    gsi: GSI + 1,
                    msg: Some(MsiMessage {
                        address: 0xfee0_1000,
                        data: 0x31
                    })
                },
            ]
        );
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, 0);
        g.w(0x10, 2, 1);
        g.set_status(DRIVER_OK);
        let irq = given.lock().unwrap().as_ref().unwrap().interrupt.clone();
        let intx = g.dev.interrupt();

        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert!(fired(g.vector_event(0)));
        assert!(!fired(g.vector_event(1)));
        assert!(!fired(intx.intx_event()), "no INTx with MSI-X");
        assert_eq!(g.r(ISR_OFFSET, 1), 0, "no ISR with MSI-X");
        irq.trigger(InterruptReason::Config).unwrap();
        assert!(fired(g.vector_event(1)));

        // A masked vector: pending bit, then delivery on unmask.
        g.w(MSIX_TABLE_OFFSET + 12, 4, 1);
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert!(!fired(g.vector_event(0)));
        assert_eq!(g.pba(), 1);
        g.w(MSIX_TABLE_OFFSET + 12, 4, 0);
        assert!(fired(g.vector_event(0)));
        assert_eq!(g.pba(), 0);

        // The function mask holds every vector.
        g.msix_control(MSIX_ENABLE | MSIX_FUNCTION_MASK);
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        irq.trigger(InterruptReason::Config).unwrap();
        assert_eq!(g.pba(), 3);
        assert!(!fired(g.vector_event(0)));
        g.msix_control(MSIX_ENABLE);
        assert!(fired(g.vector_event(0)));
        assert!(fired(g.vector_event(1)));
        assert_eq!(g.pba(), 0);

        // A worker that breaks: DEVICE_NEEDS_RESET, and the configuration vector.
        let health = given.lock().unwrap().as_ref().unwrap().health.clone();
        health.mark_broken();
        irq.trigger(InterruptReason::Config).unwrap();
        assert_eq!(
            g.status(),
            DRIVER_OK | u64::from(status::DEVICE_NEEDS_RESET)
        );
        assert!(fired(g.vector_event(1)));
        g.set_status(0);
        assert_eq!(g.status(), 0, "reset clears it");
    }

    #[test]
    fn no_vector_means_no_interrupt_with_msix() {
        let (mut g, given) = fake(TYPE_RNG, 1);
        g.msix_control(MSIX_ENABLE);
        g.vector(0, false);
        g.vector(1, false);
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, VIRTIO_MSI_NO_VECTOR);
        g.set_status(DRIVER_OK);
        let irq = given.lock().unwrap().as_ref().unwrap().interrupt.clone();
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        irq.trigger(InterruptReason::Config).unwrap();
        assert!(!fired(g.vector_event(0)));
        assert!(!fired(g.vector_event(1)));
        assert!(!fired(g.dev.interrupt().intx_event()));
        assert_eq!(g.pba(), 0);
        assert_eq!(g.r(ISR_OFFSET, 1), 0);
        // A queue index the device does not have has no vector either.
        irq.trigger(InterruptReason::Queue(9)).unwrap();
        assert!(!fired(g.vector_event(0)));
    }

    #[test]
    fn intx_isr_and_resampling() {
        let (mut g, given) = fake(TYPE_RNG, 1);
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, VIRTIO_MSI_NO_VECTOR);
        g.set_status(DRIVER_OK);
        let irq = given.lock().unwrap().as_ref().unwrap().interrupt.clone();
        let intx = g.dev.interrupt();
        let int_status = u32::from(config::status::INTERRUPT);

        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert!(fired(intx.intx_event()));
        assert_eq!(g.cfg_r(config::STATUS, 2) & int_status, int_status);
        assert_eq!(g.r(ISR_OFFSET, 1), 1);
        assert_eq!(g.r(ISR_OFFSET, 1), 0, "a read clears it");
        assert_eq!(g.cfg_r(config::STATUS, 2) & int_status, 0);
        irq.trigger(InterruptReason::Config).unwrap();
        assert!(fired(intx.intx_event()));
        assert_eq!(g.r(ISR_OFFSET, 1), 2);

        // The guest's EOI with the ISR still set (not read yet): raised again.
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert!(fired(intx.intx_event()));
        intx.intx_resample_event().write(1).unwrap();
        intx.resample_intx();
        assert!(fired(intx.intx_event()), "re-asserted");
        assert!(!fired(intx.intx_resample_event()), "resample event drained");
        assert_eq!(g.r(ISR_OFFSET, 1), 1);
        intx.intx_resample_event().write(1).unwrap();
        intx.resample_intx();
        assert!(
            !fired(intx.intx_event()),
            "nothing to say after the ISR read"
        );

        // INTx disabled in the command register: ISR only; enabling it raises the line.
        let cmd = g.cfg_r(config::COMMAND, 2);
        g.cfg_w(config::COMMAND, 2, cmd | u32::from(command::INTX_DISABLE));
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert!(!fired(intx.intx_event()));
        assert_eq!(intx.isr(), 1);
        g.cfg_w(config::COMMAND, 2, cmd);
        assert!(fired(intx.intx_event()));
        assert_eq!(g.r(ISR_OFFSET, 1), 1);
        // Only offset 0 of the ISR region is the ISR; odd accesses there read zero.
        irq.trigger(InterruptReason::Queue(0)).unwrap();
        assert_eq!(g.r(ISR_OFFSET + 1, 1), 0);
        g.w(ISR_OFFSET, 1, 0);
        assert_eq!(g.r(ISR_OFFSET, 4), 1, "writes do not clear it");
    }

    #[test]
    fn hostile_common_cfg_accesses() {
        let (mut g, _) = fake(TYPE_RNG, 1);
        // A queue that does not exist.
        g.w(0x16, 2, 5);
        assert_eq!(g.r(0x18, 2), 0);
        assert_eq!(g.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(g.r(0x1e, 2), 0);
        g.w(0x18, 2, 8);
        g.w(0x1a, 2, 0);
        g.w(0x20, 8, 0x4000);
        g.w(0x1c, 2, 1);
        assert_eq!(g.r(0x18, 2), 0);
        assert_eq!(g.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        assert_eq!(g.r(0x20, 8), 0);
        assert_eq!(g.r(0x1c, 2), 0);
        g.w(0x16, 2, 0xffff);
        assert_eq!(g.r(0x18, 2), 0);
        // Sizes that are not powers of two, too large, zero.
        g.w(0x16, 2, 0);
        for bad in [3u64, 100, 128, 0] {
            g.w(0x18, 2, bad);
            assert_eq!(g.r(0x18, 2), 64, "size {bad}");
        }
        g.w(0x18, 2, 16);
        assert_eq!(g.r(0x18, 2), 16);
        // Vectors that do not exist map to none.
        g.w(0x10, 2, 2);
        assert_eq!(g.r(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        g.w(0x10, 2, 0x8000);
        assert_eq!(g.r(0x10, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        g.w(0x1a, 2, 1);
        assert_eq!(g.r(0x1a, 2), 1);
        g.w(0x1a, 2, 7);
        assert_eq!(g.r(0x1a, 2), u64::from(VIRTIO_MSI_NO_VECTOR));
        // queue_enable 0 is not allowed and does nothing.
        g.w(0x1c, 2, 0);
        g.w(0x1c, 2, 2);
        assert_eq!(g.r(0x1c, 2), 0);
        // Read-only fields stay.
        g.w(0x12, 2, 9);
        g.w(0x15, 1, 9);
        g.w(0x1e, 2, 9);
        g.w(0x04, 4, 0);
        assert_eq!(g.r(0x12, 2), 1);
        assert_eq!(g.r(0x1e, 2), 0);
        // Accesses that are not a field, or half of a 64-bit one.
        assert_eq!(g.r(0x04, 1), 0);
        assert_eq!(g.r(0x04, 2), 0);
        assert_eq!(g.r(0x00, 8), 0);
        assert_eq!(g.r(0x12, 4), 0);
        assert_eq!(g.r(0x22, 4), 0);
        assert_eq!(g.r(0x14, 2), 0);
        g.w(0x14, 2, 0x0f0f);
        g.w(0x14, 4, 0x0f);
        assert_eq!(g.status(), 0, "status takes only byte writes");
        g.w(0x20, 1, 0x40);
        g.w(0x21, 4, 0x40);
        assert_eq!(g.r(0x20, 8), 0);
        assert_eq!(g.r(0x3c, 2), 0, "past the structure");
        g.w(0x3a, 2, 1);
        assert_eq!(g.r(0x3a, 2), 0, "queue_reset is not offered");

        // Enabled before its addresses: the queue is frozen where it was.
        g.w(0x1c, 2, 1);
        g.w(0x20, 8, 0x10000);
        g.w(0x18, 2, 32);
        assert_eq!(g.r(0x20, 8), 0);
        assert_eq!(g.r(0x18, 2), 16);
    }

    #[test]
    fn writes_after_driver_ok_change_nothing() {
        let (mut g, given) = fake(TYPE_RNG, 1);
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, 0);
        g.set_status(DRIVER_OK);
        assert!(g.dev.is_active());
        g.w(0x16, 2, 0);
        g.w(0x18, 2, 32);
        g.w(0x1a, 2, 1);
        g.w(0x20, 8, 0x40000);
        g.w(0x28, 4, 0x40000);
        g.w(0x34, 4, 1);
        g.w(0x08, 4, 0);
        g.w(0x0c, 4, 0);
        assert_eq!(g.r(0x18, 2), 16);
        assert_eq!(g.r(0x1a, 2), 0);
        assert_eq!(g.r(0x20, 8), 0x10000);
        assert_eq!(g.r(0x28, 8), 0x11000);
        assert_eq!(g.r(0x30, 8), 0x12000);
        assert_eq!(g.r(0x0c, 4), FAKE_FEATURE);
        // Setting DRIVER_OK again does not activate twice.
        *given.lock().unwrap() = None;
        g.set_status(DRIVER_OK);
        assert!(given.lock().unwrap().is_none());
        assert!(g.dev.is_active());
    }

    #[test]
    fn driver_ok_without_features_ok_or_with_a_bad_queue_needs_reset() {
        let (mut g, given) = fake(TYPE_RNG, 1);
        g.set_status(ACK_DRIVER);
        g.set_status(ACK_DRIVER | u64::from(status::DRIVER_OK));
        assert!(!g.dev.is_active());
        assert_ne!(g.status() & u64::from(status::DEVICE_NEEDS_RESET), 0);
        g.set_status(0);
        assert_eq!(g.status(), 0);
        // A ring outside guest memory.
        g.negotiate();
        g.setup_queue(0, 0x1000_0000, 16, VIRTIO_MSI_NO_VECTOR);
        g.set_status(DRIVER_OK);
        assert!(!g.dev.is_active());
        assert!(given.lock().unwrap().is_none());
        assert_ne!(g.status() & u64::from(status::DEVICE_NEEDS_RESET), 0);
    }

    #[test]
    fn every_offset_and_size_is_harmless() {
        let (mut g, _) = fake(TYPE_RNG, 2);
        let ids = g.cfg_r(0, 4);
        let size = g.dev.bar0_size();
        for len in [1usize, 2, 3, 4, 8] {
            for off in (0..size + 16).chain([u64::MAX - 3, u64::MAX]) {
                let _ = g.r(off, len);
                g.w(off, len, u64::MAX);
                g.w(off, len, 0);
            }
        }
        for len in [1usize, 2, 4] {
            for off in 0..config::CONFIG_SPACE_SIZE {
                if off % 4 + len > 4 {
                    continue;
                }
                let _ = g.cfg_r(off, len);
                g.cfg_w(off, len, u32::MAX);
                g.cfg_w(off, len, 0);
            }
        }
        assert_eq!(g.cfg_r(0, 4), ids);
        // Empty accesses (no bus makes them, but nothing may panic on one).
        for off in [
            0,
            ISR_OFFSET,
            DEVICE_CFG_OFFSET,
            NOTIFY_OFFSET,
            MSIX_TABLE_OFFSET,
            PBA,
        ] {
            g.dev.read_bar(0, off, &mut []);
            g.dev.write_bar(0, off, &[]);
        }
        // Another BAR number is not ours.
        let mut b = [0u8; 4];
        g.dev.read_bar(2, 0, &mut b);
        assert_eq!(b, [0xff; 4]);
        g.dev.write_bar(2, 0, &b);
        // Still a working device after a reset.
        g.set_status(0);
        g.cfg_w(config::COMMAND, 2, u32::from(command::MEMORY_SPACE));
        g.msix_control(0);
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, VIRTIO_MSI_NO_VECTOR);
        g.set_status(DRIVER_OK);
        assert!(g.dev.is_active());
    }

    #[test]
    fn pci_cfg_window_reaches_bar0() {
        let (mut g, _) = fake(TYPE_RNG, 1);
        let c = g.cap(CAP_PCI_CFG);
        let data = c + CAP_PCI_CFG_DATA;
        g.cfg_w(c + CAP_BAR, 1, 0);
        g.cfg_w(c + CAP_OFFSET, 4, 0x12);
        g.cfg_w(c + CAP_LENGTH, 4, 2);
        assert_eq!(
            g.cfg_r(data, 4) & 0xffff,
            1,
            "num_queues through the window"
        );
        g.cfg_w(c + CAP_OFFSET, 4, 0x14);
        g.cfg_w(c + CAP_LENGTH, 4, 1);
        g.cfg_w(data, 4, 1);
        assert_eq!(g.status(), 1, "device_status written through the window");
        // It works with memory decode off, as it is meant to.
        g.cfg_w(config::COMMAND, 2, 0);
        g.cfg_w(data, 1, 3);
        assert_eq!(g.status(), 3);
        // Windows the device refuses: another BAR, odd lengths, misaligned, past the BAR.
        for (bar, off, len) in [
            (1u32, 0x14u32, 1u32),
            (0, 0x14, 3),
            (0, 0x13, 2),
            (0, 0x8000, 4),
            (0, u32::MAX, 4),
        ] {
            g.cfg_w(c + CAP_BAR, 1, bar);
            g.cfg_w(c + CAP_OFFSET, 4, off);
            g.cfg_w(c + CAP_LENGTH, 4, len);
            g.cfg_w(data, 4, 0);
            let _ = g.cfg_r(data, 4);
        }
        assert_eq!(g.status(), 3);
    }

    /// The device on a root complex, found and driven as a guest would: ECAM to enumerate and
    /// place, the BAR window for registers, the host's ioeventfds for notifications.
    #[test]
    fn on_the_root_complex_bar_moves_carry_the_ioeventfds() {
        let host = Arc::new(RecordingHost::new());
        let (device, _) = FakeDevice::new(TYPE_NET, 2);
        let irqs = VirtioPciIrqs {
            msix_gsi_base: GSI,
            intx_gsi: INTX,
        };
        let dev = VirtioPciDevice::new(Box::new(device), memory(), host.clone(), irqs).unwrap();
        let dev = Arc::new(Mutex::new(dev));
        let windows = PciWindows {
            mmio32_start: BAR,
            mmio32_size: 0x1000_0000,
            mmio64_start: 4 << 30,
            mmio64_size: 64 << 30,
        };
        let mut root = PciRoot::new(windows).unwrap();
        let slot = root.add_device(dev.clone()).unwrap();
        assert_eq!(slot, 1);
        let root = Arc::new(root);
        let mut ecam = PciEcam::new(root.clone());
        let (mut window, start, _) = PciMmioWindow::new(root.clone(), BarWindow::Mmio32);
        assert_eq!(start, BAR);
        let cfg_r = |e: &mut PciEcam, reg: u64, len: usize| {
            let mut b = [0u8; 4];
            e.read((1 << 15) | reg, &mut b[..len]);
            u32::from_le_bytes(b)
        };
        let cfg_w = |e: &mut PciEcam, reg: u64, len: usize, v: u32| {
            e.write((1 << 15) | reg, &v.to_le_bytes()[..len]);
        };
        assert_eq!(cfg_r(&mut ecam, 0, 4), 0x1041_1af4);
        assert_eq!(host.ioevent_addresses(), [BAR + 0x3000, BAR + 0x3004]);
        assert_eq!(dev.lock().unwrap().bar0(), Some(BAR));

        // Find the common configuration as a driver does, and read num_queues there.
        let mut cap = cfg_r(&mut ecam, 0x34, 1) as u64;
        let mut common = None;
        while cap != 0 {
            if cfg_r(&mut ecam, cap, 1) == 9 && cfg_r(&mut ecam, cap + 3, 1) == 1 {
                common = Some(u64::from(cfg_r(&mut ecam, cap + 8, 4)));
            }
            cap = u64::from(cfg_r(&mut ecam, cap + 1, 1));
        }
        let common = common.unwrap();
        let bar0 = u64::from(cfg_r(&mut ecam, 0x10, 4) & !0xf)
            | u64::from(cfg_r(&mut ecam, 0x14, 4)) << 32;
        let mut b = [0u8; 2];
        window.read(bar0 + common + 0x12 - BAR, &mut b);
        assert_eq!(b, [0xff, 0xff], "memory decode is off");
        cfg_w(&mut ecam, 4, 2, u32::from(command::MEMORY_SPACE));
        window.read(bar0 + common + 0x12 - BAR, &mut b);
        assert_eq!(u16::from_le_bytes(b), 2);

        // KVM's ioeventfd signals queue 1's eventfd.
        assert!(host.guest_write(BAR + 0x3004));
        assert!(fired(&dev.lock().unwrap().queue_events()[1]));

        // The guest moves BAR 0: the ioeventfds follow.
        host.clear_events();
        let new = BAR + 0x0100_0000;
        cfg_w(&mut ecam, 0x10, 4, new as u32);
        assert_eq!(
            host.events(),
            [
                HostEvent::UnregisterIoevent { addr: BAR + 0x3000 },
                HostEvent::UnregisterIoevent { addr: BAR + 0x3004 },
                HostEvent::RegisterIoevent { addr: new + 0x3000 },
                HostEvent::RegisterIoevent { addr: new + 0x3004 },
            ]
        );
        assert_eq!(host.ioevent_addresses(), [new + 0x3000, new + 0x3004]);
        window.read(new + 0x12 - BAR, &mut b);
        assert_eq!(u16::from_le_bytes(b), 2);
        window.read(0x12, &mut b);
        assert_eq!(b, [0xff, 0xff], "nothing at the old place");
        // Sizing with decode off leaves no ioeventfd behind, and decode on brings them back.
        cfg_w(&mut ecam, 4, 2, 0);
        cfg_w(&mut ecam, 0x10, 4, u32::MAX);
        assert_eq!(cfg_r(&mut ecam, 0x10, 4), 0xffff_8004);
        assert!(host.ioevent_addresses().is_empty());
        cfg_w(&mut ecam, 0x10, 4, new as u32);
        assert!(host.ioevent_addresses().is_empty());
        cfg_w(&mut ecam, 4, 2, u32::from(command::MEMORY_SPACE));
        assert_eq!(host.ioevent_addresses(), [new + 0x3000, new + 0x3004]);
        // A notification write that reaches the registers (no ioeventfd) still notifies.
        window.write(new + 0x3000 - BAR, &0u16.to_le_bytes());
        assert!(fired(&dev.lock().unwrap().queue_events()[0]));
    }

    /// The virtio-rng device, served end to end on its own thread, with MSI-X.
    #[test]
    fn rng_request_served_with_msix() {
        let mut g = guest(Box::new(Rng::new(None)));
        g.msix_control(MSIX_ENABLE);
        g.vector(0, false);
        g.vector(1, false);
        let (mut ring, _) = RingDriver::new(&g.mem, 0x10000, 16);
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, 0);
        g.w(0x10, 2, 1);
        g.set_status(DRIVER_OK);
        assert!(g.dev.is_active());
        assert_eq!(g.status(), DRIVER_OK);

        ring.add_chain(&[(GuestAddress(0x40000), 64, true)]);
        assert!(g.host.guest_write(BAR + NOTIFY_OFFSET), "KVM's ioeventfd");
        assert!(wait_until(|| fired(g.vector_event(0))), "vector 0 raised");
        assert_eq!(ring.take_used(), [(0, 64)]);
        let mut random = [0u8; 64];
        g.mem
            .read_slice(&mut random, GuestAddress(0x40000))
            .unwrap();
        assert_ne!(random, [0; 64]);
        assert!(!fired(g.dev.interrupt().intx_event()));

        // Masked: the request is served, the message waits in the PBA.
        g.w(MSIX_TABLE_OFFSET + 12, 4, 1);
        ring.add_chain(&[(GuestAddress(0x41000), 16, true)]);
        assert!(g.host.guest_write(BAR + NOTIFY_OFFSET));
        assert!(wait_until(|| g.pba() == 1), "pending bit set");
        assert_eq!(ring.take_used(), [(1, 16)]);
        assert!(!fired(g.vector_event(0)));
        g.w(MSIX_TABLE_OFFSET + 12, 4, 0);
        assert!(fired(g.vector_event(0)), "delivered on unmask");
        assert_eq!(g.pba(), 0);
        g.set_status(0);
        assert!(!g.dev.is_active());
    }

    /// The same request with MSI-X off: INTx and the ISR, the notification through the
    /// register (no ioeventfd).
    #[test]
    fn rng_request_served_with_intx() {
        let mut g = guest(Box::new(Rng::new(None)));
        let (mut ring, _) = RingDriver::new(&g.mem, 0x10000, 16);
        g.negotiate();
        g.setup_queue(0, 0x10000, 16, VIRTIO_MSI_NO_VECTOR);
        g.set_status(DRIVER_OK);
        assert!(g.dev.is_active());
        ring.add_chain(&[(GuestAddress(0x40000), 32, true)]);
        g.w(NOTIFY_OFFSET, 2, 0);
        let intx = g.dev.interrupt();
        assert!(wait_until(|| fired(intx.intx_event())), "INTx raised");
        assert_eq!(g.r(ISR_OFFSET, 1), 1);
        assert_eq!(ring.take_used(), [(0, 32)]);
        g.set_status(0);
    }
}
