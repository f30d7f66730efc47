//! Writing a run's events: dense sequence numbers from the store, the stored events handed to live followers, and the
//! UTF-8 care that output needs (a multi-byte character split across two reads must not turn into replacement
//! characters).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use berth_core::driver::{BoxFuture, OutputSink, OutputStream, ProcessIdentity};
use berth_core::ids::{LeaseId, RunId};
use berth_core::run::{EventKind, NewRunEvent, RunEvent};
use berth_core::time::Timestamp;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use crate::error_chain::DisplayChain;
use crate::runs::event_data::{EventData, output_text};
use berth_store::{StagedEvents, Store, StoreError};

/// Events a live follower may fall behind by before it has to read from the store instead. Output events are at
/// most the driver's 256 KiB chunk, so a follower that lags holds back at most ~16 MiB of a run's output here.
pub const LIVE_EVENTS: usize = 64;

/// Appends events for one run and hands them, as stored, to followers (SSE streams) on this node.
#[derive(Debug, Clone)]
pub struct EventWriter {
    store: Store,
    run_id: RunId,
    /// Every event this writer stored, in the order its inserts finished (which concurrent inserts may make differ
    /// from seq order: followers check). Followers on this node take output from here, without reading back from the
    /// store what was just written; one that falls behind, or sees a gap, reads the store.
    live: broadcast::Sender<Arc<RunEvent>>,
}

impl EventWriter {
    pub fn new(store: Store, run_id: RunId) -> Self {
        Self {
            store,
            run_id,
            live: broadcast::channel(LIVE_EVENTS).0,
        }
    }

    /// The events stored from now on; closed (after the last one) when every writer is gone.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<RunEvent>> {
        self.live.subscribe()
    }

    /// Appends one event. A failure is logged, not returned: losing the database mid-run must not also lose the
    /// command (its final status is written again by the orphan sweep if need be).
    pub async fn emit(&self, kind: EventKind, data: Value) {
        self.emit_all(vec![NewRunEvent {
            at: Timestamp::now(),
            kind,
            data,
        }])
        .await;
    }

    pub async fn emit_all(&self, events: Vec<NewRunEvent>) {
        if let Some(staged) = self.stage(events).await {
            self.insert(staged).await;
        }
    }

    /// The first half of [`EventWriter::emit_all`]: output bytes go to the store ([`Store::stage_events`]).
    async fn stage(&self, events: Vec<NewRunEvent>) -> Option<StagedEvents> {
        self.store
            .stage_events(self.run_id, events)
            .await
            .map_err(|error| self.log_failure(&error))
            .ok()
    }

    /// The second half of [`EventWriter::emit_all`]: the rows, then the followers' wake-up.
    async fn insert(&self, staged: StagedEvents) {
        match self.store.insert_staged(staged).await {
            // Nobody following: nothing to hand over, not even an allocation per event.
            Ok(stored) if self.live.receiver_count() > 0 => {
                for event in stored {
                    // An error only means the last follower just left.
                    let _ = self.live.send(Arc::new(event));
                }
            }
            Ok(_) => {}
            Err(error) => self.log_failure(&error),
        }
    }

    fn log_failure(&self, error: &StoreError) {
        tracing::error!(run.id = %self.run_id, error = %DisplayChain(error), "could not record run events");
    }

    /// Appends what happened, in its documented shape ([`EventData`]).
    pub async fn record(&self, data: EventData<'_>) {
        self.emit(data.kind(), data.into_value()).await;
    }

    pub async fn error(&self, code: &str, message: &str) {
        self.record(EventData::Error { code, message }).await;
    }
}

/// Chunks of output waiting for the batching writer: up to 16 MiB at the driver's 256 KiB per chunk. When it is
/// full, the driver's `output` call waits, and so does the command: backpressure instead of unbounded memory.
const OUTPUT_QUEUE_CHUNKS: usize = 64;
/// Most chunks the writer takes into one batch (one segment-file write).
const OUTPUT_BATCH_CHUNKS: usize = 64;

