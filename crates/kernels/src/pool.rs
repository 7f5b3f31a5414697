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
//!
//! # Protocol
//!
//! A job lives on the stack of [`run`] and is handed to the helpers as a pointer with its
//! lifetime erased, so everything rests on this protocol (`state` is the pool's mutex):
//!
//! 1. One job at a time: a caller holds `CALLER` from publishing its job until it has closed
//!    it. It resets the cursor and publishes the job (`state.job = Some`, a new generation).
//! 2. A helper joins a job only while it is published, and counts itself in `state.active`
//!    in the same critical section in which it reads the pointer. It then takes chunks
//!    without the lock. When no chunk is left it takes the lock again, leaves `active`, and
//!    never touches that job again.
//! 3. The caller takes chunks too, then closes the job: it unpublishes it (so no helper joins
//!    any more) and waits, under the lock, until `active` is 0. Only then does `run` return or
//!    unwind, so no helper can be inside the closure once its stack frame is gone. Closing is
//!    done by a guard ([`Open`]), whose `Drop` closes too if anything unwinds unexpectedly.
//! 4. A panic of the closure, on any thread, is caught where the chunks are taken
//!    ([`Pool::take`]): the cursor is moved past the end so no thread starts another chunk,
//!    and the payload is kept (a helper stores the first one in `state.panic` before it
//!    leaves `active`). A helper thus never dies of a job's panic, so the caller's wait ends
//!    and the pool keeps its threads. Once the job is closed, `run` resumes the caller's own
//!    panic if it had one, otherwise a helper's: the panic reaches the caller of `run` with its
//!    original payload, as if the closure had panicked on the caller's thread.
//!
//! The mutex is never held while the closure runs, and poisoning is ignored (no code panics
//! while holding it, and the state is consistent after every critical section).

use std::any::Any;
use std::ops::Range;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

thread_local! {
    /// Set on helper threads and on a caller while it works: nested calls run inline.
    static INSIDE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A panic's payload, as [`panic::catch_unwind`] returns it.
type Payload = Box<dyn Any + Send + 'static>;

/// One call of [`run`]: the caller's closure and how its items are cut into chunks.
struct Job<'f> {
    f: &'f (dyn Fn(Range<usize>) + Sync + 'f),
    n: usize,
    chunk: usize,
}

/// A published job, its lifetime erased: dereferenced only by a helper counted in
/// `State::active`, which the job's caller waits out before the job goes away.
#[derive(Clone, Copy)]
struct JobPtr(*const Job<'static>);

// SAFETY: a `JobPtr` is sent to helper threads, which only read the `Job` through it: `Job` is
// `Sync` (a shared reference to a `Sync` closure, two integers), and the protocol (module
// docs) keeps the `Job` alive while any helper can dereference the pointer.
unsafe impl Send for JobPtr {}

#[derive(Default)]
struct State {
    generation: usize,
    /// The published job: helpers join it only while it is here.
    job: Option<JobPtr>,
    /// Helpers inside the current job.
    active: usize,
    /// The first panic of a helper in the current job, for its caller to resume.
    panic: Option<Payload>,
}

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
        // The tests exercise the helpers whatever the machine.
        #[cfg(test)]
        let helpers = helpers.max(3);
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
                .name(HELPER_NAME.into())
                .spawn(move || pool.helper())
                .expect("spawn a kernel thread");
        }
        pool
    })
}

/// The name of the pool's helper threads.
pub(crate) const HELPER_NAME: &str = "candor-kernel";

/// The threads a job can run on: the helpers and the caller.
#[cfg(test)]
pub(crate) fn threads() -> usize {
    pool().helpers + 1
}

/// Drops a payload that will not be resumed; should its `Drop` panic, that panic's payload is
/// leaked rather than dropped (a pool thread must not unwind out of the protocol).
fn discard(payload: Payload) {
    if let Err(again) = panic::catch_unwind(AssertUnwindSafe(move || drop(payload))) {
        std::mem::forget(again);
    }
}

