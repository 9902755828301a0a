// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! `cargo run -p vtmem-xtask -- dist DIR`: writes what the Debian package
//! ships beside the binaries and that is generated from their clap
//! definitions, so that it can never disagree with `--help`:
//!
//! - `DIR/man/vtmemd.8`, `DIR/man/vtmemctl.8` and one page per `vtmemctl`
//!   command (`vtmemctl-status.8`, ...), by `clap_mangen`;
//! - `DIR/completions/{bash,zsh,fish}/...` for both programs, by
//!   `clap_complete`, named as each shell's vendor directory expects.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::CommandFactory;
use clap_complete::Shell;

/// The manual's name in the page footers.
const MANUAL: &str = "vtmem";

fn commands() -> [clap::Command; 2] {
    [vtmem_backend::Args::command(), vtmem_ctl::Cli::command()]
}

/// Writes `cmd`'s page, and one per subcommand, into `dir`; returns the
/// files written.
fn man_pages(cmd: &clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let mut cmd = cmd.clone();
    cmd.build();
    let source = format!("{MANUAL} {}", cmd.get_version().unwrap_or_default());
    let page = |c: clap::Command, name: String| -> io::Result<PathBuf> {
        let mut out = Vec::new();
        clap_mangen::Man::new(c.name(name.clone()))
            .section("8")
            .manual(MANUAL)
            .source(source.clone())
            .render(&mut out)?;
        let path = dir.join(format!("{name}.8"));
        fs::write(&path, out)?;
        Ok(path)
    };
    let top = cmd.get_name().to_string();
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        written.push(page(sub.clone(), format!("{top}-{}", sub.get_name()))?);
    }
    written.insert(0, page(cmd.clone(), top)?);
    Ok(written)
}

/// Where each shell looks for a program's completions, relative to its
/// vendor directory.
fn completion_name(shell: Shell, bin: &str) -> String {
    match shell {
        Shell::Zsh => format!("_{bin}"),
        Shell::Fish => format!("{bin}.fish"),
        _ => bin.to_string(),
    }
}

fn completions(cmd: &clap::Command, dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    let bin = cmd.get_name().to_string();
    for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
        let sub = dir.join(shell.to_string());
        fs::create_dir_all(&sub)?;
        let mut out = Vec::new();
        clap_complete::generate(shell, &mut cmd.clone(), &bin, &mut out);
        let path = sub.join(completion_name(shell, &bin));
        fs::write(&path, out)?;
        written.push(path);
    }
    Ok(written)
}

/// Writes every generated file under `out`.
fn dist(out: &Path) -> io::Result<Vec<PathBuf>> {
    let man = out.join("man");
    let comp = out.join("completions");
    fs::create_dir_all(&man)?;
    let mut written = Vec::new();
    for cmd in commands() {
        written.extend(man_pages(&cmd, &man)?);
        written.extend(completions(&cmd, &comp)?);
    }
    Ok(written)
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.as_slice() {
        [cmd, dir] if cmd == "dist" => match dist(Path::new(dir)) {
            Ok(files) => {
                for f in files {
                    println!("{}", f.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask dist {dir}: {e}");
                ExitCode::FAILURE
            }
        },
        _ => {
            eprintln!("usage: cargo run -p vtmem-xtask -- dist DIR");
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_and_completions_cover_every_option_and_command() {
        let dir = std::env::temp_dir().join(format!("vtmem-xtask-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let files = dist(&dir).unwrap();
        let read = |p: &str| fs::read_to_string(dir.join(p)).unwrap();

        let vtmemd = read("man/vtmemd.8");
        assert!(vtmemd.starts_with(".ie"), "roff");
        assert!(vtmemd.contains(".TH vtmemd 8"), "section 8");
        for arg in vtmem_backend::Args::command().get_arguments() {
            if let Some(long) = arg.get_long() {
                // roff escapes the dashes.
                assert!(
                    vtmemd.contains(&format!("\\-\\-{}", long.replace('-', "\\-"))),
                    "--{long}"
                );
            }
        }
        let ctl = read("man/vtmemctl.8");
        for sub in vtmem_ctl::Cli::command().get_subcommands() {
            let name = sub.get_name();
            if name != "help" {
                assert!(
                    ctl.contains(&name.replace('-', "\\-")),
                    "{name} in vtmemctl.8"
                );
                assert!(
                    dir.join(format!("man/vtmemctl-{name}.8")).exists(),
                    "{name}"
                );
            }
        }
        assert!(read("completions/bash/vtmemctl").contains("set-quota"));
        assert!(read("completions/zsh/_vtmemd").contains("--socket-dir"));
        assert!(read("completions/fish/vtmemctl.fish").contains("freeze"));
        assert!(files.iter().all(|f| f.starts_with(&dir)));
        fs::remove_dir_all(&dir).unwrap();
    }
}
