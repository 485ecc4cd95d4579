//! Calling contexts and their nesting: who pays for a use.
//!
//! Every call is made in a context. By default it is the calling process,
//! identified by the socket's peer credentials (PID plus the process's start
//! time, so a reused PID is a new process). A process may name contexts of its
//! own (one per thread, say), and `..` names its parent process's context (what
//! `meterd login` uses, so a login hook logs in the shell that ran it).
//!
//! Each context holds a stack of frames: `login(CID)` pushes a login, a
//! `query(PID)` that answers true pushes a query. The payer of a use is taken
//! from the top frame of the caller's own context; when that is empty, from the
//! enclosing contexts in turn: a named context's process, then the process's
//! parent, grandparent, and so on. So a child process inherits the nesting of
//! the program that started it, and two programs, or two named threads, never
//! see each other's frames.
//!
//! `commit(PID)` closes the nearest open query of that PID in the caller's own
//! context, together with any frames opened above it and never committed (they
//! are not charged). `cancel(PID)` closes it without a use. `logout(CID)` closes
//! the nearest login of that CID and everything above it. A context whose
//! process has exited is dropped by `retain_processes`.

use std::collections::HashMap;
use std::fmt;

use proto::{Cid, Context, Payer, Pid};

/// A process, told apart from any later process with the same PID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProcessId {
    /// The PID.
    pub pid: u32,
    /// When it started, in clock ticks since boot (`/proc/PID/stat` field 22).
    pub start_ticks: u64,
}

/// The context a call is made in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ContextKey {
    /// The calling process itself.
    Process(ProcessId),
    /// A context the process named (a thread, a task).
    Named {
        /// The process that named it.
        process: ProcessId,
        /// The name.
        name: Context,
    },
    /// A caller without process credentials: its connection is its context.
    Connection(u64),
}

impl ContextKey {
    /// Parses the recorded form back; `None` for connection contexts, which
    /// do not outlive their connection, and for anything malformed.
    pub fn parse(text: &str) -> Option<ContextKey> {
        let (process, name) = match text.split_once(':') {
            Some((process, name)) => (process, Some(name)),
            None => (text, None),
        };
        let (pid, start) = process.split_once('.')?;
        let process = ProcessId {
            pid: pid.parse().ok()?,
            start_ticks: start.parse().ok()?,
        };
        Some(match name {
            Some(name) => ContextKey::Named {
                process,
                name: Context::parse(name).ok()?,
            },
            None => ContextKey::Process(process),
        })
    }

    /// The process this context belongs to, if any.
    pub fn process(&self) -> Option<ProcessId> {
        match self {
            ContextKey::Process(process) | ContextKey::Named { process, .. } => Some(*process),
            ContextKey::Connection(_) => None,
        }
    }
}

impl fmt::Display for ContextKey {
    /// The form recorded in readings: `PID.START`, `PID.START:NAME`, `conn.N`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ContextKey::Process(process) => write!(f, "{}.{}", process.pid, process.start_ticks),
            ContextKey::Named { process, name } => {
                write!(f, "{}.{}:{}", process.pid, process.start_ticks, name)
            }
            ContextKey::Connection(number) => write!(f, "conn.{number}"),
        }
    }
}

/// Who is calling: the context the call is in, and the contexts enclosing it,
/// nearest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The context the call is in.
    pub key: ContextKey,
    /// Where to look for a payer when `key` has no frames, nearest first.
    pub enclosing: Vec<ContextKey>,
    /// The caller's uid (the socket's peer credentials, its effective uid);
    /// `None` for callers without credentials. A frame pays for the
    /// caller's uses only when the same uid opened it.
    pub uid: Option<u32>,
}

/// One open level of nesting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// `login(CID)`: uses are charged to this customer.
    Login {
        /// The customer.
        cid: Cid,
        /// The local user who logged in (a grant of `cid` admitted them).
        uid: u32,
    },
    /// `query(PID)` answered true: uses inside are charged to PID's owner.
    Query {
        /// The product in use.
        pid: Pid,
        /// Who pays for this product's own use (resolved at query time).
        payer: Payer,
        /// The uid of the caller that queried.
        uid: Option<u32>,
        /// The context its commit is recorded in: the context of the
        /// outermost use of its chain (the caller's own context for a use a
        /// customer pays, the enclosing use's chain for a component). So a
        /// component used in a child process or a named thread is recorded
        /// where the product it was used inside is, and the backoffice can
        /// see the chain (it matches components to enclosing uses by
        /// context).
        chain: ContextKey,
    },
}

