//! Continuous batching: many sessions on one llama.cpp context.
//!
//! A model loaded with [`ModelOptions::parallel`](crate::llama::ModelOptions)
//! above 1 gets one [`Engine`]: a thread that owns one context with that
//! many sequences ("slots"), each bounded by the engine to `context_size`
//! tokens, each slot a KV stream of its own (see `start_engine` in
//! `llama.rs`), and, for a small model, one sequence more (below), whose
//! stream llama.cpp sizes as a slot's: `(parallel + 1) × context_size`
//! cells in all. Sessions keep their own threads, samplers and
//! grammars; what they evaluate (a prompt chunk, or the one token just
//! sampled) goes to the engine as a request, and the engine decodes the
//! requests of every session that is generating in one batch, then hands
//! each its logits. So eight sessions generating at once cost about one
//! decode step per token, not eight, and a session's prompt (sent in
//! chunks of [`PROMPT_CHUNK`] tokens) interleaves with the others' tokens.
//!
//! Slots are lent per generation, the way llama-server's are: a session
//! takes a slot when it starts generating and gives it back when done.
//! It gets its own previous slot back when that still holds its tokens
//! (the KV prefix is reused), else the least recently used free one (whose
//! cached tokens it reuses as far as they match its prompt). With every
//! slot busy, a session waits for one, in order of arrival, so none
//! starves. Requests are
//! taken first come, first served into each step (then sent in order of
//! sequence: see `in_sequence_order`), and the engine waits up to
//! `GATHER` for every busy slot's request before it decodes, so a step
//! carries all of them.
//!
//! An engine for a small model also has a sequence *aside* (see
//! [`Engine::acquire_aside`]): the constrained routing step's prompts run
//! there, lent to one session at a time, so the step costs no slot's KV
//! prefix, as it costs a session with a context of its own nothing.
//!
//! A session whose conversation outgrows its slot gets
//! [`ModelError::ContextFull`] naming the slot's size, as a session with
//! its own context would.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::token::LlamaToken;

use crate::backend::ModelError;

/// The most prompt tokens one session evaluates in one step, so prompt
/// processing interleaves with the other sessions' generation.
pub const PROMPT_CHUNK: usize = 128;

/// How long the engine waits for the other busy slots' requests before it
/// decodes what it has.
const GATHER: Duration = Duration::from_millis(3);

/// How often a session waiting for a slot looks at its cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(20);

/// Which logits an evaluation returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Want {
    /// None (a prompt chunk before the last).
    Nothing,
    /// The last token's.
    Last,
    /// Every token's.
    All,
}

/// One slot: a sequence of the shared context, and the tokens its KV
/// cache holds.
#[derive(Debug)]
struct Slot {
    cached: Vec<LlamaToken>,
    /// The session that last used it.
    owner: Option<u64>,
    busy: bool,
    last_used: Instant,
}

/// What the slots look like, behind one lock.
#[derive(Debug)]
struct Slots {
    slots: Vec<Slot>,
    /// Tickets of sessions waiting for a slot, oldest first.
    waiting: VecDeque<u64>,
    next_ticket: u64,
}

enum Request {
    Eval {
        seq: i32,
        tokens: Vec<LlamaToken>,
        start: usize,
        want: Want,
        reply: std::sync::mpsc::Sender<Result<Vec<Vec<f32>>, ModelError>>,
    },
    Truncate {
        seq: i32,
        keep: usize,
        reply: std::sync::mpsc::Sender<bool>,
    },
    Save {
        seq: i32,
        path: stack_seal::StateFile,
        tokens: Vec<LlamaToken>,
        reply: std::sync::mpsc::Sender<Result<(), ModelError>>,
    },
    Load {
        seq: i32,
        path: stack_seal::StateFile,
        capacity: usize,
        reply: std::sync::mpsc::Sender<Result<Vec<LlamaToken>, ModelError>>,
    },
}

/// The sequence aside: its id, whether a session holds it, and the tokens
/// its KV cache holds while none does.
#[derive(Debug)]
struct Aside {
    seq: i32,
    busy: bool,
    cached: Vec<LlamaToken>,
}

/// The sequence aside, lent to one session (see [`Engine::acquire_aside`]).
#[derive(Debug)]
pub(crate) struct AsideLease {
    pub(crate) seq: i32,
    pub(crate) cached: Vec<LlamaToken>,
}

