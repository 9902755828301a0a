// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Round trips, malformed input, and a no-panic sweep over random bytes.

use super::*;

fn handle(pool: u32, obj: u64, index: u64) -> Handle {
    Handle {
        pool,
        object: ObjectId([obj, !obj, obj.rotate_left(7)]),
        index,
    }
}

fn all_ops() -> [Op; 11] {
    [
        Op::NewPool(PoolSpec::persistent()),
        Op::NewPool(PoolSpec::ephemeral()),
        Op::NewPool(PoolSpec::shared(Uuid::from_bytes([7u8; 16]).unwrap())),
        Op::DestroyPool { pool: 3 },
        Op::Put {
            handle: handle(1, 2, 3),
            reserved: true,
        },
        Op::Get {
            handle: handle(4, u64::MAX, 0),
        },
        Op::FlushPage {
            handle: handle(1, 0, u64::MAX),
        },
        Op::FlushObject {
            pool: 2,
            object: ObjectId([1, 2, 3]),
        },
        Op::Reserve {
            pool: 1,
            pages: 1 << 40,
        },
        Op::Unreserve { pool: 1, pages: 5 },
        Op::Reset,
    ]
}

#[test]
fn every_op_round_trips() {
    for op in all_ops() {
        assert_eq!(Op::decode(&op.encode()), Ok(op), "{op:?}");
    }
}

#[test]
fn op_layout_is_fixed() {
    let b = Op::Put {
        handle: handle(0x0102_0304, 5, 0x1122),
        reserved: true,
    }
    .encode();
    assert_eq!(b[0], Opcode::Put as u8);
    assert_eq!(b[1], PUT_RESERVED);
    assert_eq!(&b[4..8], &[4, 3, 2, 1]);
    assert_eq!(&b[8..16], &5u64.to_le_bytes());
    assert_eq!(&b[32..40], &0x1122u64.to_le_bytes());
}

#[test]
fn private_ephemeral_pools_are_always_exclusive() {
    let mut b = Op::NewPool(PoolSpec::ephemeral()).encode();
    b[1] = 0; // no EXCLUSIVE_GETS flag on the wire
    match Op::decode(&b) {
        Ok(Op::NewPool(spec)) => assert!(spec.exclusive_gets && !spec.persistent),
        other => panic!("{other:?}"),
    }
}

#[test]
fn malformed_ops_are_rejected_with_the_right_error() {
    let put = Op::Put {
        handle: handle(1, 1, 1),
        reserved: false,
    }
    .encode();

    let mut b = put;
    b[0] = 0;
    assert_eq!(Op::decode(&b), Err(WireError::UnknownOpcode(0)));
    b[0] = 200;
    assert_eq!(Op::decode(&b), Err(WireError::UnknownOpcode(200)));
    assert_eq!(WireError::UnknownOpcode(200).status(), Status::Unsupported);

    let mut b = put;
    b[1] = 0x80;
    assert_eq!(Op::decode(&b), Err(WireError::BadFlags(0x80)));

    let mut b = put;
    b[2] = 1;
    assert_eq!(Op::decode(&b), Err(WireError::ReservedNotZero));

    let mut b = put;
    b[40] = 1; // arg must be zero for PUT
    assert_eq!(Op::decode(&b), Err(WireError::ReservedNotZero));

    assert!(matches!(
        Op::decode(&put[..47]),
        Err(WireError::Truncated {
            needed: 48,
            got: 47
        })
    ));

    let mut b = Op::NewPool(PoolSpec::persistent()).encode();
    b[40] = 13;
    assert_eq!(Op::decode(&b), Err(WireError::BadPageShift(13)));

    let mut b = Op::NewPool(PoolSpec::shared(Uuid::from_bytes([1; 16]).unwrap())).encode();
    b[1] |= POOL_PERSISTENT;
    assert_eq!(
        Op::decode(&b),
        Err(WireError::BadPoolKind),
        "shared persistent is refused"
    );

    let mut b = Op::NewPool(PoolSpec::shared(Uuid::from_bytes([1; 16]).unwrap())).encode();
    b[8..24].fill(0);
    assert_eq!(
        Op::decode(&b),
        Err(WireError::BadPoolKind),
        "shared needs a UUID"
    );

    let mut b = Op::Get {
        handle: handle(1, 1, 1),
    }
    .encode();
    b[1] = PUT_RESERVED;
    assert_eq!(Op::decode(&b), Err(WireError::BadFlags(PUT_RESERVED)));
}

fn build(ops: &[Op], tag: u64, buf: &mut [u8]) -> usize {
    let mut rb = RequestBuilder::new(buf).unwrap();
    for op in ops {
        rb.push(op).unwrap();
    }
    rb.finish(tag).unwrap()
}

