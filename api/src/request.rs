// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The control requests, their one wire shape and their results
//! (`docs/control-api.md`).
//!
//! ```text
//! -> {"version":1,"command":"set-quota","args":{"vm":"vm1","persistent":536870912,"ephemeral":"1G"}}
//! <- {"ok":true,"result":null}
//! ```

use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use serde_with::{serde_as, DisplayFromStr};
use vtmem_protocol::Uuid;
use vtmem_store::{ClientStats, StoreStats};

use crate::spec::VmSpec;
use crate::types::{optional_dedup_group, ByteSize, DedupGroup, Quota, VmName, Weight};

/// The control API version this crate speaks.
pub const CONTROL_API_VERSION: u64 = 1;

/// Longest request line a daemon accepts.
pub const MAX_LINE: usize = 64 * 1024;

/// A control request. On the wire: `{"version":1,"command":C,"args":A}`
/// where `C` is the variant's name in kebab case and `A` its fields (may
/// be omitted or null for commands without arguments). Unknown commands,
/// unknown or missing arguments and wrongly typed values are errors.
#[serde_as]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(
    tag = "command",
    content = "args",
    rename_all = "kebab-case",
    rename_all_fields = "snake_case",
    deny_unknown_fields
)]
pub enum Request {
    /// The store's statistics and the uptime: [`StatusReport`].
    Status {},
    /// Every VM: `Vec<`[`VmDetails`]`>`.
    List {},
    /// One VM: [`VmDetails`].
    Show {
        /// The VM.
        vm: VmName,
    },
    /// Serves a new VM: [`VmInfo`].
    AddVm(VmSpec),
    /// Stops serving a VM and frees everything it holds.
    RemoveVm {
        /// The VM.
        vm: VmName,
    },
    /// Changes one or both quotas (at least one).
    SetQuota {
        /// The VM.
        vm: VmName,
        /// New persistent quota.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        persistent: Option<Quota>,
        /// New ephemeral quota.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ephemeral: Option<Quota>,
    },
    /// Changes the weight.
    SetWeight {
        /// The VM.
        vm: VmName,
        /// The new weight.
        weight: Weight,
    },
    /// Changes the host limit (more than 0 bytes).
    SetLimit {
        /// The new limit.
        bytes: ByteSize,
    },
    /// Moves a VM that holds no pages into another dedup group (or none).
    SetDedupGroup {
        /// The VM.
        vm: VmName,
        /// The group; null, absent or "none" for no group.
        #[serde(default, with = "optional_dedup_group")]
        group: Option<DedupGroup>,
    },
    /// Lets a VM create or join the shared pool `uuid`.
    Auth {
        /// The VM.
        vm: VmName,
        /// The shared pool's UUID.
        #[serde_as(as = "DisplayFromStr")]
        uuid: Uuid,
    },
    /// Withdraws that permission (a VM already in the pool stays in it).
    Deauth {
        /// The VM.
        vm: VmName,
        /// The shared pool's UUID.
        #[serde_as(as = "DisplayFromStr")]
        uuid: Uuid,
    },
    /// Refuses the VM's unreserved puts until `thaw`.
    Freeze {
        /// The VM.
        vm: VmName,
    },
    /// Accepts its puts again.
    Thaw {
        /// The VM.
        vm: VmName,
    },
    /// Drops the VM's pages (only ephemeral ones if asked).
    Flush {
        /// The VM.
        vm: VmName,
        /// Keep persistent pages.
        #[serde(default)]
        ephemeral_only: bool,
    },
}

