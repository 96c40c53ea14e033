//! The connections between the guest and host Unix sockets, independent of the queues: the
//! worker hands it the guest's packets ([`Muxer::handle_guest_packet`]) and asks it for the
//! packets to give the guest ([`Muxer::next_rx`]); host sockets are watched through the
//! muxer's own epoll set ([`Muxer::as_raw_fd`], readable when [`Muxer::process_host_events`]
//! has work).
//!
//! A connection is keyed by (local port, peer port): the host side's port and the guest's.
//! Flow control is virtio's credit scheme: the guest is never sent more than
//! `buf_alloc - (tx_cnt - fwd_cnt)` of its last advertised values, and a guest that sends
//! more than the [`CONN_BUF_SIZE`] the device advertises has its connection reset.
//!
//! Nothing here spins: a readable host socket is remembered and leaves the epoll set's
//! read interest until a read would block, so host data waiting for guest buffers or credit
//! raises no event; a socket the host hung up leaves the set altogether.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io;
use std::ops::Bound;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use super::packet::{Header, Op, HOST_CID, MAX_DATA_LEN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM};

/// The receive buffer the device advertises for each connection: guest data not yet written
/// to the host socket is held up to this much.
pub const CONN_BUF_SIZE: u32 = 128 * 1024;
/// The most connections (and host clients still in their handshake) at once, by default.
pub const MAX_CONNECTIONS: usize = 512;
/// The longest `CONNECT <port>\n` line.
pub const MAX_HANDSHAKE_LEN: usize = 32;
/// The most resets waiting for guest buffers; more are dropped.
pub const MAX_PENDING_RST: usize = 1024;
/// The device sends a credit update once it has forwarded this much since its last one.
pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_SIZE / 4;
/// The first local port of host-initiated connections.
pub const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// How long a host client's connection waits for the guest to answer its REQUEST before it
/// is closed and the request withdrawn with an RST (Firecracker waits 2 s too).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a host client may take to send its `CONNECT` line; a client that connects and
/// says nothing would otherwise hold a connection slot for ever.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const LISTENER_TOKEN: u64 = 0;
const TIMER_TOKEN: u64 = 1;

/// A connection's key: (local port, peer port).
pub type ConnKey = (u32, u32);

/// Why a `CONNECT` line is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandshakeError {
    /// No newline within [`MAX_HANDSHAKE_LEN`] bytes.
    #[error("no newline within {MAX_HANDSHAKE_LEN} bytes")]
    TooLong,
    /// Not `CONNECT <port>\n`.
    #[error("not a CONNECT line")]
    Garbage,
    /// The port is not a 32-bit decimal number.
    #[error("bad port")]
    BadPort,
}

/// Parses a host client's `CONNECT <port>\n` line (newline included).
pub fn parse_connect(line: &[u8]) -> Result<u32, HandshakeError> {
    if line.len() > MAX_HANDSHAKE_LEN {
        return Err(HandshakeError::TooLong);
    }
    let rest = line
        .strip_prefix(b"CONNECT ")
        .and_then(|r| r.strip_suffix(b"\n"))
        .ok_or(HandshakeError::Garbage)?;
    if rest.is_empty() || rest.len() > 10 || !rest.iter().all(u8::is_ascii_digit) {
        return Err(HandshakeError::BadPort);
    }
    std::str::from_utf8(rest)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .ok_or(HandshakeError::BadPort)
}

/// Where a connection stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Host-initiated: REQUEST sent (or to be sent), waiting for the guest's RESPONSE.
    LocalInit,
    /// Data flows.
    Established,
}

struct Connection {
    stream: UnixStream,
    token: u64,
    state: ConnState,
    /// Guest data (and, first, `tx_uncounted` bytes of our own) for the host socket.
    tx_buf: VecDeque<u8>,
    tx_uncounted: usize,
    /// Guest bytes received, and of those written to the host socket (wrapping).
    rx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Bytes sent to the guest, and its last advertised buffer and forwarded count.
    tx_cnt: u32,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// The host socket may have data: no read has blocked since it was reported readable.
    readable: bool,
    host_eof: bool,
    host_hup: bool,
    peer_shutdown: u32,
    host_write_shut: bool,
    /// Still in the epoll set, and with which interest.
    in_epoll: bool,
    interest: EventSet,
    pending_request: bool,
    pending_response: bool,
    pending_shutdown: u32,
    pending_credit_update: bool,
    /// For a host-initiated connection, when it is given up if the guest has not answered.
    deadline: Option<Instant>,
}

