//! The switchover digest: BLAKE3-256 over all of guest memory, page 0 first, hashed on
//! every core (BLAKE3's tree mode is the same hash whatever the thread count).

/// BLAKE3 of `memory`, multi-threaded.
pub fn memory_digest(memory: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update_rayon(memory);
    *h.finalize().as_bytes()
}

/// Lower-case hex of a digest.
pub fn hex(digest: &[u8; 32]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parallel_digest_equals_the_plain_blake3_hash() {
        let mem: Vec<u8> = (0..(3 << 20) + 4096).map(|i| (i * 7 % 251) as u8).collect();
        assert_eq!(memory_digest(&mem), *blake3::hash(&mem).as_bytes());
        assert_eq!(
            hex(&memory_digest(b"")),
            "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
    }
}
