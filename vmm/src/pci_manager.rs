//! Places virtio-pci devices on the PCI root complex (`devices::pci`): one slot each on bus
//! 0, BAR 0 in the 32-bit window, MSI-X vectors on GSIs from `layout::MSI_GSI_START` (an
//! irqfd each, routed by the message the guest writes in the table), and INTA on the IOAPIC
//! pin the DSDT's `_PRT` gives the slot (an irqfd with a resample eventfd, watched by the
//! event loop). KVM work the devices ask for at run time (ioeventfds following a moved BAR,
//! MSI routes) goes through [`KvmPciHost`].

use std::io;
use std::sync::{Arc, Mutex};

use boot::layout;
use devices::bus::{Bus, SharedDevice};
use devices::pci::{
    BarWindow, MsiMessage, PciConfigIo, PciEcam, PciHost, PciMmioWindow, PciRoot, PciWindows,
};
use devices::virtio::activator::{Activator, DeferredActivation};
use devices::virtio::pci::{msix_vectors_for, VirtioPciDevice, VirtioPciInterrupt, VirtioPciIrqs};
use devices::virtio::VirtioDevice;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::vstate::irq_routing::{GsiRouting, MsiRoute};
use crate::vstate::vm::Vm;

/// Why a PCI device could not be placed.
#[derive(Debug, thiserror::Error)]
pub enum PciManagerError {
    /// The root complex refused (no free slot, a window full).
    #[error("PCI: {0}")]
    Pci(#[from] devices::pci::PciError),
    /// The virtio-pci transport could not be made.
    #[error("virtio-pci: {0}")]
    Transport(#[from] devices::virtio::pci::VirtioPciError),
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The step.
        what: String,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// The device landed in another slot than its interrupt wiring assumed.
    #[error("PCI: device placed in slot {got}, expected {want}")]
    Slot {
        /// The slot its INTx pin was chosen for.
        want: u8,
        /// Where it went.
        got: u8,
    },
    /// The windows do not fit the address space.
    #[error("PCI: {0}")]
    Layout(String),
    /// A bus range overlaps another device.
    #[error(transparent)]
    Bus(#[from] devices::bus::BusError),
}

/// [`PciHost`] over the VM fd and its GSI routing table.
pub struct KvmPciHost {
    vm: Arc<VmFd>,
    routing: GsiRouting,
}

impl KvmPciHost {
    /// The host side of the PCI devices of `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            routing: GsiRouting::new(vm.clone()),
            vm,
        }
    }

    /// The MSI routes in force, by GSI.
    pub fn msi_routes(&self) -> std::collections::BTreeMap<u32, MsiRoute> {
        self.routing.msi_routes()
    }
}

fn kvm_io(e: kvm_ioctls::Error) -> io::Error {
    io::Error::from_raw_os_error(e.errno())
}

impl PciHost for KvmPciHost {
    fn register_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_io)
    }

    fn unregister_ioevent(&self, evt: &EventFd, addr: u64) -> io::Result<()> {
        self.vm
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(kvm_io)
    }

    fn set_msi_route(&self, gsi: u32, msg: Option<MsiMessage>) -> io::Result<()> {
        let route = msg.map(|m| MsiRoute {
            address_lo: m.address as u32,
            address_hi: (m.address >> 32) as u32,
            data: m.data,
        });
        self.routing
            .set_msi(gsi, route)
            .map_err(|e| io::Error::other(e.to_string()))
    }
}

/// One placed device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PciSlot {
    /// Its device number on bus 0 (function 0).
    pub slot: u8,
    /// Its virtio type.
    pub device_type: u32,
    /// Where BAR 0 decodes.
    pub bar0: Option<u64>,
    /// The IOAPIC pin of its INTA.
    pub intx_gsi: u32,
    /// The first of its MSI-X GSIs, and how many.
    pub msix_gsis: (u32, u32),
}

/// The PCI devices of a machine, while it is built.
pub struct PciDeviceManager {
    root: PciRoot,
    host: Arc<KvmPciHost>,
    next_gsi: u32,
    slots: Vec<PciSlot>,
    interrupts: Vec<Arc<VirtioPciInterrupt>>,
}

/// What the running machine keeps of its PCI devices: the INTx interrupts whose resample
/// eventfds the event loop watches.
pub struct PciRuntime {
    /// Each device's interrupt, in slot order.
    pub interrupts: Vec<Arc<VirtioPciInterrupt>>,
    /// The placed devices.
    pub slots: Vec<PciSlot>,
}

