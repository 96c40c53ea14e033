//! The server: one thread, `poll(2)` over the listening socket, a shutdown eventfd and every
//! connection. Connections are nonblocking, each with its own input buffer (bytes not yet
//! consumed by a request) and output buffer (answers not yet taken by the client), so a
//! client that sends slowly, stops halfway or never reads its answers holds up nobody else.
//! The one wait that is not on `poll` is [`ApiSender::call`]: the VMM thread answers each
//! request as soon as it reads it.
//!
//! Answers go out with `sendto` and MSG_NOSIGNAL, so a vanished client is an EPIPE and not a
//! SIGPIPE. The system calls the loop makes are listed, with why, in [`crate::seccomp`], whose
//! filter [`ApiServer::spawn_with`] lets the caller install on the thread.

use std::io::{self, Read};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm::metrics::ApiMetrics;
use vmm::rpc::ApiSender;
use vmm_sys_util::eventfd::EventFd;

use crate::http::{parse_request, Parse, Response, CONTINUE, DEFAULT_MAX_PAYLOAD};
use crate::router::{route, vmm_response, Routed};

/// The thread's name.
pub const THREAD_NAME: &str = "cgvm-api";

/// Default for [`ServerOptions::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 64;

/// Answers waiting for a client past this many bytes stop the server from reading (and so from
/// answering) further requests on that connection until the client catches up.
const OUTPUT_HIGH_WATER: usize = 64 * 1024;

/// Bytes read from a connection at a time.
const READ_CHUNK: usize = 16 * 1024;

/// After accept(2) fails for lack of descriptors, wait this long before trying again, so that a
/// listener that stays readable does not make the loop spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// How the server behaves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerOptions {
    /// The largest request body in bytes (`--http-api-max-payload-size`); a larger one is
    /// answered with 400 and the connection is closed.
    pub max_payload: usize,
    /// The most connections served at once; while this many are open, new ones wait in the
    /// listen backlog.
    pub max_connections: usize,
    /// The application's name, sent in the `Server` header (`<app_name> API`).
    pub app_name: String,
    /// The version `GET /version` reports as `firecracker_version`.
    pub version: String,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            app_name: "cgvm".into(),
            version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// Stops a running [`ApiServer`] from another thread (or a signal handler's helper).
#[derive(Debug)]
pub struct ShutdownHandle(EventFd);

impl ShutdownHandle {
    /// Asks the server to stop: [`ApiServer::run`] returns `Ok(())` at its next wake-up (at
    /// once if it is waiting on `poll`; after the VMM's answer if it is waiting for one), and
    /// every connection is closed, answered or not.
    pub fn shutdown(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// How long [`ServerHandle::shutdown`] waits for the thread.
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);

/// A server running on its own thread, from [`ApiServer::spawn`].
#[derive(Debug)]
pub struct ServerHandle {
    stop: ShutdownHandle,
    thread: JoinHandle<io::Result<()>>,
}

impl ServerHandle {
    /// Stops the server and waits up to [`SHUTDOWN_WAIT`] for its thread; failures are logged.
    /// The thread can be late only while it waits for the VMM's answer to a request: drop the
    /// VMM's [`vmm::rpc::ApiReceiver`] (or answer) first. A thread still running after the
    /// wait is left to end with the process.
    pub fn shutdown(self) {
        if let Err(e) = self.stop.shutdown() {
            log::warn!("API server: cannot signal the shutdown: {e}");
            return;
        }
        let deadline = Instant::now() + SHUTDOWN_WAIT;
        while !self.thread.is_finished() {
            if Instant::now() >= deadline {
                log::warn!("API server: the thread did not stop in time; leaving it");
                return;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        match self.thread.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => log::warn!("API server: stopped with an error: {e}"),
            Err(_) => log::error!("API server: the thread panicked"),
        }
    }

    /// Stops the server and waits for its thread, however long; returns what
    /// [`ApiServer::run`] returned (a panic becomes an error).
    pub fn stop(self) -> io::Result<()> {
        self.stop.shutdown()?;
        self.join()
    }

    /// Waits for the thread without asking it to stop.
    pub fn join(self) -> io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the API thread panicked")))
    }

