//! Everything a guest sees before its first instruction: the memory layout, the kernel and
//! initrd in memory, the Linux boot parameters, the ACPI tables and the vCPU register values.
//!
//! Nothing here touches KVM file descriptors or threads: the `vmm` crate applies the values
//! computed here.

#![deny(missing_docs)]

pub mod acpi;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod params;
pub mod regs;
