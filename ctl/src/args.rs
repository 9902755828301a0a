// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `vtmemctl`'s command line.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{ArgGroup, Args, Parser, Subcommand};

use vtmem_api::types::{parse_dedup_group, parse_uuid};
use vtmem_api::{
    ByteSize, DedupGroup, Quota, Uuid, VmName, VmSpec, Weight, CONTROL_SOCKET_ENV,
    DEFAULT_CONTROL_SOCKET,
};

const LONG_ABOUT: &str = "\
vtmemctl administers a running vtmemd through its control socket: store
status, per-VM statistics and a live view, quotas, weights, the host limit,
freezing, flushing, adding and removing VMs, dedup groups and shared-pool
authorisations.

The control socket is --socket PATH, else $VTMEM_CONTROL_SOCKET, else
/run/vtmem/vtmemd.ctl. Sizes take binary units (4096, 64K, 512M, 2G, 1T);
quotas also 'unlimited'. --json prints the daemon's result as JSON.

Exit status: 0 success, 1 vtmemd reported an error (e.g. an unknown VM),
2 usage error (bad option, size, UUID, name), 3 vtmemd cannot be reached.";

const AFTER_HELP: &str = "\
Examples:
  vtmemctl status
  vtmemctl list
  vtmemctl set-quota vm1 --persistent 512M --ephemeral 2G
  vtmemctl add-vm vm3 --persistent-quota 256M --weight 50 --dedup-group web
  vtmemctl top --interval 2";

/// `vtmemctl` command line.
#[derive(Clone, Debug, Parser)]
#[command(
    name = "vtmemctl",
    version,
    about = "Administer vtmemd, the vtmem transcendent-memory daemon",
    long_about = LONG_ABOUT,
    after_long_help = AFTER_HELP,
    propagate_version = true
)]
pub struct Cli {
    /// vtmemd's control socket; an empty variable counts as unset.
    #[arg(
        long,
        short = 's',
        global = true,
        value_name = "PATH",
        env = CONTROL_SOCKET_ENV,
        default_value = DEFAULT_CONTROL_SOCKET
    )]
    pub socket: PathBuf,
    /// Print the daemon's result as JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for each answer of the daemon.
    #[arg(long, global = true, value_name = "SECS", default_value = "30", value_parser = parse_timeout)]
    pub timeout: f64,
    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Debug, Subcommand)]
pub enum Command {
    /// Store status: host limit and use, pages, ratios, eviction rate.
    Status {
        /// Seconds between the two samples that measure the eviction
        /// rate; 0 skips sampling. Ignored with --json.
        #[arg(long, value_name = "SECS", default_value = "0.5", value_parser = parse_interval_or_zero)]
        interval: f64,
    },
    /// Every VM: pages and bytes by kind, quotas, weight, hit rate,
    /// refused puts, connection; then every pool.
    List,
    /// One VM in detail, with its pools and device counters.
    Show {
        /// VM name.
        vm: VmName,
    },
    /// Set a VM's quotas (lowering the ephemeral quota evicts at once).
    #[command(group(ArgGroup::new("quota").required(true).multiple(true).args(["persistent", "ephemeral"])))]
    SetQuota {
        /// VM name.
        vm: VmName,
        /// Persistent quota (size or 'unlimited').
        #[arg(long, short = 'p', value_name = "SIZE")]
        persistent: Option<Quota>,
        /// Ephemeral quota (size or 'unlimited').
        #[arg(long, short = 'e', value_name = "SIZE")]
        ephemeral: Option<Quota>,
    },
    /// Set a VM's weight for sharing ephemeral capacity (1 to 1000000).
    SetWeight {
        /// VM name.
        vm: VmName,
        /// The weight.
        weight: Weight,
    },
    /// Set the host memory limit of the store (lowering it evicts ephemeral
    /// pages at once).
    SetLimit {
        /// The limit.
        #[arg(value_name = "SIZE")]
        size: ByteSize,
    },
    /// Refuse a VM's puts (gets and flushes keep working).
    Freeze {
        /// VM name.
        vm: VmName,
    },
    /// Accept a frozen VM's puts again.
    Thaw {
        /// VM name.
        vm: VmName,
    },
    /// Drop a VM's pages (its pools stay).
    Flush {
        /// VM name.
        vm: VmName,
        /// Drop only ephemeral pages.
        #[arg(long)]
        ephemeral: bool,
    },
    /// Add a VM: its socket listens when the command returns.
    AddVm(AddVm),
    /// Remove a VM: drop its connection and socket, free all its pages.
    RemoveVm {
        /// VM name.
        vm: VmName,
    },
    /// Show or set a VM's dedup group (set only while it holds no pages).
    DedupGroup {
        /// VM name.
        vm: VmName,
        /// The group to put it in.
        #[arg(value_parser = parse_group_choice, conflicts_with = "none")]
        group: Option<GroupChoice>,
        /// Take it out of any group.
        #[arg(long)]
        none: bool,
    },
    /// Authorise a VM to create or join the shared pool with this UUID.
    Auth {
        /// VM name.
        vm: VmName,
        /// Shared-pool UUID.
        #[arg(value_parser = parse_uuid)]
        uuid: Uuid,
    },
    /// Withdraw a shared-pool authorisation (later NEW_POOL requests for
    /// it fail).
    Deauth {
        /// VM name.
        vm: VmName,
        /// Shared-pool UUID.
        #[arg(value_parser = parse_uuid)]
        uuid: Uuid,
    },
    /// Live per-VM activity, redrawn every interval (Ctrl-C to quit).
    Top {
        /// Seconds between frames.
        #[arg(long, short = 'i', value_name = "SECS", default_value = "1", value_parser = parse_interval)]
        interval: f64,
        /// Stop after N frames.
        #[arg(long, short = 'n', value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
        iterations: Option<u64>,
        /// Append frames instead of clearing the screen (no ANSI escapes).
        #[arg(long, short = 'b')]
        batch: bool,
    },
}

