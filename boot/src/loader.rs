//! Loading a kernel and an initrd into guest memory.
//!
//! Three kernel formats: an ELF vmlinux (entered in 64-bit mode, or through its PVH entry when
//! the ELF note is present) and a bzImage (entered at its 64-bit entry point). The format is
//! told by the file's magic, never by its name. Every way a file can be wrong (missing, too
//! short, not a kernel, not fitting in guest memory) is an [`LoadError`] naming the problem.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader, PvhBootCapability};
use vm_memory::{Address, ByteValued, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::layout;

/// bzImage `xloadflags` bit: the kernel has a 64-bit entry point at +0x200.
const XLF_KERNEL_64: u16 = 1 << 0;
/// Oldest boot protocol we accept for a bzImage (2.12: `xloadflags`, 64-bit entry).
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// Offset of the 64-bit entry point from the protected-mode kernel's start.
const BZIMAGE_ENTRY64_OFFSET: u64 = 0x200;

/// Why a kernel or initrd could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file could not be opened or read.
    #[error("cannot read {what} {path}: {source}")]
    Io {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// The file is neither an ELF nor a bzImage.
    #[error(
        "{0} is not a Linux kernel: neither an ELF image nor a bzImage (no 'HdrS' magic at 0x202)"
    )]
    UnknownFormat(PathBuf),
    /// The file is an ELF or a bzImage, but cannot be loaded.
    #[error("cannot load kernel {path}: {reason}")]
    BadKernel {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The initrd does not fit below the kernel's limit.
    #[error("initrd {path} ({size} bytes) does not fit in guest memory below {limit:#x} above the kernel (ends at {kernel_end:#x}); give the VM more memory")]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The highest address it may end at.
        limit: u64,
        /// Where the kernel image ends.
        kernel_end: u64,
    },
}

/// How the vCPU enters the kernel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EntryMode {
    /// 64-bit long mode at `entry`, RSI = zero page (Linux 64-bit boot protocol).
    Linux64,
    /// 32-bit protected mode, paging off, at the PVH entry, EBX = `hvm_start_info`.
    Pvh,
}

/// Where the kernel went and how to start it.
#[derive(Debug, Clone, Copy)]
pub struct LoadedKernel {
    /// First instruction the vCPU runs.
    pub entry: GuestAddress,
    /// How it is entered.
    pub mode: EntryMode,
    /// First byte past the kernel image (including its `init_size` for a bzImage).
    pub end: u64,
    /// The bzImage setup header, to copy into the zero page.
    pub setup_header: Option<setup_header>,
}

/// Where the initrd went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadedInitrd {
    /// First byte.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub size: u64,
}

fn open(what: &'static str, path: &Path) -> Result<File, LoadError> {
    let io = |source| LoadError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let f = File::open(path).map_err(io)?;
    let md = f.metadata().map_err(io)?;
    if !md.is_file() {
        return Err(io(std::io::Error::other("not a regular file")));
    }
    Ok(f)
}