impl Request {
    /// The command's name on the wire.
    pub fn command(&self) -> &'static str {
        match self {
            Request::Status {} => "status",
            Request::List {} => "list",
            Request::Show { .. } => "show",
            Request::AddVm(_) => "add-vm",
            Request::RemoveVm { .. } => "remove-vm",
            Request::SetQuota { .. } => "set-quota",
            Request::SetWeight { .. } => "set-weight",
            Request::SetLimit { .. } => "set-limit",
            Request::SetDedupGroup { .. } => "set-dedup-group",
            Request::Auth { .. } => "auth",
            Request::Deauth { .. } => "deauth",
            Request::Freeze { .. } => "freeze",
            Request::Thaw { .. } => "thaw",
            Request::Flush { .. } => "flush",
        }
    }

    /// Whether a successful request changes what the state file records.
    pub fn changes_state(&self) -> bool {
        match self {
            Request::Status {}
            | Request::List {}
            | Request::Show { .. }
            | Request::Flush { .. } => false,
            Request::AddVm(_)
            | Request::RemoveVm { .. }
            | Request::SetQuota { .. }
            | Request::SetWeight { .. }
            | Request::SetLimit { .. }
            | Request::SetDedupGroup { .. }
            | Request::Auth { .. }
            | Request::Deauth { .. }
            | Request::Freeze { .. }
            | Request::Thaw { .. } => true,
        }
    }

    /// The request line (without its newline).
    pub fn to_line(&self) -> String {
        let mut value = serde_json::to_value(self).unwrap_or(Value::Null);
        if let Value::Object(map) = &mut value {
            map.insert("version".into(), CONTROL_API_VERSION.into());
        }
        value.to_string()
    }

    /// Parses a request line. The error is one line for the client.
    pub fn parse_line(line: &str) -> Result<Request, String> {
        let value: Value =
            serde_json::from_str(line).map_err(|e| format!("malformed request: {e}"))?;
        let Value::Object(mut map) = value else {
            return Err("malformed request: not a JSON object".to_string());
        };
        match map.remove("version") {
            Some(v) if v.as_u64() == Some(CONTROL_API_VERSION) => {}
            Some(v) => {
                return Err(format!(
                    "unsupported control API version {v} (this vtmemd speaks {CONTROL_API_VERSION})"
                ))
            }
            None => return Err("malformed request: no \"version\"".to_string()),
        }
        let command = map
            .get("command")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        if let Some(extra) = map
            .keys()
            .find(|k| !matches!(k.as_str(), "command" | "args"))
        {
            return Err(format!("malformed request: unknown field \"{extra}\""));
        }
        if map.get("args").is_none_or(Value::is_null) {
            map.insert("args".into(), Value::Object(Map::new()));
        }
        serde_json::from_value(Value::Object(map)).map_err(|e| {
            let e = e.to_string();
            if e.contains("unknown variant") {
                format!("unknown command '{command}' ({e})")
            } else if e.contains("missing field `command`") {
                format!("malformed request: {e}")
            } else {
                format!("{command}: bad arguments: {e}")
            }
        })
    }
}

/// The answer line to a request that succeeded with `result`.
pub fn ok_line<T: Serialize>(result: &T) -> String {
    match serde_json::to_value(result) {
        Ok(result) => serde_json::json!({"ok": true, "result": result}).to_string(),
        Err(e) => error_line(&format!("cannot encode the result: {e}")),
    }
}

/// The answer line to a request that failed; `msg` is folded to one line.
pub fn error_line(msg: &str) -> String {
    let msg = msg.split_whitespace().collect::<Vec<_>>().join(" ");
    serde_json::json!({"ok": false, "error": msg}).to_string()
}

/// Why an answer line is not a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AnswerError {
    /// The daemon refused the request (its one-line message).
    #[error("{0}")]
    Refused(String),
    /// The line is not an answer.
    #[error("malformed answer from vtmemd: {0}")]
    Malformed(String),
}

/// Parses an answer line into its result, or the daemon's error.
pub fn parse_answer(line: &str) -> Result<Value, AnswerError> {
    let bad = |what: &str| AnswerError::Malformed(what.to_string());
    let value: Value = serde_json::from_str(line.trim()).map_err(|e| bad(&e.to_string()))?;
    let Value::Object(mut map) = value else {
        return Err(bad("not a JSON object"));
    };
    match map.get("ok") {
        Some(Value::Bool(true)) => Ok(map.remove("result").unwrap_or(Value::Null)),
        Some(Value::Bool(false)) => {
            let msg = match map.remove("error") {
                Some(Value::String(s)) => s,
                Some(other) => other.to_string(),
                None => "vtmemd reported an error without a message".to_string(),
            };
            Err(AnswerError::Refused(
                msg.split_whitespace().collect::<Vec<_>>().join(" "),
            ))
        }
        _ => Err(bad("no boolean \"ok\"")),
    }
}

