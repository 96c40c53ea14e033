//! HTTP/1.1 framing: one request out of the bytes a connection has sent so far, and the bytes
//! of one response. Pure functions over byte slices; the socket work is in [`crate::server`].
//!
//! The request line and the headers go through `httparse`; what it leaves to its caller is
//! decided here: bodies are framed by `Content-Length` only (a `Transfer-Encoding` is refused),
//! the request line plus headers may take [`MAX_HEADER_BYTES`], a body at most the server's
//! `max_payload`, and `Expect: 100-continue` is reported so that the server can answer it.

use std::fmt::Write as _;

use serde::Serialize;

/// Firecracker's default for `--http-api-max-payload-size`: the largest request body, in bytes.
pub const DEFAULT_MAX_PAYLOAD: usize = 51_200;

/// The most bytes the request line and the headers of one request may take, final empty line
/// included.
pub const MAX_HEADER_BYTES: usize = 8_192;

/// The most header fields one request may carry.
pub const MAX_HEADERS: usize = 32;

/// One complete request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method as sent (`GET`, `PUT`, ...; case-sensitive, as HTTP says).
    pub method: String,
    /// The request target in origin form (`/drives/rootfs`), query string included if one was
    /// sent; an absolute-form target (`http://localhost/drives/rootfs`) is reduced to this.
    pub target: String,
    /// The body: exactly `Content-Length` bytes (empty without one).
    pub body: Vec<u8>,
    /// The connection stays open after the answer: HTTP/1.1 without `Connection: close`, or
    /// HTTP/1.0 with `Connection: keep-alive`.
    pub keep_alive: bool,
}

/// A request the server cannot frame. It is answered with 400 and the connection is closed,
/// because what follows it on the connection cannot be trusted to start a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    /// The `fault_message` of the answer.
    pub message: String,
}

impl HttpError {
    fn new(message: impl Into<String>) -> Self {
        Self {
            message: message.into(),
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// What [`parse_request`] found at the start of a connection's unread bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// Not a whole request yet; read more.
    Incomplete {
        /// The headers are complete, they carry `Expect: 100-continue` and the body has not
        /// all arrived: the client waits for `HTTP/1.1 100 Continue` before sending it.
        expects_continue: bool,
    },
    /// A whole request, which took the first `consumed` bytes.
    Complete {
        /// The request.
        request: Request,
        /// How many bytes it took (request line, headers and body).
        consumed: usize,
    },
    /// Not a request this server accepts: answer 400 and close the connection.
    Invalid(HttpError),
}

/// The headers of a request, as far as this server cares.
struct Framing {
    content_length: usize,
    keep_alive: bool,
    expects_continue: bool,
}

fn trim_ows(v: &[u8]) -> &[u8] {
    let start = v
        .iter()
        .position(|b| *b != b' ' && *b != b'\t')
        .unwrap_or(v.len());
    let end = v
        .iter()
        .rposition(|b| *b != b' ' && *b != b'\t')
        .map_or(start, |i| i + 1);
    &v[start..end.max(start)]
}

/// The comma-separated, case-insensitive tokens of a header value such as `Connection`.
fn tokens(v: &[u8]) -> impl Iterator<Item = &[u8]> {
    v.split(|b| *b == b',')
        .map(trim_ows)
        .filter(|t| !t.is_empty())
}

fn printable(v: &[u8]) -> String {
    let s = String::from_utf8_lossy(v);
    let mut out: String = s.chars().take(64).collect();
    if s.chars().nth(64).is_some() {
        out.push_str("...");
    }
    out.escape_debug().to_string()
}

fn framing(
    headers: &[httparse::Header<'_>],
    http10: bool,
    max_payload: usize,
) -> Result<Framing, HttpError> {
    let mut content_length: Option<usize> = None;
    let mut keep_alive = !http10;
    let mut expects_continue = false;
    for h in headers {
        let name = h.name;
        if name.eq_ignore_ascii_case("content-length") {
            let v = trim_ows(h.value);
            if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::new(format!(
                    "Content-Length '{}' is not a decimal number",
                    printable(h.value)
                )));
            }
            // Digits only, so the one failure left is overflow: certainly over the limit.
            let n = std::str::from_utf8(v)
                .ok()
                .and_then(|s| s.parse::<usize>().ok())
                .unwrap_or(usize::MAX);
            if content_length.is_some_and(|old| old != n) {
                return Err(HttpError::new(
                    "two Content-Length headers with different values",
                ));
            }
            content_length = Some(n);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(HttpError::new(format!(
                "Transfer-Encoding '{}' is not supported: send the body with a Content-Length",
                printable(h.value)
            )));
        } else if name.eq_ignore_ascii_case("connection") {
            for t in tokens(h.value) {
                if t.eq_ignore_ascii_case(b"close") {
                    keep_alive = false;
                } else if t.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    keep_alive = true;
                }
            }
        } else if name.eq_ignore_ascii_case("expect") {
            if trim_ows(h.value).eq_ignore_ascii_case(b"100-continue") {
                expects_continue = true;
            } else {
                return Err(HttpError::new(format!(
                    "Expect '{}' is not supported (only 100-continue is)",
                    printable(h.value)
                )));
            }
        }
    }
    let content_length = content_length.unwrap_or(0);
    if content_length > max_payload {
        return Err(HttpError::new(format!(
            "the request body is {content_length} bytes, more than the limit of {max_payload} \
             bytes (--http-api-max-payload-size)"
        )));
    }
    Ok(Framing {
        content_length,
        keep_alive,
        expects_continue,
    })
}

