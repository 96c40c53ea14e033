//! Text helpers without allocation: a fixed-capacity line buffer, and display adapters for
//! guest bytes and sizes.

use core::fmt;

/// A fixed-capacity text buffer; text past the capacity is cut and marked with "...".
pub struct Line<const N: usize> {
    buf: [u8; N],
    len: usize,
    truncated: bool,
}

impl<const N: usize> Line<N> {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
            truncated: false,
        }
    }

    /// Whether nothing has been written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The text (only whole UTF-8 characters are ever stored).
    pub fn as_str(&self) -> &str {
        core::str::from_utf8(&self.buf[..self.len]).unwrap_or("<invalid utf-8>")
    }
}

impl<const N: usize> Default for Line<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> fmt::Write for Line<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for c in s.chars() {
            let mut utf8 = [0u8; 4];
            let bytes = c.encode_utf8(&mut utf8).as_bytes();
            if self.truncated || self.len + bytes.len() > N {
                self.truncated = true;
                break;
            }
            self.buf[self.len..self.len + bytes.len()].copy_from_slice(bytes);
            self.len += bytes.len();
        }
        Ok(())
    }
}

impl<const N: usize> fmt::Display for Line<N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())?;
        if self.truncated {
            f.write_str("...")?;
        }
        Ok(())
    }
}

/// Shows guest bytes as text: printable ASCII as is, anything else as `\xNN`.
pub struct Escaped<'a>(pub &'a [u8]);

impl fmt::Display for Escaped<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for &b in self.0 {
            if is_printable(b) {
                fmt::Write::write_char(f, char::from(b))?;
            } else {
                write!(f, "\\x{b:02x}")?;
            }
        }
        Ok(())
    }
}

/// Shows bytes as two-digit lower-case hex, separated by single spaces: "63 67 00".
pub struct Hex<'a>(pub &'a [u8]);

impl fmt::Display for Hex<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if i != 0 {
                f.write_str(" ")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

/// Printable ASCII (space through tilde).
pub fn is_printable(b: u8) -> bool {
    (0x20..=0x7e).contains(&b)
}

/// Shows a byte count in the largest unit that divides it: "256 MiB", "639 KiB", "20 bytes".
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const KIB: u64 = 1 << 10;
        const MIB: u64 = 1 << 20;
        const GIB: u64 = 1 << 30;
        match self.0 {
            0 => write!(f, "0 bytes"),
            n if n % GIB == 0 => write!(f, "{} GiB", n / GIB),
            n if n % MIB == 0 => write!(f, "{} MiB", n / MIB),
            n if n % KIB == 0 => write!(f, "{} KiB", n / KIB),
            n => write!(f, "{n} bytes"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;
    use std::string::ToString;

    #[test]
    fn line_truncates() {
        let mut line = Line::<8>::new();
        let _ = write!(line, "0123456789");
        assert_eq!(line.as_str(), "01234567");
        assert_eq!(line.to_string(), "01234567...");
    }

    #[test]
    fn escapes_and_sizes() {
        assert_eq!(Escaped(b"a b\x01\xff").to_string(), "a b\\x01\\xff");
        assert_eq!(Size(256 << 20).to_string(), "256 MiB");
        assert_eq!(Size(4 << 30).to_string(), "4 GiB");
        assert_eq!(Size(0x9fc00).to_string(), "639 KiB");
        assert_eq!(Size(20).to_string(), "20 bytes");
    }

    #[test]
    fn hex_bytes() {
        assert_eq!(Hex(b"cg\x00\xff\x0a").to_string(), "63 67 00 ff 0a");
        assert_eq!(Hex(&[7]).to_string(), "07");
        assert_eq!(Hex(&[]).to_string(), "");
    }
}
