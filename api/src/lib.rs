//! cgvm's HTTP API: Firecracker's API (v1.17 paths, bodies and status codes) served over
//! HTTP/1.1 on a Unix socket.
//!
//! - [`http`]: framing, a pure parser over the bytes a connection sent
//!   ([`parse_request`]) and the bytes of an answer ([`Response`]).
//! - [`router`]: method, path and body to a [`vmm::rpc::VmmAction`] or an answer of its own
//!   ([`route`], [`ROUTES`]), and the VMM's answer to a [`Response`] ([`vmm_response`]).
//! - [`server`]: the thread that owns the socket ([`ApiServer`]).
//! - [`seccomp`]: the filter of that thread ([`seccomp::confine_api_thread`]).
//!
//! ```no_run
//! # fn main() -> std::io::Result<()> {
//! use std::sync::Arc;
//! let listener = std::os::unix::net::UnixListener::bind("/tmp/cgvm.sock")?;
//! let (sender, receiver) = vmm::rpc::channel()?;
//! let metrics = Arc::new(vmm::metrics::ApiMetrics::default());
//! let server = api::ApiServer::new(listener, sender, metrics, api::ServerOptions::default());
//! let handle = server.spawn()?;
//! // ... the VMM thread answers `receiver.requests` ...
//! drop(receiver);
//! handle.shutdown();
//! # Ok(())
//! # }
//! ```

#![deny(missing_docs)]

pub mod http;
pub mod router;
pub mod seccomp;
pub mod server;

pub use http::{parse_request, HttpError, Parse, Request, Response, DEFAULT_MAX_PAYLOAD};
pub use router::{find_route, route, vmm_response, RouteSpec, Routed, ROUTES};
pub use server::{ApiServer, ServerHandle, ServerOptions, ShutdownHandle, THREAD_NAME};
