//! Raw deflate through `libz-sys`, with one reusable stream per direction
//! (`deflateReset` / `inflateReset` between pages, no allocation per page).

use std::ffi::{c_int, c_uint, c_void};

use libz_sys as z;

/// Window bits: negative = raw deflate (no zlib header/adler32; the packet
/// CRC covers integrity), 15 = the largest window.
const WINDOW_BITS: c_int = -15;
/// zlib's default memory level.
const MEM_LEVEL: c_int = 8;

extern "C" fn zalloc(_opaque: *mut c_void, items: c_uint, size: c_uint) -> *mut c_void {
    // SAFETY: calloc has no preconditions; zlib checks for NULL.
    unsafe { libc::calloc(items as usize, size as usize) }
}

extern "C" fn zfree(_opaque: *mut c_void, ptr: *mut c_void) {
    // SAFETY: this private function is only installed as a stream's
    // `zfree`, so only zlib calls it, with NULL or a pointer `zalloc`
    // (calloc) returned and zlib has not freed yet.
    unsafe { libc::free(ptr) }
}

fn new_stream() -> Box<z::z_stream> {
    // Boxed: zlib keeps a pointer back to the stream in its state and
    // checks it, so the stream must not move after init.
    Box::new(z::z_stream {
        next_in: std::ptr::null_mut(),
        avail_in: 0,
        total_in: 0,
        next_out: std::ptr::null_mut(),
        avail_out: 0,
        total_out: 0,
        msg: std::ptr::null_mut(),
        state: std::ptr::null_mut(),
        zalloc,
        zfree,
        opaque: std::ptr::null_mut(),
        data_type: 0,
        adler: 0,
        reserved: 0,
    })
}

/// A per-thread deflate compressor.
pub struct ZlibCompressor {
    stream: Box<z::z_stream>,
}

impl std::fmt::Debug for ZlibCompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZlibCompressor")
    }
}

// SAFETY: the stream and the zlib state it owns are only touched through
// `&mut self`; zlib state has no thread affinity.
unsafe impl Send for ZlibCompressor {}

impl ZlibCompressor {
    /// A compressor at `level` (0 to 9).
    pub fn new(level: i32) -> Result<ZlibCompressor, String> {
        let mut stream = new_stream();
        // SAFETY: `stream` is a valid, pinned z_stream with allocator
        // callbacks; version and struct size are what this binding was
        // built against.
        let rc = unsafe {
            z::deflateInit2_(
                &mut *stream,
                level,
                z::Z_DEFLATED,
                WINDOW_BITS,
                MEM_LEVEL,
                z::Z_DEFAULT_STRATEGY,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if rc != z::Z_OK {
            return Err(format!("deflateInit2 failed with {rc} (level {level})"));
        }
        Ok(ZlibCompressor { stream })
    }

    /// Compresses `src` into `dst`; `None` when the result does not fit.
    pub fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        let s = &mut *self.stream;
        s.next_in = src.as_ptr() as *mut u8;
        s.avail_in = c_uint::try_from(src.len()).ok()?;
        s.next_out = dst.as_mut_ptr();
        s.avail_out = c_uint::try_from(dst.len()).ok()?;
        // SAFETY: the stream was initialized by deflateInit2_; zlib reads at
        // most avail_in bytes from next_in and writes at most avail_out
        // bytes to next_out, both set from live slices just above.
        let (rc, produced) = unsafe {
            let rc = z::deflate(s, z::Z_FINISH);
            let produced = dst.len() - s.avail_out as usize;
            z::deflateReset(s);
            (rc, produced)
        };
        (rc == z::Z_STREAM_END).then_some(produced)
    }
}

impl Drop for ZlibCompressor {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, ended exactly once here.
        unsafe { z::deflateEnd(&mut *self.stream) };
    }
}

/// A per-thread inflater.
pub struct ZlibDecompressor {
    stream: Box<z::z_stream>,
}

impl std::fmt::Debug for ZlibDecompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ZlibDecompressor")
    }
}

// SAFETY: as for ZlibCompressor.
unsafe impl Send for ZlibDecompressor {}

impl ZlibDecompressor {
    /// A new inflater.
    pub fn new() -> Result<ZlibDecompressor, String> {
        let mut stream = new_stream();
        // SAFETY: as in ZlibCompressor::new.
        let rc = unsafe {
            z::inflateInit2_(
                &mut *stream,
                WINDOW_BITS,
                z::zlibVersion(),
                std::mem::size_of::<z::z_stream>() as c_int,
            )
        };
        if rc != z::Z_OK {
            return Err(format!("inflateInit2 failed with {rc}"));
        }
        Ok(ZlibDecompressor { stream })
    }

    /// Inflates `src` into `dst`. Succeeds only when the stream ends and
    /// consumes all of `src`; returns the bytes produced. Output that would
    /// exceed `dst` is an error (zlib stops at `dst`'s end).
    pub fn decompress(&mut self, src: &[u8], dst: &mut [u8]) -> Result<usize, String> {
        let s = &mut *self.stream;
        s.next_in = src.as_ptr() as *mut u8;
        s.avail_in = c_uint::try_from(src.len()).map_err(|_| "input too long")?;
        s.next_out = dst.as_mut_ptr();
        s.avail_out = c_uint::try_from(dst.len()).map_err(|_| "output too long")?;
        // SAFETY: as in ZlibCompressor::compress, for inflate.
        let (rc, produced, left_in) = unsafe {
            let rc = z::inflate(s, z::Z_FINISH);
            let produced = dst.len() - s.avail_out as usize;
            let left_in = s.avail_in;
            z::inflateReset(s);
            (rc, produced, left_in)
        };
        match rc {
            z::Z_STREAM_END if left_in == 0 => Ok(produced),
            z::Z_STREAM_END => Err(format!(
                "{left_in} bytes after the end of the deflate stream"
            )),
            z::Z_BUF_ERROR | z::Z_OK if produced == dst.len() => {
                Err("more than one page".to_string())
            }
            z::Z_BUF_ERROR | z::Z_OK => {
                Err(format!("truncated deflate stream after {produced} bytes"))
            }
            rc => Err(format!("inflate error {rc}")),
        }
    }
}

impl Drop for ZlibDecompressor {
    fn drop(&mut self) {
        // SAFETY: initialized in `new`, ended exactly once here.
        unsafe { z::inflateEnd(&mut *self.stream) };
    }
}

/// The one-shot library call (`compress2`, zlib format), for benchmarks.
pub fn compress_oneshot(src: &[u8], dst: &mut [u8], level: i32) -> Option<usize> {
    let mut dst_len = z::uLongf::try_from(dst.len()).ok()?;
    // SAFETY: compress2 reads src.len() bytes and writes at most *dst_len.
    let rc = unsafe {
        z::compress2(
            dst.as_mut_ptr(),
            &mut dst_len,
            src.as_ptr(),
            src.len() as z::uLong,
            level,
        )
    };
    (rc == z::Z_OK).then_some(dst_len as usize)
}

/// The one-shot library call (`uncompress`, zlib format), for benchmarks.
pub fn decompress_oneshot(src: &[u8], dst: &mut [u8]) -> Option<usize> {
    let mut dst_len = z::uLongf::try_from(dst.len()).ok()?;
    // SAFETY: uncompress reads src.len() bytes and writes at most *dst_len.
    let rc = unsafe {
        z::uncompress(
            dst.as_mut_ptr(),
            &mut dst_len,
            src.as_ptr(),
            src.len() as z::uLong,
        )
    };
    (rc == z::Z_OK).then_some(dst_len as usize)
}
