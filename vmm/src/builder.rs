//! From a validated [`VmConfig`] to a running [`Vmm`]: guest memory, kernel, initrd, command
//! line, ACPI tables, boot parameters, legacy devices on the buses, and the vCPU threads.

use std::io::Write;
use std::sync::{Arc, Mutex};

use boot::layout;
use boot::loader::{self, EntryMode};
use devices::bus::{Bus, BusError, SharedDevice};
use devices::legacy;
use devices::stop::StopNotifier;
use devices::virtio::activator::Activator;
use devices::virtio::block;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::config::Transport;
use crate::config::{BlockEngine, ConfigError, ConsoleConfig, NetBackend, VmConfig};
use crate::device_manager::{DeviceManagerError, MmioDeviceManager};
use crate::metrics::Metrics;
use crate::pci_manager::{PciDeviceManager, PciManagerError};
use crate::runner::{ConsoleInput, DriveHandle, NetHandle, Vmm, VmmParts};
use crate::timeline::Timeline;
use crate::vstate::vcpu::{self, BootEntry, VcpuShared};
use crate::vstate::vm::{Vm, VmError};

/// Command-line limit for kernels that do not state one (x86 COMMAND_LINE_SIZE).
const DEFAULT_CMDLINE_LIMIT: usize = 2048;

