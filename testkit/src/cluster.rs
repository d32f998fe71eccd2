//! Several etcd members on loopback forming one cluster, for tests of what a proxy
//! does when etcd loses its leader.

use crate::etcd::{wait_ready, Etcd, EtcdBuilder};

/// An etcd cluster of N members (`m0`, `m1`, ...), each an [`Etcd`] with its own free
/// ports and temp dir, started with 50 ms heartbeats and a 500 ms election timeout.
/// Killing a majority makes the rest lose their leader; members are killed on drop.
pub struct Cluster {
    members: Vec<Etcd>,
}

impl Cluster {
    /// Starts `members` etcds as one cluster and waits until every one is healthy
    /// (a leader is elected). Panics (with the logs) if they never get there. For
    /// extra flags: `Etcd::builder().args([...]).start_cluster(n)`.
    pub fn start(members: usize) -> Cluster {
        EtcdBuilder::default().start_cluster(members)
    }

    pub(crate) fn from_members(members: Vec<Etcd>) -> Cluster {
        Cluster { members }
    }

    /// Every member's client URL, in member order (for a client's endpoint list).
    pub fn client_urls(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// The members, in order.
    pub fn members(&self) -> &[Etcd] {
        &self.members
    }

    /// Member `i`, for its URLs, log or metrics.
    pub fn member(&self, i: usize) -> &Etcd {
        &self.members[i]
    }

    /// Kills member `i` (SIGKILL); its ports and data are kept for [`Cluster::restart`].
    pub fn kill(&mut self, i: usize) {
        self.members[i].kill();
    }

    /// Starts member `i` again with its ports and data and waits until it is healthy,
    /// which needs a quorum (a majority of members running, this one included).
    pub fn restart(&mut self, i: usize) {
        self.members[i].restart();
    }

    /// Starts every killed member again and waits until all members are healthy.
    pub fn restart_all(&mut self) {
        for m in self.members.iter_mut().filter(|m| !m.is_running()) {
            m.respawn().unwrap_or_else(|e| panic!("{e}"));
        }
        if let Err(why) = wait_ready(&mut self.members) {
            let logs: Vec<String> = self.members.iter().map(|m| format!("--- {} ---\n{}", m.name(), m.log())).collect();
            panic!("etcd cluster did not come back: {why}\n{}", logs.join("\n"));
        }
    }
}