impl Frame {
    /// Who pays for a use made inside this frame.
    pub fn payer_inside(&self) -> Payer {
        match *self {
            Frame::Login { cid, .. } => Payer::Customer(cid),
            Frame::Query { pid, .. } => Payer::OwnerOf(pid),
        }
    }

    /// True when this frame was opened by a caller of uid `uid`: only then
    /// does it pay for that caller's uses. A caller without a uid matches
    /// no frame. (A process that logged in and then changed its uid in
    /// place keeps its PID and start time, so its context alone does not
    /// tell the two users apart.)
    pub fn opened_by(&self, uid: Option<u32>) -> bool {
        let opener = match *self {
            Frame::Login { uid, .. } => Some(uid),
            Frame::Query { uid, .. } => uid,
        };
        uid.is_some() && opener == uid
    }
}

/// Why a frame could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum ContextError {
    /// The meter already tracks its maximum number of contexts.
    #[error("the meter tracks its maximum of {max} open contexts")]
    ContextsFull {
        /// The limit.
        max: usize,
    },
    /// This context already has its maximum number of open frames.
    #[error("this context has its maximum of {max} open logins and queries")]
    FramesFull {
        /// The limit.
        max: usize,
    },
}

/// Bounds on what contexts may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContextLimits {
    /// Most contexts with open frames at once.
    pub contexts_max: usize,
    /// Most open frames in one context.
    pub frames_max: usize,
}

impl Default for ContextLimits {
    fn default() -> Self {
        Self {
            contexts_max: 65_536,
            frames_max: 64,
        }
    }
}

/// The open frames of every context.
#[derive(Debug, Default)]
pub struct Contexts {
    stacks: HashMap<ContextKey, Vec<Frame>>,
    limits: ContextLimits,
}

impl Contexts {
    /// No open frames, with these limits.
    pub fn new(limits: ContextLimits) -> Self {
        Self {
            stacks: HashMap::new(),
            limits,
        }
    }

    /// Contexts with open frames.
    pub fn len(&self) -> usize {
        self.stacks.len()
    }

    /// True when no context has open frames.
    pub fn is_empty(&self) -> bool {
        self.stacks.is_empty()
    }

    /// Who would pay for a use made by `caller` now: the nearest open frame,
    /// and only when the caller's uid opened it (a login by another uid, or
    /// a query made under another uid, pays for nothing of this caller's:
    /// `None`).
    pub fn payer(&self, caller: &Caller) -> Option<Payer> {
        self.enclosing_frame(caller).map(Frame::payer_inside)
    }

    /// The frame a use by `caller` would be made inside.
    fn enclosing_frame(&self, caller: &Caller) -> Option<&Frame> {
        std::iter::once(&caller.key)
            .chain(&caller.enclosing)
            .find_map(|key| self.stacks.get(key).and_then(|stack| stack.last()))
            .filter(|frame| frame.opened_by(caller.uid))
    }

    /// The context a query opened by `caller` now records its commit in
    /// (see `Frame::Query::chain`).
    fn chain_for(&self, caller: &Caller) -> ContextKey {
        match self.enclosing_frame(caller) {
            Some(Frame::Query { chain, .. }) => chain.clone(),
            _ => caller.key.clone(),
        }
    }

    fn push(&mut self, key: &ContextKey, frame: Frame) -> Result<(), ContextError> {
        let limits = self.limits;
        if !self.stacks.contains_key(key) && self.stacks.len() >= limits.contexts_max {
            return Err(ContextError::ContextsFull {
                max: limits.contexts_max,
            });
        }
        let stack = self.stacks.entry(key.clone()).or_default();
        if stack.len() >= limits.frames_max {
            return Err(ContextError::FramesFull {
                max: limits.frames_max,
            });
        }
        stack.push(frame);
        Ok(())
    }

    /// Pops the nearest frame matching `wanted` and everything above it.
    fn pop_through(&mut self, key: &ContextKey, wanted: impl Fn(&Frame) -> bool) -> Option<Frame> {
        let stack = self.stacks.get_mut(key)?;
        let index = stack.iter().rposition(wanted)?;
        let frame = stack[index].clone();
        stack.truncate(index);
        if stack.is_empty() {
            self.stacks.remove(key);
        }
        Some(frame)
    }

