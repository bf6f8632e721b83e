//! Client-side encryption with [age](https://age-encryption.org): a stage of
//! the backup pipeline after compression and before the store, and its
//! inverse when reading back.
//!
//! An encrypted backup's archive is one standard age file
//! (`<id>.tar.gz.age`), so `age -d -i key.txt <id>.tar.gz.age | tar xz`
//! opens it by hand; its sidecar manifest is sealed the same way. Backing
//! up needs only the recipients (public keys); verify, restore, export and
//! show need an identity (private key) of one of them. No filesystem here:
//! the host reads the identity file and hands its text to
//! [`Identities::parse`].

use std::fmt;
use std::io::{self, Read, Write};
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::io::{StreamReader, SyncIoBridge};

use crate::error::Error;
use crate::id::BackupId;
use crate::ports::ByteStream;

/// Bytes read from the plaintext or ciphertext per step, and the size of
/// the chunks passed on (age itself works in 64 KiB chunks).
const CHUNK: usize = 1024 * 1024;
/// Chunks in flight between the crypto thread and the async side.
const DEPTH: usize = 4;

/// Any age recipient we accept, boxed.
type BoxRecipient = Box<dyn age::Recipient + Send + Sync>;
/// Any age identity we accept, boxed.
type BoxIdentity = Box<dyn age::Identity + Send + Sync>;

/// Parses one recipient: an age X25519 public key (`age1…`) or an OpenSSH
/// `ssh-ed25519` / `ssh-rsa` public key. Returns it with its canonical
/// spelling (what manifests record; an ssh key without its comment).
///
/// # Errors
/// What is wrong with the string, in words.
pub fn parse_recipient(text: &str) -> Result<(BoxRecipient, String), String> {
    let text = text.trim();
    if text.starts_with("age1") {
        let r: age::x25519::Recipient = text
            .parse()
            .map_err(|e| format!("{text:?} is not a valid age recipient ({e})"))?;
        let name = r.to_string();
        Ok((Box::new(r), name))
    } else if text.starts_with("ssh-") {
        use age::ssh::ParseRecipientKeyError as E;
        let r: age::ssh::Recipient = text.parse().map_err(|e| match e {
            E::RsaModulusTooSmall => "the ssh-rsa key is shorter than 2048 bits".to_owned(),
            E::RsaModulusTooLarge => "the ssh-rsa key is too large".to_owned(),
            E::Unsupported(kind) => {
                format!("{kind} keys are not supported; use ssh-ed25519, ssh-rsa or an age key")
            }
            _ => format!("{:?} is not a valid ssh public key", short(text)),
        })?;
        let name = r.to_string();
        Ok((Box::new(r), name))
    } else {
        Err(format!(
            "{:?} is neither an age recipient (age1…) nor an ssh-ed25519/ssh-rsa public key",
            short(text)
        ))
    }
}

/// The first characters of `text`, for messages (never a whole secret).
fn short(text: &str) -> String {
    let mut s: String = text.chars().take(24).collect();
    if text.chars().count() > 24 {
        s.push('…');
    }
    s
}

/// The public keys new backups are encrypted to.
#[derive(Clone)]
pub struct Recipients {
    keys: Arc<[BoxRecipient]>,
    names: Vec<String>,
}

impl fmt::Debug for Recipients {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Recipients").field(&self.names).finish()
    }
}

impl Recipients {
    /// Parses a non-empty list of recipients.
    ///
    /// # Errors
    /// The index of the first bad entry and what is wrong with it
    /// (`None` for an empty list).
    pub fn parse(list: &[String]) -> Result<Recipients, (Option<usize>, String)> {
        if list.is_empty() {
            return Err((None, "at least one recipient is needed".into()));
        }
        let mut keys = Vec::with_capacity(list.len());
        let mut names = Vec::with_capacity(list.len());
        for (i, text) in list.iter().enumerate() {
            let (key, name) = parse_recipient(text).map_err(|e| (Some(i), e))?;
            if names.contains(&name) {
                return Err((Some(i), format!("{} is listed twice", short(&name))));
            }
            keys.push(key);
            names.push(name);
        }
        Ok(Recipients {
            keys: keys.into(),
            names,
        })
    }

