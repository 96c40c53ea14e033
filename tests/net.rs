//! virtio-net through the real binary and the probe guest: a TAP interface in a network
//! namespace the test creates (the test's side of the tap is the namespace's own kernel,
//! which answers the guest's ARP), and rootless networking through a real passt. Each test
//! that needs a namespace makes its own and deletes it on every path.

mod common;

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::netns::NetNs;
use common::*;

const GUEST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x05];
const GUEST_MAC_TEXT: &str = "02:00:00:00:00:05";

/// An AF_PACKET socket on one interface.
struct PacketSocket(OwnedFd);

impl PacketSocket {
    fn bind(dev: &str) -> Self {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: socket() takes no pointers; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: fd is a new descriptor nothing else owns.
        let sock = Self(unsafe { OwnedFd::from_raw_fd(fd) });
        let name = std::ffi::CString::new(dev).expect("name");
        // SAFETY: reads the NUL-terminated name we own.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(index > 0, "no interface {dev}");
        // SAFETY: an all-zero sockaddr_ll is valid; the fields are set below.
        let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        sll.sll_family = libc::AF_PACKET as u16;
        sll.sll_protocol = proto;
        sll.sll_ifindex = index as i32;
        // SAFETY: bind reads a sockaddr_ll of the size given, which lives for the call.
        let r = unsafe {
            libc::bind(
                sock.0.as_raw_fd(),
                (&sll as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(r, 0, "bind: {}", std::io::Error::last_os_error());
        sock
    }

    /// Frames seen until `deadline` for which `want` is true (at most `n`).
    fn collect(&self, deadline: Instant, n: usize, want: impl Fn(&[u8]) -> bool) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        let mut buf = vec![0u8; 65536];
        while got.len() < n && Instant::now() < deadline {
            let mut pfd = libc::pollfd {
                fd: self.0.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: poll reads and writes the one pollfd we own.
            if unsafe { libc::poll(&mut pfd, 1, 50) } <= 0 {
                continue;
            }
            // SAFETY: recv writes at most buf.len() bytes into buf, which we own.
            let n = unsafe {
                libc::recv(
                    self.0.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n > 0 && want(&buf[..n as usize]) {
                got.push(buf[..n as usize].to_vec());
            }
        }
        got
    }
}

fn is_arp(f: &[u8]) -> bool {
    f.len() >= 42 && f[12..14] == [0x08, 0x06]
}

/// `cgvm run` of the probe guest inside `ns` (or here, for None), console to a file.
fn spawn_probe(
    ns: Option<&NetNs>,
    dir: &Path,
    net_args: &[&str],
    cmdline: &str,
    prefix: &[&str],
) -> (Child, PathBuf) {
    let console = dir.join("console.txt");
    let _ = std::fs::remove_file(&console);
    let bin = Path::new(env!("CARGO_BIN_EXE_cgvm"));
    let mut cmd = match (ns, prefix.split_first()) {
        (Some(ns), None) => ns.command(bin),
        (Some(ns), Some((first, rest))) => {
            let mut c = ns.command(Path::new(first));
            c.args(rest).arg("--").arg(bin);
            c
        }
        (None, _) => Command::new(bin),
    };
    cmd.args(probe_run_args(&console))
        .args(["--cmdline", cmdline])
        .args(net_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    (cmd.spawn().expect("spawn cgvm"), console)
}

/// Waits for the child; its exit code and stderr.
fn finish(child: Child) -> (Option<i32>, String) {
    finish_child(child, Duration::from_secs(60))
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_default()
}

/// Waits until `console` contains `text`; panics after 30 s.
fn wait_console(console: &Path, text: &str) {
    let t = Instant::now();
    while !read(console).contains(text) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "no {text:?} on the console:\n{}",
            read(console)
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn tap_frames_cross_both_ways_with_the_bytes_intact() {
    let dir = scratch("net-tap");
    let ns = NetNs::new();
    ns.tap("tapg", Some("10.0.2.2/24"), &[]);
    let tap_mac = ns.mac_of("tapg");
    let capture = ns.run_in(|| PacketSocket::bind("tapg"));
    let (child, console) = spawn_probe(
        Some(&ns),
        &dir,
        &["--net", &format!("tap:tapg,mac={GUEST_MAC_TEXT}")],
        "probe.tests=net probe.net=arp",
        &[],
    );
    let (code, err) = finish(child);
    let out = read(&console);
    assert_eq!(code, Some(0), "{err}\n{out}");
    // Host to guest: the namespace's kernel answered, and the guest read its MAC right.
    assert!(
        out.contains(&format!(
            "probe: net ok (mac {GUEST_MAC_TEXT}, arp reply: 10.0.2.2 is at {tap_mac}, virtio-mmio at 0x"
        )),
        "{out}"
    );
    // Guest to host: the request the guest built, byte for byte, and the reply that went back.
    let frames = capture.collect(Instant::now() + Duration::from_secs(2), 2, is_arp);
    assert_eq!(frames.len(), 2, "ARP request and reply on the tap");
    let request = &frames[0];
    let mut expected = Vec::new();
    expected.extend_from_slice(&[0xff; 6]);
    expected.extend_from_slice(&GUEST_MAC);
    expected.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
    expected.extend_from_slice(&GUEST_MAC);
    expected.extend_from_slice(&[10, 0, 2, 15]);
    expected.extend_from_slice(&[0; 6]);
    expected.extend_from_slice(&[10, 0, 2, 2]);
    assert_eq!(&request[..42], &expected[..], "the guest's ARP request");
    let reply = &frames[1];
    assert_eq!(&reply[..6], &GUEST_MAC, "the reply goes to the guest");
    assert_eq!(&reply[20..22], &[0, 2], "an ARP reply");
}

#[test]
fn a_tap_held_by_one_machine_is_refused_to_another() {
    let dir = scratch("net-busy");
    let ns = NetNs::new();
    ns.tap("tapb", Some("10.0.2.2/24"), &[]);
    let (first, console) = spawn_probe(
        Some(&ns),
        &dir,
        &["--net", &format!("tap:tapb,mac={GUEST_MAC_TEXT}")],
        "probe.tests=net probe.exit=hang",
        &[],
    );
    wait_console(&console, "probe: waiting");
    let dir2 = scratch("net-busy-2");
    let (second, console2) = spawn_probe(Some(&ns), &dir2, &["--net", "tap:tapb"], "", &[]);
    let (code, err) = finish(second);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("tap tapb: the interface is busy"),
        "stderr: {err}"
    );
    assert_eq!(read(&console2), "", "the second guest never ran");
    // SAFETY: kill on the pid of our own child, which has not been reaped yet.
    unsafe { libc::kill(first.id() as i32, libc::SIGTERM) };
    let (code, err) = finish(first);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert!(
        read(&console).contains("probe: net ok"),
        "{}",
        read(&console)
    );
}

#[test]
fn tap_problems_are_named_before_the_guest_starts() {
    let dir = scratch("net-bad-tap");
    let ns = NetNs::new();
    // A tap owned by another user: only its owner or CAP_NET_ADMIN may attach.
    ns.tap("tapo", None, &["user", "12345"]);
    let drop_net_admin = [
        "setpriv",
        "--bounding-set",
        "-net_admin",
        "--inh-caps",
        "-net_admin",
    ];
    let cases: [(&str, &[&str], &str); 5] = [
        (
            "tap:nosuch",
            &[],
            "network interface eth0: tap nosuch: no such network interface",
        ),
        (
            "tap:tapo",
            &drop_net_admin,
            "tap tapo: permission denied (the interface's owner or CAP_NET_ADMIN is needed)",
        ),
        (
            "tap:lo",
            &[],
            "tap lo: not a TAP interface usable with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
        ),
        (
            "tap:much-too-long-name",
            &[],
            "tap 'much-too-long-name': not a valid interface name: longer than 15 bytes",
        ),
        (
            "tap:t,mac=01:00:5e:00:00:01",
            &[],
            "MAC address '01:00:5e:00:00:01': a multicast address",
        ),
    ];
    for (spec, prefix, message) in cases {
        let (child, console) = spawn_probe(Some(&ns), &dir, &["--net", spec], "", prefix);
        let (code, err) = finish(child);
        assert_eq!(code, Some(125), "--net {spec}: {err}");
        assert!(err.contains(message), "--net {spec}: stderr: {err}");
        assert_eq!(read(&console), "", "--net {spec}: the guest never ran");
    }
    // The tap that was refused is still there and usable by a capable process.
    let (child, _) = spawn_probe(
        Some(&ns),
        &dir,
        &["--net", "tap:tapo"],
        "probe.tests=boot",
        &[],
    );
    let (code, err) = finish(child);
    assert_eq!(code, Some(0), "{err}");
}

/// Processes whose command line contains `needle` (passt started with a unique port).
fn processes_with(needle: &str) -> Vec<u32> {
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let text = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        if text.contains(needle) && !text.contains("cgvm") {
            let zombie = std::fs::read_to_string(e.path().join("stat"))
                .map(|s| {
                    s.rsplit(')')
                        .next()
                        .unwrap_or("")
                        .trim_start()
                        .starts_with('Z')
                })
                .unwrap_or(true);
            if !zombie {
                found.push(pid);
            }
        }
    }
    found
}

/// Waits up to 5 s for no process to match `needle`.
fn assert_gone(needle: &str, what: &str) {
    let t = Instant::now();
    while !processes_with(needle).is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{what}: passt ({needle}) still runs: {:?}",
            processes_with(needle)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A TCP port free on this host now (the kernel's pick).
fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

#[test]
fn user_networking_through_passt_gets_dhcp_and_publishes_ports() {
    let dir = scratch("net-user");
    let port = free_port();
    let needle = format!("-t {port}:80");
    let (child, console) = spawn_probe(
        None,
        &dir,
        &[
            "--net",
            &format!("user,mac={GUEST_MAC_TEXT}"),
            "--publish",
            &format!("{port}:80"),
        ],
        "probe.tests=net probe.net=dhcp probe.exit=hang",
        &[],
    );
    wait_console(&console, "probe: waiting");
    let out = read(&console);
    assert!(
        out.contains(&format!("probe: net ok (mac {GUEST_MAC_TEXT}, dhcp offer ")),
        "{out}"
    );
    let passt = processes_with(&needle);
    assert_eq!(passt.len(), 1, "one passt for the machine");
    // The published port listens on the host while the machine runs.
    std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect to the published port");
    // SAFETY: kill on the pid of our own child, which has not been reaped yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let (code, err) = finish(child);
    assert_eq!(code, Some(128 + libc::SIGTERM), "{err}");
    assert_gone(&needle, "after SIGTERM");
}

#[test]
fn passt_ends_with_the_machine_on_every_path() {
    // The guest powers off.
    let dir = scratch("net-user-paths");
    let port = free_port();
    let needle = format!("-t {port}:81");
    let publish = format!("{port}:81");
    let user = format!("user,mac={GUEST_MAC_TEXT}");
    let (child, console) = spawn_probe(
        None,
        &dir,
        &["--net", &user, "--publish", &publish],
        "probe.tests=net probe.net=dhcp",
        &[],
    );
    let (code, err) = finish(child);
    assert_eq!(code, Some(0), "{err}\n{}", read(&console));
    assert_gone(&needle, "after the guest's exit");

    // cgvm is killed outright: passt gets SIGKILL from the kernel (PR_SET_PDEATHSIG).
    let (mut child, console) = spawn_probe(
        None,
        &dir,
        &["--net", &user, "--publish", &publish],
        "probe.tests=net probe.net=dhcp probe.exit=hang",
        &[],
    );
    wait_console(&console, "probe: waiting");
    assert_eq!(processes_with(&needle).len(), 1);
    child.kill().expect("SIGKILL cgvm");
    let _ = child.wait();
    assert_gone(&needle, "after SIGKILL");

    // The machine cannot be built after passt started (the second interface's tap is
    // missing): passt is stopped and the error names the tap.
    let (child, console) = spawn_probe(
        None,
        &dir,
        &[
            "--net",
            &user,
            "--publish",
            &publish,
            "--net",
            "tap:cgvm-nosuch",
        ],
        "",
        &[],
    );
    let (code, err) = finish(child);
    assert_eq!(code, Some(125), "{err}");
    assert!(
        err.contains("network interface eth1: tap cgvm-nosuch: no such network interface"),
        "{err}"
    );
    assert_eq!(read(&console), "");
    assert_gone(&needle, "after a failed build");
}

#[test]
fn user_networking_without_passt_says_how_to_install_it() {
    let dir = scratch("net-no-passt");
    let console = dir.join("console.txt");
    let mut cmd = cgvm();
    cmd.env("PATH", dir.join("empty-path")).args([
        "run",
        "--kernel",
        probe_elf().to_str().expect("utf-8"),
        "--console",
        &format!("file:{}", console.display()),
        "--net",
        "user",
    ]);
    let r = run_with_limit(cmd, Duration::from_secs(30));
    assert_eq!(r.status, Some(125), "{}", r.both());
    assert!(
        r.stderr.contains("needs passt, which is not installed")
            && r.stderr.contains("apt-get install passt"),
        "{}",
        r.both()
    );
    assert!(!console.exists() || read(&console).is_empty());
    for (args, message) in [
        (
            vec!["--publish", "8080:80"],
            "--publish needs a --net user interface",
        ),
        (
            vec!["--net", "user", "--net", "user", "--publish", "8080:80"],
            "--publish with two --net user interfaces",
        ),
        (
            vec!["--net", "user", "--publish", "80"],
            "expected HOST:GUEST",
        ),
    ] {
        let mut all = vec!["--kernel", probe_elf().to_str().expect("utf-8")];
        all.extend(args);
        let r = cgvm_run(&all);
        assert_eq!(r.status, Some(125), "{all:?}: {}", r.both());
        assert!(r.stderr.contains(message), "{all:?}: {}", r.both());
    }
}
