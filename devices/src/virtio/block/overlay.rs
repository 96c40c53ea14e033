//! The sparse overlay of an ephemeral disk, used where the overlay cannot be a reflink of
//! the image: a file of the image's size, with a [`BlockMap`] of which
//! [`OVERLAY_BLOCK_SIZE`] blocks the guest has written. Reads take written blocks from the
//! overlay and the rest from the image; a write that covers only part of a block not yet
//! written first copies that block from the image, so that a written block is always whole
//! in the overlay. DISCARD and WRITE_ZEROES zero the range in the overlay and mark it
//! written. The image is never written; the overlay's data is thrown away with its
//! descriptor.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use super::fileio;
use super::request::{sub_bufs, HostBuf};

/// Granularity of the overlay's block map: 4 KiB, the page and file-system block size, so
/// that guest file systems (4 KiB blocks) rarely need a read-modify-write, and the map stays
/// small (2 MiB for a 64 GiB image).
pub const OVERLAY_BLOCK_SIZE: u64 = 4096;

/// One bit per block: set once the guest wrote (or zeroed) the block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockMap {
    bits: Vec<u64>,
    blocks: u64,
}

impl BlockMap {
    /// A map of `blocks` blocks, none written.
    pub fn new(blocks: u64) -> Self {
        Self {
            bits: vec![0; blocks.div_ceil(64) as usize],
            blocks,
        }
    }

    /// The number of blocks.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Whether block `b` was written; blocks past the end never were.
    pub fn is_written(&self, b: u64) -> bool {
        b < self.blocks && self.bits[(b / 64) as usize] & (1 << (b % 64)) != 0
    }

    /// Marks blocks `first..end` written (clamped to the map).
    pub fn mark(&mut self, first: u64, end: u64) {
        for b in first..end.min(self.blocks) {
            self.bits[(b / 64) as usize] |= 1 << (b % 64);
        }
    }

    /// How many blocks are written.
    #[cfg(test)]
    pub fn written(&self) -> u64 {
        self.bits.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// The runs of blocks within `first..end` that are all written or all not, in order:
    /// `(first, end, written)`.
    pub fn runs(&self, first: u64, end: u64) -> Vec<(u64, u64, bool)> {
        let mut out: Vec<(u64, u64, bool)> = Vec::new();
        for b in first..end {
            let w = self.is_written(b);
            match out.last_mut() {
                Some(run) if run.2 == w => run.1 = b + 1,
                _ => out.push((b, b + 1, w)),
            }
        }
        out
    }
}

/// An image read through a sparse overlay.
#[derive(Debug)]
pub struct SparseOverlay {
    image: File,
    overlay: File,
    size: u64,
    map: BlockMap,
}

impl SparseOverlay {
    /// An overlay over `image` (`size` bytes); `overlay` is an empty writable file, which
    /// this sizes to the image.
    pub fn new(image: File, overlay: File, size: u64) -> io::Result<Self> {
        overlay.set_len(size)?;
        Ok(Self {
            image,
            overlay,
            size,
            map: BlockMap::new(size.div_ceil(OVERLAY_BLOCK_SIZE)),
        })
    }

    /// The block map.
    #[cfg(test)]
    pub fn map(&self) -> &BlockMap {
        &self.map
    }

    /// Reads `offset..offset + len(bufs)` into `bufs`, each block from where it lives.
    pub fn read(&self, offset: u64, bufs: &[HostBuf]) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / OVERLAY_BLOCK_SIZE;
        let last = end.div_ceil(OVERLAY_BLOCK_SIZE);
        for (b0, b1, written) in self.map.runs(first, last) {
            let from = (b0 * OVERLAY_BLOCK_SIZE).max(offset);
            let to = (b1 * OVERLAY_BLOCK_SIZE).min(end);
            let part = sub_bufs(bufs, (from - offset) as usize, (to - from) as usize);
            let file = if written { &self.overlay } else { &self.image };
            fileio::read_exact_at(file.as_raw_fd(), from, &part)?;
        }
        Ok(())
    }

