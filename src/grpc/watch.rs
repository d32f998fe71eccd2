//! The Watch service: each client stream is served by a [`session`] over the shared
//! [`Hub`].

use std::sync::Arc;

use tonic::{Request, Response, Status, Streaming};

use super::tls::ScopeSource;
use crate::ops::Proxy;
use crate::pb::etcdserverpb::{watch_server::Watch, WatchRequest};
use crate::upstream::REQUIRE_LEADER;
use crate::watch::session::{self, ResponseStream};
use crate::watch::Hub;

pub struct WatchService {
    proxy: Arc<Proxy>,
    scope: ScopeSource,
    hub: Arc<Hub>,
}

impl WatchService {
    pub fn new(proxy: Arc<Proxy>, scope: impl Into<ScopeSource>, hub: Arc<Hub>) -> WatchService {
        WatchService { proxy, scope: scope.into(), hub }
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = ResponseStream;

    async fn watch(&self, req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        let require_leader = req.metadata().get(REQUIRE_LEADER).is_some();
        let scope = self.scope.of(&self.proxy.resolver, &req)?;
        // No task of its own: the response stream reads the requests too, in the
        // call's span; it ends when the hub stops (shutdown).
        let responses = session::start(self.proxy.clone(), scope, self.hub.clone(), require_leader, req.into_inner());
        Ok(Response::new(responses))
    }
}
