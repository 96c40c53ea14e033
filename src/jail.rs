//! `cgvm jail`: start cgvm confined, as Firecracker's jailer does. As root, it builds a chroot
//! holding only what the VM needs (the cgvm binary, kernel, initrd, disks, config file, device
//! nodes, a directory for sockets), puts the process in a cgroup v2 with the given limits,
//! enters a new mount namespace (and optionally a new PID namespace and a given network
//! namespace), pivots into the chroot, sets resource limits, closes inherited descriptors,
//! clears the environment, drops to the given uid/gid and execs the jailed copy of cgvm.
//!
//! What lives here: argument rewriting (host paths to in-jail paths), building the jail
//! directory, the cgroup, and the namespace/privilege steps between fork and exec. The machine
//! itself is not here: the jailed process is an ordinary `cgvm run` / `cgvm serve`.

use std::collections::HashSet;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Args;
use vmm::outcome::EXIT_VMM_ERROR;

use crate::serve::{DEFAULT_API_SOCK, DEFAULT_ID};

/// `statfs` magic of a cgroup v2 file system.
const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
/// Firecracker's jailer default for RLIMIT_NOFILE.
const DEFAULT_NO_FILE: u64 = 2048;
/// Where sockets (API, vsock) live inside the jail.
const SOCKET_DIR: &str = "/run";

