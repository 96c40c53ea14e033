//! `VmConfig`: the one description of a machine, built by the CLI (and later the API and the
//! config file), and its one validation path.

use std::path::PathBuf;
use std::time::Duration;

use devices::rate_limiter::{RateLimiterConfig, TokenBucket};
use serde::{Deserialize, Serialize};

/// Most vCPUs a machine may have.
pub const MAX_VCPUS: u8 = 32;
/// Most disks a machine may have.
pub const MAX_DISKS: usize = 16;
/// Longest drive id (the virtio-blk serial is 20 bytes).
pub const MAX_DISK_ID_LEN: usize = 20;

/// How a disk's I/O is done on its device thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum BlockEngine {
    /// pread/pwrite/fdatasync on the device thread.
    Sync,
    /// io_uring: requests in flight together, completions through an eventfd.
    #[default]
    Uring,
}

/// One disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file (raw).
    pub path: PathBuf,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
    /// Guest writes go to a throw-away overlay; the file is never written.
    #[serde(default)]
    pub ephemeral: bool,
    /// The drive id, also the serial GET_ID returns; `diskN` when not given.
    pub id: Option<String>,
    /// The I/O engine.
    #[serde(default)]
    pub engine: BlockEngine,
    /// Limits on bytes and requests per second.
    #[serde(default)]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// Parses a size: a number of bytes, or with a K, M or G suffix (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'K' | 'k')) => (&s[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&s[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("'{s}': expected a size above 0 such as 4096, 64K, 10M or 1G"))
}

/// A token bucket that allows `per_second` tokens each second.
pub fn per_second(per_second: u64) -> TokenBucket {
    TokenBucket {
        size: per_second,
        one_time_burst: None,
        refill_time_ms: 1000,
    }
}

impl DiskConfig {
    /// Parses the CLI form `PATH[,ro|,persist][,id=ID][,engine=sync|uring]`. Disks given on
    /// the command line are ephemeral unless `persist` (or `ro`) says otherwise.
    pub fn parse_cli(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(',');
        let path = parts
            .next()
            .filter(|p| !p.is_empty())
            .ok_or("--disk needs a path")?;
        let mut d = DiskConfig {
            path: PathBuf::from(path),
            read_only: false,
            ephemeral: true,
            id: None,
            engine: BlockEngine::default(),
            rate_limiter: None,
        };
        let mut persist = false;
        let mut limits = RateLimiterConfig::default();
        for opt in parts {
            let bad = |what: String| format!("--disk {spec}: {what}");
            match opt.split_once('=') {
                None if opt == "ro" => d.read_only = true,
                None if opt == "persist" => persist = true,
                Some(("id", id)) => d.id = Some(id.to_string()),
                Some(("engine", "sync")) => d.engine = BlockEngine::Sync,
                Some(("engine", "uring")) => d.engine = BlockEngine::Uring,
                Some(("engine", e)) => {
                    return Err(bad(format!("engine '{e}': expected sync or uring")));
                }
                Some(("bw", v)) => {
                    let bytes = parse_size(v).map_err(|e| bad(format!("bw={e}")))?;
                    limits.bandwidth = Some(per_second(bytes));
                }
                Some(("iops", v)) => {
                    let n = v.parse::<u64>().ok().filter(|&n| n > 0);
                    let n =
                        n.ok_or_else(|| bad(format!("iops '{v}': expected a number above 0")))?;
                    limits.ops = Some(per_second(n));
                }
                _ => {
                    return Err(bad(format!(
                        "unknown option '{opt}' (ro, persist, id=ID, engine=sync|uring, bw=SIZE, iops=N)"
                    )));
                }
            }
        }
        if d.read_only && persist {
            return Err(format!(
                "--disk {spec}: 'ro' and 'persist' contradict each other"
            ));
        }
        d.ephemeral = !persist && !d.read_only;
        d.rate_limiter = (!limits.is_unlimited()).then_some(limits);
        Ok(d)
    }
}
/// The vsock device: the guest's CID and the host socket its connections go through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub cid: u32,
    /// Host clients connect here; guest connections to port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Parses the CLI form `CID[,uds=PATH]`; without `uds=` the socket is
    /// `$XDG_RUNTIME_DIR/cgvm-<pid>.vsock` (or under /tmp).
    pub fn parse_cli(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(',');
        let cid_text = parts.next().unwrap_or_default();
        let cid = cid_text
            .parse::<u32>()
            .ok()
            .filter(|&c| c >= 3 && c != u32::MAX)
            .ok_or_else(|| {
                format!("--vsock {spec}: CID '{cid_text}' must be a number from 3 to 4294967294")
            })?;
        let mut uds_path = None;
        for opt in parts {
            match opt.split_once('=') {
                Some(("uds", p)) if !p.is_empty() => uds_path = Some(PathBuf::from(p)),
                _ => return Err(format!("--vsock {spec}: unknown option '{opt}' (uds=PATH)")),
            }
        }
        let uds_path = uds_path.unwrap_or_else(|| {
            let dir = std::env::var_os("XDG_RUNTIME_DIR")
                .map(PathBuf::from)
                .filter(|d| d.is_dir())
                .unwrap_or_else(std::env::temp_dir);
            dir.join(format!("cgvm-{}.vsock", std::process::id()))
        });
        Ok(Self { cid, uds_path })
    }
}

