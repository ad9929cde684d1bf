//! Sites reaching each other in memory: a `Peer` that hands each message to the other
//! site's inbox, and a wrapper that injects faults around any `Peer`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use dqkd_kme::inbox::{PeerInbox, VerifiedKme};
use dqkd_kme::peer::{
    BindAck, BindRequest, DeliverAck, DeliverRequest, DestroyAck, DestroyRequest, FillAck,
    FillRequest, Peer, PeerError, PeerHealth, ReconcileAck, ReconcileRequest,
};
use dqkd_kme::ApiError;
use dqkd_pki::Identity;
use tokio::time::Instant;

/// The inbox of a site, set once that site is built.
#[derive(Default)]
pub struct InboxSlot(pub Mutex<Option<Arc<PeerInbox>>>);

impl InboxSlot {
    fn get(&self) -> Arc<PeerInbox> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
            .expect("every site is built before requests are sent")
    }
}

/// Site X's view of site Y: each call is handed to Y's inbox as from X's KME. Deliver, fill
/// and bind run in a task of their own, as the peer routes run them, so a caller that gives
/// up cannot cancel them half-way.
pub struct MemoryPeer {
    pub site: String,
    pub caller: Identity,
    pub inbox: Arc<InboxSlot>,
}

impl MemoryPeer {
    fn verified(&self, inbox: &PeerInbox) -> Result<VerifiedKme, PeerError> {
        inbox
            .verify_kme(Some(&self.caller))
            .map_err(|e| self.refused(e))
    }

    fn refused(&self, e: ApiError) -> PeerError {
        PeerError::Refused {
            site: self.site.clone(),
            status: e.status(),
            message: e.to_string(),
        }
    }

    fn late(&self) -> PeerError {
        PeerError::Unreachable {
            site: self.site.clone(),
            reason: "no answer before the deadline".into(),
        }
    }

    /// Runs `call` at the peer in its own task; waits for it until `deadline` at most.
    async fn spawned<T, F>(&self, deadline: Option<Instant>, call: F) -> Result<T, PeerError>
    where
        T: Send + 'static,
        F: std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
    {
        let task = tokio::spawn(call);
        let joined = match deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, task).await {
                Ok(joined) => joined,
                Err(_) => return Err(self.late()),
            },
            None => task.await,
        };
        match joined {
            Ok(result) => result.map_err(|e| self.refused(e)),
            Err(e) => Err(PeerError::Unreachable {
                site: self.site.clone(),
                reason: format!("the peer's task failed: {e}"),
            }),
        }
    }
}

#[async_trait::async_trait]
impl Peer for MemoryPeer {
    fn site(&self) -> &str {
        &self.site
    }

    async fn deliver(
        &self,
        request: &DeliverRequest,
        deadline: Instant,
    ) -> Result<DeliverAck, PeerError> {
        let inbox = self.inbox.get();
        let who = self.verified(&inbox)?;
        let request = request.clone();
        self.spawned(Some(deadline), async move {
            inbox.peer_deliver(&who, request).await
        })
        .await
    }

    async fn fill(&self, request: &FillRequest) -> Result<FillAck, PeerError> {
        let inbox = self.inbox.get();
        let who = self.verified(&inbox)?;
        let request = request.clone();
        self.spawned(None, async move { inbox.peer_fill(&who, request).await })
            .await
    }

    async fn bind(&self, request: &BindRequest, deadline: Instant) -> Result<BindAck, PeerError> {
        let inbox = self.inbox.get();
        let who = self.verified(&inbox)?;
        let request = request.clone();
        self.spawned(Some(deadline), async move {
            inbox.peer_bind(&who, request).await
        })
        .await
    }

    async fn destroy(&self, request: &DestroyRequest) -> Result<DestroyAck, PeerError> {
        let inbox = self.inbox.get();
        let who = self.verified(&inbox)?;
        inbox
            .peer_destroy(&who, request.clone())
            .await
            .map_err(|e| self.refused(e))
    }

    async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileAck, PeerError> {
        let inbox = self.inbox.get();
        let who = self.verified(&inbox)?;
        let request = request.clone();
        self.spawned(
            None,
            async move { inbox.peer_reconcile(&who, request).await },
        )
        .await
    }

