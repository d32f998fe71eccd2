//! One upstream event in tenant form, decoded once and shared by every watcher it
//! reaches (and by the ring).

use std::sync::OnceLock;

use bytes::Bytes;

use crate::keyspace::{root_of, KeyLayout, Root, TenantName};
use crate::pb::mvccpb::{event::EventType, Event};

/// One upstream event in tenant form, shared by every watcher it reaches.
pub struct HubEvent {
    pub rev: i64,
    pub tenant: TenantName,
    /// The tenant key.
    pub key: Bytes,
    /// The resource root of `key`, for the fan-out index.
    pub(super) root: Root,
    /// kv and prev_kv with tenant keys.
    pub(super) event: Event,
    /// The same event with keys in key-path-rule client form, made on first use.
    pub(super) prefixed: OnceLock<Event>,
    pub(super) size: usize,
}

impl HubEvent {
    pub(super) fn from_upstream(layout: &KeyLayout, mut event: Event) -> Option<HubEvent> {
        let kv = event.kv.as_mut()?;
        let (tenant, key) = layout.decode(&kv.key)?;
        kv.key = key.clone();
        let rev = kv.mod_revision;
        let mut size = 96 + key.len() + kv.value.len();
        if let Some(prev) = event.prev_kv.as_mut() {
            prev.key = key.clone();
            size += prev.value.len();
        }
        let root = root_of(&key);
        Some(HubEvent { rev, tenant, key, root, event, prefixed: OnceLock::new(), size })
    }

    pub(super) fn is_put(&self) -> bool {
        self.event.r#type == EventType::Put as i32
    }
}

impl super::ring::Entry for std::sync::Arc<HubEvent> {
    fn rev(&self) -> i64 {
        self.rev
    }

    fn size(&self) -> usize {
        self.size
    }
}
