//! A listener's life as its connections see it, and the executor that ends HTTP/2 streams with it.

use std::future::Future;

use tokio::sync::watch;

/// A listener's life: connections watch it to stop taking requests, then to stop altogether.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    Running,
    Draining,
    Stopped,
}

/// Whether the listener a connection came from is shutting down. A service may refuse requests that still arrive
/// on a kept-alive connection once it is (the bridge answers them 503).
#[derive(Clone, Debug)]
pub struct Draining {
    phase: Option<watch::Receiver<Phase>>,
}

impl Draining {
    /// For a connection no listener owns: it never drains.
    pub fn never() -> Self {
        Self { phase: None }
    }

    pub(crate) fn of(phase: watch::Receiver<Phase>) -> Self {
        Self { phase: Some(phase) }
    }

    pub fn is_draining(&self) -> bool {
        self.phase
            .as_ref()
            .is_some_and(|phase| *phase.borrow() != Phase::Running)
    }

    /// Resolves once the listener reaches `target` (or is gone); never without a listener.
    pub(crate) async fn reached(&mut self, target: Phase) {
        match &mut self.phase {
            Some(phase) => {
                let _ = phase.wait_for(|phase| *phase >= target).await;
            }
            None => std::future::pending().await,
        }
    }
}

/// Runs HTTP/2 streams on their own tasks, like `TokioExecutor`, but ends them when the listener stops, so nothing
/// outlives a shutdown.
#[derive(Clone, Debug)]
pub(crate) struct StreamExecutor {
    pub(crate) draining: Draining,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future<Output = ()> + Send + 'static,
{
    fn execute(&self, future: F) {
        let mut draining = self.draining.clone();
        tokio::spawn(async move {
            tokio::select! {
                () = future => {}
                () = draining.reached(Phase::Stopped) => {}
            }
        });
    }
}
