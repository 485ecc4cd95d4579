//! Where a new upload batch ends. The backoffice charges a component's use
//! to the enclosing product's owner only when the enclosing use arrives in
//! the same batch and context (`docs/security.md`), and a component is
//! committed before the use that encloses it. So a batch must not end
//! between a component's commit and its enclosing product's commit while
//! that product is still in use: it ends before the component instead, and
//! the component goes in the next batch with its enclosing commit.

use std::collections::HashMap;

use proto::reading::{Event, Reading};
use proto::{Context, Payer, Pid};

/// How long the first waiting reading may be held back for its enclosing
/// use to be committed; after that it is uploaded as it is (and, if the
/// enclosing use never comes, goes to suspense there).
pub const COMPONENT_HOLD_MAX_MS: u64 = 10 * 60 * 1000;

/// Where the batch made of the first readings waiting should end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchEnd {
    /// Take the first this many readings (at least one).
    Take(usize),
    /// Upload nothing now: the first reading waits for its enclosing use.
    Hold,
}

/// Decides how many of `readings` (the first waiting, in order) the next
/// batch takes. `still_open(context, pid)` says whether a query of `pid` is
/// open in `context` now, that is, whether its commit may still come.
pub fn batch_end(
    readings: &[Reading],
    still_open: impl Fn(&Context, Pid) -> bool,
    now_ms: u64,
) -> BatchEnd {
    // For each commit, the index of the commit that encloses it: the next
    // commit, in the same context, of the product it was used inside.
    let mut next_commit: HashMap<(&Context, Pid), usize> = HashMap::new();
    let mut enclosed_by: Vec<Option<usize>> = vec![None; readings.len()];
    let mut waiting = Vec::new();
    // Asked once per context and product: `still_open` looks through every
    // open frame, and a batch may hold thousands of such components.
    let mut open: HashMap<(&Context, Pid), bool> = HashMap::new();
    for (index, reading) in readings.iter().enumerate().rev() {
        let Event::Commit { pid, payer } = reading.event else {
            continue;
        };
        if let Some(Payer::OwnerOf(enclosing)) = payer {
            match next_commit.get(&(&reading.context, enclosing)) {
                Some(&at) => enclosed_by[index] = Some(at),
                None if *open
                    .entry((&reading.context, enclosing))
                    .or_insert_with(|| still_open(&reading.context, enclosing)) =>
                {
                    waiting.push(index)
                }
                None => {}
            }
        }
        next_commit.insert((&reading.context, pid), index);
    }
    let Some(&first_waiting) = waiting.iter().min() else {
        return BatchEnd::Take(readings.len());
    };
    // End before the first waiting component, then earlier still while a
    // component before the end has its chain of enclosing commits past it.
    let mut end = first_waiting;
    loop {
        let crossing = (0..end).find(|&index| {
            let mut at = index;
            while let Some(next) = enclosed_by[at] {
                if next >= end {
                    return true;
                }
                at = next;
            }
            false
        });
        match crossing {
            Some(index) => end = index,
            None => break,
        }
    }
    if end > 0 {
        BatchEnd::Take(end)
    } else if now_ms.saturating_sub(readings[0].time_ms) < COMPONENT_HOLD_MAX_MS {
        BatchEnd::Hold
    } else {
        BatchEnd::Take(readings.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_000_000_000;

    fn pid(n: u32) -> Pid {
        Pid::parse(&format!("B1-P{n}")).unwrap()
    }

    fn commit(context: &str, product: u32, payer: Payer) -> Reading {
        Reading {
            seq: 0,
            time_ms: NOW - 1_000,
            context: Context::parse(context).unwrap(),
            event: Event::Commit {
                pid: pid(product),
                payer: Some(payer),
            },
        }
    }

    fn customer() -> Payer {
        Payer::Customer("B1-C4".parse().unwrap())
    }

    fn inside(product: u32) -> Payer {
        Payer::OwnerOf(pid(product))
    }

    #[test]
    fn a_batch_with_every_enclosing_commit_is_taken_whole() {
        let readings = [
            commit("1.1", 2, inside(1)),
            commit("1.1", 1, customer()),
            commit("2.1", 2, inside(1)),
        ];
        // The last component's editor was closed without a commit: nothing
        // will come for it, so it goes as it is.
        assert_eq!(batch_end(&readings, |_, _| false, NOW), BatchEnd::Take(3));
    }

    #[test]
    fn a_batch_ends_before_a_component_whose_enclosing_use_is_still_open() {
        let readings = [
            commit("1.1", 3, customer()),
            commit("2.1", 2, inside(1)),
            commit("1.1", 3, customer()),
        ];
        let open = |context: &Context, product: Pid| context.as_str() == "2.1" && product == pid(1);
        assert_eq!(batch_end(&readings, open, NOW), BatchEnd::Take(1));
    }

    #[test]
    fn a_component_is_not_parted_from_a_chain_that_reaches_past_the_end() {
        // A spell check inside a dictionary inside the editor: the
        // dictionary's commit is enclosed by the editor's, still open, so
        // neither the dictionary nor the spell check before it may go.
        let readings = [
            commit("5.1", 9, customer()),
            commit("1.1", 3, inside(2)),
            commit("1.1", 2, inside(1)),
        ];
        let open = |_: &Context, product: Pid| product == pid(1);
        assert_eq!(batch_end(&readings, open, NOW), BatchEnd::Take(1));
    }

    #[test]
    fn the_first_reading_is_held_back_only_for_a_while() {
        let mut readings = vec![commit("1.1", 2, inside(1)), commit("2.1", 5, customer())];
        let open = |_: &Context, product: Pid| product == pid(1);
        assert_eq!(batch_end(&readings, open, NOW), BatchEnd::Hold);
        readings[0].time_ms = NOW - COMPONENT_HOLD_MAX_MS;
        assert_eq!(batch_end(&readings, open, NOW), BatchEnd::Take(2));
    }

    #[test]
    fn readings_of_other_kinds_never_end_a_batch_early() {
        let readings = [
            Reading {
                seq: 1,
                time_ms: NOW,
                context: Context::parse("1.1").unwrap(),
                event: Event::Login("B1-C4".parse().unwrap()),
            },
            commit("1.1", 1, customer()),
        ];
        assert_eq!(batch_end(&readings, |_, _| true, NOW), BatchEnd::Take(2));
    }
}