const JAIL_HELP: &str = "\
The jail lives in DIR/<id>/root, where <id> is jail's own --id (it is not read from the cgvm
arguments; pass the same --id after -- if the API should report it). DIR/<id>/root must not
exist yet. cgvm jail brings in:
  the cgvm binary (copied, exec'd as /cgvm),
  --kernel, --initrd, --config-file and the files the config file names (hard-linked when on
    the same file system, else copied and given to UID:GID),
  disks (--disk, drives[].path_on_host: hard-linked, else bind-mounted; never copied),
  outputs (--console file:P, --log-path, --metrics-path, serial_out_path: created empty in
    the jail, owned by UID:GID),
  sockets (--api-sock, --vsock ...,uds=P, vsock.uds_path: moved to /run/<name>; serve's
    default API socket is /run/firecracker.socket),
  /dev/kvm and /dev/net/tun nodes owned by UID:GID (mode 0600), /tmp for disk overlays.
Hard-linked files stay the host's inode: their owner and mode are not changed, so UID needs
read access (write access for a `persist` disk).

Before starting cgvm it prints `cgvm jail: root R; api socket P; ...` (host paths) and then
`cgvm jail: pid N` (cgvm's pid on the host). Without --daemonize it waits for cgvm, exits with
its status, reports an OOM kill by the cgroup, and removes the cgroup; the jail directory is
left for the caller to inspect and remove.";

/// `cgvm jail`'s arguments.
#[derive(Args, Debug)]
#[command(after_help = JAIL_HELP)]
pub struct JailArgs {
    /// The jail's id: names DIR/<id> and the cgroup cgvm/<id> (letters, digits, '-', '_').
    #[arg(long, default_value = DEFAULT_ID)]
    id: String,
    /// The uid cgvm runs as.
    #[arg(long)]
    uid: u32,
    /// The gid cgvm runs as (also its only group).
    #[arg(long)]
    gid: u32,
    /// The directory jails are made in: the chroot is DIR/<id>/root.
    #[arg(long, value_name = "DIR")]
    chroot_base: PathBuf,
    /// Join this network namespace (e.g. /var/run/netns/NAME).
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// A cgroup v2 setting, e.g. memory.max=536870912, cpu.max="50000 100000",
    /// pids.max=64; repeat for more. The cgroup is <cgroup-root>/cgvm/<id>.
    #[arg(long = "cgroup", value_name = "KEY=VALUE")]
    cgroups: Vec<String>,
    /// Where the cgroup v2 hierarchy is mounted.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/cgroup")]
    cgroup_root: PathBuf,
    /// A resource limit: no-file=N (default 2048) or fsize=BYTES; repeat for more.
    #[arg(long = "resource-limit", value_name = "KEY=VALUE")]
    resource_limits: Vec<String>,
    /// Run cgvm as PID 1 of a new PID namespace (and mount /proc in the jail).
    #[arg(long)]
    new_pid_ns: bool,
    /// Detach: print the lines, start cgvm in a new session with stdio on /dev/null, exit 0.
    #[arg(long)]
    daemonize: bool,
    /// The cgvm arguments: `run ...`, `serve ...` or Firecracker's flags.
    #[arg(last = true, required = true, value_name = "CGVM ARGS")]
    args: Vec<OsString>,
}

/// What a host path is to the VM, which says how it enters the jail.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Read by cgvm: hard link, else copy.
    Input,
    /// A disk image: hard link, else bind mount; never copied.
    Disk,
    /// Written by cgvm: an empty file owned by the jail's user.
    Output(&'static str),
    /// A socket cgvm creates: a name in /run.
    Socket(&'static str),
}

/// The jail being built.
struct Builder {
    root: PathBuf,
    uid: u32,
    gid: u32,
    names: HashSet<OsString>,
    /// Disks to bind-mount in the new mount namespace: (host path, path under `root`).
    binds: Vec<(PathBuf, PathBuf)>,
    /// `what host-path` pieces of the report line.
    report: Vec<String>,
}

/// Runs `cgvm jail`; returns the exit status.
pub fn run(args: &JailArgs) -> i32 {
    match jail(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("cgvm jail: error: {e}");
            EXIT_VMM_ERROR
        }
    }
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn io_ctx(what: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> String {
    move |e| format!("{what}: {e}")
}

fn cstr(p: impl AsRef<OsStr>) -> Result<CString, String> {
    CString::new(p.as_ref().as_bytes())
        .map_err(|_| format!("{}: contains a NUL byte", p.as_ref().to_string_lossy()))
}

fn last_os_error(what: impl std::fmt::Display) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn check_id(id: &str) -> Result<(), String> {
    let ok = !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "--id '{id}': use 1 to 64 letters, digits, '-' or '_'"
        ))
    }
}

/// Parses `KEY=VALUE` cgroup settings, refusing keys that are not plain interface files.
fn parse_cgroup_settings(items: &[String]) -> Result<Vec<(String, String)>, String> {
    items
        .iter()
        .map(|s| {
            let (k, v) = s
                .split_once('=')
                .ok_or_else(|| format!("--cgroup {s}: expected KEY=VALUE"))?;
            let plain = k
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_');
            let Some((controller, _)) = k.split_once('.') else {
                return Err(format!("--cgroup {s}: KEY is a file like memory.max"));
            };
            if !plain || controller.is_empty() || controller == "cgroup" {
                return Err(format!(
                    "--cgroup {s}: KEY must be a controller's file like memory.max, cpu.max, pids.max"
                ));
            }
            Ok((k.to_string(), v.to_string()))
        })
        .collect()
}

/// Parses `--resource-limit KEY=VALUE` into (resource, value); adds the no-file default.
fn parse_rlimits(items: &[String]) -> Result<Vec<(libc::__rlimit_resource_t, u64)>, String> {
    let mut out = Vec::new();
    for s in items {
        let (k, v) = s
            .split_once('=')
            .ok_or_else(|| format!("--resource-limit {s}: expected KEY=VALUE"))?;
        let n: u64 = v
            .parse()
            .map_err(|_| format!("--resource-limit {s}: VALUE must be a number"))?;
        let res = match k {
            "no-file" => libc::RLIMIT_NOFILE,
            "fsize" => libc::RLIMIT_FSIZE,
            _ => return Err(format!("--resource-limit {s}: KEY is no-file or fsize")),
        };
        out.retain(|(r, _)| *r != res);
        out.push((res, n));
    }
    if !out.iter().any(|(r, _)| *r == libc::RLIMIT_NOFILE) {
        out.push((libc::RLIMIT_NOFILE, DEFAULT_NO_FILE));
    }
    Ok(out)
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<(), String> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(io_ctx(format!("chown {}", path.display())))
}

fn mkdir(path: &Path, mode: u32) -> Result<(), String> {
    fs::DirBuilder::new()
        .mode(mode)
        .create(path)
        .map_err(io_ctx(format!("mkdir {}", path.display())))?;
    // The umask may have taken bits away.
    fs::set_permissions(path, fs::Permissions::from_mode(mode))
        .map_err(io_ctx(format!("chmod {}", path.display())))
}

impl Builder {
    /// A name in the jail's root for `host`: its file name, prefixed when already taken.
    fn name_for(&mut self, host: &Path) -> Result<OsString, String> {
        let base = host
            .file_name()
            .ok_or_else(|| format!("{}: not a file path", host.display()))?
            .to_os_string();
        let mut name = base.clone();
        let mut n = 1;
        while name == "cgvm" || !self.names.insert(name.clone()) {
            let mut s = OsString::from(format!("{n}-"));
            s.push(&base);
            name = s;
            n += 1;
        }
        Ok(name)
    }

    /// Brings `host` into the jail as `kind`; returns its path inside the jail.
    fn place(&mut self, host: &str, kind: Kind) -> Result<String, String> {
        let host_path = Path::new(host);
        if let Kind::Socket(what) = kind {
            let name = self.name_for(host_path)?;
            let inside = Path::new(SOCKET_DIR).join(&name);
            let outside = self
                .root
                .join(SOCKET_DIR.trim_start_matches('/'))
                .join(&name);
            self.report.push(format!("{what} {}", outside.display()));
            return Ok(inside.to_string_lossy().into_owned());
        }
        let name = self.name_for(host_path)?;
        let dest = self.root.join(&name);
        match kind {
            Kind::Input => match fs::hard_link(host_path, &dest) {
                Ok(()) => {}
                Err(_) => {
                    fs::copy(host_path, &dest).map_err(io_ctx(format!(
                        "cannot hard-link or copy {} into the jail",
                        host_path.display()
                    )))?;
                    chown(&dest, self.uid, self.gid)?;
                    fs::set_permissions(&dest, fs::Permissions::from_mode(0o400))
                        .map_err(io_ctx(format!("chmod {}", dest.display())))?;
                }
            },
            Kind::Disk => {
                let meta = fs::metadata(host_path)
                    .map_err(io_ctx(format!("disk {}", host_path.display())))?;
                if !meta.is_file() {
                    return Err(format!("disk {}: not a regular file", host_path.display()));
                }
                if let Err(e) = fs::hard_link(host_path, &dest) {
                    log::info!(
                        "jail: cannot hard-link disk {} ({e}); bind-mounting it",
                        host_path.display()
                    );
                    File::create(&dest).map_err(io_ctx(format!("create {}", dest.display())))?;
                    let host_abs = fs::canonicalize(host_path)
                        .map_err(io_ctx(format!("disk {}", host_path.display())))?;
                    self.binds.push((host_abs, dest.clone()));
                }
            }
            Kind::Output(what) => {
                OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(&dest)
                    .map_err(io_ctx(format!("create {}", dest.display())))?;
                chown(&dest, self.uid, self.gid)?;
                self.report.push(format!("{what} {}", dest.display()));
            }
            Kind::Socket(_) => unreachable!("handled above"),
        }
        Ok(format!("/{}", name.to_string_lossy()))
    }

    /// Copies the config file in with the paths it names rewritten; returns its in-jail path.
    fn place_config(&mut self, host: &str) -> Result<String, String> {
        let text = fs::read_to_string(host).map_err(io_ctx(format!("config file {host}")))?;
        let mut v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| format!("config file {host}: not JSON: {e}"))?;
        let fields: [(&str, &str, Kind); 6] = [
            ("boot-source", "kernel_image_path", Kind::Input),
            ("boot-source", "initrd_path", Kind::Input),
            ("vsock", "uds_path", Kind::Socket("vsock")),
            ("logger", "log_path", Kind::Output("log")),
            ("metrics", "metrics_path", Kind::Output("metrics")),
            ("serial", "serial_out_path", Kind::Output("console")),
        ];
        for (section, key, kind) in fields {
            if let Some(slot) = v.get_mut(section).and_then(|s| s.get_mut(key)) {
                if let Some(p) = slot.as_str().map(str::to_string) {
                    *slot = self.place(&p, kind)?.into();
                }
            }
        }
        if let Some(drives) = v.get_mut("drives").and_then(|d| d.as_array_mut()) {
            for d in drives {
                if let Some(slot) = d.get_mut("path_on_host") {
                    if let Some(p) = slot.as_str().map(str::to_string) {
                        *slot = self.place(&p, Kind::Disk)?.into();
                    }
                }
            }
        }
        let name = self.name_for(Path::new(host))?;
        let dest = self.root.join(&name);
        let body = serde_json::to_string_pretty(&v).map_err(err)?;
        fs::write(&dest, body).map_err(io_ctx(format!("write {}", dest.display())))?;
        chown(&dest, self.uid, self.gid)?;
        fs::set_permissions(&dest, fs::Permissions::from_mode(0o400))
            .map_err(io_ctx(format!("chmod {}", dest.display())))?;
        Ok(format!("/{}", name.to_string_lossy()))
    }
}