#[test]
fn request_round_trips_and_counts_page_buffers() {
    let mut buf = [0u8; MAX_REQUEST_LEN];
    let ops = all_ops();
    let len = build(&ops, 0xfeed, &mut buf);
    assert_eq!(len, request_len(ops.len() as u16));
    let req = Request::parse(&buf[..len]).unwrap();
    assert_eq!(req.header().tag, 0xfeed);
    assert_eq!(req.num_ops() as usize, ops.len());
    for (i, op) in ops.iter().enumerate() {
        assert_eq!(req.op(i as u16), Ok(*op));
    }
    assert_eq!(
        req.page_buffers(),
        PageBufferCounts {
            to_device: 1,
            from_device: 1
        }
    );
}

#[test]
fn builder_stops_at_the_limit() {
    let mut buf = [0u8; MAX_REQUEST_LEN + 64];
    let mut rb = RequestBuilder::new(&mut buf).unwrap();
    let op = Op::Put {
        handle: handle(1, 1, 1),
        reserved: false,
    };
    for _ in 0..MAX_OPS_PER_REQUEST {
        rb.push(&op).unwrap();
    }
    assert_eq!(rb.push(&op), Err(WireError::Full));
    assert_eq!(rb.page_buffers().to_device, MAX_OPS_PER_REQUEST);

    let mut small = [0u8; REQUEST_HEADER_SIZE + OP_DESC_SIZE];
    let mut rb = RequestBuilder::new(&mut small).unwrap();
    rb.push(&op).unwrap();
    assert_eq!(
        rb.push(&op),
        Err(WireError::Full),
        "buffer too small for a second op"
    );
    assert_eq!(
        RequestBuilder::new(&mut [0u8; 8]).err(),
        Some(WireError::Truncated { needed: 16, got: 8 })
    );
    let mut empty = [0u8; 64];
    assert_eq!(
        RequestBuilder::new(&mut empty).unwrap().finish(0),
        Err(WireError::NoOps)
    );
}

#[test]
fn malformed_requests_are_rejected() {
    let mut buf = [0u8; MAX_REQUEST_LEN + 64];
    let len = build(
        &[Op::FlushPage {
            handle: handle(1, 1, 1),
        }],
        1,
        &mut buf,
    );

    assert!(matches!(
        Request::parse(&buf[..8]),
        Err(WireError::Truncated { .. })
    ));
    assert!(matches!(
        Request::parse(&buf[..len - 1]),
        Err(WireError::Truncated { .. })
    ));
    assert_eq!(
        Request::parse(&buf[..len + 1]).err(),
        Some(WireError::TrailingBytes {
            expected: len,
            got: len + 1
        })
    );

    let mut b = buf;
    b[0] = 2;
    assert_eq!(
        Request::parse(&b[..len]).err(),
        Some(WireError::BadVersion(2))
    );
    assert_eq!(WireError::BadVersion(2).status(), Status::BadVersion);

    let mut b = buf;
    b[2..4].copy_from_slice(&0u16.to_le_bytes());
    assert_eq!(Request::parse(&b[..16]).err(), Some(WireError::NoOps));

    let mut b = buf;
    b[2..4].copy_from_slice(&(MAX_OPS_PER_REQUEST + 1).to_le_bytes());
    assert_eq!(
        Request::parse(&b).err(),
        Some(WireError::TooManyOps(MAX_OPS_PER_REQUEST + 1))
    );
    b[2..4].copy_from_slice(&u16::MAX.to_le_bytes());
    assert_eq!(
        Request::parse(&b).err(),
        Some(WireError::TooManyOps(u16::MAX))
    );

    let mut b = buf;
    b[5] = 1; // header flags
    assert_eq!(
        Request::parse(&b[..len]).err(),
        Some(WireError::ReservedNotZero)
    );
}

#[test]
fn one_bad_op_does_not_spoil_the_request() {
    let mut buf = [0u8; MAX_REQUEST_LEN];
    let ops = [
        Op::FlushPage {
            handle: handle(1, 1, 1),
        },
        Op::Get {
            handle: handle(1, 1, 2),
        },
    ];
    let len = build(&ops, 9, &mut buf);
    buf[REQUEST_HEADER_SIZE] = 99; // corrupt op 0's opcode
    let req = Request::parse(&buf[..len]).unwrap();
    assert_eq!(req.op(0), Err(WireError::UnknownOpcode(99)));
    assert_eq!(req.op(1), Ok(ops[1]));
    // An unknown opcode consumes no page buffer; the GET still does.
    assert_eq!(
        req.page_buffers(),
        PageBufferCounts {
            to_device: 0,
            from_device: 1
        }
    );
    assert!(req.op(2).is_err());
}

