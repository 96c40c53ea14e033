//! Firecracker's configuration model (API v1.17: field names, defaults, pre-boot rules) and
//! [`VmResources`], the machine being described before it starts. The API's PUT and PATCH
//! requests and the `--config-file` JSON both land here; [`VmResources::to_vm_config`] turns
//! the result into the same [`VmConfig`] the CLI builds, through the same validation.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use devices::rate_limiter::{RateLimiterConfig, TokenBucket};
use serde::{Deserialize, Serialize};

use crate::config::{
    format_mac, parse_mac, BlockEngine, ConsoleConfig, DiskConfig, NetBackend, NetIfaceConfig,
    VmConfig, VsockConfig, MAX_DISKS, MAX_NETS, MAX_NET_ID_LEN, MAX_VCPUS,
};

/// Memory of a machine nobody configured (Firecracker's default).
pub const DEFAULT_MEM_MIB: u64 = 128;
/// Kernel command line when the boot source gives none (Firecracker's default).
pub const DEFAULT_BOOT_ARGS: &str = "reboot=k panic=1 pci=off nomodule 8250.nr_uarts=0 \
                                     i8042.noaux i8042.nomux i8042.dumbkbd swiotlb=noforce";

/// A request that breaks a rule; the text is the API's `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ResourceError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ResourceError> {
    Err(ResourceError(msg.into()))
}

/// `PUT /boot-source`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel: an ELF vmlinux or a bzImage.
    pub kernel_image_path: PathBuf,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// An initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
}

/// Firecracker's CPU templates; cgvm has none, so only `None` is accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CpuTemplate {
    /// No template.
    #[default]
    None,
    /// Intel C3.
    C3,
    /// Intel T2.
    T2,
    /// Intel T2S.
    T2S,
    /// Intel T2CL.
    T2CL,
    /// AMD T2A.
    T2A,
    /// Arm V1N1.
    V1N1,
}

/// How guest memory is backed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum HugePages {
    /// 4 KiB pages.
    #[default]
    None,
    /// Transparent huge pages (madvise).
    Transparent,
    /// hugetlbfs 2 MiB pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `GET/PUT /machine-config`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// vCPUs, 1 to 32.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
    /// The virtio transport, `mmio` or `pci` (a cgvm extension; absent: the process's
    /// default, `--transport`/`--enable-pci`, else chosen by kernel).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub transport: Option<crate::config::Transport>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        Self {
            vcpu_count: 1,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: None,
            transport: None,
        }
    }
}

/// `PATCH /machine-config`: the fields given replace the current ones.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// vCPUs.
    #[serde(default)]
    pub vcpu_count: Option<u8>,
    /// Memory in MiB.
    #[serde(default)]
    pub mem_size_mib: Option<u64>,
    /// SMT.
    #[serde(default)]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default)]
    pub track_dirty_pages: Option<bool>,
    /// CPU template.
    #[serde(default)]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: Option<HugePages>,
    /// The virtio transport (a cgvm extension).
    #[serde(default)]
    pub transport: Option<crate::config::Transport>,
}

/// Firecracker's block cache types. cgvm always offers FLUSH and honours it, which is what
/// `Writeback` asks for; `Unsafe` is accepted and gets the same safe behaviour.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum CacheType {
    /// Flushes are not offered (Firecracker); cgvm offers them anyway.
    #[default]
    Unsafe,
    /// Flushes reach the host file.
    Writeback,
}

/// Firecracker's block I/O engines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum IoEngine {
    /// Synchronous I/O on the device thread.
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive id (the virtio-blk serial the guest reads).
    pub drive_id: String,
    /// Boot from this drive: `root=/dev/vda` (or `root=PARTUUID=`) joins the command line and
    /// the drive is placed first.
    pub is_root_device: bool,
    /// The root partition's UUID, used with `is_root_device`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Cache type.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// The guest may not write.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// Limits on bytes and requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// The I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// A vhost-user-block socket (not supported by cgvm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`: a new backing file and/or a new rate limiter for a running VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive id.
    pub drive_id: String,
    /// The new image file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<PathBuf>,
    /// The new limits.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /entropy`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// Limits on bytes and requests per second.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device over an existing host tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface id (also the metrics section `net_<iface_id>`).
    pub iface_id: String,
    /// The host tap the device's frames go through; opened at `InstanceStart`.
    pub host_dev_name: String,
    /// The guest's MAC address (`aa:bb:cc:dd:ee:ff`); without one the guest picks its own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Limits what the guest receives.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// Limits what the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
    /// The MTU to advertise (VIRTIO_NET_F_MTU; not supported by cgvm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
}

/// `PATCH /network-interfaces/{iface_id}`: new rate limiters for a running machine's
/// interface (Firecracker's semantics: an absent limiter or bucket is left as it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface id.
    pub iface_id: String,
    /// The receive limiter's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// The transmit limiter's update.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// `PUT /vsock`: the virtio-vsock device, Firecracker's model (host clients connect to
