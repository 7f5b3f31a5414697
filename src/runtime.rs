//! The process's one tokio runtime.
//!
//! Candor is synchronous at heart (timely workers, the stream's reader and outbox threads,
//! the model threads) and uses async libraries in a few places: DataFusion (`candor sql`, the
//! report, `candor analyze`), pgwire (the SQL endpoint), reqwest (the HTTP model backend and
//! judge, the report's browser), rdkafka's admin client, deltalake (archive commits) and axum
//! (`candor serve`). All of them run on this one multi-threaded runtime, built on first use
//! with [`WORKERS`] worker threads named `candor-rt` (plus tokio's blocking pool, which grows
//! on demand), and never shut down before the process exits. Nothing else in the crate builds
//! a runtime (a test checks the sources).
//!
//! Synchronous code waits for a future with [`block_on`], which works from any thread: a plain
//! thread; a thread of tokio's blocking pool; a worker of a multi-threaded runtime, this one or
//! another (the wait leaves the worker with [`tokio::task::block_in_place`], which hands the
//! worker's other tasks to a new thread); or a thread running a current-thread runtime of
//! someone else's (there blocking is not allowed, so the wait happens on a scoped thread).
//! Async code spawns its tasks with [`spawn`].

use std::future::Future;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};

use tokio::runtime::{Handle, Runtime, RuntimeFlavor};

/// Worker threads of the runtime. Few: the async work is I/O (sockets, the Delta log) and
/// DataFusion's queries (planned with two partitions each); what is CPU-bound in Candor runs on
/// threads of its own.
pub const WORKERS: usize = 4;

static RUNTIME: OnceLock<Runtime> = OnceLock::new();
/// Runtimes this module built: 1 once any is used.
static BUILT: AtomicUsize = AtomicUsize::new(0);

/// The process's runtime, built on first use.
pub fn runtime() -> &'static Runtime {
    RUNTIME.get_or_init(|| {
        BUILT.fetch_add(1, Ordering::SeqCst);
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(WORKERS)
            .thread_name("candor-rt")
            .enable_all()
            .build()
            .expect("the process's tokio runtime starts")
    })
}

/// A handle on the process's runtime.
pub fn handle() -> &'static Handle {
    runtime().handle()
}

/// Spawns a task on the process's runtime (from any thread).
pub fn spawn<F>(future: F) -> tokio::task::JoinHandle<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    runtime().spawn(future)
}

/// Runs a future to completion on the process's runtime from synchronous code, on any thread
/// (see the module's documentation): never panics for being called inside a runtime. A future
/// that needs a runtime when it is made rather than when it is polled (`tokio::time::sleep`,
/// say) is made inside an `async` block.
pub fn block_on<F>(future: F) -> F::Output
where
    F: Future + Send,
    F::Output: Send,
{
    let rt = runtime();
    match Handle::try_current().map(|h| h.runtime_flavor()) {
        // Inside a current-thread runtime's `block_on` nothing may block its thread.
        Ok(RuntimeFlavor::CurrentThread) => std::thread::scope(|s| {
            s.spawn(|| rt.block_on(future)).join().unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        }),
        // On a multi-threaded runtime's worker (or inside its `block_on`): leave the runtime
        // for the wait. Elsewhere `block_in_place` only calls the closure.
        _ => tokio::task::block_in_place(|| rt.block_on(future)),
    }
}

/// How many runtimes this module has built (1 once [`runtime`] was called).
pub fn built() -> usize {
    BUILT.load(Ordering::SeqCst)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The id of the runtime a future runs on.
    async fn id() -> tokio::runtime::Id {
        Handle::current().id()
    }

    #[test]
    fn every_sync_caller_waits_on_the_one_runtime_wherever_it_runs() {
        let ours = handle().id();
        // A plain thread.
        assert_eq!(block_on(id()), ours);
        // Inside `block_on` (sync code called from a future the main thread drives).
        assert_eq!(block_on(async { block_on(id()) }), ours);
        // On a worker: an async task calling sync code that waits.
        assert_eq!(block_on(spawn(async { block_on(id()) })).unwrap(), ours);
        // On the blocking pool.
        assert_eq!(block_on(handle().spawn_blocking(|| block_on(id()))).unwrap(), ours);
        // Inside someone else's runtimes (a caller embedding Candor), of either flavor.
        let current = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert_eq!(current.block_on(async { block_on(id()) }), ours);
        let multi = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        assert_eq!(multi.block_on(async { block_on(id()) }), ours);
        assert_eq!(multi.block_on(multi.spawn(async { block_on(id()) })).unwrap(), ours);
        // Timers and I/O are enabled.
        block_on(async { tokio::time::sleep(std::time::Duration::from_millis(1)).await });
        assert_eq!(built(), 1);
    }

    #[test]
    fn a_panic_in_a_waited_future_reaches_the_caller() {
        let current = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            current.block_on(async { block_on(async { panic!("inside") }) })
        }));
        assert!(caught.is_err());
        assert!(std::panic::catch_unwind(|| block_on(async { panic!("inside") })).is_err());
        assert_eq!(block_on(id()), handle().id(), "the runtime outlives a panicking future");
    }

    /// No module but this one builds a tokio runtime: every async library shares this one.
    #[test]
    fn no_other_runtime_is_built_in_the_crate() {
        let src = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        // Split so that this file does not match itself.
        let builders = [
            ["runtime::", "Builder"].concat(),
            ["Runtime::", "new("].concat(),
            ["tokio::", "main"].concat(),
            ["tokio::", "test"].concat(),
        ];
        let mut found = Vec::new();
        let mut dirs = vec![src.clone()];
        while let Some(dir) = dirs.pop() {
            for entry in std::fs::read_dir(&dir).unwrap() {
                let path = entry.unwrap().path();
                if path.is_dir() {
                    dirs.push(path);
                } else if path.extension().is_some_and(|e| e == "rs") && path != src.join("runtime.rs") {
                    let text = std::fs::read_to_string(&path).unwrap();
                    for (n, line) in text.lines().enumerate() {
                        if builders.iter().any(|b| line.contains(b.as_str())) {
                            found.push(format!("{}:{}: {}", path.display(), n + 1, line.trim()));
                        }
                    }
                }
            }
        }
        assert!(found.is_empty(), "use candor::runtime instead of building a runtime:\n{}", found.join("\n"));
    }
}