/// The sink a driver streams output into: each chunk becomes a `stdout`/`stderr` event `{"text": ...}`.
///
/// Chunks go through a bounded queue to one writer task, which stores whatever has accumulated as one batch (see
/// [`write_output`]): storing each chunk on its own would cap output at the database's round-trip rate. Order of
/// arrival is kept across both streams.
#[derive(Debug)]
pub struct OutputEvents {
    queue: mpsc::Sender<(OutputStream, Vec<u8>)>,
    /// Cancelled by `finish`, so the writer stops lingering for more output.
    finished: CancellationToken,
    writer: tokio::task::JoinHandle<()>,
    store: Store,
    run_id: RunId,
    /// The lease whose row records the command's process group (see [`OutputEvents::recording_process_on`]).
    process_lease: Option<LeaseId>,
    /// Whether a process group was recorded, so `finish` knows to clear it.
    process_recorded: AtomicBool,
}

impl OutputEvents {
    pub fn start(writer: EventWriter) -> Self {
        let (queue, chunks) = mpsc::channel(OUTPUT_QUEUE_CHUNKS);
        let finished = CancellationToken::new();
        let store = writer.store.clone();
        let run_id = writer.run_id;
        let writer = tokio::spawn(write_output(writer, chunks, finished.clone()));
        Self {
            queue,
            finished,
            writer,
            store,
            run_id,
            process_lease: None,
            process_recorded: AtomicBool::new(false),
        }
    }

    /// Records the command's process group on `lease` as soon as the driver reports it ([`OutputSink::started`]),
    /// and clears it at [`finish`](Self::finish): in between, a crash of berth leaves on the lease exactly what its
    /// cleanup must kill.
    #[must_use]
    pub fn recording_process_on(self, lease: LeaseId) -> Self {
        Self {
            process_lease: Some(lease),
            ..self
        }
    }

    /// Waits until every chunk is stored (and emits whatever partial characters are left, lossily): the command
    /// has ended, so the process group recorded for it is forgotten — nothing of it runs any more.
    pub async fn finish(self) {
        drop(self.queue);
        self.finished.cancel();
        if let Err(error) = self.writer.await {
            tracing::error!(%error, "the output writer failed");
        }
        if let Some(lease_id) = self.process_lease
            && self.process_recorded.load(Ordering::Acquire)
            && let Err(error) = self.store.set_lease_process(lease_id, None).await
        {
            // Harmless: cleanup checks the recorded identity before it kills anything.
            tracing::warn!(run.id = %self.run_id, lease.id = %lease_id, error = %DisplayChain(&error), "could not forget the command's process group");
        }
    }
}

impl OutputSink for OutputEvents {
    fn output<'a>(&'a self, stream: OutputStream, data: &'a [u8]) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // The writer only stops once `finish` drops the queue, so a send error cannot lose output here.
            let _ = self.queue.send((stream, data.to_vec())).await;
        })
    }

    fn started<'a>(&'a self, process: &'a ProcessIdentity) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(lease_id) = self.process_lease else {
                return;
            };
            match self.store.set_lease_process(lease_id, Some(process)).await {
                Ok(()) => {
                    self.process_recorded.store(true, Ordering::Release);
                    tracing::debug!(run.id = %self.run_id, lease.id = %lease_id, pgid = process.pgid, "recorded the command's process group");
                }
                Err(error) => {
                    tracing::warn!(run.id = %self.run_id, lease.id = %lease_id, error = %DisplayChain(&error), "could not record the command's process group; a crash of berth now may leave it running")
                }
            }
        })
    }
}

/// How long the writer waits for more output after a small batch, and what counts as small.
const LINGER: Duration = Duration::from_millis(1);
const LINGER_BELOW_BYTES: usize = 1024 * 1024;

/// Staged batches waiting for their rows to be inserted. Small: it only has to hold what arrives during one insert.
const STAGED_QUEUE_BATCHES: usize = 16;