impl Connection {
    fn new(stream: UnixStream, token: u64, state: ConnState, hdr: Option<&Header>) -> Self {
        Connection {
            stream,
            token,
            state,
            tx_buf: VecDeque::new(),
            tx_uncounted: 0,
            rx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            tx_cnt: 0,
            peer_buf_alloc: hdr.map_or(0, |h| h.buf_alloc),
            peer_fwd_cnt: hdr.map_or(0, |h| h.fwd_cnt),
            readable: false,
            host_eof: false,
            host_hup: false,
            peer_shutdown: 0,
            host_write_shut: false,
            in_epoll: false,
            interest: EventSet::empty(),
            pending_request: false,
            pending_response: false,
            pending_shutdown: 0,
            pending_credit_update: false,
            deadline: None,
        }
    }

    /// What the guest may still be sent.
    fn credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn can_read(&self) -> bool {
        self.state == ConnState::Established
            && self.readable
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.credit() > 0
    }

    /// Whether it has a packet for the guest, given `max_data` bytes of room for data.
    fn has_work(&self, max_data: usize) -> bool {
        self.pending_request
            || self.pending_response
            || self.pending_shutdown != 0
            || self.pending_credit_update
            || (max_data > 0 && self.can_read())
    }

    fn wanted_interest(&self) -> EventSet {
        let mut e = EventSet::empty();
        if self.state == ConnState::Established && !self.readable && !self.host_eof {
            e |= EventSet::IN;
        }
        if !self.tx_buf.is_empty() {
            e |= EventSet::OUT;
        }
        e
    }

