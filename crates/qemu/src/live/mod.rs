//! Backing up a running QEMU or qemu-storage-daemon: its disks, their dirty
//! bitmaps, and a point-in-time view of all of them at one instant.
//!
//! Why this shape: a running VM keeps writing, so its image files cannot
//! simply be read (and qemu locks them). QEMU itself must provide a frozen
//! view, and for incremental backups the set of changed blocks must be
//! cut at exactly the same instant as the view, or blocks written in
//! between are lost from the chain. So [`LiveSession::begin`] does, for all
//! disks in **one** QMP `transaction` (QEMU drains every disk around it):
//!
//! - image fleecing: a temporary qcow2 overlay whose backing is the disk's
//!   node, filled by a `blockdev-backup` job with `sync: none` — before the
//!   guest overwrites a block, QEMU copies the old content into the
//!   overlay, so reading the overlay gives the disk as it was at the
//!   instant;
//! - the bitmap rotation: the bitmap to read is disabled (it stops at the
//!   instant), a disabled copy is made of a bitmap that must keep running
//!   (differential backups), and new bitmaps start recording.
//!
//! Each view is then exported read-only over QEMU's NBD server together
//! with the bitmap that says what changed, and read with
//! [`NbdExportSource`](crate::NbdExportSource). [`LiveSession::commit`]
//! drops what the next backup no longer needs; [`LiveSession::abort`] (or
//! dropping the session) merges the new bitmaps back so the next
//! incremental backup still sees every change. Both remove everything the
//! session added to QEMU and to the file system.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::qmp::{BlockDeviceInfo, BlockGraph, DirtyBitmapInfo, QmpClient};

mod leftovers;
mod session;

pub use leftovers::cleanup_leftovers;
pub use session::{FreezeReport, LiveDiskPlan, LiveOptions, LiveSession};

/// The prefix of every node, job, export and bitmap vbackup creates; such
/// nodes are never offered as disks.
pub const NAME_PREFIX: &str = "vbackup-";

/// A dirty bitmap of a live disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveBitmap {
    /// The bitmap name.
    pub name: String,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether it records writes (enabled).
    pub recording: bool,
    /// Whether QEMU stores it in the image on close.
    pub persistent: bool,
    /// Whether it may have missed writes (loaded after an unclean
    /// shutdown); an inconsistent bitmap must not drive an incremental.
    pub inconsistent: bool,
    /// Whether an operation (an export, a job) holds it right now.
    pub busy: bool,
    /// Dirty bytes.
    pub dirty_bytes: u64,
}

/// A disk of a running QEMU (a device's medium) or qemu-storage-daemon (a
/// top-level block node).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LiveDisk {
    /// The top block node: what [`LiveDiskPlan::node`] names.
    pub node: String,
    /// The device name, else the node name: what users call the disk.
    pub name: String,
    /// The image file QEMU reports.
    pub filename: String,
    /// The format of the top node (`qcow2`, `raw`, ...).
    pub format: String,
    /// The size the guest sees, in bytes.
    pub size: u64,
    /// The node's named dirty bitmaps.
    pub bitmaps: Vec<LiveBitmap>,
}

impl LiveDisk {
    /// The bitmap called `name`, if the disk has one.
    pub fn bitmap(&self, name: &str) -> Option<&LiveBitmap> {
        self.bitmaps.iter().find(|b| b.name == name)
    }

    fn from_node(info: &BlockDeviceInfo, node: &str, name: &str) -> Self {
        LiveDisk {
            node: node.to_owned(),
            name: name.to_owned(),
            filename: info.image.filename.clone(),
            format: info.drv.clone(),
            size: info.image.virtual_size,
            bitmaps: info.dirty_bitmaps.iter().filter_map(live_bitmap).collect(),
        }
    }
}

fn live_bitmap(info: &DirtyBitmapInfo) -> Option<LiveBitmap> {
    Some(LiveBitmap {
        name: info.name.clone()?,
        granularity: info.granularity,
        recording: info.recording,
        persistent: info.persistent,
        inconsistent: info.inconsistent,
        busy: info.busy,
        dirty_bytes: info.count,
    })
}

/// The disks of the VM behind `qmp`.
///
/// QEMU: every device with a medium (`query-block`), named after the
/// device (or its top node for `-blockdev` disks without a drive name).
/// qemu-storage-daemon has no devices, so there the disks are its top-level
/// named nodes: those that are no other named node's child (from the block
/// graph, as QEMU 10's node listing has no `children`), skipping implicit
/// (`#...`) and vbackup's own (`vbackup-...`) nodes, sorted by name.
/// Bitmaps come from
/// `query-named-block-nodes`, the one listing that always names them.
pub fn discover_disks(qmp: &mut QmpClient) -> Result<Vec<LiveDisk>> {
    let nodes = qmp.query_named_block_nodes()?;
    let devices = device_disks(qmp, &nodes)?;
    if !devices.is_empty() {
        return Ok(devices);
    }
    let graph = qmp.query_block_graph()?;
    let mut disks: Vec<LiveDisk> = top_level_nodes(&graph)
        .into_iter()
        .filter_map(|name| {
            let info = find_node(&nodes, &name)?;
            Some(LiveDisk::from_node(info, &name, &name))
        })
        .collect();
    // The graph's order is QEMU's internal one; names give a stable one.
    disks.sort_by(|a, b| a.node.cmp(&b.node));
    Ok(disks)
}