    /// Another handle that stops this server.
    pub fn shutdown_handle(&self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.stop.0.try_clone()?))
    }

    /// The server's thread.
    pub fn thread(&self) -> &std::thread::Thread {
        self.thread.thread()
    }
}

/// The API server. Build it with [`ApiServer::new`], then [`ApiServer::spawn`] it (or call
/// [`ApiServer::run`] on a thread of your own).
#[derive(Debug)]
pub struct ApiServer {
    listener: UnixListener,
    vmm: ApiSender,
    metrics: Arc<ApiMetrics>,
    options: ServerOptions,
    /// Created by the first [`ApiServer::shutdown_handle`], or when the server starts.
    shutdown: Option<EventFd>,
    /// The listener was made nonblocking already.
    nonblocking: bool,
    server_header: String,
}

/// One client.
struct Conn {
    stream: UnixStream,
    /// Bytes received and not yet consumed by a request.
    input: Vec<u8>,
    /// Answer bytes not yet sent; `output[sent..]` is what is left.
    output: Vec<u8>,
    sent: usize,
    /// `100 Continue` was sent for the request being received.
    continue_sent: bool,
    /// The client will send nothing more (EOF).
    read_closed: bool,
    /// Close once `output` is sent: the last request asked for it, or was malformed.
    closing: bool,
}

impl Conn {
    fn pending(&self) -> usize {
        self.output.len() - self.sent
    }

    /// Whether to read more: not finished, answers drained enough, room for a request.
    fn wants_read(&self, input_limit: usize) -> bool {
        !self.closing
            && !self.read_closed
            && self.pending() < OUTPUT_HIGH_WATER
            && self.input.len() < input_limit
    }

    /// Whether this connection is done with and can be dropped. (A connection whose client
    /// sent EOF becomes `closing` once every complete request it sent is answered.)
    fn finished(&self) -> bool {
        self.closing && self.pending() == 0
    }
}

/// What servicing a connection came to.
enum Fate {
    Keep,
    Drop,
}

