// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The accept loop shared by the control socket and the metrics endpoint:
//! wait on a listener and a stop eventfd together, so that shutdown never
//! waits for one more client to connect.

use std::io;
use std::os::unix::io::AsRawFd;
use std::thread;
use std::time::Duration;

use log::{error, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

const LISTENER: u64 = 0;
const STOP: u64 = 1;

/// Accepts connections on `listener` until `stop` is written.
///
/// `accept` performs one non-blocking accept (`UnixListener::accept` or
/// `TcpListener::accept`); each connection it returns goes to `serve`,
/// which must not block for long (it hands the connection to a thread).
/// `what` names the server in log lines.
pub fn accept_until_stopped<L, C>(
    what: &str,
    listener: &L,
    stop: &EventFd,
    mut accept: impl FnMut(&L) -> io::Result<C>,
    mut serve: impl FnMut(C),
) where
    L: AsRawFd,
{
    let epoll = match Epoll::new().and_then(|ep| {
        for (fd, token) in [(listener.as_raw_fd(), LISTENER), (stop.as_raw_fd(), STOP)] {
            ep.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        Ok(ep)
    }) {
        Ok(ep) => ep,
        Err(e) => {
            error!("{what}: cannot set up epoll: {e}");
            return;
        }
    };
    let mut events = [EpollEvent::default(); 2];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                error!("{what}: epoll: {e}");
                return;
            }
        };
        if events[..n].iter().any(|e| e.data() == STOP) {
            return;
        }
        loop {
            match accept(listener) {
                Ok(conn) => serve(conn),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    warn!("{what}: accept: {e}");
                    thread::sleep(Duration::from_millis(50));
                    break;
                }
            }
        }
    }
}