/// Rewrites one flag's value, bringing the file it names into the jail.
type ArgRewriter = fn(&mut Builder, &str) -> Result<String, String>;

/// Rewrites the cgvm arguments to in-jail paths, bringing the files they name into the jail.
fn rewrite_args(b: &mut Builder, args: &[OsString]) -> Result<Vec<String>, String> {
    let args: Vec<String> = args
        .iter()
        .map(|a| {
            a.to_str()
                .map(str::to_string)
                .ok_or_else(|| format!("argument {}: not UTF-8", a.to_string_lossy()))
        })
        .collect::<Result<_, _>>()?;
    // Leading global options, then the subcommand (or Firecracker's flags).
    let mut i = 0;
    while i < args.len() && args[i].starts_with("--log-level") {
        i += if args[i] == "--log-level" { 2 } else { 1 };
    }
    let mode = match args.get(i).map(String::as_str) {
        Some("run") => "run",
        Some("serve") => "serve",
        Some(a) if a.starts_with('-') => "firecracker",
        Some(a) => {
            return Err(format!(
                "cgvm arguments: '{a}': jail runs `run ...`, `serve ...` or Firecracker's flags"
            ))
        }
        None => return Err("no cgvm arguments after --".into()),
    };
    let mut out: Vec<String> = args[..i].to_vec();
    let mut saw_api_sock = false;
    let mut no_api = false;
    let mut j = i;
    while j < args.len() {
        let a = &args[j];
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (a.clone(), None),
        };
        let kind: Option<ArgRewriter> = match (mode, flag.as_str()) {
            ("run", "--kernel" | "--initrd") => Some(|b, v| b.place(v, Kind::Input)),
            // Read at start, inside the jail.
            (_, "--seccomp-filter") => Some(|b, v| b.place(v, Kind::Input)),
            ("run", "--disk") => Some(|b, v| {
                let (path, opts) = match v.split_once(',') {
                    Some((p, o)) => (p, Some(o)),
                    None => (v, None),
                };
                let inside = b.place(path, Kind::Disk)?;
                Ok(match opts {
                    Some(o) => format!("{inside},{o}"),
                    None => inside,
                })
            }),
            ("run", "--console") => Some(|b, v| match v.strip_prefix("file:") {
                Some(p) => Ok(format!("file:{}", b.place(p, Kind::Output("console"))?)),
                None => Ok(v.to_string()),
            }),
            ("run", "--vsock") => Some(|b, v| {
                let mut parts: Vec<String> = v.split(',').map(str::to_string).collect();
                let mut have = false;
                for p in parts.iter_mut().skip(1) {
                    if let Some(path) = p.strip_prefix("uds=") {
                        *p = format!("uds={}", b.place(path, Kind::Socket("vsock"))?);
                        have = true;
                    }
                }
                if !have {
                    let inside = b.place("cgvm.vsock", Kind::Socket("vsock"))?;
                    parts.push(format!("uds={inside}"));
                }
                Ok(parts.join(","))
            }),
            ("run", "--net") => Some(|_, v| {
                if v.starts_with("user") {
                    Err(format!(
                        "--net {v}: passt is not in the jail; use tap:NAME (with --netns)"
                    ))
                } else {
                    Ok(v.to_string())
                }
            }),
            ("serve" | "firecracker", "--api-sock") => {
                saw_api_sock = true;
                Some(|b, v| b.place(v, Kind::Socket("api socket")))
            }
            ("serve" | "firecracker", "--config-file") => Some(|b, v| b.place_config(v)),
            ("serve" | "firecracker", "--log-path") => Some(|b, v| b.place(v, Kind::Output("log"))),
            ("serve" | "firecracker", "--metrics-path") => {
                Some(|b, v| b.place(v, Kind::Output("metrics")))
            }
            _ => None,
        };
        if flag == "--no-api" {
            no_api = true;
        }
        match kind {
            None => {
                out.push(a.clone());
                j += 1;
            }
            Some(f) => {
                let (value, used) = match inline {
                    Some(v) => (v, 1),
                    None => (
                        args.get(j + 1)
                            .cloned()
                            .ok_or_else(|| format!("{flag} needs a value"))?,
                        2,
                    ),
                };
                out.push(flag.clone());
                out.push(f(b, &value)?);
                j += used;
            }
        }
    }
    if mode == "firecracker" && !saw_api_sock && !no_api {
        b.place(DEFAULT_API_SOCK, Kind::Socket("api socket"))?;
    }
    Ok(out)
}

