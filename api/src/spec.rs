// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! [`VmSpec`]: one VM as the administrator describes it, parsed from a
//! `--vm` flag, a `[[vm]]` table of the configuration file, an `add-vm`
//! request or the state file by the same code.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use serde_with::{serde_as, DisplayFromStr};
use vtmem_protocol::Uuid;

use crate::types::{
    optional_dedup_group, parse_dedup_group, parse_uuid, DedupGroup, Principal, Quota, SocketMode,
    ValueError, VmName, Weight,
};

/// One VM: its name (the store client and the socket `<name>.sock`), and
/// the settings the store enforces for it.
///
/// In JSON and TOML the fields are `name`, `persistent_quota`,
/// `ephemeral_quota`, `weight`, `dedup_group` and `authorized_uuids`
/// (TOML files may spell them with dashes); all but `name` are optional,
/// and unknown fields are errors.
#[serde_as]
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM's name.
    pub name: VmName,
    /// Bytes of persistent (swap) pages it may hold.
    #[serde(default, alias = "persistent-quota")]
    pub persistent_quota: Quota,
    /// Bytes of ephemeral (page cache) pages it may hold; over it, its own
    /// oldest ones are evicted.
    #[serde(default, alias = "ephemeral-quota")]
    pub ephemeral_quota: Quota,
    /// Its weight in sharing ephemeral memory under host pressure.
    #[serde(default)]
    pub weight: Weight,
    /// The dedup group whose VMs share identical pages, if any.
    #[serde(default, alias = "dedup-group", with = "optional_dedup_group")]
    pub dedup_group: Option<DedupGroup>,
    /// UUIDs of the shared pools it may create or join (sorted, unique).
    #[serde(default, alias = "authorized-uuids")]
    #[serde_as(as = "BTreeSet<DisplayFromStr>")]
    pub authorized_uuids: BTreeSet<Uuid>,
    /// Owner of the VM's socket (default: the daemon's user). Whoever can
    /// connect to the socket is this VM, so this is the VM's identity.
    #[serde(
        default,
        alias = "socket-user",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_user: Option<Principal>,
    /// Group of the VM's socket (default: the daemon's group).
    #[serde(
        default,
        alias = "socket-group",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_group: Option<Principal>,
    /// Mode of the VM's socket (default: 0660 with a socket group, else 0600).
    #[serde(
        default,
        alias = "socket-mode",
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_mode: Option<SocketMode>,
}

impl VmSpec {
    /// A VM with default settings: unlimited quotas, weight 100, no dedup
    /// group, no shared pool authorised.
    pub fn new(name: VmName) -> Self {
        VmSpec {
            name,
            persistent_quota: Quota::Unlimited,
            ephemeral_quota: Quota::Unlimited,
            weight: Weight::DEFAULT,
            dedup_group: None,
            authorized_uuids: BTreeSet::new(),
            socket_user: None,
            socket_group: None,
            socket_mode: None,
        }
    }

    /// The mode its socket gets.
    pub fn socket_mode(&self) -> SocketMode {
        match (self.socket_mode, &self.socket_group) {
            (Some(mode), _) => mode,
            (None, Some(_)) => SocketMode::GROUP,
            (None, None) => SocketMode::PRIVATE,
        }
    }
}

/// Why a `--vm` spec does not parse.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("invalid VM spec '{spec}': {reason}")]
pub struct SpecError {
    /// The spec given.
    pub spec: String,
    /// What is wrong with it.
    pub reason: String,
}

/// The keys of a `--vm` spec.
pub const SPEC_KEYS: &str = "name, persistent-quota, ephemeral-quota, weight, dedup-group, auth, \
                             socket-user, socket-group, socket-mode";

impl FromStr for VmSpec {
    type Err = SpecError;

    /// Parses a `--vm` spec:
    /// `name=vm1,persistent-quota=512M,ephemeral-quota=1G,weight=100,dedup-group=web,auth=UUID`.
    /// `auth` may repeat; a first item without `=` is the name.
    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let bad = |reason: String| SpecError {
            spec: spec.to_string(),
            reason,
        };
        let value_err = |e: ValueError| bad(e.to_string());
        let mut name: Option<VmName> = None;
        let mut persistent_quota = Quota::Unlimited;
        let mut ephemeral_quota = Quota::Unlimited;
        let mut weight = Weight::DEFAULT;
        let mut dedup_group = None;
        let mut authorized_uuids = BTreeSet::new();
        let (mut socket_user, mut socket_group, mut socket_mode) = (None, None, None);
        for (i, item) in spec.split(',').enumerate() {
            let item = item.trim();
            if item.is_empty() {
                continue;
            }
            let (key, value) = match item.split_once('=') {
                Some((k, v)) => (k.trim(), v.trim()),
                None if i == 0 => ("name", item),
                None => return Err(bad(format!("'{item}' is not key=value"))),
            };
            match key {
                "name" => name = Some(value.parse().map_err(value_err)?),
                "persistent-quota" => persistent_quota = value.parse().map_err(value_err)?,
                "ephemeral-quota" => ephemeral_quota = value.parse().map_err(value_err)?,
                "weight" => weight = value.parse().map_err(value_err)?,
                "dedup-group" => dedup_group = parse_dedup_group(value).map_err(value_err)?,
                "auth" | "authorized-uuid" => {
                    authorized_uuids.insert(parse_uuid(value).map_err(value_err)?);
                }
                "socket-user" => socket_user = Some(value.parse().map_err(value_err)?),
                "socket-group" => socket_group = Some(value.parse().map_err(value_err)?),
                "socket-mode" => socket_mode = Some(value.parse().map_err(value_err)?),
                other => return Err(bad(format!("unknown key '{other}' (known: {SPEC_KEYS})"))),
            }
        }
        Ok(VmSpec {
            name: name.ok_or_else(|| bad("no name= given".to_string()))?,
            persistent_quota,
            ephemeral_quota,
            weight,
            dedup_group,
            authorized_uuids,
            socket_user,
            socket_group,
            socket_mode,
        })
    }
}

