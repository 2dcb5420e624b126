//! The paravirtual block device of the VMM: a vCPU fills the block request of its vCPU
//! record (`VCPU_BLK_*` in `abi.h`) and kicks it with an `out` to [`PORT_BLOCK`]; the
//! VMM validates the request against the disks and guest RAM, performs it through the
//! block layer ([`crate::disk::block`]: write limit, dirty bitmap, mirror) and writes a
//! `BLK_STATUS_*` back before the `out` returns. A bad request is an error status and
//! touches neither disk nor RAM.

use std::sync::Arc;

use crate::disk::block::Disk;
use crate::disk::limiter::WriteLimiter;
use crate::guest::kvm::abi::*;
use crate::guest::kvm::error::Result;
use crate::guest::kvm::memory::GuestRam;

/// What a block request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockOp {
    /// Disk to guest RAM.
    Read,
    /// Guest RAM to disk, through the block layer.
    Write,
}

/// A validated block request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BlockRequest {
    /// Read or write.
    pub op: BlockOp,
    /// Disk index.
    pub disk: usize,
    /// Byte offset on the disk.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
    /// Guest-physical address of the data.
    pub buffer: u64,
}

/// Why a block request is refused or failed; each is one `BLK_STATUS_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BlockRequestError {
    /// Not a `BLK_OP_*`.
    #[error("unknown block operation {0}")]
    BadOp(u64),
    /// No such disk.
    #[error("disk {disk}: the guest has {disks} disk(s)")]
    BadDisk {
        /// Disk index asked for.
        disk: u64,
        /// Disks the guest has.
        disks: usize,
    },
    /// Zero or more than [`BLK_MAX_LEN`] bytes.
    #[error("length {0}: must be 1 to {BLK_MAX_LEN} bytes")]
    BadLength(u64),
    /// Past the disk's end.
    #[error("{len} bytes at {offset} are past the disk's end ({size} bytes)")]
    BadRange {
        /// First byte.
        offset: u64,
        /// Length.
        len: u64,
        /// Disk size.
        size: u64,
    },
    /// The buffer is not inside guest RAM.
    #[error("a buffer of {len} bytes at {gpa:#x} is outside guest RAM ({ram} bytes)")]
    BadBuffer {
        /// Its guest-physical address.
        gpa: u64,
        /// Its length.
        len: u64,
        /// RAM size.
        ram: u64,
    },
    /// The host's read or write failed.
    #[error("the host's disk I/O failed")]
    Io,
}

impl BlockRequestError {
    /// The status the guest reads.
    pub fn status(self) -> u64 {
        match self {
            BlockRequestError::BadOp(_) => BLK_STATUS_BAD_OP,
            BlockRequestError::BadDisk { .. } => BLK_STATUS_BAD_DISK,
            BlockRequestError::BadLength(_) => BLK_STATUS_BAD_LENGTH,
            BlockRequestError::BadRange { .. } => BLK_STATUS_BAD_RANGE,
            BlockRequestError::BadBuffer { .. } => BLK_STATUS_BAD_BUFFER,
            BlockRequestError::Io => BLK_STATUS_IO_ERROR,
        }
    }
}

/// A `BLK_STATUS_*` by name (for error messages).
pub fn status_name(status: u64) -> &'static str {
    match status {
        BLK_STATUS_OK => "ok",
        BLK_STATUS_PENDING => "pending",
        BLK_STATUS_BAD_OP => "bad operation",
        BLK_STATUS_BAD_DISK => "bad disk",
        BLK_STATUS_BAD_LENGTH => "bad length",
        BLK_STATUS_BAD_RANGE => "past the disk's end",
        BLK_STATUS_BAD_BUFFER => "buffer outside RAM",
        BLK_STATUS_IO_ERROR => "I/O error",
        _ => "unknown",
    }
}

impl BlockRequest {
    /// Validates the raw request fields (`op, disk, offset, len, buffer`) against disks of
    /// `disk_sizes` and `ram_size` bytes of guest RAM.
    pub fn parse(
        raw: [u64; 5],
        disk_sizes: &[u64],
        ram_size: u64,
    ) -> std::result::Result<BlockRequest, BlockRequestError> {
        let [op, disk, offset, len, buffer] = raw;
        let op = match op {
            BLK_OP_READ => BlockOp::Read,
            BLK_OP_WRITE => BlockOp::Write,
            other => return Err(BlockRequestError::BadOp(other)),
        };
        let size = usize::try_from(disk)
            .ok()
            .and_then(|d| disk_sizes.get(d))
            .copied()
            .ok_or(BlockRequestError::BadDisk {
                disk,
                disks: disk_sizes.len(),
            })?;
        if len == 0 || len > BLK_MAX_LEN {
            return Err(BlockRequestError::BadLength(len));
        }
        if offset.checked_add(len).is_none_or(|end| end > size) {
            return Err(BlockRequestError::BadRange { offset, len, size });
        }
        if buffer.checked_add(len).is_none_or(|end| end > ram_size) {
            return Err(BlockRequestError::BadBuffer {
                gpa: buffer,
                len,
                ram: ram_size,
            });
        }
        Ok(BlockRequest {
            op,
            disk: disk as usize,
            offset,
            len,
            buffer,
        })
    }
}

