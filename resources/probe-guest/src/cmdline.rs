//! The probe's command-line keys.
//!
//! The command line is space-separated words; a word `key=value` sets `key` (the last one wins,
//! as in Linux). Keys the probe reads:
//! - `probe.tests=a,b,c`: the checks to run, in order;
//! - `probe.exit=N` (0..=255), `probe.exit=reset`, `probe.exit=poweroff` or `probe.exit=hang`:
//!   how to end, whatever the results;
//! - `probe.mem=MiB`, `probe.cpus=N`: expected memory size and CPU count for the boot check;
//! - `probe.blk_id=a,b,...`: the ids the blk check expects of the disks, in order;
//! - `probe.blk_sector=N`: the sector the blk check writes and reads (default 0);
//! - `probe.bench_id=ID`, `probe.bench_ms=N`, `probe.bench_qd=N`, `probe.bench_workloads=a,b`:
//!   the blkbench check's disk, time per workload, queue depth and workloads;
//! - `probe.tick_ms=N` (1..=60000): with `probe.exit=hang`, print `probe: tick K` every N ms
//!   while waiting (see `wait`); no ticks without it;
//! - `probe.net=arp|dhcp`, `probe.net_ip=A.B.C.D`, `probe.net_peer=A.B.C.D`: the net check's
//!   mode (default arp), our address and the peer's (defaults 10.0.2.15 and 10.0.2.2);
//! - `probe.vsock_port=N`, `probe.vsock_conns=N`, `probe.vsock_timeout_s=N`,
//!   `probe.vsock_host_port=N`: the vsock check's listening port (default 52), the echo
//!   connections to serve (default 1), the time for them (default 30 s), and the host port to
//!   connect to afterwards (none by default);
//! - `probe.netbench=tx|rx`, `probe.netbench_frame=N`, `probe.netbench_tso=0|1`,
//!   `probe.netbench_ms=N`: the netbench check's direction, frame length, TSO frames, and how
//!   long it sends;
//! - `probe.vsockbench=echo|sink|source`, `probe.vsockbench_port=N`, `probe.vsockbench_ms=N`:
//!   the vsockbench check's mode, listening port and how long a source sends;
//! - `probe.transport=mmio|pci|any`: where the virtio checks look for their devices (default
//!   any: virtio-mmio and virtio-pci);
//! - `probe.pci_irq=msix-masked|intx|msix|intx-ioapic`: how the virtio-pci transport takes a
//!   function's interrupts (default msix-masked; see [`PciIrq`]).
//!
//! Other words are ignored, except unknown `probe.*` keys, which the caller reports.

use crate::exit::Ending;

/// Where the virtio checks look for devices (`probe.transport`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// virtio-mmio only.
    Mmio,
    /// virtio-pci only.
    Pci,
    /// Both (the default).
    #[default]
    Any,
}

/// How the virtio-pci transport takes a function's interrupts (`probe.pci_irq`; the
/// transport's module docs, `virtio::pci`, say what each one checks).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PciIrq {
    /// MSI-X enabled with the function mask set; the pending bits are watched.
    #[default]
    MsixMasked,
    /// MSI-X disabled, every vector NO_VECTOR, INTx enabled; the ISR is watched.
    Intx,
    /// MSI-X enabled and unmasked, interrupts on: the interrupts must arrive.
    Msix,
    /// [`PciIrq::Intx`] with the IOAPIC pin routed to a vector and interrupts on: the
    /// interrupt must arrive.
    IntxIoapic,
}

impl PciIrq {
    /// The modes, as `probe.pci_irq` names them.
    pub const ALL: [Self; 4] = [Self::MsixMasked, Self::Intx, Self::Msix, Self::IntxIoapic];

    /// Its name in `probe.pci_irq`.
    pub fn name(self) -> &'static str {
        match self {
            Self::MsixMasked => "msix-masked",
            Self::Intx => "intx",
            Self::Msix => "msix",
            Self::IntxIoapic => "intx-ioapic",
        }
    }

    /// The mode called `raw`.
    pub fn parse(raw: &[u8]) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name().as_bytes() == raw)
    }

    /// Whether the function's INTx pin is used (MSI-X disabled).
    pub fn intx(self) -> bool {
        matches!(self, Self::Intx | Self::IntxIoapic)
    }

    /// Whether interrupts are taken (rather than only watched).
    pub fn delivered(self) -> bool {
        matches!(self, Self::Msix | Self::IntxIoapic)
    }

    /// The same pin without interrupts taken, for drivers that keep several functions open
    /// at once (the waiting loop's disks): the ring-0 handler acknowledges one function only.
    pub fn polled(self) -> Self {
        match self {
            Self::Msix => Self::MsixMasked,
            Self::IntxIoapic => Self::Intx,
            other => other,
        }
    }
}