fn find_node<'a>(nodes: &'a [BlockDeviceInfo], name: &str) -> Option<&'a BlockDeviceInfo> {
    nodes.iter().find(|n| n.node_name.as_deref() == Some(name))
}

/// Disks attached to QEMU devices.
fn device_disks(qmp: &mut QmpClient, nodes: &[BlockDeviceInfo]) -> Result<Vec<LiveDisk>> {
    let mut disks = Vec::new();
    for block in qmp.query_block()? {
        let Some(inserted) = &block.inserted else {
            continue;
        };
        let Some(node) = inserted.node_name.as_deref() else {
            continue;
        };
        let name = if block.device.is_empty() {
            node
        } else {
            &block.device
        };
        // The named listing has the bitmaps; fall back to what query-block said.
        let info = find_node(nodes, node).unwrap_or(inserted);
        disks.push(LiveDisk::from_node(info, node, name));
    }
    Ok(disks)
}

/// Whether a node name is one users gave (not implicit, not ours).
fn is_user_node(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('#') && !name.starts_with(NAME_PREFIX)
}

/// Block-driver nodes with a user-given name that no other such node has
/// as a child, in graph order.
pub fn top_level_nodes(graph: &BlockGraph) -> Vec<String> {
    let user_driver = |id: u64| {
        graph
            .nodes
            .iter()
            .any(|n| n.id == id && n.kind == "block-driver" && is_user_node(&n.name))
    };
    graph
        .nodes
        .iter()
        .filter(|n| n.kind == "block-driver" && is_user_node(&n.name))
        .filter(|n| {
            !graph
                .edges
                .iter()
                .any(|e| e.child == n.id && user_driver(e.parent))
        })
        .map(|n| n.name.clone())
        .collect()
}

/// `{"type": kind, "data": data}`: one action of a QMP transaction.
pub(crate) fn action(kind: &str, data: Value) -> Value {
    serde_json::json!({"type": kind, "data": data})
}

/// Finds `node` among the discovered disks.
pub(crate) fn find_disk<'a>(disks: &'a [LiveDisk], node: &str) -> Result<&'a LiveDisk> {
    disks.iter().find(|d| d.node == node).ok_or_else(|| {
        let known: Vec<&str> = disks.iter().map(|d| d.node.as_str()).collect();
        Error::InvalidRequest(format!(
            "block node '{node}' is not a disk of this VM (disks: {})",
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn top_level_nodes_skip_children_implicit_and_our_nodes() {
        // disk0 (qcow2) -> file0; base <- top (backing); our overlay has
        // disk0 as backing and an implicit filter sits above disk0.
        let graph: BlockGraph = serde_json::from_value(json!({
            "nodes": [
                {"id": 1, "type": "block-driver", "name": "disk0"},
                {"id": 2, "type": "block-driver", "name": "file0"},
                {"id": 3, "type": "block-driver", "name": "top"},
                {"id": 4, "type": "block-driver", "name": "base"},
                {"id": 5, "type": "block-driver", "name": "vbackup-1234-ov0"},
                {"id": 6, "type": "block-driver", "name": "#block109"},
                {"id": 7, "type": "block-backend", "name": ""},
                {"id": 8, "type": "block-job", "name": "vbackup-1234-job0"}
            ],
            "edges": [
                {"parent": 1, "child": 2, "name": "file"},
                {"parent": 3, "child": 4, "name": "backing"},
                {"parent": 5, "child": 1, "name": "backing"},
                {"parent": 6, "child": 1, "name": "file"},
                {"parent": 7, "child": 3, "name": "root"},
                {"parent": 8, "child": 1, "name": "main node"}
            ]
        }))
        .unwrap();
        assert_eq!(top_level_nodes(&graph), vec!["disk0", "top"]);
    }

    #[test]
    fn unknown_nodes_are_named_with_the_known_ones() {
        let disks = vec![LiveDisk {
            node: "disk0".into(),
            name: "disk0".into(),
            filename: "/d".into(),
            format: "qcow2".into(),
            size: 1,
            bitmaps: vec![],
        }];
        let err = find_disk(&disks, "nope").unwrap_err().to_string();
        assert!(err.contains("'nope'") && err.contains("disk0"), "{err}");
    }
}
