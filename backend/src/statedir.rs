// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The state directory (`--state-dir`): where a stopping vtmemd leaves
//! each VM's pools and persistent pages for the next one.
//!
//! At an orderly stop (SIGTERM, SIGINT), once every VM's connection is
//! closed and its batches in flight are answered, each VM's client is
//! written as an image (`store/src/image.rs`, the format of live
//! migration) to `<dir>/<vm>.image`: a temporary file, `fsync`, `rename`,
//! `fsync` of the directory. A vtmemd declaring the VM takes the image
//! back before it serves the VM's socket, then deletes the file (an image
//! left behind would bring back pages the guest has since flushed or
//! replaced). An image that cannot be read stops the VM from being
//! served, with the file left where it is.
//!
//! This covers upgrades and restarts that go through a stop. A vtmemd that
//! is killed (SIGKILL, a crash) writes nothing: its pages are lost.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{info, warn};
use vtmem_api::VmName;
use vtmem_store::{DataHandle, ImageError, ImageSummary};

/// Why an image could not be written or taken back.
#[derive(Debug, thiserror::Error)]
pub enum StateDirError {
    #[error("state directory {0}: {1}")]
    Dir(PathBuf, io::Error),
    #[error("state image {0}: {1}")]
    Io(PathBuf, io::Error),
    #[error("state image {0}: {1}")]
    Image(PathBuf, ImageError),
}

/// What a start took back from the state directory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Recovered {
    /// VMs whose image was taken back.
    pub vms: u32,
    /// Their pools.
    pub pools: u64,
    /// Their persistent pages.
    pub pages: u64,
    /// Bytes of image read.
    pub bytes: u64,
    /// Time spent reading them.
    pub time: Duration,
}

/// The state directory.
#[derive(Debug)]
pub struct StateDir {
    path: PathBuf,
}

impl StateDir {
    /// Opens (creating it, mode 0700: the images hold guest memory) the
    /// state directory at `path`.
    pub fn open(path: &Path) -> Result<StateDir, StateDirError> {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(path)
            .map_err(|e| StateDirError::Dir(path.to_path_buf(), e))?;
        if !fs::metadata(path)
            .map_err(|e| StateDirError::Dir(path.to_path_buf(), e))?
            .is_dir()
        {
            return Err(StateDirError::Dir(
                path.to_path_buf(),
                io::Error::new(io::ErrorKind::AlreadyExists, "not a directory"),
            ));
        }
        Ok(StateDir {
            path: path.to_path_buf(),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Where VM `name`'s image lives.
    pub fn image_path(&self, name: &VmName) -> PathBuf {
        self.path.join(format!("{name}.image"))
    }

    /// Takes VM `name`'s image back into `client`, if there is one, and
    /// deletes it. On error the client holds nothing and the file stays.
    pub fn take(
        &self,
        name: &VmName,
        client: &DataHandle,
    ) -> Result<Option<ImageSummary>, StateDirError> {
        let path = self.image_path(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StateDirError::Io(path, e)),
        };
        let sum = client
            .import_image(&mut BufReader::with_capacity(1 << 20, file))
            .map_err(|e| StateDirError::Image(path.clone(), e))?;
        if let Err(e) = fs::remove_file(&path) {
            // Served with an image left behind, the VM could get back
            // pages it has since replaced at the next start: refuse.
            client.reset();
            return Err(StateDirError::Io(path, e));
        }
        sync_dir(&self.path).map_err(|e| StateDirError::Dir(self.path.clone(), e))?;
        Ok(Some(sum))
    }

    /// Writes `client`'s image as VM `name`'s, atomically.
    pub fn save(&self, name: &VmName, client: &DataHandle) -> Result<ImageSummary, StateDirError> {
        let path = self.image_path(name);
        let tmp = self.path.join(format!(".{name}.image.tmp"));
        let res = (|| {
            let file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)
                .map_err(|e| StateDirError::Io(tmp.clone(), e))?;
            let mut w = BufWriter::with_capacity(1 << 20, file);
            let sum = client
                .export_image(&mut w)
                .map_err(|e| StateDirError::Image(tmp.clone(), e))?;
            let file = w
                .into_inner()
                .map_err(|e| StateDirError::Io(tmp.clone(), e.into_error()))?;
            file.sync_all()
                .map_err(|e| StateDirError::Io(tmp.clone(), e))?;
            fs::rename(&tmp, &path).map_err(|e| StateDirError::Io(path.clone(), e))?;
            sync_dir(&self.path).map_err(|e| StateDirError::Dir(self.path.clone(), e))?;
            Ok(sum)
        })();
        if res.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        res
    }

    /// Images in the directory for VMs not in `declared` (they wait there
    /// until such a VM is added).
    pub fn strays(&self, declared: &[VmName]) -> Vec<PathBuf> {
        let Ok(rd) = fs::read_dir(&self.path) else {
            return Vec::new();
        };
        let mut out: Vec<PathBuf> = rd
            .flatten()
            .map(|e| e.path())
            .filter(|p| {
                p.extension().is_some_and(|x| x == "image")
                    && p.file_stem()
                        .and_then(|s| s.to_str())
                        .is_none_or(|s| !declared.iter().any(|d| d.as_str() == s))
            })
            .collect();
        out.sort();
        out
    }
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes every VM's image at an orderly stop; logs each and returns how
/// many failed.
pub fn save_all<'a>(
    dir: &StateDir,
    vms: impl IntoIterator<Item = (&'a VmName, DataHandle)>,
) -> usize {
    let mut failed = 0;
    for (name, client) in vms {
        let t = Instant::now();
        match dir.save(name, &client) {
            Ok(sum) => info!(
                "vm {name}: state saved to {}: {} pools, {} persistent pages, {} bytes in {} ms",
                dir.image_path(name).display(),
                sum.pools,
                sum.pages,
                sum.bytes,
                t.elapsed().as_millis()
            ),
            Err(e) => {
                failed += 1;
                warn!("vm {name}: state not saved: {e}");
            }
        }
    }
    failed
}
