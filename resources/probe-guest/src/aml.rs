//! Finding `\_S5_` (the soft-off sleep type) in the DSDT's AML without an AML interpreter, the
//! way small OS loaders do it: a scan for the bytes of the definition
//! `Name (\_S5_, Package () { SLP_TYPa, ... })`, which is encoded as
//!
//! ```text
//! NameOp 0x08, [RootChar '\' 0x5c], "_S5_", PackageOp 0x12, PkgLength (1..4 bytes),
//! NumElements (u8), element 0 (ZeroOp 0x00 | OneOp 0x01 | BytePrefix 0x0a u8 |
//! WordPrefix 0x0b u16), ...
//! ```
//!
//! Only the first element, SLP_TYPa, is read. The first `_S5_` after a NameOp decides: if what
//! follows is not such a package, the AML is reported as malformed rather than searched further.
//!
//! The parser ([`scan`]) is a pure function over a byte slice, unit-tested on the host. A table
//! is read in overlapping windows ([`find_s5_in`]), so that a large DSDT needs no large buffer.
//! [`pkg_length`] decodes a PkgLength; `discovery` uses it too, for its scan of `Device`
//! objects.

use core::fmt;

/// NameOp: `Name (NameString, DataRefObject)`.
const NAME_OP: u8 = 0x08;
/// RootChar: a NameString relative to the root (`\_S5_`).
const ROOT_CHAR: u8 = b'\\';
/// The name looked for.
const S5_NAME: &[u8; 4] = b"_S5_";
/// PackageOp: `Package (PkgLength, NumElements, PackageElementList)`.
const PACKAGE_OP: u8 = 0x12;
/// ZeroOp: the integer 0.
const ZERO_OP: u8 = 0x00;
/// OneOp: the integer 1.
const ONE_OP: u8 = 0x01;
/// BytePrefix: a u8 follows.
const BYTE_PREFIX: u8 = 0x0a;
/// WordPrefix: a little-endian u16 follows.
const WORD_PREFIX: u8 = 0x0b;

/// Most bytes from the NameOp through the first package element: NameOp, RootChar, the name,
/// PackageOp, a 4-byte PkgLength, NumElements, WordPrefix and its u16. Windows overlap by this.
pub const S5_MAX_LEN: usize = 1 + 1 + 4 + 1 + 4 + 1 + 3;
/// How far apart the windows of [`find_s5_in`] start.
pub const WINDOW: usize = 512;

/// Why SLP_TYPa could not be read. Offsets are of the NameOp, from the start of the AML.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AmlError {
    /// No `_S5_` after a NameOp anywhere in the AML.
    NoS5,
    /// `_S5_` is not followed by PackageOp but by this byte.
    NotPackage {
        /// Offset of the NameOp.
        offset: usize,
        /// The byte after the name.
        op: u8,
    },
    /// The AML ends inside the package (or inside what its PkgLength claims).
    Truncated {
        /// Offset of the NameOp.
        offset: usize,
    },
    /// A multi-byte PkgLength with its reserved bits 4..5 set.
    BadPkgLength {
        /// Offset of the NameOp.
        offset: usize,
        /// The PkgLength's lead byte.
        lead: u8,
    },
    /// The PkgLength is too short for NumElements and the first element.
    PackageTooShort {
        /// Offset of the NameOp.
        offset: usize,
        /// The PkgLength.
        len: u32,
    },
    /// NumElements is 0.
    EmptyPackage {
        /// Offset of the NameOp.
        offset: usize,
    },
    /// The first element is not ZeroOp, OneOp, BytePrefix or WordPrefix.
    Element {
        /// Offset of the NameOp.
        offset: usize,
        /// The element's opcode.
        op: u8,
    },
}

impl AmlError {
    /// The same error with its offset moved by `base` (for a window starting at `base`).
    fn shifted(self, base: usize) -> Self {
        let at = |offset: usize| offset.saturating_add(base);
        match self {
            Self::NoS5 => Self::NoS5,
            Self::NotPackage { offset, op } => Self::NotPackage {
                offset: at(offset),
                op,
            },
            Self::Truncated { offset } => Self::Truncated { offset: at(offset) },
            Self::BadPkgLength { offset, lead } => Self::BadPkgLength {
                offset: at(offset),
                lead,
            },
            Self::PackageTooShort { offset, len } => Self::PackageTooShort {
                offset: at(offset),
                len,
            },
            Self::EmptyPackage { offset } => Self::EmptyPackage { offset: at(offset) },
            Self::Element { offset, op } => Self::Element {
                offset: at(offset),
                op,
            },
        }
    }
}

