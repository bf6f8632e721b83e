//! SHA-256 digests as they appear in manifests: plain lowercase hex for file
//! and archive hashes, `sha256:<hex>` for the manifest [`Checksum`]; and
//! the BLAKE3 digests of archive members ([`Blake3Digest`]).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest as _, Sha256};

/// A SHA-256 digest, shown and stored as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Sha256Digest([u8; 32]);

/// A string that is not a 64-digit lowercase hex SHA-256, or a checksum
/// without its `sha256:` prefix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid digest {0:?}: expected 64 lowercase hex digits")]
pub struct DigestError(String);

impl Sha256Digest {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Sha256Digest {
        Sha256Digest(bytes)
    }

    /// Hashes a byte slice at once.
    pub fn of(data: &[u8]) -> Sha256Digest {
        Sha256Digest(Sha256::digest(data).into())
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Incremental hashing for streams; `finish` gives the [`Sha256Digest`].
#[derive(Clone, Default)]
pub struct Sha256Hasher(Sha256);

impl Sha256Hasher {
    /// A hasher over no bytes yet.
    pub fn new() -> Sha256Hasher {
        Sha256Hasher(Sha256::new())
    }

    /// Feeds bytes.
    pub fn update(&mut self, data: &[u8]) {
        self.0.update(data);
    }

    /// The digest of everything fed so far.
    pub fn finish(self) -> Sha256Digest {
        Sha256Digest(self.0.finalize().into())
    }
}

/// SHA-256 on a thread of its own, fed in order: the caller's thread
/// (which parses, checks and passes the data on) does not also hash it.
/// At most [`BackgroundHash::QUEUE`] chunks wait.
pub struct BackgroundHash {
    tx: tokio::sync::mpsc::Sender<bytes::Bytes>,
    thread: std::thread::JoinHandle<(Sha256Digest, u64)>,
}

impl BackgroundHash {
    /// Chunks queued at most.
    pub const QUEUE: usize = 16;

    /// Starts the thread.
    ///
    /// # Errors
    /// The thread could not be started.
    pub fn start() -> std::io::Result<BackgroundHash> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(Self::QUEUE);
        let thread = std::thread::Builder::new()
            .name("synthorg-hash".into())
            .spawn(move || {
                let mut hasher = Sha256Hasher::new();
                let mut size = 0u64;
                while let Some(chunk) = rx.blocking_recv() {
                    hasher.update(&chunk);
                    size += chunk.len() as u64;
                }
                (hasher.finish(), size)
            })?;
        Ok(BackgroundHash { tx, thread })
    }

    /// A sender for the bytes to hash, in order (for streams that feed it).
    pub fn sender(&self) -> tokio::sync::mpsc::Sender<bytes::Bytes> {
        self.tx.clone()
    }

    /// Feeds bytes (waits while the queue is full).
    pub async fn update(&self, chunk: bytes::Bytes) {
        // The thread only stops once every sender is gone.
        let _ = self.tx.send(chunk).await;
    }

    /// The digest and size of everything fed, once every sender is gone.
    ///
    /// # Errors
    /// The thread panicked.
    pub async fn finish(self) -> std::io::Result<(Sha256Digest, u64)> {
        drop(self.tx);
        let thread = self.thread;
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("the hashing thread panicked"))
    }
}

impl fmt::Debug for Sha256Hasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Sha256Hasher")
    }
}

/// The 64 lowercase hex digits of 32 bytes, without the formatting
/// machinery (a manifest writes and reads one per file: 15,000 for the
/// demo, and two per archive member).
fn write_hex(bytes: &[u8; 32], f: &mut fmt::Formatter<'_>) -> fmt::Result {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = [0u8; 64];
    for (pair, b) in out.chunks_exact_mut(2).zip(bytes) {
        pair[0] = DIGITS[usize::from(b >> 4)];
        pair[1] = DIGITS[usize::from(b & 0x0f)];
    }
    f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
}

