//! Storage faults under delta-rs: a `faulty://` table location is the local directory
//! of the same path, reached through an object store that fails or slows writes while
//! a test says so. Registered once per test process.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::Path as FsPath;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use async_trait::async_trait;
use deltalake::DeltaResult;
use deltalake::logstore::{LogStore, LogStoreFactory, ObjectStoreFactory, StorageConfig, default_logstore};
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use url::Url;

/// Switches a test flips while a worker writes.
#[derive(Debug, Default)]
pub struct StorageFaults {
    /// Every write fails, as on a read-only or full disk.
    pub fail_writes: AtomicBool,
    /// Only commits (`_delta_log/*.json`) fail: data files are written and left behind.
    pub fail_commits: AtomicBool,
    /// Each commit (`_delta_log/*.json` write) waits this long first: slow storage.
    /// A commit already waiting sees a change at once.
    pub commit_delay_ms: AtomicU64,
    /// Writes refused so far.
    pub refused: AtomicU64,
    /// Commits that waited for `commit_delay_ms` so far (counted when the wait starts).
    pub delayed: AtomicU64,
    /// The next commit waits for this to be notified (the gate is taken by that commit
    /// alone): a write held between its data files and its commit.
    pub hold_next_commit: Mutex<Option<Arc<tokio::sync::Notify>>>,
    /// Commits that waited at a hold so far (counted when the wait starts).
    pub held: AtomicU64,
}

impl StorageFaults {
    /// Holds the next commit until the returned gate is notified.
    pub fn hold_next_commit(&self) -> Arc<tokio::sync::Notify> {
        let gate = Arc::new(tokio::sync::Notify::new());
        *self.hold_next_commit.lock().expect("hold") = Some(gate.clone());
        gate
    }
}

impl StorageFaults {
    /// Lets every write through again.
    pub fn heal(&self) {
        self.fail_writes.store(false, Ordering::SeqCst);
        self.fail_commits.store(false, Ordering::SeqCst);
        self.commit_delay_ms.store(0, Ordering::SeqCst);
    }
}

fn registry() -> &'static Mutex<HashMap<String, Arc<StorageFaults>>> {
    static REGISTRY: OnceLock<Mutex<HashMap<String, Arc<StorageFaults>>>> = OnceLock::new();
    REGISTRY.get_or_init(|| {
        let scheme = Url::parse("faulty://").expect("url");
        deltalake::logstore::object_store_factories().insert(scheme.clone(), Arc::new(FaultyFactory));
        deltalake::logstore::logstore_factories().insert(scheme, Arc::new(FaultyFactory));
        Mutex::default()
    })
}

/// The `faulty://` URI of a table at `path`, and the switches of every table whose path
/// starts with it (so `<path>_dead_letters` shares them, like one disk).
pub fn faulty_table(path: &FsPath) -> (String, Arc<StorageFaults>) {
    let faults = Arc::new(StorageFaults::default());
    let root = path.display().to_string();
    registry().lock().expect("registry").insert(root.clone(), faults.clone());
    (format!("faulty://{root}"), faults)
}

fn faults_for(url: &Url) -> Arc<StorageFaults> {
    let path = url.path();
    let registry = registry().lock().expect("registry");
    registry
        .iter()
        .filter(|(root, _)| path.starts_with(root.as_str()))
        .max_by_key(|(root, _)| root.len())
        .map(|(_, f)| f.clone())
        .unwrap_or_default()
}

struct FaultyFactory;

impl ObjectStoreFactory for FaultyFactory {
    fn parse_url_opts(&self, url: &Url, config: &StorageConfig) -> DeltaResult<(Arc<dyn ObjectStore>, Path)> {
        let file_url = Url::parse(&format!("file://{}", url.path())).expect("file url");
        let (store, path) = object_store::parse_url_opts(&file_url, &config.raw)?;
        Ok((Arc::new(FaultyStore { inner: Arc::from(store), faults: faults_for(url) }), path))
    }
}

impl LogStoreFactory for FaultyFactory {
    fn with_options(
        &self,
        prefixed_store: Arc<dyn ObjectStore>,
        root_store: Arc<dyn ObjectStore>,
        location: &Url,
        options: &StorageConfig,
    ) -> DeltaResult<Arc<dyn LogStore>> {
        Ok(default_logstore(prefixed_store, root_store, location, options))
    }
}

#[derive(Debug)]
struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<StorageFaults>,
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

impl FaultyStore {
    async fn check_write(&self, location: &Path) -> Result<()> {
        let is_commit = location.as_ref().contains("_delta_log/") && location.as_ref().ends_with(".json");
        let gate = if is_commit { self.faults.hold_next_commit.lock().expect("hold").take() } else { None };
        if let Some(gate) = gate {
            self.faults.held.fetch_add(1, Ordering::SeqCst);
            gate.notified().await;
        }
        let delay = self.faults.commit_delay_ms.load(Ordering::SeqCst);
        if is_commit && delay > 0 {
            self.faults.delayed.fetch_add(1, Ordering::SeqCst);
            // The wait follows the switch: lowering it lets a waiting commit through.
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_millis(self.faults.commit_delay_ms.load(Ordering::SeqCst)) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        if self.faults.fail_writes.load(Ordering::SeqCst)
            || (is_commit && self.faults.fail_commits.load(Ordering::SeqCst))
        {
            self.faults.refused.fetch_add(1, Ordering::SeqCst);
            return Err(object_store::Error::Generic {
                store: "FaultyStore",
                source: Box::new(std::io::Error::new(
                    std::io::ErrorKind::StorageFull,
                    "No space left on device (injected)",
                )),
            });
        }
        Ok(())
    }
}

/// Lists in path order, as object stores do: the Delta kernel relies on it for any
/// scheme but `file://` (whose listings it sorts itself).
fn sorted(listing: BoxStream<'static, Result<ObjectMeta>>) -> BoxStream<'static, Result<ObjectMeta>> {
    use futures::StreamExt;
    futures::stream::once(async move {
        let mut all: Vec<Result<ObjectMeta>> = listing.collect().await;
        all.sort_by(|a, b| match (a, b) {
            (Ok(a), Ok(b)) => a.location.cmp(&b.location),
            _ => std::cmp::Ordering::Equal,
        });
        futures::stream::iter(all)
    })
    .flatten()
    .boxed()
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.check_write(location).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.check_write(location).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<bytes::Bytes>> {
        self.inner.get_ranges(location, ranges).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        sorted(self.inner.list(prefix))
    }

    fn list_with_offset(&self, prefix: Option<&Path>, offset: &Path) -> BoxStream<'static, Result<ObjectMeta>> {
        sorted(self.inner.list_with_offset(prefix, offset))
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.check_write(to).await?;
        self.inner.copy_opts(from, to, options).await
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        self.check_write(to).await?;
        self.inner.rename_opts(from, to, options).await
    }
}
