//! Reading message bodies: a little-endian field reader and the checks every decoder
//! shares (body lengths, reasons, magic and version, boolean bytes).

use super::{FrameType, WireError, MAGIC, MAX_REASON_LEN, PROTOCOL_VERSION};

/// Little-endian field reader over a body of checked length.
pub(super) struct Fields<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Fields<'a> {
    pub(super) fn new(b: &'a [u8]) -> Self {
        Fields { b, at: 0 }
    }
    pub(super) fn bytes(&mut self, n: usize) -> &'a [u8] {
        let s = &self.b[self.at..self.at + n];
        self.at += n;
        s
    }
    pub(super) fn u8(&mut self) -> u8 {
        self.bytes(1)[0]
    }
    pub(super) fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.bytes(2).try_into().expect("2 bytes"))
    }
    pub(super) fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    pub(super) fn i32(&mut self) -> i32 {
        i32::from_le_bytes(self.bytes(4).try_into().expect("4 bytes"))
    }
    pub(super) fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.bytes(8).try_into().expect("8 bytes"))
    }
    pub(super) fn rest(&mut self) -> &'a [u8] {
        let s = &self.b[self.at..];
        self.at = self.b.len();
        s
    }
}

pub(super) fn exact(kind: FrameType, body: &[u8], len: usize) -> Result<(), WireError> {
    if body.len() != len {
        return Err(WireError::BodyLength {
            kind: kind.name(),
            expected: len.to_string(),
            got: body.len(),
        });
    }
    Ok(())
}

pub(super) fn at_least(
    kind: FrameType,
    body: &[u8],
    len: usize,
    max_extra: usize,
) -> Result<(), WireError> {
    if body.len() < len || body.len() > len + max_extra {
        return Err(WireError::BodyLength {
            kind: kind.name(),
            expected: format!("{len}..={}", len + max_extra),
            got: body.len(),
        });
    }
    Ok(())
}

pub(super) fn reason_of(kind: FrameType, f: &mut Fields<'_>) -> Result<String, WireError> {
    let len = f.u16() as usize;
    let rest = f.rest();
    if rest.len() != len {
        return Err(WireError::BodyLength {
            kind: kind.name(),
            expected: format!("reason of {len} bytes"),
            got: rest.len(),
        });
    }
    String::from_utf8(rest.to_vec()).map_err(|_| WireError::BadUtf8 { kind: kind.name() })
}

pub(super) fn push_reason(out: &mut Vec<u8>, reason: &str) {
    // Cut at a char boundary so the receiver's UTF-8 check passes.
    let mut end = reason.len().min(MAX_REASON_LEN);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    out.extend_from_slice(&(end as u16).to_le_bytes());
    out.extend_from_slice(&reason.as_bytes()[..end]);
}

pub(super) fn check_magic_version(kind: FrameType, f: &mut Fields<'_>) -> Result<(), WireError> {
    let magic: [u8; 8] = f.bytes(8).try_into().expect("8 bytes");
    if magic != MAGIC {
        return Err(WireError::BadMagic(magic));
    }
    let theirs = f.u16();
    if theirs != PROTOCOL_VERSION {
        let _ = kind;
        return Err(WireError::Version {
            ours: PROTOCOL_VERSION,
            theirs,
        });
    }
    Ok(())
}

/// The fields of a versioned body (`Hello`, `HelloReply`, `ChannelHello`, `AuthHello`)
/// after its magic and version, which are checked first: a peer of another version may use
/// another length. Then `length` checks the length.
pub(super) fn versioned_body(
    kind: FrameType,
    body: &[u8],
    length: impl FnOnce(&[u8]) -> Result<(), WireError>,
) -> Result<Fields<'_>, WireError> {
    if body.len() >= 10 {
        check_magic_version(kind, &mut Fields::new(body))?;
    }
    length(body)?;
    let mut f = Fields::new(body);
    f.bytes(10);
    Ok(f)
}

/// A byte that must be 0 (false) or 1 (true).
pub(super) fn bool_byte(kind: FrameType, field: &'static str, v: u8) -> Result<bool, WireError> {
    match v {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(WireError::BadField {
            kind: kind.name(),
            field,
            value: v as u64,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::parse;
    use super::super::{Abort, AbortCode, Message};
    use super::*;

    #[test]
    fn long_reasons_are_cut_at_a_char_boundary() {
        let reason = "é".repeat(MAX_REASON_LEN);
        let m = Message::Abort(Abort {
            code: AbortCode::SourceError,
            reason,
        });
        let Message::Abort(a) = parse(&m.to_frame()).unwrap() else {
            panic!()
        };
        assert_eq!(a.reason.len(), MAX_REASON_LEN);
    }
}
