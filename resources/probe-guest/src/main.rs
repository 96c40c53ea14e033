//! The cgvm probe guest: a bare-metal program that a VMM loads like a Linux ELF vmlinux. It
//! checks what the VMM built (zero page, command line, e820, CMOS, ACPI, devices), prints one
//! line per check on COM1 and ends the run with a verdict through the exit device.
//!
//! Where things live:
//! - `start`: ring 0. The ELF entry, the GDT/TSS/IDT and page tables, the exception stubs, the
//!   interrupt stubs, and the `iretq` to ring 3 where everything else runs (see README.md for
//!   why);
//! - `irq`: what the interrupt stubs count, `sti`/`cli` from ring 3, and the local APIC and
//!   IOAPIC, for the virtio-pci modes that take interrupts (`probe.pci_irq`);
//! - `main` (this file): `probe_main`, the ring-3 entry: reads the zero page and the command
//!   line, runs the requested checks, prints the summary, ends the run; the panic handler;
//! - `wait`: the waiting loop of `probe.exit=hang` (Ctrl+Alt+Del, virtio-blk configuration
//!   changes, ticks);
//! - `checks`: the check registry and the checks (`checks::boot`, `checks::blk`,
//!   `checks::rng`, `checks::blkbench`, `checks::net`, `checks::vsock`, `checks::pci`, and the
//!   benchmark checks `checks::netbench`, `checks::vsockbench`);
//! - `net`: the net check's frames (ARP, DHCP) and the benchmark's (`net::bench`: Ethernet,
//!   IPv4, TCP with checksums, TSO headers), built and parsed (pure, unit-tested);
//! - `vsock`: the polling virtio-vsock driver (header codec, connections, credit), generic
//!   over the transport and unit-tested against a fake device, and the benchmark's
//!   (`vsock::bench`: echo ring, sink and source accounting);
//! - `bootparams`, `cmdline`, `acpi`, `aml`: parsing what the VMM provides (pure,
//!   unit-tested);
//! - `discovery`: the virtio-mmio devices, from the command line and from the DSDT, and the
//!   virtio-pci ones, from bus 0 through the MCFG's ECAM region;
//! - `pci`: PCI configuration space through ECAM and ports 0xcf8/0xcfc, and what it says
//!   (header, BARs and their sizing, capabilities, virtio-pci structures, MSI-X, the MCFG;
//!   pure, unit-tested);
//! - `virtio`: the polling virtio driver core (initialization, split queues, DMA memory), the
//!   virtio-mmio transport, and the virtio-pci one (`virtio::pci`: queues polled, interrupts
//!   watched through MSI-X masked, INTx, or taken, as `probe.pci_irq` says);
//! - `mmio`: device registers in the MMIO hole (ECAM, BARs), bounds-checked volatile access;
//! - `phys`: bounds-checked reads of guest memory;
//! - `serial`, `cmos`, `boottimer`, `exit`, `keyboard`, `io`: the devices, by port or MMIO
//!   (`keyboard` also recognises Ctrl+Alt+Del in scan codes);
//! - `tsc`: time for bounded waits and for the benchmark;
//! - `text`: formatting without allocation; `rt`: `memcpy` & co. for the linker.
//!
//! `cargo test` (via `build.sh --test`) builds the crate for the host with std, without the
//! ring-0 code and the runtime symbols, to unit-test the parsers.

#![cfg_attr(not(test), no_std)]
#![cfg_attr(not(test), no_main)]
#![cfg_attr(test, allow(dead_code))]

mod acpi;
mod aml;
mod bootparams;
mod boottimer;
mod checks;
mod cmdline;
mod cmos;
mod discovery;
mod exit;
mod io;
mod irq;
mod keyboard;
mod mmio;
mod net;
mod pci;
mod phys;
#[cfg(not(test))]
mod rt;
mod serial;
#[cfg(not(test))]
mod start;
mod text;
mod tsc;
mod virtio;
mod vsock;
mod wait;

use bootparams::BootParams;
use checks::{Context, Report};
use cmdline::Args;
use exit::Ending;
use phys::PhysMem;
use text::Escaped;

/// The probe's command-line buffer; a longer command line fails the boot check.
const CMDLINE_CAPACITY: usize = 4096;

