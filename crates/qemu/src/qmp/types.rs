//! Typed views of the QMP replies vbackup reads, and helpers for the
//! commands it sends. Only the fields we use are declared; unknown fields
//! are ignored, so newer QEMU versions keep working.

use std::path::Path;

use serde::Deserialize;
use serde_json::{json, Value};

use super::QmpClient;
use crate::error::Result;

/// One entry of `query-block`: a device (QEMU) with its medium.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockInfo {
    /// The device (drive) name; empty for `-blockdev` disks.
    pub device: String,
    /// The guest device's QOM path or id, when attached to one.
    #[serde(default)]
    pub qdev: Option<String>,
    /// The inserted medium; absent for an empty drive.
    #[serde(default)]
    pub inserted: Option<BlockDeviceInfo>,
}

/// A block node (`query-named-block-nodes`, or a device's medium).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockDeviceInfo {
    /// The node name (top node of a device's medium).
    #[serde(default)]
    pub node_name: Option<String>,
    /// The file name QEMU shows (may be a `json:{...}` description).
    pub file: String,
    /// The driver, e.g. `qcow2`, `raw`, `file`.
    pub drv: String,
    /// Whether the node is read-only.
    #[serde(default)]
    pub ro: bool,
    /// What the image looks like.
    pub image: ImageSummary,
    /// The dirty bitmaps on this node.
    #[serde(default)]
    pub dirty_bitmaps: Vec<DirtyBitmapInfo>,
}

/// The part of QEMU's `ImageInfo` we use.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct ImageSummary {
    /// The image file name.
    pub filename: String,
    /// The format (driver) of this layer.
    pub format: String,
    /// The size the guest sees, in bytes.
    pub virtual_size: u64,
}

/// A dirty bitmap as QEMU reports it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DirtyBitmapInfo {
    /// The name; internal bitmaps (of block jobs) have none.
    #[serde(default)]
    pub name: Option<String>,
    /// Dirty bytes.
    #[serde(default)]
    pub count: u64,
    /// Bytes per bit.
    pub granularity: u64,
    /// Whether it records new writes (enabled).
    pub recording: bool,
    /// Whether an operation (an export, a job) holds it.
    #[serde(default)]
    pub busy: bool,
    /// Whether it is stored in the image when QEMU closes it.
    #[serde(default)]
    pub persistent: bool,
    /// Whether it may have missed writes (not saved after a crash).
    #[serde(default)]
    pub inconsistent: bool,
}

/// One entry of `query-block-exports`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub struct BlockExportInfo {
    /// The export id.
    pub id: String,
    /// The export type, e.g. `nbd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exported node.
    pub node_name: String,
    /// Whether it is being removed.
    #[serde(default)]
    pub shutting_down: bool,
}

/// One entry of `query-block-jobs`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockJobInfo {
    /// The job id (called `device` for historical reasons).
    pub device: String,
    /// The job type, e.g. `backup`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The job status, e.g. `running`.
    #[serde(default)]
    pub status: String,
    /// The error that ended the job, if it failed.
    #[serde(default)]
    pub error: Option<String>,
}

impl BlockJobInfo {
    /// Whether the job is still doing its work (not ending, ended or
    /// failed).
    pub fn is_alive(&self) -> bool {
        self.error.is_none()
            && matches!(
                self.status.as_str(),
                "created" | "running" | "paused" | "ready" | "standby"
            )
    }
}

/// The block graph (`x-debug-query-block-graph`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockGraph {
    /// Nodes: block drivers, backends (devices, exports) and jobs.
    pub nodes: Vec<BlockGraphNode>,
    /// Parent → child edges.
    pub edges: Vec<BlockGraphEdge>,
}

/// A node of the [`BlockGraph`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockGraphNode {
    /// Graph-local id.
    pub id: u64,
    /// `block-driver`, `block-backend` or `block-job`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Node name (block drivers), backend name or job id; may be empty.
    pub name: String,
}

/// An edge of the [`BlockGraph`].
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct BlockGraphEdge {
    /// The parent's graph id.
    pub parent: u64,
    /// The child's graph id.
    pub child: u64,
    /// The child role, e.g. `file`, `backing`, `root`.
    pub name: String,
}

