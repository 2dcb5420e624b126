//! Per-thread compression contexts for the three page compressors.
//!
//! Each worker owns one [`Compressor`] or [`Decompressor`]; contexts are
//! created once and reset between pages, so no page allocates.
#![deny(unsafe_code)]

// The liblz4 and zlib bindings are the crate's only `unsafe` code.
#[allow(unsafe_code)]
pub mod lz4;
#[allow(unsafe_code)]
pub mod zlib;

use crate::format::Encoding;

/// Which compressor full pages go through, with its tuning knob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Compression {
    /// LZ4 block format; `acceleration` >= 1 (1 = best ratio).
    Lz4 {
        /// LZ4 acceleration factor.
        acceleration: i32,
    },
    /// One zstd frame per page at `level`.
    Zstd {
        /// zstd compression level.
        level: i32,
    },
    /// Raw deflate at `level` (0 to 9).
    Zlib {
        /// zlib compression level.
        level: i32,
    },
    /// No compression: non-zero pages without a delta travel raw.
    None,
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Lz4 { acceleration: 1 }
    }
}

impl Compression {
    /// The wire encoding this method produces (`Raw` for `None`).
    pub fn encoding(self) -> Encoding {
        match self {
            Compression::Lz4 { .. } => Encoding::Lz4,
            Compression::Zstd { .. } => Encoding::Zstd,
            Compression::Zlib { .. } => Encoding::Zlib,
            Compression::None => Encoding::Raw,
        }
    }
}

/// A compression context for one thread.
pub struct Compressor {
    method: Compression,
    lz4: Option<lz4::Lz4Compressor>,
    zstd: Option<zstd::bulk::Compressor<'static>>,
    zlib: Option<zlib::ZlibCompressor>,
    /// LZ4 context for deltas, which are always LZ4.
    xor_lz4: lz4::Lz4Compressor,
}

impl std::fmt::Debug for Compressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Compressor")
            .field("method", &self.method)
            .finish()
    }
}

impl Compressor {
    /// A context for `method`.
    pub fn new(method: Compression) -> Result<Compressor, String> {
        let mut c = Compressor {
            method,
            lz4: None,
            zstd: None,
            zlib: None,
            xor_lz4: lz4::Lz4Compressor::new(1),
        };
        match method {
            Compression::Lz4 { acceleration } => {
                c.lz4 = Some(lz4::Lz4Compressor::new(acceleration))
            }
            Compression::Zstd { level } => {
                c.zstd = Some(
                    zstd::bulk::Compressor::new(level)
                        .map_err(|e| format!("zstd level {level}: {e}"))?,
                )
            }
            Compression::Zlib { level } => {
                if !(0..=9).contains(&level) {
                    return Err(format!("zlib level {level} outside 0..=9"));
                }
                c.zlib = Some(zlib::ZlibCompressor::new(level)?)
            }
            Compression::None => {}
        }
        Ok(c)
    }

    /// The configured method.
    pub fn method(&self) -> Compression {
        self.method
    }

    /// Compresses `src` with the configured method into `dst`; `None` when
    /// it does not fit (or the method is `None`).
    pub fn compress(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        if let Some(c) = &mut self.lz4 {
            c.compress(src, dst)
        } else if let Some(c) = &mut self.zstd {
            c.compress_to_buffer(src, dst).ok()
        } else if let Some(c) = &mut self.zlib {
            c.compress(src, dst)
        } else {
            None
        }
    }

    /// LZ4-compresses a delta (XOR or XBZRLE) into `dst`; `None` when it
    /// does not fit.
    pub fn compress_delta(&mut self, src: &[u8], dst: &mut [u8]) -> Option<usize> {
        self.xor_lz4.compress(src, dst)
    }
}

/// A decompression context for one thread; handles every encoding.
pub struct Decompressor {
    zstd: zstd::bulk::Decompressor<'static>,
    zlib: zlib::ZlibDecompressor,
}

impl std::fmt::Debug for Decompressor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Decompressor")
    }
}

impl Decompressor {
    /// A new context.
    pub fn new() -> Result<Decompressor, String> {
        Ok(Decompressor {
            zstd: zstd::bulk::Decompressor::new().map_err(|e| format!("zstd: {e}"))?,
            zlib: zlib::ZlibDecompressor::new()?,
        })
    }

    /// Decompresses a payload of a compressed `encoding` (Lz4, Zstd, Zlib,
    /// XorLz4) into `dst`, returning the size produced. Output never
    /// exceeds `dst`; more input than fits is an error.
    pub fn decompress(
        &mut self,
        encoding: Encoding,
        src: &[u8],
        dst: &mut [u8],
    ) -> Result<usize, String> {
        match encoding {
            Encoding::Lz4 | Encoding::XorLz4 | Encoding::XbzrleLz4 => lz4::decompress(src, dst)
                .ok_or_else(|| "malformed or oversized lz4 block".to_string()),
            Encoding::Zstd => self
                .zstd
                .decompress_to_buffer(src, dst)
                .map_err(|e| format!("zstd: {e}")),
            Encoding::Zlib => self.zlib.decompress(src, dst),
            other => Err(format!("{other:?} is not a compressed encoding")),
        }
    }
}
