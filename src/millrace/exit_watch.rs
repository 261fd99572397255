//! Waiting for a process that is not our child to end, without polling: a pidfd
//! (`pidfd_open(2)`, Linux 5.3+) becomes readable the moment its process exits, and
//! tokio's `AsyncFd` wakes us then. The runtime's status changes when its daemon dies
//! although no file changes (the ownership lock turns `stale`), so the status snapshot
//! needs this signal.

use std::os::fd::{FromRawFd, OwnedFd};
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

/// How often a process is looked at when the kernel offers no pidfd.
const FALLBACK_POLL: Duration = Duration::from_millis(500);

/// How long an ended process may stay a zombie before we stop waiting for its parent.
const REAP_WAIT: Duration = Duration::from_secs(5);

/// Resolves when process `pid` has ended and been reaped by its parent (at once when it
/// is already gone). Until it is reaped a zombie still answers `kill(pid, 0)`, which is
/// how the runtime tells a live owner, so the runtime's status changes only then.
pub async fn exited(pid: u32) {
    ended(pid).await;
    let deadline = tokio::time::Instant::now() + REAP_WAIT;
    while std::path::Path::new(&format!("/proc/{pid}")).exists()
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Resolves when process `pid` has ended (a zombie counts as ended).
async fn ended(pid: u32) {
    match open_pidfd(pid) {
        // SAFETY: an `OwnedFd` always returns the same open descriptor and closes it only
        // when dropped, which the `AsyncFd` that owns it does last.
        Ok(fd) => match unsafe { AsyncFd::register_with_interest(fd, Interest::READABLE) } {
            Ok(fd) => {
                // Readable means exited; an error from the reactor means we cannot wait
                // this way any more, so fall through to looking at /proc.
                if fd.readable().await.is_ok() {
                    return;
                }
            }
            Err(err) => tracing::debug!(%err, pid, "pidfd not pollable; polling /proc"),
        },
        // ESRCH: no such process, it has ended already.
        Err(err) if err.raw_os_error() == Some(libc::ESRCH) => return,
        Err(err) => tracing::debug!(%err, pid, "no pidfd; polling /proc"),
    }
    while alive(pid) {
        tokio::time::sleep(FALLBACK_POLL).await;
    }
}

fn open_pidfd(pid: u32) -> std::io::Result<OwnedFd> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::ESRCH))?;
    // SAFETY: pidfd_open takes a pid and flags and returns a new file descriptor or -1;
    // it touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = i32::try_from(fd).map_err(|_| std::io::Error::from_raw_os_error(libc::EBADF))?;
    // SAFETY: `fd` was just returned by the kernel, is open, and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// A live, non-zombie process.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses, which may itself hold spaces.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn resolves_when_the_process_ends() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .expect("spawn sleep");
        let pid = child.id();
        let waiting = tokio::spawn(exited(pid));
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(!waiting.is_finished(), "sleep is still running");
        child.kill().expect("kill");
        // Reaped by us, its parent: only then is it gone for everyone.
        child.wait().expect("wait");
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("woken when the process exited")
            .expect("task");
    }

    #[tokio::test]
    async fn a_gone_process_resolves_at_once() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        tokio::time::timeout(Duration::from_secs(2), exited(pid))
            .await
            .expect("already gone");
    }
}
