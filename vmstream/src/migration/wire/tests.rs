//! Tests across message families (round trips, body lengths against the byte tables of
//! `PROTOCOL.md`, single-bit corruption, typed field errors) and the sample messages the
//! family tests share.

use vmstream_codec::Compression;

use super::*;

/// A `Hello` with every field set away from its default.
pub(super) fn hello() -> Hello {
    Hello {
        guest_kind: GuestKind::File,
        page_size: crate::memory::PAGE_SIZE as u32,
        guest_size: 256 << 20,
        features: KNOWN_FEATURES,
        compression: Compression::Zstd { level: 3 },
        delta: DeltaWire::Xbzrle,
        codec_version: Hello::CODEC_VERSION,
        sender_workers: 2,
        cache_bytes: 64 << 20,
        batch_pages: 128,
    }
}

/// At least one of every control message, with non-trivial fields.
pub(super) fn all_messages() -> Vec<Message> {
    vec![
        Message::Hello(hello()),
        Message::HelloReply(HelloReply {
            refuse: RefuseCode::GuestSize,
            receiver_workers: 3,
            resumes: true,
            reason: "size differs: é".into(),
        }),
        Message::RoundEnd(RoundEnd {
            round: 7,
            records: 100,
            packets: 3,
            packet_bytes: 12345,
            flags: ROUND_FINAL | ROUND_FORCED,
        }),
        Message::RoundAck(RoundAck {
            round: 7,
            records: 100,
            packets: 3,
            barrier_ns: 99,
        }),
        Message::GuestState(GuestState {
            guest_kind: GuestKind::File,
            tx_count: 42,
            blob: vec![1, 2, 3],
        }),
        Message::Digest(Digest {
            verification: DigestSource::SentPages,
            digest: [0xab; 32],
            guest_size: 1 << 20,
            paused_at_unix_ns: 1_700_000_000_000_000_000,
        }),
        Message::CommitReply(CommitReply {
            status: CommitStatus::DigestMismatch,
            digest: [7; 32],
            reason: "mismatch".into(),
        }),
        Message::Resumed(Resumed {
            at_unix_ns: 5,
            running: true,
            tx_count: 9,
            receiver_cpu_ns: 77,
        }),
        Message::Abort(Abort {
            code: AbortCode::Cancelled,
            reason: "timeout".into(),
        }),
        Message::ChannelHello(ChannelHello {
            migration_id: [0x5c; 16],
            index: 1,
            count: 2,
        }),
        Message::GuestSamples(GuestSamples {
            samples: vec![(10, 1), (20, 5), (20, 9)],
        }),
        Message::Handover(Handover {
            ended_at_unix_ns: 1_700_000_000_123_456_789,
        }),
        Message::QemuIncoming(QemuIncoming {
            uri: "unix:/run/vm.migrate".into(),
        }),
        Message::MemoryHandover(MemoryHandover {
            guest_size: 64 << 20,
        }),
        Message::HandoverDirty(HandoverDirty {
            round: 3,
            flags: HANDOVER_MORE,
            paused_at_unix_ns: 0,
            pages: vec![1, 2, 9, 1 << 30],
        }),
        Message::HandoverDirty(HandoverDirty {
            round: 4,
            flags: HANDOVER_PAUSED,
            paused_at_unix_ns: 1_700_000_000_123_456_000,
            pages: vec![],
        }),
        Message::HandoverAck(HandoverAck {
            round: 3,
            pages_checked: 12,
        }),
        Message::VerifyBacklog(VerifyBacklog {
            round: 7,
            pages: 33_530,
            expected_ns: 58_000_000,
        }),
        Message::AuthHello(AuthHello { nonce: [0x11; 32] }),
        Message::AuthChallenge(AuthChallenge {
            nonce: [0x22; 32],
            tag: [0x33; 32],
        }),
        Message::AuthProof(AuthProof { tag: [0x44; 32] }),
        Message::HelloReply(HelloReply {
            refuse: RefuseCode::Auth,
            receiver_workers: 0,
            resumes: false,
            reason: "keys differ".into(),
        }),
        Message::GuestState(GuestState {
            guest_kind: GuestKind::Kvm,
            tx_count: 43,
            blob: vec![9; 1024],
        }),
        Message::CommitReply(CommitReply {
            status: CommitStatus::StateRejected,
            digest: [8; 32],
            reason: "invalid KVM state blob".into(),
        }),
        Message::Audit(Audit {
            status: AuditStatus::Mismatch,
            pages_checked: 1 << 18,
            mismatched: 3,
            pages: vec![4, 9],
        }),
        Message::Audit(Audit {
            status: AuditStatus::Match,
            pages_checked: 8,
            mismatched: 0,
            pages: vec![],
        }),
        Message::PostcopyOwed(PostcopyOwed {
            pages: vec![0, 3, 4, 1 << 30],
        }),
        Message::PostcopyStart(PostcopyStart {
            owed: 4,
            paused_at_unix_ns: 1_700_000_000_000_000_001,
            migration_id: [0x77; 16],
        }),
        Message::PageRequest(PageRequest { page: 77 }),
        Message::PostcopyPage(PostcopyPage {
            page: 77,
            flags: PAGE_REQUESTED,
            data: (0..crate::memory::PAGE_SIZE).map(|i| i as u8).collect(),
        }),
        Message::PostcopyComplete(PostcopyComplete {
            status: PostcopyStatus::Mismatch,
            pages_placed: 10,
            pages_faulted: 3,
            pages_streamed: 7,
            pages_dropped: 2,
            fault_p50_ns: 500_000,
            fault_p99_ns: 900_000,
            fault_max_ns: 1_000_000,
            resume_to_last_page_ns: 5_000_000,
            tx_during: 99,
            digest: [0x5a; 32],
        }),
        Message::PostcopyReconnect(PostcopyReconnect {
            migration_id: [0x66; 16],
            attempt: 2,
        }),
        Message::PostcopyPreempt(PostcopyPreempt {
            migration_id: [0x77; 16],
        }),
    ]
}