/// The device: the guest's disks, its RAM, and the pacing of its writes at the disk
/// workload's I/O rate (the device's throughput; the sender's write limit is the block
/// layer's own).
pub struct BlockDevice {
    ram: Arc<GuestRam>,
    disks: Vec<Disk>,
    io_rate: u64,
    pacing: WriteLimiter,
    buf: Vec<u8>,
}

impl std::fmt::Debug for BlockDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("disks", &self.disks.len())
            .field("io_rate", &self.io_rate)
            .finish()
    }
}

impl BlockDevice {
    /// The device of a guest on `ram` with `disks` (none: every request is
    /// `BLK_STATUS_BAD_DISK`), whose writes take at most `io_rate` bytes/s (0: unpaced).
    pub fn new(ram: Arc<GuestRam>, disks: Vec<Disk>, io_rate: u64) -> BlockDevice {
        BlockDevice {
            ram,
            disks,
            io_rate,
            pacing: WriteLimiter::new(),
            buf: Vec::new(),
        }
    }

    /// The disks.
    pub fn disks(&self) -> &[Disk] {
        &self.disks
    }

    /// The status in vCPU `vcpu`'s request record.
    pub fn request_status(&self, vcpu: u64) -> Result<u64> {
        self.ram
            .load_u64(VCPU_AREA_GPA + vcpu * VCPU_AREA_STRIDE + VCPU_BLK_STATUS)
    }

    /// Performs vCPU `vcpu`'s request and writes its status into the record; returns the
    /// status. `Err` only if the record itself cannot be read or written.
    pub fn handle(&mut self, vcpu: u64) -> Result<u64> {
        let record = VCPU_AREA_GPA + vcpu * VCPU_AREA_STRIDE;
        let mut raw = [0u64; 5];
        for (v, field) in raw.iter_mut().zip([
            VCPU_BLK_OP,
            VCPU_BLK_DISK,
            VCPU_BLK_OFFSET,
            VCPU_BLK_LEN,
            VCPU_BLK_BUFFER,
        ]) {
            *v = self.ram.load_u64(record + field)?;
        }
        let sizes: Vec<u64> = self.disks.iter().map(Disk::size).collect();
        let status = match BlockRequest::parse(raw, &sizes, self.ram.size())
            .and_then(|r| self.perform(&r))
        {
            Ok(()) => BLK_STATUS_OK,
            Err(e) => e.status(),
        };
        self.ram.write_u64(record + VCPU_BLK_STATUS, status)?;
        Ok(status)
    }

