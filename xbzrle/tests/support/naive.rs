//! The reference encoder the property tests and `examples/xbzrle_check.rs`
//! compare `encode` with.

/// The format's definition, one byte at a time, with QEMU's overflow rule
/// (two free bytes needed whenever a run pair starts).
pub fn naive_encode(old: &[u8], new: &[u8], dlen: usize) -> Option<Vec<u8>> {
    fn uleb(out: &mut Vec<u8>, v: usize) {
        assert!(v <= 0x3fff);
        if v < 0x80 {
            out.push(v as u8);
        } else {
            out.push(v as u8 | 0x80);
            out.push((v >> 7) as u8);
        }
    }
    let mut out = Vec::new();
    let mut i = 0;
    while i < new.len() {
        if out.len() + 2 > dlen {
            return None;
        }
        let z0 = i;
        while i < new.len() && old[i] == new[i] {
            i += 1;
        }
        if i == new.len() {
            break;
        }
        uleb(&mut out, i - z0);
        if out.len() + 2 > dlen {
            return None;
        }
        let n0 = i;
        while i < new.len() && old[i] != new[i] {
            i += 1;
        }
        if i - n0 > 0x3fff {
            return None; // a fully changed 16 KiB page: not representable
        }
        uleb(&mut out, i - n0);
        if out.len() + (i - n0) > dlen {
            return None;
        }
        out.extend_from_slice(&new[n0..i]);
    }
    Some(out)
}