/// 32 bytes from 64 lowercase hex digits.
fn parse_hex(s: &str) -> Result<[u8; 32], DigestError> {
    let err = || DigestError(s.chars().take(80).collect());
    if s.len() != 64 {
        return Err(err());
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks_exact(2).enumerate() {
        let hi = hex_value(pair[0]).ok_or_else(err)?;
        let lo = hex_value(pair[1]).ok_or_else(err)?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(&self.0, f)
    }
}

/// A BLAKE3 digest (32 bytes), shown as 64 lowercase hex digits: what
/// identifies an archive member's content and its stored bytes (the
/// pieces object, see `manifest::PieceDigest`). BLAKE3 because every backup hashes every member
/// twice besides the files' SHA-256: on this machine (SHA-NI, AVX-512)
/// it hashes 32 KiB pieces several times faster than SHA-256.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Blake3Digest([u8; 32]);

impl Blake3Digest {
    /// Wraps raw digest bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Blake3Digest {
        Blake3Digest(bytes)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Hashes a byte slice.
    pub fn of(data: &[u8]) -> Blake3Digest {
        Blake3Digest(*blake3::hash(data).as_bytes())
    }
}

impl fmt::Display for Blake3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(&self.0, f)
    }
}

impl fmt::Debug for Blake3Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Blake3Digest({self})")
    }
}

impl Serialize for Blake3Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Blake3Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl FromStr for Blake3Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s).map(Blake3Digest)
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sha256Digest({self})")
    }
}

impl FromStr for Sha256Digest {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s).map(Sha256Digest)
    }
}

fn hex_value(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // Parsed from the input's str, without a String per file entry.
        struct Hex;
        impl serde::de::Visitor<'_> for Hex {
            type Value = Sha256Digest;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("64 lowercase hex digits")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Sha256Digest, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_str(Hex)
    }
}

/// The manifest checksum: a SHA-256 written as `sha256:<hex>`. See
/// [`crate::manifest::tree_checksum`] for what it covers.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Checksum(pub Sha256Digest);

impl fmt::Display for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", self.0)
    }
}

impl fmt::Debug for Checksum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Checksum({self})")
    }
}

impl FromStr for Checksum {
    type Err = DigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| DigestError(s.chars().take(80).collect()))?;
        Ok(Checksum(hex.parse()?))
    }
}

impl Serialize for Checksum {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Checksum {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(deserializer)?;
        raw.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_background_hash_is_the_hash_of_everything_fed_in_order() {
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let hash = BackgroundHash::start().unwrap();
        let sender = hash.sender();
        // More chunks than the queue holds, through both ways of feeding.
        for (i, chunk) in data.chunks(10_007).enumerate() {
            let chunk = bytes::Bytes::copy_from_slice(chunk);
            if i % 2 == 0 {
                hash.update(chunk).await;
            } else {
                sender.send(chunk).await.unwrap();
            }
        }
        drop(sender);
        let (digest, size) = hash.finish().await.unwrap();
        assert_eq!(size, data.len() as u64);
        assert_eq!(digest, Sha256Digest::of(&data));
        let (empty, n) = BackgroundHash::start().unwrap().finish().await.unwrap();
        assert_eq!((empty, n), (Sha256Digest::of(b""), 0));
    }

    #[test]
    fn known_vector_and_round_trip() {
        let d = Sha256Digest::of(b"abc");
        assert_eq!(
            d.to_string(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(d.to_string().parse::<Sha256Digest>().unwrap(), d);
        let mut h = Sha256Hasher::new();
        h.update(b"a");
        h.update(b"bc");
        assert_eq!(h.finish(), d);
        let c = Checksum(d);
        assert_eq!(c.to_string().parse::<Checksum>().unwrap(), c);
    }

    #[test]
    fn rejects_bad_hex() {
        for s in ["", "abc", &"A".repeat(64), &"g".repeat(64), &"0".repeat(65)] {
            assert!(s.parse::<Sha256Digest>().is_err(), "{s}");
        }
        assert!("md5:00".parse::<Checksum>().is_err());
        assert!("0".repeat(64).parse::<Checksum>().is_err());
    }
}
