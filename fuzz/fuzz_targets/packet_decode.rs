//! The packet decoder on arbitrary bytes: never panics, never writes outside
//! the destination memory. The input's last four bytes are replaced by a
//! valid CRC-32C (the format's trailer) half of the time, so the fuzzer gets
//! past the checksum into the field validation and the payload decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmstream_codec::PacketDecoder;

const PAGES: usize = 16;
const PAGE: usize = 4096;
const GUARD: usize = 4096;

fuzz_target!(|input: (bool, Vec<u8>)| {
    let (fix_crc, mut packet) = input;
    if fix_crc && packet.len() >= 4 {
        let n = packet.len() - 4;
        let crc = vmstream_simd::crc32c(&packet[..n]);
        packet[n..].copy_from_slice(&crc.to_le_bytes());
    }
    let mut buf = vec![0x5au8; PAGES * PAGE + 2 * GUARD];
    let mut decoder = PacketDecoder::new(PAGES as u64).expect("decoder");
    let (head, rest) = buf.split_at_mut(GUARD);
    let (memory, tail) = rest.split_at_mut(PAGES * PAGE);
    let _ = decoder.apply(&packet, memory);
    assert!(head.iter().all(|&b| b == 0x5a), "wrote before the destination memory");
    assert!(tail.iter().all(|&b| b == 0x5a), "wrote past the destination memory");
});