#[test]
fn postcopy_owed_lists_must_ascend_and_pages_carry_no_unknown_flags() {
    let owed = Message::PostcopyOwed(PostcopyOwed { pages: vec![5, 5] }).to_frame();
    assert!(matches!(parse(&owed), Err(WireError::BadField { .. })));
    let mut page = Message::PostcopyPage(PostcopyPage {
        page: 1,
        flags: 0,
        data: vec![0; crate::memory::PAGE_SIZE],
    });
    if let Message::PostcopyPage(p) = &mut page {
        p.flags = 1 << 5;
    }
    assert!(matches!(
        parse(&page.to_frame()),
        Err(WireError::BadField { .. })
    ));
}

#[test]
fn handover_dirty_lists_must_ascend_and_name_the_pause_only_when_paused() {
    let dirty = |round, flags, paused_at_unix_ns, pages: Vec<u64>| {
        Message::HandoverDirty(HandoverDirty {
            round,
            flags,
            paused_at_unix_ns,
            pages,
        })
        .to_frame()
    };
    let field_of = |frame: Vec<u8>| match parse(&frame) {
        Err(WireError::BadField { field, .. }) => field,
        other => panic!("expected a bad field, got {other:?}"),
    };
    assert_eq!(
        field_of(dirty(1, 0, 0, vec![7, 3])),
        "pages (not strictly ascending)"
    );
    assert_eq!(field_of(dirty(0, 0, 0, vec![])), "round");
    assert_eq!(field_of(dirty(1, 1 << 2, 0, vec![])), "flags");
    assert_eq!(
        field_of(dirty(1, HANDOVER_PAUSED, 0, vec![])),
        "paused_at_unix_ns"
    );
    assert_eq!(field_of(dirty(1, 0, 5, vec![])), "paused_at_unix_ns");
    let mut body = Vec::new();
    HandoverDirty {
        round: 1,
        flags: 0,
        paused_at_unix_ns: 0,
        pages: vec![1],
    }
    .encode(&mut body);
    body[16] = 9; // count 9, one page present
    assert!(matches!(
        HandoverDirty::decode(&body),
        Err(WireError::BodyLength { .. })
    ));
}

/// Reads a whole frame back the way the transport does: header, then payload.
pub(super) fn parse(frame: &[u8]) -> Result<Message, WireError> {
    let h = FrameHeader::decode(frame[..FRAME_HEADER_LEN].try_into().unwrap())?;
    assert_eq!(h.len as usize, frame.len() - FRAME_HEADER_LEN);
    Message::decode(h.kind, &frame[FRAME_HEADER_LEN..])
}