/// Tells the format of a kernel file by its magic numbers.
fn is_elf(f: &mut File, path: &Path) -> Result<bool, LoadError> {
    let io = |source| LoadError::Io {
        what: "kernel",
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    f.seek(SeekFrom::Start(0)).map_err(io)?;
    let n = f.read(&mut magic).map_err(io)?;
    if n == 4 && magic == *b"\x7fELF" {
        return Ok(true);
    }
    let mut hdrs = [0u8; 4];
    let is_bz = f.seek(SeekFrom::Start(0x202)).is_ok()
        && f.read(&mut hdrs).map_err(io)? == 4
        && hdrs == *b"HdrS";
    if is_bz {
        Ok(false)
    } else {
        Err(LoadError::UnknownFormat(path.to_owned()))
    }
}

/// Loads the kernel at `path` into `mem`.
///
/// `prefer_pvh` selects the PVH entry of an ELF that has one; otherwise the 64-bit entry is
/// used (hosts that cannot run 32-bit guest code need that).
pub fn load_kernel(
    mem: &GuestMemoryMmap,
    path: &Path,
    prefer_pvh: bool,
) -> Result<LoadedKernel, LoadError> {
    let mut f = open("kernel", path)?;
    let bad = |reason: String| LoadError::BadKernel {
        path: path.to_owned(),
        reason,
    };
    let mem_end = mem.last_addr().raw_value() + 1;
    if is_elf(&mut f, path)? {
        let r = Elf::load(mem, None, &mut f, Some(GuestAddress(layout::HIMEM_START)))
            .map_err(|e| bad(format!("{e} (guest memory ends at {mem_end:#x})")))?;
        let (entry, mode) = match r.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(pvh) if prefer_pvh => (pvh, EntryMode::Pvh),
            _ => (r.kernel_load, EntryMode::Linux64),
        };
        if r.kernel_end > mem_end {
            return Err(bad(format!(
                "its image ends at {:#x}, past the end of guest memory ({mem_end:#x})",
                r.kernel_end
            )));
        }
        return Ok(LoadedKernel {
            entry,
            mode,
            end: r.kernel_end,
            setup_header: None,
        });
    }

    // A bzImage: check the header before copying anything.
    let mut hdr = setup_header::default();
    f.seek(SeekFrom::Start(0x1f1))
        .map_err(|e| bad(e.to_string()))?;
    f.read_exact(hdr.as_mut_slice())
        .map_err(|_| bad("the file ends inside the bzImage setup header".into()))?;
    let version = hdr.version;
    let xloadflags = hdr.xloadflags;
    if version < MIN_BOOT_PROTOCOL {
        return Err(bad(format!(
            "boot protocol {}.{:02} is older than 2.12, which added the 64-bit entry point",
            version >> 8,
            version & 0xff
        )));
    }
    if xloadflags & XLF_KERNEL_64 == 0 {
        return Err(bad(
            "the bzImage has no 64-bit entry point (XLF_KERNEL_64 clear)".into(),
        ));
    }
    let load_addr = GuestAddress(layout::HIMEM_START);
    let r = BzImage::load(
        mem,
        Some(load_addr),
        &mut f,
        Some(GuestAddress(layout::HIMEM_START)),
    )
    .map_err(|e| bad(format!("{e} (the file may be truncated)")))?;
    let setup = r
        .setup_header
        .ok_or_else(|| bad("no setup header".into()))?;
    // The kernel decompresses itself in place and needs init_size bytes from its load address.
    let init_size = u64::from(setup.init_size);
    let end = load_addr.raw_value() + init_size.max(r.kernel_end - load_addr.raw_value());
    if end > mem_end.min(layout::MMIO32_START) {
        return Err(bad(format!(
            "it needs memory up to {end:#x} to decompress (init_size {init_size:#x}), \
             guest RAM below 4 GiB ends at {:#x}",
            mem_end.min(layout::MMIO32_START)
        )));
    }
    Ok(LoadedKernel {
        entry: load_addr.unchecked_add(BZIMAGE_ENTRY64_OFFSET),
        mode: EntryMode::Linux64,
        end,
        setup_header: Some(setup),
    })
}

