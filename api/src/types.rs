// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! One validated type per concept: a value of these types is valid by
//! construction, whether it came from a command line, a TOML file, a
//! control request or the state file, because each has exactly one parser.

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// Why a value does not parse. One line, naming the value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// A VM name that cannot be one.
    #[error("invalid VM name '{0}': 1 to 64 of A-Z a-z 0-9 . _ -, not starting with '.' or '-'")]
    VmName(String),
    /// A size that does not parse or overflows.
    #[error("invalid size '{0}': expected bytes or a number with K, M, G or T (e.g. 512M)")]
    Size(String),
    /// A quota that does not parse.
    #[error("invalid quota '{0}': expected a size (e.g. 512M) or 'unlimited'")]
    Quota(String),
    /// A weight out of range.
    #[error("invalid weight '{0}': expected a whole number from 1 to 1000000")]
    Weight(String),
    /// A dedup group name that cannot be one.
    #[error("invalid dedup group '{0}': 1 to 64 printable ASCII characters without ',' ('none' means no group)")]
    DedupGroup(String),
    /// A user or group that is neither a name nor a number.
    #[error("invalid user or group '{0}': a name (letters, digits, '_', '-', '.') or a number")]
    Principal(String),
    /// A socket mode that is not octal permission bits.
    #[error("invalid socket mode '{0}': octal permission bits such as 0660")]
    SocketMode(String),
    /// A UUID that does not parse, or the nil UUID.
    #[error("invalid UUID '{text}': {reason}")]
    Uuid {
        /// The text given.
        text: String,
        /// Why it is not a UUID.
        reason: vtmem_protocol::UuidError,
    },
}

/// Parses a UUID, naming the text in the error.
pub fn parse_uuid(text: &str) -> Result<vtmem_protocol::Uuid, ValueError> {
    text.parse().map_err(|reason| ValueError::Uuid {
        text: text.to_string(),
        reason,
    })
}

/// Implements serde for a type through its `FromStr` and `Display`.
macro_rules! serde_via_text {
    ($t:ty, $what:literal) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }

        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl Visitor<'_> for V {
                    type Value = $t;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str($what)
                    }
                    fn visit_str<E: de::Error>(self, v: &str) -> Result<$t, E> {
                        v.parse().map_err(E::custom)
                    }
                }
                d.deserialize_str(V)
            }
        }
    };
}

/// Longest VM name.
pub const MAX_VM_NAME_LEN: usize = 64;

/// A VM's name: its identity in the store, its socket `<name>.sock`, its
/// control-API key. 1 to [`MAX_VM_NAME_LEN`] characters of
/// `A-Z a-z 0-9 . _ -`, not starting with `.` or `-` (so it is never a
/// hidden file, an option, or a path).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct VmName(String);

impl VmName {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for VmName {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let ok = !s.is_empty()
            && s.len() <= MAX_VM_NAME_LEN
            && !s.starts_with(['.', '-'])
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(VmName(s.to_string()))
        } else {
            Err(ValueError::VmName(s.to_string()))
        }
    }
}

impl fmt::Display for VmName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for VmName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl std::borrow::Borrow<str> for VmName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

serde_via_text!(VmName, "a VM name");

/// A number of bytes. Parsed from plain bytes or a number with a binary
/// unit (`K`, `M`, `G`, `T`, optionally followed by `i`, `iB` or `B`, any
/// case); shown in the largest unit that divides it (`512M`). In JSON and
/// TOML it is an integer (bytes) or such a string; it is written as an
/// integer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// The size in bytes.
    pub const fn bytes(self) -> u64 {
        self.0
    }
}

