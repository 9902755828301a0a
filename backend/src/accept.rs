// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! What the control socket and the metrics endpoint share: the accept loop
//! (a listener and a stop eventfd waited on together, so that shutdown never
//! waits for one more client to connect), and the bounded connection slots
//! that keep idle connections from starving clients that talk.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use log::{error, warn};
use parking_lot::Mutex;
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

/// A bounded set of connections being served, shared by a server's
/// connection threads.
///
/// When every slot is taken, a new connection takes the slot of the oldest
/// one that has not yet sent a complete request: that one is shut down.
/// Idle connections, the cheap way for a local process to exhaust the
/// slots, therefore never keep a client that talks from being served.
/// Only when every slot carries a client that has spoken is the newcomer
/// refused.
#[derive(Debug)]
pub struct Slots {
    max: usize,
    next_id: AtomicU64,
    taken: Mutex<Vec<Taken>>,
}

#[derive(Debug)]
struct Taken {
    id: u64,
    spoke: Arc<AtomicBool>,
    conn: Box<dyn Shutdown>,
}

/// A connection that can be shut down from another thread.
pub trait Shutdown: Send + std::fmt::Debug {
    /// Ends both directions, so its thread's blocking read returns.
    fn shutdown_both(&self);
    /// A second handle on the same connection.
    fn handle(&self) -> io::Result<Box<dyn Shutdown>>;
}

macro_rules! shutdown_for {
    ($t:ty) => {
        impl Shutdown for $t {
            fn shutdown_both(&self) {
                let _ = self.shutdown(std::net::Shutdown::Both);
            }
            fn handle(&self) -> io::Result<Box<dyn Shutdown>> {
                Ok(Box::new(self.try_clone()?))
            }
        }
    };
}

shutdown_for!(std::net::TcpStream);
shutdown_for!(std::os::unix::net::UnixStream);

/// One taken slot; dropping it frees the slot.
#[derive(Debug)]
pub struct Slot {
    id: u64,
    spoke: Arc<AtomicBool>,
    slots: Arc<Slots>,
}

impl Slot {
    /// The connection sent a complete request: it is no longer idle.
    pub fn spoke(&self) {
        self.spoke.store(true, Ordering::Release);
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.slots.taken.lock().retain(|t| t.id != self.id);
    }
}

impl Slots {
    /// At most `max` connections at once.
    pub fn new(max: usize) -> Arc<Slots> {
        Arc::new(Slots {
            max,
            next_id: AtomicU64::new(0),
            taken: Mutex::new(Vec::new()),
        })
    }

    /// A slot for a new connection (shut down later if it idles while the
    /// slots are full), or `None` if every slot holds a connection that has
    /// spoken (or the connection cannot be shared).
    pub fn admit(self: &Arc<Self>, conn: &dyn Shutdown) -> Option<Slot> {
        let conn = conn.handle().ok()?;
        let mut taken = self.taken.lock();
        if taken.len() >= self.max {
            let idle = taken
                .iter()
                .position(|t| !t.spoke.load(Ordering::Acquire))?;
            // The oldest idle one: slots are kept in admission order.
            taken.remove(idle).conn.shutdown_both();
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let spoke = Arc::new(AtomicBool::new(false));
        taken.push(Taken {
            id,
            spoke: spoke.clone(),
            conn,
        });
        Some(Slot {
            id,
            spoke,
            slots: self.clone(),
        })
    }

    /// Connections being served.
    pub fn in_use(&self) -> usize {
        self.taken.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    #[test]
    fn idle_connections_make_room_and_talkers_keep_theirs() {
        let slots = Slots::new(2);
        let (a, _a_peer) = UnixStream::pair().unwrap();
        let (b, mut b_peer) = UnixStream::pair().unwrap();
        let (c, _c_peer) = UnixStream::pair().unwrap();
        let sa = slots.admit(&a).unwrap();
        sa.spoke();
        let _sb = slots.admit(&b).unwrap();
        // Full: the idle one (b) goes, the one that spoke (a) stays.
        let sc = slots.admit(&c).unwrap();
        assert_eq!(slots.in_use(), 2);
        let mut buf = [0u8; 1];
        use std::io::Read;
        assert_eq!(b_peer.read(&mut buf).unwrap(), 0, "b was shut down");
        sc.spoke();
        // Every slot has spoken: a newcomer is refused.
        let (d, _d_peer) = UnixStream::pair().unwrap();
        assert!(slots.admit(&d).is_none());
        drop(sa);
        assert_eq!(slots.in_use(), 1);
        let (e, _e_peer) = UnixStream::pair().unwrap();
        assert!(slots.admit(&e).is_some());
    }
}