impl QmpClient {
    /// `query-block`: devices and their media (empty in
    /// qemu-storage-daemon, which has no devices).
    pub fn query_block(&mut self) -> Result<Vec<BlockInfo>> {
        self.execute_as("query-block", Value::Null)
    }

    /// `query-named-block-nodes` (flat): every named node.
    pub fn query_named_block_nodes(&mut self) -> Result<Vec<BlockDeviceInfo>> {
        self.execute_as("query-named-block-nodes", json!({"flat": true}))
    }

    /// `x-debug-query-block-graph`: the only QMP view of which node is
    /// whose child (QEMU 10 has no `children` in node listings).
    pub fn query_block_graph(&mut self) -> Result<BlockGraph> {
        self.execute_as("x-debug-query-block-graph", Value::Null)
    }

    /// `query-block-exports`.
    pub fn query_block_exports(&mut self) -> Result<Vec<BlockExportInfo>> {
        self.execute_as("query-block-exports", Value::Null)
    }

    /// `query-block-jobs`.
    pub fn query_block_jobs(&mut self) -> Result<Vec<BlockJobInfo>> {
        self.execute_as("query-block-jobs", Value::Null)
    }

    /// Adds a dirty bitmap to `node`: `persistent` ones are stored in the
    /// (qcow2) image, `disabled` ones do not record writes.
    pub fn bitmap_add(
        &mut self,
        node: &str,
        name: &str,
        persistent: bool,
        disabled: bool,
    ) -> Result<()> {
        let args =
            json!({"node": node, "name": name, "persistent": persistent, "disabled": disabled});
        self.execute("block-dirty-bitmap-add", args).map(drop)
    }

    /// Removes a dirty bitmap (from the image too, if persistent).
    pub fn bitmap_remove(&mut self, node: &str, name: &str) -> Result<()> {
        let args = json!({"node": node, "name": name});
        self.execute("block-dirty-bitmap-remove", args).map(drop)
    }

    /// Makes a bitmap record writes again.
    pub fn bitmap_enable(&mut self, node: &str, name: &str) -> Result<()> {
        let args = json!({"node": node, "name": name});
        self.execute("block-dirty-bitmap-enable", args).map(drop)
    }

    /// Stops a bitmap from recording writes.
    pub fn bitmap_disable(&mut self, node: &str, name: &str) -> Result<()> {
        let args = json!({"node": node, "name": name});
        self.execute("block-dirty-bitmap-disable", args).map(drop)
    }

    /// Ors the `sources` bitmaps of `node` into `target`.
    pub fn bitmap_merge(&mut self, node: &str, target: &str, sources: &[&str]) -> Result<()> {
        let args = json!({"node": node, "target": target, "bitmaps": sources});
        self.execute("block-dirty-bitmap-merge", args).map(drop)
    }

    /// Starts QEMU's (only) NBD server on a unix socket.
    pub fn nbd_server_start_unix(&mut self, socket: &Path) -> Result<()> {
        let addr = json!({"type": "unix", "data": {"path": socket}});
        self.execute("nbd-server-start", json!({"addr": addr}))
            .map(drop)
    }

    /// Stops QEMU's NBD server (and every export on it).
    pub fn nbd_server_stop(&mut self) -> Result<()> {
        self.execute("nbd-server-stop", Value::Null).map(drop)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_info_parses_qemu_10_output_and_ignores_the_rest() {
        let v = json!({
            "iops_rd": 0, "node-name": "disk0", "drv": "qcow2", "ro": false, "file": "/d.qcow2",
            "image": {"virtual-size": 16777216, "filename": "/d.qcow2", "format": "qcow2",
                      "cluster-size": 65536},
            "dirty-bitmaps": [{"name": "b1", "recording": true, "persistent": true,
                               "busy": false, "granularity": 65536, "count": 0},
                              {"recording": false, "busy": false, "granularity": 65536,
                               "count": 5, "persistent": false}]
        });
        let info: BlockDeviceInfo = serde_json::from_value(v).unwrap();
        assert_eq!(info.node_name.as_deref(), Some("disk0"));
        assert_eq!(info.image.virtual_size, 16 << 20);
        assert_eq!(info.dirty_bitmaps.len(), 2);
        assert!(info.dirty_bitmaps[0].recording && !info.dirty_bitmaps[0].inconsistent);
        assert_eq!(info.dirty_bitmaps[1].name, None);
    }
}