/// The program interpreter (PT_INTERP) an ELF64 executable names, if any.
fn elf_interpreter(exe: &Path) -> Result<Option<PathBuf>, String> {
    let data = fs::read(exe).map_err(io_ctx(format!("read {}", exe.display())))?;
    let u16_at = |o: usize| {
        data.get(o..o + 2)
            .map(|b| u16::from_le_bytes([b[0], b[1]]) as usize)
    };
    let u64_at = |o: usize| {
        data.get(o..o + 8)
            .and_then(|b| b.try_into().ok())
            .map(|b| u64::from_le_bytes(b) as usize)
    };
    if data.get(..5) != Some(b"\x7fELF\x02") {
        return Err(format!("{}: not an ELF64 executable", exe.display()));
    }
    let bad = || format!("{}: malformed ELF program headers", exe.display());
    let phoff = u64_at(32).ok_or_else(bad)?;
    let phentsize = u16_at(54).ok_or_else(bad)?;
    let phnum = u16_at(56).ok_or_else(bad)?;
    for i in 0..phnum {
        let ph = phoff + i * phentsize;
        let ty = data.get(ph..ph + 4).ok_or_else(bad)?;
        if ty == 3u32.to_le_bytes() {
            let off = u64_at(ph + 8).ok_or_else(bad)?;
            let len = u64_at(ph + 32).ok_or_else(bad)?;
            let raw = data.get(off..off.saturating_add(len)).ok_or_else(bad)?;
            let raw = raw.split(|b| *b == 0).next().unwrap_or_default();
            return Ok(Some(PathBuf::from(OsStr::from_bytes(raw))));
        }
    }
    Ok(None)
}

/// Copies (or hard-links) `host` to the same absolute path under `root`.
fn mirror(root: &Path, host: &Path, inside: &Path) -> Result<(), String> {
    let dest = root.join(inside.strip_prefix("/").unwrap_or(inside));
    if dest.exists() {
        return Ok(());
    }
    if let Some(parent) = dest.parent() {
        fs::DirBuilder::new()
            .mode(0o755)
            .recursive(true)
            .create(parent)
            .map_err(io_ctx(format!("mkdir {}", parent.display())))?;
    }
    if fs::hard_link(host, &dest).is_err() {
        fs::copy(host, &dest).map_err(io_ctx(format!(
            "copy {} to {}",
            host.display(),
            dest.display()
        )))?;
    }
    Ok(())
}