/// Loads the initrd at `path` as high as possible in low memory, page-aligned, below
/// `addr_limit` (the kernel's `initrd_addr_max`, inclusive) and above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    path: &Path,
    kernel_end: u64,
    addr_limit: u64,
) -> Result<LoadedInitrd, LoadError> {
    let mut f = open("initrd", path)?;
    let io = |source| LoadError::Io {
        what: "initrd",
        path: path.to_owned(),
        source,
    };
    let size = f.metadata().map_err(io)?.len();
    let low_ram_end = (mem.last_addr().raw_value() + 1).min(layout::MMIO32_START);
    let top = low_ram_end.min(addr_limit.saturating_add(1));
    let too_large = || LoadError::InitrdTooLarge {
        path: path.to_owned(),
        size,
        limit: top,
        kernel_end,
    };
    let start = top.checked_sub(size).ok_or_else(too_large)? & !0xfff;
    if start < kernel_end.max(layout::HIMEM_START) {
        return Err(too_large());
    }
    mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
        .map_err(|e| io(std::io::Error::other(e.to_string())))?;
    Ok(LoadedInitrd {
        addr: GuestAddress(start),
        size,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem(mib: usize) -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), mib << 20)]).unwrap()
    }

    fn tmpfile(name: &str, bytes: &[u8]) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("cgvm-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join(name);
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    /// A minimal ELF64 with one PT_LOAD segment at `paddr` holding `code`, and optionally a
    /// PT_NOTE with a XEN_ELFNOTE_PHYS32_ENTRY note.
    fn elf(paddr: u64, code: &[u8], pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let mut v = vec![0u8; 64];
        v[..4].copy_from_slice(b"\x7fELF");
        v[4] = 2; // 64-bit
        v[5] = 1; // little endian
        v[6] = 1;
        v[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        v[18..20].copy_from_slice(&62u16.to_le_bytes()); // x86-64
        v[20..24].copy_from_slice(&1u32.to_le_bytes());
        v[24..32].copy_from_slice(&paddr.to_le_bytes()); // entry
        v[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        v[52..54].copy_from_slice(&64u16.to_le_bytes());
        v[54..56].copy_from_slice(&56u16.to_le_bytes());
        v[56..58].copy_from_slice(&phnum.to_le_bytes());
        let data_off = 64 + 56 * u64::from(phnum);
        let note_off = data_off + code.len() as u64;
        let mut ph = |ty: u32, off: u64, addr: u64, len: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&ty.to_le_bytes());
            p[8..16].copy_from_slice(&off.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&len.to_le_bytes());
            p[40..48].copy_from_slice(&len.to_le_bytes());
            v.extend_from_slice(&p);
        };
        ph(1, data_off, paddr, code.len() as u64);
        let mut note = Vec::new();
        if let Some(e) = pvh_entry {
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&4u32.to_le_bytes());
            note.extend_from_slice(&0x12u32.to_le_bytes());
            note.extend_from_slice(b"Xen\0");
            note.extend_from_slice(&e.to_le_bytes());
            ph(4, note_off, 0, note.len() as u64);
        }
        v.extend_from_slice(code);
        v.extend_from_slice(&note);
        v
    }

    #[test]
    fn elf_loads_at_its_physical_address_with_64bit_entry() {
        let m = mem(32);
        let p = tmpfile("k.elf", &elf(0x100_0000, &[0xf4, 0x90, 0x90], None));
        let k = load_kernel(&m, &p, true).unwrap();
        assert_eq!(k.entry, GuestAddress(0x100_0000));
        assert_eq!(k.mode, EntryMode::Linux64);
        assert_eq!(k.end, 0x100_0003);
        assert_eq!(m.read_obj::<u8>(GuestAddress(0x100_0000)).unwrap(), 0xf4);
    }

    #[test]
    fn elf_pvh_note_selects_pvh_only_when_preferred() {
        let m = mem(32);
        let p = tmpfile("pvh.elf", &elf(0x100_0000, &[0xf4; 16], Some(0x100_0008)));
        let k = load_kernel(&m, &p, true).unwrap();
        assert_eq!(
            (k.entry, k.mode),
            (GuestAddress(0x100_0008), EntryMode::Pvh)
        );
        let k = load_kernel(&m, &p, false).unwrap();
        assert_eq!(
            (k.entry, k.mode),
            (GuestAddress(0x100_0000), EntryMode::Linux64)
        );
    }

    #[test]
    fn elf_past_guest_memory_or_below_1mib_is_refused() {
        let m = mem(16);
        let p = tmpfile("high.elf", &elf(0x100_0000, &[0x90; 8], None));
        let e = load_kernel(&m, &p, false).unwrap_err().to_string();
        assert!(e.contains("cannot load kernel"), "{e}");
        let p = tmpfile("low.elf", &elf(0x1000, &[0x90; 8], None));
        assert!(matches!(
            load_kernel(&m, &p, false),
            Err(LoadError::BadKernel { .. })
        ));
    }

    #[test]
    fn truncated_elf_is_refused() {
        let m = mem(32);
        let full = elf(0x100_0000, &[0x90; 4096], None);
        let p = tmpfile("trunc.elf", &full[..200]);
        let e = load_kernel(&m, &p, false).unwrap_err();
        assert!(matches!(e, LoadError::BadKernel { .. }), "{e}");
        let p = tmpfile("hdr.elf", &full[..40]);
        assert!(load_kernel(&m, &p, false).is_err());
    }

    fn bzimage(version: u16, xloadflags: u16, init_size: u32, payload: usize) -> Vec<u8> {
        let setup_sects = 4u8;
        let mut v = vec![0u8; (usize::from(setup_sects) + 1) * 512 + payload];
        v[0x1f1] = setup_sects;
        v[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        v[0x202..0x206].copy_from_slice(b"HdrS");
        v[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        v[0x211] = 1; // LOADED_HIGH
        v[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        v[0x22c..0x230].copy_from_slice(&0x7fff_ffffu32.to_le_bytes()); // initrd_addr_max
        v[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        v[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
        v
    }

    #[test]
    fn bzimage_enters_at_its_64bit_entry_and_reserves_init_size() {
        let m = mem(64);
        let p = tmpfile("bz", &bzimage(0x020f, 1, 0x80_0000, 4096));
        let k = load_kernel(&m, &p, true).unwrap();
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        assert_eq!(k.mode, EntryMode::Linux64);
        assert_eq!(k.end, 0x90_0000);
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.initrd_addr_max }, 0x7fff_ffff);
    }

    #[test]
    fn bzimage_without_64bit_entry_or_too_old_or_too_big_is_refused() {
        let m = mem(16);
        for (img, why) in [
            (bzimage(0x020f, 0, 0x1000, 512), "64-bit entry"),
            (bzimage(0x0206, 1, 0x1000, 512), "older than 2.12"),
            (bzimage(0x020f, 1, 0x1000_0000, 512), "to decompress"),
        ] {
            let p = tmpfile("bad-bz", &img);
            let e = load_kernel(&m, &p, false).unwrap_err().to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    #[test]
    fn non_kernels_missing_and_empty_files_are_refused_with_the_reason() {
        let m = mem(16);
        let p = tmpfile("text", b"this is not a kernel at all, it is a text file");
        assert!(matches!(
            load_kernel(&m, &p, false),
            Err(LoadError::UnknownFormat(_))
        ));
        let p = tmpfile("empty", b"");
        assert!(matches!(
            load_kernel(&m, &p, false),
            Err(LoadError::UnknownFormat(_))
        ));
        let e = load_kernel(&m, Path::new("/nonexistent/vmlinux"), false).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"), "{e}");
        let e = load_kernel(&m, Path::new("/"), false).unwrap_err();
        assert!(e.to_string().contains("not a regular file"), "{e}");
    }

    #[test]
    fn initrd_goes_page_aligned_at_the_top_of_low_memory() {
        let m = mem(64);
        let p = tmpfile("initrd", &[0x5a; 10000]);
        let i = load_initrd(&m, &p, 0x20_0000, u64::from(u32::MAX)).unwrap();
        assert_eq!(i.size, 10000);
        assert_eq!(i.addr.raw_value() & 0xfff, 0);
        assert!(i.addr.raw_value() + 10000 <= 64 << 20);
        assert!(i.addr.raw_value() + 10000 > (64 << 20) - 0x1000 - 10000);
        assert_eq!(m.read_obj::<u8>(i.addr).unwrap(), 0x5a);
        // Below the kernel's limit when that is lower than memory.
        let i = load_initrd(&m, &p, 0x20_0000, 0x1ff_ffff).unwrap();
        assert!(i.addr.raw_value() + 10000 <= 0x200_0000);
    }

    #[test]
    fn initrd_too_large_is_refused() {
        let m = mem(4);
        let p = tmpfile("big-initrd", &vec![1u8; 3 << 20]);
        let e = load_initrd(&m, &p, 0x20_0000, u64::from(u32::MAX)).unwrap_err();
        assert!(matches!(e, LoadError::InitrdTooLarge { .. }), "{e}");
        assert!(e.to_string().contains("give the VM more memory"));
    }
}