/// The shared context's thread and its slots.
pub struct Engine {
    requests: Mutex<std::sync::mpsc::Sender<Request>>,
    slots: Mutex<Slots>,
    freed: Condvar,
    aside: Mutex<Option<Aside>>,
    aside_freed: Condvar,
    /// Sessions waiting for the sequence aside: each holds a busy slot
    /// that sends nothing meanwhile, so a step does not wait for it.
    aside_waiting: std::sync::atomic::AtomicUsize,
    slot_size: u32,
    steps: std::sync::atomic::AtomicU64,
    decoded: std::sync::atomic::AtomicU64,
    decode_micros: std::sync::atomic::AtomicU64,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("slots", &self.slot_count())
            .field("slot_size", &self.slot_size)
            .finish()
    }
}

/// A slot lent to one session for one generation.
#[derive(Debug)]
pub(crate) struct Lease {
    pub(crate) seq: i32,
    pub(crate) cached: Vec<LlamaToken>,
}

impl Engine {
    /// Starts the engine thread on `ctx`, a context made with `slots`
    /// sequences of `slot_size` tokens each and, `with_aside`, one more
    /// (sequence `slots`) for the routing step's prompts.
    pub(crate) fn start(
        ctx: LlamaContext<'static>,
        slots: u32,
        slot_size: u32,
        with_aside: bool,
        keep_alive: Arc<dyn std::any::Any + Send + Sync>,
    ) -> Result<Arc<Engine>, ModelError> {
        let (sender, inbox) = std::sync::mpsc::channel::<Request>();
        let engine = Arc::new(Engine {
            requests: Mutex::new(sender),
            slots: Mutex::new(Slots {
                slots: (0..slots)
                    .map(|_| Slot {
                        cached: Vec::new(),
                        owner: None,
                        busy: false,
                        last_used: Instant::now(),
                    })
                    .collect(),
                waiting: VecDeque::new(),
                next_ticket: 0,
            }),
            freed: Condvar::new(),
            aside: Mutex::new(with_aside.then(|| Aside {
                seq: i32::try_from(slots).unwrap_or(i32::MAX),
                busy: false,
                cached: Vec::new(),
            })),
            aside_freed: Condvar::new(),
            aside_waiting: Default::default(),
            slot_size,
            steps: Default::default(),
            decoded: Default::default(),
            decode_micros: Default::default(),
        });
        let weak = Arc::downgrade(&engine);
        std::thread::Builder::new()
            .name("stack-model-batch".into())
            .spawn(move || {
                // The model the context borrows lives as long as this thread.
                let _keep_alive = keep_alive;
                run(ctx, inbox, &weak);
            })
            .map_err(|e| ModelError::Backend(format!("starting the batching thread: {e}")))?;
        Ok(engine)
    }

    /// How many slots.
    pub fn slot_count(&self) -> usize {
        self.lock().slots.len()
    }

    /// Tokens each slot holds.
    pub fn slot_size(&self) -> u32 {
        self.slot_size
    }

    /// Decode steps run, and the tokens they carried: tokens over steps is
    /// how many sequences a step served on average (more than 1 when
    /// sessions generate together).
    pub fn steps(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (self.steps.load(Relaxed), self.decoded.load(Relaxed))
    }

    /// Seconds spent inside llama.cpp's decode, over the engine's life.
    pub fn decode_seconds(&self) -> f64 {
        self.decode_micros
            .load(std::sync::atomic::Ordering::Relaxed) as f64
            / 1e6
    }