/// A dynamically linked cgvm needs its program interpreter and shared libraries in the
/// jail: the interpreter at the path the binary names, each library at the path this
/// process has it mapped from (/proc/self/maps). A static binary needs neither.
fn bring_in_shared_objects(root: &Path, exe: &Path) -> Result<(), String> {
    let Some(interp) = elf_interpreter(exe)? else {
        return Ok(());
    };
    let interp_host = fs::canonicalize(&interp)
        .map_err(io_ctx(format!("program interpreter {}", interp.display())))?;
    mirror(root, &interp_host, &interp)?;
    let maps = fs::read_to_string("/proc/self/maps").map_err(io_ctx("/proc/self/maps"))?;
    let mut seen = HashSet::new();
    for line in maps.lines() {
        let Some(path) = line.split_whitespace().nth(5) else {
            continue;
        };
        let p = Path::new(path);
        let is_so = p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.contains(".so"));
        if path.starts_with('/') && is_so && p != interp_host && seen.insert(p.to_path_buf()) {
            mirror(root, p, p)?;
        }
    }
    Ok(())
}

/// Checks the cgroup v2 root, creates `<root>/cgvm/<id>` with `settings`; returns its path.
fn make_cgroup(root: &Path, id: &str, settings: &[(String, String)]) -> Result<PathBuf, String> {
    let c = cstr(root)?;
    // SAFETY: a zeroed statfs is a valid out-buffer; `c` is a NUL-terminated path.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statfs writes only into `st`.
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        return Err(last_os_error(format!("cgroup root {}", root.display())));
    }
    if st.f_type as i64 != CGROUP2_SUPER_MAGIC {
        return Err(format!(
            "cgroup v2 is not mounted at {} (file system magic {:#x}); this host has no \
             unified cgroup hierarchy there: mount cgroup2 or pass --cgroup-root",
            root.display(),
            st.f_type
        ));
    }
    let available = fs::read_to_string(root.join("cgroup.controllers"))
        .map_err(io_ctx(format!("{}/cgroup.controllers", root.display())))?;
    let mut controllers: Vec<&str> = settings
        .iter()
        .filter_map(|(k, _)| k.split_once('.').map(|(c, _)| c))
        .collect();
    controllers.sort_unstable();
    controllers.dedup();
    for c in &controllers {
        if !available.split_whitespace().any(|a| a == *c) {
            return Err(format!(
                "the {c} controller is not available in {} (it has: {})",
                root.display(),
                available.trim()
            ));
        }
    }
    let parent = root.join("cgvm");
    match fs::create_dir(&parent) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", parent.display())),
    }
    for dir in [root, parent.as_path()] {
        let file = dir.join("cgroup.subtree_control");
        let enabled = fs::read_to_string(&file).unwrap_or_default();
        for c in &controllers {
            if !enabled.split_whitespace().any(|a| a == *c) {
                fs::write(&file, format!("+{c}")).map_err(io_ctx(format!(
                    "cannot enable the {c} controller in {}",
                    file.display()
                )))?;
            }
        }
    }
    let cg = parent.join(id);
    if let Err(e) = fs::create_dir(&cg) {
        if e.kind() != ErrorKind::AlreadyExists {
            return Err(format!("mkdir {}: {e}", cg.display()));
        }
        // A leftover of an earlier jail with this id: reusable only when empty.
        fs::remove_dir(&cg).map_err(io_ctx(format!(
            "cgroup {} exists and is in use (another jail with id {id}?)",
            cg.display()
        )))?;
        fs::create_dir(&cg).map_err(io_ctx(format!("mkdir {}", cg.display())))?;
    }
    for (k, v) in settings {
        if let Err(e) = fs::write(cg.join(k), v) {
            let _ = fs::remove_dir(&cg);
            return Err(format!("cgroup {}: cannot set {k}={v}: {e}", cg.display()));
        }
    }
    Ok(cg)
}

/// The count after `key` in a cgroup `memory.events`-style file.
fn cgroup_event(cg: &Path, file: &str, key: &str) -> u64 {
    fs::read_to_string(cg.join(file))
        .unwrap_or_default()
        .lines()
        .find_map(|l| {
            let (k, v) = l.split_once(' ')?;
            (k == key).then(|| v.trim().parse().ok()).flatten()
        })
        .unwrap_or(0)
}