#[test]
fn every_message_round_trips() {
    for m in all_messages() {
        let frame = m.to_frame();
        assert_eq!(parse(&frame).unwrap(), m);
        assert!(frame.len() - FRAME_HEADER_LEN <= m.frame_type().max_payload());
    }
}

#[test]
fn fixed_body_lengths_match_the_byte_tables() {
    let lens: Vec<usize> = all_messages()
        .iter()
        .map(|m| m.to_frame().len() - FRAME_HEADER_LEN - BODY_CRC_LEN)
        .collect();
    assert_eq!(lens[0], Hello::LEN);
    assert_eq!(lens[2], RoundEnd::LEN);
    assert_eq!(lens[3], RoundAck::LEN);
    assert_eq!(lens[5], Digest::LEN);
    assert_eq!(lens[7], Resumed::LEN);
    let handover = Message::Handover(Handover {
        ended_at_unix_ns: 0x0102_0304_0506_0708,
    })
    .to_frame();
    assert_eq!(handover[0], 0x25);
    assert_eq!(
        &handover[FRAME_HEADER_LEN..FRAME_HEADER_LEN + Handover::LEN],
        &0x0102_0304_0506_0708u64.to_le_bytes()
    );
    assert_eq!(
        handover.len(),
        FRAME_HEADER_LEN + Handover::LEN + BODY_CRC_LEN
    );
    assert_eq!(lens[1], HelloReply::FIXED_LEN + "size differs: é".len());
}

#[test]
fn every_single_byte_flip_is_detected() {
    for m in all_messages() {
        let frame = m.to_frame();
        for i in 0..frame.len() {
            for bit in [0x01u8, 0x80] {
                let mut f = frame.clone();
                f[i] ^= bit;
                let h = FrameHeader::decode(f[..FRAME_HEADER_LEN].try_into().unwrap());
                match h {
                    Err(_) => {}
                    Ok(h) => {
                        assert_eq!(h.len as usize, f.len() - FRAME_HEADER_LEN);
                        assert!(
                            Message::decode(h.kind, &f[FRAME_HEADER_LEN..]).is_err(),
                            "flip at {i} of {m:?} went unnoticed"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn bad_fields_are_typed() {
    let mut body = Vec::new();
    hello().encode(&mut body);
    body[32] = 9;
    assert!(matches!(
        Hello::decode(&body),
        Err(WireError::BadField {
            field: "compression",
            value: 9,
            ..
        })
    ));
    let mut body = Vec::new();
    Abort {
        code: AbortCode::Protocol,
        reason: "x".into(),
    }
    .encode(&mut body);
    body[3] = 5; // reason length says 5, 1 byte present
    assert!(matches!(
        Abort::decode(&body),
        Err(WireError::BodyLength { .. })
    ));
    let mut body = Vec::new();
    RoundEnd {
        round: 0,
        records: 0,
        packets: 0,
        packet_bytes: 0,
        // The first flag bit no version defines (1 << 2 is `ROUND_POSTCOPY` since 5).
        flags: 8,
    }
    .encode(&mut body);
    assert!(matches!(
        RoundEnd::decode(&body),
        Err(WireError::BadField { field: "flags", .. })
    ));
}

#[test]
fn verify_backlog_is_three_little_endian_words_and_refuses_other_lengths() {
    let m = VerifyBacklog {
        round: 5,
        pages: 1 << 33,
        expected_ns: 42,
    };
    let frame = Message::VerifyBacklog(m).to_frame();
    assert_eq!(frame[0], 0x36);
    let body = &frame[FRAME_HEADER_LEN..frame.len() - BODY_CRC_LEN];
    assert_eq!(body.len(), VerifyBacklog::LEN);
    assert_eq!(&body[..8], &5u64.to_le_bytes());
    assert_eq!(&body[8..16], &(1u64 << 33).to_le_bytes());
    assert_eq!(&body[16..], &42u64.to_le_bytes());
    assert_eq!(VerifyBacklog::decode(body), Ok(m));
    assert!(VerifyBacklog::decode(&body[..23]).is_err());
    assert!(VerifyBacklog::decode(&[0; 25]).is_err());
}
