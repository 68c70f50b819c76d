//! Thin, Linux-specific OS helpers: users, processes, signals, files.
//!
//! Everything here is best effort and never panics; callers decide what a
//! failure means.

use std::ffi::{CStr, CString, OsStr};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{chown, lchown, symlink};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

/// The OS account the server runs as when the current process is root.
#[derive(Debug, Clone)]
pub(crate) struct ServerUser {
    pub(crate) name: String,
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) home: PathBuf,
}

/// True when the effective user is root (initdb and postgres refuse to run as root).
pub(crate) fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Looks an OS user up by name with getpwnam_r (reads /etc/passwd, NSS, ...).
pub(crate) fn lookup_user(name: &str) -> Option<ServerUser> {
    let cname = CString::new(name).ok()?;
    let mut buf = vec![0u8; 4096];
    loop {
        // SAFETY: passwd is plain old data; getpwnam_r fills it and points its
        // strings into `buf`, which outlives every read below.
        let mut pwd: libc::passwd = unsafe { std::mem::zeroed() };
        let mut result: *mut libc::passwd = std::ptr::null_mut();
        let rc = unsafe {
            libc::getpwnam_r(
                cname.as_ptr(),
                &mut pwd,
                buf.as_mut_ptr().cast(),
                buf.len(),
                &mut result,
            )
        };
        if rc == libc::ERANGE && buf.len() < (1 << 20) {
            buf.resize(buf.len() * 2, 0);
            continue;
        }
        if rc != 0 || result.is_null() {
            return None;
        }
        let home = if pwd.pw_dir.is_null() {
            PathBuf::from("/")
        } else {
            // SAFETY: non-null, NUL-terminated, inside `buf`.
            let bytes = unsafe { CStr::from_ptr(pwd.pw_dir) }.to_bytes();
            PathBuf::from(OsStr::from_bytes(bytes))
        };
        return Some(ServerUser {
            name: name.to_owned(),
            uid: pwd.pw_uid,
            gid: pwd.pw_gid,
            home,
        });
    }
}

/// What is known about a process id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ProcState {
    /// Exists and has not exited.
    Alive,
    /// Exited (or is a zombie waiting for its parent to reap it).
    Dead,
}

/// Whether `pid` names a live (non-zombie) process.
///
/// Zombies count as dead: orphaned postmasters are reparented to init, which
/// on some machines reaps only every second or two.
pub(crate) fn proc_state(pid: i32) -> ProcState {
    if pid <= 1 {
        // Never signal process groups, init or "every process".
        return ProcState::Dead;
    }
    // SAFETY: signal 0 only checks for existence and permission.
    let rc = unsafe { libc::kill(pid, 0) };
    if rc != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::ESRCH) {
        return ProcState::Dead;
    }
    match fs::read(format!("/proc/{pid}/stat")) {
        Ok(stat) => match parse_stat(&stat) {
            Some((state, _)) if state == b'Z' || state == b'X' => ProcState::Dead,
            _ => ProcState::Alive,
        },
        Err(e) if e.kind() == io::ErrorKind::NotFound => ProcState::Dead,
        // No /proc to ask: kill(0) said it exists.
        Err(_) => ProcState::Alive,
    }
}

/// Parses `/proc/PID/stat` into (state, ppid).
fn parse_stat(stat: &[u8]) -> Option<(u8, i32)> {
    // "pid (comm) S ppid ..."; comm may contain spaces and parentheses.
    let close = stat.iter().rposition(|&b| b == b')')?;
    let rest = std::str::from_utf8(stat.get(close + 1..)?).ok()?;
    let mut fields = rest.split_ascii_whitespace();
    let state = *fields.next()?.as_bytes().first()?;
    let ppid = fields.next()?.parse().ok()?;
    Some((state, ppid))
}

/// Sends `signal` to `pid` (never to a group or to init).
pub(crate) fn signal(pid: i32, signal: i32) -> io::Result<()> {
    if pid <= 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("refusing to signal pid {pid}"),
        ));
    }
    // SAFETY: plain syscall on a positive pid.
    if unsafe { libc::kill(pid, signal) } == 0 {
        Ok(())
    } else {
        let e = io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ESRCH) {
            Ok(()) // already gone
        } else {
            Err(e)
        }
    }
}