#[test]
fn response_round_trips() {
    let mut buf = [0u8; MAX_RESPONSE_LEN];
    let mut w = ResponseWriter::new(&mut buf, 3).unwrap();
    w.set(
        0,
        OpStatus {
            status: Status::Ok,
            value: 5,
        },
    );
    w.set(1, OpStatus::new(Status::Miss));
    w.set(2, OpStatus::new(Status::OverQuota));
    let len = w.finish(ResponseHeader {
        num_ops: 3,
        status: Status::Ok,
        tag: 77,
    });
    assert_eq!(len, response_len(3));
    let r = Response::parse(&buf[..len]).unwrap();
    assert_eq!(
        r.header(),
        ResponseHeader {
            num_ops: 3,
            status: Status::Ok,
            tag: 77
        }
    );
    assert_eq!(
        r.status(0),
        Ok(OpStatus {
            status: Status::Ok,
            value: 5
        })
    );
    assert_eq!(r.status(1).unwrap().status, Status::Miss);
    assert_eq!(r.status(2).unwrap().status, Status::OverQuota);
    assert!(r.status(3).is_err());
    assert!(Response::parse(&buf[..len - 1]).is_err());
    assert!(ResponseWriter::new(&mut [0u8; 20], 1).is_err());

    let mut bad = buf;
    bad[4] = 0xff;
    assert!(matches!(
        Response::parse(&bad[..len]),
        Err(WireError::UnknownStatus(_))
    ));
}

#[test]
fn every_status_round_trips() {
    for code in 0..=u16::MAX {
        if let Ok(s) = Status::from_u16(code) {
            assert_eq!(s as u16, code);
            assert!(!s.name().is_empty());
        } else {
            assert!(code > Status::DeviceError as u16);
        }
    }
}

#[test]
fn config_round_trips_and_validates() {
    let cfg = DeviceConfig::new(4);
    let b = cfg.encode();
    assert_eq!(DeviceConfig::decode(&b), Ok(cfg));
    assert_eq!(&b[0..2], &4u16.to_le_bytes());
    let mut bad = b;
    bad[6] = 13;
    assert_eq!(DeviceConfig::decode(&bad), Err(WireError::BadPageShift(13)));
    let mut bad = b;
    bad[2..4].copy_from_slice(&500u16.to_le_bytes());
    assert_eq!(DeviceConfig::decode(&bad), Err(WireError::TooManyOps(500)));
    assert!(DeviceConfig::decode(&b[..15]).is_err());
    // The generation is at offset 12, little-endian, and round-trips.
    let cfg = DeviceConfig::new(1).with_generation(0xdead_beef);
    let b = cfg.encode();
    assert_eq!(&b[12..16], &0xdead_beefu32.to_le_bytes());
    assert_eq!(&b[10..12], &[0, 0]);
    assert_eq!(DeviceConfig::decode(&b), Ok(cfg));
}

/// xorshift64*: enough randomness to sweep decoders without a dependency.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[test]
fn decoders_never_panic_on_random_bytes() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut buf = [0u8; MAX_REQUEST_LEN + 32];
    for round in 0..20_000 {
        let len = (rng.next() as usize) % buf.len();
        for b in buf.iter_mut() {
            *b = rng.next() as u8;
        }
        // Make a valid-looking header half the time so op decoding is reached.
        if round % 2 == 0 && len >= REQUEST_HEADER_SIZE {
            buf[0..2].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
            buf[4..8].fill(0);
            let n = ((len - REQUEST_HEADER_SIZE) / OP_DESC_SIZE).clamp(1, 128) as u16;
            buf[2..4].copy_from_slice(&n.to_le_bytes());
        }
        let bytes = &buf[..len];
        if let Ok(req) = Request::parse(bytes) {
            let _ = req.page_buffers();
            for i in 0..req.num_ops() + 2 {
                if let Ok(op) = req.op(i) {
                    assert_eq!(Op::decode(&op.encode()), Ok(op), "decode(encode(op)) == op");
                }
            }
        }
        let _ = Op::decode(bytes);
        if let Ok(r) = Response::parse(bytes) {
            for i in 0..r.header().num_ops + 1 {
                let _ = r.status(i);
            }
        }
        let _ = DeviceConfig::decode(bytes);
    }
}

#[test]
fn uuid_text_round_trip_and_refusals() {
    use core::str::FromStr;
    extern crate std;
    use std::string::ToString;

    let u = Uuid::from_str("00112233-4455-6677-8899-aabbccddeeff").unwrap();
    assert_eq!(u.to_string(), "00112233-4455-6677-8899-aabbccddeeff");
    assert_eq!(Uuid::from_str(" 00112233445566778899AABBCCDDEEFF\n"), Ok(u));
    assert_eq!(u.as_bytes()[0], 0x00);
    assert_eq!(u.as_bytes()[15], 0xff);
    assert_eq!(Uuid::from_str("0011"), Err(UuidError::Malformed));
    assert_eq!(
        Uuid::from_str("00112233-4455-6677-8899-aabbccddeeff00"),
        Err(UuidError::Malformed)
    );
    assert_eq!(
        Uuid::from_str("zz112233445566778899aabbccddeeff"),
        Err(UuidError::Malformed)
    );
    assert_eq!(
        Uuid::from_str("00000000-0000-0000-0000-000000000000"),
        Err(UuidError::Nil)
    );
    assert_eq!(Uuid::from_bytes([0; 16]), None);
}

#[test]
fn shared_pool_uuid_survives_the_wire() {
    let uuid = Uuid::from_bytes([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]).unwrap();
    let op = Op::NewPool(PoolSpec::shared(uuid));
    assert_eq!(Op::decode(&op.encode()), Ok(op));
}