/// `uds_path` and write `CONNECT <port>`; guest connections to host port P go to
/// `<uds_path>_P`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id: 3 or more.
    pub guest_cid: u32,
    /// The Unix socket cgvm listens on; created at `InstanceStart`.
    pub uds_path: PathBuf,
    /// Deprecated by Firecracker; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// Log levels as Firecracker spells them (case-insensitive on input).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Default)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and errors.
    Warning,
    /// Information and above.
    #[default]
    Info,
    /// Debugging and above.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter for this level.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            Self::Off => log::LevelFilter::Off,
            Self::Error => log::LevelFilter::Error,
            Self::Warning => log::LevelFilter::Warn,
            Self::Info => log::LevelFilter::Info,
            Self::Debug => log::LevelFilter::Debug,
            Self::Trace => log::LevelFilter::Trace,
        }
    }
}

impl std::str::FromStr for LogLevel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => Self::Off,
            "error" => Self::Error,
            "warning" | "warn" => Self::Warning,
            "info" => Self::Info,
            "debug" => Self::Debug,
            "trace" => Self::Trace,
            _ => {
                return Err(format!(
                    "level '{s}': expected Error, Warning, Info, Debug, Trace or Off"
                ))
            }
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// `PUT /logger`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// The file or named pipe logs go to (appended).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    /// The most verbose level written.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Write the level on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Write the source file and line on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only messages from module paths starting with this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// The file or named pipe metrics lines go to.
    pub metrics_path: PathBuf,
    /// Put the instance id on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    /// Operator-defined pairs put on each line under `properties`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// `PUT /serial`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SerialConfig {
    /// Serial output goes to this file or named pipe instead of standard output.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial_out_path: Option<PathBuf>,
    /// A limit on serial output bytes (not supported by cgvm).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<TokenBucket>,
}

/// `PATCH /vm` states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmStateName {
    /// Stop the vCPUs.
    Paused,
    /// Run them again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// The wanted state.
    pub state: VmStateName,
}

/// `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Boot the machine.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's keyboard.
    SendCtrlAltDel,
}

/// `PUT /actions` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `GET /` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    /// "cgvm" (or "Firecracker" when invoked under that name).
    pub app_name: String,
    /// The instance id (`--id`).
    pub id: String,
    /// "Not started", "Running" or "Paused".
    pub state: String,
    /// The VMM's version.
    pub vmm_version: String,
}

/// `GET /vm/config` answer: every resource as it was configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// The boot source.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// The drives, in guest order.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// The machine.
    #[serde(rename = "machine-config", default)]
    pub machine_config: Option<MachineConfig>,
    /// The entropy device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
    /// The logger.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// The metrics.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
    /// The network interfaces, in guest order.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// The vsock device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// The serial console (a cgvm extension of the config file; the API has `PUT /serial`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<SerialConfig>,
    /// Balloon (not available; must be absent or null).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<serde_json::Value>,
    /// MMDS (not available; must be absent or null).
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<serde_json::Value>,
    /// CPU configuration (not available; must be absent or null).
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<serde_json::Value>,
    /// pmem devices (not available; must be absent or empty).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pmem: Vec<serde_json::Value>,
    /// Memory hotplug (not available; must be absent or null).
    #[serde(
        rename = "memory-hotplug",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<serde_json::Value>,
}

/// The machine being described before it starts.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct VmResources {
    /// Kernel, initrd, command line.
    pub boot_source: Option<BootSource>,
    /// vCPUs and memory.
    pub machine: MachineConfig,
    /// Drives in the order given (the root drive is moved first when the VM is built).
    pub drives: Vec<Drive>,
    /// The entropy device.
    pub entropy: Option<EntropyDevice>,
    /// The serial console.
    pub serial: Option<SerialConfig>,
    /// The logger, as last configured.
    pub logger: Option<LoggerConfig>,
    /// The metrics, as last configured.
    pub metrics: Option<MetricsConfig>,
    /// Network interfaces in the order given (the guest's eth0, eth1, ...).
    pub net_ifaces: Vec<NetworkInterface>,
    /// The vsock device.
    pub vsock: Option<Vsock>,
}

fn check_readable(what: &str, p: &Path) -> Result<(), ResourceError> {
    match std::fs::File::open(p) {
        Ok(_) => Ok(()),
        Err(e) => err(format!("{what}: cannot open {}: {e}", p.display())),
    }
}