    /// Their canonical spellings, in the configured order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    fn encryptor(&self) -> io::Result<age::Encryptor> {
        age::Encryptor::with_recipients(self.keys.iter().map(|k| k.as_ref() as &dyn age::Recipient))
            .map_err(|e| io::Error::other(format!("age encryption: {e}")))
    }
}

/// A new age X25519 identity: the text of its identity file (as
/// `age-keygen` writes it: a comment with the public key, then the
/// secret key) and its recipient.
pub fn generate_identity() -> (String, String) {
    use age::secrecy::ExposeSecret;
    let identity = age::x25519::Identity::generate();
    let public = identity.to_public().to_string();
    let text = format!(
        "# synthorg-backup identity: keep a copy somewhere safe; without it no backup encrypted to it can be restored\n# public key: {public}\n{}\n",
        identity.to_string().expose_secret()
    );
    (text, public)
}

/// The private keys of one identity file.
pub struct Identities {
    file: String,
    keys: Vec<BoxIdentity>,
    publics: Vec<String>,
}

impl fmt::Debug for Identities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identities")
            .field("file", &self.file)
            .field("publics", &self.publics)
            .finish_non_exhaustive()
    }
}

impl Identities {
    /// Parses the text of the identity file `file` (named in messages):
    /// one or more age identities (`AGE-SECRET-KEY-1…`, one per line, `#`
    /// comments allowed, as `age-keygen` writes them), or one unencrypted
    /// OpenSSH private key (ed25519 or RSA).
    ///
    /// # Errors
    /// What is wrong, naming the file and line; never the key itself.
    pub fn parse(text: &str, file: &str) -> Result<Identities, String> {
        if text.trim_start().starts_with("-----BEGIN") {
            return Self::parse_ssh(text, file);
        }
        let mut keys: Vec<BoxIdentity> = Vec::new();
        let mut publics = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let identity: age::x25519::Identity = line.parse().map_err(|_| {
                format!(
                    "{file}, line {}: not an age identity (expected AGE-SECRET-KEY-1…, as age-keygen or `synthorg key generate` writes)",
                    n + 1
                )
            })?;
            publics.push(identity.to_public().to_string());
            keys.push(Box::new(identity));
        }
        if keys.is_empty() {
            return Err(format!("{file} holds no identity"));
        }
        Ok(Identities {
            file: file.to_owned(),
            keys,
            publics,
        })
    }

    fn parse_ssh(text: &str, file: &str) -> Result<Identities, String> {
        let identity = age::ssh::Identity::from_buffer(text.as_bytes(), Some(file.to_owned()))
            .map_err(|e| format!("{file}: not a usable ssh private key ({e})"))?;
        match identity {
            age::ssh::Identity::Unencrypted(_) => Ok(Identities {
                file: file.to_owned(),
                keys: vec![Box::new(identity)],
                publics: Vec::new(),
            }),
            age::ssh::Identity::Encrypted(_) => Err(format!(
                "{file} is a passphrase-protected ssh key; an unattended host cannot unlock it (use an age identity, or an ssh key without a passphrase)"
            )),
            age::ssh::Identity::Unsupported(_) => Err(format!(
                "{file} is an ssh key of a type age does not support (use ssh-ed25519, ssh-rsa or an age identity)"
            )),
        }
    }

    /// The identity file, as named in messages.
    pub fn file(&self) -> &str {
        &self.file
    }

    /// The public keys of the age identities (empty for an ssh key).
    pub fn publics(&self) -> &[String] {
        &self.publics
    }

    fn iter(&self) -> impl Iterator<Item = &dyn age::Identity> {
        self.keys.iter().map(|k| k.as_ref() as &dyn age::Identity)
    }

    /// Whether these identities decrypt what is encrypted to `recipient`
    /// (tried on a probe; works for every key type).
    pub fn opens(&self, recipient: &str) -> bool {
        Recipients::parse(&[recipient.to_owned()])
            .ok()
            .and_then(|r| seal(b"probe", &r).ok())
            .is_some_and(|sealed| self.open(&sealed).is_ok())
    }

    /// Decrypts a whole small age file (a sealed sidecar manifest).
    ///
    /// # Errors
    /// As age reports it.
    pub fn open(&self, sealed: &[u8]) -> Result<Vec<u8>, age::DecryptError> {
        let mut reader = age::Decryptor::new_buffered(sealed)?.decrypt(self.iter())?;
        let mut out = Vec::new();
        reader.read_to_end(&mut out)?;
        Ok(out)
    }
}

