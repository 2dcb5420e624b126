//! The order the source streams owed pages in during post-copy: after a fault, the pages
//! that follow the faulted one (a guest that touched a page is likely to touch its
//! neighbours next), then the rest in ascending order. Each owed page is streamed once;
//! a page sent because it was requested is not streamed again.

use std::collections::VecDeque;

/// Pages after a faulted page that are streamed next.
pub const NEIGHBOURS: u64 = 15;

const NOT_OWED: u8 = 0;
const OWED: u8 = 1;
const SENT: u8 = 2;

/// The owed pages not yet sent, and the order to send them in.
#[derive(Debug)]
pub struct StreamOrder {
    state: Vec<u8>,
    ascending: Vec<u64>,
    cursor: usize,
    next_up: VecDeque<u64>,
}

impl StreamOrder {
    /// `owed` (ascending, each below `pages`) are to be sent.
    pub fn new(pages: u64, owed: &[u64]) -> StreamOrder {
        let mut state = vec![NOT_OWED; pages as usize];
        for &p in owed {
            state[p as usize] = OWED;
        }
        StreamOrder {
            state,
            ascending: owed.to_vec(),
            cursor: 0,
            next_up: VecDeque::new(),
        }
    }

    /// Whether `page` is owed (sent or not).
    pub fn is_owed(&self, page: u64) -> bool {
        self.state
            .get(page as usize)
            .is_some_and(|&s| s != NOT_OWED)
    }

    /// `page` was requested and sent: it is not streamed again, and its neighbours come
    /// next.
    pub fn requested(&mut self, page: u64) {
        self.mark_sent(page);
        let end = (page + 1 + NEIGHBOURS).min(self.state.len() as u64);
        for n in (page + 1..end).rev() {
            if self.state[n as usize] == OWED {
                self.next_up.push_front(n);
            }
        }
    }

    /// The next page to stream (marked sent), or None when every owed page was sent.
    pub fn next(&mut self) -> Option<u64> {
        while let Some(p) = self.next_up.pop_front() {
            if self.state[p as usize] == OWED {
                self.mark_sent(p);
                return Some(p);
            }
        }
        while let Some(&p) = self.ascending.get(self.cursor) {
            self.cursor += 1;
            if self.state[p as usize] == OWED {
                self.mark_sent(p);
                return Some(p);
            }
        }
        None
    }

    fn mark_sent(&mut self, page: u64) {
        if let Some(s) = self.state.get_mut(page as usize) {
            if *s == OWED {
                *s = SENT;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn neighbours_of_a_fault_come_first_and_nothing_is_streamed_twice() {
        let owed: Vec<u64> = vec![1, 2, 3, 40, 41, 42, 70];
        let mut o = StreamOrder::new(100, &owed);
        assert_eq!(o.next(), Some(1));
        o.requested(40);
        assert!(o.is_owed(40) && !o.is_owed(39));
        let rest: Vec<u64> = std::iter::from_fn(|| o.next()).collect();
        assert_eq!(rest, vec![41, 42, 2, 3, 70]);
        o.requested(99);
        assert_eq!(o.next(), None);
    }
}
