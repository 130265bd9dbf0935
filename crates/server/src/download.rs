//! Streaming object replies: a get reads its file in pieces while the
//! client takes them, so a reply holds at most a few pieces in memory
//! however large the object or however many clients read at once (and a
//! client that stops reading is cut off by [`crate::stall`]).

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use axum::body::{Body, Bytes};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use vbackup_protocol::OBJECT_SIZE_HEADER;
use vbackup_storage::{ErrorKind, StorageError};

use crate::api::ApiError;

/// Bytes read from the file per piece.
const PIECE: usize = 256 << 10;

/// Pieces read ahead of the network.
const PIECES_AHEAD: usize = 2;

/// An open object and the part of it to send.
struct Part {
    file: File,
    size: u64,
    start: u64,
    length: u64,
}

/// Opens `path` (object `key`) and clamps the range `offset`, `length`
/// to it.
fn open(path: &Path, key: &str, offset: u64, length: u64) -> Result<Part, StorageError> {
    let not_found = || StorageError::new(ErrorKind::NotFound, key, "not found");
    let io = |e: std::io::Error| StorageError::from_io(key, "reading the object", e);
    let mut file = File::open(path).map_err(io)?;
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(not_found());
    }
    let size = meta.len();
    let start = offset.min(size);
    let length = length.min(size - start);
    file.seek(SeekFrom::Start(start)).map_err(io)?;
    Ok(Part {
        file,
        size,
        start,
        length,
    })
}

/// Sends `length` bytes of `part` in pieces; stops when the reply is
/// dropped. A short file cuts the stream, which the client notices
/// against `Content-Length`.
fn pump(part: Part, tx: &tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>) {
    let mut reader = part.file.take(part.length);
    loop {
        let mut piece = vec![0u8; PIECE];
        let item = match reader.read(&mut piece) {
            Ok(0) => return,
            Ok(n) => {
                piece.truncate(n);
                Ok(Bytes::from(piece))
            }
            Err(e) => Err(e),
        };
        let failed = item.is_err();
        if tx.blocking_send(item).is_err() || failed {
            return;
        }
    }
}

/// The reply to a get of object `key` stored at `path`: the whole object,
/// or with `ranged` the bytes `offset..offset+length` (fewer at its end)
/// and the object's size in [`OBJECT_SIZE_HEADER`].
pub(crate) async fn object_reply(
    path: std::path::PathBuf,
    key: String,
    ranged: Option<(u64, u64)>,
) -> Result<Response, ApiError> {
    let (offset, length) = ranged.unwrap_or((0, u64::MAX));
    let part = tokio::task::spawn_blocking(move || open(&path, &key, offset, length))
        .await
        .map_err(|e| ApiError::internal(format!("request worker failed: {e}")))??;
    let (size, length) = (part.size, part.length);
    debug_assert!(part.start + length <= size);
    let (tx, rx) = tokio::sync::mpsc::channel(PIECES_AHEAD);
    tokio::task::spawn_blocking(move || pump(part, &tx));
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let mut response = Body::from_stream(stream).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/octet-stream"),
    );
    headers.insert(header::CONTENT_LENGTH, header::HeaderValue::from(length));
    if ranged.is_some() {
        headers.insert(OBJECT_SIZE_HEADER, header::HeaderValue::from(size));
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use http_body_util::BodyExt;

    async fn body_of(response: Response) -> Vec<u8> {
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn objects_stream_whole_or_in_ranges() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("obj");
        let data: Vec<u8> = (0..(PIECE * 3 + 17)).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let whole = object_reply(path.clone(), "obj".into(), None)
            .await
            .unwrap();
        assert_eq!(
            whole.headers()[header::CONTENT_LENGTH],
            data.len().to_string()
        );
        assert_eq!(body_of(whole).await, data);
        let part = object_reply(path.clone(), "obj".into(), Some((5, 10)))
            .await
            .unwrap();
        assert_eq!(part.headers()[OBJECT_SIZE_HEADER], data.len().to_string());
        assert_eq!(body_of(part).await, &data[5..15]);
        // Ranges are clamped to the object, however large they claim to be.
        let tail = object_reply(
            path.clone(),
            "obj".into(),
            Some((data.len() as u64 - 3, u64::MAX)),
        )
        .await
        .unwrap();
        assert_eq!(body_of(tail).await, &data[data.len() - 3..]);
        let past = object_reply(path.clone(), "obj".into(), Some((u64::MAX, u64::MAX)))
            .await
            .unwrap();
        assert!(body_of(past).await.is_empty());
        let missing = object_reply(dir.path().join("none"), "none".into(), None).await;
        assert!(missing.is_err());
        let folder = object_reply(dir.path().to_path_buf(), "dir".into(), None).await;
        assert!(folder.is_err());
    }
}