/// Encrypts a small object whole (a sidecar manifest) to `recipients`.
///
/// # Errors
/// A recipient age refuses (e.g. mixing kinds that may not be mixed).
pub fn seal(plain: &[u8], recipients: &Recipients) -> io::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(plain.len() + 512);
    let mut writer = recipients.encryptor()?.wrap_output(&mut out)?;
    writer.write_all(plain)?;
    writer.finish()?;
    Ok(out)
}

/// A `Write` that passes what it is given on as chunks of a channel.
struct ChannelWriter {
    tx: mpsc::Sender<io::Result<Bytes>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: mpsc::Sender<io::Result<Bytes>>) -> ChannelWriter {
        ChannelWriter {
            tx,
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK)));
        self.tx
            .blocking_send(Ok(chunk))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader stopped"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= CHUNK {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send()
    }
}

/// A stream of what `rx` receives.
pub(crate) fn receiver_stream(mut rx: mpsc::Receiver<io::Result<Bytes>>) -> ByteStream {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx)).boxed()
}

/// Reads `reader` to its end in [`CHUNK`]s, passing each on.
fn pump(mut reader: impl Read, out: &mut impl Write) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = reader.read(&mut buf)?;
        if n == 0 {
            return Ok(());
        }
        out.write_all(&buf[..n])?;
    }
}

/// Encrypts a stream to `recipients` as one age file, on a blocking
/// thread (ChaCha20-Poly1305 in 64 KiB chunks), in bounded memory. An
/// error of the input is passed on, so the store aborts the object.
///
/// Must be called within a tokio runtime.
pub fn encrypt(input: ByteStream, recipients: Recipients) -> ByteStream {
    let (tx, rx) = mpsc::channel(DEPTH);
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let reader = SyncIoBridge::new_with_handle(StreamReader::new(input), handle);
        let mut out = ChannelWriter::new(tx.clone());
        let result = recipients
            .encryptor()
            .and_then(|e| e.wrap_output(&mut out))
            .and_then(|mut writer| {
                pump(reader, &mut writer)?;
                writer.finish()?;
                Ok(())
            })
            .and_then(|()| out.flush());
        if let Err(e) = result {
            let _ = tx.blocking_send(Err(e));
        }
    });
    receiver_stream(rx)
}

/// Decrypts a stream holding one age file with `identities`, on a
/// blocking thread, in bounded memory. Resolves once the header is read
/// and a key unwrapped; the plaintext stream fails where the ciphertext
/// does not authenticate (damage, tampering, truncation) or the input
/// fails.
///
/// # Errors
/// The header cannot be read or no identity matches.
pub async fn decrypt(
    input: ByteStream,
    identities: Arc<Identities>,
) -> Result<ByteStream, age::DecryptError> {
    let (tx, rx) = mpsc::channel(DEPTH);
    let (head_tx, head_rx) = oneshot::channel();
    let handle = tokio::runtime::Handle::current();
    tokio::task::spawn_blocking(move || {
        let bridge = SyncIoBridge::new_with_handle(StreamReader::new(input), handle);
        let reader = io::BufReader::with_capacity(256 * 1024, bridge);
        let opened =
            age::Decryptor::new_buffered(reader).and_then(|d| d.decrypt(identities.iter()));
        let plain = match opened {
            Ok(plain) => {
                let _ = head_tx.send(Ok(()));
                plain
            }
            Err(e) => {
                let _ = head_tx.send(Err(e));
                return;
            }
        };
        let mut out = ChannelWriter::new(tx.clone());
        if let Err(e) = pump(plain, &mut out).and_then(|()| out.flush()) {
            let _ = tx.blocking_send(Err(e));
        }
    });
    match head_rx.await {
        Ok(Ok(())) => Ok(receiver_stream(rx)),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(age::DecryptError::Io(io::Error::other(
            "the decryption thread stopped",
        ))),
    }
}