    /// Writes what it can of `tx_buf` to the host socket; an error means the host is gone.
    fn flush(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match send(self.stream.as_raw_fd(), front) {
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    let ours = n.min(self.tx_uncounted);
                    self.tx_uncounted -= ours;
                    self.fwd_cnt = self.fwd_cnt.wrapping_add((n - ours) as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= CREDIT_UPDATE_THRESHOLD {
            self.pending_credit_update = true;
        }
        if self.tx_buf.is_empty()
            && self.peer_shutdown & SHUTDOWN_SEND != 0
            && !self.host_write_shut
        {
            self.host_write_shut = true;
            // SAFETY: shutdown on a socket we own; no memory is involved.
            unsafe { libc::shutdown(self.stream.as_raw_fd(), libc::SHUT_WR) };
        }
        Ok(())
    }

    /// Done both ways: the guest shut down both directions and all its data reached the host.
    fn finished(&self) -> bool {
        self.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND && self.tx_buf.is_empty()
    }
}

struct Handshake {
    stream: UnixStream,
    line: Vec<u8>,
    deadline: Instant,
}

enum Owner {
    Conn(ConnKey),
    Handshake,
}

/// The connections of one active vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    conns: BTreeMap<ConnKey, Connection>,
    handshakes: HashMap<u64, Handshake>,
    tokens: HashMap<u64, Owner>,
    next_token: u64,
    next_local_port: u32,
    rst_queue: VecDeque<ConnKey>,
    last_served: Option<ConnKey>,
    max_connections: usize,
    /// Fires at the earliest deadline of a handshake or an unanswered connection.
    timer: TimerFd,
    connect_timeout: Duration,
    handshake_timeout: Duration,
}

/// Sends without blocking and without SIGPIPE.
fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    loop {
        // SAFETY: send reads at most `buf.len()` bytes from `buf`, which we borrow.
        let r = unsafe {
            libc::send(
                fd,
                buf.as_ptr().cast(),
                buf.len(),
                libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
            )
        };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Receives without blocking.
fn recv(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        // SAFETY: recv writes at most `buf.len()` bytes into `buf`, which we borrow mutably.
        let r = unsafe { libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if r >= 0 {
            return Ok(r as usize);
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Connects to the Unix socket at `path` without ever blocking (a full backlog fails).
pub fn connect_unix(path: &Path) -> io::Result<UnixStream> {
    // SAFETY: sockaddr_un is plain old data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    let bytes = path.as_os_str().as_bytes();
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "socket path too long",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = s as libc::c_char;
    }
    // SAFETY: socket takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and nothing else owns it.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is a valid sockaddr_un and the length given is its size.
    let r = unsafe {
        libc::connect(
            owned.as_raw_fd(),
            (&addr as *const libc::sockaddr_un).cast(),
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

impl Muxer {
    /// The connections of the guest `guest_cid`, whose host clients connect to `listener`
    /// (bound at `uds_path`, made non-blocking here).
    pub fn new(guest_cid: u64, uds_path: &Path, listener: UnixListener) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
        )?;
        let timer = TimerFd::new()?;
        epoll.ctl(
            ControlOperation::Add,
            timer.as_raw_fd(),
            EpollEvent::new(EventSet::IN, TIMER_TOKEN),
        )?;
        Ok(Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll,
            conns: BTreeMap::new(),
            handshakes: HashMap::new(),
            tokens: HashMap::new(),
            next_token: TIMER_TOKEN + 1,
            next_local_port: FIRST_LOCAL_PORT,
            rst_queue: VecDeque::new(),
            last_served: None,
            max_connections: MAX_CONNECTIONS,
            timer,
            connect_timeout: CONNECT_TIMEOUT,
            handshake_timeout: HANDSHAKE_TIMEOUT,
        })
    }

    /// Changes how long the guest has to answer a host client's connection and how long a
    /// host client has to send its `CONNECT` line.
    pub fn set_timeouts(&mut self, connect: Duration, handshake: Duration) {
        self.connect_timeout = connect;
        self.handshake_timeout = handshake;
    }

    /// Arms the timer for the earliest deadline, or disarms it when nothing waits.
    fn arm_timer(&mut self) {
        let next = self
            .conns
            .values()
            .filter_map(|c| c.deadline)
            .chain(self.handshakes.values().map(|h| h.deadline))
            .min();
        let r = match next {
            // A zero duration would disarm the timer: a deadline already past fires in 1 µs.
            Some(t) => self.timer.reset(
                t.saturating_duration_since(Instant::now())
                    .max(Duration::from_micros(1)),
                None,
            ),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            log::debug!("virtio-vsock: timer: {e}");
        }
    }

    /// Closes the host clients whose handshake or connection request took too long; the
    /// guest gets an RST for each withdrawn request.
    fn expire(&mut self) {
        // The timer is readable (epoll said so): this read does not block.
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<u64> = self
            .handshakes
            .iter()
            .filter(|(_, h)| h.deadline <= now)
            .map(|(&t, _)| t)
            .collect();
        for token in late {
            log::debug!("virtio-vsock: host client sent no CONNECT line in time; closed");
            self.drop_handshake(token);
        }
        let late: Vec<ConnKey> = self
            .conns
            .iter()
            .filter(|(_, c)| c.deadline.is_some_and(|d| d <= now))
            .map(|(&k, _)| k)
            .collect();
        for key in late {
            log::debug!("virtio-vsock: the guest did not answer {key:?} in time; reset");
            self.reset(key);
        }
        self.arm_timer();
    }

    /// Changes the connection limit (host clients in their handshake count too).
    pub fn set_max_connections(&mut self, n: usize) {
        self.max_connections = n;
    }

    /// The number of connections.
    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The state of the connection `key`, if it exists.
    pub fn connection_state(&self, key: ConnKey) -> Option<ConnState> {
        self.conns.get(&key).map(|c| c.state)
    }

    fn token(&mut self) -> u64 {
        let t = self.next_token;
        self.next_token += 1;
        t
    }

    fn full(&self) -> bool {
        self.conns.len() + self.handshakes.len() >= self.max_connections
    }

    fn header(&self, key: ConnKey, op: Op) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: 0,
            type_: TYPE_STREAM,
            op: op as u16,
            flags: 0,
            buf_alloc: CONN_BUF_SIZE,
            fwd_cnt: 0,
        }
    }

    fn queue_rst(&mut self, key: ConnKey) {
        if self.rst_queue.len() >= MAX_PENDING_RST {
            log::debug!("virtio-vsock: too many resets pending; one dropped");
            return;
        }
        self.rst_queue.push_back(key);
    }

    /// Frees the connection `key` (its host socket is closed) and resets it on the guest.
    fn reset(&mut self, key: ConnKey) {
        if let Some(c) = self.conns.remove(&key) {
            if c.in_epoll {
                let _ = self.epoll.ctl(
                    ControlOperation::Delete,
                    c.stream.as_raw_fd(),
                    EpollEvent::default(),
                );
            }
            self.tokens.remove(&c.token);
            self.queue_rst(key);
        }
    }

    /// Frees the connection `key` without telling the guest (it reset it).
    fn forget(&mut self, key: ConnKey) {
        self.reset(key);
        self.rst_queue.retain(|&k| k != key);
    }

    /// Brings the connection's epoll interest up to date, or resets it when it is done.
    fn sync(&mut self, key: ConnKey) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if c.finished() {
            self.reset(key);
            return;
        }
        if !c.in_epoll {
            return;
        }
        let want = c.wanted_interest();
        if want != c.interest {
            let r = self.epoll.ctl(
                ControlOperation::Modify,
                c.stream.as_raw_fd(),
                EpollEvent::new(want, c.token),
            );
            match r {
                Ok(()) => c.interest = want,
                Err(e) => {
                    log::debug!("virtio-vsock: epoll: {e}; connection reset");
                    self.reset(key);
                }
            }
        }
    }

    fn add_conn(&mut self, key: ConnKey, mut c: Connection) {
        let want = c.wanted_interest();
        match self.epoll.ctl(
            ControlOperation::Add,
            c.stream.as_raw_fd(),
            EpollEvent::new(want, c.token),
        ) {
            Ok(()) => {
                c.in_epoll = true;
                c.interest = want;
                self.tokens.insert(c.token, Owner::Conn(key));
                self.conns.insert(key, c);
            }
            Err(e) => {
                log::debug!("virtio-vsock: epoll: {e}; connection refused");
                self.queue_rst(key);
            }
        }
    }

    /// Handles one checked packet from the guest.
    pub fn handle_guest_packet(&mut self, hdr: &Header, op: Op, data: &[u8]) {
        let key = (hdr.dst_port, hdr.src_port);
        let Some(c) = self.conns.get_mut(&key) else {
            match op {
                Op::Request => self.guest_connect(key, hdr),
                Op::Rst => {}
                _ => self.queue_rst(key),
            }
            return;
        };
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = hdr.fwd_cnt;
        match op {
            Op::Request => return self.reset(key),
            Op::Rst => return self.forget(key),
            Op::Response => {
                if c.state != ConnState::LocalInit {
                    return self.reset(key);
                }
                c.state = ConnState::Established;
                c.deadline = None;
                let ok = format!("OK {}\n", key.0);
                c.tx_uncounted += ok.len();
                c.tx_buf.extend(ok.as_bytes());
            }
            Op::Shutdown => {
                if c.state != ConnState::Established {
                    return self.reset(key);
                }
                c.peer_shutdown |= hdr.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
            }
            Op::Rw => {
                if c.state != ConnState::Established || c.peer_shutdown & SHUTDOWN_SEND != 0 {
                    return self.reset(key);
                }
                let held = u64::from(c.rx_cnt.wrapping_sub(c.fwd_cnt));
                if held + data.len() as u64 > u64::from(CONN_BUF_SIZE) {
                    log::debug!("virtio-vsock: credit violation on {key:?}; connection reset");
                    return self.reset(key);
                }
                c.rx_cnt = c.rx_cnt.wrapping_add(data.len() as u32);
                c.tx_buf.extend(data);
            }
            Op::CreditUpdate => {}
            Op::CreditRequest => c.pending_credit_update = true,
        }
        if let Err(e) = c.flush() {
            log::debug!("virtio-vsock: host socket of {key:?}: {e}; connection reset");
            return self.reset(key);
        }
        self.sync(key);
    }

    fn guest_connect(&mut self, key: ConnKey, hdr: &Header) {
        if self.full() {
            log::debug!("virtio-vsock: connection limit reached; {key:?} refused");
            return self.queue_rst(key);
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", key.0));
        match connect_unix(Path::new(&path)) {
            Ok(stream) => {
                let token = self.token();
                let mut c = Connection::new(stream, token, ConnState::Established, Some(hdr));
                c.pending_response = true;
                self.add_conn(key, c);
            }
            Err(e) => {
                log::debug!("virtio-vsock: cannot connect to {path:?}: {e}");
                self.queue_rst(key);
            }
        }
    }

    /// The descriptor of the muxer's epoll set: readable when host sockets need attention.
    pub fn as_raw_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Handles what the host sockets reported, without waiting.
    pub fn process_host_events(&mut self) {
        let mut events = [EpollEvent::default(); 32];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) => {
                log::debug!("virtio-vsock: epoll: {e}");
                return;
            }
        };
        for ev in &events[..n] {
            let token = ev.data();
            let set = ev.event_set();
            if token == LISTENER_TOKEN {
                self.accept_all();
                continue;
            }
            if token == TIMER_TOKEN {
                self.expire();
                continue;
            }
            match self.tokens.get(&token) {
                Some(Owner::Handshake) => self.handshake(token),
                Some(&Owner::Conn(key)) => self.conn_event(key, set),
                None => {}
            }
        }
    }