fn remove_cgroup(cg: &Path) {
    // The cgroup stays busy for a moment after its last process is reaped.
    for _ in 0..200 {
        if fs::remove_dir(cg).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("cgvm jail: warning: cannot remove cgroup {}", cg.display());
}

/// Everything the child needs between fork and exec, prepared before the fork.
struct ChildPlan {
    root: CString,
    binds: Vec<(CString, CString)>,
    cgroup_procs: Option<File>,
    netns: Option<File>,
    devnull: Option<File>,
    mount_proc: bool,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
    uid: u32,
    gid: u32,
    exe: CString,
    argv: Vec<CString>,
}

fn jail(args: &JailArgs) -> Result<i32, String> {
    check_id(&args.id)?;
    let settings = parse_cgroup_settings(&args.cgroups)?;
    let rlimits = parse_rlimits(&args.resource_limits)?;
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err(
            "cgvm jail must run as root (it makes device nodes, mounts and cgroups, \
                    then drops to --uid/--gid)"
                .into(),
        );
    }
    let base = fs::canonicalize(&args.chroot_base).map_err(io_ctx(format!(
        "--chroot-base {}",
        args.chroot_base.display()
    )))?;
    let netns = match &args.netns {
        Some(p) => Some(File::open(p).map_err(io_ctx(format!("--netns {}", p.display())))?),
        None => None,
    };
    let instance = base.join(&args.id);
    let root = instance.join("root");
    if root.exists() {
        return Err(format!(
            "{} already exists (a jail with id {} is running, or was left behind: remove it)",
            root.display(),
            args.id
        ));
    }
    match fs::DirBuilder::new().mode(0o755).create(&instance) {
        Ok(()) => {}
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
        Err(e) => return Err(format!("mkdir {}: {e}", instance.display())),
    }
    mkdir(&root, 0o755)?;
    let rc = cstr(&root)?;
    // SAFETY: a zeroed statvfs is a valid out-buffer; `rc` is a NUL-terminated path.
    let mut vfs: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: as above; statvfs writes only into `vfs`.
    if unsafe { libc::statvfs(rc.as_ptr(), &mut vfs) } == 0 && vfs.f_flag & libc::ST_NODEV != 0 {
        return Err(format!(
            "--chroot-base {} is on a nodev mount: the jail's /dev/kvm could not be opened",
            base.display()
        ));
    }

    let mut b = Builder {
        root: root.clone(),
        uid: args.uid,
        gid: args.gid,
        names: ["cgvm", "dev", "run", "tmp", "proc", "lib", "lib64", "usr"]
            .into_iter()
            .map(OsString::from)
            .collect(),
        binds: Vec::new(),
        report: Vec::new(),
    };
    let cgvm_args = rewrite_args(&mut b, &args.args)?;

    // The binary, copied (so the host's cannot be changed through the jail).
    let exe = std::env::current_exe().map_err(io_ctx("cannot find the cgvm binary"))?;
    let jailed_exe = root.join("cgvm");
    fs::copy(&exe, &jailed_exe).map_err(io_ctx(format!(
        "copy {} to {}",
        exe.display(),
        jailed_exe.display()
    )))?;
    fs::set_permissions(&jailed_exe, fs::Permissions::from_mode(0o555))
        .map_err(io_ctx(format!("chmod {}", jailed_exe.display())))?;

    bring_in_shared_objects(&root, &exe)?;

    // Device nodes, the sockets' directory, a /tmp for disk overlays.
    let dev = root.join("dev");
    mkdir(&dev, 0o755)?;
    mkdir(&dev.join("net"), 0o755)?;
    for (path, minor) in [(dev.join("kvm"), 232), (dev.join("net/tun"), 200)] {
        let c = cstr(&path)?;
        // SAFETY: `c` is a NUL-terminated path; mknod creates a node there and touches no memory.
        let r = unsafe { libc::mknod(c.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(10, minor)) };
        if r != 0 {
            return Err(last_os_error(format!("mknod {}", path.display())));
        }
        chown(&path, args.uid, args.gid)?;
    }
    for d in ["run", "tmp"] {
        let p = root.join(d);
        mkdir(&p, 0o700)?;
        chown(&p, args.uid, args.gid)?;
    }
    if args.new_pid_ns {
        mkdir(&root.join("proc"), 0o555)?;
    }

    let cgroup = if settings.is_empty() {
        None
    } else {
        Some(make_cgroup(&args.cgroup_root, &args.id, &settings)?)
    };
    let result = start(
        args,
        &b,
        &root,
        cgvm_args,
        netns,
        cgroup.as_deref(),
        rlimits,
    );
    if let Some(cg) = &cgroup {
        if !(args.daemonize && result.is_ok()) {
            remove_cgroup(cg);
        }
    }
    result
}