/// Reduces a request target to origin form, or says why it is not one this server takes.
fn origin_form(target: &str) -> Result<String, HttpError> {
    if target.starts_with('/') {
        return Ok(target.to_string());
    }
    // Absolute form: `http://host[:port]/path`; the authority means nothing on a Unix socket.
    let lower = target.get(..7).map(str::to_ascii_lowercase);
    if lower.as_deref() == Some("http://") {
        let rest = &target[7..];
        return Ok(match rest.find('/') {
            Some(i) => rest[i..].to_string(),
            None => "/".to_string(),
        });
    }
    Err(HttpError::new(format!(
        "request target '{}' is not a path",
        printable(target.as_bytes())
    )))
}

/// Looks for one request at the start of `buf`, the bytes a connection has sent and the server
/// has not consumed yet. A body longer than `max_payload` bytes is [`Parse::Invalid`] as soon as
/// its `Content-Length` is known, before the body arrives.
///
/// Pure: the fuzz target feeds it arbitrary bytes.
pub fn parse_request(buf: &[u8], max_payload: usize) -> Parse {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut headers);
    let head_len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => {
            if buf.len() >= MAX_HEADER_BYTES {
                return Parse::Invalid(HttpError::new(format!(
                    "the request line and headers take more than {MAX_HEADER_BYTES} bytes"
                )));
            }
            return Parse::Incomplete {
                expects_continue: false,
            };
        }
        Err(httparse::Error::TooManyHeaders) => {
            return Parse::Invalid(HttpError::new(format!(
                "more than {MAX_HEADERS} header fields"
            )))
        }
        Err(e) => {
            return Parse::Invalid(HttpError::new(format!("malformed HTTP request: {e}")));
        }
    };
    if head_len > MAX_HEADER_BYTES {
        return Parse::Invalid(HttpError::new(format!(
            "the request line and headers take more than {MAX_HEADER_BYTES} bytes"
        )));
    }
    // A complete parse always fills these three; treat anything else as malformed.
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Parse::Invalid(HttpError::new("malformed HTTP request line"));
    };
    let f = match framing(req.headers, version == 0, max_payload) {
        Ok(f) => f,
        Err(e) => return Parse::Invalid(e),
    };
    let target = match origin_form(target) {
        Ok(t) => t,
        Err(e) => return Parse::Invalid(e),
    };
    let Some(end) = head_len.checked_add(f.content_length) else {
        return Parse::Invalid(HttpError::new("Content-Length too large"));
    };
    let Some(body) = buf.get(head_len..end) else {
        return Parse::Incomplete {
            expects_continue: f.expects_continue,
        };
    };
    Parse::Complete {
        request: Request {
            method: method.to_string(),
            target,
            body: body.to_vec(),
            keep_alive: f.keep_alive,
        },
        consumed: end,
    }
}

/// The interim answer to `Expect: 100-continue`.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// A JSON body (sent with `Content-Type: application/json`); none for 204.
    pub body: Option<Vec<u8>>,
    /// The methods a path accepts, for the `Allow` header of a 405.
    pub allow: Option<String>,
}