    fn accept_all(&mut self) {
        loop {
            // SAFETY: accept4 with no address buffers; a non-negative result is a new fd.
            let fd = unsafe {
                libc::accept4(
                    self.listener.as_raw_fd(),
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                )
            };
            if fd < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return,
                    _ => {
                        log::debug!("virtio-vsock: accept: {e}");
                        return;
                    }
                }
            }
            // SAFETY: `fd` was just returned by accept4 and nothing else owns it.
            let stream = UnixStream::from(unsafe { OwnedFd::from_raw_fd(fd) });
            if self.full() {
                log::debug!("virtio-vsock: connection limit reached; host client closed");
                continue;
            }
            let token = self.token();
            if self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    stream.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, token),
                )
                .is_ok()
            {
                self.tokens.insert(token, Owner::Handshake);
                self.handshakes.insert(
                    token,
                    Handshake {
                        stream,
                        line: Vec::new(),
                        deadline: Instant::now() + self.handshake_timeout,
                    },
                );
                self.arm_timer();
            }
        }
    }

    fn drop_handshake(&mut self, token: u64) -> Option<Handshake> {
        self.tokens.remove(&token);
        let h = self.handshakes.remove(&token)?;
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            h.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        Some(h)
    }

    /// Reads a host client's `CONNECT` line, a byte at a time (so that nothing after the
    /// line is consumed); a complete line starts the connection, garbage closes the client.
    fn handshake(&mut self, token: u64) {
        let port = loop {
            let Some(h) = self.handshakes.get_mut(&token) else {
                return;
            };
            let mut b = [0u8; 1];
            match recv(h.stream.as_raw_fd(), &mut b) {
                Ok(1) => {
                    h.line.push(b[0]);
                    if b[0] == b'\n' {
                        break parse_connect(&h.line);
                    }
                    if h.line.len() >= MAX_HANDSHAKE_LEN {
                        break Err(HandshakeError::TooLong);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                _ => {
                    self.drop_handshake(token);
                    return;
                }
            }
        };
        let Some(h) = self.drop_handshake(token) else {
            return;
        };
        let port = match port {
            Ok(p) => p,
            Err(e) => {
                log::debug!("virtio-vsock: host client handshake: {e}; closed");
                return;
            }
        };
        let mut local = self.next_local_port;
        while self.conns.contains_key(&(local, port)) {
            local = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        }
        self.next_local_port = local.wrapping_add(1).max(FIRST_LOCAL_PORT);
        let token = self.token();
        let mut c = Connection::new(h.stream, token, ConnState::LocalInit, None);
        c.pending_request = true;
        c.deadline = Some(Instant::now() + self.connect_timeout);
        self.add_conn((local, port), c);
        self.arm_timer();
    }

    fn conn_event(&mut self, key: ConnKey, set: EventSet) {
        let Some(c) = self.conns.get_mut(&key) else {
            return;
        };
        if set.contains(EventSet::ERROR) {
            return self.reset(key);
        }
        if set.contains(EventSet::IN) {
            c.readable = true;
        }
        if set.contains(EventSet::HANG_UP) {
            // Never reported again: off the set, and what is left is read until EOF.
            c.host_hup = true;
            c.readable = true;
            c.in_epoll = false;
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                c.stream.as_raw_fd(),
                EpollEvent::default(),
            );
            if c.state != ConnState::Established
                || c.host_eof
                || c.peer_shutdown & SHUTDOWN_RCV != 0
            {
                return self.reset(key);
            }
        }
        if let Err(e) = c.flush() {
            log::debug!("virtio-vsock: host socket of {key:?}: {e}; connection reset");
            return self.reset(key);
        }
        self.sync(key);
    }

    /// Whether [`next_rx`](Self::next_rx) may have a packet.
    pub fn has_rx(&self) -> bool {
        !self.rst_queue.is_empty() || self.conns.values().any(|c| c.has_work(1))
    }

    /// The next packet for the guest, carrying at most `max_data` bytes of data; `None`
    /// when there is none.
    pub fn next_rx(&mut self, max_data: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(key) = self.rst_queue.pop_front() {
            return Some((self.header(key, Op::Rst), Vec::new()));
        }
        loop {
            // Round robin: the first connection with work after the last one served.
            let after = match self.last_served {
                Some(k) => (Bound::Excluded(k), Bound::Unbounded),
                None => (Bound::Unbounded, Bound::Unbounded),
            };
            let key = self
                .conns
                .range(after)
                .chain(self.conns.iter())
                .find(|(_, c)| c.has_work(max_data))
                .map(|(&k, _)| k)?;
            self.last_served = Some(key);
            if let Some(p) = self.conn_packet(key, max_data) {
                return Some(p);
            }
            if let Some(key) = self.rst_queue.pop_front() {
                return Some((self.header(key, Op::Rst), Vec::new()));
            }
        }
    }

    /// One packet of the connection `key`, if it has one after all.
    fn conn_packet(&mut self, key: ConnKey, max_data: usize) -> Option<(Header, Vec<u8>)> {
        let mut hdr = self.header(key, Op::Rw);
        let c = self.conns.get_mut(&key)?;
        let mut data = Vec::new();
        if c.pending_request {
            c.pending_request = false;
            hdr.op = Op::Request as u16;
        } else if c.pending_response {
            c.pending_response = false;
            hdr.op = Op::Response as u16;
        } else if c.can_read() && max_data > 0 {
            let n = (c.credit() as usize)
                .min(max_data)
                .min(MAX_DATA_LEN as usize);
            data.resize(n, 0);
            match recv(c.stream.as_raw_fd(), &mut data) {
                Ok(0) => {
                    c.host_eof = true;
                    if c.host_hup {
                        self.reset(key);
                        return None;
                    }
                    c.pending_shutdown |= SHUTDOWN_SEND;
                    self.sync(key);
                    return None;
                }
                Ok(k) => {
                    data.truncate(k);
                    c.tx_cnt = c.tx_cnt.wrapping_add(k as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    c.readable = false;
                    if c.host_hup {
                        // Gone without an EOF: nothing more will come.
                        self.reset(key);
                    } else {
                        self.sync(key);
                    }
                    return None;
                }
                Err(e) => {
                    log::debug!("virtio-vsock: host socket of {key:?}: {e}; connection reset");
                    self.reset(key);
                    return None;
                }
            }
        } else if c.pending_shutdown != 0 {
            hdr.op = Op::Shutdown as u16;
            hdr.flags = c.pending_shutdown;
            c.pending_shutdown = 0;
        } else if c.pending_credit_update {
            hdr.op = Op::CreditUpdate as u16;
        } else {
            return None;
        }
        hdr.fwd_cnt = c.fwd_cnt;
        c.last_fwd_cnt_sent = c.fwd_cnt;
        c.pending_credit_update = false;
        hdr.len = data.len() as u32;
        Some((hdr, data))
    }
}

#[cfg(test)]
mod tests;