/// How the guest finds its virtio devices.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// virtio-mmio: windows announced on the command line and in the DSDT (microVM kernels,
    /// Firecracker's choice).
    Mmio,
    /// virtio-pci with MSI-X on a PCI host bridge (distribution kernels).
    Pci,
}

impl std::str::FromStr for Transport {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "mmio" => Ok(Self::Mmio),
            "pci" => Ok(Self::Pci),
            _ => Err(format!("transport '{s}': expected mmio or pci")),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Mmio => "mmio",
            Self::Pci => "pci",
        })
    }
}

/// Most network interfaces a machine may have.
pub const MAX_NETS: usize = 8;
/// Longest network interface id (Firecracker's `iface_id`).
pub const MAX_NET_ID_LEN: usize = 64;

/// Where a network interface's frames go on the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum NetBackend {
    /// An existing TAP interface, by name (in the network namespace cgvm runs in).
    Tap {
        /// The interface's name.
        name: String,
    },
    /// Rootless networking: a passt process started for this machine, stopped with it.
    User {
        /// Host TCP ports forwarded to guest ports.
        #[serde(default)]
        publish: Vec<crate::passt::Publish>,
    },
}

/// One network interface (virtio-net device).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetIfaceConfig {
    /// The interface id (Firecracker's `iface_id`); `ethN` when not given.
    pub id: Option<String>,
    /// Where its frames go.
    pub backend: NetBackend,
    /// The guest's MAC address; without one the guest picks a random one.
    #[serde(default)]
    pub mac: Option<[u8; 6]>,
    /// Limits what the guest receives (bytes and frames per second).
    #[serde(default)]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits what the guest sends.
    #[serde(default)]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Parses a MAC address `aa:bb:cc:dd:ee:ff` (hex digits, either case) that a guest may use as
/// its own: not a multicast (or broadcast) address, not all zeros.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let bad = |why: &str| format!("MAC address '{s}': {why}");
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in mac.iter_mut() {
        let p = parts
            .next()
            .ok_or_else(|| bad("expected six hex bytes separated by ':'"))?;
        if p.len() != 2 {
            return Err(bad("expected six hex bytes separated by ':'"));
        }
        *byte = u8::from_str_radix(p, 16)
            .map_err(|_| bad("expected six hex bytes separated by ':'"))?;
    }
    if parts.next().is_some() {
        return Err(bad("expected six hex bytes separated by ':'"));
    }
    if mac[0] & 1 != 0 {
        return Err(bad("a multicast address cannot be an interface's own"));
    }
    if mac == [0; 6] {
        return Err(bad("all zeros is not an address"));
    }
    Ok(mac)
}