impl Pool {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs chunks of `job` until none is left. If the closure panics, the job stops (the
    /// cursor moves past its end, so no thread starts another chunk) and the payload is
    /// returned.
    fn take(&self, job: &Job<'_>) -> Result<(), Payload> {
        panic::catch_unwind(AssertUnwindSafe(|| {
            loop {
                let start = self.cursor.fetch_add(job.chunk, Ordering::Relaxed);
                if start >= job.n {
                    break;
                }
                (job.f)(start..job.n.min(start + job.chunk));
            }
        }))
        .inspect_err(|_| self.cursor.store(job.n, Ordering::Relaxed))
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
            let mut st = self.lock();
            let job = loop {
                match st.job {
                    Some(job) if st.generation != seen => break job,
                    // No job, or one this helper has done: a job that closed before this
                    // helper came is skipped.
                    _ => {
                        seen = st.generation;
                        st = self.wake.wait(st).unwrap_or_else(PoisonError::into_inner);
                    }
                }
            };
            seen = st.generation;
            st.active += 1;
            drop(st);
            // SAFETY: the job was published when this helper counted itself in `active` (in
            // the critical section above), and its caller keeps it alive until `active` is
            // back to 0, which it cannot be before this helper leaves below (protocol, steps
            // 2 and 3). `take` never unwinds: it catches the closure's panics.
            let result = self.take(unsafe { &*job.0 });
            let mut st = self.lock();
            let extra = match result {
                Err(payload) if st.panic.is_none() => {
                    st.panic = Some(payload);
                    None
                }
                Err(payload) => Some(payload),
                Ok(()) => None,
            };
            st.active -= 1;
            if st.active == 0 {
                self.done.notify_all();
            }
            drop(st);
            if let Some(payload) = extra {
                discard(payload);
            }
        }
    }
}

/// A published job; closing it (explicitly, or on drop) waits until no helper is inside it.
/// It borrows the job, so the job outlives it.
struct Open<'j> {
    pool: &'static Pool,
    closed: bool,
    _job: &'j Job<'j>,
}

impl<'j> Open<'j> {
    /// Publishes `job` to the helpers (protocol, step 1; the caller holds `CALLER`).
    fn publish(pool: &'static Pool, job: &'j Job<'j>) -> Self {
        let mut st = pool.lock();
        pool.cursor.store(0, Ordering::Relaxed);
        st.generation += 1;
        // Only the lifetime changes (protocol, step 2, says how long the pointer is used).
        st.job = Some(JobPtr(std::ptr::from_ref(job).cast::<Job<'static>>()));
        pool.latest.store(st.generation, Ordering::Release);
        pool.wake.notify_all();
        Open { pool, closed: false, _job: job }
    }

    /// Unpublishes the job and waits for the helpers inside it (protocol, step 3); returns
    /// the first panic of a helper.
    fn close(&mut self) -> Option<Payload> {
        let mut st = self.pool.lock();
        st.job = None;
        while st.active > 0 {
            st = self.pool.done.wait(st).unwrap_or_else(PoisonError::into_inner);
        }
        self.closed = true;
        st.panic.take()
    }
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        if !self.closed
            && let Some(payload) = self.close()
        {
            discard(payload);
        }
    }
}

/// Calls `f` on consecutive ranges covering `0..n`, on this thread and on whichever helper
/// threads are free (candle's thread count, `RAYON_NUM_THREADS`, minus one). Returns when all
/// of `0..n` is done. Nested calls run inline.
///
/// If `f` panics, on this thread or a helper, the ranges not yet started are skipped, `run`
/// waits until no helper is inside `f`, and then resumes the panic with its original payload
/// (this thread's own if `f` panicked here, otherwise the first helper's). The pool stays
/// usable.
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
    let turn = CALLER.lock().unwrap_or_else(PoisonError::into_inner);
    let threads = p.helpers + 1;
    let chunk = n.div_ceil(threads * 4).max(1);
    let job = Job { f: &f, n, chunk };
    let mut open = Open::publish(p, &job);
    INSIDE.with(|c| c.set(true));
    let mine = p.take(&job);
    INSIDE.with(|c| c.set(false));
    let helpers = open.close();
    drop(turn);
    match (mine, helpers) {
        (Err(payload), other) => {
            if let Some(other) = other {
                discard(other);
            }
            panic::resume_unwind(payload)
        }
        (Ok(()), Some(payload)) => panic::resume_unwind(payload),
        (Ok(()), None) => {}
    }
}
