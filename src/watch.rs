//! The Watch service. Until the watch hub (shared upstream watches, event cache and
//! fan-out) lands, a watch is refused with a clear `UNIMPLEMENTED` rather than
//! served by one upstream watch per client watch, which is exactly the cost etcdmux
//! exists to remove.

use std::pin::Pin;
use std::sync::Arc;

use futures::Stream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb::etcdserverpb::{watch_server::Watch, WatchRequest, WatchResponse};
use crate::proxy::Proxy;
use crate::tenant::Scope;

pub struct WatchService {
    _proxy: Arc<Proxy>,
    _scope: Scope,
}

impl WatchService {
    pub fn new(proxy: Arc<Proxy>, scope: Scope) -> WatchService {
        WatchService { _proxy: proxy, _scope: scope }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(&self, _req: Request<Streaming<WatchRequest>>) -> Result<Response<Self::WatchStream>, Status> {
        Err(Status::unimplemented(
            "etcdmux: Watch is not available yet: the shared watch hub is not built in this version",
        ))
    }
}