    /// Copies block `b` from the image into the overlay unless it is there already.
    fn fill_block(&mut self, b: u64) -> io::Result<()> {
        if self.map.is_written(b) || b >= self.map.blocks() {
            return Ok(());
        }
        let start = b * OVERLAY_BLOCK_SIZE;
        let len = OVERLAY_BLOCK_SIZE.min(self.size - start) as usize;
        let mut buf = vec![0u8; len];
        // Past the image's end (it shrank under us) the block reads as zeros.
        let _ = fileio::pread_full(self.image.as_raw_fd(), start, &mut buf)?;
        fileio::pwrite_all(self.overlay.as_raw_fd(), start, &buf)?;
        self.map.mark(b, b + 1);
        Ok(())
    }

    /// Makes the blocks at either end of `offset..end` whole in the overlay when the range
    /// covers them only partly.
    fn fill_edges(&mut self, offset: u64, end: u64) -> io::Result<()> {
        if offset % OVERLAY_BLOCK_SIZE != 0 {
            self.fill_block(offset / OVERLAY_BLOCK_SIZE)?;
        }
        if end % OVERLAY_BLOCK_SIZE != 0 {
            self.fill_block(end / OVERLAY_BLOCK_SIZE)?;
        }
        Ok(())
    }

    fn mark_range(&mut self, offset: u64, end: u64) {
        self.map.mark(
            offset / OVERLAY_BLOCK_SIZE,
            end.div_ceil(OVERLAY_BLOCK_SIZE),
        );
    }

    /// Writes `bufs` at `offset` into the overlay.
    pub fn write(&mut self, offset: u64, bufs: &[HostBuf]) -> io::Result<()> {
        let len: u64 = bufs.iter().map(|b| b.len() as u64).sum();
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        self.fill_edges(offset, end)?;
        fileio::write_all_at(self.overlay.as_raw_fd(), offset, bufs)?;
        self.mark_range(offset, end);
        Ok(())
    }