/// Turns chunks into events and stores them in two overlapping stages: while one batch's rows are inserted, the next
/// batch's bytes are already being written to the run's segment file ([`Store::stage_events`]), and every batch
/// staged meanwhile goes in with the next insert. One insert per chunk would cap output at the database's round-trip
/// rate.
async fn write_output(
    writer: EventWriter,
    mut chunks: mpsc::Receiver<(OutputStream, Vec<u8>)>,
    finished: CancellationToken,
) {
    let (staged_tx, staged_rx) = mpsc::channel(STAGED_QUEUE_BATCHES);
    let inserter = tokio::spawn(insert_output(writer.clone(), staged_rx));
    // Bytes of an incomplete UTF-8 character at the end of the last chunk, per stream.
    let mut carry: HashMap<OutputStream, Vec<u8>> = HashMap::new();
    let mut batch = Vec::with_capacity(OUTPUT_BATCH_CHUNKS);
    while chunks.recv_many(&mut batch, OUTPUT_BATCH_CHUNKS).await > 0 {
        let pending: usize = batch.iter().map(|(_, data)| data.len()).sum();
        if pending < LINGER_BELOW_BYTES
            && batch.len() < OUTPUT_BATCH_CHUNKS
            && !finished.is_cancelled()
        {
            // A little output: wait a moment for more, so a fast command costs one wake-up, file write and insert
            // per millisecond instead of per pipe read. Followers see output at most this much later.
            tokio::select! {
                () = tokio::time::sleep(LINGER) => {}
                () = finished.cancelled() => {}
            }
            while batch.len() < OUTPUT_BATCH_CHUNKS {
                match chunks.try_recv() {
                    Ok(chunk) => batch.push(chunk),
                    Err(_) => break,
                }
            }
        }
        let now = Timestamp::now();
        let events: Vec<NewRunEvent> = coalesce(batch.drain(..))
            .into_iter()
            .filter_map(|(stream, data)| {
                let text = take_complete_utf8_owned(carry.entry(stream).or_default(), data);
                crate::metrics::output_stored(kind_of(stream).as_str(), text.len());
                (!text.is_empty()).then(|| NewRunEvent {
                    at: now,
                    kind: kind_of(stream),
                    data: output_text(&text),
                })
            })
            .collect();
        if events.is_empty() {
            continue;
        }
        let staged = writer.stage(events).await;
        // The inserter only stops once this sender is dropped, so a send error cannot lose a batch here.
        if let Some(staged) = staged {
            let _ = staged_tx.send(staged).await;
        }
    }
    let leftovers: Vec<NewRunEvent> = carry
        .into_iter()
        .filter(|(_, bytes)| !bytes.is_empty())
        .map(|(stream, bytes)| NewRunEvent {
            at: Timestamp::now(),
            kind: kind_of(stream),
            data: output_text(&String::from_utf8_lossy(&bytes)),
        })
        .collect();
    if !leftovers.is_empty()
        && let Some(staged) = writer.stage(leftovers).await
    {
        let _ = staged_tx.send(staged).await;
    }
    drop(staged_tx);
    if let Err(error) = inserter.await {
        tracing::error!(run.id = %writer.run_id, %error, "the output inserter failed");
    }
}

/// Inserts the rows of staged batches, all that have accumulated at once, in order.
async fn insert_output(writer: EventWriter, mut staged: mpsc::Receiver<StagedEvents>) {
    let mut received = Vec::with_capacity(STAGED_QUEUE_BATCHES);
    while staged.recv_many(&mut received, STAGED_QUEUE_BATCHES).await > 0 {
        let mut batches = received.drain(..);
        let Some(mut merged) = batches.next() else {
            continue;
        };
        for later in batches {
            // Every batch is this run's, so nothing comes back; if it did, it goes in on its own, in order.
            if let Err(other) = merged.absorb(later) {
                writer.insert(std::mem::replace(&mut merged, other)).await;
            }
        }
        writer.insert(merged).await;
    }
}

/// Consecutive chunks of one stream are merged up to this size (the driver's largest read), so a chatty command
/// writing a line at a time costs few rows. A fast command's reads average well under it (~70 KiB), and every event
/// costs a row, an SSE frame and a wake-up per follower: merging them up to 256 KiB was faster than the copy it costs.
/// Followers get output in pieces of at most this size.
const MAX_MERGED_EVENT_BYTES: usize = 256 * 1024;

