//! A small work-sharing pool for the CPU kernels of the candle backend (Q4_1 matmuls,
//! attention), where the calling thread never waits for a helper that has not started.
//!
//! candle's own barrier pool hands every worker its share and waits for all of them: on a
//! machine whose cores are busy with other work, each of the ~120 parallel steps of a decoded
//! token then waits for a descheduled thread (measured on 2 shared cores: 2 threads decoded
//! 8x slower than 1). Here the caller takes chunks from a shared cursor itself; helpers join
//! if they are awake and take chunks too, and the caller waits only for chunks a helper has
//! actually claimed. On an idle machine helpers spin briefly between steps, so they join at
//! once; on a busy one the work still gets done at the speed of one thread.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant};

thread_local! {
    /// Set on helper threads and on a caller while it works: nested calls run inline.
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

struct Job {
    /// `&(dyn Fn(Range<usize>) + Sync)` with its lifetime erased; valid while `open`.
    f: *const (dyn Fn(Range<usize>) + Sync),
    n: usize,
    chunk: usize,
}

#[derive(Default)]
struct State {
    generation: usize,
    open: bool,
    /// Helpers inside the current job.
    active: usize,
    job: Option<JobPtr>,
}

#[derive(Clone, Copy)]
struct JobPtr(*const Job);
// SAFETY: the job is only read while the caller keeps it alive (see `run`).
unsafe impl Send for JobPtr {}

struct Pool {
    state: Mutex<State>,
    wake: Condvar,
    done: Condvar,
    /// Generation of the latest job, read without the lock by spinning helpers.
    latest: AtomicUsize,
    cursor: AtomicUsize,
    helpers: usize,
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let helpers = candle_core::utils::get_num_threads().saturating_sub(1);
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            done: Condvar::new(),
            latest: AtomicUsize::new(0),
            cursor: AtomicUsize::new(0),
            helpers,
        }));
        for _ in 0..helpers {
            std::thread::Builder::new()
                .name("candor-kernel".into())
                .spawn(move || pool.helper())
                .expect("spawn a kernel thread");
        }
        pool
    })
}

impl Pool {
    fn take(&self, job: &Job) {
        // SAFETY: callers hold the job open (the caller itself, or a helper counted in `active`).
        let f = unsafe { &*job.f };
        loop {
            let start = self.cursor.fetch_add(job.chunk, Ordering::Relaxed);
            if start >= job.n {
                break;
            }
            f(start..job.n.min(start + job.chunk));
        }
    }

    fn helper(&self) {
        INSIDE.with(|c| c.set(true));
        let mut seen = 0;
        loop {
            // Spin a little for the next step before sleeping.
            let spin_until = Instant::now() + Duration::from_micros(200);
            let mut spins = 0u32;
            while self.latest.load(Ordering::Acquire) == seen {
                std::hint::spin_loop();
                spins += 1;
                if spins.is_multiple_of(256) && Instant::now() >= spin_until {
                    break;
                }
            }
            let mut st = self.state.lock().expect("kernel pool lock");
            while st.generation == seen || !st.open {
                if st.generation != seen {
                    seen = st.generation; // a job that closed before this helper came
                }
                st = self.wake.wait(st).expect("kernel pool lock");
            }
            seen = st.generation;
            let job = st.job.expect("an open job");
            st.active += 1;
            drop(st);
            // SAFETY: the job stays alive until `active` is back to 0 (see `run`).
            self.take(unsafe { &*job.0 });
            let mut st = self.state.lock().expect("kernel pool lock");
            st.active -= 1;
            if st.active == 0 {
                self.done.notify_all();
            }
        }
    }
}

/// Calls `f` on consecutive ranges covering `0..n`, on this thread and on whichever helper
/// threads are free (candle's thread count, `RAYON_NUM_THREADS`, minus one). Returns when all
/// of `0..n` is done. Nested calls run inline.
pub fn run<F: Fn(Range<usize>) + Sync>(n: usize, f: F) {
    let p = pool();
    if n == 0 {
        return;
    }
    if p.helpers == 0 || n == 1 || INSIDE.with(|c| c.get()) {
        f(0..n);
        return;
    }
    // One job at a time (callers on other threads queue here).
    static CALLER: Mutex<()> = Mutex::new(());
    let _turn = CALLER.lock().unwrap_or_else(|e| e.into_inner());
    let threads = p.helpers + 1;
    let chunk = n.div_ceil(threads * 4).max(1);
    let dynf: &(dyn Fn(Range<usize>) + Sync) = &f;
    // SAFETY: only the lifetime is erased; the pointer is used while this call is in progress.
    let dynf: &'static (dyn Fn(Range<usize>) + Sync) = unsafe { std::mem::transmute(dynf) };
    let job = Job { f: dynf, n, chunk };
    {
        let mut st = p.state.lock().expect("kernel pool lock");
        p.cursor.store(0, Ordering::Relaxed);
        st.generation += 1;
        st.open = true;
        st.job = Some(JobPtr(&job));
        p.latest.store(st.generation, Ordering::Release);
        p.wake.notify_all();
    }
    INSIDE.with(|c| c.set(true));
    p.take(&job);
    INSIDE.with(|c| c.set(false));
    // Close the job: helpers that have not joined yet never will; wait for those inside.
    let mut st = p.state.lock().expect("kernel pool lock");
    st.open = false;
    st.job = None;
    while st.active > 0 {
        st = p.done.wait(st).expect("kernel pool lock");
    }
}
