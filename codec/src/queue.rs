//! The bounded job queue between a pipeline's dispatching thread and one
//! worker.
//!
//! Like `std::sync::mpsc::sync_channel`, but a blocked producer is woken
//! only once the worker has drained the queue to half, not after every job
//! it takes. With the standard channel a dispatcher that runs ahead (it
//! always does: routing a packet costs a fraction of decoding it) was woken
//! once per packet, and on this VM every futex wake-up is an inter-processor
//! interrupt: `try_to_wake_up` took about a tenth of the receive
//! pipeline's samples, most of it on the worker, which is the bottleneck.
//! Waking the producer in bursts keeps the queue fed with a quarter as many
//! wake-ups. The consumer is woken only when it actually sleeps.
#![forbid(unsafe_code)]

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

struct State<T> {
    items: VecDeque<T>,
    /// The consumer sleeps in `recv` waiting for an item.
    consumer_waiting: bool,
    /// The producer sleeps in `send` waiting for room.
    producer_waiting: bool,
    producer_gone: bool,
    consumer_gone: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    not_empty: Condvar,
    not_full: Condvar,
    capacity: usize,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A panic while holding the lock cannot leave the deque half
        // updated (its operations do not panic midway), so poisoning is
        // ignored.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The producing end of a [`bounded`] queue.
pub(crate) struct QueueSender<T>(Arc<Shared<T>>);

/// The consuming end of a [`bounded`] queue.
pub(crate) struct QueueReceiver<T>(Arc<Shared<T>>);

/// A queue holding at most `capacity` (at least 1) items.
pub(crate) fn bounded<T>(capacity: usize) -> (QueueSender<T>, QueueReceiver<T>) {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            items: VecDeque::with_capacity(capacity),
            consumer_waiting: false,
            producer_waiting: false,
            producer_gone: false,
            consumer_gone: false,
        }),
        not_empty: Condvar::new(),
        not_full: Condvar::new(),
        capacity: capacity.max(1),
    });
    (QueueSender(Arc::clone(&shared)), QueueReceiver(shared))
}

impl<T> QueueSender<T> {
    /// Appends `item`, blocking while the queue is full. Gives the item back
    /// when the consumer is gone.
    pub(crate) fn send(&self, item: T) -> Result<(), T> {
        let q = &self.0;
        let mut s = q.lock();
        loop {
            if s.consumer_gone {
                return Err(item);
            }
            if s.items.len() < q.capacity {
                break;
            }
            s.producer_waiting = true;
            s = q.not_full.wait(s).unwrap_or_else(|p| p.into_inner());
        }
        s.items.push_back(item);
        let wake = s.consumer_waiting;
        drop(s);
        if wake {
            q.not_empty.notify_one();
        }
        Ok(())
    }
}

impl<T> Drop for QueueSender<T> {
    fn drop(&mut self) {
        self.0.lock().producer_gone = true;
        self.0.not_empty.notify_all();
    }
}

impl<T> QueueReceiver<T> {
    /// The next item, blocking while the queue is empty; `None` once the
    /// producer is gone and every item was taken.
    pub(crate) fn recv(&self) -> Option<T> {
        self.take(true)
    }

    /// The next item if one is queued.
    pub(crate) fn try_recv(&self) -> Option<T> {
        self.take(false)
    }

    fn take(&self, block: bool) -> Option<T> {
        let q = &self.0;
        let mut s = q.lock();
        loop {
            if let Some(item) = s.items.pop_front() {
                // Refill in bursts: wake a blocked producer at half.
                let wake = s.producer_waiting && s.items.len() <= q.capacity / 2;
                if wake {
                    s.producer_waiting = false;
                }
                drop(s);
                if wake {
                    q.not_full.notify_one();
                }
                return Some(item);
            }
            if s.producer_gone || !block {
                return None;
            }
            s.consumer_waiting = true;
            s = q.not_empty.wait(s).unwrap_or_else(|p| p.into_inner());
            s.consumer_waiting = false;
        }
    }
}

impl<T> Drop for QueueReceiver<T> {
    fn drop(&mut self) {
        self.0.lock().consumer_gone = true;
        self.0.not_full.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn delivers_everything_in_order_through_a_full_queue() {
        for capacity in [1, 2, 3, 8] {
            let (tx, rx) = bounded(capacity);
            let consumer = std::thread::spawn(move || {
                let mut got = Vec::new();
                while let Some(v) = rx.recv() {
                    if v % 97 == 0 {
                        // Let the producer block on a full queue now and then.
                        std::thread::sleep(Duration::from_micros(200));
                    }
                    got.push(v);
                }
                got
            });
            for v in 0..5000u32 {
                tx.send(v).unwrap();
            }
            drop(tx);
            assert_eq!(consumer.join().unwrap(), (0..5000).collect::<Vec<_>>());
        }
    }

    #[test]
    fn try_recv_does_not_block_and_keeps_order() {
        let (tx, rx) = bounded(4);
        assert_eq!(rx.try_recv(), None);
        tx.send(1).unwrap();
        tx.send(2).unwrap();
        assert_eq!(rx.try_recv(), Some(1));
        assert_eq!(rx.recv(), Some(2));
        drop(tx);
        assert_eq!(rx.recv(), None);
    }

    #[test]
    fn a_gone_consumer_fails_sends_even_a_blocked_one() {
        let (tx, rx) = bounded(1);
        tx.send(1).unwrap();
        let dropper = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            drop(rx);
        });
        // Blocks on the full queue until the consumer goes away.
        assert_eq!(tx.send(2), Err(2));
        dropper.join().unwrap();
        assert_eq!(tx.send(3), Err(3));
    }
}