/// Merges consecutive small chunks of the same stream (order across streams is kept). Each merged event is
/// allocated once at its final size (growing the first chunk instead copied its bytes again at every doubling), and
/// a chunk merged with nothing is kept as it is.
fn coalesce(chunks: impl Iterator<Item = (OutputStream, Vec<u8>)>) -> Vec<(OutputStream, Vec<u8>)> {
    let mut merged: Vec<(OutputStream, Vec<u8>)> = Vec::new();
    // The chunks of the event being gathered, all of one stream, and their total length.
    let mut pending: Vec<Vec<u8>> = Vec::new();
    let mut pending_stream = OutputStream::Stdout;
    let mut pending_len = 0;
    let mut flush = |pending: &mut Vec<Vec<u8>>, stream: OutputStream, len: usize| {
        if pending.len() == 1 {
            merged.extend(pending.pop().map(|data| (stream, data)));
        } else if !pending.is_empty() {
            let mut data = Vec::with_capacity(len);
            for piece in pending.drain(..) {
                data.extend_from_slice(&piece);
            }
            merged.push((stream, data));
        }
    };
    for (stream, data) in chunks {
        if pending.is_empty()
            || stream != pending_stream
            || pending_len + data.len() > MAX_MERGED_EVENT_BYTES
        {
            flush(&mut pending, pending_stream, pending_len);
            pending_stream = stream;
            pending_len = 0;
        }
        pending_len += data.len();
        pending.push(data);
    }
    flush(&mut pending, pending_stream, pending_len);
    merged
}

fn kind_of(stream: OutputStream) -> EventKind {
    match stream {
        OutputStream::Stdout => EventKind::Stdout,
        OutputStream::Stderr => EventKind::Stderr,
    }
}

/// Decodes `carry` (an incomplete character left by the previous chunk) followed by `data` as far as it forms complete
/// characters, and leaves a new incomplete trailing character in `carry`. The same result as
/// [`take_complete_utf8`], without its copy on the common path: valid UTF-8 becomes the `String` in place, and bytes
/// are only copied to join a carried character or to replace invalid bytes.
pub fn take_complete_utf8_owned(carry: &mut Vec<u8>, data: Vec<u8>) -> String {
    let mut bytes = if carry.is_empty() {
        data
    } else {
        let mut joined = Vec::with_capacity(carry.len() + data.len());
        joined.append(carry);
        joined.extend_from_slice(&data);
        joined
    };
    let tail = bytes.split_off(bytes.len() - incomplete_tail_len(&bytes));
    match String::from_utf8(bytes) {
        Ok(text) => {
            *carry = tail;
            text
        }
        Err(error) => {
            let mut bytes = error.into_bytes();
            bytes.extend_from_slice(&tail);
            let text = take_complete_utf8(&mut bytes);
            *carry = bytes;
            text
        }
    }
}

/// How many bytes at the end of `bytes` start a character that is not complete yet (0 to 3). Invalid bytes count as
/// complete: decoding replaces them.
fn incomplete_tail_len(bytes: &[u8]) -> usize {
    for back in 1..=bytes.len().min(3) {
        let byte = bytes[bytes.len() - back];
        // Continuation bytes (0b10xx_xxxx) belong to a lead byte further back.
        if byte & 0xc0 != 0x80 {
            let needed = match byte {
                0xc2..=0xdf => 2,
                0xe0..=0xef => 3,
                0xf0..=0xf4 => 4,
                _ => 1,
            };
            return if needed > back { back } else { 0 };
        }
    }
    0
}

