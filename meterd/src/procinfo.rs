//! What the meter learns about a calling process from `/proc`: its start time
//! (so a reused PID is a new process), its parent, and the user each
//! ancestor runs as (the walk up the ancestors stops at a change of user).
//!
//! "The user a process runs as" is always its **effective** uid: that is the
//! uid the socket's peer credentials (`SO_PEERCRED`) give for the caller, so
//! its ancestors are compared by the same measure (the second number of the
//! `Uid:` line of `/proc/PID/status`), never by their real uid. A setuid
//! program, or a process that dropped privileges with `setresuid`, is the
//! user it acts as.

use std::path::Path;

use crate::context::ProcessId;

/// Most ancestors followed when looking for an enclosing context.
pub const ANCESTORS_MAX: usize = 16;

/// The parts of `/proc/PID/stat` the meter uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcStat {
    /// The process.
    pub process: ProcessId,
    /// Its parent's PID (0 for the first process).
    pub parent_pid: u32,
}

/// Parses the text of `/proc/PID/stat`. The command name (field 2) may hold
/// spaces and parentheses, so the fields are counted from its last `)`.
pub fn parse_stat(pid: u32, text: &str) -> Option<ProcStat> {
    let after_name = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = after_name.split_ascii_whitespace().collect();
    // fields[0] is field 3 (state), so field N is fields[N - 3].
    let parent_pid = fields.get(1)?.parse().ok()?;
    let start_ticks = fields.get(19)?.parse().ok()?;
    Some(ProcStat {
        process: ProcessId { pid, start_ticks },
        parent_pid,
    })
}

/// Reads `/proc/PID/stat` under `proc_root`; `None` when the process is gone.
pub fn read_stat(proc_root: &Path, pid: u32) -> Option<ProcStat> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("stat")).ok()?;
    parse_stat(pid, &text)
}

/// The effective uid in the text of `/proc/PID/status` (the second number
/// of its `Uid:` line: real, effective, saved, filesystem), the uid that
/// `SO_PEERCRED` reports for a caller.
pub fn parse_status_uid(text: &str) -> Option<u32> {
    text.lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_ascii_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The effective uid of process `pid` under `proc_root`; `None` when it is
/// gone.
pub fn read_uid(proc_root: &Path, pid: u32) -> Option<u32> {
    let text = std::fs::read_to_string(proc_root.join(pid.to_string()).join("status")).ok()?;
    parse_status_uid(&text)
}

/// This process's effective uid, from `/proc/self/status`; `None` when it
/// cannot be read.
pub fn effective_uid() -> Option<u32> {
    let text = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_status_uid(&text)
}

/// The machine's boot id (`sys/kernel/random/boot_id` under `proc_root`),
/// new at every boot; `None` when it cannot be read.
pub fn read_boot_id(proc_root: &Path) -> Option<String> {
    let text = std::fs::read_to_string(proc_root.join("sys/kernel/random/boot_id")).ok()?;
    let boot_id = text.trim();
    (!boot_id.is_empty()).then(|| boot_id.to_owned())
}

/// A calling process and the ancestors whose contexts enclose its calls.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Lineage {
    /// The process, then its ancestors that run as the caller's user,
    /// nearest first.
    pub processes: Vec<ProcessId>,
    /// The walk stopped at an ancestor that runs as another user.
    pub stopped_at_other_user: bool,
}

/// The process `pid` and its ancestors, nearest first, at most
/// `ANCESTORS_MAX` of them, followed only while they run as `uid` (their
/// effective uid, as the caller's `uid` from `SO_PEERCRED` is): a process never inherits the session, or the enclosing query,
/// of another user's process. Without a `uid` only the process itself is
/// returned.
pub fn lineage(proc_root: &Path, pid: u32, uid: Option<u32>) -> Lineage {
    let mut lineage = Lineage::default();
    let Some(first) = read_stat(proc_root, pid) else {
        return lineage;
    };
    lineage.processes.push(first.process);
    let Some(uid) = uid else {
        return lineage;
    };
    let mut next = first.parent_pid;
    while next != 0 && lineage.processes.len() <= ANCESTORS_MAX {
        let Some(stat) = read_stat(proc_root, next) else {
            break;
        };
        if read_uid(proc_root, next) != Some(uid) {
            lineage.stopped_at_other_user = true;
            break;
        }
        lineage.processes.push(stat.process);
        next = stat.parent_pid;
    }
    lineage
}

