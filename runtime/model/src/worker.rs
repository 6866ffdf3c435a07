//! The llama.cpp backend's sessions: a llama.cpp context is tied to one
//! thread, so each session owns a thread holding its `ModelSession`, and
//! the async side talks to it over channels, never blocking a runtime
//! thread. Generations across sessions take turns on a lock shared per
//! model, so many sessions can share one loaded model.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::backend::{
    BackendInfo, BackendSession, Capabilities, CompletionRequest, Counters, Generation,
    ModelBackend, ModelError,
};
use crate::llama::Model;

struct Job {
    request: CompletionRequest,
    tokens: tokio::sync::mpsc::UnboundedSender<String>,
    cancel: Arc<AtomicBool>,
    reply: tokio::sync::oneshot::Sender<Result<Generation, ModelError>>,
}

enum Request {
    Complete(Box<Job>),
    Clear,
    Save(
        stack_seal::StateFile,
        tokio::sync::oneshot::Sender<Result<(), ModelError>>,
    ),
    Load(
        stack_seal::StateFile,
        tokio::sync::oneshot::Sender<Result<usize, ModelError>>,
    ),
    Totals(tokio::sync::oneshot::Sender<Counters>),
}

/// A handle to a session's model thread.
#[derive(Debug)]
pub(crate) struct ModelWorker {
    requests: std::sync::mpsc::Sender<Request>,
}

impl ModelBackend for Model {
    fn info(&self) -> BackendInfo {
        let info = self.info();
        BackendInfo {
            name: info.name.clone(),
            detail: format!(
                "{:.0}M parameters, {} GPU layers, in process (llama.cpp){}",
                info.parameters as f64 / 1e6,
                info.gpu_layers,
                if self.batched() {
                    format!(
                        ", {} slots of {} tokens batched on one context",
                        self.parallel(),
                        self.context_size()
                    )
                } else {
                    String::new()
                }
            ),
            context_length: Some(self.context_size()),
            parameters: Some(info.parameters),
            capabilities: Capabilities {
                constrained_decoding: true,
                kv_prefix_reuse: true,
                native_tool_calls: false,
                saved_state: true,
                shared_context: self.batched(),
            },
        }
    }

    fn open_session(
        self: Arc<Self>,
    ) -> BoxFuture<'static, Result<Box<dyn BackendSession>, ModelError>> {
        Box::pin(async move {
            let worker = ModelWorker::spawn(self).await?;
            Ok(Box::new(worker) as Box<dyn BackendSession>)
        })
    }
}

impl BackendSession for ModelWorker {
    /// Generates on the model thread; pieces of text go to `deltas`.
    fn complete(
        &mut self,
        request: CompletionRequest,
        deltas: tokio::sync::mpsc::UnboundedSender<String>,
        cancel: Arc<AtomicBool>,
    ) -> BoxFuture<'_, Result<Generation, ModelError>> {
        Box::pin(async move {
            self.ask(|reply| {
                Request::Complete(Box::new(Job {
                    request,
                    tokens: deltas,
                    cancel,
                    reply,
                }))
            })
            .await?
        })
    }

    fn totals(&mut self) -> BoxFuture<'_, Counters> {
        Box::pin(async move { self.ask(Request::Totals).await.unwrap_or_default() })
    }

    fn clear(&mut self) {
        let _ = self.requests.send(Request::Clear);
    }

    /// Saves the KV cache to `file` and waits until it is written.
    fn save_state(&mut self, path: stack_seal::StateFile) -> BoxFuture<'_, Result<(), ModelError>> {
        Box::pin(async move { self.ask(|reply| Request::Save(path, reply)).await? })
    }

    /// Asks the model thread to save the KV cache to `path` and returns at
    /// once: the thread writes it after any job before it, then (once the
    /// session is gone) ends. Best effort: a process that exits first
    /// loses it, and a resumed session then evaluates its prompt again.
    fn save_state_detached(&mut self, path: stack_seal::StateFile) {
        let (reply, _) = tokio::sync::oneshot::channel();
        let _ = self.requests.send(Request::Save(path, reply));
    }

    /// Restores a saved KV cache; returns the number of cached tokens.
    fn load_state(
        &mut self,
        path: stack_seal::StateFile,
    ) -> BoxFuture<'_, Result<usize, ModelError>> {
        Box::pin(async move { self.ask(|reply| Request::Load(path, reply)).await? })
    }
}

impl ModelWorker {
    /// Starts a thread with a fresh context on `model`, and waits (without
    /// blocking the caller's thread) until the context is made.
    pub(crate) async fn spawn(model: Arc<Model>) -> Result<ModelWorker, ModelError> {
        let (requests, inbox) = std::sync::mpsc::channel::<Request>();
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        std::thread::Builder::new()
            .name("stack-model-session".into())
            .spawn(move || {
                let mut session = match model.session() {
                    Ok(session) => {
                        let _ = ready_tx.send(Ok(()));
                        session
                    }
                    Err(err) => {
                        let _ = ready_tx.send(Err(err));
                        return;
                    }
                };
                for request in inbox {
                    match request {
                        Request::Complete(job) => {
                            // Sessions with contexts of their own are served
                            // in turn; a batched model decodes them together.
                            let _turn = (!model.batched()).then(|| {
                                model.turn_lock().lock().unwrap_or_else(|p| p.into_inner())
                            });
                            let mut ids = {
                                let mut n = 0u32;
                                let salt = std::time::SystemTime::now()
                                    .duration_since(std::time::UNIX_EPOCH)
                                    .map_or(0, |d| d.as_millis());
                                move || {
                                    n += 1;
                                    format!("call_{salt:x}_{n}")
                                }
                            };
                            let (tokens, cancel) = (job.tokens, job.cancel);
                            session.set_argument_values(job.request.argument_values.clone());
                            session.set_cancel(Some(Arc::clone(&cancel)));
                            let result = session.complete(
                                &job.request.messages,
                                &job.request.tools,
                                &job.request.tool_choice,
                                &job.request.sampling,
                                job.request.response_format.as_ref(),
                                &mut |piece| {
                                    let _ = tokens.send(piece.to_string());
                                    !cancel.load(Ordering::SeqCst)
                                },
                                &mut ids,
                            );
                            let _ = job.reply.send(result);
                        }
                        Request::Clear => session.clear_cache(),
                        Request::Save(path, reply) => {
                            let _ = reply.send(session.save_state(&path));
                        }
                        Request::Load(path, reply) => {
                            let _ = reply.send(session.load_state(&path));
                        }
                        Request::Totals(reply) => {
                            let _ = reply.send(session.totals());
                        }
                    }
                }
            })
            .map_err(|e| ModelError::Backend(format!("starting the model thread: {e}")))?;
        ready_rx
            .await
            .map_err(|_| ModelError::Backend("the model thread died".into()))??;
        Ok(ModelWorker { requests })
    }

    /// Sends the model thread the request `make` builds around a reply
    /// channel, and awaits the reply.
    async fn ask<T>(
        &self,
        make: impl FnOnce(tokio::sync::oneshot::Sender<T>) -> Request,
    ) -> Result<T, ModelError> {
        let gone = || ModelError::Backend("the model thread is gone".into());
        let (reply, answer) = tokio::sync::oneshot::channel();
        self.requests.send(make(reply)).map_err(|_| gone())?;
        answer.await.map_err(|_| gone())
    }
}