/// The result of `status`: the store's statistics and the daemon's uptime.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct StatusReport {
    /// The store's statistics (every client included).
    #[serde(flatten)]
    pub store: StoreStats,
    /// Seconds since vtmemd started (millisecond precision).
    #[serde(default)]
    pub uptime_seconds: f64,
    /// The state directory (`--state-dir`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<String>,
    /// What this start took back from the state directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recovered: Option<Recovery>,
}

/// What a start took back from the state directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Recovery {
    /// VMs whose pages were taken back.
    pub vms: u32,
    /// Their pools.
    pub pools: u64,
    /// Their persistent pages.
    pub pages: u64,
    /// Bytes of state read.
    pub bytes: u64,
    /// Seconds it took (millisecond precision).
    pub seconds: f64,
}

/// One VM as `list` and `add-vm` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmInfo {
    /// Name.
    pub name: VmName,
    /// Its vhost-user socket.
    pub socket: PathBuf,
    /// A VMM is attached now.
    pub connected: bool,
    /// Connections accepted since the VM was added.
    pub connections: u64,
    /// Unreserved puts are refused (`freeze`).
    pub frozen: bool,
    /// Its settings.
    pub config: VmSpec,
}

/// One VM as `show` and `list` show it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmDetails {
    /// The summary.
    #[serde(flatten)]
    pub info: VmInfo,
    /// The vhost-user device's counters.
    pub device: DeviceStats,
    /// The store's statistics of the VM's client.
    pub stats: ClientStats,
}

