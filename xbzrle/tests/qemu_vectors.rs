//! Byte-exact agreement with QEMU's XBZRLE encoder and decoder, on the
//! vectors in `../shared/xbzrle-vectors` (format in its README).

#[path = "support/vectors.rs"]
mod vectors;

#[test]
fn qemu_vectors_byte_exact() {
    if let Some(summary) = vectors::check_qemu_vectors() {
        eprintln!("{summary}");
    }
}