/// Formats a MAC address as `aa:bb:cc:dd:ee:ff`.
pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl NetIfaceConfig {
    /// Parses the CLI form `tap:NAME[,mac=M][,id=ID]` or `user[,mac=M][,id=ID]`.
    pub fn parse_cli(spec: &str) -> Result<Self, String> {
        let mut parts = spec.split(',');
        let kind = parts.next().unwrap_or_default();
        let backend = match kind.split_once(':') {
            Some(("tap", name)) if !name.is_empty() => NetBackend::Tap {
                name: name.to_string(),
            },
            None if kind == "user" => NetBackend::User {
                publish: Vec::new(),
            },
            _ => {
                return Err(format!(
                    "--net {spec}: expected tap:NAME or user, then ,mac=M or ,id=ID"
                ))
            }
        };
        let mut net = Self {
            id: None,
            backend,
            mac: None,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        for opt in parts {
            match opt.split_once('=') {
                Some(("mac", m)) => {
                    net.mac = Some(parse_mac(m).map_err(|e| format!("--net {spec}: {e}"))?)
                }
                Some(("id", id)) if !id.is_empty() => net.id = Some(id.to_string()),
                _ => {
                    return Err(format!(
                        "--net {spec}: unknown option '{opt}' (mac=M, id=ID)"
                    ))
                }
            }
        }
        Ok(net)
    }
}

/// Kernel command line used when none is given.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ConsoleConfig {
    /// Standard output, with standard input as the guest's keyboard (raw mode on a TTY).
    #[default]
    Tty,
    /// Appended to a file (created if missing); no input.
    File(PathBuf),
    /// Discarded.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "tty" => Ok(Self::Tty),
            "none" => Ok(Self::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(Self::File(PathBuf::from(p))),
                _ => Err(format!("console '{s}': expected tty, file:PATH or none")),
            },
        }
    }
}

/// A machine to run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel: PathBuf,
    /// An initrd/initramfs, if any.
    pub initrd: Option<PathBuf>,
    /// The kernel command line (device entries are appended to it).
    pub cmdline: String,
    /// Number of vCPUs, 1 to [`MAX_VCPUS`].
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub mem_mib: u64,
    /// Where the serial console goes.
    pub console: ConsoleConfig,
    /// Stop the guest after this long.
    pub timeout: Option<Duration>,
    /// Use an ELF kernel's PVH entry when it has one (32-bit entry; needs hardware
    /// virtualization). Off: the 64-bit Linux entry.
    pub pvh: bool,
    /// A virtio-rng entropy device.
    #[serde(default)]
    pub rng: bool,
    /// Limits on the entropy device's bytes per second.
    #[serde(default)]
    pub rng_rate_limiter: Option<RateLimiterConfig>,
    /// Disks, in the order the guest sees them (vda, vdb, ...).
    #[serde(default)]
    pub disks: Vec<DiskConfig>,
    /// The vsock device, if any.
    #[serde(default)]
    pub vsock: Option<VsockConfig>,
    /// Network interfaces, in the order the guest sees them (eth0, eth1, ...).
    #[serde(default)]
    pub nets: Vec<NetIfaceConfig>,
    /// Install the seccomp filters (off only for debugging).
    #[serde(default = "default_true")]
    pub seccomp: bool,
    /// The virtio transport; `None` picks by kernel: PCI for a bzImage (distribution
    /// kernels), MMIO for an ELF vmlinux (microVM kernels).
    #[serde(default)]
    pub transport: Option<Transport>,
}

fn default_true() -> bool {
    true
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: PathBuf::new(),
            initrd: None,
            cmdline: DEFAULT_CMDLINE.to_string(),
            vcpus: 1,
            mem_mib: 256,
            console: ConsoleConfig::Tty,
            timeout: None,
            pvh: false,
            rng: false,
            rng_rate_limiter: None,
            disks: Vec::new(),
            vsock: None,
            nets: Vec::new(),
            seccomp: true,
            transport: None,
        }
    }
}

