//! What the meter learns about a calling process from `/proc`: its start time
//! (so a reused PID is a new process) and its parent.

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

/// The process and its ancestors, nearest first, at most `ANCESTORS_MAX` deep.
pub fn lineage(proc_root: &Path, pid: u32) -> Vec<ProcessId> {
    let mut lineage = Vec::new();
    let mut next = pid;
    while next != 0 && lineage.len() <= ANCESTORS_MAX {
        let Some(stat) = read_stat(proc_root, next) else {
            break;
        };
        lineage.push(stat.process);
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
        let lineage = lineage(root, std::process::id());
        assert_eq!(lineage[0].pid, std::process::id());
        assert!(lineage.len() >= 2, "a test process has a parent");
        assert!(is_alive(root, &lineage[0]));
        let imposter = ProcessId {
            start_ticks: lineage[0].start_ticks + 1,
            ..lineage[0]
        };
        assert!(!is_alive(root, &imposter));
    }
}
