//! Rootless networking through passt: cgvm starts one passt process per machine and talks to
//! it over one end of a socketpair (passt's `--fd`), so no socket file exists and nothing
//! races to connect. On that stream each Ethernet frame is preceded by its length as a 4-byte
//! big-endian number (passt's "qemu" framing). passt answers ARP, DHCP and NDP for its
//! gateway and forwards the guest's TCP and UDP through ordinary host sockets, so neither root
//! nor CAP_NET_ADMIN is needed; `--publish HOST:GUEST` forwards a host TCP port to the guest.
//!
//! passt ends with the machine on every path: dropping [`Passt`] kills and reaps it; if cgvm
//! dies without running its destructors, passt sees its stream close and exits by itself, and
//! it also gets SIGKILL when its parent thread dies (PR_SET_PDEATHSIG).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A host TCP port forwarded to a guest port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Publish {
    /// The port on the host.
    pub host: u16,
    /// The port in the guest.
    pub guest: u16,
}

impl std::str::FromStr for Publish {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("--publish {s}: expected HOST:GUEST, two TCP ports from 1 to 65535");
        let (h, g) = s.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|&p| p > 0).ok_or_else(bad);
        Ok(Self {
            host: port(h)?,
            guest: port(g)?,
        })
    }
}

/// Why passt could not be started.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// No `passt` binary on PATH.
    #[error(
        "rootless networking (--net user) needs passt, which is not installed: \
         install it with `apt-get install passt` (Debian, Ubuntu) or `dnf install passt` \
         (Fedora), or use --net tap:NAME"
    )]
    NotInstalled,
    /// The socketpair or the process could not be created.
    #[error("cannot start passt ({path}): {source}")]
    Spawn {
        /// The binary.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// passt exited right away.
    #[error("passt exited at start ({status}): {stderr}")]
    Exited {
        /// Its exit status.
        status: std::process::ExitStatus,
        /// What it printed.
        stderr: String,
    },
}

/// Finds `name` in the directories of PATH.
fn find_on_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// A running passt serving one machine.
#[derive(Debug)]
pub struct Passt {
    child: Option<Child>,
    stream: Option<UnixStream>,
}