fn check_machine(m: &MachineConfig) -> Result<(), ResourceError> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return err(format!(
            "vcpu_count {}: a machine has 1 to {MAX_VCPUS} vCPUs",
            m.vcpu_count
        ));
    }
    if m.smt && m.vcpu_count > 1 && m.vcpu_count % 2 != 0 {
        return err(format!(
            "vcpu_count {}: with smt enabled the count must be 1 or even",
            m.vcpu_count
        ));
    }
    if m.smt {
        return err("smt: cgvm does not present SMT siblings to the guest; use smt false");
    }
    if m.mem_size_mib == 0 {
        return err("mem_size_mib: must be at least 1");
    }
    if let Some(host) = crate::config::host_memory_mib() {
        if m.mem_size_mib > host {
            return err(format!(
                "mem_size_mib {}: more than this host's {host} MiB of RAM",
                m.mem_size_mib
            ));
        }
    }
    if m.track_dirty_pages {
        return err(
            "track_dirty_pages: dirty page tracking serves snapshots, which cgvm does not have yet",
        );
    }
    match m.cpu_template {
        None | Some(CpuTemplate::None) => {}
        Some(t) => {
            return err(format!(
                "cpu_template {t:?}: cgvm has no CPU templates; use None"
            ))
        }
    }
    match m.huge_pages {
        None | Some(HugePages::None) => {}
        Some(h) => {
            return err(format!(
                "huge_pages {}: cgvm backs guest memory with 4 KiB pages only; use None",
                match h {
                    HugePages::Transparent => "Transparent",
                    _ => "2M",
                }
            ))
        }
    }
    Ok(())
}

/// Checks a drive id: 1 to 20 bytes of letters, digits, `_` and `-` (it is the serial the
/// guest reads and part of the API path).
pub fn check_drive_id(id: &str) -> Result<(), ResourceError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if id.is_empty() || id.len() > crate::config::MAX_DISK_ID_LEN || !ok_chars {
        return err(format!(
            "drive_id '{id}': must be 1 to {} letters, digits, '_' or '-'",
            crate::config::MAX_DISK_ID_LEN
        ));
    }
    Ok(())
}

/// Checks a network interface id: 1 to 64 bytes of letters, digits, `_` and `-` (it is part
/// of the API path and of the metrics section's name).
pub fn check_iface_id(id: &str) -> Result<(), ResourceError> {
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if id.is_empty() || id.len() > MAX_NET_ID_LEN || !ok_chars {
        return err(format!(
            "iface_id '{id}': must be 1 to {MAX_NET_ID_LEN} letters, digits, '_' or '-'"
        ));
    }
    Ok(())
}

/// The MAC address of an interface, parsed (a bad one names the interface and the field).
fn iface_mac(n: &NetworkInterface) -> Result<Option<[u8; 6]>, ResourceError> {
    n.guest_mac
        .as_deref()
        .map(parse_mac)
        .transpose()
        .or_else(|e| err(format!("network interface {}: guest_mac: {e}", n.iface_id)))
}

impl VmResources {
    /// `PUT /network-interfaces/{id}`: adds the interface, or replaces the one with the same
    /// id (keeping its place). The tap itself is opened at `InstanceStart`.
    pub fn insert_net_iface(&mut self, mut n: NetworkInterface) -> Result<(), ResourceError> {
        check_iface_id(&n.iface_id)?;
        let id = n.iface_id.clone();
        if let Some(mtu) = n.mtu {
            return err(format!(
                "network interface {id}: mtu {mtu}: cgvm's virtio-net does not offer \
                 VIRTIO_NET_F_MTU; leave mtu out (the guest then uses its default MTU)"
            ));
        }
        if let Err(reason) = devices::virtio::net::check_tap_name(&n.host_dev_name) {
            return err(format!(
                "network interface {id}: host_dev_name '{}': not a valid interface name: \
                 {reason}",
                n.host_dev_name
            ));
        }
        let mac = iface_mac(&n)?;
        // Stored as Firecracker reports it: lower-case hex.
        n.guest_mac = mac.as_ref().map(format_mac);
        let existing = self.net_ifaces.iter().position(|x| x.iface_id == id);
        for other in self.net_ifaces.iter().filter(|x| x.iface_id != id) {
            if other.host_dev_name == n.host_dev_name {
                return err(format!(
                    "network interface {id}: host_dev_name {} is already used by network \
                     interface {}",
                    n.host_dev_name, other.iface_id
                ));
            }
            if mac.is_some() && iface_mac(other)? == mac {
                return err(format!(
                    "network interface {id}: guest_mac {} is already used by network \
                     interface {}",
                    n.guest_mac.as_deref().unwrap_or_default(),
                    other.iface_id
                ));
            }
        }
        match existing {
            Some(i) => self.net_ifaces[i] = n,
            None if self.net_ifaces.len() >= MAX_NETS => {
                return err(format!(
                    "network interface {id}: a machine has at most {MAX_NETS} network interfaces"
                ))
            }
            None => self.net_ifaces.push(n),
        }
        Ok(())
    }