impl fmt::Display for AmlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            Self::NoS5 => write!(f, "no Name (\\_S5_, ...) in the AML"),
            Self::NotPackage { offset, op } => write!(
                f,
                "\\_S5_ at AML offset 0x{offset:x}: not a package (opcode 0x{op:02x} after the name)"
            ),
            Self::Truncated { offset } => {
                write!(f, "\\_S5_ at AML offset 0x{offset:x}: package truncated")
            }
            Self::BadPkgLength { offset, lead } => write!(
                f,
                "\\_S5_ at AML offset 0x{offset:x}: bad PkgLength lead byte 0x{lead:02x}"
            ),
            Self::PackageTooShort { offset, len } => write!(
                f,
                "\\_S5_ at AML offset 0x{offset:x}: PkgLength {len} too short for its first element"
            ),
            Self::EmptyPackage { offset } => {
                write!(f, "\\_S5_ at AML offset 0x{offset:x}: empty package")
            }
            Self::Element { offset, op } => write!(
                f,
                "\\_S5_ at AML offset 0x{offset:x}: first element has opcode 0x{op:02x} \
                 (expected ZeroOp, OneOp, BytePrefix or WordPrefix)"
            ),
        }
    }
}

/// The `\_S5_` package as [`scan`] found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct S5Package {
    /// Offset of the NameOp.
    pub offset: usize,
    /// SLP_TYPa: the first element (a WordPrefix value whole; the caller keeps the low bits).
    pub slp_typ_a: u16,
    /// Offset just past the package, as its PkgLength says (may lie beyond `aml`).
    pub end: usize,
}

/// Looks for the first NameOp at an offset below `starts_before` that names `_S5_`, and parses
/// the package after it. `None`: there is none. Reading stops at `aml.len()`: running out of
/// bytes before the first element is [`AmlError::Truncated`]; the package's end, which may lie
/// further, is returned for the caller to check.
pub fn scan(aml: &[u8], starts_before: usize) -> Option<Result<S5Package, AmlError>> {
    aml.iter()
        .take(starts_before)
        .enumerate()
        .filter(|&(_, &b)| b == NAME_OP)
        .find_map(|(at, _)| {
            let name = if aml.get(at + 1) == Some(&ROOT_CHAR) {
                at + 2
            } else {
                at + 1
            };
            (aml.get(name..name + S5_NAME.len()) == Some(&S5_NAME[..]))
                .then(|| parse_package(aml, at, name + S5_NAME.len()))
        })
}

/// Parses the package at `aml[pkg_op..]`, for the NameOp at `offset`.
fn parse_package(aml: &[u8], offset: usize, pkg_op: usize) -> Result<S5Package, AmlError> {
    let byte = |i: usize| aml.get(i).copied().ok_or(AmlError::Truncated { offset });
    let op = byte(pkg_op)?;
    if op != PACKAGE_OP {
        return Err(AmlError::NotPackage { offset, op });
    }
    let pkg_start = pkg_op + 1;
    let (len, pkg_bytes) = pkg_length(aml, pkg_start).map_err(|e| match e {
        PkgLengthError::Truncated => AmlError::Truncated { offset },
        PkgLengthError::Reserved(lead) => AmlError::BadPkgLength { offset, lead },
    })?;
    // The PkgLength counts itself, NumElements and the elements.
    let end = pkg_start + len as usize;
    let num_elements = pkg_start + pkg_bytes;
    if byte(num_elements)? == 0 {
        return Err(AmlError::EmptyPackage { offset });
    }
    let element = num_elements + 1;
    let (slp_typ_a, element_end) = match byte(element)? {
        ZERO_OP => (0, element + 1),
        ONE_OP => (1, element + 1),
        BYTE_PREFIX => (u16::from(byte(element + 1)?), element + 2),
        WORD_PREFIX => (
            u16::from_le_bytes([byte(element + 1)?, byte(element + 2)?]),
            element + 3,
        ),
        op => return Err(AmlError::Element { offset, op }),
    };
    if element_end > end {
        return Err(AmlError::PackageTooShort { offset, len });
    }
    Ok(S5Package {
        offset,
        slp_typ_a,
        end,
    })
}