/// `add-vm`'s arguments.
#[derive(Clone, Debug, Args)]
pub struct AddVm {
    /// VM name: 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -.
    pub name: VmName,
    /// Persistent quota (default unlimited).
    #[arg(long, value_name = "SIZE")]
    pub persistent_quota: Option<Quota>,
    /// Ephemeral quota (default unlimited).
    #[arg(long, value_name = "SIZE")]
    pub ephemeral_quota: Option<Quota>,
    /// Weight (default 100).
    #[arg(long)]
    pub weight: Option<Weight>,
    /// Dedup group (default none).
    #[arg(long, value_name = "GROUP", value_parser = parse_group_choice)]
    pub dedup_group: Option<GroupChoice>,
    /// A shared-pool UUID the VM may create or join; repeatable.
    #[arg(long = "auth", value_name = "UUID", value_parser = parse_uuid)]
    pub auth: Vec<Uuid>,
}

impl AddVm {
    /// The VM it asks for.
    pub fn spec(&self) -> VmSpec {
        let mut vm = VmSpec::new(self.name.clone());
        vm.persistent_quota = self.persistent_quota.unwrap_or_default();
        vm.ephemeral_quota = self.ephemeral_quota.unwrap_or_default();
        vm.weight = self.weight.unwrap_or_default();
        vm.dedup_group = self.dedup_group.clone().and_then(|g| g.0);
        vm.authorized_uuids = self.auth.iter().copied().collect();
        vm
    }
}

/// A dedup group given on the command line: a name, or `none`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupChoice(pub Option<DedupGroup>);

fn parse_group_choice(s: &str) -> Result<GroupChoice, vtmem_api::ValueError> {
    parse_dedup_group(s).map(GroupChoice)
}

fn parse_secs(s: &str, min_exclusive: Option<f64>) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("invalid number of seconds '{s}'"))?;
    let ok = v.is_finite()
        && v <= 3600.0
        && match min_exclusive {
            Some(m) => v > m,
            None => v >= 0.0,
        };
    if ok {
        Ok(v)
    } else if min_exclusive.is_some() {
        Err(format!(
            "invalid number of seconds '{s}': must be more than 0 and at most 3600"
        ))
    } else {
        Err(format!(
            "invalid number of seconds '{s}': must be between 0 and 3600"
        ))
    }
}

fn parse_interval(s: &str) -> Result<f64, String> {
    let v = parse_secs(s, Some(0.0))?;
    if v < 0.05 {
        return Err(format!("invalid interval '{s}': must be at least 0.05 s"));
    }
    Ok(v)
}

fn parse_interval_or_zero(s: &str) -> Result<f64, String> {
    parse_secs(s, None)
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    parse_secs(s, Some(0.0))
}