/// What is wrong with a configuration.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// vCPU count out of range.
    #[error("vcpu count {0} is out of range: a machine has 1 to {MAX_VCPUS} vCPUs")]
    VcpuCount(u64),
    /// Memory size zero.
    #[error("memory size must be at least 1 MiB (got 0)")]
    MemoryZero,
    /// More memory than the host has.
    #[error("memory size {asked} MiB is more than this host's {host} MiB of RAM")]
    MemoryTooLarge {
        /// What was asked.
        asked: u64,
        /// What the host has.
        host: u64,
    },
    /// No kernel given.
    #[error("no kernel given")]
    NoKernel,
    /// The kernel command line is too long.
    #[error("kernel command line is {0} bytes; the limit is 65535")]
    CmdlineTooLong(usize),
    /// A zero timeout.
    #[error("timeout must be more than 0 seconds")]
    TimeoutZero,
    /// Too many disks.
    #[error("{0} disks given; a machine has at most {MAX_DISKS}")]
    TooManyDisks(usize),
    /// A drive id that is too long, empty, or used twice.
    #[error("drive id '{0}': ids must be 1 to {MAX_DISK_ID_LEN} bytes and unique")]
    BadDiskId(String),
    /// Too many network interfaces.
    #[error("{0} network interfaces given; a machine has at most {MAX_NETS}")]
    TooManyNets(usize),
    /// An interface id that is too long, empty, or used twice.
    #[error("network interface id '{0}': ids must be 1 to {MAX_NET_ID_LEN} bytes and unique")]
    BadNetId(String),
    /// A tap name Linux would refuse, and why.
    #[error("tap '{0}': not a valid interface name: {1}")]
    BadTapName(String, &'static str),
    /// Two interfaces on one tap.
    #[error("tap '{0}' is given to two network interfaces")]
    TapTwice(String),
    /// A guest MAC address used twice.
    #[error("MAC address {0} is given to two network interfaces")]
    MacTwice(String),
}

/// The host's physical memory in MiB, from /proc/meminfo (read once: every machine-config
/// request checks against it, and it does not change under a running process).
pub fn host_memory_mib() -> Option<u64> {
    static MIB: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *MIB.get_or_init(read_host_memory_mib)
}

fn read_host_memory_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

