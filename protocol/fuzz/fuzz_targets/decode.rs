// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! Every decoder must return a value or a typed error on any input, never
//! panic, and anything it accepts must re-encode to the same meaning.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vtmem_protocol::*;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = Request::parse(data) {
        let counts = req.page_buffers();
        assert!(counts.to_device + counts.from_device <= req.num_ops());
        for i in 0..=req.num_ops() {
            if let Ok(op) = req.op(i) {
                assert_eq!(Op::decode(&op.encode()), Ok(op));
            }
        }
    }
    if let Ok(op) = Op::decode(data) {
        assert_eq!(Op::decode(&op.encode()), Ok(op));
    }
    if let Ok(resp) = Response::parse(data) {
        for i in 0..=resp.header().num_ops {
            let _ = resp.status(i);
        }
    }
    if let Ok(cfg) = DeviceConfig::decode(data) {
        assert_eq!(DeviceConfig::decode(&cfg.encode()), Ok(cfg));
    }
});
