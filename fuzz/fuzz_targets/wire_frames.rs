//! The migration protocol's frame reader on arbitrary streams: never panics, every error
//! is typed, and every control message it accepts encodes back to a frame that parses to
//! the same message. The input is a list of frames whose headers (and, when asked, body
//! checksums) are made valid, so the fuzzer gets past the checksums into the typed field
//! checks, followed by raw bytes. Half the time the reader expects sealed records
//! (`vmstream::migration::connect::seal`), which arbitrary bytes never open: only typed errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmstream::migration::connect::seal::Opener;
use vmstream::migration::transport::{Frame, FrameReader};
use vmstream::migration::wire::{FrameHeader, Message, FRAME_HEADER_LEN};

fuzz_target!(|input: (bool, Vec<(u8, bool, Vec<u8>)>, Vec<u8>)| {
    let (sealed, frames, tail) = input;
    let mut stream = Vec::new();
    for (tag, fix_crc, mut body) in frames {
        if fix_crc {
            let crc = vmstream_simd::crc32c(&body);
            body.extend_from_slice(&crc.to_le_bytes());
        }
        let mut h = [0u8; FRAME_HEADER_LEN];
        h[0] = tag;
        h[4..8].copy_from_slice(&(body.len() as u32).to_le_bytes());
        let crc = vmstream_simd::crc32c(&h[..8]);
        h[8..12].copy_from_slice(&crc.to_le_bytes());
        stream.extend_from_slice(&h);
        stream.extend_from_slice(&body);
    }
    stream.extend_from_slice(&tail);
    let mut reader = FrameReader::new(&stream[..], None);
    if sealed {
        // The sealed-record path: lengths, truncation and forgeries must be typed errors.
        reader.open_with(Opener::new(&[7; 32]));
    }
    while let Ok(frame) = reader.read_frame() {
        if let Frame::Control(m) = frame {
            let again = m.to_frame();
            let h = FrameHeader::decode(again[..FRAME_HEADER_LEN].try_into().unwrap())
                .expect("a re-encoded header parses");
            let back = Message::decode(h.kind, &again[FRAME_HEADER_LEN..])
                .expect("a re-encoded message parses");
            assert_eq!(back, m, "message changed in a round trip");
        }
    }
});