    async fn health(&self) -> Result<PeerHealth, PeerError> {
        Ok(PeerHealth {
            status: "ok".into(),
            kme_id: self.site.parse().expect("the site's KME ID is a name"),
        })
    }
}

/// The peer calls a fault can hit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Call {
    Deliver,
    Fill,
    Bind,
    Destroy,
    Reconcile,
}

/// What goes wrong with a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The call never reaches the peer: no connection.
    FailBefore,
    /// The peer acts, and its answer is lost.
    DropAck,
    /// The peer acts, and its answer arrives this much later (or never, past the deadline).
    DelayAck(Duration),
    /// The peer acts and never answers.
    Hang,
}

/// Wraps a peer and injects faults per call; counts the calls that reached it.
pub struct Faulty {
    inner: Arc<dyn Peer>,
    faults: Mutex<HashMap<Call, Fault>>,
    calls: Mutex<HashMap<Call, usize>>,
}

impl Faulty {
    pub fn new(inner: Arc<dyn Peer>) -> Self {
        Self {
            inner,
            faults: Mutex::default(),
            calls: Mutex::default(),
        }
    }

    /// Every later `call` suffers `fault`.
    pub fn set(&self, call: Call, fault: Fault) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(call, fault);
    }

    /// Calls of this kind go through again.
    pub fn heal(&self, call: Call) {
        self.faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&call);
    }

    /// How many calls of this kind reached the peer.
    pub fn calls(&self, call: Call) -> usize {
        *self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&call)
            .unwrap_or(&0)
    }

    fn unreachable(&self, why: &str) -> PeerError {
        PeerError::Unreachable {
            site: self.inner.site().to_owned(),
            reason: why.into(),
        }
    }

    /// Runs `act` (the call at the peer) with the fault set for `call`; `deadline` bounds a
    /// late answer the way the HTTPS client's timeout would.
    async fn run<T, F>(&self, call: Call, deadline: Option<Instant>, act: F) -> Result<T, PeerError>
    where
        F: std::future::Future<Output = Result<T, PeerError>>,
    {
        let fault = self
            .faults
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&call)
            .copied();
        if fault == Some(Fault::FailBefore) {
            return Err(self.unreachable("connection refused"));
        }
        *self
            .calls
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(call)
            .or_default() += 1;
        let answer = act.await;
        let wait = match fault {
            None | Some(Fault::FailBefore) => return answer,
            Some(Fault::DropAck) => return Err(self.unreachable("connection reset")),
            Some(Fault::DelayAck(by)) => by,
            Some(Fault::Hang) => Duration::MAX,
        };
        let until = Instant::now().checked_add(wait);
        let until = match (until, deadline) {
            (Some(u), Some(d)) => Some(u.min(d)),
            (u, d) => u.or(d),
        };
        match until {
            Some(until) => tokio::time::sleep_until(until).await,
            None => std::future::pending::<()>().await,
        }
        match deadline {
            Some(d) if Instant::now() >= d => Err(self.unreachable("timed out")),
            _ => answer,
        }
    }
}

#[async_trait::async_trait]
impl Peer for Faulty {
    fn site(&self) -> &str {
        self.inner.site()
    }

    async fn deliver(
        &self,
        request: &DeliverRequest,
        deadline: Instant,
    ) -> Result<DeliverAck, PeerError> {
        self.run(
            Call::Deliver,
            Some(deadline),
            self.inner.deliver(request, deadline),
        )
        .await
    }

    async fn fill(&self, request: &FillRequest) -> Result<FillAck, PeerError> {
        self.run(Call::Fill, None, self.inner.fill(request)).await
    }

    async fn bind(&self, request: &BindRequest, deadline: Instant) -> Result<BindAck, PeerError> {
        self.run(
            Call::Bind,
            Some(deadline),
            self.inner.bind(request, deadline),
        )
        .await
    }

    async fn destroy(&self, request: &DestroyRequest) -> Result<DestroyAck, PeerError> {
        self.run(Call::Destroy, None, self.inner.destroy(request))
            .await
    }

    async fn reconcile(&self, request: &ReconcileRequest) -> Result<ReconcileAck, PeerError> {
        self.run(Call::Reconcile, None, self.inner.reconcile(request))
            .await
    }

    async fn health(&self) -> Result<PeerHealth, PeerError> {
        self.inner.health().await
    }
}