/// Ring-3 entry, called (by `iretq`) from the start code with the zero page's address.
extern "C" fn probe_main(zero_page: u64) -> ! {
    serial::init();
    exit::end(run(zero_page))
}

/// Runs the requested checks and says how to end.
fn run(zero_page: u64) -> Ending {
    let boot_params = match BootParams::read(&PhysMem::bootstrap(), zero_page) {
        Ok(bp) => bp,
        Err(e) => {
            println!("probe: started (cmdline: unreadable)");
            println!("probe: FAIL zero page at 0x{zero_page:x}: {e}");
            println!("probe: 0 passed, 1 failed");
            return Ending::Status(1);
        }
    };
    let mem = PhysMem::from_ranges(boot_params.e820_table().iter().map(|e| (e.addr, e.size)));
    let mut cmdline_buf = [0u8; CMDLINE_CAPACITY];
    let cmdline = bootparams::read_cmdline(&mem, &boot_params, &mut cmdline_buf);
    let cmdline_bytes: &[u8] = match &cmdline {
        Ok(c) => {
            println!("probe: started (cmdline: {})", Escaped(c));
            c
        }
        Err(e) => {
            println!("probe: started (cmdline: unreadable: {e})");
            b""
        }
    };
    let args = Args::parse(cmdline_bytes);
    let ctx = Context {
        zero_page,
        boot_params: &boot_params,
        cmdline,
        args: &args,
        mem: &mem,
    };

    let mut passed = 0u32;
    let mut failed = 0u32;
    for key in cmdline::unknown_probe_keys(cmdline_bytes) {
        println!("probe: warning: unknown key {} ignored", Escaped(key));
    }
    if let Some(Err(raw)) = args.exit {
        println!(
            "probe: FAIL probe.exit={}: expected 0..255, reset, poweroff or hang",
            Escaped(raw)
        );
        failed += 1;
    }
    if let Some(Err(raw)) = args.tick_ms {
        println!(
            "probe: FAIL probe.tick_ms={}: expected {}..={} (milliseconds)",
            Escaped(raw),
            cmdline::TICK_MS.start(),
            cmdline::TICK_MS.end()
        );
        failed += 1;
    }
    // Found before the checks run, so that a platform without S5 fails like a bad probe.exit.
    let s5 = match args.exit {
        Some(Ok(Ending::Poweroff)) => match acpi::find_s5(&mem, boot_params.acpi_rsdp_addr) {
            Ok(s5) => Some(s5),
            Err(e) => {
                println!("probe: FAIL probe.exit=poweroff: {e}");
                failed += 1;
                None
            }
        },
        _ => None,
    };
    match args.tests {
        None => {
            println!("probe: FAIL no checks requested (no probe.tests= on the command line)");
            failed += 1;
        }
        Some(list) => {
            for name in cmdline::test_names(list) {
                if run_check(&ctx, name) {
                    passed += 1;
                } else {
                    failed += 1;
                }
            }
        }
    }
    println!("probe: {passed} passed, {failed} failed");
    if let Some(Ok(Ending::Hang)) = args.exit {
        // Returns only to reset (Ctrl+Alt+Del).
        return wait::wait(&ctx);
    }

    match (args.exit, s5) {
        (Some(Ok(Ending::Poweroff)), Some(s5)) => exit::poweroff(&s5),
        // No S5 in the tables (reported above).
        (Some(Ok(Ending::Poweroff)), None) => Ending::Status(1),
        (Some(Ok(ending)), _) => ending,
        _ => Ending::Status(u8::from(failed != 0)),
    }
}

/// Runs the check called `name` and prints its line; true if it passed.
fn run_check(ctx: &Context<'_>, name: &[u8]) -> bool {
    let Some(check) = checks::find(name) else {
        println!("probe: {} FAIL unknown check", Escaped(name));
        return false;
    };
    let mut report = Report::default();
    (check.run)(ctx, &mut report);
    if report.failed() {
        println!("probe: {} FAIL {}", check.name, report.problems());
        false
    } else {
        println!("probe: {} ok ({})", check.name, report.details());
        true
    }
}

#[cfg(not(test))]
#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    match info.location() {
        Some(loc) => println!(
            "probe: FAIL panic at {}:{}: {}",
            loc.file(),
            loc.line(),
            info.message()
        ),
        None => println!("probe: FAIL panic: {}", info.message()),
    }
    exit::end(Ending::Status(1))
}