    /// `PUT /vsock`: sets (or replaces) the vsock device. Its socket is created at
    /// `InstanceStart`, where a missing directory or a path in use is reported.
    pub fn set_vsock(&mut self, mut v: Vsock) -> Result<(), ResourceError> {
        if v.guest_cid < 3 || v.guest_cid == u32::MAX {
            return err(format!(
                "vsock: guest_cid {}: must be from 3 to {} (0 to 2 are reserved; 2 is the host)",
                v.guest_cid,
                u32::MAX - 1
            ));
        }
        if v.uds_path.as_os_str().is_empty() {
            return err("vsock: uds_path is empty; give the path of the socket to create");
        }
        // Deprecated by Firecracker, which does not report it back either.
        v.vsock_id = None;
        self.vsock = Some(v);
        Ok(())
    }

    /// `PUT /boot-source`: the kernel (and initrd) must be readable now.
    pub fn set_boot_source(&mut self, b: BootSource) -> Result<(), ResourceError> {
        check_readable("kernel_image_path", &b.kernel_image_path)?;
        if let Some(i) = &b.initrd_path {
            check_readable("initrd_path", i)?;
        }
        if let Some(a) = &b.boot_args {
            if a.len() >= 0xffff {
                return err(format!("boot_args: {} bytes; the limit is 65535", a.len()));
            }
        }
        self.boot_source = Some(b);
        Ok(())
    }

    /// `PUT /machine-config`: replaces the whole configuration.
    pub fn set_machine_config(&mut self, m: MachineConfig) -> Result<(), ResourceError> {
        check_machine(&m)?;
        self.machine = m;
        Ok(())
    }

    /// `PATCH /machine-config`: replaces the fields given; nothing changes on error.
    pub fn update_machine_config(&mut self, u: MachineConfigUpdate) -> Result<(), ResourceError> {
        if u == MachineConfigUpdate::default() {
            return err("the body changes nothing: give at least one machine-config field");
        }
        let mut m = self.machine.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.cpu_template {
            m.cpu_template = Some(v);
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = Some(v);
        }
        if let Some(v) = u.transport {
            m.transport = Some(v);
        }
        self.set_machine_config(m)
    }

    /// `PUT /drives/{id}`: adds the drive, or replaces the one with the same id.
    pub fn insert_drive(&mut self, d: Drive) -> Result<(), ResourceError> {
        check_drive_id(&d.drive_id)?;
        if d.socket.is_some() {
            return err(format!(
                "drive {}: socket: vhost-user-block is not supported by cgvm; give path_on_host",
                d.drive_id
            ));
        }
        let Some(path) = &d.path_on_host else {
            return err(format!("drive {}: path_on_host is required", d.drive_id));
        };
        check_readable(&format!("drive {}: path_on_host", d.drive_id), path)?;
        if d.partuuid.is_some() && !d.is_root_device {
            return err(format!(
                "drive {}: partuuid is only used with is_root_device true",
                d.drive_id
            ));
        }
        let existing = self.drives.iter().position(|x| x.drive_id == d.drive_id);
        if d.is_root_device {
            if let Some(other) = self
                .drives
                .iter()
                .find(|x| x.is_root_device && x.drive_id != d.drive_id)
            {
                return err(format!(
                    "drive {}: drive {} is already the root device; a machine has one",
                    d.drive_id, other.drive_id
                ));
            }
        }
        match existing {
            Some(i) => self.drives[i] = d,
            None if self.drives.len() >= MAX_DISKS => {
                return err(format!(
                    "drive {}: a machine has at most {MAX_DISKS} drives",
                    d.drive_id
                ))
            }
            None => self.drives.push(d),
        }
        Ok(())
    }

    /// `PUT /entropy`.
    pub fn set_entropy(&mut self, e: EntropyDevice) -> Result<(), ResourceError> {
        self.entropy = Some(e);
        Ok(())
    }

    /// `PUT /serial`.
    pub fn set_serial(&mut self, s: SerialConfig) -> Result<(), ResourceError> {
        if s.rate_limiter.is_some() {
            return err("serial: rate_limiter is not supported by cgvm yet");
        }
        if let Some(p) = &s.serial_out_path {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .or_else(|e| err(format!("serial_out_path: cannot open {}: {e}", p.display())))?;
        }
        self.serial = Some(s);
        Ok(())
    }

    /// The drives in guest order: the root device first, then the others as given.
    pub fn ordered_drives(&self) -> Vec<&Drive> {
        let root = self.drives.iter().filter(|d| d.is_root_device);
        root.chain(self.drives.iter().filter(|d| !d.is_root_device))
            .collect()
    }