/// The reason phrase of each status this server sends.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "",
    }
}

#[derive(Serialize)]
struct Fault<'a> {
    fault_message: &'a str,
}

impl Response {
    /// `204 No Content`.
    pub fn no_content() -> Self {
        Self {
            status: 204,
            body: None,
            allow: None,
        }
    }

    /// `status` with `value` as its JSON body (500 if it cannot be serialized).
    pub fn json<T: Serialize + ?Sized>(status: u16, value: &T) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self {
                status,
                body: Some(body),
                allow: None,
            },
            Err(e) => Self::fault(500, &format!("cannot serialize the answer: {e}")),
        }
    }

    /// `status` with `{"fault_message": message}`.
    pub fn fault(status: u16, message: &str) -> Self {
        let body = serde_json::to_vec(&Fault {
            fault_message: message,
        })
        // Serializing a struct of one string cannot fail; keep a fixed body just in case.
        .unwrap_or_else(|_| b"{\"fault_message\":\"internal error\"}".to_vec());
        Self {
            status,
            body: Some(body),
            allow: None,
        }
    }

    /// The `fault_message` of an error answer.
    pub fn fault_message(&self) -> Option<String> {
        let v: serde_json::Value = serde_json::from_slice(self.body.as_deref()?).ok()?;
        Some(v.get("fault_message")?.as_str()?.to_string())
    }

    /// Appends the response's bytes to `out`. `server` is the `Server` header's value;
    /// `close` adds `Connection: close`; `head` leaves the body out (the answer to a HEAD).
    pub fn write_to(&self, out: &mut Vec<u8>, server: &str, close: bool, head: bool) {
        let mut h = String::with_capacity(160);
        // Writing to a String cannot fail.
        let _ = write!(
            h,
            "HTTP/1.1 {} {}\r\nServer: {server}\r\nConnection: {}\r\n",
            self.status,
            reason(self.status),
            if close { "close" } else { "keep-alive" }
        );
        if let Some(allow) = &self.allow {
            let _ = write!(h, "Allow: {allow}\r\n");
        }
        // A 204 carries no Content-Length (RFC 9110, 8.6); every other answer does.
        if self.status != 204 {
            let len = self.body.as_ref().map_or(0, Vec::len);
            if self.body.is_some() {
                h.push_str("Content-Type: application/json\r\n");
            }
            let _ = write!(h, "Content-Length: {len}\r\n");
        }
        h.push_str("\r\n");
        out.extend_from_slice(h.as_bytes());
        if !head {
            if let Some(b) = &self.body {
                out.extend_from_slice(b);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(buf: &[u8]) -> (Request, usize) {
        match parse_request(buf, DEFAULT_MAX_PAYLOAD) {
            Parse::Complete { request, consumed } => (request, consumed),
            other => panic!("{other:?}"),
        }
    }

    fn invalid(buf: &[u8], max: usize) -> String {
        match parse_request(buf, max) {
            Parse::Invalid(e) => e.message,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_request_with_a_body_and_what_follows_it() {
        let buf =
            b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}GET";
        let (r, n) = complete(buf);
        assert_eq!(r.method, "PUT");
        assert_eq!(r.target, "/machine-config");
        assert_eq!(r.body, b"{}");
        assert!(r.keep_alive);
        assert_eq!(&buf[n..], b"GET");
    }

    #[test]
    fn partial_requests_wait_for_more() {
        let full = b"PUT /x HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello";
        for cut in 0..full.len() {
            assert_eq!(
                parse_request(&full[..cut], DEFAULT_MAX_PAYLOAD),
                Parse::Incomplete {
                    expects_continue: false
                },
                "cut at {cut}"
            );
        }
        assert_eq!(complete(full).1, full.len());
    }

    #[test]
    fn expect_continue_is_reported_until_the_body_is_there() {
        let head = b"PUT /x HTTP/1.1\r\nExpect: 100-Continue\r\nContent-Length: 3\r\n\r\n";
        assert_eq!(
            parse_request(head, 100),
            Parse::Incomplete {
                expects_continue: true
            }
        );
        let mut full = head.to_vec();
        full.extend_from_slice(b"abc");
        assert!(matches!(parse_request(&full, 100), Parse::Complete { .. }));
        let e = invalid(
            b"PUT /x HTTP/1.1\r\nExpect: something\r\nContent-Length: 3\r\n\r\n",
            100,
        );
        assert!(e.contains("Expect"), "{e}");
    }

    #[test]
    fn connection_handling_follows_the_version() {
        let (r, _) = complete(b"GET / HTTP/1.1\r\nConnection: Close\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) = complete(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!r.keep_alive);
        let (r, _) = complete(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(r.keep_alive);
        let (r, _) = complete(b"GET / HTTP/1.1\r\nConnection: upgrade, keep-alive\r\n\r\n");
        assert!(r.keep_alive);
    }

    #[test]
    fn bodies_over_the_limit_are_refused_before_they_arrive() {
        let e = invalid(b"PUT /x HTTP/1.1\r\nContent-Length: 101\r\n\r\n", 100);
        assert!(e.contains("101") && e.contains("100"), "{e}");
        assert!(matches!(
            parse_request(b"PUT /x HTTP/1.1\r\nContent-Length: 100\r\n\r\n", 100),
            Parse::Incomplete { .. }
        ));
        let e = invalid(
            b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999999999\r\n\r\n",
            100,
        );
        assert!(e.contains("limit"), "{e}");
    }

    #[test]
    fn framing_errors() {
        for (req, word) in [
            (
                &b"PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"[..],
                "Transfer-Encoding",
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
                "Content-Length",
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 1 2\r\n\r\n",
                "Content-Length",
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length:\r\n\r\n",
                "Content-Length",
            ),
            (
                b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
                "Content-Length",
            ),
            (b"GET / HTTP/2.0\r\n\r\n", "malformed"),
            (b"GET\x01 / HTTP/1.1\r\n\r\n", "malformed"),
            (b"GET * HTTP/1.1\r\n\r\n", "not a path"),
            (b"hello world\r\n\r\n", "malformed"),
        ] {
            let e = invalid(req, 100);
            assert!(
                e.contains(word),
                "{e} for {:?}",
                String::from_utf8_lossy(req)
            );
        }
        // The same length twice is fine.
        let (r, _) =
            complete(b"PUT /x HTTP/1.1\r\nContent-Length: 1\r\ncontent-length: 1\r\n\r\nz");
        assert_eq!(r.body, b"z");
    }

    #[test]
    fn header_limits() {
        let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
        big.resize(MAX_HEADER_BYTES + 10, b'a');
        assert!(invalid(&big, 100).contains("headers"));
        let mut many = b"GET / HTTP/1.1\r\n".to_vec();
        for i in 0..=MAX_HEADERS {
            many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
        }
        many.extend_from_slice(b"\r\n");
        assert!(invalid(&many, 100).contains("header fields"));
    }

    #[test]
    fn absolute_targets_become_paths() {
        let (r, _) = complete(b"GET http://localhost/machine-config HTTP/1.1\r\n\r\n");
        assert_eq!(r.target, "/machine-config");
        let (r, _) = complete(b"GET http://localhost HTTP/1.1\r\n\r\n");
        assert_eq!(r.target, "/");
    }

    #[test]
    fn responses_are_framed() {
        let mut out = Vec::new();
        Response::no_content().write_to(&mut out, "cgvm API", false, false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 204 No Content\r\n"), "{s}");
        assert!(
            !s.contains("Content-Length") && s.ends_with("\r\n\r\n"),
            "{s}"
        );

        let mut out = Vec::new();
        let mut r = Response::fault(405, "no \"way\"");
        r.allow = Some("GET, PUT".into());
        r.write_to(&mut out, "cgvm API", true, false);
        let s = String::from_utf8(out).unwrap();
        assert!(s.contains("Allow: GET, PUT\r\n"), "{s}");
        assert!(s.contains("Connection: close\r\n"), "{s}");
        assert!(s.contains("Content-Type: application/json\r\n"), "{s}");
        let body = s.split("\r\n\r\n").nth(1).unwrap();
        assert!(s.contains(&format!("Content-Length: {}\r\n", body.len())));
        assert_eq!(r.fault_message().as_deref(), Some("no \"way\""));

        let mut out = Vec::new();
        Response::json(200, &serde_json::json!({"a": 1})).write_to(&mut out, "s", false, true);
        let s = String::from_utf8(out).unwrap();
        assert!(
            s.contains("Content-Length: 7\r\n") && s.ends_with("\r\n\r\n"),
            "{s}"
        );
    }
}
