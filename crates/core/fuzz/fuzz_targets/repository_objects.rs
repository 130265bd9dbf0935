//! Feeds arbitrary bytes to every parser of repository objects: the object
//! envelope (header, authentication, bounded decompression), disk indexes
//! (versions 1, 2 and 3), delta objects,
//! prune lists, pack trailers, footers and pack indexes, and the JSON objects (config, keys, manifests, locks,
//! policies, damage markers, boot reports). None may panic or
//! allocate without bound, whatever a damaged or hostile repository holds.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vbackup_core::crypto::{CipherKind, Crypto, DigestKind, MasterSecret};
use vbackup_storage::Backend;
use vbackup_core::format::{self, delta::Delta, lifecycle, pack, Config, DiskIndex, KeyFile, ObjectKind};

fuzz_target!(|data: &[u8]| {
    let secret = MasterSecret::from_bytes([1u8; 32]);
    for cipher in [CipherKind::None, CipherKind::Aes256Gcm] {
        let crypto = Crypto::new(cipher, DigestKind::Blake3Keyed, Some(&secret));
        for kind in [
            ObjectKind::Chunk,
            ObjectKind::Index,
            ObjectKind::Snapshot,
            ObjectKind::Lock,
            ObjectKind::PruneList,
            ObjectKind::Policy,
            ObjectKind::DamageMarker,
            ObjectKind::PackTrailer,
            ObjectKind::PackIndex,
            ObjectKind::BootReport,
        ] {
            let _ = format::open_object(&crypto, kind, "chunks/00/00", data, 1 << 20);
        }
    }
    // Both index versions; one that decodes encodes back to the same
    // bytes (one encoding per index, so one name).
    if let Ok(index) = DiskIndex::decode("indexes/x", data) {
        assert_eq!(index.encode(), data, "an index has one encoding");
        let _ = index.hole_runs().take(1 << 16).count();
    }
    // A delta that decodes is canonical too, and applies to a base of its
    // length without panicking.
    if let Ok(delta) = Delta::decode("chunks/x", data) {
        assert_eq!(delta.encode(), data, "a delta has one encoding");
        if delta.chunk_len <= 1 << 20 {
            let base = vec![0u8; delta.chunk_len as usize];
            let _ = delta.apply("chunks/x", &base);
        }
    }
    let _ = pack::decode_trailer("packs/x", data, data.len() as u64);
    let _ = pack::decode_pack_index("packindex/x", data);
    if data.len() >= pack::FOOTER_LEN {
        let _ = pack::decode_footer("packs/x", &data[..pack::FOOTER_LEN], data.len() as u64);
    }
    let _ = format::parse_plain_json::<Config>(ObjectKind::Config, "config", data);
    // The whole config check a client makes before trusting any field
    // (versions, ranges, MAC presence): storage may write anything there.
    let backend = vbackup_storage::MemoryBackend::new();
    if backend.put("config", data).is_ok() {
        let _ = vbackup_core::Repository::read_config(&backend);
    }
    let _ = format::parse_plain_json::<KeyFile>(ObjectKind::Key, "keys/x", data);
    let _ = format::parse_snapshot_manifest("snapshots/x", data);
    let _ = lifecycle::PruneList::decode("prune/pending-x", data);
    let _ = serde_json::from_slice::<lifecycle::LockFile>(data);
    let _ = serde_json::from_slice::<lifecycle::PolicyFile>(data);
    let _ = serde_json::from_slice::<lifecycle::DamageMarker>(data);
    let _ = serde_json::from_slice::<vbackup_core::boot_report::BootReport>(data);
});