    /// The machine to build. `base` supplies what Firecracker's model does not describe
    /// (seccomp, time limit, PVH entry); its kernel, disks and sizes are replaced.
    pub fn to_vm_config(&self, base: &VmConfig) -> Result<VmConfig, ResourceError> {
        let Some(boot) = &self.boot_source else {
            return err("no boot source: PUT /boot-source with a kernel_image_path first");
        };
        check_machine(&self.machine)?;
        let mut cmdline = boot
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_BOOT_ARGS.to_string());
        let drives = self.ordered_drives();
        if let Some(root) = drives.first().filter(|d| d.is_root_device) {
            let ro = if root.is_read_only.unwrap_or(false) {
                "ro"
            } else {
                "rw"
            };
            match &root.partuuid {
                Some(u) => cmdline.push_str(&format!(" root=PARTUUID={u} {ro}")),
                None => cmdline.push_str(&format!(" root=/dev/vda {ro}")),
            }
        }
        let mut disks = Vec::with_capacity(drives.len());
        for d in drives {
            let Some(path) = &d.path_on_host else {
                return err(format!("drive {}: path_on_host is required", d.drive_id));
            };
            disks.push(DiskConfig {
                path: path.clone(),
                read_only: d.is_read_only.unwrap_or(false),
                ephemeral: false,
                id: Some(d.drive_id.clone()),
                engine: match d.io_engine.unwrap_or_default() {
                    IoEngine::Sync => BlockEngine::Sync,
                    IoEngine::Async => BlockEngine::Uring,
                },
                rate_limiter: d.rate_limiter,
            });
        }
        let mut nets = Vec::with_capacity(self.net_ifaces.len());
        for n in &self.net_ifaces {
            nets.push(NetIfaceConfig {
                id: Some(n.iface_id.clone()),
                backend: NetBackend::Tap {
                    name: n.host_dev_name.clone(),
                },
                mac: iface_mac(n)?,
                rx_rate_limiter: n.rx_rate_limiter,
                tx_rate_limiter: n.tx_rate_limiter,
            });
        }
        let vsock = self.vsock.as_ref().map(|v| VsockConfig {
            cid: v.guest_cid,
            uds_path: v.uds_path.clone(),
        });
        let console = match self.serial.as_ref().and_then(|s| s.serial_out_path.clone()) {
            Some(p) => ConsoleConfig::File(p),
            None => base.console.clone(),
        };
        let config = VmConfig {
            kernel: boot.kernel_image_path.clone(),
            initrd: boot.initrd_path.clone(),
            cmdline,
            vcpus: self.machine.vcpu_count,
            mem_mib: self.machine.mem_size_mib,
            console,
            rng: self.entropy.is_some(),
            rng_rate_limiter: self.entropy.as_ref().and_then(|e| e.rate_limiter),
            disks,
            nets,
            vsock,
            transport: self.machine.transport.or(base.transport),
            ..base.clone()
        };
        config
            .validate()
            .or_else(|e| err(format!("invalid configuration: {e}")))?;
        Ok(config)
    }

    /// Everything as configured, for `GET /vm/config`.
    pub fn full_config(&self) -> FullVmConfiguration {
        FullVmConfiguration {
            boot_source: self.boot_source.clone(),
            drives: self.ordered_drives().into_iter().cloned().collect(),
            machine_config: Some(self.machine.clone()),
            entropy: self.entropy.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
            serial: self.serial.clone(),
            network_interfaces: self.net_ifaces.clone(),
            vsock: self.vsock.clone(),
            ..Default::default()
        }
    }

    /// Reads Firecracker's config-file JSON (`--config-file`): the same resources the API
    /// sets, each through the same checks. Logger and metrics are returned separately: the
    /// caller sets them up before anything else.
    pub fn from_config_json(json: &str) -> Result<Self, ResourceError> {
        let file: FullVmConfiguration =
            serde_json::from_str(json).or_else(|e| err(format!("config file: {e}")))?;
        let unsupported = [
            ("balloon", file.balloon.is_some()),
            ("mmds-config", file.mmds_config.is_some()),
            ("cpu-config", file.cpu_config.is_some()),
            ("memory-hotplug", file.memory_hotplug.is_some()),
            ("pmem", !file.pmem.is_empty()),
        ];
        for (what, present) in unsupported {
            if present {
                return err(format!("config file: {what}: {}", not_available(what)));
            }
        }
        let mut r = VmResources::default();
        fn ctx(what: String) -> impl Fn(ResourceError) -> ResourceError {
            move |e| ResourceError(format!("config file: {what}: {e}"))
        }
        let Some(boot) = file.boot_source else {
            return err("config file: boot-source is required");
        };
        r.set_boot_source(boot).map_err(ctx("boot-source".into()))?;
        if let Some(m) = file.machine_config {
            r.set_machine_config(m)
                .map_err(ctx("machine-config".into()))?;
        }
        for d in file.drives {
            let id = d.drive_id.clone();
            r.insert_drive(d).map_err(ctx(format!("drives[{id}]")))?;
        }
        for n in file.network_interfaces {
            let id = n.iface_id.clone();
            r.insert_net_iface(n)
                .map_err(ctx(format!("network-interfaces[{id}]")))?;
        }
        if let Some(v) = file.vsock {
            r.set_vsock(v).map_err(ctx("vsock".into()))?;
        }
        if let Some(e) = file.entropy {
            r.set_entropy(e).map_err(ctx("entropy".into()))?;
        }
        if let Some(s) = file.serial {
            r.set_serial(s).map_err(ctx("serial".into()))?;
        }
        r.logger = file.logger;
        r.metrics = file.metrics;
        Ok(r)
    }
}

