//! The post-copy destination's placement state machine: per page, whether it is owed,
//! asked for, placed; what to do with a fault and with an arriving page. Every owed page is
//! placed exactly once; a copy that arrives after its page was placed is dropped.

/// A page's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
enum PageState {
    /// Current at the destination since the pre-copy rounds (or a hole the guest may
    /// fault on: then zero-filled).
    Held = 0,
    /// Owed by the source, not asked for.
    Owed = 1,
    /// Owed, and asked for because the guest faulted on it.
    Requested = 2,
    /// Placed during post-copy (an owed page that arrived, or a zero-filled hole).
    Placed = 3,
}

/// What to do about a guest fault on a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFault {
    /// First fault on an owed page: ask the source for it.
    Request,
    /// Already asked for: wait for it.
    Wait,
    /// A hole the rounds left (a page never written): place a zero page.
    Zero,
    /// Placed meanwhile: wake the faulting thread.
    Wake,
}

/// What to do with a page that arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnArrival {
    /// Owed and not placed: place it (then [`Placement::placed`]).
    Place {
        /// The guest is waiting for it (it was requested).
        faulted: bool,
    },
    /// Placed already (a fault's copy came first): drop it.
    DropPlaced,
    /// Never owed: drop it (a protocol error for a well-behaved source).
    DropNotOwed,
}

/// The placement state of every page of a guest in post-copy.
#[derive(Debug, Clone)]
pub struct Placement {
    state: Vec<PageState>,
    owed_left: u64,
    placed_faulted: u64,
    placed_streamed: u64,
    dropped: u64,
}

impl Placement {
    /// `pages` pages, of which `owed` (any order, each below `pages`) are owed.
    pub fn new(pages: u64, owed: &[u64]) -> Result<Placement, u64> {
        let mut state = vec![PageState::Held; pages as usize];
        let mut owed_left = 0;
        for &p in owed {
            let s = state.get_mut(p as usize).ok_or(p)?;
            if *s == PageState::Held {
                *s = PageState::Owed;
                owed_left += 1;
            }
        }
        Ok(Placement {
            state,
            owed_left,
            placed_faulted: 0,
            placed_streamed: 0,
            dropped: 0,
        })
    }

    /// The guest faulted on `page` (below the page count).
    pub fn fault(&mut self, page: u64) -> OnFault {
        let s = &mut self.state[page as usize];
        match *s {
            PageState::Owed => {
                *s = PageState::Requested;
                OnFault::Request
            }
            PageState::Requested => OnFault::Wait,
            PageState::Held => OnFault::Zero,
            PageState::Placed => OnFault::Wake,
        }
    }

    /// A hole `fault` said to zero-fill was placed (or found present).
    pub fn zero_placed(&mut self, page: u64) {
        if self.state[page as usize] == PageState::Held {
            self.state[page as usize] = PageState::Placed;
        }
    }

    /// Page `page` (below the page count) arrived from the source.
    pub fn arrive(&mut self, page: u64) -> OnArrival {
        match self.state[page as usize] {
            PageState::Owed => OnArrival::Place { faulted: false },
            PageState::Requested => OnArrival::Place { faulted: true },
            PageState::Placed => {
                self.dropped += 1;
                OnArrival::DropPlaced
            }
            PageState::Held => {
                self.dropped += 1;
                OnArrival::DropNotOwed
            }
        }
    }

    /// The page [`Self::arrive`] said to place is in place.
    pub fn placed(&mut self, page: u64) {
        let s = &mut self.state[page as usize];
        match *s {
            PageState::Owed => self.placed_streamed += 1,
            PageState::Requested => self.placed_faulted += 1,
            _ => return,
        }
        *s = PageState::Placed;
        self.owed_left -= 1;
    }

    /// Owed pages not placed yet.
    pub fn remaining(&self) -> u64 {
        self.owed_left
    }

    /// The owed pages not placed yet, ascending.
    pub fn still_owed(&self) -> Vec<u64> {
        self.pages_in(&[PageState::Owed, PageState::Requested])
    }

    /// The pages asked for and not placed yet, ascending.
    pub fn requested(&self) -> Vec<u64> {
        self.pages_in(&[PageState::Requested])
    }

