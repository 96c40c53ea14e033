//! The `boot` check: did the VMM hand over a machine as the Linux x86 boot protocol and cgvm's
//! platform promise?
//!
//! In order, each part adding a finding or a problem (all parts run even after a failure):
//! 1. command line: present, NUL-terminated within `cmdline_size`, printable, has `probe.tests=`;
//! 2. memory: the e820 map is well-formed and agrees with the CMOS memory-size registers, and
//!    with `probe.mem` when given;
//! 3. CPUs: RSDP → XSDT/RSDT → MADT, all checksummed; enabled CPUs with unique APIC IDs, equal
//!    to `probe.cpus` when given; an IOAPIC;
//! 4. the boot timer: 0 before, non-zero after writing 123 (this marks boot complete);
//! 5. COM1: scratch register, transmitter empty, loopback.

use crate::acpi::{self, AcpiError, RsdpSource};
use crate::bootparams::{summarize_e820, E820Summary};
use crate::boottimer;
use crate::checks::{Context, Report};
use crate::cmos::MemorySize;
use crate::serial;
use crate::text::{is_printable, Escaped, Size};

const KIB_64: u64 = 64 << 10;
const MIB: u64 = 1 << 20;
const MIB_16: u64 = 16 << 20;

/// Runs the boot check.
pub fn run(ctx: &Context<'_>, report: &mut Report) {
    check_cmdline(ctx, report);
    let e820 = check_e820(ctx, report);
    check_memory_size(ctx, report, e820.as_ref());
    check_cpus(ctx, report);
    check_boot_timer(report);
    check_serial(report);
}

fn check_cmdline(ctx: &Context<'_>, r: &mut Report) {
    let cmdline = match ctx.cmdline {
        Ok(c) => c,
        Err(e) => return r.fail(format_args!("cmdline: {e}")),
    };
    if let Some(i) = cmdline.iter().position(|&b| !is_printable(b)) {
        r.fail(format_args!(
            "cmdline: byte 0x{:02x} at offset {i} is not printable ASCII",
            cmdline[i]
        ));
    } else if !cmdline.windows(12).any(|w| w == b"probe.tests=") {
        r.fail(format_args!("cmdline: no probe.tests="));
    } else {
        r.detail(format_args!(
            "zero page 0x{:x}, cmdline {} bytes at 0x{:x} (cmdline_size {})",
            ctx.zero_page,
            cmdline.len(),
            ctx.boot_params.cmd_line_ptr,
            ctx.boot_params.cmdline_size
        ));
    }
}

fn check_e820(ctx: &Context<'_>, r: &mut Report) -> Option<E820Summary> {
    let bp = ctx.boot_params;
    match summarize_e820(bp.e820_entries, bp.e820_table()) {
        Ok(s) => {
            r.detail(format_args!(
                "e820 {} entries, RAM {} (top below 4 GiB 0x{:x}, above 4 GiB {})",
                s.entries,
                Size(s.ram_total),
                s.ram_top_below_4g,
                Size(s.ram_above_4g)
            ));
            Some(s)
        }
        Err(e) => {
            r.fail(format_args!("e820: {e}"));
            None
        }
    }
}