    /// Zeroes `offset..offset + len` (DISCARD and WRITE_ZEROES alike: a discarded range
    /// reads as zeros).
    pub fn zero(&mut self, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        self.fill_edges(offset, end)?;
        fileio::zero_range(self.overlay.as_raw_fd(), offset, len, true)?;
        self.mark_range(offset, end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::block::disk::anonymous_file;
    use std::io::{Read, Seek, SeekFrom, Write};

    #[test]
    fn block_map_marks_and_reports_runs() {
        let mut m = BlockMap::new(130);
        assert_eq!(m.written(), 0);
        assert_eq!(m.runs(0, 130), vec![(0, 130, false)]);
        m.mark(3, 5);
        m.mark(63, 66);
        m.mark(129, 200); // clamped
        assert!(m.is_written(3) && m.is_written(4) && !m.is_written(5));
        assert!(m.is_written(63) && m.is_written(64) && m.is_written(65));
        assert!(m.is_written(129) && !m.is_written(130) && !m.is_written(u64::MAX));
        assert_eq!(m.written(), 2 + 3 + 1);
        assert_eq!(
            m.runs(2, 67),
            vec![
                (2, 3, false),
                (3, 5, true),
                (5, 63, false),
                (63, 66, true),
                (66, 67, false)
            ]
        );
        assert_eq!(m.runs(3, 4), vec![(3, 4, true)]);
        assert_eq!(m.runs(7, 7), vec![]);
    }

    /// An image of `size` bytes with a recognisable pattern, and its bytes.
    fn image(size: usize) -> (File, Vec<u8>) {
        let bytes: Vec<u8> = (0..size).map(|i| (i / 512 * 7 + i % 251) as u8).collect();
        let mut f = anonymous_file(&std::env::temp_dir()).unwrap();
        f.write_all(&bytes).unwrap();
        (f, bytes)
    }

    fn file_bytes(f: &File) -> Vec<u8> {
        let mut f = f.try_clone().unwrap();
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    }

    fn overlay(size: usize) -> (SparseOverlay, Vec<u8>, File) {
        let (img, bytes) = image(size);
        let img_copy = img.try_clone().unwrap();
        let o = SparseOverlay::new(
            img,
            anonymous_file(&std::env::temp_dir()).unwrap(),
            size as u64,
        )
        .unwrap();
        (o, bytes, img_copy)
    }

    fn read(o: &SparseOverlay, offset: usize, len: usize) -> Vec<u8> {
        // Two host buffers, to cross buffer boundaries too.
        let mut a = vec![0xeeu8; len / 3];
        let mut b = vec![0xeeu8; len - len / 3];
        o.read(
            offset as u64,
            &[HostBuf::from_slice(&mut a), HostBuf::from_slice(&mut b)],
        )
        .unwrap();
        a.extend_from_slice(&b);
        a
    }

    fn write(o: &mut SparseOverlay, offset: usize, data: &[u8]) {
        let mut d = data.to_vec();
        o.write(offset as u64, &[HostBuf::from_slice(&mut d)])
            .unwrap();
    }

    #[test]
    fn partial_block_writes_copy_the_rest_of_the_block_from_the_image() {
        let (mut o, mut model, img) = overlay(64 << 10);
        // 512 bytes in the middle of block 1: the block is copied, then patched.
        write(&mut o, 4096 + 1024, &[0xaa; 512]);
        model[4096 + 1024..4096 + 1536].fill(0xaa);
        assert_eq!(
            o.map().runs(0, 3),
            vec![(0, 1, false), (1, 2, true), (2, 3, false)]
        );
        assert_eq!(read(&o, 4096, 4096), model[4096..8192]);
        // The overlay holds the whole block, the image is untouched.
        assert_eq!(file_bytes(&o.overlay)[4096..8192], model[4096..8192]);
        assert_eq!(file_bytes(&img), image(64 << 10).1);
    }

    #[test]
    fn writes_spanning_blocks_mark_every_block_they_touch() {
        let (mut o, mut model, _img) = overlay(64 << 10);
        // From the middle of block 2 to the middle of block 5.
        let (off, len) = (2 * 4096 + 512, 3 * 4096);
        write(&mut o, off, &vec![0x55; len]);
        model[off..off + len].fill(0x55);
        assert_eq!(
            o.map().runs(0, 16),
            vec![(0, 2, false), (2, 6, true), (6, 16, false)]
        );
        assert_eq!(o.map().written(), 4);
        // Reads mixing image and overlay blocks, at odd sector offsets.
        assert_eq!(read(&o, 0, 64 << 10), model);
        assert_eq!(
            read(&o, 4096 + 512, 6 * 4096),
            model[4096 + 512..7 * 4096 + 512]
        );
        // Whole-block writes need no copy and leave the neighbours alone.
        write(&mut o, 8 * 4096, &[0x11; 8192]);
        model[8 * 4096..10 * 4096].fill(0x11);
        assert_eq!(read(&o, 0, 64 << 10), model);
        assert!(!o.map().is_written(7) && !o.map().is_written(10));
    }

    #[test]
    fn zeroing_marks_blocks_written_and_reads_zeros() {
        let (mut o, mut model, _img) = overlay(64 << 10);
        o.zero(4096 - 512, 4096 + 1024).unwrap();
        model[4096 - 512..2 * 4096 + 512].fill(0);
        assert_eq!(read(&o, 0, 64 << 10), model);
        assert_eq!(o.map().runs(0, 4), vec![(0, 3, true), (3, 4, false)]);
    }

    #[test]
    fn a_last_partial_block_is_handled() {
        // 10 sectors + 100 bytes: the last block is partial and so is the last sector.
        let size = 5 * 1024 + 100;
        let (mut o, mut model, _img) = overlay(size);
        write(&mut o, 4608, &[0x77; 512]);
        model[4608..5120].fill(0x77);
        assert_eq!(read(&o, 0, 5120), model[..5120]);
        assert_eq!(o.map().blocks(), 2);
    }

    #[test]
    fn random_operations_match_a_model() {
        let size = 256 << 10;
        let (mut o, mut model, img) = overlay(size);
        let original = model.clone();
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: usize| {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            (seed % n as u64) as usize
        };
        for i in 0..300 {
            let sectors = 1 + next(24);
            let off = next(size / 512 - sectors) * 512;
            let len = sectors * 512;
            match next(3) {
                0 => {
                    let data: Vec<u8> = (0..len).map(|j| (i * 31 + j) as u8).collect();
                    write(&mut o, off, &data);
                    model[off..off + len].copy_from_slice(&data);
                }
                1 => {
                    o.zero(off as u64, len as u64).unwrap();
                    model[off..off + len].fill(0);
                }
                _ => assert_eq!(read(&o, off, len), model[off..off + len], "step {i}"),
            }
        }
        assert_eq!(read(&o, 0, size), model);
        assert_eq!(file_bytes(&img), original, "the image is never written");
    }
}
