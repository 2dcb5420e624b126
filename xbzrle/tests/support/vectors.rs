//! QEMU's XBZRLE vectors (`../shared/xbzrle-vectors`, format in its
//! README), shared by the `qemu_vectors` test and `examples/xbzrle_check.rs`.

use std::path::PathBuf;

use vmstream_xbzrle::{decode, encode, validate, EncodeError};

fn vectors_file() -> Option<PathBuf> {
    let shared = std::env::var_os("VMSTREAM_SHARED")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"));
    let file = shared.join("xbzrle-vectors/vectors.xbzv.zst");
    if file.exists() {
        Some(file)
    } else {
        eprintln!(
            "skipping: {} not found (set VMSTREAM_SHARED)",
            file.display()
        );
        None
    }
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> &'a [u8] {
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        s
    }
    fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().unwrap())
    }
    fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.bytes(4).try_into().unwrap())
    }
}

/// Checks `encode` and `decode` against every vector; returns a summary, or
/// `None` (after saying why) when the vectors are not there.
pub fn check_qemu_vectors() -> Option<String> {
    let file = vectors_file()?;
    let raw = zstd::decode_all(std::fs::File::open(file).unwrap()).unwrap();
    let mut r = Reader { buf: &raw, pos: 0 };
    assert_eq!(r.bytes(4), b"XBZV");
    assert_eq!(r.u32(), 1);
    let page_size = r.u32() as usize;
    let count = r.u32();
    let (mut encodes, mut decodes, mut overflows, mut rejects) = (0, 0, 0, 0);
    for record in 0..count {
        match r.u8() {
            0 => {
                let dlen = r.u32() as usize;
                let old = r.bytes(page_size);
                let new = r.bytes(page_size);
                let result = r.i32();
                let mut out = vec![0u8; dlen];
                let got = encode(old, new, &mut out);
                match result {
                    -1 => {
                        assert_eq!(
                            got,
                            Err(EncodeError::Overflow),
                            "record {record}: dlen {dlen}"
                        );
                        overflows += 1;
                    }
                    n => {
                        let n = n as usize;
                        let want = r.bytes(n);
                        assert_eq!(got, Ok(n), "record {record}: dlen {dlen}");
                        assert_eq!(&out[..n], want, "record {record}: delta bytes");
                        let mut page = old.to_vec();
                        decode(want, &mut page).unwrap();
                        assert!(
                            page == new,
                            "record {record}: decode did not rebuild the new page"
                        );
                    }
                }
                encodes += 1;
            }
            1 => {
                let base = r.bytes(page_size);
                let len = r.u32() as usize;
                let delta = r.bytes(len);
                let result = r.i32();
                let mut page = base.to_vec();
                let got = decode(delta, &mut page);
                assert_eq!(
                    validate(delta, page_size).is_ok(),
                    got.is_ok(),
                    "record {record}"
                );
                if result < 0 {
                    assert!(
                        got.is_err(),
                        "record {record}: QEMU rejects this delta, we accepted {got:?}"
                    );
                    rejects += 1;
                } else {
                    assert_eq!(got, Ok(result as usize), "record {record}");
                    assert!(
                        page == r.bytes(page_size),
                        "record {record}: decoded page differs"
                    );
                }
                decodes += 1;
            }
            k => panic!("record {record}: unknown kind {k}"),
        }
    }
    assert_eq!(r.pos, raw.len(), "trailing bytes in the vector file");
    assert!(encodes > 0 && decodes > 0 && overflows > 0 && rejects > 0);
    Some(format!("{encodes} encode vectors ({overflows} overflow), {decodes} decode vectors ({rejects} rejected): all match"))
}