fn check_memory_size(ctx: &Context<'_>, r: &mut Report, e820: Option<&E820Summary>) {
    let cmos = MemorySize::read();
    let cmos_top = MIB_16 + u64::from(cmos.above_16m_64k) * KIB_64;
    let cmos_above_4g = u64::from(cmos.above_4g_64k) * KIB_64;
    let capped = cmos.above_16m_64k == MemorySize::ABOVE_16M_CAP;
    let mut agree = true;
    if let Some(s) = e820 {
        let top_ok = if capped {
            s.ram_top_below_4g >= cmos_top
        } else if s.ram_top_below_4g <= MIB_16 {
            cmos.above_16m_64k == 0
        } else {
            s.ram_top_below_4g == cmos_top
        };
        if !top_ok {
            agree = false;
            r.fail(format_args!(
                "cmos: registers 0x34/0x35 = 0x{:04x} (RAM below 4 GiB ends at 0x{cmos_top:x}{}), \
                 e820 says 0x{:x}",
                cmos.above_16m_64k,
                if capped { " or above" } else { "" },
                s.ram_top_below_4g
            ));
        }
        if s.ram_above_4g != cmos_above_4g {
            agree = false;
            r.fail(format_args!(
                "cmos: registers 0x5b..0x5d = 0x{:06x} ({} above 4 GiB), e820 says {}",
                cmos.above_4g_64k,
                Size(cmos_above_4g),
                Size(s.ram_above_4g)
            ));
        }
    }
    if agree {
        r.detail(format_args!(
            "cmos {} above 16 MiB, {} above 4 GiB{}",
            Size(cmos_top - MIB_16),
            Size(cmos_above_4g),
            if e820.is_some() { " (= e820)" } else { "" }
        ));
    }

    match ctx.args.mem_mib {
        None => {}
        Some(Err(raw)) => r.fail(format_args!(
            "probe.mem={}: expected a number of MiB",
            Escaped(raw)
        )),
        Some(Ok(mib)) => {
            let Some(want) = mib.checked_mul(MIB) else {
                return r.fail(format_args!("probe.mem={mib}: too large"));
            };
            let mut ok = true;
            if capped {
                ok = false;
                r.fail(format_args!(
                    "probe.mem={mib}: CMOS registers 0x34/0x35 are capped, cannot check"
                ));
            } else if cmos_top + cmos_above_4g != want {
                ok = false;
                r.fail(format_args!(
                    "probe.mem={mib}: CMOS says {}",
                    Size(cmos_top + cmos_above_4g)
                ));
            }
            if let Some(s) = e820 {
                if s.ram_total > want || s.ram_total < want.saturating_sub(MIB) {
                    ok = false;
                    r.fail(format_args!(
                        "probe.mem={mib}: e820 RAM {} is not within 1 MiB below {mib} MiB",
                        Size(s.ram_total)
                    ));
                }
            }
            if ok {
                r.detail(format_args!("memory {mib} MiB as expected"));
            }
        }
    }
}

fn check_cpus(ctx: &Context<'_>, r: &mut Report) {
    if let Err(e) = check_acpi(ctx, r) {
        r.fail(format_args!("acpi: {e}"));
    }
}

/// Most APIC IDs listed in the report.
const MAX_LISTED_IDS: usize = 16;

fn check_acpi(ctx: &Context<'_>, r: &mut Report) -> Result<(), AcpiError> {
    let mem = ctx.mem;
    let rsdp = acpi::find_rsdp(mem, ctx.boot_params.acpi_rsdp_addr)?;
    let root = acpi::root_table(mem, &rsdp)?;
    let tables = acpi::tables(mem, &root)?;
    let madt_header = tables.madt.ok_or(AcpiError::NoMadt)?;
    let madt = acpi::parse_madt(mem, &madt_header)?;

    // "acpi RSDP 0xe0000 (zero page) rev 2, XSDT 0xe0024 [FACP APIC]"
    r.detail(format_args!(
        "acpi RSDP 0x{:x} ({}) rev {}, {} 0x{:x} [{}]",
        rsdp.addr,
        match rsdp.source {
            RsdpSource::ZeroPage => "zero page",
            RsdpSource::Scan => "scan",
        },
        rsdp.revision,
        Escaped(&root.header.signature),
        root.header.addr,
        SignatureList(tables.signatures(), tables.count)
    ));

    let ids = madt.apic_ids();
    if ids.is_empty() {
        r.fail(format_args!("MADT lists no enabled CPU"));
    }
    if madt.ioapics == 0 {
        r.fail(format_args!("MADT lists no IOAPIC"));
    }
    match ctx.args.cpus {
        None => {}
        Some(Err(raw)) => r.fail(format_args!(
            "probe.cpus={}: expected a number",
            Escaped(raw)
        )),
        Some(Ok(n)) if n as usize != ids.len() => r.fail(format_args!(
            "MADT lists {} enabled CPUs, probe.cpus={n}",
            ids.len()
        )),
        Some(Ok(_)) => {}
    }
    r.detail(format_args!(
        "CPUs {} (APIC IDs {}{}{}), IOAPICs {}",
        ids.len(),
        IdList(ids),
        if madt.x2apic_cpus > 0 { ", x2APIC" } else { "" },
        if madt.disabled_cpus > 0 {
            ", some disabled"
        } else {
            ""
        },
        madt.ioapics
    ));
    Ok(())
}