    fn pages_in(&self, states: &[PageState]) -> Vec<u64> {
        (0..self.state.len() as u64)
            .filter(|&p| states.contains(&self.state[p as usize]))
            .collect()
    }

    /// Owed pages placed after a fault.
    pub fn placed_faulted(&self) -> u64 {
        self.placed_faulted
    }

    /// Owed pages placed from the stream before the guest touched them.
    pub fn placed_streamed(&self) -> u64 {
        self.placed_streamed
    }

    /// Arrivals dropped.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quickcheck::{quickcheck, TestResult};

    #[test]
    fn a_fault_requests_once_and_the_late_stream_copy_is_dropped() {
        let mut p = Placement::new(8, &[2, 5]).unwrap();
        assert_eq!(p.fault(5), OnFault::Request);
        assert_eq!(p.fault(5), OnFault::Wait);
        assert_eq!(p.arrive(5), OnArrival::Place { faulted: true });
        p.placed(5);
        assert_eq!(p.fault(5), OnFault::Wake);
        assert_eq!(p.arrive(5), OnArrival::DropPlaced);
        assert_eq!(p.fault(0), OnFault::Zero);
        assert_eq!(p.arrive(0), OnArrival::DropNotOwed);
        assert_eq!(p.still_owed(), vec![2]);
        assert_eq!(p.arrive(2), OnArrival::Place { faulted: false });
        p.placed(2);
        assert_eq!(p.remaining(), 0);
        assert_eq!(
            (p.placed_faulted(), p.placed_streamed(), p.dropped()),
            (1, 1, 2)
        );
        assert_eq!(Placement::new(4, &[4]).unwrap_err(), 4);
    }

    /// Any interleaving of faults and arrivals (the stream's copies, the requests' copies,
    /// duplicates, arrivals of pages never owed): a page is placed at most once, only an
    /// owed page is placed, and once every owed page arrived nothing is owed.
    #[test]
    fn every_owed_page_is_placed_exactly_once() {
        fn prop(owed: Vec<u8>, events: Vec<(bool, u8)>) -> TestResult {
            const PAGES: u64 = 64;
            let owed: Vec<u64> = owed.iter().map(|&p| p as u64 % PAGES).collect();
            let mut p = Placement::new(PAGES, &owed).unwrap();
            let mut owed_set: std::collections::BTreeSet<u64> = owed.iter().copied().collect();
            let total = owed_set.len() as u64;
            let mut placed = std::collections::BTreeSet::new();
            let mut zeroed: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
            // Every owed page arrives at the end too (the background stream).
            let tail = owed_set
                .iter()
                .map(|&o| (false, o as u8))
                .collect::<Vec<_>>();
            for (is_fault, page) in events.into_iter().chain(tail) {
                let page = page as u64 % PAGES;
                if is_fault {
                    match p.fault(page) {
                        OnFault::Zero => {
                            if owed_set.contains(&page) || !zeroed.insert(page) {
                                return TestResult::failed();
                            }
                            p.zero_placed(page);
                        }
                        OnFault::Wake if !placed.contains(&page) && !zeroed.contains(&page) => {
                            return TestResult::failed()
                        }
                        _ => {}
                    }
                    continue;
                }
                match p.arrive(page) {
                    OnArrival::Place { .. } => {
                        if !owed_set.contains(&page) || !placed.insert(page) {
                            return TestResult::failed();
                        }
                        p.placed(page);
                    }
                    OnArrival::DropPlaced => {
                        if !placed.contains(&page) && !zeroed.contains(&page) {
                            return TestResult::failed();
                        }
                    }
                    OnArrival::DropNotOwed => {
                        if owed_set.contains(&page) {
                            return TestResult::failed();
                        }
                    }
                }
            }
            owed_set.retain(|o| !placed.contains(o));
            TestResult::from_bool(
                owed_set.is_empty()
                    && p.remaining() == 0
                    && p.placed_faulted() + p.placed_streamed() == total
                    && p.still_owed().is_empty(),
            )
        }
        quickcheck(prop as fn(Vec<u8>, Vec<(bool, u8)>) -> TestResult);
    }
}