/// Decodes as much of `buffer` as forms complete characters (invalid bytes become U+FFFD) and leaves an incomplete
/// trailing character in `buffer` for the next chunk.
pub fn take_complete_utf8(buffer: &mut Vec<u8>) -> String {
    let mut text = String::with_capacity(buffer.len());
    let mut rest: &[u8] = buffer;
    loop {
        match std::str::from_utf8(rest) {
            Ok(valid) => {
                text.push_str(valid);
                rest = &[];
                break;
            }
            Err(error) => {
                let (valid, after) = rest.split_at(error.valid_up_to());
                text.push_str(std::str::from_utf8(valid).unwrap_or_default());
                match error.error_len() {
                    Some(invalid) => {
                        text.push(char::REPLACEMENT_CHARACTER);
                        rest = &after[invalid..];
                    }
                    // An incomplete character at the very end: keep it for the next chunk.
                    None => {
                        rest = after;
                        break;
                    }
                }
            }
        }
    }
    let kept = rest.to_vec();
    *buffer = kept;
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_characters_are_joined_across_chunks() {
        let bytes = "héllo €".as_bytes();
        let mut buffer = bytes[..2].to_vec(); // "h" + first byte of "é"
        assert_eq!(take_complete_utf8(&mut buffer), "h");
        assert_eq!(buffer.len(), 1);
        buffer.extend_from_slice(&bytes[2..]);
        assert_eq!(take_complete_utf8(&mut buffer), "éllo €");
        assert!(buffer.is_empty());
    }

    #[test]
    fn consecutive_chunks_of_one_stream_merge_and_order_is_kept() {
        let out = |text: &str| (OutputStream::Stdout, text.as_bytes().to_vec());
        let err = |text: &str| (OutputStream::Stderr, text.as_bytes().to_vec());
        let merged = coalesce(vec![out("a"), out("b"), err("c"), out("d")].into_iter());
        assert_eq!(merged, vec![out("ab"), err("c"), out("d")]);
        let big = vec![0u8; MAX_MERGED_EVENT_BYTES];
        let merged = coalesce(vec![(OutputStream::Stdout, big), out("x")].into_iter());
        assert_eq!(merged.len(), 2, "an event never grows past the limit");
        let large = || (OutputStream::Stdout, vec![b'x'; 4 * MAX_MERGED_EVENT_BYTES]);
        let merged = coalesce(vec![out("a"), large(), large()].into_iter());
        assert_eq!(merged.len(), 3, "large chunks are not copied into others");
    }

    #[test]
    fn owned_decoding_matches_the_copying_one_at_every_split() {
        let text = "aé€😀\u{7f}z".as_bytes().to_vec();
        let mut inputs = vec![text.clone()];
        // Invalid bytes anywhere, including where they look like the start of a character.
        inputs.push(vec![b'a', 0xff, 0xe2, 0x82, b'b', 0xf0, 0x9f, 0x98]);
        inputs.push(vec![0x80, 0x80, 0x80, 0x80, 0xe0, 0x80, 0xc0, 0xf5]);
        for input in inputs {
            for split in 0..=input.len() {
                let (first, second) = input.split_at(split);
                let mut expected_carry = first.to_vec();
                let mut expected = take_complete_utf8(&mut expected_carry);
                expected_carry.extend_from_slice(second);
                expected.push_str(&take_complete_utf8(&mut expected_carry));
                expected.push_str(&String::from_utf8_lossy(&expected_carry));

                let mut carry = Vec::new();
                let mut got = take_complete_utf8_owned(&mut carry, first.to_vec());
                got.push_str(&take_complete_utf8_owned(&mut carry, second.to_vec()));
                got.push_str(&String::from_utf8_lossy(&carry));
                assert_eq!(got, expected, "input {input:?} split at {split}");
            }
        }
    }

    #[test]
    fn whole_characters_are_never_carried() {
        let mut carry = Vec::new();
        assert_eq!(
            take_complete_utf8_owned(&mut carry, "x€".as_bytes().to_vec()),
            "x€"
        );
        assert!(carry.is_empty());
        assert_eq!(
            take_complete_utf8_owned(&mut carry, vec![b'y', 0xe2, 0x82]),
            "y"
        );
        assert_eq!(carry, vec![0xe2, 0x82]);
        assert_eq!(take_complete_utf8_owned(&mut carry, vec![0xac]), "€");
        assert!(carry.is_empty());
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut buffer = vec![b'a', 0xff, b'b', 0xe2, 0x82];
        assert_eq!(take_complete_utf8(&mut buffer), "a\u{fffd}b");
        assert_eq!(buffer, vec![0xe2, 0x82]);
    }
}