/// "FACP APIC ..." for a table list.
struct SignatureList<'a>(&'a [acpi::Signature], usize);

impl core::fmt::Display for SignatureList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, sig) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{}", Escaped(sig))?;
        }
        if self.1 > self.0.len() {
            f.write_str(" ...")?;
        }
        Ok(())
    }
}

/// "0,1,2" for APIC IDs, cut after a few.
struct IdList<'a>(&'a [u32]);

impl core::fmt::Display for IdList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, id) in self.0.iter().take(MAX_LISTED_IDS).enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{id}")?;
        }
        if self.0.len() > MAX_LISTED_IDS {
            f.write_str(",...")?;
        }
        Ok(())
    }
}

fn check_boot_timer(r: &mut Report) {
    let before = boottimer::read();
    if before != 0 {
        r.fail(format_args!(
            "boot timer: reads {before} before boot complete (expected 0)"
        ));
    }
    boottimer::mark_boot_complete();
    match boottimer::read() {
        0 => r.fail(format_args!("boot timer: still 0 after writing 123")),
        us if before == 0 => r.detail(format_args!("boot timer {us} us")),
        _ => {}
    }
}

/// How many received bytes to discard before the loopback test.
const RX_DRAIN_LIMIT: usize = 256;
/// How many LSR polls to wait for the looped-back byte.
const RX_POLL_LIMIT: usize = 100_000;
/// The byte sent through the loopback.
const LOOPBACK_BYTE: u8 = 0xa5;

fn check_serial(r: &mut Report) {
    use serial::{read_reg, write_reg};
    let mut ok = true;

    let old_scratch = read_reg(serial::REG_SCRATCH);
    for value in [0x5a, 0xa5] {
        write_reg(serial::REG_SCRATCH, value);
        let got = read_reg(serial::REG_SCRATCH);
        if got != value {
            ok = false;
            r.fail(format_args!(
                "serial: scratch register read 0x{got:02x} after writing 0x{value:02x}"
            ));
        }
    }
    write_reg(serial::REG_SCRATCH, old_scratch);

    let lsr = read_reg(serial::REG_LSR);
    if lsr & serial::LSR_THR_EMPTY == 0 {
        ok = false;
        r.fail(format_args!(
            "serial: LSR 0x{lsr:02x}: transmitter holding register not empty"
        ));
    }

    // Loopback: what is sent comes back in the receive buffer. No output until MCR is restored.
    let old_mcr = read_reg(serial::REG_MCR);
    write_reg(serial::REG_MCR, old_mcr | serial::MCR_LOOPBACK);
    for _ in 0..RX_DRAIN_LIMIT {
        if read_reg(serial::REG_LSR) & serial::LSR_DATA_READY == 0 {
            break;
        }
        read_reg(serial::REG_DATA);
    }
    write_reg(serial::REG_DATA, LOOPBACK_BYTE);
    let mut received = None;
    for _ in 0..RX_POLL_LIMIT {
        if read_reg(serial::REG_LSR) & serial::LSR_DATA_READY != 0 {
            received = Some(read_reg(serial::REG_DATA));
            break;
        }
        core::hint::spin_loop();
    }
    write_reg(serial::REG_MCR, old_mcr);
    match received {
        Some(LOOPBACK_BYTE) => {}
        Some(other) => {
            ok = false;
            r.fail(format_args!(
                "serial: loopback returned 0x{other:02x}, sent 0x{LOOPBACK_BYTE:02x}"
            ));
        }
        None => {
            ok = false;
            r.fail(format_args!(
                "serial: loopback byte never arrived (LSR data ready stayed clear)"
            ));
        }
    }
    if ok {
        r.detail(format_args!("serial scratch, THR empty, loopback ok"));
    }
}
