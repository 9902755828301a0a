// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control API on arbitrary request lines, as the control socket reads
//! them (bytes that are UTF-8): `Request::parse_line` must return a request
//! or an error (which the socket answers in one line), never panic, and
//! every request it accepts must survive `to_line` → `parse_line`
//! unchanged. The same holds for a `--vm` spec (`VmSpec`'s `FromStr` and
//! `Display`) and for each validated value type the requests carry.
#![no_main]

use std::fmt::Display;
use std::str::FromStr;

use libfuzzer_sys::fuzz_target;
use vtmem_api::request::error_line;
use vtmem_api::{ByteSize, DedupGroup, Quota, Request, VmName, VmSpec, Weight, MAX_LINE};

/// `text` parsed as a `T`, if it is one, must print back to text that
/// parses to the same `T`.
fn round_trip<T>(text: &str)
where
    T: FromStr + Display + PartialEq + std::fmt::Debug,
{
    if let Ok(v) = text.parse::<T>() {
        let printed = v.to_string();
        match printed.parse::<T>() {
            Ok(again) => assert_eq!(again, v, "{text:?} printed as {printed:?}"),
            Err(_) => panic!("{text:?} printed as {printed:?}, which does not parse"),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() > MAX_LINE {
        return;
    }
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Request::parse_line(text) {
        Ok(request) => {
            let line = request.to_line();
            assert!(!line.contains('\n'), "request line {line:?}");
            assert!(
                line.len() <= MAX_LINE,
                "request line of {} bytes",
                line.len()
            );
            match Request::parse_line(&line) {
                Ok(again) => assert_eq!(again, request, "{text:?} written as {line:?}"),
                Err(e) => panic!("{text:?} written as {line:?}, which is refused: {e}"),
            }
            assert!(!request.command().is_empty());
        }
        Err(e) => {
            // What the control socket sends back: one line.
            let answer = error_line(&e);
            assert!(!answer.contains('\n'), "answer {answer:?}");
        }
    }
    round_trip::<VmSpec>(text);
    round_trip::<VmName>(text);
    round_trip::<ByteSize>(text);
    round_trip::<Quota>(text);
    round_trip::<Weight>(text);
    round_trip::<DedupGroup>(text);
});
