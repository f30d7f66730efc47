//! Following a run: its events after a seq replayed from the store, then new ones as they come, until the final
//! status event — whichever node runs it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use berth_core::ids::RunId;
use berth_core::run::{EventKind, RunEvent, RunStatus};
use berth_store::Store;
use serde_json::Value;
use tokio::sync::broadcast;

use super::manager::RunManager;
use crate::error_chain::DisplayChain;

/// Events read from the store at once while replaying or catching up.
const STORE_PAGE: u32 = 500;
/// How long a live follower waits for the next event before it looks at the store anyway, in case events came from
/// elsewhere (another replica, a sweep).
const LIVE_IDLE_READ: Duration = Duration::from_secs(1);

/// What following a run yields next.
#[derive(Debug)]
pub enum Followed {
    /// The next event, in seq order.
    Event(Arc<RunEvent>),
    /// Nothing for the idle period given to [`RunFollower::idle_after`] since the last item; the run goes on.
    Idle,
}

/// Replays a run's events after a seq, then follows new ones until the final status event.
///
/// While this node runs the command, new events come from its writer's channel, as stored
/// ([`EventWriter::subscribe`](super::events::EventWriter::subscribe)), so output is not read back from the store
/// right after it was written. An event is taken from the channel only when it is the very next seq: when the channel
/// has lagged, skips a seq (written by another writer, or inserts finishing out of order) or stays quiet, the store is
/// read from the last seq sent. Either way every event goes out once, in seq order.
#[derive(Debug)]
pub struct RunFollower {
    store: Store,
    run_id: RunId,
    after: i64,
    buffer: VecDeque<Arc<RunEvent>>,
    /// The local writer's events; `None` when another node runs it (then we poll the database) or it has finished.
    live: Option<broadcast::Receiver<Arc<RunEvent>>>,
    /// The last store read found everything there was: the channel may be relied on for what comes next.
    caught_up: bool,
    finished: bool,
    /// After this long without an item, [`Followed::Idle`]; `None`: never.
    idle_after: Option<Duration>,
    /// When the last item went out.
    last_item: Instant,
}

// === impl RunManager ===

impl RunManager {
    /// Follows a run's events after seq `after` (0: from the start). The run's existence and the caller's access to it
    /// are the caller's checks.
    pub fn follow(&self, run_id: RunId, after: i64) -> RunFollower {
        RunFollower {
            store: self.context().store.clone(),
            run_id,
            after,
            buffer: VecDeque::new(),
            live: self.subscribe(run_id),
            caught_up: false,
            finished: false,
            idle_after: None,
            last_item: Instant::now(),
        }
    }
}

// === impl RunFollower ===

impl RunFollower {
    /// Yields [`Followed::Idle`] after `idle` without an event (checked between waits of a second or so), so a
    /// stream can tell its reader it is still there.
    pub fn idle_after(mut self, idle: Duration) -> Self {
        self.idle_after = Some(idle);
        self
    }

    /// The next event, or `None` once the final status event went out (or the run's events cannot be read).
    pub async fn next(&mut self) -> Option<Followed> {
        let mut idle_checks = 0;
        loop {
            if let Some(event) = self.buffer.pop_front() {
                self.after = event.seq;
                self.finished = is_final(&event);
                self.last_item = Instant::now();
                return Some(Followed::Event(event));
            }
            if self.finished {
                return None;
            }
            // Proxies and clients drop connections that stay silent; the waits below are at most a second or so.
            if self
                .idle_after
                .is_some_and(|idle| self.last_item.elapsed() >= idle)
            {
                self.last_item = Instant::now();
                return Some(Followed::Idle);
            }
            if self.caught_up
                && let Some(live) = self.live.as_mut()
            {
                match tokio::time::timeout(LIVE_IDLE_READ, live.recv()).await {
                    // Already sent (read from the store meanwhile).
                    Ok(Ok(event)) if event.seq <= self.after => continue,
                    Ok(Ok(event)) if event.seq == self.after + 1 => {
                        self.buffer.push_back(event);
                        continue;
                    }
                    // A gap, or events dropped for falling behind: the store has them all.
                    Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                        tracing::debug!(run.id = %self.run_id, after = self.after, "live follower reads the store to catch up");
                    }
                    // The run's writers are gone: from here on, read until the final event.
                    Ok(Err(broadcast::error::RecvError::Closed)) => self.live = None,
                    Err(_elapsed) => {}
                }
            }
            let batch = match self
                .store
                .list_events(self.run_id, self.after, STORE_PAGE)
                .await
            {
                Ok(batch) => batch,
                Err(error) => {
                    tracing::warn!(run.id = %self.run_id, error = %DisplayChain(&error), "event stream ended");
                    return None;
                }
            };
            self.caught_up = batch.len() < STORE_PAGE as usize;
            if !batch.is_empty() {
                self.buffer.extend(batch.into_iter().map(Arc::new));
                continue;
            }
            // Nothing new. A run whose row is final has written its final event already (it goes out first), so
            // read once more right away — it may have landed between the two queries — and stop if it still is
            // not there (an orphan sweep writes the row first; give it a moment).
            if let Ok(Some(run)) = self.store.get_run(self.run_id).await
                && run.status.is_terminal()
            {
                idle_checks += 1;
                if idle_checks > 3 {
                    return None;
                }
                if idle_checks > 1 {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                continue;
            }
            // With a live channel, the next turn waits on it; without, poll.
            if self.live.is_none() {
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    }
}

/// Whether `event` is the run's final status: nothing follows it.
fn is_final(event: &RunEvent) -> bool {
    event.kind == EventKind::Status
        && event
            .data
            .get("status")
            .and_then(Value::as_str)
            .and_then(|status| status.parse::<RunStatus>().ok())
            .is_some_and(RunStatus::is_terminal)
}