/// The configured identity, as far as the host could load it.
#[derive(Debug, Clone, Default)]
pub enum IdentityState {
    /// `backup.encryption.identity_file` is not set.
    #[default]
    None,
    /// It is set but could not be read or parsed; backups still work,
    /// decrypting fails with this reason.
    Unavailable {
        /// The file, as configured.
        file: String,
        /// Why.
        reason: String,
    },
    /// Loaded.
    Loaded(Arc<Identities>),
}

/// Problems with the keys an operator should hear about now rather than
/// on the day of a restore: an identity that cannot be loaded, or
/// recipients none of which the identity can decrypt.
pub fn key_warnings(identity: &IdentityState, recipients: Option<&Recipients>) -> Vec<String> {
    match (identity, recipients) {
        (IdentityState::Unavailable { file, reason }, _) => vec![format!(
            "the identity file {file} cannot be used ({reason}): encrypted backups cannot be verified or restored on this host"
        )],
        (IdentityState::Loaded(ids), Some(r)) if !r.names().iter().any(|n| ids.opens(n)) => {
            vec![format!(
                "none of the configured recipients ({}) matches the identity in {}{}: new backups cannot be decrypted with it",
                r.names().join(", "),
                ids.file(),
                describe_publics(ids)
            )]
        }
        _ => Vec::new(),
    }
}

/// The error for a sidecar of backup `id` (encrypted to `made_for`) that
/// `identities` do not open: a key error when they are not among its
/// recipients, damage when they are (or the file is not a valid age file).
pub(crate) fn open_failure(
    id: &BackupId,
    made_for: &[String],
    identities: &Identities,
    e: &age::DecryptError,
) -> Error {
    let mine = identities.publics().iter().any(|p| made_for.contains(p));
    match e {
        age::DecryptError::NoMatchingKeys if !mine => Error::Key {
            id: id.to_string(),
            reason: format!(
                "it is encrypted to {}; the identity file {}{} is not one of them",
                if made_for.is_empty() {
                    "recipients its summary does not name".to_owned()
                } else {
                    made_for.join(", ")
                },
                identities.file(),
                describe_publics(identities)
            ),
        },
        e => Error::Manifest {
            id: id.to_string(),
            source: crate::manifest::ManifestError::Inconsistent(format!(
                "the encrypted sidecar does not open ({e}): damaged or replaced"
            )),
        },
    }
}