/// Polls until every pid in `pids` is dead (or a zombie), or the timeout passes.
/// Returns the pids still alive.
pub(crate) fn wait_dead(pids: &[i32], timeout: Duration) -> Vec<i32> {
    let deadline = Instant::now() + timeout;
    let mut pause = Duration::from_millis(1);
    loop {
        let alive: Vec<i32> = pids
            .iter()
            .copied()
            .filter(|&p| proc_state(p) == ProcState::Alive)
            .collect();
        if alive.is_empty() || Instant::now() >= deadline {
            return alive;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Live processes that are children of `parent` or whose command line
/// contains `marker` (PostgreSQL puts `cluster_name` in its children's titles).
pub(crate) fn find_processes(parent: i32, marker: &str) -> Vec<i32> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let marker = marker.as_bytes();
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 1 {
            continue;
        }
        let Ok(stat) = fs::read(entry.path().join("stat")) else {
            continue;
        };
        let Some((state, ppid)) = parse_stat(&stat) else {
            continue;
        };
        if state == b'Z' || state == b'X' {
            continue;
        }
        let matches = ppid == parent
            || (!marker.is_empty()
                && fs::read(entry.path().join("cmdline"))
                    .map(|c| c.windows(marker.len()).any(|w| w == marker))
                    .unwrap_or(false));
        if matches {
            found.push(pid);
        }
    }
    found
}

/// The full command line of `pid`, NULs replaced by spaces ("" if unreadable).
pub(crate) fn cmdline(pid: i32) -> String {
    fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            String::from_utf8_lossy(&c)
                .replace('\0', " ")
                .trim()
                .to_owned()
        })
        .unwrap_or_default()
}

/// Recursively copies `src` to `dst` (which must not exist), preserving
/// permission bits, and chowns everything to `owner` when given.
pub(crate) fn copy_tree(src: &Path, dst: &Path, owner: Option<(u32, u32)>) -> io::Result<()> {
    let meta = fs::symlink_metadata(src)?;
    fs::create_dir(dst)?;
    for entry in fs::read_dir(src)? {
        let entry = entry?;
        let from = entry.path();
        let to = dst.join(entry.file_name());
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&from, &to, owner)?;
        } else if kind.is_symlink() {
            symlink(fs::read_link(&from)?, &to)?;
            if let Some((uid, gid)) = owner {
                lchown(&to, Some(uid), Some(gid))?;
            }
        } else {
            fs::copy(&from, &to)?; // copies the permission bits too
            if let Some((uid, gid)) = owner {
                chown(&to, Some(uid), Some(gid))?;
            }
        }
    }
    fs::set_permissions(dst, meta.permissions())?;
    if let Some((uid, gid)) = owner {
        chown(dst, Some(uid), Some(gid))?;
    }
    Ok(())
}

/// Random hex string from /dev/urandom (falls back to std's hasher seeds).
pub(crate) fn random_hex(bytes: usize) -> String {
    use std::io::Read;
    let mut buf = vec![0u8; bytes];
    let ok = fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .is_ok();
    if !ok {
        use std::hash::{BuildHasher, Hasher};
        for chunk in buf.chunks_mut(8) {
            let mut h = std::collections::hash_map::RandomState::new().build_hasher();
            h.write_u128(
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos())
                    .unwrap_or(0),
            );
            let v = h.finish().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_with_odd_comm() {
        let stat = b"123 (post) gres) S 45 123 123 0 -1";
        assert_eq!(parse_stat(stat), Some((b'S', 45)));
    }

    #[test]
    fn refuses_dangerous_pids() {
        assert_eq!(proc_state(0), ProcState::Dead);
        assert_eq!(proc_state(-1), ProcState::Dead);
        assert!(signal(0, 0).is_err());
        assert!(signal(-1, 0).is_err());
        assert!(signal(1, 0).is_err());
    }

    #[test]
    fn own_process_is_alive() {
        assert_eq!(proc_state(std::process::id() as i32), ProcState::Alive);
    }

    #[test]
    fn random_hex_has_requested_length() {
        let a = random_hex(16);
        assert_eq!(a.len(), 32);
        assert_ne!(a, random_hex(16));
    }
}