/// A VM's device counters, kept across connections. Missing fields read as
/// zero, so clients accept answers from older daemons.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct DeviceStats {
    /// Chains taken from the rings.
    pub chains: u64,
    /// Operations executed (valid or not) in valid chains.
    pub ops: u64,
    /// Operations that failed to decode (unknown opcode, bad flags...).
    pub invalid_ops: u64,
    /// Valid chains holding at least one `GET`.
    pub get_chains: u64,
    /// `GET` operations in those chains (`get_ops / get_chains`: pages a
    /// batched read carries).
    pub get_ops: u64,
    /// Chains answered with a request-level error status.
    pub rejected_chains: u64,
    /// Chains returned with used length 0.
    pub dropped_chains: u64,
    /// Notifications sent to the guest (used-ring interrupts).
    pub notifications: u64,
    /// Queue events handled (kicks, and rings found busy when enabled).
    pub kicks: u64,
    /// Batches found by busy-polling instead of waiting for a kick.
    pub poll_hits: u64,
    /// Busy-poll spins that found nothing.
    #[serde(default)]
    pub poll_misses: u64,
    /// Microseconds spent busy-polling (CPU time of the spins).
    #[serde(default)]
    pub poll_us: u64,
    /// Page bytes copied in from guest memory by PUTs.
    pub bytes_from_guest: u64,
    /// Page bytes copied out to guest memory by GETs.
    pub bytes_to_guest: u64,
    /// Device states sent to a migration destination.
    #[serde(default)]
    pub state_exports: u64,
    /// Device states taken from a migration source.
    #[serde(default)]
    pub state_imports: u64,
    /// Device-state transfers that failed (either direction).
    #[serde(default)]
    pub state_failures: u64,
    /// Non-idempotent operations offered again after a crash and answered
    /// from their records instead of running twice (docs/protocol.md
    /// section 8).
    #[serde(default)]
    pub replayed_answers: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmName {
        name.parse().unwrap()
    }

    #[test]
    fn every_request_round_trips_through_its_line() {
        let uuid: Uuid = "00112233-4455-6677-8899-aabbccddeeff".parse().unwrap();
        let all = [
            Request::Status {},
            Request::List {},
            Request::Show { vm: vm("a") },
            Request::AddVm(
                "a,weight=3,auth=00112233445566778899aabbccddeeff"
                    .parse()
                    .unwrap(),
            ),
            Request::RemoveVm { vm: vm("a") },
            Request::SetQuota {
                vm: vm("a"),
                persistent: Some(Quota::Unlimited),
                ephemeral: None,
            },
            Request::SetWeight {
                vm: vm("a"),
                weight: Weight::new(5).unwrap(),
            },
            Request::SetLimit {
                bytes: ByteSize(1 << 30),
            },
            Request::SetDedupGroup {
                vm: vm("a"),
                group: Some("web".parse().unwrap()),
            },
            Request::Auth { vm: vm("a"), uuid },
            Request::Deauth { vm: vm("a"), uuid },
            Request::Freeze { vm: vm("a") },
            Request::Thaw { vm: vm("a") },
            Request::Flush {
                vm: vm("a"),
                ephemeral_only: true,
            },
        ];
        for r in all {
            let line = r.to_line();
            let value: Value = serde_json::from_str(&line).unwrap();
            assert_eq!(value["command"], r.command(), "{line}");
            assert_eq!(value["version"], 1, "{line}");
            assert_eq!(Request::parse_line(&line), Ok(r), "{line}");
        }
    }

    #[test]
    fn documented_examples_parse() {
        let r = Request::parse_line(
            r#"{"version":1,"command":"set-quota","args":{"vm":"vm1","persistent":536870912,"ephemeral":"1G"}}"#,
        )
        .unwrap();
        assert_eq!(
            r,
            Request::SetQuota {
                vm: vm("vm1"),
                persistent: Some(Quota::Limited(ByteSize(512 << 20))),
                ephemeral: Some(Quota::Limited(ByteSize(1 << 30))),
            }
        );
        for line in [
            r#"{"version":1,"command":"status"}"#,
            r#"{"version":1,"command":"status","args":null}"#,
            r#"{"version":1,"command":"status","args":{}}"#,
        ] {
            assert_eq!(Request::parse_line(line), Ok(Request::Status {}), "{line}");
        }
        let r = Request::parse_line(
            r#"{"version":1,"command":"add-vm","args":{"name":"b","persistent_quota":"1G","dedup_group":"none"}}"#,
        )
        .unwrap();
        let Request::AddVm(spec) = r else {
            panic!("{r:?}")
        };
        assert_eq!(spec.persistent_quota, Quota::Limited(ByteSize(1 << 30)));
        assert_eq!(spec.dedup_group, None);
    }

    #[test]
    fn one_shape_only_and_clear_errors() {
        let err = |line: &str| Request::parse_line(line).unwrap_err();
        // Arguments beside "command" (the second shape older daemons took).
        assert!(err(r#"{"version":1,"command":"show","vm":"a"}"#).contains("unknown field \"vm\""));
        assert!(err(r#"{"version":2,"command":"status"}"#).contains("version 2"));
        assert!(err(r#"{"command":"status"}"#).contains("no \"version\""));
        let e = err(r#"{"version":1,"command":"dance"}"#);
        assert!(
            e.starts_with("unknown command 'dance'") && e.contains("`add-vm`"),
            "{e}"
        );
        assert!(err("[1]").contains("not a JSON object"));
        assert!(err("{").contains("malformed"));
        let e = err(r#"{"version":1,"command":"show","args":{"vm":"a","x":1}}"#);
        assert!(e.starts_with("show: bad arguments"), "{e}");
        let e = err(r#"{"version":1,"command":"show","args":{}}"#);
        assert!(e.contains("missing field `vm`"), "{e}");
        let e = err(r#"{"version":1,"command":"set-weight","args":{"vm":"a","weight":0}}"#);
        assert!(e.contains("weight"), "{e}");
        let e = err(r#"{"version":1,"command":"show","args":{"vm":"../etc"}}"#);
        assert!(e.contains("VM name"), "{e}");
        let e = err(r#"{"version":1,"command":"status","args":{"verbose":true}}"#);
        assert!(e.contains("unknown field"), "{e}");
    }

    #[test]
    fn answers() {
        assert_eq!(parse_answer(&ok_line(&[1])), Ok(serde_json::json!([1])));
        assert_eq!(parse_answer("{\"ok\":true}"), Ok(Value::Null));
        assert_eq!(
            parse_answer(&error_line("two\nlines")),
            Err(AnswerError::Refused("two lines".into()))
        );
        for bad in ["hello", "[true]", "{\"ok\":1}"] {
            assert!(
                matches!(parse_answer(bad), Err(AnswerError::Malformed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn state_changing_requests() {
        assert!(!Request::Status {}.changes_state());
        assert!(!Request::Flush {
            vm: vm("a"),
            ephemeral_only: false
        }
        .changes_state());
        assert!(Request::Freeze { vm: vm("a") }.changes_state());
        assert!(Request::SetLimit { bytes: ByteSize(1) }.changes_state());
    }
}