/// True while `process` runs (same PID and the same start time).
pub fn is_alive(proc_root: &Path, process: &ProcessId) -> bool {
    read_stat(proc_root, process.pid).is_some_and(|stat| stat.process == *process)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_names_with_spaces_and_parentheses() {
        let text = "4242 (my (odd) prog) S 17 4242 4242 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 50 18446744073709551615";
        let stat = parse_stat(4242, text).unwrap();
        assert_eq!(stat.parent_pid, 17);
        assert_eq!(stat.process.start_ticks, 987_654);
        assert_eq!(parse_stat(1, "garbage"), None);
        assert_eq!(parse_stat(1, "1 (x) S"), None);
    }

    #[test]
    fn this_process_is_alive_and_has_a_lineage() {
        let root = Path::new("/proc");
        let uid = read_uid(root, std::process::id());
        assert!(uid.is_some(), "this process has a uid");
        let lineage = lineage(root, std::process::id(), uid).processes;
        assert_eq!(lineage[0].pid, std::process::id());
        assert!(lineage.len() >= 2, "a test process has a parent");
        assert!(is_alive(root, &lineage[0]));
        let imposter = ProcessId {
            start_ticks: lineage[0].start_ticks + 1,
            ..lineage[0]
        };
        assert!(!is_alive(root, &imposter));
    }

    /// A fake `/proc` with processes `(pid, parent, uid)`, each with that
    /// effective uid and real uid 4242.
    fn fake_proc(processes: &[(u32, u32, u32)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for &(pid, parent, uid) in processes {
            let dir = root.path().join(pid.to_string());
            std::fs::create_dir(&dir).unwrap();
            let stat = format!(
                "{pid} (p{pid}) S {parent} 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 {} 1000 50",
                100 + pid
            );
            std::fs::write(dir.join("stat"), stat).unwrap();
            let status = format!("Name:\tp{pid}\nUid:\t4242\t{uid}\t{uid}\t{uid}\n");
            std::fs::write(dir.join("status"), status).unwrap();
        }
        root
    }

    #[test]
    fn the_walk_stops_at_a_change_of_user() {
        // 40 (uid 1000) <- 30 (uid 1000) <- 20 (uid 0, a root shell) <- 10 (uid 1000)
        let root = fake_proc(&[(40, 30, 1000), (30, 20, 1000), (20, 10, 0), (10, 1, 1000)]);
        let pids = |lineage: Lineage| -> (Vec<u32>, bool) {
            (
                lineage.processes.iter().map(|p| p.pid).collect(),
                lineage.stopped_at_other_user,
            )
        };
        assert_eq!(
            pids(lineage(root.path(), 40, Some(1000))),
            (vec![40, 30], true)
        );
        assert_eq!(pids(lineage(root.path(), 30, Some(1000))), (vec![30], true));
        // Root's own processes walk on until process 10, which is not root's.
        assert_eq!(pids(lineage(root.path(), 20, Some(0))), (vec![20], true));
        // A process whose parent is gone (1 is missing here) ends the walk.
        assert_eq!(
            pids(lineage(root.path(), 10, Some(1000))),
            (vec![10], false)
        );
        // Without a uid, no ancestor is trusted.
        assert_eq!(pids(lineage(root.path(), 40, None)), (vec![40], false));
        assert_eq!(
            parse_status_uid("Name:\tx\nUid:\t1000\t0\t0\t0\n"),
            Some(0),
            "the effective uid, as SO_PEERCRED reports it, not the real one"
        );
        assert_eq!(parse_status_uid("Uid:\t1000\n"), None);
        assert_eq!(parse_status_uid("Name:\tx\n"), None);
    }
}