    /// Slots lent out now.
    pub fn busy_slots(&self) -> usize {
        self.lock().slots.iter().filter(|s| s.busy).count()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits for a slot for session `owner` (see the module docs for which
    /// slot it gets); `None` once `cancel` is set first (a caller that
    /// gave up while every slot was busy leaves the line at once, rather
    /// than when a slot frees).
    pub(crate) fn acquire(
        &self,
        owner: u64,
        cancel: Option<&std::sync::atomic::AtomicBool>,
    ) -> Option<Lease> {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.waiting.push_back(ticket);
        loop {
            let first_in_line = state.waiting.front() == Some(&ticket);
            if first_in_line {
                let chosen = state
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(_, s)| !s.busy)
                    .max_by_key(|(_, slot)| {
                        (
                            slot.owner == Some(owner) && !slot.cached.is_empty(),
                            std::cmp::Reverse(slot.last_used),
                        )
                    })
                    .map(|(index, _)| index);
                if let Some(index) = chosen {
                    state.waiting.pop_front();
                    let slot = &mut state.slots[index];
                    slot.busy = true;
                    slot.owner = Some(owner);
                    let lease = Lease {
                        seq: index as i32,
                        cached: std::mem::take(&mut slot.cached),
                    };
                    // The next in line may find a slot too.
                    self.freed.notify_all();
                    return Some(lease);
                }
            }
            if cancel.is_some_and(|c| c.load(std::sync::atomic::Ordering::SeqCst)) {
                state.waiting.retain(|waiting| *waiting != ticket);
                // Whoever was behind may now be first in line.
                self.freed.notify_all();
                return None;
            }
            state = match cancel {
                // Woken by a freed slot, or in time to see the flag.
                Some(_) => {
                    self.freed
                        .wait_timeout(state, CANCEL_POLL)
                        .unwrap_or_else(|p| p.into_inner())
                        .0
                }
                None => self.freed.wait(state).unwrap_or_else(|p| p.into_inner()),
            };
        }
    }

    /// Whether the engine has a sequence aside.
    pub(crate) fn has_aside(&self) -> bool {
        self.lock_aside().is_some()
    }

    fn lock_aside(&self) -> std::sync::MutexGuard<'_, Option<Aside>> {
        self.aside.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Lends the sequence aside to one session, waiting while another
    /// holds it (a routing step is a few short prompts); `None` where the
    /// engine has none. Its cached tokens become the holder's to keep
    /// true, as a slot's do.
    pub(crate) fn acquire_aside(&self) -> Option<AsideLease> {
        let mut state = self.lock_aside();
        loop {
            match state.as_mut() {
                None => return None,
                Some(aside) if !aside.busy => {
                    aside.busy = true;
                    return Some(AsideLease {
                        seq: aside.seq,
                        cached: std::mem::take(&mut aside.cached),
                    });
                }
                Some(_) => {
                    use std::sync::atomic::Ordering::SeqCst;
                    self.aside_waiting.fetch_add(1, SeqCst);
                    state = self
                        .aside_freed
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner());
                    self.aside_waiting.fetch_sub(1, SeqCst);
                }
            }
        }
    }

    /// Gives the sequence aside back with the tokens its cache now holds.
    pub(crate) fn release_aside(&self, lease: AsideLease) {
        if let Some(aside) = self.lock_aside().as_mut() {
            aside.cached = lease.cached;
            aside.busy = false;
        }
        self.aside_freed.notify_one();
    }

    /// Gives a slot back with the tokens its KV cache now holds.
    pub(crate) fn release(&self, lease: Lease) {
        let mut state = self.lock();
        if let Some(slot) = usize::try_from(lease.seq)
            .ok()
            .and_then(|i| state.slots.get_mut(i))
        {
            slot.cached = lease.cached;
            slot.busy = false;
            slot.last_used = Instant::now();
        }
        drop(state);
        self.freed.notify_all();
    }

    /// Takes the slot that still holds session `owner`'s tokens, if one
    /// does and it is free (to save its state between generations); never
    /// waits, and never lends another session's slot.
    pub(crate) fn acquire_own(&self, owner: u64) -> Option<Lease> {
        let mut state = self.lock();
        let (index, slot) = state
            .slots
            .iter_mut()
            .enumerate()
            .find(|(_, s)| s.owner == Some(owner) && !s.busy && !s.cached.is_empty())?;
        slot.busy = true;
        Some(Lease {
            seq: index as i32,
            cached: std::mem::take(&mut slot.cached),
        })
    }

    /// Forgets a session's claim on its previous slot.
    pub(crate) fn disown(&self, owner: u64) {
        let mut state = self.lock();
        for slot in state.slots.iter_mut().filter(|s| s.owner == Some(owner)) {
            slot.owner = None;
        }
    }

    fn send(&self, request: Request) -> Result<(), ModelError> {
        self.requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(request)
            .map_err(|_| ModelError::Backend("the batching thread is gone".into()))
    }

    /// Evaluates `tokens` at positions from `start` in sequence `seq`;
    /// returns the logits `want` asks for.
    pub(crate) fn eval(
        &self,
        seq: i32,
        tokens: &[LlamaToken],
        start: usize,
        want: Want,
    ) -> Result<Vec<Vec<f32>>, ModelError> {
        if start + tokens.len() > self.slot_size as usize {
            return Err(ModelError::ContextFull {
                needed: start + tokens.len(),
                context: self.slot_size,
            });
        }
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(Request::Eval {
            seq,
            tokens: tokens.to_vec(),
            start,
            want,
            reply,
        })?;
        answer
            .recv()
            .map_err(|_| ModelError::Backend("the batching thread is gone".into()))?
    }

