// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Every decoder of the wire format on arbitrary bytes: the request header,
//! the request buffer and its operations, one operation, the response
//! header, an operation status, the response buffer, the configuration
//! space, opcodes, status codes and UUIDs. Each must return a value or a
//! typed error, never panic; anything it accepts must encode back to the
//! same value; and the page buffer an operation takes must follow from its
//! opcode byte alone (docs/protocol.md, section 5).
#![no_main]

use libfuzzer_sys::fuzz_target;
use vtmem_protocol::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(header) = RequestHeader::decode(data) {
        assert_eq!(RequestHeader::decode(&header.encode()), Ok(header));
    }
    if let Ok(req) = Request::parse(data) {
        let counts = req.page_buffers();
        assert!(counts.to_device + counts.from_device <= req.num_ops());
        assert_eq!(data.len(), request_len(req.num_ops()));
        // Rebuild the request from the operations that decode: the builder
        // must produce a request that parses to the same operations.
        let mut buf = [0u8; MAX_REQUEST_LEN];
        let mut builder = RequestBuilder::new(&mut buf).expect("room for a header");
        let mut ops = [None; MAX_OPS_PER_REQUEST as usize];
        for i in 0..req.num_ops() {
            let byte = req.opcode_byte(i);
            assert_eq!(Some(&byte), data.get(request_len(i)));
            if let Ok(op) = req.op(i) {
                assert_eq!(op.page_buffer(), PageBuffer::for_opcode_byte(byte));
                assert_eq!(Op::decode(&op.encode()), Ok(op));
                builder.push(&op).expect("a request holds its operations");
                ops[builder.num_ops() as usize - 1] = Some(op);
            }
        }
        assert!(req.op(req.num_ops()).is_err());
        let n = builder.num_ops();
        if n > 0 {
            let len = builder.finish(req.header().tag).expect("operations pushed");
            let again = Request::parse(&buf[..len]).expect("a built request parses");
            assert_eq!(again.header().tag, req.header().tag);
            for i in 0..n {
                assert_eq!(again.op(i).ok(), ops[i as usize]);
            }
        }
    }
    if let Ok(op) = Op::decode(data) {
        assert_eq!(Op::decode(&op.encode()), Ok(op));
        assert_eq!(op.page_buffer(), PageBuffer::for_opcode_byte(data[0]));
        assert_eq!(Opcode::from_u8(data[0]), Ok(op.opcode()));
    }
    if let Ok(header) = ResponseHeader::decode(data) {
        assert_eq!(ResponseHeader::decode(&header.encode()), Ok(header));
    }
    if let Ok(status) = OpStatus::decode(data) {
        assert_eq!(OpStatus::decode(&status.encode()), Ok(status));
    }
    if let Ok(resp) = Response::parse(data) {
        let header = resp.header();
        assert!(data.len() >= response_len(header.num_ops));
        // Write the statuses that decode back with the response writer.
        let mut buf = [0u8; MAX_RESPONSE_LEN];
        let mut writer = ResponseWriter::new(&mut buf, header.num_ops).expect("room");
        let mut all = true;
        for i in 0..header.num_ops {
            match resp.status(i) {
                Ok(s) => writer.set(i, s),
                Err(_) => all = false,
            }
        }
        assert!(resp.status(header.num_ops).is_err());
        let len = writer.finish(header);
        if all {
            let again = Response::parse(&buf[..len]).expect("a written response parses");
            assert_eq!(again.header(), header);
            for i in 0..header.num_ops {
                assert_eq!(again.status(i), resp.status(i));
            }
        }
    }
    if let Ok(cfg) = DeviceConfig::decode(data) {
        assert_eq!(DeviceConfig::decode(&cfg.encode()), Ok(cfg));
    }
    if let [a, b, ..] = *data {
        if let Ok(op) = Opcode::from_u8(a) {
            assert_eq!(op as u8, a);
        }
        let code = u16::from_le_bytes([a, b]);
        if let Ok(status) = Status::from_u16(code) {
            assert_eq!(status as u16, code);
            assert!(!status.name().is_empty());
        }
    }
    if let Ok(text) = core::str::from_utf8(data) {
        if let Ok(uuid) = text.parse::<Uuid>() {
            assert_eq!(uuid.to_string().parse::<Uuid>(), Ok(uuid));
            assert_eq!(Uuid::from_bytes(*uuid.as_bytes()), Some(uuid));
        }
    }
});
