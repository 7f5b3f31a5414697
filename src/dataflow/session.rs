//! A dataflow that lives as long as its command: one timely computation, fed round by round.
//!
//! [`super::run`] executes a dataflow over sources known up front and stops. A command that
//! evaluates checkpoints as they arrive (`candor stream`) starts a [`Session`] once instead:
//! its workers build the dataflow once and keep it; the driver feeds each checkpoint's rows as
//! the next round (a dataflow time), the input's frontier moving past it says the round is
//! complete, and the archive sink commits it as the checkpoint's archive epoch (the
//! [`Routing`] maps rounds to epochs, since checkpoints may complete in another order than
//! their epochs were given). Worker 0 holds the input; every worker runs the operators.
//!
//! In a cluster (`-n P`) the driver and the archive are in process 0, whose worker 0 holds
//! the input and the sink; the other processes start the same session, feed nothing, and
//! their workers take their share of every round until process 0 closes the input
//! ([`Session::stop`]). Nothing a stage reads may come from the driver's memory: reference
//! data is fed in the dataflow, first as the `preload` of [`Session::start`] (time 0, before
//! any round), then with the rounds.

use std::sync::mpsc::{self, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::record_batch::RecordBatch;
use timely::communication::WorkerGuards;
use timely::dataflow::operators::Inspect;
use timely::dataflow::operators::vec::Input;

use super::{Batch, Cluster, Epoch, EpochDone, Msg, SharedRouting, archive_sink};
use crate::archive::Archive;
use crate::error::{Error, Result};

/// One round: the batches of one archive epoch.
struct Round {
    time: u64,
    batches: Vec<RecordBatch>,
}

/// A long-lived dataflow ending in the archive sink.
pub struct Session {
    archive: Archive,
    feed: Option<mpsc::Sender<Round>>,
    done: mpsc::Receiver<EpochDone>,
    routing: SharedRouting,
    guards: Option<WorkerGuards<()>>,
    /// The next round's time.
    next: u64,
    /// Rounds fed and not yet reported done.
    outstanding: usize,
}

impl Session {
    /// Starts the computation on `cluster`'s workers with the dataflow `build` makes; the sink
    /// writes to `archive`. `preload` (reference data, never archived) is fed at time 0,
    /// before any round.
    pub fn start<F>(cluster: &Cluster, archive: &Archive, preload: Vec<RecordBatch>, build: F) -> Result<Session>
    where
        F: for<'s> Fn(
                timely::dataflow::StreamVec<'s, Epoch, Msg>,
                usize,
            ) -> timely::dataflow::StreamVec<'s, Epoch, Msg>
            + Send
            + Sync
            + 'static,
    {
        let config = cluster.timely_config()?;
        let routing: SharedRouting = Arc::default();
        if cluster.is_leader() {
            routing.lock().expect("new").partitions = archive.checkpoint_partitions()?;
        }
        let (feed, rounds) = mpsc::channel::<Round>();
        let (reports, done) = mpsc::channel::<EpochDone>();
        // Worker 0 takes the receiving end; the closure itself is shared by every worker.
        let rounds = Arc::new(Mutex::new(Some((rounds, preload))));
        let reports = Mutex::new(reports);
        let (archive_for_driver, archive, sink_routing) = (archive.clone(), archive.clone(), routing.clone());
        super::count_computation();
        let guards = super::execute(config, move |worker| {
            let index = worker.index();
            let peers = worker.peers();
            let reports = reports.lock().expect("not poisoned").clone();
            let mut input = worker.dataflow::<Epoch, _, _>(|scope| {
                let (input, stream) = scope.new_input::<Msg>();
                let out = build(stream, peers);
                archive_sink(out, archive.clone(), sink_routing.clone(), None).inspect(move |d| {
                    // The driver may be gone (it failed); the sink's work is done either way.
                    let _ = reports.send(d.clone());
                });
                input
            });
            let rounds = if index == 0 { rounds.lock().expect("not poisoned").take() } else { None };
            if let Some((rounds, preload)) = rounds {
                for b in preload {
                    input.send(Ok(Batch(b)));
                }
                input.advance_to(1);
                loop {
                    match rounds.try_recv() {
                        Ok(Round { time, batches }) => {
                            if time > *input.time() {
                                input.advance_to(time);
                            }
                            for b in batches {
                                input.send(Ok(Batch(b)));
                            }
                            input.advance_to(time + 1);
                        }
                        Err(TryRecvError::Empty) => {
                            worker.step_or_park(Some(Duration::from_millis(1)));
                        }
                        Err(TryRecvError::Disconnected) => break,
                    }
                }
            }
            drop(input);
            while worker.step_or_park(Some(Duration::from_millis(50))) {}
        })
        .map_err(|e| Error::system("starting timely", e))?;
        Ok(Session {
            archive: archive_for_driver,
            feed: Some(feed),
            done,
            routing,
            guards: Some(guards),
            next: 1,
            outstanding: 0,
        })
    }

    /// The time the next round will have (what the stages that look a round up by its time,
    /// such as the generate operator's plans, are given before it is fed).
    pub fn next_time(&self) -> u64 {
        self.next
    }

    /// Feeds `batches` as the next round, committed as archive epoch `epoch` (in its
    /// checkpoint's partition; the registry is read again for a checkpoint registered since).
    pub fn feed(&mut self, epoch: Epoch, batches: Vec<RecordBatch>) -> Result<()> {
        if batches.is_empty() {
            return Ok(());
        }
        let time = self.next;
        {
            let mut routing =
                self.routing.lock().map_err(|_| Error::Internal("the archive routing was poisoned".into()))?;
            if epoch != super::GRID_EPOCH && !routing.partitions.contains_key(&epoch) {
                routing.partitions = self.archive.checkpoint_partitions()?;
            }
            routing.epochs.insert(time, epoch);
        }
        let stopped = || Error::Internal("the dataflow stopped".into());
        self.feed.as_ref().ok_or_else(stopped)?.send(Round { time, batches }).map_err(|_| stopped())?;
        self.next += 1;
        self.outstanding += 1;
        Ok(())
    }

    /// Waits until every round fed is committed (or failed) and returns their reports, in
    /// epoch order; the errors of a failed round fail the call, each reported once.
    pub fn wait(&mut self) -> Result<Vec<EpochDone>> {
        let mut reports = Vec::with_capacity(self.outstanding);
        while self.outstanding > 0 {
            match self.done.recv_timeout(Duration::from_secs(1)) {
                Ok(d) => reports.push(self.settled(d)),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(self.stopped()),
            }
        }
        super::checked(reports)
    }

    /// The reports of the rounds committed (or failed) since the last call, without waiting
    /// for the others (a driver that goes on reading while rounds are in flight); as
    /// [`Self::wait`], a failed round fails the call.
    pub fn try_done(&mut self) -> Result<Vec<EpochDone>> {
        let mut reports = Vec::new();
        while self.outstanding > 0 {
            match self.done.try_recv() {
                Ok(d) => reports.push(self.settled(d)),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return Err(self.stopped()),
            }
        }
        super::checked(reports)
    }

    fn settled(&mut self, d: EpochDone) -> EpochDone {
        self.routing.lock().map(|mut r| r.epochs.retain(|_, e| *e != d.epoch)).ok();
        self.outstanding -= 1;
        d
    }

    /// The error of a computation that ended with rounds outstanding.
    fn stopped(&mut self) -> Error {
        self.stop()
            .err()
            .unwrap_or_else(|| Error::Internal("the dataflow stopped before committing what it was fed".into()))
    }

    /// Closes the input and waits for the workers to finish.
    pub fn stop(&mut self) -> Result<()> {
        self.feed.take();
        if let Some(guards) = self.guards.take() {
            for result in guards.join() {
                result.map_err(|e| Error::Internal(format!("a worker panicked: {e}")))?;
            }
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}