    /// Drops sequence `seq`'s cache from position `keep` on; `false` when
    /// llama.cpp could not (the caller then clears the sequence).
    pub(crate) fn truncate(&self, seq: i32, keep: usize) -> bool {
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(Request::Truncate { seq, keep, reply }).is_ok() && answer.recv().unwrap_or(false)
    }

    /// Saves sequence `seq`'s state (holding `tokens`) to `path`.
    pub(crate) fn save(
        &self,
        seq: i32,
        path: stack_seal::StateFile,
        tokens: Vec<LlamaToken>,
    ) -> Result<(), ModelError> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(Request::Save {
            seq,
            path,
            tokens,
            reply,
        })?;
        answer
            .recv()
            .map_err(|_| ModelError::Backend("the batching thread is gone".into()))?
    }

    /// Loads a saved state into sequence `seq`; returns its tokens.
    pub(crate) fn load(
        &self,
        seq: i32,
        path: stack_seal::StateFile,
    ) -> Result<Vec<LlamaToken>, ModelError> {
        let (reply, answer) = std::sync::mpsc::channel();
        self.send(Request::Load {
            seq,
            path,
            capacity: self.slot_size as usize,
            reply,
        })?;
        answer
            .recv()
            .map_err(|_| ModelError::Backend("the batching thread is gone".into()))?
    }
}