/// Why a PkgLength could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PkgLengthError {
    /// The AML ends inside it.
    Truncated,
    /// A multi-byte PkgLength with its reserved bits 4..5 set; this is the lead byte.
    Reserved(u8),
}

/// Reads the PkgLength at `aml[at..]`: its value (which counts the PkgLength's own bytes and
/// what follows it in the package) and how many bytes it takes (1..=4).
///
/// Bits 6..7 of the lead byte count the bytes that follow. Alone, the lead byte's bits 0..5 are
/// the length; with followers, its bits 0..3 are the low nibble (bits 4..5 reserved) and each
/// follower adds 8 more bits.
pub fn pkg_length(aml: &[u8], at: usize) -> Result<(u32, usize), PkgLengthError> {
    let byte = |i: usize| aml.get(i).copied().ok_or(PkgLengthError::Truncated);
    let lead = byte(at)?;
    let followers = usize::from(lead >> 6);
    if followers == 0 {
        return Ok((u32::from(lead & 0x3f), 1));
    }
    if lead & 0x30 != 0 {
        return Err(PkgLengthError::Reserved(lead));
    }
    let mut len = u32::from(lead & 0x0f);
    for k in 0..followers {
        len |= u32::from(byte(at + 1 + k)?) << (4 + 8 * k);
    }
    Ok((len, 1 + followers))
}