fn start(
    args: &JailArgs,
    b: &Builder,
    root: &Path,
    cgvm_args: Vec<String>,
    netns: Option<File>,
    cgroup: Option<&Path>,
    rlimits: Vec<(libc::__rlimit_resource_t, u64)>,
) -> Result<i32, String> {
    let cgroup_procs = match cgroup {
        Some(cg) => Some(
            OpenOptions::new()
                .write(true)
                .open(cg.join("cgroup.procs"))
                .map_err(io_ctx(format!("{}/cgroup.procs", cg.display())))?,
        ),
        None => None,
    };
    let devnull = if args.daemonize {
        Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(io_ctx("/dev/null"))?,
        )
    } else {
        None
    };
    let mut argv = vec![cstr("cgvm")?];
    for a in &cgvm_args {
        argv.push(cstr(a)?);
    }
    let plan = ChildPlan {
        root: cstr(root)?,
        binds: b
            .binds
            .iter()
            .map(|(h, j)| Ok((cstr(h)?, cstr(j)?)))
            .collect::<Result<_, String>>()?,
        cgroup_procs,
        netns,
        devnull,
        mount_proc: args.new_pid_ns,
        rlimits,
        uid: args.uid,
        gid: args.gid,
        exe: cstr("/cgvm")?,
        argv,
    };

    let mut line = format!("cgvm jail: root {}", root.display());
    for r in &b.report {
        line.push_str("; ");
        line.push_str(r);
    }
    if let Some(cg) = cgroup {
        line.push_str(&format!("; cgroup {}", cg.display()));
    }
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{line}");
    let _ = stdout.flush();

    if args.new_pid_ns {
        // SAFETY: unshare takes flags only; CLONE_NEWPID affects this process's next children.
        if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
            return Err(last_os_error("unshare(CLONE_NEWPID)"));
        }
    }
    // SAFETY: the child only makes async-signal-safe system calls on data prepared above
    // (and writes an error message before _exit).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(last_os_error("fork"));
    }
    if pid == 0 {
        let e = child(&plan);
        let _ = writeln!(std::io::stderr(), "cgvm jail: error: {e}");
        // SAFETY: _exit ends the child without running the parent's atexit handlers.
        unsafe { libc::_exit(EXIT_VMM_ERROR) };
    }
    drop(plan);
    let _ = writeln!(stdout, "cgvm jail: pid {pid}");
    let _ = stdout.flush();
    if args.daemonize {
        return Ok(0);
    }
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid out-pointer; `pid` is this process's child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        if std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            return Err(last_os_error("waitpid"));
        }
    }
    let ooms = cgroup.map_or(0, |cg| cgroup_event(cg, "memory.events", "oom_kill"));
    if ooms > 0 {
        let max = cgroup
            .and_then(|cg| fs::read_to_string(cg.join("memory.max")).ok())
            .unwrap_or_default();
        eprintln!(
            "cgvm jail: error: the kernel's OOM killer killed {ooms} process(es) in the jail's \
             cgroup: memory.max ({}) is below what this VM needs",
            max.trim()
        );
    }
    if libc::WIFEXITED(status) {
        Ok(libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        let sig = libc::WTERMSIG(status);
        if ooms == 0 {
            eprintln!("cgvm jail: cgvm was killed by signal {sig}");
        }
        Ok(128 + sig)
    } else {
        Ok(EXIT_VMM_ERROR)
    }
}

fn check(r: libc::c_int, what: &str) -> Result<(), String> {
    if r == 0 {
        Ok(())
    } else {
        Err(last_os_error(what))
    }
}

/// In the forked child: confine, drop privileges and exec. Returns only on failure.
fn child(p: &ChildPlan) -> String {
    match confine(p) {
        Ok(()) => "execve returned".into(),
        Err(e) => e,
    }
}