impl VmConfig {
    /// Checks everything that can be checked without touching files or KVM.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return Err(ConfigError::VcpuCount(u64::from(self.vcpus)));
        }
        if self.mem_mib == 0 {
            return Err(ConfigError::MemoryZero);
        }
        if let Some(host) = host_memory_mib() {
            if self.mem_mib > host {
                return Err(ConfigError::MemoryTooLarge {
                    asked: self.mem_mib,
                    host,
                });
            }
        }
        if self.kernel.as_os_str().is_empty() {
            return Err(ConfigError::NoKernel);
        }
        if self.cmdline.len() >= 0xffff {
            return Err(ConfigError::CmdlineTooLong(self.cmdline.len()));
        }
        if self.timeout == Some(Duration::ZERO) {
            return Err(ConfigError::TimeoutZero);
        }
        if self.disks.len() > MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disks.len()));
        }
        let ids = self.disk_ids();
        for (i, id) in ids.iter().enumerate() {
            if id.is_empty() || id.len() > MAX_DISK_ID_LEN || ids[..i].contains(id) {
                return Err(ConfigError::BadDiskId(id.clone()));
            }
        }
        self.validate_nets()
    }

    fn validate_nets(&self) -> Result<(), ConfigError> {
        if self.nets.len() > MAX_NETS {
            return Err(ConfigError::TooManyNets(self.nets.len()));
        }
        let ids = self.net_ids();
        for (i, (net, id)) in self.nets.iter().zip(&ids).enumerate() {
            if id.is_empty() || id.len() > MAX_NET_ID_LEN || ids[..i].contains(id) {
                return Err(ConfigError::BadNetId(id.clone()));
            }
            let earlier = &self.nets[..i];
            if let NetBackend::Tap { name } = &net.backend {
                if let Err(reason) = devices::virtio::net::check_tap_name(name) {
                    return Err(ConfigError::BadTapName(name.clone(), reason));
                }
                if earlier.iter().any(|n| n.backend == net.backend) {
                    return Err(ConfigError::TapTwice(name.clone()));
                }
            }
            if let Some(mac) = &net.mac {
                if earlier.iter().any(|n| n.mac.as_ref() == Some(mac)) {
                    return Err(ConfigError::MacTwice(format_mac(mac)));
                }
            }
        }
        Ok(())
    }

    /// Each network interface's id: its own, or `ethN`.
    pub fn net_ids(&self) -> Vec<String> {
        self.nets
            .iter()
            .enumerate()
            .map(|(i, n)| n.id.clone().unwrap_or_else(|| format!("eth{i}")))
            .collect()
    }

    /// Each disk's id: its own, or `diskN`.
    pub fn disk_ids(&self) -> Vec<String> {
        self.disks
            .iter()
            .enumerate()
            .map(|(i, d)| d.id.clone().unwrap_or_else(|| format!("disk{i}")))
            .collect()
    }

    /// Guest memory in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_mib << 20
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> VmConfig {
        VmConfig {
            kernel: "/k".into(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_names_the_problem() {
        assert_eq!(ok().validate(), Ok(()));
        for (c, e) in [
            (VmConfig { vcpus: 0, ..ok() }, ConfigError::VcpuCount(0)),
            (VmConfig { vcpus: 33, ..ok() }, ConfigError::VcpuCount(33)),
            (VmConfig { mem_mib: 0, ..ok() }, ConfigError::MemoryZero),
            (
                VmConfig {
                    kernel: "".into(),
                    ..ok()
                },
                ConfigError::NoKernel,
            ),
            (
                VmConfig {
                    timeout: Some(Duration::ZERO),
                    ..ok()
                },
                ConfigError::TimeoutZero,
            ),
        ] {
            assert_eq!(c.validate(), Err(e));
        }
        let host = host_memory_mib().unwrap();
        let e = VmConfig {
            mem_mib: host + 1,
            ..ok()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("more than this host's"), "{e}");
        assert!(VmConfig { vcpus: 32, ..ok() }.validate().is_ok());
    }

    #[test]
    fn disk_specs_parse_with_ephemeral_as_the_cli_default() {
        let d = DiskConfig::parse_cli("/img.raw").unwrap();
        assert!(d.ephemeral && !d.read_only);
        assert_eq!(d.engine, BlockEngine::Uring);
        let d = DiskConfig::parse_cli("/img.raw,persist,id=root,engine=sync").unwrap();
        assert!(!d.ephemeral && !d.read_only);
        assert_eq!(
            (d.id.as_deref(), d.engine),
            (Some("root"), BlockEngine::Sync)
        );
        let d = DiskConfig::parse_cli("/img.raw,ro").unwrap();
        assert!(d.read_only && !d.ephemeral);
        let d = DiskConfig::parse_cli("/img.raw,bw=10M,iops=500").unwrap();
        let rl = d.rate_limiter.unwrap();
        assert_eq!(rl.bandwidth.unwrap().size, 10 << 20);
        assert_eq!(rl.ops.unwrap().size, 500);
        assert_eq!(rl.ops.unwrap().refill_time_ms, 1000);
        assert!(DiskConfig::parse_cli("/img.raw")
            .unwrap()
            .rate_limiter
            .is_none());
        for bad in ["/i,bw=0", "/i,bw=x", "/i,iops=-1", "/i,iops=0"] {
            assert!(DiskConfig::parse_cli(bad).is_err(), "{bad}");
        }
        for bad in [
            "",
            ",ro",
            "/i,ro,persist",
            "/i,engine=aio",
            "/i,bogus",
            "/i,id",
        ] {
            assert!(DiskConfig::parse_cli(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn disk_counts_and_ids_are_validated() {
        let disk = |id: Option<&str>| DiskConfig {
            path: "/d".into(),
            read_only: false,
            ephemeral: true,
            id: id.map(String::from),
            engine: BlockEngine::Sync,
            rate_limiter: None,
        };
        let c = VmConfig {
            disks: vec![disk(None), disk(Some("data"))],
            ..ok()
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.disk_ids(), ["disk0", "data"]);
        let c = VmConfig {
            disks: vec![disk(None); 17],
            ..ok()
        };
        assert_eq!(c.validate(), Err(ConfigError::TooManyDisks(17)));
        let c = VmConfig {
            disks: vec![disk(Some("a")), disk(Some("a"))],
            ..ok()
        };
        assert_eq!(c.validate(), Err(ConfigError::BadDiskId("a".into())));
        let long = "x".repeat(21);
        let c = VmConfig {
            disks: vec![disk(Some(&long))],
            ..ok()
        };
        assert!(c.validate().is_err());
    }

    #[test]
    fn net_specs_and_macs_parse() {
        let n = NetIfaceConfig::parse_cli("tap:tap0,mac=02:AB:cd:00:00:01,id=wan").unwrap();
        assert_eq!(
            n.backend,
            NetBackend::Tap {
                name: "tap0".into()
            }
        );
        assert_eq!(n.mac, Some([2, 0xab, 0xcd, 0, 0, 1]));
        assert_eq!(n.id.as_deref(), Some("wan"));
        let n = NetIfaceConfig::parse_cli("user").unwrap();
        assert_eq!(n.backend, NetBackend::User { publish: vec![] });
        assert_eq!((n.mac, n.id), (None, None));
        for bad in [
            "",
            "tap",
            "tap:",
            "bridge:br0",
            "user:x",
            "user,mac",
            "user,bogus=1",
            "tap:t,id=",
            "tap:t,mac=03:00:00:00:00:01",
        ] {
            assert!(NetIfaceConfig::parse_cli(bad).is_err(), "{bad}");
        }
        for bad in [
            "02:00:00:00:00",
            "02:00:00:00:00:01:02",
            "2:00:00:00:00:01",
            "02-00-00-00-00-01",
            "0g:00:00:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
        ] {
            let e = parse_mac(bad).unwrap_err();
            assert!(e.contains(bad), "{e}");
        }
        assert_eq!(format_mac(&[2, 0xab, 0, 0, 0, 0x1f]), "02:ab:00:00:00:1f");
    }

    #[test]
    fn net_counts_ids_taps_and_macs_are_validated() {
        let tap = |name: &str, mac: Option<u8>| NetIfaceConfig {
            id: None,
            backend: NetBackend::Tap { name: name.into() },
            mac: mac.map(|m| [2, 0, 0, 0, 0, m]),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let c = VmConfig {
            nets: vec![tap("a", Some(1)), tap("b", Some(2))],
            ..ok()
        };
        assert_eq!(c.validate(), Ok(()));
        assert_eq!(c.net_ids(), ["eth0", "eth1"]);
        let with = |nets| VmConfig { nets, ..ok() }.validate();
        assert_eq!(
            with(vec![tap("a", None), tap("a", None)]),
            Err(ConfigError::TapTwice("a".into()))
        );
        assert_eq!(
            with(vec![tap("a", Some(1)), tap("b", Some(1))]),
            Err(ConfigError::MacTwice("02:00:00:00:00:01".into()))
        );
        let named = |id: &str, t: &str| NetIfaceConfig {
            id: Some(id.into()),
            ..tap(t, None)
        };
        assert_eq!(
            with(vec![named("x", "a"), named("x", "b")]),
            Err(ConfigError::BadNetId("x".into()))
        );
        for bad in ["", "sixteen-bytes-xx", "a/b", "a b", "a:b", ".."] {
            assert!(
                matches!(with(vec![tap(bad, None)]), Err(ConfigError::BadTapName(n, _)) if n == bad),
                "{bad}"
            );
        }
        let many = (0..9).map(|i| tap(&format!("t{i}"), None)).collect();
        assert_eq!(with(many), Err(ConfigError::TooManyNets(9)));
    }

    #[test]
    fn sizes_parse_with_binary_suffixes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("64K"), Ok(64 << 10));
        assert_eq!(parse_size("10m"), Ok(10 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        for bad in ["", "0", "K", "1T", "-1", "99999999999999999999G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn console_spec_parses() {
        assert_eq!("tty".parse(), Ok(ConsoleConfig::Tty));
        assert_eq!("none".parse(), Ok(ConsoleConfig::None));
        assert_eq!(
            "file:/tmp/x".parse(),
            Ok(ConsoleConfig::File("/tmp/x".into()))
        );
        assert!("file:".parse::<ConsoleConfig>().is_err());
        assert!("serial".parse::<ConsoleConfig>().is_err());
    }

    #[test]
    fn config_round_trips_through_json_and_rejects_unknown_fields() {
        let c = ok();
        let j = serde_json::to_string(&c).unwrap();
        assert_eq!(serde_json::from_str::<VmConfig>(&j).unwrap(), c);
        assert!(serde_json::from_str::<VmConfig>(r#"{"kernel":"/k","bogus":1}"#).is_err());
    }
}
