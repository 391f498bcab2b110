//! Keeping the thread pool's workers awake while the CPU backend runs.
//!
//! A sparse step is a few dozen parallel operations of tens of microseconds each, with serial
//! work between them (a norm, the plan, the sampling). Between two operations rayon lets an idle
//! worker spin for a while and then sleep on a futex, so the next operation first has to wake it:
//! a system call on each side, a context switch and, on a VM, an interrupt between cores. With 2
//! threads a sparse `small` 32×32 generation ran only 1.3× faster than with one (dense: 1.9×),
//! and about 15 % of its samples were the kernel's scheduler.
//!
//! [`HotWorkers`] keeps every other worker of the pool polling for work for as long as it lives
//! (`rayon::yield_now`: each poll runs one pending job of the pool if there is one), so an
//! operation's jobs are picked up at once. The cost is that those workers' cores stay busy while
//! the guard lives, with or without work. The CLI holds one while it generates or benchmarks on
//! the CPU; a library user decides for their own loop. What is computed does not change: every
//! CPU operation gives the same bits on any thread and any schedule.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long [`HotWorkers::start`] waits for the other workers to take their polling jobs.
const START_WAIT: Duration = Duration::from_secs(1);

/// While it lives, every worker of the current rayon pool (the pool the caller runs in, else the
/// global one) other than the caller's own thread polls for work instead of sleeping. Dropping
/// it stops them and waits until each has stopped.
#[derive(Debug)]
pub struct HotWorkers {
    state: Arc<State>,
}

#[derive(Debug, Default)]
struct State {
    stop: AtomicBool,
    polling: AtomicUsize,
}

impl HotWorkers {
    /// Sends a polling job to every worker of the current pool but the caller's, and returns
    /// once each polls (or after a second, if some worker stays busy with other work): each
    /// runs the pool's jobs as they come until the guard drops.
    ///
    /// Start it while the pool is idle. A worker that takes its polling job while it waits inside
    /// another job of the pool (a `join` waiting for its other half) polls above that job, which
    /// then cannot finish before the guard drops; if the caller waits for that job, it hangs.
    /// Waiting here for every poller before returning is what keeps the caller's own next
    /// operation from being that job: none of its work is published until every worker polls
    /// from the top of its loop.
    pub fn start() -> HotWorkers {
        let state = Arc::new(State::default());
        let me = rayon::current_thread_index();
        let shared = Arc::clone(&state);
        rayon::spawn_broadcast(move |ctx| {
            // The caller's own thread must not poll: it would run the loop inside its own wait
            // for some operation's job and never come back out to drop the guard.
            if Some(ctx.index()) == me {
                return;
            }
            shared.polling.fetch_add(1, Ordering::SeqCst);
            while !shared.stop.load(Ordering::SeqCst) {
                match rayon::yield_now() {
                    Some(rayon::Yield::Executed) => {}
                    _ => std::hint::spin_loop(),
                }
            }
            shared.polling.fetch_sub(1, Ordering::SeqCst);
        });
        let others = rayon::current_num_threads() - usize::from(me.is_some());
        let t0 = Instant::now();
        while state.polling.load(Ordering::SeqCst) < others && t0.elapsed() < START_WAIT {
            std::thread::yield_now();
        }
        HotWorkers { state }
    }

    /// Workers polling now (the others have not reached their job yet, or are the caller).
    pub fn polling(&self) -> usize {
        self.state.polling.load(Ordering::SeqCst)
    }
}

impl Drop for HotWorkers {
    /// Stops the pollers and waits until none polls. A worker that reaches its job after this
    /// returns sees the stop and leaves at once.
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        while self.state.polling.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rayon::prelude::*;
    use std::collections::HashSet;
    use std::sync::{Mutex, mpsc};

    /// In a pool of 3 threads, started from inside it: the 2 other workers poll by the time
    /// `start` returns, parallel work still runs on more than one thread and gives the serial
    /// result, and after the drop no worker polls. Run on a thread of its own with a deadline, so
    /// a guard that never lets go fails the test instead of hanging it.
    #[test]
    fn other_workers_poll_until_dropped() {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(3)
                .build()
                .unwrap();
            let report = pool.install(|| {
                let hot = HotWorkers::start();
                let state = Arc::clone(&hot.state);
                let polling = hot.polling();
                let threads = Mutex::new(HashSet::new());
                let sum: u64 = (0..200_000u32)
                    .into_par_iter()
                    .with_max_len(1000)
                    .map(|i| {
                        threads
                            .lock()
                            .unwrap()
                            .insert(rayon::current_thread_index());
                        u64::from(i) * u64::from(i) % 7919
                    })
                    .sum();
                drop(hot);
                let after = state.polling.load(Ordering::SeqCst);
                (polling, sum, threads.into_inner().unwrap().len(), after)
            });
            let _ = tx.send(report);
        });
        let (polling, sum, threads, after) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the pool did not finish within 60 s with HotWorkers");
        let want: u64 = (0..200_000u64).map(|i| i * i % 7919).sum();
        assert_eq!(
            polling, 2,
            "the caller's two other workers should poll once start returns"
        );
        assert_eq!(sum, want);
        assert!(threads > 1, "the work ran on {threads} thread(s)");
        assert_eq!(after, 0, "a worker still polls after the drop");
    }
}