fn confine(p: &ChildPlan) -> Result<(), String> {
    let null = std::ptr::null::<libc::c_char>();
    if let Some(dn) = &p.devnull {
        // SAFETY: setsid and dup2 take plain integers.
        unsafe {
            libc::setsid();
            for fd in 0..3 {
                libc::dup2(dn.as_raw_fd(), fd);
            }
        }
    }
    if let Some(f) = &p.cgroup_procs {
        (&*f)
            .write_all(b"0")
            .map_err(io_ctx("cannot join the jail's cgroup"))?;
    }
    if let Some(ns) = &p.netns {
        // SAFETY: `ns` is an open namespace descriptor; setns takes integers.
        let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
        check(r, "setns(--netns)")?;
    }
    // SAFETY: unshare takes flags only.
    let r = unsafe { libc::unshare(libc::CLONE_NEWNS) };
    check(r, "unshare(CLONE_NEWNS)")?;
    let none = std::ptr::null::<libc::c_void>();
    // SAFETY: "/" is a NUL-terminated string; the other pointers may be null for this call.
    let r = unsafe {
        libc::mount(
            null,
            c"/".as_ptr(),
            null,
            libc::MS_REC | libc::MS_PRIVATE,
            none,
        )
    };
    check(r, "make / private")?;
    // SAFETY: `root` is a NUL-terminated path that outlives the call.
    let r = unsafe {
        libc::mount(
            p.root.as_ptr(),
            p.root.as_ptr(),
            null,
            libc::MS_BIND | libc::MS_REC,
            none,
        )
    };
    check(r, "bind-mount the jail root on itself")?;
    for (host, inside) in &p.binds {
        // SAFETY: both paths are NUL-terminated strings that outlive the call.
        let r = unsafe { libc::mount(host.as_ptr(), inside.as_ptr(), null, libc::MS_BIND, none) };
        let what = format!(
            "disk {}: cannot hard-link it (another file system?) nor bind-mount it",
            host.to_string_lossy()
        );
        check(r, &what)?;
    }
    // SAFETY: chdir takes a NUL-terminated path.
    let r = unsafe { libc::chdir(p.root.as_ptr()) };
    check(r, "chdir to the jail root")?;
    // pivot_root(".", "."): the old root is stacked on the new one, then detached.
    // SAFETY: both arguments are NUL-terminated paths.
    let r = unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) };
    check(r as libc::c_int, "pivot_root")?;
    // SAFETY: umount2 takes a NUL-terminated path and flags.
    let r = unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) };
    check(r, "unmount the old root")?;
    // SAFETY: chdir takes a NUL-terminated path.
    let r = unsafe { libc::chdir(c"/".as_ptr()) };
    check(r, "chdir /")?;
    if p.mount_proc {
        let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
        // SAFETY: all three strings are NUL-terminated literals; the data pointer may be null.
        let r = unsafe {
            libc::mount(
                c"proc".as_ptr(),
                c"/proc".as_ptr(),
                c"proc".as_ptr(),
                flags,
                none,
            )
        };
        check(r, "mount /proc")?;
    }
    for (res, n) in &p.rlimits {
        let lim = libc::rlimit {
            rlim_cur: *n,
            rlim_max: *n,
        };
        // SAFETY: `lim` is a valid rlimit.
        check(unsafe { libc::setrlimit(*res, &lim) }, "setrlimit")?;
    }
    let gid = p.gid;
    // SAFETY: setgroups reads one gid from `&gid`; setgid/setuid take integers.
    check(unsafe { libc::setgroups(1, &gid) }, "setgroups")?;
    // SAFETY: as above.
    check(unsafe { libc::setgid(p.gid) }, "setgid")?;
    // SAFETY: as above.
    check(unsafe { libc::setuid(p.uid) }, "setuid")?;
    close_inherited_fds();
    let mut argv: Vec<*const libc::c_char> = p.argv.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let envp: [*const libc::c_char; 1] = [std::ptr::null()];
    // SAFETY: `exe` and every argv entry are NUL-terminated strings; argv and envp end in null.
    unsafe { libc::execve(p.exe.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    Err(last_os_error("execve /cgvm in the jail"))
}

/// Closes every descriptor above stderr.
fn close_inherited_fds() {
    // SAFETY: close_range takes integers; closing descriptors this process no longer needs.
    let r = unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) };
    if r != 0 {
        for fd in 3..65536 as RawFd {
            // SAFETY: close on a descriptor number; unused ones return EBADF.
            unsafe { libc::close(fd) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn builder(root: &Path) -> Builder {
        Builder {
            root: root.to_path_buf(),
            uid: 65534,
            gid: 65534,
            names: HashSet::new(),
            binds: Vec::new(),
            report: Vec::new(),
        }
    }

    #[test]
    fn ids_and_settings_are_checked() {
        assert!(check_id("vm-1_a").is_ok());
        assert!(check_id("../x").is_err());
        assert!(check_id("").is_err());
        let ok = parse_cgroup_settings(&["memory.max=16777216".into(), "pids.max=64".into()]);
        assert_eq!(ok.expect("valid").len(), 2);
        for bad in ["memory.max", "../memory.max=1", "cgroup.procs=1", "max=1"] {
            assert!(parse_cgroup_settings(&[bad.into()]).is_err(), "{bad}");
        }
        let r = parse_rlimits(&["fsize=100".into()]).expect("valid");
        assert!(r.contains(&(libc::RLIMIT_FSIZE, 100)));
        assert!(r.contains(&(libc::RLIMIT_NOFILE, DEFAULT_NO_FILE)));
        assert!(parse_rlimits(&["cpu=1".into()]).is_err());
    }

    #[test]
    fn run_arguments_are_rewritten_to_jail_paths() {
        let d = std::env::temp_dir().join(format!("cgvm-jail-unit-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        let root = d.join("root");
        fs::create_dir_all(&root).expect("mkdir");
        fs::write(d.join("vmlinux"), b"k").expect("write");
        fs::write(d.join("disk.img"), b"d").expect("write");
        fs::write(d.join("filters.json"), b"{}").expect("write");
        let mut b = builder(&root);
        b.names.insert("cgvm".into());
        let args: Vec<OsString> = [
            "run",
            "--kernel",
            d.join("vmlinux").to_str().expect("utf-8"),
            &format!("--disk={},ro", d.join("disk.img").display()),
            "--console",
            "file:/somewhere/console.log",
            "--vsock",
            "3,uds=/x/v.sock",
            "--seccomp-filter",
            d.join("filters.json").to_str().expect("utf-8"),
            "--memory",
            "64",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        let out = rewrite_args(&mut b, &args).expect("rewrite");
        assert_eq!(
            out,
            [
                "run",
                "--kernel",
                "/vmlinux",
                "--disk",
                "/disk.img,ro",
                "--console",
                "file:/console.log",
                "--vsock",
                "3,uds=/run/v.sock",
                "--seccomp-filter",
                "/filters.json",
                "--memory",
                "64"
            ]
        );
        assert_eq!(fs::read(root.join("vmlinux")).expect("linked"), b"k");
        assert_eq!(fs::read(root.join("filters.json")).expect("linked"), b"{}");
        assert!(root.join("console.log").exists());
        assert!(
            b.report
                .iter()
                .any(|r| r.contains("vsock")
                    && r.ends_with(&format!("{}/run/v.sock", root.display())))
        );
        let _ = fs::remove_dir_all(&d);
    }

    #[test]
    fn firecracker_flags_get_the_default_socket_and_doctor_is_refused() {
        let root = std::env::temp_dir();
        let mut b = builder(&root);
        let out = rewrite_args(&mut b, &["--no-seccomp".into()]).expect("rewrite");
        assert_eq!(out, ["--no-seccomp"]);
        assert!(
            b.report[0].starts_with("api socket ")
                && b.report[0].ends_with("/run/firecracker.socket")
        );
        assert!(rewrite_args(&mut b, &["doctor".into()]).is_err());
        assert!(rewrite_args(
            &mut builder(&root),
            &["run".into(), "--net".into(), "user".into()]
        )
        .is_err());
    }
}