fn send_nosignal(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is a live slice of `buf.len()` readable bytes; `fd` is a socket this thread
    // owns for the whole call. send(2) reads at most `len` bytes from it and keeps no pointer.
    let n = unsafe {
        libc::send(
            fd,
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // Non-negative and at most buf.len().
    Ok(n.unsigned_abs())
}

fn accept_nonblocking(listener: &UnixListener) -> io::Result<UnixStream> {
    // SAFETY: accept4 with null address pointers writes nothing back; the listener's fd is
    // valid for the call because `listener` is borrowed.
    let fd = unsafe {
        libc::accept4(
            listener.as_raw_fd(),
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by accept4, is open, and nothing else owns it; the
    // UnixStream becomes its only owner and closes it.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

fn poll_fds(fds: &mut [libc::pollfd], timeout: Option<Duration>) -> io::Result<()> {
    let ms = timeout.map_or(-1, |t| {
        i32::try_from(t.as_millis().saturating_add(1)).unwrap_or(i32::MAX)
    });
    let nfds = libc::nfds_t::try_from(fds.len()).unwrap_or(libc::nfds_t::MAX);
    // SAFETY: `fds` is a live, exclusively borrowed array of `nfds` pollfd structures; poll
    // writes only their `revents` fields.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), nfds, ms) };
    if r < 0 {
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
        // Interrupted: every revents is 0 and the loop simply polls again.
        for f in fds.iter_mut() {
            f.revents = 0;
        }
    }
    Ok(())
}

fn pollfd(fd: RawFd, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

impl ApiServer {
    /// A server on `listener` (bound and listening) that asks `vmm` to carry out requests and
    /// counts them in `metrics`. Nothing happens until it runs.
    pub fn new(
        listener: UnixListener,
        vmm: ApiSender,
        metrics: Arc<ApiMetrics>,
        options: ServerOptions,
    ) -> Self {
        let server_header = format!("{} API", options.app_name);
        Self {
            listener,
            vmm,
            metrics,
            options,
            shutdown: None,
            nonblocking: false,
            server_header,
        }
    }

    fn shutdown_fd(&mut self) -> io::Result<&EventFd> {
        if self.shutdown.is_none() {
            self.shutdown = Some(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        self.shutdown
            .as_ref()
            .ok_or_else(|| io::Error::other("no shutdown eventfd"))
    }

    /// A handle that stops this server once it runs (for [`ApiServer::run`] on a thread of
    /// the caller's; [`ApiServer::spawn`] returns one in its [`ServerHandle`]).
    pub fn shutdown_handle(&mut self) -> io::Result<ShutdownHandle> {
        Ok(ShutdownHandle(self.shutdown_fd()?.try_clone()?))
    }

    /// Runs the server on a new thread named [`THREAD_NAME`].
    pub fn spawn(self) -> io::Result<ServerHandle> {
        self.spawn_with(|| Ok(()))
    }

    /// Like [`ApiServer::spawn`], calling `before_loop` on the new thread before it serves
    /// anything: the place to install the thread's seccomp filter. If it fails, the thread
    /// ends with its error (see [`ServerHandle::stop`]) and nothing is served.
    pub fn spawn_with<F>(mut self, before_loop: F) -> io::Result<ServerHandle>
    where
        F: FnOnce() -> io::Result<()> + Send + 'static,
    {
        let stop = self.shutdown_handle()?;
        // Before the thread, so that a filter installed by `before_loop` need not allow it.
        self.listener.set_nonblocking(true)?;
        self.nonblocking = true;
        let thread = std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || {
                before_loop()?;
                self.run()
            })?;
        Ok(ServerHandle { stop, thread })
    }

    /// Serves on the calling thread until a [`ShutdownHandle`] is used (then `Ok(())`), or
    /// `poll` fails. Errors on one connection close that connection only.
    pub fn run(mut self) -> io::Result<()> {
        if !self.nonblocking {
            self.listener.set_nonblocking(true)?;
            self.nonblocking = true;
        }
        let shutdown_fd = self.shutdown_fd()?.as_raw_fd();
        let mut conns: Vec<Conn> = Vec::new();
        let mut accept_paused_until: Option<Instant> = None;
        let input_limit = crate::http::MAX_HEADER_BYTES.saturating_add(self.options.max_payload);
        let mut fds: Vec<libc::pollfd> = Vec::new();
        loop {
            let now = Instant::now();
            if accept_paused_until.is_some_and(|t| t <= now) {
                accept_paused_until = None;
            }
            let accepting =
                conns.len() < self.options.max_connections && accept_paused_until.is_none();
            fds.clear();
            fds.push(pollfd(shutdown_fd, libc::POLLIN));
            fds.push(pollfd(
                self.listener.as_raw_fd(),
                if accepting { libc::POLLIN } else { 0 },
            ));
            for c in &conns {
                let mut ev = 0;
                if c.wants_read(input_limit) {
                    ev |= libc::POLLIN;
                }
                if c.pending() > 0 {
                    ev |= libc::POLLOUT;
                }
                fds.push(pollfd(c.stream.as_raw_fd(), ev));
            }
            poll_fds(&mut fds, accept_paused_until.map(|t| t - now))?;

            if fds[0].revents != 0 {
                return Ok(());
            }
            // Service connections from the last, so that swap_remove only moves one already done.
            for i in (0..conns.len()).rev() {
                let revents = fds[i + 2].revents;
                if revents == 0 {
                    continue;
                }
                if let Fate::Drop = self.service(&mut conns[i], revents, input_limit) {
                    conns.swap_remove(i);
                }
            }
            if accepting && fds[1].revents != 0 {
                while conns.len() < self.options.max_connections {
                    match accept_nonblocking(&self.listener) {
                        Ok(stream) => {
                            self.metrics.connections.fetch_add(1, Ordering::Relaxed);
                            conns.push(Conn {
                                stream,
                                input: Vec::new(),
                                output: Vec::new(),
                                sent: 0,
                                continue_sent: false,
                                read_closed: false,
                                closing: false,
                            });
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                        Err(e)
                            if matches!(e.kind(), io::ErrorKind::Interrupted)
                                || e.raw_os_error() == Some(libc::ECONNABORTED) =>
                        {
                            continue
                        }
                        Err(e) => {
                            log::warn!("API server: accept failed: {e}");
                            accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                            break;
                        }
                    }
                }
            }
        }
    }

    /// Reads what the client sent, answers every complete request, sends what it can.
    fn service(&self, c: &mut Conn, revents: libc::c_short, input_limit: usize) -> Fate {
        if revents & libc::POLLNVAL != 0 {
            return Fate::Drop;
        }
        if revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0
            && c.wants_read(input_limit)
        {
            if let Fate::Drop = self.read_some(c, input_limit) {
                return Fate::Drop;
            }
        }
        loop {
            let held_back = self.answer_requests(c);
            if let Fate::Drop = flush(c) {
                return Fate::Drop;
            }
            // Requests held back by unsent answers go on as soon as the client took them.
            if !held_back || c.pending() >= OUTPUT_HIGH_WATER {
                break;
            }
        }
        if revents & libc::POLLERR != 0 || c.finished() {
            return Fate::Drop;
        }
        Fate::Keep
    }

    fn read_some(&self, c: &mut Conn, input_limit: usize) -> Fate {
        let mut chunk = [0u8; READ_CHUNK];
        while c.input.len() < input_limit {
            let want = (input_limit - c.input.len()).min(READ_CHUNK);
            match c.stream.read(&mut chunk[..want]) {
                Ok(0) => {
                    c.read_closed = true;
                    break;
                }
                Ok(n) => c.input.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                // ECONNRESET and friends: the client is gone, and so are its answers.
                Err(_) => return Fate::Drop,
            }
        }
        Fate::Keep
    }

    /// Answers the complete requests at the head of the input, in order, while the client
    /// keeps up with reading them. Returns true when it stopped because too many answers are
    /// waiting for the client.
    fn answer_requests(&self, c: &mut Conn) -> bool {
        loop {
            if c.closing {
                return false;
            }
            if c.pending() >= OUTPUT_HIGH_WATER {
                return true;
            }
            match parse_request(&c.input, self.options.max_payload) {
                Parse::Incomplete { expects_continue } => {
                    if c.read_closed {
                        // Half a request and then EOF: nothing to answer.
                        c.closing = true;
                    } else if expects_continue && !c.continue_sent {
                        c.output.extend_from_slice(CONTINUE);
                        c.continue_sent = true;
                    }
                    return false;
                }
                Parse::Invalid(e) => {
                    let started = Instant::now();
                    log::debug!("API: malformed request: {e}");
                    self.metrics
                        .malformed_requests
                        .fetch_add(1, Ordering::Relaxed);
                    Response::fault(400, &e.message).write_to(
                        &mut c.output,
                        &self.server_header,
                        true,
                        false,
                    );
                    c.closing = true;
                    c.input.clear();
                    let _ = flush(c);
                    self.metrics.record("", false, started.elapsed());
                    return false;
                }
                Parse::Complete { request, consumed } => {
                    let started = Instant::now();
                    c.input.drain(..consumed);
                    c.continue_sent = false;
                    let response = match route(
                        &request.method,
                        &request.target,
                        &request.body,
                        &self.options.version,
                    ) {
                        Routed::Reply(r) => r,
                        Routed::Vmm(action) => vmm_response(self.vmm.call(action)),
                    };
                    log::debug!(
                        "API: {} {} -> {}",
                        request.method,
                        request.target,
                        response.status
                    );
                    if !request.keep_alive {
                        c.closing = true;
                    }
                    response.write_to(
                        &mut c.output,
                        &self.server_header,
                        c.closing,
                        request.method == "HEAD",
                    );
                    // The answer is written when the client can take it; try now, so that the
                    // latency covers the write for every client that is reading.
                    let _ = flush(c);
                    self.metrics
                        .record(&request.method, response.status < 400, started.elapsed());
                }
            }
        }
    }
}

/// Sends what the client will take now. Errors (the client went away) drop the connection.
fn flush(c: &mut Conn) -> Fate {
    while c.pending() > 0 {
        match send_nosignal(c.stream.as_raw_fd(), &c.output[c.sent..]) {
            Ok(0) => return Fate::Drop,
            Ok(n) => c.sent += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => {
                // Forget the answers: nobody will read them. The caller drops the connection
                // once it sees the connection finished.
                c.output.clear();
                c.sent = 0;
                c.closing = true;
                return Fate::Drop;
            }
        }
    }
    if c.sent == c.output.len() {
        c.output.clear();
        c.sent = 0;
    } else if c.sent > OUTPUT_HIGH_WATER {
        c.output.drain(..c.sent);
        c.sent = 0;
    }
    Fate::Keep
}