/// Why a machine could not be built. Nothing has run in the guest when this is returned.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// KVM or guest memory.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The kernel or initrd.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// Boot parameters.
    #[error(transparent)]
    Params(#[from] boot::params::ParamsError),
    /// Boot page tables and GDT.
    #[error(transparent)]
    Regs(#[from] boot::regs::RegsError),
    /// ACPI tables.
    #[error("cannot build the ACPI tables: {0}")]
    Acpi(#[from] boot::acpi::AcpiError),
    /// A vCPU.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// A device could not be placed.
    #[error("device layout: {0}")]
    Bus(#[from] BusError),
    /// A virtio device could not be placed.
    #[error(transparent)]
    Virtio(#[from] DeviceManagerError),
    /// A virtio-pci device could not be placed.
    #[error(transparent)]
    Pci(#[from] PciManagerError),
    /// A disk could not be attached.
    #[error(transparent)]
    Disk(#[from] block::BlockError),
    /// The vsock device could not be set up.
    #[error(transparent)]
    Vsock(#[from] devices::virtio::vsock::VsockError),
    /// A network interface could not be set up.
    #[error("network interface {id}: {source}")]
    Net {
        /// The interface id.
        id: String,
        /// What went wrong.
        source: devices::virtio::net::NetError,
    },
    /// passt could not be started for a `user` network interface.
    #[error("network interface {id}: {source}")]
    Passt {
        /// The interface id.
        id: String,
        /// What went wrong.
        source: crate::passt::PasstError,
    },
    /// The console file or another host resource.
    #[error("{what}: {source}")]
    Io {
        /// What was being set up.
        what: String,
        /// The error.
        source: std::io::Error,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// Where the serial console writes, and whether it reads the terminal.
pub struct ConsoleIo {
    /// The guest's serial output goes here.
    pub output: Box<dyn Write + Send>,
    /// Feed stdin to the guest.
    pub read_stdin: bool,
}

impl ConsoleIo {
    /// The console a configuration asks for.
    pub fn from_config(c: &ConsoleConfig) -> Result<Self, BuildError> {
        Ok(match c {
            ConsoleConfig::Tty => Self {
                output: Box::new(std::io::stdout()),
                read_stdin: true,
            },
            ConsoleConfig::File(p) => {
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(io_err(format!("cannot open console file {}", p.display())))?;
                Self {
                    output: Box::new(f),
                    read_stdin: false,
                }
            }
            ConsoleConfig::None => Self {
                output: Box::new(std::io::sink()),
                read_stdin: false,
            },
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn shared<D: devices::bus::BusDevice + 'static>(d: D) -> Arc<Mutex<D>> {
    Arc::new(Mutex::new(d))
}

/// An eventfd that raises `gsi` in the in-kernel irqchip when written (KVM_IRQFD).
fn irq_event(vm: &Vm, gsi: u32, device: &str) -> Result<EventFd, BuildError> {
    let evt = EventFd::new(EFD_NONBLOCK).map_err(io_err("cannot create an interrupt eventfd"))?;
    vm.fd
        .register_irqfd(&evt, gsi)
        .map_err(|e| BuildError::Io {
            what: format!("KVM_IRQFD for the {device} (GSI {gsi})"),
            source: std::io::Error::from_raw_os_error(e.errno()),
        })?;
    Ok(evt)
}

/// Where the virtio devices go: virtio-mmio windows or the PCI bus.
enum VirtioPlacement {
    Mmio(MmioDeviceManager),
    Pci(PciDeviceManager),
}

impl VirtioPlacement {
    fn add(
        &mut self,
        vm: &Vm,
        mem: &vm_memory::GuestMemoryMmap,
        mmio: &mut Bus,
        device: Box<dyn devices::virtio::VirtioDevice>,
        activator: &Arc<Activator>,
    ) -> Result<(), BuildError> {
        match self {
            Self::Mmio(m) => {
                m.add(vm, mem, mmio, device, activator)?;
            }
            Self::Pci(p) => {
                let s = p.add(vm, mem, device, activator)?;
                log::info!(
                    "virtio-pci: type {} at 00:{:02x}.0, BAR 0 at {}, INTA on GSI {}, MSI GSIs {}..{}",
                    s.device_type,
                    s.slot,
                    s.bar0.map_or("nowhere".to_string(), |b| format!("{b:#x}")),
                    s.intx_gsi,
                    s.msix_gsis.0,
                    s.msix_gsis.0 + s.msix_gsis.1
                );
            }
        }
        Ok(())
    }
}

/// Builds the machine for `config` and starts its vCPUs.
pub fn build(
    config: &VmConfig,
    timeline: Arc<Timeline>,
    console: ConsoleIo,
    metrics: Arc<Metrics>,
) -> Result<Vmm, BuildError> {
    config.validate()?;
    let mem_size = config.mem_bytes();
    let vm = Vm::new(&boot::params::ram_ranges(mem_size))?;
    let mem = &vm.memory;

    let kernel = loader::load_kernel(mem, &config.kernel, config.pvh)?;
    let (initrd_limit, cmdline_limit) = match &kernel.setup_header {
        Some(h) => (
            u64::from(h.initrd_addr_max),
            if h.cmdline_size > 0 {
                h.cmdline_size as usize + 1
            } else {
                DEFAULT_CMDLINE_LIMIT
            },
        ),
        None => (u64::from(u32::MAX), DEFAULT_CMDLINE_LIMIT),
    };
    let initrd = match &config.initrd {
        Some(p) => Some(loader::load_initrd(mem, p, kernel.end, initrd_limit)?),
        None => None,
    };
    // Devices.
    let stop = StopNotifier::new().map_err(io_err("cannot create the stop eventfd"))?;
    let mut pio = Bus::new();
    let mut mmio = Bus::new();

    let com1_irq = irq_event(&vm, layout::COM1_IRQ, "serial port")?;
    let serial = shared(
        legacy::SerialDevice::new(
            legacy::EventFdTrigger::from_event_fd(com1_irq),
            console.output,
        )
        .map_err(io_err("cannot create the serial port"))?,
    );
    pio.insert(
        serial.clone() as SharedDevice,
        u64::from(layout::COM1_PORT),
        legacy::SERIAL_LEN,
    )?;

    let kbd_irq = irq_event(&vm, layout::I8042_IRQ, "i8042")?;
    let i8042 = shared(legacy::I8042Device::new(
        legacy::EventFdTrigger::from_event_fd(kbd_irq),
        stop.clone(),
    ));
    pio.insert(
        i8042.clone() as SharedDevice,
        u64::from(layout::I8042_PORT),
        legacy::I8042_LEN,
    )?;

    let below_4g = mem_size.min(layout::MMIO32_START);
    let cmos = shared(legacy::CmosDevice::new(below_4g, mem_size - below_4g));
    pio.insert(
        cmos as SharedDevice,
        u64::from(layout::CMOS_PORT),
        legacy::CMOS_LEN,
    )?;
    let exit = shared(legacy::ExitDevice::new(stop.clone()));
    pio.insert(
        exit as SharedDevice,
        u64::from(layout::EXIT_PORT),
        legacy::EXIT_DEVICE_LEN,
    )?;
    let pvpanic = shared(legacy::PvPanicDevice::new(stop.clone()));
    pio.insert(
        pvpanic as SharedDevice,
        u64::from(layout::PVPANIC_PORT),
        legacy::PVPANIC_LEN,
    )?;
    let acpi_pm = shared(legacy::AcpiPmDevice::new(stop.clone()));
    let pm_port = u64::from(layout::ACPI_SLEEP_CONTROL_PORT);
    pio.insert(acpi_pm as SharedDevice, pm_port, legacy::ACPI_PM_LEN)?;
    let boot_timer =
        legacy::BootTimer::with_completion(timeline.start(), timeline.boot_completion());
    mmio.insert(
        shared(boot_timer) as SharedDevice,
        layout::BOOT_TIMER_START,
        legacy::BOOT_TIMER_LEN,
    )?;

    // Virtio devices.
    devices::seccomp::set_enabled(config.seccomp);
    // The transport: as asked, or by kernel (a bzImage has a setup header).
    let transport = config
        .transport
        .unwrap_or(if kernel.setup_header.is_some() {
            Transport::Pci
        } else {
            Transport::Mmio
        });
    log::info!("virtio transport: {transport}");
    // DRIVER_OK writes reach the transports on vCPU threads; the VMM loop starts the devices.
    let activator = Activator::new().map_err(io_err("cannot create the activation eventfd"))?;
    let mut virtio = match transport {
        Transport::Mmio => VirtioPlacement::Mmio(MmioDeviceManager::new()),
        Transport::Pci => VirtioPlacement::Pci(PciDeviceManager::new(&vm, mem_size)?),
    };
    let mut drives = Vec::with_capacity(config.disks.len());
    let mut block_metrics = Vec::with_capacity(config.disks.len());
    // Disks first, in order, so that the first is vda.
    for (disk, id) in config.disks.iter().zip(config.disk_ids()) {
        let block = block::Block::new(block::BlockConfig {
            path: disk.path.clone(),
            read_only: disk.read_only,
            ephemeral: disk.ephemeral,
            serial: id.clone(),
            engine: match disk.engine {
                BlockEngine::Sync => block::Engine::Sync,
                BlockEngine::Uring => block::Engine::Uring,
            },
            rate_limiter: disk.rate_limiter,
        })?;
        block_metrics.push((id.clone(), block.metrics()));
        drives.push(DriveHandle {
            id,
            control: block.control(),
        });
        virtio.add(&vm, mem, &mut mmio, Box::new(block), &activator)?;
    }
    *metrics.blocks.lock().unwrap_or_else(|e| e.into_inner()) = block_metrics;
    // The other sections are this build's devices only (an earlier, failed build's are gone).
    lock(&metrics.extra).clear();
    if config.rng {
        let rng = devices::virtio::rng::Rng::new(config.rng_rate_limiter);
        let m = rng.metrics();
        metrics
            .extra
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((
                "entropy".into(),
                Box::new(move || crate::metrics::rng_json(&m)),
            ));
        virtio.add(&vm, mem, &mut mmio, Box::new(rng), &activator)?;
    }

    if let Some(v) = &config.vsock {
        let dev = devices::virtio::vsock::Vsock::new(u64::from(v.cid), &v.uds_path)?;
        log::info!(
            "vsock: guest CID {}, host socket {}",
            v.cid,
            v.uds_path.display()
        );
        virtio.add(&vm, mem, &mut mmio, Box::new(dev), &activator)?;
    }

    // Network interfaces. passt processes live as long as the machine: dropping them (when
    // the build fails from here on, or when the Vmm ends) kills them.
    let mut passts = Vec::new();
    let mut nets = Vec::with_capacity(config.nets.len());
    for (net, id) in config.nets.iter().zip(config.net_ids()) {
        let backend = match &net.backend {
            NetBackend::Tap { name } => {
                devices::virtio::net::NetBackendConfig::Tap { name: name.clone() }
            }
            NetBackend::User { publish } => {
                let mut passt = crate::passt::Passt::start(None, publish).map_err(|source| {
                    BuildError::Passt {
                        id: id.clone(),
                        source,
                    }
                })?;
                let stream = passt.take_stream().ok_or_else(|| BuildError::Io {
                    what: format!("network interface {id}"),
                    source: std::io::Error::other("passt's stream was already taken"),
                })?;
                passts.push(passt);
                devices::virtio::net::NetBackendConfig::Stream(stream)
            }
        };
        let dev = devices::virtio::net::Net::new(devices::virtio::net::NetConfig {
            backend,
            mac: net.mac,
            rx_rate_limiter: net.rx_rate_limiter,
            tx_rate_limiter: net.tx_rate_limiter,
        })
        .map_err(|source| BuildError::Net {
            id: id.clone(),
            source,
        })?;
        log::info!("network interface {id}: {}", dev.backend().describe());
        let m = dev.metrics();
        lock(&metrics.extra).push((
            format!("net_{id}"),
            Box::new(move || crate::metrics::net_json(&m)),
        ));
        nets.push(NetHandle {
            id: id.clone(),
            control: dev.control(),
        });
        virtio.add(&vm, mem, &mut mmio, Box::new(dev), &activator)?;
    }

    // The devices' description: virtio-mmio windows on the command line and in the DSDT, or
    // the PCI host bridge (MCFG, its windows and _PRT, ECAM reserved in e820).
    let (mmio_entries, mmio_acpi, pci, pci_runtime) = match virtio {
        VirtioPlacement::Mmio(m) => (m.cmdline_entries(), m.acpi_devices(), None, None),
        VirtioPlacement::Pci(p) => {
            let runtime = p.finish(&mut pio, &mut mmio)?;
            let acpi = boot::acpi::PciConfig {
                mmio64_start: layout::pci_mmio64_start(mem_size),
            };
            (Vec::new(), Vec::new(), Some(acpi), Some(runtime))
        }
    };
    let has_pci = pci.is_some();

    // What the guest reads at entry: command line (with the devices), ACPI, boot params.
    let cmdline = std::iter::once(config.cmdline.clone())
        .chain(mmio_entries)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ");
    boot::params::write_cmdline(mem, &cmdline, cmdline_limit)?;
    let rsdp = boot::acpi::create_acpi_tables(
        mem,
        &boot::acpi::AcpiConfig {
            num_cpus: config.vcpus,
            virtio_mmio_devices: mmio_acpi,
            pci,
        },
    )?;
    let boot_info = match kernel.mode {
        EntryMode::Linux64 => {
            boot::params::write_zero_page(
                mem,
                kernel.setup_header,
                cmdline.len(),
                initrd,
                Some(rsdp),
                mem_size,
                has_pci,
            )?;
            GuestAddress(layout::ZERO_PAGE_START)
        }
        EntryMode::Pvh => {
            boot::params::write_pvh_start_info(mem, initrd, Some(rsdp), mem_size, has_pci)?
        }
    };
    boot::regs::write_boot_tables(mem, kernel.mode)?;

    let console_input = match console.read_stdin {
        false => None,
        true => {
            let drained = lock(&serial)
                .input_drained_event()
                .try_clone()
                .map_err(io_err("cannot watch the serial input FIFO"))?;
            let serial = serial.clone();
            let feed = Box::new(move |bytes: &[u8]| lock(&serial).enqueue_input(bytes));
            Some(ConsoleInput { feed, drained })
        }
    };

    // vCPUs.
    vcpu::install_kick_handler().map_err(|e| BuildError::Io {
        what: "cannot install the vCPU kick handler".into(),
        source: e.into(),
    })?;
    let entry = BootEntry {
        mode: kernel.mode,
        entry: kernel.entry,
        boot_info,
    };
    let fds = (0..config.vcpus)
        .map(|id| vcpu::create_vcpu(&vm, id, config.vcpus, (id == 0).then_some(entry)))
        .collect::<Result<Vec<_>, _>>()?;
    let shared_state = Arc::new(
        VcpuShared::new(
            pio,
            mmio,
            vm.memory.clone(),
            stop,
            timeline,
            metrics.vcpu.clone(),
        )
        .map_err(io_err("cannot create the vCPU stop eventfd"))?,
    );
    let vcpu_filter = devices::seccomp::prepare(&crate::seccomp::vcpu_policy())
        .map_err(|e| io_err("cannot build the vCPU filter")(e.into()))?;
    let mut threads = Vec::with_capacity(fds.len());
    for (id, fd) in fds.into_iter().enumerate() {
        let h = vcpu::spawn(fd, id as u8, shared_state.clone(), vcpu_filter.clone())
            .map_err(io_err(format!("cannot start the thread of vCPU {id}")))?;
        threads.push(h);
    }

    Ok(Vmm::new(VmmParts {
        vm,
        shared: shared_state,
        vcpus: threads,
        timeout: config.timeout,
        console_input,
        i8042,
        drives,
        nets,
        passts,
        pci_interrupts: pci_runtime.map(|r| r.interrupts).unwrap_or_default(),
        activator,
    }))
}