/// A parsed value, or the raw value that did not parse.
pub type Setting<'a, T> = Option<Result<T, &'a [u8]>>;

/// The probe's settings from the command line.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Args<'a> {
    /// `probe.tests`: the raw comma-separated list.
    pub tests: Option<&'a [u8]>,
    /// `probe.exit`.
    pub exit: Setting<'a, Ending>,
    /// `probe.mem`, in MiB.
    pub mem_mib: Setting<'a, u64>,
    /// `probe.cpus`.
    pub cpus: Setting<'a, u32>,
    /// `probe.blk_id`: the raw comma-separated list (empty items count).
    pub blk_id: Option<&'a [u8]>,
    /// `probe.blk_sector`.
    pub blk_sector: Setting<'a, u64>,
    /// `probe.bench_id`: the id (GET_ID) of the disk the blkbench check drives.
    pub bench_id: Option<&'a [u8]>,
    /// `probe.bench_ms`: how long each blkbench workload runs, ms.
    pub bench_ms: Setting<'a, u64>,
    /// `probe.bench_qd`: the blkbench queue depth (requests kept in flight).
    pub bench_qd: Setting<'a, u64>,
    /// `probe.bench_workloads`: the raw comma-separated list.
    pub bench_workloads: Option<&'a [u8]>,
    /// `probe.tick_ms`: the period of the waiting loop's ticks, ms ([`TICK_MS`]; a value out
    /// of that range is kept raw).
    pub tick_ms: Setting<'a, u64>,
    /// `probe.net`: the net check's mode (`arp` or `dhcp`), raw.
    pub net: Option<&'a [u8]>,
    /// `probe.net_ip`: our IPv4 address for the ARP request, raw.
    pub net_ip: Option<&'a [u8]>,
    /// `probe.net_peer`: the IPv4 address the ARP request asks for, raw.
    pub net_peer: Option<&'a [u8]>,
    /// `probe.vsock_port`: the guest port the vsock check listens on.
    pub vsock_port: Setting<'a, u64>,
    /// `probe.vsock_host_port`: the host port the vsock check connects to at the end.
    pub vsock_host_port: Setting<'a, u64>,
    /// `probe.vsock_conns`: echo connections to serve.
    pub vsock_conns: Setting<'a, u64>,
    /// `probe.vsock_timeout_s`: the time for them, s.
    pub vsock_timeout_s: Setting<'a, u64>,
    /// `probe.netbench`: the netbench check's direction (`tx` or `rx`), raw.
    pub netbench: Option<&'a [u8]>,
    /// `probe.netbench_frame`: the length of the frames netbench sends, bytes.
    pub netbench_frame: Setting<'a, u64>,
    /// `probe.netbench_tso`: 1 for 64 KiB TSO frames (and TSO receive), 0 for none.
    pub netbench_tso: Setting<'a, u64>,
    /// `probe.netbench_ms`: how long netbench sends, ms.
    pub netbench_ms: Setting<'a, u64>,
    /// `probe.vsockbench`: the vsockbench check's mode (`echo`, `sink`, `source`), raw.
    pub vsockbench: Option<&'a [u8]>,
    /// `probe.vsockbench_port`: the guest port vsockbench listens on.
    pub vsockbench_port: Setting<'a, u64>,
    /// `probe.vsockbench_ms`: how long a vsockbench source sends, ms.
    pub vsockbench_ms: Setting<'a, u64>,
    /// `probe.transport`: where the virtio checks look for devices.
    pub transport: Setting<'a, TransportChoice>,
    /// `probe.pci_irq`: how the virtio-pci transport takes interrupts.
    pub pci_irq: Setting<'a, PciIrq>,
}

/// The periods `probe.tick_ms` takes, ms.
pub const TICK_MS: core::ops::RangeInclusive<u64> = 1..=60_000;