/// ` (age1…, …)`: the identity's public keys, for messages.
pub fn describe_publics(ids: &Identities) -> String {
    if ids.publics().is_empty() {
        String::new()
    } else {
        format!(" (public key {})", ids.publics().join(", "))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key() -> (String, String) {
        let id = age::x25519::Identity::generate();
        use age::secrecy::ExposeSecret;
        (
            id.to_string().expose_secret().to_owned(),
            id.to_public().to_string(),
        )
    }

    #[test]
    fn recipients_are_parsed_with_reasons() {
        let (_, public) = key();
        assert!(Recipients::parse(std::slice::from_ref(&public)).is_ok());
        let (i, why) = Recipients::parse(&[public.clone(), "age1nope".into()]).unwrap_err();
        assert_eq!(i, Some(1));
        assert!(why.contains("not a valid age recipient"), "{why}");
        let (i, why) = Recipients::parse(&[public.clone(), public.clone()]).unwrap_err();
        assert_eq!(i, Some(1));
        assert!(why.contains("twice"), "{why}");
        assert_eq!(Recipients::parse(&[]).unwrap_err().0, None);
        let why = parse_recipient("AGE-SECRET-KEY-1QQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQQ")
            .err()
            .unwrap();
        assert!(!why.contains("QQQQQQQQQQQQQQQQQQQQQQQQQQ"), "{why}");
    }

    #[test]
    fn generated_identities_open_what_is_sealed_to_their_recipient() {
        let (text, public) = generate_identity();
        let ids = Identities::parse(&text, "k").unwrap();
        assert_eq!(ids.publics(), std::slice::from_ref(&public));
        let r = Recipients::parse(&[public]).unwrap();
        assert_eq!(ids.open(&seal(b"x", &r).unwrap()).unwrap(), b"x");
    }

    #[test]
    fn identity_files_are_parsed_with_line_numbers() {
        let (secret, public) = key();
        let ids = Identities::parse(
            &format!("# created: now\n# public key: {public}\n{secret}\n"),
            "k.txt",
        )
        .unwrap();
        assert_eq!(ids.publics(), std::slice::from_ref(&public));
        assert!(ids.opens(&public));
        assert!(!ids.opens(&key().1));
        let e = Identities::parse(&format!("{secret}\nAGE-SECRET-KEY-1X\n"), "k.txt").unwrap_err();
        assert!(e.contains("k.txt, line 2"), "{e}");
        assert!(!e.contains(&secret), "{e}");
        assert!(Identities::parse("# nothing\n", "k.txt").is_err());
    }

    #[test]
    fn small_objects_round_trip_and_refuse_other_keys() {
        let (secret, public) = key();
        let r = Recipients::parse(std::slice::from_ref(&public)).unwrap();
        let sealed = seal(b"{\"files\":[]}", &r).unwrap();
        assert!(sealed.starts_with(b"age-encryption.org/v1"));
        let ids = Identities::parse(&secret, "k").unwrap();
        assert_eq!(ids.open(&sealed).unwrap(), b"{\"files\":[]}");
        let other = Identities::parse(&key().0, "o").unwrap();
        assert!(matches!(
            other.open(&sealed),
            Err(age::DecryptError::NoMatchingKeys)
        ));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn streams_round_trip_and_detect_damage() {
        let (secret, public) = key();
        let r = Recipients::parse(&[public]).unwrap();
        let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        let input: ByteStream = futures::stream::iter(
            data.chunks(300_000)
                .map(|c| Ok(Bytes::copy_from_slice(c)))
                .collect::<Vec<_>>(),
        )
        .boxed();
        let sealed: Vec<u8> = encrypt(input, r)
            .map(|c| c.unwrap().to_vec())
            .concat()
            .await;
        let ids = Arc::new(Identities::parse(&secret, "k").unwrap());
        let open = |bytes: Vec<u8>| {
            let ids = Arc::clone(&ids);
            async move {
                let s: ByteStream = futures::stream::iter(vec![Ok(Bytes::from(bytes))]).boxed();
                let mut out = Vec::new();
                let mut plain = decrypt(s, ids).await.map_err(|e| e.to_string())?;
                while let Some(c) = plain.next().await {
                    out.extend_from_slice(&c.map_err(|e| e.to_string())?);
                }
                Ok::<_, String>(out)
            }
        };
        assert_eq!(open(sealed.clone()).await.unwrap(), data);
        let mut flipped = sealed.clone();
        let at = flipped.len() / 2;
        flipped[at] ^= 1;
        assert!(open(flipped).await.is_err());
        assert!(
            open(sealed[..sealed.len() - 70_000].to_vec())
                .await
                .is_err()
        );
    }
}