    /// Performs a valid request.
    fn perform(&mut self, r: &BlockRequest) -> std::result::Result<(), BlockRequestError> {
        self.buf.resize(r.len as usize, 0);
        let disk = &mut self.disks[r.disk];
        match r.op {
            BlockOp::Write => {
                self.ram
                    .read(r.buffer, &mut self.buf)
                    .map_err(|_| BlockRequestError::Io)?;
                let rate = self.io_rate;
                self.pacing.acquire(r.len, || rate);
                disk.write_at(r.offset, &self.buf)
                    .map_err(|_| BlockRequestError::Io)
            }
            BlockOp::Read => {
                disk.read_at(r.offset, &mut self.buf)
                    .map_err(|_| BlockRequestError::Io)?;
                self.ram
                    .write(r.buffer, &self.buf)
                    .map_err(|_| BlockRequestError::Io)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::disk::bitmap::{bitmap_path, DirtyBitmap};

    const RAM: u64 = 4 << 20;
    const DISK: u64 = 1 << 20;

    fn tmp(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("vmstream-kvmblk-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir.join("disk.img")
    }

    /// A device on 4 MiB of RAM with one 1 MiB disk at `path` (4 KiB granules).
    fn device(path: &Path) -> BlockDevice {
        let ram = Arc::new(GuestRam::memfd(RAM).unwrap());
        let disk = Disk::open(path, Some(DISK), Some(4096)).unwrap();
        BlockDevice::new(ram, vec![disk], 0)
    }

    /// Fills vCPU 1's request record.
    fn request(dev: &BlockDevice, op: u64, disk: u64, offset: u64, len: u64, buffer: u64) {
        let rec = VCPU_AREA_GPA + VCPU_AREA_STRIDE;
        for (field, v) in [
            (VCPU_BLK_OP, op),
            (VCPU_BLK_DISK, disk),
            (VCPU_BLK_OFFSET, offset),
            (VCPU_BLK_LEN, len),
            (VCPU_BLK_BUFFER, buffer),
            (VCPU_BLK_STATUS, BLK_STATUS_PENDING),
        ] {
            dev.ram.write_u64(rec + field, v).unwrap();
        }
    }

    fn status(dev: &BlockDevice) -> u64 {
        dev.ram
            .read_u64(VCPU_AREA_GPA + VCPU_AREA_STRIDE + VCPU_BLK_STATUS)
            .unwrap()
    }

    #[test]
    fn a_write_goes_through_the_block_layer_and_a_read_comes_back() {
        let path = tmp("ok");
        let mut dev = device(&path);
        dev.ram.write(0x30_0000, &[7u8; 8192]).unwrap();
        request(&dev, BLK_OP_WRITE, 0, 16384, 8192, 0x30_0000);
        assert_eq!(dev.handle(1).unwrap(), BLK_STATUS_OK);
        assert_eq!(status(&dev), BLK_STATUS_OK);
        let file = std::fs::read(&path).unwrap();
        assert!(file[16384..24576].iter().all(|&b| b == 7));
        assert!(file[..16384].iter().all(|&b| b == 0));
        // The block layer marked the granules written, as the sender sees them.
        let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
        assert_eq!(sender.take_all(), vec![4..6]);
        request(&dev, BLK_OP_READ, 0, 16384 + 4096, 4096, 0x20_0000);
        assert_eq!(dev.handle(1).unwrap(), BLK_STATUS_OK);
        let mut back = [0u8; 4096];
        dev.ram.read(0x20_0000, &mut back).unwrap();
        assert_eq!(back, [7u8; 4096]);
    }

    #[test]
    fn bad_requests_get_an_error_status_and_write_nothing() {
        let path = tmp("bad");
        let mut dev = device(&path);
        dev.ram.write(0x30_0000, &[9u8; 8192]).unwrap();
        let cases = [
            // Offset past the disk, and a write running over its end.
            (BLK_OP_WRITE, 0, DISK, 4096, 0x30_0000, BLK_STATUS_BAD_RANGE),
            (
                BLK_OP_WRITE,
                0,
                DISK - 4096,
                8192,
                0x30_0000,
                BLK_STATUS_BAD_RANGE,
            ),
            (
                BLK_OP_WRITE,
                0,
                u64::MAX - 10,
                4096,
                0x30_0000,
                BLK_STATUS_BAD_RANGE,
            ),
            // A buffer outside RAM, or wrapping around.
            (BLK_OP_WRITE, 0, 0, 4096, RAM - 100, BLK_STATUS_BAD_BUFFER),
            (
                BLK_OP_WRITE,
                0,
                0,
                4096,
                u64::MAX - 100,
                BLK_STATUS_BAD_BUFFER,
            ),
            (BLK_OP_READ, 0, 0, 4096, RAM, BLK_STATUS_BAD_BUFFER),
            // No such disk.
            (BLK_OP_WRITE, 1, 0, 4096, 0x30_0000, BLK_STATUS_BAD_DISK),
            (
                BLK_OP_WRITE,
                u64::MAX,
                0,
                4096,
                0x30_0000,
                BLK_STATUS_BAD_DISK,
            ),
            // Empty or oversized.
            (BLK_OP_WRITE, 0, 0, 0, 0x30_0000, BLK_STATUS_BAD_LENGTH),
            (
                BLK_OP_WRITE,
                0,
                0,
                BLK_MAX_LEN + 4096,
                0x10_0000,
                BLK_STATUS_BAD_LENGTH,
            ),
            // Neither read nor write.
            (7, 0, 0, 4096, 0x30_0000, BLK_STATUS_BAD_OP),
        ];
        let before = dev.ram.read_u64(RAM - 8).unwrap();
        for (op, disk, offset, len, buffer, want) in cases {
            request(&dev, op, disk, offset, len, buffer);
            assert_eq!(
                dev.handle(1).unwrap(),
                want,
                "{op} {disk} {offset} {len} {buffer:#x}"
            );
            assert_eq!(status(&dev), want);
        }
        assert!(std::fs::read(&path).unwrap().iter().all(|&b| b == 0));
        let sender = DirtyBitmap::open(&bitmap_path(&path)).unwrap();
        assert!(sender.take_all().is_empty());
        assert_eq!(sender.writes(), 0);
        assert_eq!(dev.ram.read_u64(RAM - 8).unwrap(), before);
        // A guest without disks: every request names a disk it does not have.
        let mut none = BlockDevice::new(Arc::clone(&dev.ram), Vec::new(), 0);
        request(&none, BLK_OP_WRITE, 0, 0, 4096, 0x30_0000);
        assert_eq!(none.handle(1).unwrap(), BLK_STATUS_BAD_DISK);
        assert!(BlockRequestError::BadLength(0).to_string().contains("1 to"));
    }
}