impl PciDeviceManager {
    /// An empty bus 0 (the host bridge only) for a machine with `mem_size` bytes of RAM.
    pub fn new(vm: &Vm, mem_size: u64) -> Result<Self, PciManagerError> {
        let root = PciRoot::new(PciWindows {
            mmio32_start: layout::PCI_MMIO32_START,
            mmio32_size: layout::PCI_MMIO32_SIZE,
            mmio64_start: layout::pci_mmio64_start(mem_size),
            mmio64_size: layout::PCI_MMIO64_SIZE,
        })?;
        Ok(Self {
            root,
            host: Arc::new(KvmPciHost::new(vm.fd.clone())),
            next_gsi: layout::MSI_GSI_START,
            slots: Vec::new(),
            interrupts: Vec::new(),
        })
    }

    /// Puts `device` in the next slot with its BAR, interrupts and ioeventfds.
    pub fn add(
        &mut self,
        vm: &Vm,
        mem: &GuestMemoryMmap,
        device: Box<dyn VirtioDevice>,
        activator: &Arc<Activator>,
    ) -> Result<PciSlot, PciManagerError> {
        // Slots are taken in order and never freed: the next is one past the last.
        let want = self.slots.len() as u8 + 1;
        let intx_gsi = boot::acpi::pci_intx_gsi(want, 0);
        let vectors = msix_vectors_for(&*device);
        let device_type = device.device_type();
        let mut dev = VirtioPciDevice::new(
            device,
            mem.clone(),
            self.host.clone(),
            VirtioPciIrqs {
                msix_gsi_base: self.next_gsi,
                intx_gsi: intx_gsi as u8,
            },
        )?;
        let kvm = |what: String| move |source| PciManagerError::Kvm { what, source };
        for v in dev.msix_vectors() {
            vm.fd
                .register_irqfd(&v.event, v.gsi)
                .map_err(kvm(format!("KVM_IRQFD for MSI GSI {}", v.gsi)))?;
        }
        let interrupt = dev.interrupt();
        vm.fd
            .register_irqfd_with_resample(
                interrupt.intx_event(),
                interrupt.intx_resample_event(),
                intx_gsi,
            )
            .map_err(kvm(format!("KVM_IRQFD (resample) for INTx GSI {intx_gsi}")))?;
        dev.set_activator(activator.clone());
        let dev = Arc::new(Mutex::new(dev));
        let deferred: Arc<Mutex<dyn DeferredActivation>> = dev.clone();
        activator.register(Arc::downgrade(&deferred));
        let got = self.root.add_device(dev.clone())?;
        if got != want {
            return Err(PciManagerError::Slot { want, got });
        }
        let bar0 = dev.lock().unwrap_or_else(|e| e.into_inner()).bar0();
        let slot = PciSlot {
            slot: got,
            device_type,
            bar0,
            intx_gsi,
            msix_gsis: (self.next_gsi, vectors),
        };
        self.next_gsi += vectors;
        self.slots.push(slot);
        self.interrupts.push(interrupt);
        Ok(slot)
    }

    /// The placed devices, in slot order.
    pub fn slots(&self) -> &[PciSlot] {
        &self.slots
    }

    /// Puts the configuration mechanisms (ports 0xcf8..0xcff, ECAM) and the two BAR windows
    /// on the buses; nothing can be added afterwards.
    pub fn finish(self, pio: &mut Bus, mmio: &mut Bus) -> Result<PciRuntime, PciManagerError> {
        let root = Arc::new(self.root);
        pio.insert(
            Arc::new(Mutex::new(PciConfigIo::new(root.clone()))) as SharedDevice,
            u64::from(layout::PCI_CONFIG_PORT),
            layout::PCI_CONFIG_PORT_SIZE,
        )?;
        mmio.insert(
            Arc::new(Mutex::new(PciEcam::new(root.clone()))) as SharedDevice,
            layout::PCI_ECAM_START,
            layout::PCI_ECAM_SIZE,
        )?;
        for window in [BarWindow::Mmio32, BarWindow::Mmio64] {
            let (w, start, size) = PciMmioWindow::new(root.clone(), window);
            mmio.insert(Arc::new(Mutex::new(w)) as SharedDevice, start, size)?;
        }
        Ok(PciRuntime {
            interrupts: self.interrupts,
            slots: self.slots,
        })
    }
}