/// The engine thread: gathers requests, decodes them in one batch, replies.
fn run(
    mut ctx: LlamaContext<'static>,
    inbox: std::sync::mpsc::Receiver<Request>,
    engine: &std::sync::Weak<Engine>,
) {
    let batch_capacity = ctx.n_batch() as usize;
    let mut batch = LlamaBatch::new(batch_capacity.max(1), 1);
    let mut queue: VecDeque<Request> = VecDeque::new();
    loop {
        if queue.is_empty() {
            match inbox.recv() {
                Ok(request) => queue.push_back(request),
                Err(_) => return,
            }
        }
        // Wait a little for every busy slot to send its request, so one
        // step carries them all (but for slots whose sessions wait for the
        // sequence aside: they send nothing until they have it).
        let busy = engine.upgrade().map_or(1, |e| {
            e.busy_slots()
                .saturating_sub(e.aside_waiting.load(std::sync::atomic::Ordering::SeqCst))
        });
        let deadline = Instant::now() + GATHER;
        loop {
            let evals = queue
                .iter()
                .filter(|r| matches!(r, Request::Eval { .. }))
                .count();
            if evals >= busy {
                break;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match inbox.recv_timeout(left) {
                Ok(request) => queue.push_back(request),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        while let Ok(request) = inbox.try_recv() {
            queue.push_back(request);
        }
        // Cache operations first, in order; then one batch of evaluations,
        // as many as fit, first come first served.
        let mut evals = Vec::new();
        let mut taken = 0usize;
        let mut rest = VecDeque::new();
        while let Some(request) = queue.pop_front() {
            match request {
                Request::Truncate { seq, keep, reply } => {
                    let done = ctx
                        .clear_kv_cache_seq(Some(seq as u32), Some(keep as u32), None)
                        .unwrap_or(false);
                    let _ = reply.send(done);
                }
                Request::Save {
                    seq,
                    path,
                    tokens,
                    reply,
                } => {
                    let saved = path
                        .save_with(|named| ctx.state_seq_save_file(named, seq, &tokens).map(|_| ()))
                        .map_err(|e| ModelError::Backend(format!("saving the session state: {e}")));
                    let _ = reply.send(saved);
                }
                Request::Load {
                    seq,
                    path,
                    capacity,
                    reply,
                } => {
                    let loaded = path
                        .load_with(|named| ctx.state_seq_load_file(named, seq, capacity))
                        .map(|(tokens, _)| tokens)
                        .map_err(|e| {
                            ModelError::Backend(format!("loading the session state: {e}"))
                        });
                    if loaded.is_err() {
                        let _ = ctx.clear_kv_cache_seq(Some(seq as u32), None, None);
                    }
                    let _ = reply.send(loaded);
                }
                eval @ Request::Eval { .. } => {
                    let Request::Eval { ref tokens, .. } = eval else {
                        continue;
                    };
                    let fits = taken + tokens.len() <= batch_capacity;
                    let seq_taken = evals.iter().any(|e| same_seq(e, &eval));
                    if fits && !seq_taken {
                        taken += tokens.len();
                        evals.push(eval);
                    } else {
                        rest.push_back(eval);
                    }
                }
            }
        }
        queue = rest;
        if evals.is_empty() {
            continue;
        }
        in_sequence_order(&mut evals);
        let decoding = Instant::now();
        let decoded = decode_step(&mut ctx, &mut batch, &evals);
        if let Some(engine) = engine.upgrade() {
            use std::sync::atomic::Ordering::Relaxed;
            engine.steps.fetch_add(1, Relaxed);
            engine.decoded.fetch_add(taken as u64, Relaxed);
            engine
                .decode_micros
                .fetch_add(decoding.elapsed().as_micros() as u64, Relaxed);
        }
        if decoded.is_ok() || evals.len() == 1 {
            answer_step(&ctx, evals, &decoded);
            continue;
        }
        // One session's bad request (a token outside the vocabulary, say)
        // must not fail the others': the step is decoded again one
        // session at a time, and only what fails alone fails.
        tracing::warn!(
            error = decoded.err().unwrap_or_default(),
            sessions = evals.len(),
            "a batched decode step failed; decoding its sessions one at a time"
        );
        for eval in evals {
            let alone = [eval];
            let decoded = decode_step(&mut ctx, &mut batch, &alone);
            answer_step(&ctx, alone, &decoded);
        }
    }
}

/// Puts `evals` in `batch` and decodes them in one step. Where it fails,
/// what llama.cpp may have stored of it is dropped, so each slot holds
/// exactly the tokens its session has on record.
fn decode_step(
    ctx: &mut LlamaContext<'static>,
    batch: &mut LlamaBatch,
    evals: &[Request],
) -> Result<(), String> {
    batch.clear();
    let mut failed = None;
    for eval in evals {
        let Request::Eval {
            seq,
            tokens,
            start,
            want,
            ..
        } = eval
        else {
            continue;
        };
        for (i, token) in tokens.iter().enumerate() {
            let logits = match want {
                Want::Nothing => false,
                Want::Last => i + 1 == tokens.len(),
                Want::All => true,
            };
            if let Err(err) = batch.add(*token, (start + i) as i32, &[*seq], logits) {
                failed = Some(err.to_string());
            }
        }
    }
    let decoded = match failed {
        Some(err) => Err(err),
        None => ctx.decode(batch).map_err(|e| e.to_string()),
    };
    if decoded.is_err() {
        for eval in evals {
            if let Request::Eval { seq, start, .. } = eval {
                let _ = ctx.clear_kv_cache_seq(Some(*seq as u32), Some(*start as u32), None);
            }
        }
    }
    decoded
}

/// Sends each of a decoded step's evaluations its logits (or the step's
/// error).
fn answer_step(
    ctx: &LlamaContext<'static>,
    evals: impl IntoIterator<Item = Request>,
    decoded: &Result<(), String>,
) {
    let mut index = 0i32;
    for eval in evals {
        let Request::Eval {
            tokens,
            want,
            reply,
            ..
        } = eval
        else {
            continue;
        };
        let first = index;
        index += tokens.len() as i32;
        let answer = match decoded {
            Err(err) => Err(ModelError::Decode(err.clone())),
            Ok(()) => Ok(match want {
                Want::Nothing => Vec::new(),
                Want::Last => vec![ctx.get_logits_ith(index - 1).to_vec()],
                Want::All => (first..index)
                    .map(|i| ctx.get_logits_ith(i).to_vec())
                    .collect(),
            }),
        };
        let _ = reply.send(answer);
    }
}

/// Puts a step's evaluations in order of sequence. Where each slot has a
/// KV stream of its own, llama.cpp (`split_equal`) puts into one
/// micro-batch only sequences whose ids rise by one in the batch's order,
/// the same number of tokens of each; so any other order splits a step
/// into several passes over the weights (see the README's "Sessions
/// batched on one model" for the cost). What stays beyond this, as in
/// llama-server: a busy slot between idle ones starts a pass of its own,
/// and a prompt chunk beside one-token steps is a pass of its own after
/// the first token.
fn in_sequence_order(evals: &mut [Request]) {
    evals.sort_by_key(|eval| match eval {
        Request::Eval { seq, .. } => *seq,
        _ => i32::MAX,
    });
}

fn same_seq(a: &Request, b: &Request) -> bool {
    matches!((a, b), (Request::Eval { seq: x, .. }, Request::Eval { seq: y, .. }) if x == y)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step that llama.cpp refuses for one session's request (here a
    /// token outside the vocabulary) is decoded again one session at a
    /// time: the bad request fails alone, the other gets its logits, and
    /// its slot holds what it evaluated. Real model, real llama.cpp.
    #[test]
    fn a_bad_request_fails_alone_and_the_others_in_its_step_are_served() {
        let model = crate::llama::Model::load(crate::llama::ModelOptions {
            context_size: 256,
            threads: Some(2),
            parallel: 2,
            ..Default::default()
        })
        .expect("the default model loads (run scripts/setup first)");
        // A session starts the engine.
        let _session = model.session().expect("a session");
        let engine = Arc::clone(model.engine().expect("a batched model has an engine"));
        let good = model.tokenize("Hello there");
        let vocabulary = model.raw().n_vocab();
        let bad = vec![LlamaToken(vocabulary + 7)];
        let mut together = false;
        // The two requests must land in one step: they usually do (both
        // slots are lent before either is sent, so the engine waits for
        // both); where they did not, again.
        for _ in 0..10 {
            let (steps_before, _) = engine.steps();
            let barrier = Arc::new(std::sync::Barrier::new(2));
            let send = |owner: u64, tokens: Vec<LlamaToken>| {
                let engine = Arc::clone(&engine);
                let barrier = Arc::clone(&barrier);
                std::thread::spawn(move || {
                    let lease = engine.acquire(owner, None).expect("a slot");
                    barrier.wait();
                    let answer = engine.eval(lease.seq, &tokens, 0, Want::Last);
                    // llama.cpp takes a sequence's next position only
                    // right after its last: this goes on from what the
                    // slot holds.
                    let next = answer
                        .is_ok()
                        .then(|| engine.eval(lease.seq, &tokens[..1], tokens.len(), Want::Last));
                    let kept = engine.truncate(lease.seq, 0);
                    engine.release(lease);
                    (answer, next, kept)
                })
            };
            let good_one = send(u64::MAX - 1, good.clone());
            let bad_one = send(u64::MAX - 2, bad.clone());
            let (good_answer, next, kept) = good_one.join().expect("joined");
            let (bad_answer, _, _) = bad_one.join().expect("joined");
            assert!(kept);
            assert!(
                next.is_some_and(|next| next.is_ok()),
                "the good request's slot holds what it evaluated"
            );
            match bad_answer {
                Err(ModelError::Decode(_)) => {}
                other => panic!("a token outside the vocabulary: {other:?}"),
            }
            let logits = good_answer.expect("the good request is served");
            assert_eq!(logits.len(), 1);
            assert_eq!(logits[0].len(), vocabulary as usize);
            assert!(logits[0].iter().all(|l| l.is_finite()));
            let (steps_after, _) = engine.steps();
            // Together: one step for both, and one for the good request's
            // next token (apart, three).
            if steps_after - steps_before == 2 {
                together = true;
                break;
            }
        }
        assert!(together, "the two requests never shared a step");
    }

    /// A step's evaluations, gathered in order of arrival, go to llama.cpp
    /// in order of sequence. (The replies follow the same list, so each
    /// session's logits are its own: `batched_sessions_decode_together_and_
    /// keep_their_own_prefixes` in `tests/model.rs`.)
    #[test]
    fn a_steps_evaluations_go_in_order_of_sequence() {
        let (reply, _answers) = std::sync::mpsc::channel();
        let mut evals: Vec<Request> = [5, 0, 7, 2, 1]
            .into_iter()
            .map(|seq| Request::Eval {
                seq,
                tokens: vec![LlamaToken(seq)],
                start: 0,
                want: Want::Last,
                reply: reply.clone(),
            })
            .collect();
        in_sequence_order(&mut evals);
        let order: Vec<(i32, i32)> = evals
            .iter()
            .filter_map(|eval| match eval {
                Request::Eval { seq, tokens, .. } => Some((*seq, tokens[0].0)),
                _ => None,
            })
            .collect();
        assert_eq!(order, [(0, 0), (1, 1), (2, 2), (5, 5), (7, 7)]);
    }
}