    /// True while a query of `pid` is open in the context recorded as
    /// `context` in readings (its commit may still come).
    pub fn has_open_query(&self, context: &Context, pid: Pid) -> bool {
        let Some(key) = ContextKey::parse(context.as_str()) else {
            return false;
        };
        // The query may be open in another context than the one its chain
        // records (a product used inside another, in a child process).
        self.stacks.values().flatten().any(|frame| {
            matches!(frame, Frame::Query { pid: open, chain, .. } if *open == pid && *chain == key)
        })
    }

    /// `login(CID)` in the caller's context, by local user `uid`.
    pub fn login(&mut self, caller: &Caller, cid: Cid, uid: u32) -> Result<(), ContextError> {
        self.push(&caller.key, Frame::Login { cid, uid })
    }

    /// True when a login of CID is open in the caller's own context.
    pub fn has_login(&self, caller: &Caller, cid: Cid) -> bool {
        self.stacks.get(&caller.key).is_some_and(|stack| {
            stack
                .iter()
                .any(|frame| matches!(frame, Frame::Login { cid: open, .. } if *open == cid))
        })
    }

    /// `logout(CID)`: true when a login of CID was open and is now closed.
    pub fn logout(&mut self, caller: &Caller, cid: Cid) -> bool {
        self.pop_through(
            &caller.key,
            |frame| matches!(frame, Frame::Login { cid: open, .. } if *open == cid),
        )
        .is_some()
    }

    /// Opens a query of `pid`, made by the caller's uid, whose own use
    /// `payer` pays for.
    pub fn open_query(
        &mut self,
        caller: &Caller,
        pid: Pid,
        payer: Payer,
    ) -> Result<(), ContextError> {
        let uid = caller.uid;
        let chain = self.chain_for(caller);
        self.push(
            &caller.key,
            Frame::Query {
                pid,
                payer,
                uid,
                chain,
            },
        )
    }

    /// Closes the nearest open query of `pid` in the caller's own context,
    /// made by the caller's uid, and returns who pays for it; `None` when
    /// no such query is open.
    pub fn close_query(&mut self, caller: &Caller, pid: Pid) -> Option<Payer> {
        self.close_query_in_chain(caller, pid)
            .map(|(payer, _)| payer)
    }

    /// Like `close_query`, with the context its commit is recorded in.
    pub fn close_query_in_chain(
        &mut self,
        caller: &Caller,
        pid: Pid,
    ) -> Option<(Payer, ContextKey)> {
        let uid = caller.uid;
        let frame = self.pop_through(&caller.key, |frame| {
            matches!(frame, Frame::Query { pid: open, .. } if *open == pid) && frame.opened_by(uid)
        })?;
        match frame {
            Frame::Query { payer, chain, .. } => Some((payer, chain)),
            Frame::Login { .. } => unreachable!("only a query frame matches"),
        }
    }

    /// Every open login with its uid, outermost first within each context,
    /// for saving.
    pub fn logins(&self) -> Vec<(ContextKey, Cid, u32)> {
        let mut logins: Vec<(ContextKey, Cid, u32)> = self
            .stacks
            .iter()
            .filter(|(key, _)| key.process().is_some())
            .flat_map(|(key, stack)| {
                stack.iter().filter_map(move |frame| match frame {
                    Frame::Login { cid, uid } => Some((key.clone(), *cid, *uid)),
                    Frame::Query { .. } => None,
                })
            })
            .collect();
        logins.sort_by_key(|(key, _, _)| key.to_string());
        logins
    }

    /// Closes every login that `admitted` no longer allows (its grant
    /// expired), with the frames above it, as a logout would; returns how
    /// many were closed.
    pub fn end_logins(&mut self, admitted: impl Fn(Cid, u32) -> bool) -> usize {
        let mut ended = 0;
        self.stacks.retain(|_, stack| {
            let refused = stack.iter().position(
                |frame| matches!(*frame, Frame::Login { cid, uid } if !admitted(cid, uid)),
            );
            if let Some(index) = refused {
                ended += stack[index..]
                    .iter()
                    .filter(|frame| matches!(frame, Frame::Login { .. }))
                    .count();
                stack.truncate(index);
            }
            !stack.is_empty()
        });
        ended
    }