/// The fault message for a Firecracker feature cgvm does not have yet.
pub fn not_available(feature: &str) -> String {
    match feature {
        "balloon" => "the balloon device is not supported by cgvm".into(),
        "snapshot" => "snapshots are not supported by cgvm".into(),
        "mmds" | "mmds-config" => {
            "the microVM metadata service (MMDS) is not supported by cgvm".into()
        }
        "cpu-config" => "custom CPU templates are not supported by cgvm".into(),
        "hotplug" | "memory-hotplug" => "memory hotplug is not supported by cgvm".into(),
        "pmem" => "virtio-pmem devices are not supported by cgvm".into(),
        other => format!("{other} is not supported by cgvm"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch_file(name: &str, len: u64) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cgvm-resources-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(len).unwrap();
        p
    }

    fn drive(id: &str, path: &Path, root: bool) -> Drive {
        Drive {
            drive_id: id.into(),
            is_root_device: root,
            partuuid: None,
            cache_type: None,
            is_read_only: None,
            path_on_host: Some(path.into()),
            rate_limiter: None,
            io_engine: None,
            socket: None,
        }
    }

    #[test]
    fn machine_config_rules_name_the_field() {
        let mut r = VmResources::default();
        assert_eq!(r.machine.mem_size_mib, 128);
        for (m, field) in [
            (r#"{"vcpu_count":0,"mem_size_mib":64}"#, "vcpu_count"),
            (r#"{"vcpu_count":33,"mem_size_mib":64}"#, "vcpu_count"),
            (r#"{"vcpu_count":1,"mem_size_mib":0}"#, "mem_size_mib"),
            (r#"{"vcpu_count":2,"mem_size_mib":64,"smt":true}"#, "smt"),
            (
                r#"{"vcpu_count":1,"mem_size_mib":64,"cpu_template":"T2"}"#,
                "cpu_template",
            ),
            (
                r#"{"vcpu_count":1,"mem_size_mib":64,"huge_pages":"2M"}"#,
                "huge_pages",
            ),
        ] {
            let m: MachineConfig = serde_json::from_str(m).unwrap();
            let e = r.set_machine_config(m).unwrap_err();
            assert!(e.0.contains(field), "{e}");
        }
        assert_eq!(r.machine, MachineConfig::default(), "nothing changed");
        assert!(serde_json::from_str::<MachineConfig>(r#"{"vcpu_count":1}"#).is_err());
        assert!(serde_json::from_str::<MachineConfig>(
            r#"{"vcpu_count":1,"mem_size_mib":64,"bogus":1}"#
        )
        .is_err());
        r.update_machine_config(MachineConfigUpdate {
            vcpu_count: Some(2),
            ..Default::default()
        })
        .unwrap();
        assert_eq!((r.machine.vcpu_count, r.machine.mem_size_mib), (2, 128));
        assert!(r
            .update_machine_config(MachineConfigUpdate::default())
            .is_err());
    }

    #[test]
    fn drives_are_checked_and_the_root_goes_first() {
        let img = scratch_file("d.img", 1 << 20);
        let mut r = VmResources::default();
        r.insert_drive(drive("data", &img, false)).unwrap();
        r.insert_drive(drive("root", &img, true)).unwrap();
        let ids: Vec<_> = r
            .ordered_drives()
            .iter()
            .map(|d| d.drive_id.clone())
            .collect();
        assert_eq!(ids, ["root", "data"]);
        let e = r.insert_drive(drive("other", &img, true)).unwrap_err();
        assert!(e.0.contains("already the root device"), "{e}");
        let e = r
            .insert_drive(drive("x", Path::new("/nonexistent/img"), false))
            .unwrap_err();
        assert!(e.0.contains("/nonexistent/img"), "{e}");
        for bad in ["", "a/b", "x y", "012345678901234567890"] {
            assert!(r.insert_drive(drive(bad, &img, false)).is_err(), "{bad:?}");
        }
        // Replacing keeps the count.
        r.insert_drive(drive("data", &img, false)).unwrap();
        assert_eq!(r.drives.len(), 2);
    }

    #[test]
    fn resources_become_a_vm_config_with_root_on_the_command_line() {
        let k = scratch_file("k", 4096);
        let img = scratch_file("r.img", 1 << 20);
        let mut r = VmResources::default();
        assert!(r.to_vm_config(&VmConfig::default()).is_err());
        r.set_boot_source(BootSource {
            kernel_image_path: k.clone(),
            boot_args: Some("console=ttyS0".into()),
            initrd_path: None,
        })
        .unwrap();
        let mut root = drive("rootfs", &img, true);
        root.is_read_only = Some(true);
        root.io_engine = Some(IoEngine::Async);
        r.insert_drive(root).unwrap();
        r.set_entropy(EntropyDevice::default()).unwrap();
        let c = r.to_vm_config(&VmConfig::default()).unwrap();
        assert_eq!(c.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(c.kernel, k);
        assert!(c.rng);
        assert_eq!(c.disks.len(), 1);
        assert!(c.disks[0].read_only && !c.disks[0].ephemeral);
        assert_eq!(c.disks[0].engine, BlockEngine::Uring);
        assert_eq!(c.disks[0].id.as_deref(), Some("rootfs"));
        assert_eq!(c.mem_mib, 128);
        let e = r
            .set_boot_source(BootSource {
                kernel_image_path: "/nonexistent/vmlinux".into(),
                boot_args: None,
                initrd_path: None,
            })
            .unwrap_err();
        assert!(e.0.contains("kernel_image_path") && e.0.contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn config_files_in_firecrackers_shape_parse_and_unsupported_parts_are_named() {
        let k = scratch_file("k2", 4096);
        let img = scratch_file("r2.img", 1 << 20);
        let json = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1"}},
              "drives": [{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}],
              "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false}},
              "network-interfaces": []
            }}"#,
            k.display(),
            img.display()
        );
        let r = VmResources::from_config_json(&json).unwrap();
        assert_eq!(r.machine.vcpu_count, 2);
        let c = r.to_vm_config(&VmConfig::default()).unwrap();
        assert!(c.cmdline.ends_with("root=/dev/vda rw"), "{}", c.cmdline);
        for (extra, word) in [
            (r#","balloon":{"amount_mib":1}"#, "balloon"),
            (r#","vsock":{"guest_cid":2,"uds_path":"/v"}"#, "guest_cid 2"),
            (r#","bogus":1"#, "bogus"),
        ] {
            let j = json.trim_end().trim_end_matches('}').to_string() + extra + "}";
            let e = VmResources::from_config_json(&j).unwrap_err();
            assert!(e.0.contains(word), "{e}");
        }
        let j = json.replace(
            r#""network-interfaces": []"#,
            r#""network-interfaces": [{"iface_id":"eth0","host_dev_name":"t","mtu":1500}]"#,
        );
        let e = VmResources::from_config_json(&j).unwrap_err();
        assert!(
            e.0.contains("network-interfaces[eth0]") && e.0.contains("mtu"),
            "{e}"
        );
        let e = VmResources::from_config_json("{").unwrap_err();
        assert!(e.0.starts_with("config file:"), "{e}");
    }

    fn iface(id: &str, tap: &str, mac: Option<&str>) -> NetworkInterface {
        NetworkInterface {
            iface_id: id.into(),
            host_dev_name: tap.into(),
            guest_mac: mac.map(String::from),
            rx_rate_limiter: None,
            tx_rate_limiter: None,
            mtu: None,
        }
    }

    #[test]
    fn network_interfaces_are_checked_and_a_put_with_a_known_id_replaces() {
        let mut r = VmResources::default();
        r.insert_net_iface(iface("eth0", "tap0", Some("02:AA:00:00:00:01")))
            .unwrap();
        r.insert_net_iface(iface("eth1", "tap1", None)).unwrap();
        // Stored (and reported) in lower case.
        assert_eq!(
            r.net_ifaces[0].guest_mac.as_deref(),
            Some("02:aa:00:00:00:01")
        );
        for (n, words) in [
            (
                iface("eth2", "tap0", None),
                &["eth2", "host_dev_name tap0", "eth0"][..],
            ),
            (
                iface("eth2", "tap2", Some("02:aa:00:00:00:01")),
                &["eth2", "guest_mac 02:aa:00:00:00:01", "eth0"],
            ),
            (
                iface("eth2", "tap2", Some("02:aa:00:00:01")),
                &["eth2", "guest_mac", "02:aa:00:00:01"],
            ),
            (
                iface("eth2", "tap2", Some("ff:ff:ff:ff:ff:ff")),
                &["guest_mac", "multicast"],
            ),
            (iface("eth2", "a/b", None), &["host_dev_name 'a/b'"]),
            (iface("eth2", "", None), &["host_dev_name ''"]),
            (
                iface("eth2", "sixteen-bytes-xx", None),
                &["host_dev_name 'sixteen-bytes-xx'"],
            ),
            (iface("e.0", "tap2", None), &["iface_id 'e.0'"]),
            (
                NetworkInterface {
                    mtu: Some(1500),
                    ..iface("eth2", "tap2", None)
                },
                &["eth2", "mtu 1500"],
            ),
        ] {
            let e = r.insert_net_iface(n).unwrap_err();
            for w in words {
                assert!(e.0.contains(w), "{e} lacks {w:?}");
            }
        }
        assert_eq!(r.net_ifaces.len(), 2, "nothing was added");
        // A PUT with a known id replaces it in place, and may keep its own tap and MAC.
        r.insert_net_iface(iface("eth0", "tap0", Some("02:aa:00:00:00:01")))
            .unwrap();
        r.insert_net_iface(iface("eth0", "tap9", None)).unwrap();
        let ids: Vec<_> = r.net_ifaces.iter().map(|n| n.iface_id.as_str()).collect();
        assert_eq!(ids, ["eth0", "eth1"]);
        assert_eq!(r.net_ifaces[0].host_dev_name, "tap9");
        for i in 2..MAX_NETS {
            r.insert_net_iface(iface(&format!("eth{i}"), &format!("tap{i}x"), None))
                .unwrap();
        }
        let e = r
            .insert_net_iface(iface("one-more", "tapz", None))
            .unwrap_err();
        assert!(e.0.contains("at most 8"), "{e}");
    }

    #[test]
    fn vsock_cids_are_checked_and_the_id_is_dropped() {
        let mut r = VmResources::default();
        for cid in [0, 1, 2, u32::MAX] {
            let e = r
                .set_vsock(Vsock {
                    guest_cid: cid,
                    uds_path: "/tmp/v.sock".into(),
                    vsock_id: None,
                })
                .unwrap_err();
            assert!(e.0.contains(&format!("guest_cid {cid}")), "{e}");
        }
        let e = r
            .set_vsock(Vsock {
                guest_cid: 3,
                uds_path: "".into(),
                vsock_id: None,
            })
            .unwrap_err();
        assert!(e.0.contains("uds_path"), "{e}");
        assert_eq!(r.vsock, None);
        r.set_vsock(Vsock {
            guest_cid: 3,
            uds_path: "/tmp/v.sock".into(),
            vsock_id: Some("vsock0".into()),
        })
        .unwrap();
        r.set_vsock(Vsock {
            guest_cid: 7,
            uds_path: "/tmp/w.sock".into(),
            vsock_id: Some("vsock0".into()),
        })
        .unwrap();
        assert_eq!(
            r.vsock,
            Some(Vsock {
                guest_cid: 7,
                uds_path: "/tmp/w.sock".into(),
                vsock_id: None,
            })
        );
    }

    #[test]
    fn nets_and_vsock_reach_the_vm_config_and_the_full_config() {
        let k = scratch_file("k3", 4096);
        let json = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{}"}},
              "network-interfaces": [
                {{"iface_id": "wan", "host_dev_name": "tap-wan", "guest_mac": "02:00:00:00:00:0A",
                  "rx_rate_limiter": {{"bandwidth": {{"size": 1000, "refill_time": 100}}}}}},
                {{"iface_id": "lan", "host_dev_name": "tap-lan"}}
              ],
              "vsock": {{"guest_cid": 5, "uds_path": "/run/v.sock", "vsock_id": "vsock0"}}
            }}"#,
            k.display()
        );
        let r = VmResources::from_config_json(&json).unwrap();
        let c = r.to_vm_config(&VmConfig::default()).unwrap();
        assert_eq!(c.net_ids(), ["wan", "lan"]);
        assert_eq!(
            c.nets[0].backend,
            NetBackend::Tap {
                name: "tap-wan".into()
            }
        );
        assert_eq!(c.nets[0].mac, Some([2, 0, 0, 0, 0, 0x0a]));
        assert_eq!(
            c.nets[0].rx_rate_limiter.unwrap().bandwidth.unwrap().size,
            1000
        );
        assert_eq!((c.nets[1].mac, c.nets[1].tx_rate_limiter), (None, None));
        assert_eq!(
            c.vsock,
            Some(VsockConfig {
                cid: 5,
                uds_path: "/run/v.sock".into()
            })
        );
        // GET /vm/config in Firecracker's shape, and it reads back as a config file.
        let full = serde_json::to_value(r.full_config()).unwrap();
        assert_eq!(
            full["network-interfaces"][0]["guest_mac"],
            "02:00:00:00:00:0a"
        );
        assert_eq!(full["network-interfaces"][1]["host_dev_name"], "tap-lan");
        assert!(full["network-interfaces"][1].get("guest_mac").is_none());
        assert_eq!(
            full["vsock"],
            serde_json::json!({"guest_cid": 5, "uds_path": "/run/v.sock"})
        );
        let again = VmResources::from_config_json(&full.to_string()).unwrap();
        assert_eq!(again.net_ifaces, r.net_ifaces);
        assert_eq!(again.vsock, r.vsock);
        // The same rules as the API, naming the interface.
        let dup = json.replace("tap-lan", "tap-wan");
        let e = VmResources::from_config_json(&dup).unwrap_err();
        assert!(
            e.0.contains("network-interfaces") && e.0.contains("tap-wan"),
            "{e}"
        );
    }

    #[test]
    fn log_levels_parse_case_insensitively() {
        for (s, l) in [
            ("Warning", LogLevel::Warning),
            ("DEBUG", LogLevel::Debug),
            ("off", LogLevel::Off),
        ] {
            assert_eq!(
                serde_json::from_str::<LogLevel>(&format!("\"{s}\"")).unwrap(),
                l
            );
        }
        assert!(serde_json::from_str::<LogLevel>("\"loud\"").is_err());
    }
}