/// Finds SLP_TYPa in `len` bytes of AML that `read(offset, buf)` fills `buf` from, a window of
/// up to [`WINDOW`] + [`S5_MAX_LEN`] bytes at a time (so that a definition that starts in one
/// window is whole in it). The package must end within the AML.
pub fn find_s5_in<E: From<AmlError>>(
    len: usize,
    mut read: impl FnMut(usize, &mut [u8]) -> Result<(), E>,
) -> Result<u16, E> {
    let mut buf = [0u8; WINDOW + S5_MAX_LEN];
    let mut base = 0;
    while base < len {
        let n = (len - base).min(buf.len());
        read(base, &mut buf[..n])?;
        if let Some(found) = scan(&buf[..n], WINDOW) {
            let package = found.map_err(|e| e.shifted(base))?;
            let offset = base + package.offset;
            if base.saturating_add(package.end) > len {
                return Err(AmlError::Truncated { offset }.into());
            }
            return Ok(package.slp_typ_a);
        }
        base += WINDOW;
    }
    Err(AmlError::NoS5.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::vec::Vec;

    /// Finds SLP_TYPa in `aml`, window by window as from a table in memory.
    fn find_s5(aml: &[u8]) -> Result<u16, AmlError> {
        find_s5_in(aml.len(), |at, buf: &mut [u8]| {
            buf.copy_from_slice(&aml[at..at + buf.len()]);
            Ok(())
        })
    }

    /// `Name (\_S5_, Package (4) { first, 0, 0, 0 })` as iasl and the `acpi_tables` crate emit
    /// it, `first` being the first element's encoding.
    fn s5(root: bool, first: &[u8]) -> Vec<u8> {
        let mut v = std::vec![NAME_OP];
        if root {
            v.push(ROOT_CHAR);
        }
        v.extend_from_slice(b"_S5_");
        v.push(PACKAGE_OP);
        let len = 1 + 1 + first.len() + 3;
        v.push(len as u8);
        v.push(4);
        v.extend_from_slice(first);
        v.extend_from_slice(&[ZERO_OP, ZERO_OP, ZERO_OP]);
        v
    }

    /// Some unrelated AML around `inner`: a `Scope (\_SB) { Name (_S4_, 1) ... }` prefix and a
    /// trailing `Name (XS5_, ...)` whose bytes contain "_S5_" without a NameOp right before.
    fn wrapped(inner: &[u8]) -> Vec<u8> {
        let mut v = std::vec![0x10, 0x0a, b'\\', b'_', b'S', b'B', b'_', NAME_OP];
        v.extend_from_slice(b"_S4_\x01");
        v.extend_from_slice(b"X_S5_\x01");
        v.extend_from_slice(inner);
        v.extend_from_slice(&[NAME_OP, b'F', b'O', b'O', b'_', ONE_OP]);
        v
    }

    #[test]
    fn reads_each_integer_form() {
        for (first, want) in [
            (&[ZERO_OP][..], 0),
            (&[ONE_OP][..], 1),
            (&[BYTE_PREFIX, 5][..], 5),
            (&[WORD_PREFIX, 0x07, 0x01][..], 0x107),
        ] {
            for root in [false, true] {
                assert_eq!(find_s5(&wrapped(&s5(root, first))), Ok(want), "{first:?}");
            }
        }
    }

    #[test]
    fn reads_a_two_byte_pkg_length() {
        // Package with 0x40 bytes of elements: PkgLength 0x43 needs two bytes (0x43, 0x04).
        let mut aml = std::vec![NAME_OP, b'\\'];
        aml.extend_from_slice(b"_S5_");
        aml.push(PACKAGE_OP);
        let len: u32 = 2 + 1 + 0x40;
        aml.extend_from_slice(&[0x40 | (len & 0xf) as u8, (len >> 4) as u8, 0x40]);
        aml.extend_from_slice(&[BYTE_PREFIX, 3]);
        aml.extend_from_slice(&[ZERO_OP; 0x3e]);
        assert_eq!(find_s5(&aml), Ok(3));
        assert_eq!(
            scan(&aml, aml.len()).map(|r| r.map(|p| p.end)),
            Some(Ok(aml.len()))
        );
        // Reserved bits 4..5 of a multi-byte lead byte.
        aml[7] |= 0x10;
        assert_eq!(
            find_s5(&aml),
            Err(AmlError::BadPkgLength {
                offset: 0,
                lead: aml[7]
            })
        );
    }

    #[test]
    fn rejects_truncated_and_malformed_packages() {
        let good = s5(true, &[BYTE_PREFIX, 5]);
        // Cut anywhere inside the package: truncated.
        for cut in 6..good.len() {
            assert_eq!(
                find_s5(&good[..cut]),
                Err(AmlError::Truncated { offset: 0 }),
                "cut at {cut}"
            );
        }
        let mut aml = good.clone();
        aml[8] = 0; // NumElements
        assert_eq!(find_s5(&aml), Err(AmlError::EmptyPackage { offset: 0 }));
        let mut aml = good.clone();
        aml[9] = 0x0c; // DWordPrefix: not read
        assert_eq!(
            find_s5(&aml),
            Err(AmlError::Element {
                offset: 0,
                op: 0x0c
            })
        );
        let mut aml = good.clone();
        aml[7] = 2; // PkgLength covers only itself and NumElements
        assert_eq!(
            find_s5(&aml),
            Err(AmlError::PackageTooShort { offset: 0, len: 2 })
        );
        let mut aml = good;
        aml[6] = 0x0a; // Name (\_S5_, 5): not a package
        let wrapped = wrapped(&aml);
        let offset = wrapped.len() - aml.len() - 6;
        assert_eq!(
            find_s5(&wrapped),
            Err(AmlError::NotPackage { offset, op: 0x0a })
        );
    }

    #[test]
    fn no_s5_at_all() {
        assert_eq!(find_s5(&[]), Err(AmlError::NoS5));
        assert_eq!(find_s5(&wrapped(&[])), Err(AmlError::NoS5));
        // "_S5_" without a NameOp before it, and a NameOp at the very end.
        assert_eq!(
            find_s5(b"\x10_S5_\x12\x04\x01\x0a\x05\x08"),
            Err(AmlError::NoS5)
        );
    }

    #[test]
    fn finds_s5_across_window_boundaries() {
        let def = s5(true, &[BYTE_PREFIX, 5]);
        for start in [0, WINDOW - 8, WINDOW - 1, WINDOW, 2 * WINDOW + 3] {
            let mut aml = std::vec![0xa3u8; start]; // NoopOp padding
            aml.extend_from_slice(&def);
            assert_eq!(find_s5(&aml), Ok(5), "at {start}");
            aml.extend_from_slice(&[0xa3; 40]);
            assert_eq!(find_s5(&aml), Ok(5), "at {start}, with a tail");
            // Truncated at the end of a later window: the offset is the table's.
            let cut = start + def.len() - 1;
            assert_eq!(
                find_s5(&aml[..cut]),
                Err(AmlError::Truncated { offset: start }),
                "at {start}, cut"
            );
        }
    }

    #[test]
    fn package_end_beyond_the_aml_is_truncated() {
        let mut aml = s5(false, &[ONE_OP]);
        aml[6] = 0x30; // PkgLength 48: runs past the AML, though element 0 is there
        assert_eq!(find_s5(&aml), Err(AmlError::Truncated { offset: 0 }));
    }
}
