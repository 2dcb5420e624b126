//! `decode` on arbitrary bytes: never panics, never writes past the page,
//! agrees with `validate`, and leaves bytes outside the runs untouched.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmstream_xbzrle::{decode, validate};

const GUARD: usize = 64;

fuzz_target!(|input: (u16, &[u8])| {
    let (len, delta) = input;
    let page_len = usize::from(len) % (16 * 1024 + 1);
    let mut buf = vec![0xa5u8; page_len + GUARD];
    let result = decode(delta, &mut buf[..page_len]);
    assert!(buf[page_len..].iter().all(|&b| b == 0xa5), "wrote past the page");
    assert_eq!(result, validate(delta, page_len));
    if let Ok(covered) = result {
        assert!(covered <= page_len);
        assert!(buf[covered..page_len].iter().all(|&b| b == 0xa5), "wrote past the covered end");
    }
});
