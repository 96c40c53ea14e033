//! The MCFG: where the PCI Express enhanced configuration space (ECAM) of the host bridge is.
//!
//! One allocation: segment 0, buses 0..=[`layout::PCI_LAST_BUS`], at [`layout::PCI_ECAM_START`]
//! (PCI Firmware Specification 3.3, section 4.1.2). The region must also be reserved where the
//! OS checks it: the DSDT's motherboard resources and, for older Linux, the e820 map.

use acpi_tables::mcfg::MCFG;

use super::{to_bytes, OEM_ID, OEM_REVISION};
use crate::layout;

/// The PCI segment group of the only host bridge (the DSDT's `_SEG`).
pub(super) const PCI_SEGMENT: u16 = 0;
/// The first bus number the ECAM region decodes (the DSDT's `_BBN`).
pub(super) const PCI_FIRST_BUS: u8 = 0;

// ECAM is 1 MiB per bus (32 devices × 8 functions × 4 KiB): the region covers exactly the buses.
const _: () =
    assert!(layout::PCI_ECAM_SIZE == ((layout::PCI_LAST_BUS - PCI_FIRST_BUS) as u64 + 1) << 20);
const _: () = assert!(layout::PCI_ECAM_START % (1 << 20) == 0);

/// The MCFG table.
pub(super) fn build() -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, *b"CGVMMCFG", OEM_REVISION);
    mcfg.add_ecam(
        layout::PCI_ECAM_START,
        PCI_SEGMENT,
        PCI_FIRST_BUS,
        layout::PCI_LAST_BUS,
    );
    to_bytes(&mcfg)
}