impl FromStr for ByteSize {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let bad = || ValueError::Size(s.to_string());
        let t = s.trim();
        let digits_end = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(digits_end);
        if num.is_empty() {
            return Err(bad());
        }
        let num: u64 = num.parse().map_err(|_| bad())?;
        let unit = unit.trim().to_ascii_lowercase();
        let unit = unit
            .strip_suffix("ib")
            .or_else(|| unit.strip_suffix('b'))
            .or_else(|| unit.strip_suffix('i'))
            .unwrap_or(&unit);
        let shift = match unit {
            "" => 0,
            "k" => 10,
            "m" => 20,
            "g" => 30,
            "t" => 40,
            _ => return Err(bad()),
        };
        num.checked_mul(1u64 << shift).map(ByteSize).ok_or_else(bad)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, unit) in [(40, "T"), (30, "G"), (20, "M"), (10, "K")] {
            if self.0 != 0 && self.0 % (1u64 << shift) == 0 {
                return write!(f, "{}{unit}", self.0 >> shift);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

/// Deserialises from an integer or a text through `FromStr`.
struct NumberOrText<T>(std::marker::PhantomData<T>, &'static str);

impl<T> Visitor<'_> for NumberOrText<T>
where
    T: FromStr + From<u64>,
    T::Err: fmt::Display,
{
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.1)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        Ok(T::from(v))
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        u64::try_from(v)
            .map(T::from)
            .map_err(|_| E::custom(format!("{v} is negative")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}

impl From<u64> for ByteSize {
    fn from(bytes: u64) -> Self {
        ByteSize(bytes)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumberOrText(
            std::marker::PhantomData,
            "bytes, or a size such as \"512M\"",
        ))
    }
}

/// A quota: a limit in bytes, or none. `unlimited` (also `none`, `max`)
/// parses as [`Quota::Unlimited`]; in JSON an unlimited quota is written as
/// 18446744073709551615 (2^64 − 1), which also reads back as unlimited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Quota {
    /// No limit.
    #[default]
    Unlimited,
    /// At most this many bytes.
    Limited(ByteSize),
}

impl Quota {
    /// The limit in bytes, `u64::MAX` for unlimited (the store's encoding).
    pub const fn bytes(self) -> u64 {
        match self {
            Quota::Unlimited => u64::MAX,
            Quota::Limited(b) => b.0,
        }
    }
}

impl From<u64> for Quota {
    fn from(bytes: u64) -> Self {
        if bytes == u64::MAX {
            Quota::Unlimited
        } else {
            Quota::Limited(ByteSize(bytes))
        }
    }
}

impl FromStr for Quota {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match s.trim().to_ascii_lowercase().as_str() {
            "unlimited" | "none" | "max" => Ok(Quota::Unlimited),
            _ => s
                .parse::<ByteSize>()
                .map(|b| Quota::from(b.0))
                .map_err(|_| ValueError::Quota(s.to_string())),
        }
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Quota::Unlimited => f.write_str("unlimited"),
            Quota::Limited(b) => b.fmt(f),
        }
    }
}

impl Serialize for Quota {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.bytes())
    }
}

impl<'de> Deserialize<'de> for Quota {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NumberOrText(
            std::marker::PhantomData,
            "bytes, a size such as \"512M\", or \"unlimited\"",
        ))
    }
}

/// Largest weight.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// A VM's weight in sharing ephemeral memory: 1 to [`MAX_WEIGHT`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Weight(u32);

impl Weight {
    /// The weight a VM gets unless told otherwise.
    pub const DEFAULT: Weight = Weight(100);

    /// The weight, if `w` is in range.
    pub fn new(w: u64) -> Result<Self, ValueError> {
        match u32::try_from(w) {
            Ok(w) if (1..=MAX_WEIGHT).contains(&w) => Ok(Weight(w)),
            _ => Err(ValueError::Weight(w.to_string())),
        }
    }

    /// Its value.
    pub const fn get(self) -> u32 {
        self.0
    }
}

impl Default for Weight {
    fn default() -> Self {
        Weight::DEFAULT
    }
}

impl FromStr for Weight {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let w: u64 = s
            .trim()
            .parse()
            .map_err(|_| ValueError::Weight(s.to_string()))?;
        Weight::new(w)
    }
}

impl fmt::Display for Weight {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl Serialize for Weight {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u32(self.0)
    }
}

impl<'de> Deserialize<'de> for Weight {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = u64::deserialize(d)?;
        Weight::new(w).map_err(de::Error::custom)
    }
}

/// A dedup group's name: 1 to 64 printable ASCII characters without `,`.
///
/// `none` is not a group: wherever a group is given as text (`--vm`, TOML,
/// the control API, the state file), `none` and the empty string mean "no
/// group" ([`parse_dedup_group`]).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DedupGroup(String);