/// Turns a clap error into one line for stderr (without `error:`), or
/// `None` when it is help or version text to print as is.
pub fn usage_error_line(e: &clap::Error) -> Option<String> {
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        return None;
    }
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand | ErrorKind::MissingSubcommand
    ) {
        let cmd = <Cli as clap::CommandFactory>::command();
        let names: Vec<&str> = cmd
            .get_subcommands()
            .map(|c| c.get_name())
            .filter(|n| *n != "help")
            .collect();
        return Some(format!(
            "no command given (one of: {}); see 'vtmemctl --help'",
            names.join(", ")
        ));
    }
    let text = e.render().to_string();
    // clap's first paragraph names the problem; later ones are tips and usage.
    let first: Vec<&str> = text
        .lines()
        .map(str::trim)
        .take_while(|l| !l.is_empty() && !l.starts_with("Usage:"))
        .collect();
    let msg = first.join(" ");
    let msg = msg.strip_prefix("error: ").unwrap_or(&msg);
    Some(format!("{msg}; see 'vtmemctl --help'"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("vtmemctl").chain(args.iter().copied()))
    }

    fn err_line(args: &[&str]) -> String {
        usage_error_line(&parse(args).unwrap_err()).unwrap()
    }

    #[test]
    fn commands_parse() {
        let c = parse(&[
            "set-quota",
            "vm1",
            "--persistent",
            "512M",
            "-e",
            "unlimited",
        ])
        .unwrap();
        match c.command {
            Command::SetQuota {
                vm,
                persistent,
                ephemeral,
            } => {
                assert_eq!(vm.as_str(), "vm1");
                assert_eq!(persistent, Some(Quota::Limited(ByteSize(512 << 20))));
                assert_eq!(ephemeral, Some(Quota::Unlimited));
            }
            other => panic!("{other:?}"),
        }
        let c = parse(&["set-limit", "2G", "--json", "--socket", "/x.ctl"]).unwrap();
        assert!(c.json);
        assert_eq!(c.socket, PathBuf::from("/x.ctl"));
        assert!(matches!(c.command, Command::SetLimit { size } if size == ByteSize(2 << 30)));
        let c = parse(&[
            "add-vm",
            "vm3",
            "--persistent-quota",
            "256M",
            "--auth",
            "00112233445566778899aabbccddeeff",
            "--auth",
            "6b0e2a54-3f4c-4cde-9a57-0d6e1f3ad3a1",
        ])
        .unwrap();
        let Command::AddVm(a) = c.command else {
            panic!()
        };
        assert_eq!(
            a.persistent_quota,
            Some(Quota::Limited(ByteSize(256 << 20)))
        );
        assert_eq!(
            a.auth[0].to_string(),
            "00112233-4455-6677-8899-aabbccddeeff"
        );
        let spec = a.spec();
        assert_eq!(spec.authorized_uuids.len(), 2);
        assert_eq!(spec.weight, Weight::DEFAULT);
        assert!(matches!(
            parse(&["top", "-n", "2", "-i", "0.1"]).unwrap().command,
            Command::Top {
                iterations: Some(2),
                batch: false,
                ..
            }
        ));
        assert!(matches!(
            parse(&["dedup-group", "vm1", "--none"]).unwrap().command,
            Command::DedupGroup {
                none: true,
                group: None,
                ..
            }
        ));
    }

    #[test]
    fn socket_defaults_to_the_daemons() {
        // The environment variable is exercised through the binary, where
        // it can be set for one process.
        if std::env::var_os(CONTROL_SOCKET_ENV).is_none() {
            let c = parse(&["list"]).unwrap();
            assert_eq!(c.socket, PathBuf::from(DEFAULT_CONTROL_SOCKET));
        }
        let c = parse(&["-s", "/f.ctl", "list"]).unwrap();
        assert_eq!(c.socket, PathBuf::from("/f.ctl"));
    }

    #[test]
    fn dedup_group_none_is_no_group() {
        let c = parse(&["dedup-group", "vm1", "none"]).unwrap();
        assert!(matches!(
            c.command,
            Command::DedupGroup {
                group: Some(GroupChoice(None)),
                ..
            }
        ));
    }

    #[test]
    fn usage_errors_are_one_line() {
        for args in [
            &["set-quota", "vm1", "--persistent", "12X"][..],
            &["set-quota", "vm1"],
            &["set-weight", "vm1", "0"],
            &["set-limit", "lots"],
            &["auth", "vm1", "nope"],
            &["add-vm", "../x"],
            &["dedup-group", "vm1", "web", "--none"],
            &["show"],
            &["frobnicate"],
            &["top", "--interval", "0"],
            &["top", "--iterations", "0"],
            &[],
        ] {
            let line = err_line(args);
            assert!(!line.contains('\n'), "{args:?}: {line}");
            assert!(!line.starts_with("error:"), "{args:?}: {line}");
            assert!(line.ends_with("see 'vtmemctl --help'"), "{args:?}: {line}");
        }
        let line = err_line(&["set-quota", "vm1", "--persistent", "12X"]);
        assert!(line.contains("invalid quota '12X'"), "{line}");
        assert!(err_line(&["set-quota", "vm1"]).contains("required"));
        assert!(err_line(&["auth", "vm1", "nope"]).contains("invalid UUID 'nope'"));
        assert!(usage_error_line(&parse(&["--help"]).unwrap_err()).is_none());
    }
}