impl Passt {
    /// Starts passt (found on PATH, or at `binary`) with these forwarded ports.
    pub fn start(binary: Option<&Path>, publish: &[Publish]) -> Result<Self, PasstError> {
        let path = match binary {
            Some(b) => b.to_path_buf(),
            None => find_on_path("passt").ok_or(PasstError::NotInstalled)?,
        };
        let spawn_err = |source| PasstError::Spawn {
            path: path.clone(),
            source,
        };
        let (ours, theirs) = UnixStream::pair().map_err(spawn_err)?;
        let their_fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&path);
        cmd.args(["--foreground", "--quiet", "--fd", &their_fd.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        for p in publish {
            cmd.args(["-t", &format!("{}:{}", p.host, p.guest)]);
        }
        // SAFETY: the closure runs in the child between fork and exec and calls only
        // async-signal-safe functions (fcntl, prctl) on its own descriptors.
        unsafe {
            cmd.pre_exec(move || {
                // Keep passt's end across exec (the std library opened it close-on-exec).
                if libc::fcntl(their_fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                // Die with cgvm even if it is killed without running destructors.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(spawn_err)?;
        drop(theirs);
        // passt checks its options before it serves; give a bad one the chance to show.
        std::thread::sleep(std::time::Duration::from_millis(20));
        if let Ok(Some(status)) = child.try_wait() {
            let mut stderr = String::new();
            if let Some(mut e) = child.stderr.take() {
                use std::io::Read;
                let _ = e.read_to_string(&mut stderr);
            }
            return Err(PasstError::Exited {
                status,
                stderr: stderr.trim().to_string(),
            });
        }
        // Whatever passt says later goes to the log (info: as root it always says it changes
        // to nobody, and that it has no syslog). The pipe must stay open: passt writing
        // to a closed one would die of SIGPIPE (it did, now and then, under load).
        if let Some(err) = child.stderr.take() {
            let pid = child.id();
            let spawned = std::thread::Builder::new()
                .name("cgvm-passt-log".into())
                .spawn(move || {
                    use std::io::BufRead;
                    if let Err(e) = devices::seccomp::confine(&crate::seccomp::passt_log_policy()) {
                        // Keep reading all the same: passt dies of SIGPIPE if nobody does.
                        log::error!("passt's log thread: {e}");
                    }
                    for line in std::io::BufReader::new(err).lines().map_while(Result::ok) {
                        log::info!("passt (pid {pid}): {line}");
                    }
                });
            if let Err(e) = spawned {
                log::warn!("cannot start the thread that logs passt's messages: {e}");
            }
        }
        log::info!(
            "passt started (pid {}) with {} forwarded ports",
            child.id(),
            publish.len()
        );
        Ok(Self {
            child: Some(child),
            stream: Some(ours),
        })
    }

    /// The stream to passt, for the network device's backend (once).
    pub fn take_stream(&mut self) -> Option<OwnedFd> {
        self.stream.take().map(|s| {
            let fd = s.as_raw_fd();
            std::mem::forget(s);
            // SAFETY: `fd` was owned by the UnixStream we just forgot, so ownership moves
            // here and nothing else closes it.
            unsafe { OwnedFd::from_raw_fd(fd) }
        })
    }

    /// passt's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }
}

impl Drop for Passt {
    fn drop(&mut self) {
        drop(self.stream.take());
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::time::{Duration, Instant};

    #[test]
    fn publish_specs_parse() {
        assert_eq!(
            "8080:80".parse::<Publish>(),
            Ok(Publish {
                host: 8080,
                guest: 80
            })
        );
        for bad in ["", "80", "0:80", "80:0", "x:80", "70000:80", "1:2:3"] {
            assert!(bad.parse::<Publish>().is_err(), "{bad}");
        }
    }

    #[test]
    fn a_missing_passt_says_how_to_install_it() {
        let e = Passt::start(Some(Path::new("/nonexistent/passt")), &[]).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/passt"), "{e}");
        let msg = PasstError::NotInstalled.to_string();
        assert!(msg.contains("apt-get install passt"), "{msg}");
    }

    fn read_frame(s: &mut UnixStream) -> Vec<u8> {
        let mut len = [0u8; 4];
        s.read_exact(&mut len).unwrap();
        let mut f = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut f).unwrap();
        f
    }

    /// A real passt answers an ARP request for its gateway over the socketpair, and exits
    /// when the machine's end closes.
    #[test]
    fn passt_answers_arp_and_ends_with_its_stream() {
        if find_on_path("passt").is_none() {
            eprintln!("passt is not installed here; scripts/test-deps installs it for CI");
            return;
        }
        let mut p = Passt::start(None, &[]).unwrap();
        let pid = p.pid().unwrap();
        let fd = p.take_stream().unwrap();
        let mut s = UnixStream::from(fd);
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mac = [2u8, 0, 0, 0, 0, 1];
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0, 6, 4, 0, 1]);
        arp.extend_from_slice(&mac);
        arp.extend_from_slice(&[10, 0, 2, 15]);
        arp.extend_from_slice(&[0; 6]);
        // Ask for every address until one answers: passt answers for its gateway, which
        // is the host's; any reply proves the framing both ways.
        arp.extend_from_slice(&[10, 0, 2, 2]);
        arp.resize(60, 0);
        let gw = std::fs::read_to_string("/proc/net/route")
            .unwrap()
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| f.get(1) == Some(&"00000000"))
            .and_then(|f| u32::from_str_radix(f[2], 16).ok())
            .map(u32::to_le_bytes);
        if let Some(gw) = gw {
            arp[38..42].copy_from_slice(&gw);
        }
        let mut msg = (arp.len() as u32).to_be_bytes().to_vec();
        msg.extend_from_slice(&arp);
        s.write_all(&msg).unwrap();
        let reply = loop {
            let f = read_frame(&mut s);
            if f.len() >= 42 && f[12..14] == [0x08, 0x06] && f[20..22] == [0, 2] {
                break f;
            }
        };
        assert_eq!(&reply[0..6], &mac, "the reply is addressed to us");
        assert_eq!(&reply[38..42], &[10, 0, 2, 15]);
        drop(s);
        let start = Instant::now();
        // SAFETY: kill with signal 0 only checks that the process exists.
        while unsafe { libc::kill(pid as i32, 0) } == 0 && start.elapsed() < Duration::from_secs(5)
        {
            // passt is our child: it stays a zombie until reaped, so look at its state.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.contains(") Z") {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "passt still running after its stream closed: {stat}"
        );
        drop(p);
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "passt was not reaped"
        );
    }

    #[test]
    fn published_ports_listen_on_the_host() {
        if find_on_path("passt").is_none() {
            eprintln!("passt is not installed here; scripts/test-deps installs it for CI");
            return;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let p = Passt::start(
            None,
            &[Publish {
                host: port,
                guest: 80,
            }],
        )
        .unwrap();
        let start = Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "passt does not listen on host port {port}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        drop(p);
    }
}