/// Keys the probe knows.
const KNOWN_KEYS: [&[u8]; 27] = [
    b"probe.tests",
    b"probe.exit",
    b"probe.mem",
    b"probe.cpus",
    b"probe.blk_id",
    b"probe.blk_sector",
    b"probe.bench_id",
    b"probe.bench_ms",
    b"probe.bench_qd",
    b"probe.bench_workloads",
    b"probe.tick_ms",
    b"probe.net",
    b"probe.net_ip",
    b"probe.net_peer",
    b"probe.vsock_port",
    b"probe.vsock_host_port",
    b"probe.vsock_conns",
    b"probe.vsock_timeout_s",
    b"probe.netbench",
    b"probe.netbench_frame",
    b"probe.netbench_tso",
    b"probe.netbench_ms",
    b"probe.vsockbench",
    b"probe.vsockbench_port",
    b"probe.vsockbench_ms",
    b"probe.transport",
    b"probe.pci_irq",
];

/// The command line's words.
pub fn words(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    cmdline
        .split(|b| b.is_ascii_whitespace())
        .filter(|w| !w.is_empty())
}

/// Splits a word into key and value (`None` when it has no `=`).
pub fn key_value(word: &[u8]) -> (&[u8], Option<&[u8]>) {
    match word.iter().position(|&b| b == b'=') {
        Some(i) => (&word[..i], Some(&word[i + 1..])),
        None => (word, None),
    }
}

/// Parses a decimal number (digits only, no sign, no overflow).
pub fn parse_decimal(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        if !b.is_ascii_digit() {
            return None;
        }
        acc.checked_mul(10)?.checked_add(u64::from(b - b'0'))
    })
}

impl<'a> Args<'a> {
    /// Parses the probe's keys out of `cmdline`.
    pub fn parse(cmdline: &'a [u8]) -> Self {
        let mut args = Self::default();
        for word in words(cmdline) {
            let (key, value) = key_value(word);
            let raw = value.unwrap_or(b"");
            match key {
                b"probe.tests" => args.tests = Some(raw),
                b"probe.exit" => {
                    args.exit = Some(match raw {
                        b"reset" => Ok(Ending::Reset),
                        b"poweroff" => Ok(Ending::Poweroff),
                        b"hang" => Ok(Ending::Hang),
                        _ => parse_decimal(raw)
                            .and_then(|n| u8::try_from(n).ok())
                            .map(Ending::Status)
                            .ok_or(raw),
                    })
                }
                b"probe.mem" => args.mem_mib = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.cpus" => {
                    args.cpus = Some(
                        parse_decimal(raw)
                            .and_then(|n| u32::try_from(n).ok())
                            .ok_or(raw),
                    )
                }
                b"probe.blk_id" => args.blk_id = Some(raw),
                b"probe.blk_sector" => args.blk_sector = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.bench_id" => args.bench_id = Some(raw),
                b"probe.bench_ms" => args.bench_ms = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.bench_qd" => args.bench_qd = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.bench_workloads" => args.bench_workloads = Some(raw),
                b"probe.tick_ms" => {
                    args.tick_ms = Some(
                        parse_decimal(raw)
                            .filter(|n| TICK_MS.contains(n))
                            .ok_or(raw),
                    )
                }
                b"probe.net" => args.net = Some(raw),
                b"probe.net_ip" => args.net_ip = Some(raw),
                b"probe.net_peer" => args.net_peer = Some(raw),
                b"probe.vsock_port" => args.vsock_port = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.vsock_host_port" => {
                    args.vsock_host_port = Some(parse_decimal(raw).ok_or(raw))
                }
                b"probe.vsock_conns" => args.vsock_conns = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.vsock_timeout_s" => {
                    args.vsock_timeout_s = Some(parse_decimal(raw).ok_or(raw))
                }
                b"probe.netbench" => args.netbench = Some(raw),
                b"probe.netbench_frame" => {
                    args.netbench_frame = Some(parse_decimal(raw).ok_or(raw))
                }
                b"probe.netbench_tso" => args.netbench_tso = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.netbench_ms" => args.netbench_ms = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.vsockbench" => args.vsockbench = Some(raw),
                b"probe.vsockbench_port" => {
                    args.vsockbench_port = Some(parse_decimal(raw).ok_or(raw))
                }
                b"probe.vsockbench_ms" => args.vsockbench_ms = Some(parse_decimal(raw).ok_or(raw)),
                b"probe.transport" => {
                    args.transport = Some(match raw {
                        b"mmio" => Ok(TransportChoice::Mmio),
                        b"pci" => Ok(TransportChoice::Pci),
                        b"any" => Ok(TransportChoice::Any),
                        _ => Err(raw),
                    })
                }
                b"probe.pci_irq" => args.pci_irq = Some(PciIrq::parse(raw).ok_or(raw)),
                _ => {}
            }
        }
        args
    }
}