impl DedupGroup {
    /// The name as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for DedupGroup {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s != "none"
            && s.chars().all(|c| c.is_ascii_graphic() && c != ',');
        if ok {
            Ok(DedupGroup(s.to_string()))
        } else {
            Err(ValueError::DedupGroup(s.to_string()))
        }
    }
}

impl fmt::Display for DedupGroup {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

serde_via_text!(DedupGroup, "a dedup group name");

/// Parses an optional dedup group: `none` or nothing means no group.
pub fn parse_dedup_group(s: &str) -> Result<Option<DedupGroup>, ValueError> {
    match s.trim() {
        "" | "none" => Ok(None),
        g => g.parse().map(Some),
    }
}

/// Serde of `Option<DedupGroup>`: null, `""` and `"none"` are no group.
pub mod optional_dedup_group {
    use super::*;

    /// Writes the group's name, or null.
    pub fn serialize<S: Serializer>(g: &Option<DedupGroup>, s: S) -> Result<S::Ok, S::Error> {
        g.serialize(s)
    }

    /// Reads null, `""`, `"none"` or a group name.
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<DedupGroup>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(text) => parse_dedup_group(&text).map_err(de::Error::custom),
        }
    }
}

/// A user or a group as the administrator names it: a name from the
/// system's databases or a numeric id. Resolved by the daemon when it
/// creates a socket.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Principal(String);

impl Principal {
    /// The name or number as given.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The numeric id, if it was given as a number.
    pub fn id(&self) -> Option<u32> {
        self.0.parse().ok()
    }
}