    /// Drops every context whose process `alive` says has exited; returns how
    /// many were dropped. Connection contexts are dropped with their connection.
    pub fn retain_processes(&mut self, alive: impl Fn(&ProcessId) -> bool) -> usize {
        let before = self.stacks.len();
        self.stacks.retain(|key, _| match key {
            ContextKey::Process(process) | ContextKey::Named { process, .. } => alive(process),
            ContextKey::Connection(_) => true,
        });
        before - self.stacks.len()
    }

    /// Drops a connection's context when the connection closes.
    pub fn forget_connection(&mut self, number: u64) {
        self.stacks.remove(&ContextKey::Connection(number));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn process(pid: u32) -> ProcessId {
        ProcessId {
            pid,
            start_ticks: 1000 + u64::from(pid),
        }
    }

    /// A process of uid 1000 whose ancestors are `parents`, nearest first.
    fn caller(pid: u32, parents: &[u32]) -> Caller {
        Caller {
            key: ContextKey::Process(process(pid)),
            enclosing: parents
                .iter()
                .map(|&p| ContextKey::Process(process(p)))
                .collect(),
            uid: Some(1000),
        }
    }

    fn thread(pid: u32, name: &str, parents: &[u32]) -> Caller {
        let mut enclosing = vec![ContextKey::Process(process(pid))];
        enclosing.extend(parents.iter().map(|&p| ContextKey::Process(process(p))));
        Caller {
            key: ContextKey::Named {
                process: process(pid),
                name: Context::parse(name).unwrap(),
            },
            enclosing,
            uid: Some(1000),
        }
    }

    fn cid(n: u32) -> Cid {
        Cid::parse(&format!("B1-C{n}")).unwrap()
    }

    fn pid(n: u32) -> Pid {
        Pid::parse(&format!("B1-P{n}")).unwrap()
    }

    #[test]
    fn nested_components_are_charged_to_the_enclosing_products_owner() {
        let mut contexts = Contexts::default();
        let program = caller(10, &[1]);
        assert_eq!(contexts.payer(&program), None);
        contexts.login(&program, cid(1), 1000).unwrap();
        assert_eq!(contexts.payer(&program), Some(Payer::Customer(cid(1))));
        contexts
            .open_query(&program, pid(1), Payer::Customer(cid(1)))
            .unwrap();
        // A component used inside product 1 is paid by product 1's owner.
        assert_eq!(contexts.payer(&program), Some(Payer::OwnerOf(pid(1))));
        contexts
            .open_query(&program, pid(2), Payer::OwnerOf(pid(1)))
            .unwrap();
        assert_eq!(
            contexts.close_query(&program, pid(2)),
            Some(Payer::OwnerOf(pid(1)))
        );
        assert_eq!(
            contexts.close_query(&program, pid(1)),
            Some(Payer::Customer(cid(1)))
        );
        assert_eq!(
            contexts.close_query(&program, pid(1)),
            None,
            "already closed"
        );
        assert!(contexts.logout(&program, cid(1)));
        assert!(contexts.is_empty());
    }

    #[test]
    fn a_components_commit_is_recorded_in_the_context_of_its_outermost_use() {
        let mut contexts = Contexts::default();
        // A shell logs in; the editor runs in a child, the spell checker in
        // the editor's child, its dictionary in a thread of that child.
        let (shell, editor) = (caller(1, &[]), caller(10, &[1]));
        let (speller, dictionary) = (caller(20, &[10, 1]), thread(20, "t", &[10, 1]));
        contexts.login(&shell, cid(1), 1000).unwrap();
        contexts
            .open_query(&editor, pid(1), Payer::Customer(cid(1)))
            .unwrap();
        contexts
            .open_query(&speller, pid(2), Payer::OwnerOf(pid(1)))
            .unwrap();
        contexts
            .open_query(&dictionary, pid(3), Payer::OwnerOf(pid(2)))
            .unwrap();
        let chain = editor.key.clone();
        let recorded = Context::parse(&chain.to_string()).unwrap();
        assert!(contexts.has_open_query(&recorded, pid(1)));
        assert!(
            contexts.has_open_query(&recorded, pid(2)),
            "open in a child"
        );
        assert!(!contexts.has_open_query(&recorded, pid(4)));
        assert_eq!(
            contexts.close_query_in_chain(&dictionary, pid(3)),
            Some((Payer::OwnerOf(pid(2)), chain.clone()))
        );
        assert_eq!(
            contexts.close_query_in_chain(&speller, pid(2)),
            Some((Payer::OwnerOf(pid(1)), chain.clone()))
        );
        assert_eq!(
            contexts.close_query_in_chain(&editor, pid(1)),
            Some((Payer::Customer(cid(1)), chain))
        );
        assert!(!contexts.has_open_query(&recorded, pid(1)));
    }

    #[test]
    fn interleaved_programs_never_share_frames() {
        let mut contexts = Contexts::default();
        let (a, b) = (caller(10, &[1]), caller(11, &[1]));
        contexts.login(&a, cid(1), 1000).unwrap();
        contexts.login(&b, cid(2), 1000).unwrap();
        contexts
            .open_query(&a, pid(1), Payer::Customer(cid(1)))
            .unwrap();
        assert_eq!(contexts.payer(&b), Some(Payer::Customer(cid(2))));
        contexts
            .open_query(&b, pid(1), Payer::Customer(cid(2)))
            .unwrap();
        assert_eq!(
            contexts.close_query(&a, pid(1)),
            Some(Payer::Customer(cid(1)))
        );
        assert_eq!(
            contexts.close_query(&b, pid(1)),
            Some(Payer::Customer(cid(2)))
        );
    }

    #[test]
    fn children_inherit_and_threads_are_separate() {
        let mut contexts = Contexts::default();
        let shell = caller(5, &[1]);
        let program = caller(10, &[5, 1]);
        let child = caller(20, &[10, 5, 1]);
        contexts.login(&shell, cid(7), 1000).unwrap();
        assert_eq!(contexts.payer(&child), Some(Payer::Customer(cid(7))));
        contexts
            .open_query(&program, pid(3), Payer::Customer(cid(7)))
            .unwrap();
        assert_eq!(contexts.payer(&child), Some(Payer::OwnerOf(pid(3))));
        // Named threads of one process fall back to the process, not each other.
        let (t1, t2) = (thread(10, "t1", &[5, 1]), thread(10, "t2", &[5, 1]));
        contexts
            .open_query(&t1, pid(4), Payer::OwnerOf(pid(3)))
            .unwrap();
        assert_eq!(contexts.payer(&t1), Some(Payer::OwnerOf(pid(4))));
        assert_eq!(contexts.payer(&t2), Some(Payer::OwnerOf(pid(3))));
        // A commit closes only the caller's own frames.
        assert_eq!(contexts.close_query(&t2, pid(4)), None);
        assert_eq!(contexts.close_query(&child, pid(3)), None);
    }

    #[test]
    fn uncommitted_queries_are_closed_with_the_enclosing_one() {
        let mut contexts = Contexts::default();
        let program = caller(10, &[]);
        contexts.login(&program, cid(1), 1000).unwrap();
        contexts
            .open_query(&program, pid(1), Payer::Customer(cid(1)))
            .unwrap();
        contexts
            .open_query(&program, pid(2), Payer::OwnerOf(pid(1)))
            .unwrap();
        // pid 2 was never committed; committing pid 1 closes it too.
        assert_eq!(
            contexts.close_query(&program, pid(1)),
            Some(Payer::Customer(cid(1)))
        );
        assert_eq!(contexts.close_query(&program, pid(2)), None);
        assert_eq!(contexts.payer(&program), Some(Payer::Customer(cid(1))));
        assert!(!contexts.logout(&program, cid(2)), "cid 2 never logged in");
    }

    #[test]
    fn limits_and_cleanup() {
        let mut contexts = Contexts::new(ContextLimits {
            contexts_max: 2,
            frames_max: 2,
        });
        let (a, b, c) = (caller(1, &[]), caller(2, &[]), caller(3, &[]));
        contexts.login(&a, cid(1), 1000).unwrap();
        contexts.login(&a, cid(1), 1000).unwrap();
        assert_eq!(
            contexts.login(&a, cid(1), 1000),
            Err(ContextError::FramesFull { max: 2 })
        );
        contexts.login(&b, cid(2), 1000).unwrap();
        assert_eq!(
            contexts.login(&c, cid(3), 1000),
            Err(ContextError::ContextsFull { max: 2 })
        );
        assert_eq!(contexts.retain_processes(|process| process.pid != 1), 1);
        contexts.login(&c, cid(3), 1000).unwrap();
        assert_eq!(contexts.payer(&a), None);
    }

    #[test]
    fn frames_pay_only_for_callers_of_the_uid_that_opened_them() {
        let mut contexts = Contexts::default();
        // Root logs in with its own grant, then the same process (same PID
        // and start time) changes its uid to 1000 in place.
        let as_root = Caller {
            uid: Some(0),
            ..caller(10, &[1])
        };
        let as_user = caller(10, &[1]);
        let without_uid = Caller {
            uid: None,
            ..caller(10, &[1])
        };
        contexts.login(&as_root, cid(1), 0).unwrap();
        assert_eq!(contexts.payer(&as_root), Some(Payer::Customer(cid(1))));
        assert_eq!(
            contexts.payer(&as_user),
            None,
            "root's login is not uid 1000's"
        );
        assert_eq!(contexts.payer(&without_uid), None, "no uid, no login");
        // Nor does the session reach uid 1000's children through the walk.
        let child = caller(20, &[10, 1]);
        assert_eq!(contexts.payer(&child), None);
        // A query root opened pays for root's components only, and only
        // root commits it.
        contexts
            .open_query(&as_root, pid(1), Payer::Customer(cid(1)))
            .unwrap();
        assert_eq!(contexts.payer(&as_root), Some(Payer::OwnerOf(pid(1))));
        assert_eq!(contexts.payer(&as_user), None);
        assert_eq!(contexts.close_query(&as_user, pid(1)), None);
        assert_eq!(contexts.close_query(&without_uid, pid(1)), None);
        assert_eq!(
            contexts.close_query(&as_root, pid(1)),
            Some(Payer::Customer(cid(1)))
        );
        // Uid 1000's own login in the same context pays for uid 1000 only.
        contexts.login(&as_user, cid(2), 1000).unwrap();
        assert_eq!(contexts.payer(&as_user), Some(Payer::Customer(cid(2))));
        assert_eq!(contexts.payer(&as_root), None);
    }

    #[test]
    fn logins_are_listed_for_saving_without_queries() {
        let mut contexts = Contexts::default();
        let program = caller(10, &[]);
        contexts.login(&program, cid(1), 1000).unwrap();
        contexts
            .open_query(&program, pid(1), Payer::Customer(cid(1)))
            .unwrap();
        contexts.login(&program, cid(2), 1000).unwrap();
        let connection = Caller {
            key: ContextKey::Connection(3),
            enclosing: Vec::new(),
            uid: Some(1000),
        };
        contexts.login(&connection, cid(3), 1000).unwrap();
        assert_eq!(
            contexts.logins(),
            vec![
                (program.key.clone(), cid(1), 1000),
                (program.key.clone(), cid(2), 1000)
            ]
        );
    }

    #[test]
    fn logins_no_longer_admitted_are_closed_with_what_is_above_them() {
        let mut contexts = Contexts::default();
        let a = caller(10, &[]);
        let b = Caller {
            uid: Some(1001),
            ..caller(11, &[])
        };
        contexts.login(&a, cid(1), 1000).unwrap();
        contexts.login(&a, cid(2), 1000).unwrap();
        contexts
            .open_query(&a, pid(1), Payer::Customer(cid(2)))
            .unwrap();
        contexts.login(&b, cid(2), 1001).unwrap();
        // cid 2's grant for uid 1000 expired; uid 1001's did not.
        let ended = contexts.end_logins(|cid_, uid| !(cid_ == cid(2) && uid == 1000));
        assert_eq!(ended, 1);
        assert_eq!(contexts.payer(&a), Some(Payer::Customer(cid(1))));
        assert_eq!(contexts.payer(&b), Some(Payer::Customer(cid(2))));
        assert_eq!(contexts.end_logins(|_, _| false), 2);
        assert!(contexts.is_empty());
    }

    #[test]
    fn context_keys_parse_back() {
        for key in [
            ContextKey::Process(process(7)),
            ContextKey::Named {
                process: process(8),
                name: Context::parse("t:1").unwrap(),
            },
        ] {
            assert_eq!(ContextKey::parse(&key.to_string()), Some(key));
        }
        assert_eq!(ContextKey::parse("conn.9"), None);
        assert_eq!(ContextKey::parse("7"), None);
        assert_eq!(ContextKey::parse("x.y"), None);
    }

    #[test]
    fn context_keys_print_as_reading_contexts() {
        let named = ContextKey::Named {
            process: process(42),
            name: Context::parse("worker-1").unwrap(),
        };
        assert_eq!(named.to_string(), "42.1042:worker-1");
        assert!(Context::parse(&named.to_string()).is_ok());
        assert_eq!(ContextKey::Connection(9).to_string(), "conn.9");
    }
}