/// The `probe.*` keys in `cmdline` that the probe does not know.
pub fn unknown_probe_keys(cmdline: &[u8]) -> impl Iterator<Item = &[u8]> {
    words(cmdline)
        .map(|w| key_value(w).0)
        .filter(|k| k.starts_with(b"probe.") && !KNOWN_KEYS.contains(k))
}

/// The names in a `probe.tests` list (empty items skipped).
pub fn test_names(list: &[u8]) -> impl Iterator<Item = &[u8]> {
    list.split(|&b| b == b',').filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    #[test]
    fn parses_probe_keys() {
        let line = b"console=ttyS0  probe.tests=boot,blk probe.mem=256\tprobe.cpus=2 probe.exit=7";
        let args = Args::parse(line);
        assert_eq!(args.tests, Some(&b"boot,blk"[..]));
        assert_eq!(args.mem_mib, Some(Ok(256)));
        assert_eq!(args.cpus, Some(Ok(2)));
        assert_eq!(args.exit, Some(Ok(Ending::Status(7))));
        assert_eq!(args.blk_id, None);
        assert_eq!(args.blk_sector, None);
        let names: Vec<&[u8]> = test_names(args.tests.unwrap_or_default()).collect();
        assert_eq!(names, [&b"boot"[..], &b"blk"[..]]);
    }

    #[test]
    fn exit_values() {
        assert_eq!(
            Args::parse(b"probe.exit=reset").exit,
            Some(Ok(Ending::Reset))
        );
        assert_eq!(
            Args::parse(b"probe.exit=poweroff").exit,
            Some(Ok(Ending::Poweroff))
        );
        assert_eq!(Args::parse(b"probe.exit=hang").exit, Some(Ok(Ending::Hang)));
        assert_eq!(
            Args::parse(b"probe.exit=hang2").exit,
            Some(Err(&b"hang2"[..]))
        );
        assert_eq!(
            Args::parse(b"probe.exit=Poweroff").exit,
            Some(Err(&b"Poweroff"[..]))
        );
        assert_eq!(
            Args::parse(b"probe.exit=255").exit,
            Some(Ok(Ending::Status(255)))
        );
        assert_eq!(Args::parse(b"probe.exit=256").exit, Some(Err(&b"256"[..])));
        assert_eq!(Args::parse(b"probe.exit=-1").exit, Some(Err(&b"-1"[..])));
        assert_eq!(Args::parse(b"probe.exit").exit, Some(Err(&b""[..])));
        assert_eq!(Args::parse(b"").exit, None);
    }

    #[test]
    fn last_value_wins_and_bad_numbers_are_kept_raw() {
        let args = Args::parse(b"probe.mem=1 probe.mem=x2 probe.cpus=99999999999");
        assert_eq!(args.mem_mib, Some(Err(&b"x2"[..])));
        assert_eq!(args.cpus, Some(Err(&b"99999999999"[..])));
        assert_eq!(parse_decimal(b"18446744073709551616"), None);
        assert_eq!(parse_decimal(b"18446744073709551615"), Some(u64::MAX));
    }

    #[test]
    fn unknown_keys_and_empty_names() {
        let line = b"probe.tests=,boot,, probe.bogus=1 probe. quiet probe.tests";
        let unknown: Vec<&[u8]> = unknown_probe_keys(line).collect();
        assert_eq!(unknown, [&b"probe.bogus"[..], &b"probe."[..]]);
        let names: Vec<&[u8]> = test_names(b",boot,,").collect();
        assert_eq!(names, [&b"boot"[..]]);
        // A bare `probe.tests` (no '=') means an empty list.
        assert_eq!(Args::parse(line).tests, Some(&b""[..]));
    }

    #[test]
    fn blk_keys() {
        let args = Args::parse(b"probe.blk_id=data,,x probe.blk_sector=4096");
        assert_eq!(args.blk_id, Some(&b"data,,x"[..]));
        assert_eq!(args.blk_sector, Some(Ok(4096)));
        assert_eq!(
            Args::parse(b"probe.blk_sector=0x10").blk_sector,
            Some(Err(&b"0x10"[..]))
        );
        assert_eq!(Args::parse(b"probe.blk_id=").blk_id, Some(&b""[..]));
        assert_eq!(
            unknown_probe_keys(b"probe.blk_id=a probe.blk_sector=1 probe.blk=2").count(),
            1
        );
    }

    #[test]
    fn bench_keys() {
        let args = Args::parse(
            b"probe.bench_id=data probe.bench_ms=500 probe.bench_qd=8 probe.bench_workloads=a,b",
        );
        assert_eq!(args.bench_id, Some(&b"data"[..]));
        assert_eq!(args.bench_ms, Some(Ok(500)));
        assert_eq!(args.bench_qd, Some(Ok(8)));
        assert_eq!(args.bench_workloads, Some(&b"a,b"[..]));
        assert_eq!(
            Args::parse(b"probe.bench_qd=x").bench_qd,
            Some(Err(&b"x"[..]))
        );
        assert_eq!(Args::parse(b"").bench_ms, None);
        assert_eq!(
            unknown_probe_keys(
                b"probe.bench_id=a probe.bench_ms=1 probe.bench_qd=2 probe.bench_workloads= \
                  probe.bench=3"
            )
            .count(),
            1
        );
    }

    #[test]
    fn tick_key() {
        assert_eq!(Args::parse(b"probe.tick_ms=200").tick_ms, Some(Ok(200)));
        assert_eq!(Args::parse(b"probe.tick_ms=1").tick_ms, Some(Ok(1)));
        assert_eq!(
            Args::parse(b"probe.tick_ms=60000").tick_ms,
            Some(Ok(60_000))
        );
        assert_eq!(Args::parse(b"").tick_ms, None);
        assert_eq!(Args::parse(b"probe.exit=hang").tick_ms, None);
        // Out of 1..=60000, not a decimal number, or no value: kept raw.
        for bad in [
            &b"0"[..],
            b"60001",
            b"99999999999999999999999",
            b"-5",
            b"1.5",
            b"0x10",
            b" ",
            b"",
        ] {
            let mut word = b"probe.tick_ms=".to_vec();
            word.extend_from_slice(bad);
            let want = if bad == b" " { &b""[..] } else { bad };
            assert_eq!(Args::parse(&word).tick_ms, Some(Err(want)), "{bad:?}");
        }
        assert_eq!(Args::parse(b"probe.tick_ms").tick_ms, Some(Err(&b""[..])));
        // The last one wins.
        assert_eq!(
            Args::parse(b"probe.tick_ms=5 probe.tick_ms=7").tick_ms,
            Some(Ok(7))
        );
        assert_eq!(
            Args::parse(b"probe.tick_ms=5 probe.tick_ms=0").tick_ms,
            Some(Err(&b"0"[..]))
        );
        // Known, so not reported; a near miss is.
        let unknown: Vec<&[u8]> =
            unknown_probe_keys(b"probe.tick_ms=100 probe.tick=1 probe.tick_ms_x=2").collect();
        assert_eq!(unknown, [&b"probe.tick"[..], &b"probe.tick_ms_x"[..]]);
    }

    #[test]
    fn net_and_vsock_keys() {
        let args = Args::parse(
            b"probe.net=dhcp probe.net_ip=10.0.0.5 probe.net_peer=10.0.0.1 probe.vsock_port=1234 \
              probe.vsock_host_port=5000 probe.vsock_conns=3 probe.vsock_timeout_s=9",
        );
        assert_eq!(args.net, Some(&b"dhcp"[..]));
        assert_eq!(args.net_ip, Some(&b"10.0.0.5"[..]));
        assert_eq!(args.net_peer, Some(&b"10.0.0.1"[..]));
        assert_eq!(args.vsock_port, Some(Ok(1234)));
        assert_eq!(args.vsock_host_port, Some(Ok(5000)));
        assert_eq!(args.vsock_conns, Some(Ok(3)));
        assert_eq!(args.vsock_timeout_s, Some(Ok(9)));
        assert_eq!(Args::parse(b"").net, None);
        assert_eq!(Args::parse(b"").vsock_host_port, None);
        assert_eq!(
            Args::parse(b"probe.vsock_port=x").vsock_port,
            Some(Err(&b"x"[..]))
        );
        let unknown: Vec<&[u8]> = unknown_probe_keys(
            b"probe.net=arp probe.net_ip=1 probe.net_peer=2 probe.vsock_port=1 \
              probe.vsock_host_port=2 probe.vsock_conns=1 probe.vsock_timeout_s=1 \
              probe.vsock=1 probe.net_mac=x",
        )
        .collect();
        assert_eq!(unknown, [&b"probe.vsock"[..], &b"probe.net_mac"[..]]);
    }

    #[test]
    fn bench_net_and_vsock_keys() {
        let args = Args::parse(
            b"probe.netbench=rx probe.netbench_frame=64 probe.netbench_tso=1 \
              probe.netbench_ms=1500 probe.vsockbench=sink probe.vsockbench_port=77 \
              probe.vsockbench_ms=900",
        );
        assert_eq!(args.netbench, Some(&b"rx"[..]));
        assert_eq!(args.netbench_frame, Some(Ok(64)));
        assert_eq!(args.netbench_tso, Some(Ok(1)));
        assert_eq!(args.netbench_ms, Some(Ok(1500)));
        assert_eq!(args.vsockbench, Some(&b"sink"[..]));
        assert_eq!(args.vsockbench_port, Some(Ok(77)));
        assert_eq!(args.vsockbench_ms, Some(Ok(900)));
        assert_eq!(
            Args::parse(b"probe.netbench_frame=1k").netbench_frame,
            Some(Err(&b"1k"[..]))
        );
        assert_eq!(Args::parse(b"").netbench, None);
        let unknown: Vec<&[u8]> = unknown_probe_keys(
            b"probe.netbench=tx probe.netbench_frame=1 probe.netbench_tso=0 probe.netbench_ms=1 \
              probe.vsockbench=echo probe.vsockbench_port=1 probe.vsockbench_ms=1 \
              probe.netbench_size=1 probe.vsockbench_conns=2",
        )
        .collect();
        assert_eq!(
            unknown,
            [&b"probe.netbench_size"[..], &b"probe.vsockbench_conns"[..]]
        );
    }

    #[test]
    fn transport_key() {
        assert_eq!(Args::parse(b"").transport, None);
        assert_eq!(
            Args::parse(b"probe.transport=mmio").transport,
            Some(Ok(TransportChoice::Mmio))
        );
        assert_eq!(
            Args::parse(b"probe.transport=pci").transport,
            Some(Ok(TransportChoice::Pci))
        );
        assert_eq!(
            Args::parse(b"probe.transport=pci probe.transport=any").transport,
            Some(Ok(TransportChoice::Any))
        );
        assert_eq!(
            Args::parse(b"probe.transport=PCI").transport,
            Some(Err(&b"PCI"[..]))
        );
        assert_eq!(
            Args::parse(b"probe.transport").transport,
            Some(Err(&b""[..]))
        );
        assert_eq!(unknown_probe_keys(b"probe.transport=pci").count(), 0);
    }

    #[test]
    fn pci_irq_key() {
        assert_eq!(Args::parse(b"").pci_irq, None);
        for (raw, mode) in [
            (&b"msix-masked"[..], PciIrq::MsixMasked),
            (b"intx", PciIrq::Intx),
            (b"msix", PciIrq::Msix),
            (b"intx-ioapic", PciIrq::IntxIoapic),
        ] {
            let mut word = b"probe.pci_irq=".to_vec();
            word.extend_from_slice(raw);
            assert_eq!(Args::parse(&word).pci_irq, Some(Ok(mode)));
            assert_eq!(mode.name().as_bytes(), raw);
        }
        for bad in [&b"MSIX"[..], b"intx-", b"msi", b"", b"legacy"] {
            let mut word = b"probe.pci_irq=".to_vec();
            word.extend_from_slice(bad);
            assert_eq!(Args::parse(&word).pci_irq, Some(Err(bad)), "{bad:?}");
        }
        assert_eq!(
            Args::parse(b"probe.pci_irq=msix probe.pci_irq=intx").pci_irq,
            Some(Ok(PciIrq::Intx))
        );
        assert_eq!(PciIrq::default(), PciIrq::MsixMasked);
        assert_eq!(
            unknown_probe_keys(b"probe.pci_irq=intx probe.irq=1").count(),
            1
        );
        // What the modes mean for the transport.
        assert!(PciIrq::Intx.intx() && PciIrq::IntxIoapic.intx());
        assert!(!PciIrq::Msix.intx() && !PciIrq::MsixMasked.intx());
        assert!(PciIrq::Msix.delivered() && PciIrq::IntxIoapic.delivered());
        assert!(!PciIrq::Intx.delivered() && !PciIrq::MsixMasked.delivered());
        assert_eq!(PciIrq::Msix.polled(), PciIrq::MsixMasked);
        assert_eq!(PciIrq::IntxIoapic.polled(), PciIrq::Intx);
        assert_eq!(PciIrq::Intx.polled(), PciIrq::Intx);
        assert_eq!(PciIrq::MsixMasked.polled(), PciIrq::MsixMasked);
    }
}