impl FromStr for Principal {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        let ok = !s.is_empty()
            && s.len() <= 32
            && !s.starts_with('-')
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'));
        if ok {
            Ok(Principal(s.to_string()))
        } else {
            Err(ValueError::Principal(s.to_string()))
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

serde_via_text!(Principal, "a user or group name, or a number");

/// The permission bits of a socket: octal, at most `0777`, written with a
/// leading zero (`0660`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SocketMode(u32);

impl SocketMode {
    /// Owner read and write only: the default of a VM socket.
    pub const PRIVATE: SocketMode = SocketMode(0o600);
    /// Owner and group read and write.
    pub const GROUP: SocketMode = SocketMode(0o660);

    /// The permission bits.
    pub const fn bits(self) -> u32 {
        self.0
    }
}

impl FromStr for SocketMode {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, ValueError> {
        match u32::from_str_radix(s.trim(), 8) {
            Ok(bits) if bits <= 0o777 && !s.trim().is_empty() => Ok(SocketMode(bits)),
            _ => Err(ValueError::SocketMode(s.to_string())),
        }
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

serde_via_text!(SocketMode, "octal permission bits such as \"0660\"");

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names() {
        for good in ["a", "vm-1", "web.prod_2", &"x".repeat(64)] {
            assert_eq!(good.parse::<VmName>().unwrap().as_str(), good);
        }
        for bad in ["", ".a", "-a", "a/b", "a b", "é", &"x".repeat(65)] {
            assert!(bad.parse::<VmName>().is_err(), "{bad:?}");
        }
        let n: VmName = serde_json::from_str("\"vm1\"").unwrap();
        assert_eq!(serde_json::to_string(&n).unwrap(), "\"vm1\"");
        assert!(serde_json::from_str::<VmName>("\"../x\"").is_err());
    }

    #[test]
    fn sizes() {
        let p = |s: &str| s.parse::<ByteSize>().map(ByteSize::bytes);
        assert_eq!(p("0"), Ok(0));
        assert_eq!(p("4096"), Ok(4096));
        assert_eq!(p("512M"), Ok(512 << 20));
        assert_eq!(p("2g"), Ok(2 << 30));
        assert_eq!(p("3GiB"), Ok(3 << 30));
        assert_eq!(p(" 7 KB "), Ok(7 << 10));
        assert_eq!(p("1T"), Ok(1 << 40));
        for bad in ["", "M", "1.5G", "-1", "12X", "99999999999T"] {
            assert!(p(bad).is_err(), "{bad:?}");
        }
        assert_eq!(ByteSize(512 << 20).to_string(), "512M");
        assert_eq!(ByteSize(1000).to_string(), "1000");
        assert_eq!(ByteSize(0).to_string(), "0");
        let from_json = |j: &str| serde_json::from_str::<ByteSize>(j).map(ByteSize::bytes);
        assert_eq!(from_json("4096").unwrap(), 4096);
        assert_eq!(from_json("\"1G\"").unwrap(), 1 << 30);
        assert!(from_json("-1").is_err());
        assert!(from_json("\"lots\"").is_err());
        assert_eq!(
            serde_json::to_string(&ByteSize(1 << 30)).unwrap(),
            "1073741824"
        );
    }

    #[test]
    fn quotas() {
        assert_eq!("unlimited".parse::<Quota>(), Ok(Quota::Unlimited));
        assert_eq!("MAX".parse::<Quota>(), Ok(Quota::Unlimited));
        assert_eq!("1G".parse::<Quota>().unwrap().bytes(), 1 << 30);
        assert!("lots".parse::<Quota>().is_err());
        assert_eq!(Quota::Unlimited.bytes(), u64::MAX);
        assert_eq!(Quota::from(u64::MAX), Quota::Unlimited);
        let json = serde_json::to_string(&Quota::Unlimited).unwrap();
        assert_eq!(json, "18446744073709551615");
        assert_eq!(
            serde_json::from_str::<Quota>(&json).unwrap(),
            Quota::Unlimited
        );
        assert_eq!(
            serde_json::from_str::<Quota>("\"unlimited\"").unwrap(),
            Quota::Unlimited
        );
        assert_eq!(Quota::Limited(ByteSize(1 << 20)).to_string(), "1M");
    }

    #[test]
    fn weights() {
        assert_eq!("1".parse::<Weight>().unwrap().get(), 1);
        assert_eq!("1000000".parse::<Weight>().unwrap().get(), 1_000_000);
        for bad in ["0", "1000001", "-3", "x", "4294967297"] {
            assert!(bad.parse::<Weight>().is_err(), "{bad:?}");
        }
        assert!(serde_json::from_str::<Weight>("0").is_err());
        assert_eq!(Weight::default().get(), 100);
    }

    #[test]
    fn dedup_groups_none_means_no_group_everywhere() {
        assert_eq!(parse_dedup_group("none"), Ok(None));
        assert_eq!(parse_dedup_group(""), Ok(None));
        assert_eq!(parse_dedup_group("web").unwrap().unwrap().as_str(), "web");
        assert!("none".parse::<DedupGroup>().is_err());
        assert!("a,b".parse::<DedupGroup>().is_err());
        assert!("a b".parse::<DedupGroup>().is_err());
        #[derive(Deserialize)]
        struct T {
            #[serde(with = "optional_dedup_group", default)]
            g: Option<DedupGroup>,
        }
        let t: T = serde_json::from_str(r#"{"g":"none"}"#).unwrap();
        assert_eq!(t.g, None);
        let t: T = serde_json::from_str(r#"{"g":null}"#).unwrap();
        assert_eq!(t.g, None);
        let t: T = serde_json::from_str(r#"{}"#).unwrap();
        assert_eq!(t.g, None);
        let t: T = serde_json::from_str(r#"{"g":"web"}"#).unwrap();
        assert_eq!(t.g.unwrap().as_str(), "web");
    }

    #[test]
    fn principals_and_modes() {
        assert_eq!("kvm".parse::<Principal>().unwrap().id(), None);
        assert_eq!("107".parse::<Principal>().unwrap().id(), Some(107));
        for bad in ["", "-x", "a:b", "a b", &"x".repeat(33)] {
            assert!(bad.parse::<Principal>().is_err(), "{bad:?}");
        }
        assert_eq!("0660".parse::<SocketMode>().unwrap().bits(), 0o660);
        assert_eq!("600".parse::<SocketMode>().unwrap(), SocketMode::PRIVATE);
        assert_eq!(SocketMode::GROUP.to_string(), "0660");
        for bad in ["", "0800", "1777", "rw", "-1"] {
            assert!(bad.parse::<SocketMode>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn uuids_name_the_text() {
        let e = parse_uuid("0000").unwrap_err();
        assert!(e.to_string().contains("'0000'"), "{e}");
        let e = parse_uuid("00000000-0000-0000-0000-000000000000").unwrap_err();
        assert!(e.to_string().contains("nil"), "{e}");
    }
}