impl fmt::Display for VmSpec {
    /// The `--vm` form, which parses back to the same spec.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "name={},persistent-quota={},ephemeral-quota={},weight={},dedup-group={}",
            self.name,
            self.persistent_quota,
            self.ephemeral_quota,
            self.weight,
            self.dedup_group.as_ref().map_or("none", DedupGroup::as_str),
        )?;
        for uuid in &self.authorized_uuids {
            write!(f, ",auth={uuid}")?;
        }
        if let Some(u) = &self.socket_user {
            write!(f, ",socket-user={u}")?;
        }
        if let Some(g) = &self.socket_group {
            write!(f, ",socket-group={g}")?;
        }
        if let Some(m) = &self.socket_mode {
            write!(f, ",socket-mode={m}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::ByteSize;

    const UUID: &str = "00112233-4455-6677-8899-aabbccddeeff";

    fn full() -> VmSpec {
        let mut vm = VmSpec::new("vm1".parse().unwrap());
        vm.persistent_quota = Quota::Limited(ByteSize(512 << 20));
        vm.ephemeral_quota = Quota::Limited(ByteSize(1 << 30));
        vm.weight = Weight::new(7).unwrap();
        vm.dedup_group = Some("web".parse().unwrap());
        vm.authorized_uuids.insert(UUID.parse().unwrap());
        vm
    }

    #[test]
    fn flag_spec_parses_and_prints_back() {
        let vm: VmSpec = format!(
            "vm1,persistent-quota=512M,ephemeral-quota=1G,weight=7,dedup-group=web,auth={UUID},auth={}",
            UUID.to_uppercase()
        )
        .parse()
        .unwrap();
        assert_eq!(vm, full());
        assert_eq!(vm.to_string().parse::<VmSpec>().unwrap(), vm);
        let plain: VmSpec = "name=b".parse().unwrap();
        assert_eq!(plain, VmSpec::new("b".parse().unwrap()));
    }

    #[test]
    fn socket_ownership_in_every_form() {
        let flag: VmSpec = "vm1,socket-user=libvirt-qemu,socket-group=kvm"
            .parse()
            .unwrap();
        assert_eq!(flag.socket_mode(), SocketMode::GROUP);
        assert_eq!(flag.to_string().parse::<VmSpec>().unwrap(), flag);
        let toml_form: VmSpec = toml::from_str(
            "name = \"vm1\"\nsocket-user = \"libvirt-qemu\"\nsocket-group = \"kvm\"",
        )
        .unwrap();
        assert_eq!(toml_form, flag);
        let json = serde_json::to_string(&flag).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), flag);
        let plain: VmSpec = "vm2".parse().unwrap();
        assert_eq!(plain.socket_mode(), SocketMode::PRIVATE);
        let open: VmSpec = "vm3,socket-mode=0666".parse().unwrap();
        assert_eq!(open.socket_mode().bits(), 0o666);
        assert!("vm4,socket-mode=999".parse::<VmSpec>().is_err());
        assert!("vm4,socket-user=a:b".parse::<VmSpec>().is_err());
    }

    #[test]
    fn flag_spec_errors_name_the_problem() {
        for (spec, needle) in [
            ("persistent-quota=1G", "no name"),
            ("vm1,weight=0", "weight"),
            ("vm1,colour=red", "unknown key 'colour'"),
            ("vm1,oops", "not key=value"),
            ("../x", "VM name"),
            ("vm1,auth=00000000-0000-0000-0000-000000000000", "nil"),
            ("vm1,persistent-quota=lots", "quota"),
        ] {
            let e = spec.parse::<VmSpec>().unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }

    /// The finding this type fixes: `dedup-group=none` on the command line
    /// meant no group while `dedup-group = "none"` in TOML made a group
    /// named "none".
    #[test]
    fn none_means_no_group_in_every_form() {
        let flag: VmSpec = "vm1,dedup-group=none".parse().unwrap();
        let toml_form: VmSpec = toml::from_str("name = \"vm1\"\ndedup-group = \"none\"").unwrap();
        let json_form: VmSpec =
            serde_json::from_str(r#"{"name":"vm1","dedup_group":"none"}"#).unwrap();
        assert_eq!(flag.dedup_group, None);
        assert_eq!(toml_form, flag);
        assert_eq!(json_form, flag);
    }

    #[test]
    fn json_and_toml_agree_with_the_flag() {
        let json = serde_json::to_string(&full()).unwrap();
        assert_eq!(serde_json::from_str::<VmSpec>(&json).unwrap(), full());
        let toml_form: VmSpec = toml::from_str(&format!(
            "name = \"vm1\"\npersistent-quota = \"512M\"\nephemeral_quota = 1073741824\n\
             weight = 7\ndedup-group = \"web\"\nauthorized-uuids = [\"{UUID}\"]\n"
        ))
        .unwrap();
        assert_eq!(toml_form, full());
        assert!(serde_json::from_str::<VmSpec>(r#"{"name":"a","wieght":3}"#).is_err());
        assert!(serde_json::from_str::<VmSpec>(r#"{"name":"a","weight":0}"#).is_err());
        assert!(serde_json::from_str::<VmSpec>(r#"{"weight":3}"#).is_err());
        assert!(serde_json::from_str::<VmSpec>(
            r#"{"name":"a","authorized_uuids":["00000000000000000000000000000000"]}"#
        )
        .is_err());
    }
}
