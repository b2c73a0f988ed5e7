//! Helpers for tests against a real Kafka broker: the broker itself (started through
//! `scripts/kafka.sh ensure` unless `POSITION_SINK_TEST_BROKERS` names one), unique
//! topics, a producer that reports where each message landed, a worker spawned in the
//! test's runtime, the table read back, and the model of the expected table.

#![allow(dead_code)]

#[cfg(not(feature = "fault-injection"))]
compile_error!(
    "the integration tests inject crashes: run them with `cargo test --features fault-injection` (scripts/test.sh does)"
);

pub mod faulty_store;
pub mod scenario;
pub mod stream;
pub mod toxiproxy;
pub mod versions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use deltalake::arrow::array::{Array, AsArray, RecordBatch};
use deltalake::arrow::datatypes::{Float64Type, Int32Type, Int64Type, TimestampMicrosecondType};
use deltalake::datafusion::prelude::SessionContext;
use position_sink::config::Config;
use position_sink::faults::CrashPoints;
use position_sink::{Progress, RunSummary, WorkerError};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{Offset, TopicPartitionList};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Port of the broker the tests start when none is given.
const TEST_BROKER_PORT: u16 = 39092;

/// The bootstrap address of the test broker, starting it on first use.
pub fn brokers() -> String {
    static BROKERS: OnceLock<String> = OnceLock::new();
    BROKERS
        .get_or_init(|| {
            if let Ok(brokers) = std::env::var("POSITION_SINK_TEST_BROKERS") {
                return brokers;
            }
            kafka_script(&["ensure", &TEST_BROKER_PORT.to_string()]);
            format!("127.0.0.1:{TEST_BROKER_PORT}")
        })
        .clone()
}

/// Runs `scripts/kafka.sh` with `args` and asserts it succeeded.
pub fn kafka_script(args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/kafka.sh");
    let status = std::process::Command::new("bash").arg(&script).args(args).status().expect("run scripts/kafka.sh");
    assert!(status.success(), "scripts/kafka.sh {args:?} failed");
}

/// The test broker's secured listeners (scripts/kafka.sh opens them beside the
/// plaintext one) and the throw-away CA's files.
pub struct Secured {
    /// TLS, server certificate only.
    pub ssl: String,
    /// TLS + SASL (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER).
    pub sasl_ssl: String,
    /// TLS with a client certificate required.
    pub mtls: String,
    /// SASL without TLS (the mechanisms of `sasl_ssl`).
    pub sasl_plaintext: String,
    /// `ca.pem`, `client.pem`, `client.key` (encrypted), `client.key.password`, `other-ca.pem`.
    pub tls: PathBuf,
}

impl Secured {
    /// A file of the throw-away CA's directory.
    pub fn file(&self, name: &str) -> String {
        self.tls.join(name).display().to_string()
    }

    /// The password of the client certificate's key.
    pub fn client_key_password(&self) -> String {
        std::fs::read_to_string(self.tls.join("client.key.password")).expect("client key password")
    }
}

/// The secured listeners of the test broker: ports after the plaintext one's, as
/// scripts/kafka.sh lays them out.
pub fn secured() -> Secured {
    let plaintext = brokers();
    let (host, port) = plaintext.rsplit_once(':').expect("host:port");
    let port: u16 = port.parse().expect("port");
    let run = std::env::var("POSITION_SINK_KAFKA_RUN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| std::env::temp_dir().join("position-sink-kafka"));
    Secured {
        ssl: format!("{host}:{}", port + 2),
        sasl_ssl: format!("{host}:{}", port + 3),
        mtls: format!("{host}:{}", port + 4),
        sasl_plaintext: format!("{host}:{}", port + 5),
        tls: run.join(port.to_string()).join("tls"),
    }
}

/// The first segment file of `topic`'s `partition` in the test broker's log directory
/// (scripts/kafka.sh keeps it beside the throw-away CA).
pub fn segment_file(topic: &str, partition: i32) -> PathBuf {
    secured()
        .tls
        .parent()
        .expect("run directory")
        .join("data")
        .join(format!("{topic}-{partition}"))
        .join("00000000000000000000.log")
}

/// The byte position, inside the record batch of `segment` that starts at
/// `base_offset`, of a byte its CRC covers (the batch's last byte).
pub fn byte_of_batch(segment: &Path, base_offset: i64) -> u64 {
    let bytes = std::fs::read(segment).expect("read segment");
    let mut at = 0usize;
    while at + 12 <= bytes.len() {
        let base = i64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let length = i32::from_be_bytes(bytes[at + 8..at + 12].try_into().expect("4 bytes")) as usize;
        if base == base_offset {
            return (at + 12 + length - 1) as u64;
        }
        at += 12 + length;
    }
    panic!("no batch starts at offset {base_offset} in {}", segment.display());
}

/// Flips every bit of the byte at `position` of `file` (twice restores it).
pub fn flip_byte(file: &Path, position: u64) {
    use std::os::unix::fs::FileExt;
    let handle = std::fs::OpenOptions::new().read(true).write(true).open(file).expect("open segment");
    let mut byte = [0u8];
    handle.read_exact_at(&mut byte, position).expect("read byte");
    byte[0] = !byte[0];
    handle.write_all_at(&byte, position).expect("write byte");
    handle.sync_all().expect("sync");
}

/// Writes `config` as the TOML file the binary reads, and returns its path.
pub fn write_config_file(dir: &Path, config: &Config) -> PathBuf {
    let file = dir.join("sink.toml");
    std::fs::write(&file, toml::to_string(config).expect("config as TOML")).expect("write config");
    file
}

/// Starts the binary with `args` and `env`, logging at `log` (`RUST_LOG`); its stderr
/// is echoed to the test's output (but debug lines), and the receiver gets a signal
/// each time a line contains `signal`.
pub fn spawn_binary(
    args: &[&str],
    env: &[(&str, String)],
    log: &str,
    signal: &'static str,
) -> (std::process::Child, std::sync::mpsc::Receiver<()>) {
    use std::io::BufRead;
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_position-sink"));
    command.args(args).env("RUST_LOG", log).stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped());
    for (key, value) in env {
        command.env(key, value);
    }
    let mut child = command.spawn().expect("start position-sink");
    let stderr = child.stderr.take().expect("stderr");
    let (tx, signals) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.contains(signal) {
                let _ = tx.send(());
            }
            if !line.contains("DEBUG") {
                eprintln!("  worker: {line}");
            }
        }
    });
    (child, signals)
}

/// Runs the binary with `args` and returns its exit code, stdout and stderr.
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    run_cli_with(args, &[], Some("warn,position_sink=info"))
}

/// [`run_cli`] with `env` set and `RUST_LOG` = `log` (`None`: unset, the program's own
/// default levels, whatever the test runner's).
pub fn run_cli_with(args: &[&str], env: &[(String, String)], log: Option<&str>) -> (i32, String, String) {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_position-sink"));
    command.args(args);
    match log {
        Some(log) => command.env("RUST_LOG", log),
        None => command.env_remove("RUST_LOG"),
    };
    for (key, value) in env {
        command.env(key, value);
    }
    let output = command.output().expect("run position-sink");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr).to_string();
    eprintln!("position-sink {args:?}: {}\n{stdout}{stderr}", output.status);
    (output.status.code().unwrap_or(-1), stdout, stderr)
}

/// Port of the S3-compatible server the tests start when none is given.
const TEST_S3_PORT: u16 = 39600;

/// The endpoint of the test S3 server (moto, on 127.0.0.1), starting it on first use.
pub fn s3_endpoint() -> String {
    static ENDPOINT: OnceLock<String> = OnceLock::new();
    ENDPOINT
        .get_or_init(|| {
            if let Ok(endpoint) = std::env::var("POSITION_SINK_TEST_S3") {
                return endpoint;
            }
            script("s3.sh", &["ensure", &TEST_S3_PORT.to_string()]);
            format!("http://127.0.0.1:{TEST_S3_PORT}")
        })
        .clone()
}

/// Storage options for the test S3 server, as a user would give them.
pub fn s3_options() -> std::collections::HashMap<String, String> {
    [
        ("AWS_ENDPOINT_URL", s3_endpoint()),
        ("AWS_ACCESS_KEY_ID", "test".to_string()),
        ("AWS_SECRET_ACCESS_KEY", "test".to_string()),
        ("AWS_REGION", "us-east-1".to_string()),
        ("AWS_ALLOW_HTTP", "true".to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect()
}

/// A new bucket on the test S3 server, and the URI of a table in it.
pub fn s3_table() -> String {
    let bucket = unique("positions").to_ascii_lowercase().replace('_', "-");
    let port = s3_endpoint().rsplit(':').next().expect("port").to_string();
    script("s3.sh", &["bucket", &bucket, &port]);
    format!("s3://{bucket}/positions")
}

/// Runs `scripts/<name>` with `args` and asserts it succeeded.
fn script(name: &str, args: &[&str]) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts").join(name);
    let status = std::process::Command::new("bash").arg(&script).args(args).status().expect("run a script");
    assert!(status.success(), "scripts/{name} {args:?} failed");
}

/// A name no other test (or earlier run) uses.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{}-{nanos}-{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed))
}

/// Creates a topic with `partitions` partitions and returns its name.
pub async fn create_topic(prefix: &str, partitions: i32) -> String {
    create_topic_on(&brokers(), prefix, partitions).await
}

/// [`create_topic`] on the broker at `brokers`.
pub async fn create_topic_on(brokers: &str, prefix: &str, partitions: i32) -> String {
    let topic = unique(prefix);
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", brokers).create().expect("admin client");
    let results = admin
        .create_topics(&[NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await
        .expect("create topic");
    for r in results {
        r.expect("topic created");
    }
    topic
}

/// A message to produce; an invalid one carries the reason category it must get.
#[derive(Debug, Clone)]
pub struct Msg {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub rejection: Option<String>,
}

impl Msg {
    /// A message the decoder must reject with `category`.
    pub fn bad(key: Option<&str>, value: impl Into<Vec<u8>>, category: &str) -> Msg {
        Msg {
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.into()),
            rejection: Some(category.to_string()),
        }
    }
}

/// A produced message and where it landed.
#[derive(Debug, Clone)]
pub struct Produced {
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub rejection: Option<String>,
    pub partition: i32,
    pub offset: i64,
}

/// Publishes messages in order to explicit partitions (round robin over `partitions`
/// for messages without a key) or by key hash, waiting for each acknowledgement.
pub async fn produce(topic: &str, messages: &[Msg], partitions: Option<i32>) -> Vec<Produced> {
    produce_on(&brokers(), topic, messages, partitions).await
}

/// [`produce`] to the broker at `brokers`.
pub async fn produce_on(brokers: &str, topic: &str, messages: &[Msg], partitions: Option<i32>) -> Vec<Produced> {
    produce_with(brokers, &[], topic, messages, partitions).await
}

/// [`produce`] to the broker at `brokers`, with more librdkafka `settings` (a secured
/// listener's, a compression codec).
pub async fn produce_with(
    brokers: &str,
    settings: &[(&str, &str)],
    topic: &str,
    messages: &[Msg],
    partitions: Option<i32>,
) -> Vec<Produced> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", brokers).set("enable.idempotence", "true").set("linger.ms", "5");
    for (key, value) in settings {
        client.set(*key, *value);
    }
    let producer: FutureProducer = client.create().expect("producer");
    let sends = messages.iter().enumerate().map(|(i, m)| {
        let producer = &producer;
        async move {
            let mut record = FutureRecord::<[u8], [u8]>::to(topic);
            if let Some(v) = &m.value {
                record = record.payload(v.as_slice());
            }
            if let Some(k) = &m.key {
                record = record.key(k.as_slice());
            }
            if let (None, Some(n)) = (&m.key, partitions) {
                record = record.partition(i as i32 % n);
            }
            let delivery = producer.send(record, Duration::from_secs(30)).await.expect("delivered");
            Produced {
                key: m.key.clone(),
                value: m.value.clone(),
                rejection: m.rejection.clone(),
                partition: delivery.partition,
                offset: delivery.offset,
            }
        }
    });
    // Ordered sends keep per-partition order equal to the slice's order.
    use futures::StreamExt;
    futures::stream::iter(sends).buffered(1000).collect().await
}

/// Logs of in-process workers, shown for failing tests (`RUST_LOG`, default warnings).
pub fn init_logs() {
    static INIT: OnceLock<()> = OnceLock::new();
    INIT.get_or_init(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| {
            tracing_subscriber::EnvFilter::new(
                "warn,deltalake_core::operations::merge=error,buoyant_kernel::snapshot::builder=off,\
             deltalake_core::writer::stats=error",
            )
        });
        let _ = tracing_subscriber::fmt().with_env_filter(filter).with_test_writer().try_init();
    });
}

/// A worker configuration for tests: short flush window, quick retries.
pub fn config(topic: &str, group: &str, table: &Path) -> Config {
    init_logs();
    let mut c = Config::default();
    c.kafka.brokers = brokers();
    c.kafka.group_id = group.to_string();
    c.kafka.topics = vec![topic.to_string()];
    c.kafka.librdkafka.0.insert("session.timeout.ms".into(), "6000".into());
    c.kafka.librdkafka.0.insert("heartbeat.interval.ms".into(), "500".into());
    c.delta.table_uri = table.display().to_string();
    c.flush.interval = Duration::from_millis(500);
    c.retry.min_delay = Duration::from_millis(50);
    c.retry.max_delay = Duration::from_millis(500);
    c.worker.shutdown_timeout = Duration::from_secs(30);
    // Every worker of the tests serves its metrics and probes, each on a free port.
    c.http.bind = "127.0.0.1:0".to_string();
    c.validate().expect("valid test config");
    c
}

/// A running worker.
pub struct Worker {
    pub handle: JoinHandle<Result<RunSummary, WorkerError>>,
    pub shutdown: CancellationToken,
    pub progress: std::sync::Arc<Progress>,
}

impl Worker {
    /// Asks the worker to stop and waits for its result.
    pub async fn stop(self) -> Result<RunSummary, WorkerError> {
        self.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.handle).await.expect("worker stops in time").expect("join")
    }

    /// Messages consumed so far.
    pub fn messages(&self) -> u64 {
        self.progress.messages.load(Ordering::Relaxed)
    }
}

/// Starts a worker in the test's runtime.
pub fn spawn_worker(config: Config) -> Worker {
    spawn_worker_with(config, CrashPoints::default())
}

/// Starts a worker with crash points in the test's runtime.
pub fn spawn_worker_with(config: Config, crash: CrashPoints) -> Worker {
    let shutdown = CancellationToken::new();
    let progress = std::sync::Arc::new(Progress::default());
    let handle = tokio::spawn(position_sink::run_with_crash_points(config, shutdown.clone(), progress.clone(), crash));
    Worker { handle, shutdown, progress }
}

/// Runs a worker with crash points until it stops by itself (a crash, or caught up).
pub async fn run_crashing(config: Config, crash: CrashPoints) -> Result<RunSummary, WorkerError> {
    position_sink::run_with_crash_points(config, CancellationToken::new(), Default::default(), crash).await
}

/// Runs a worker until it has written every partition to its end, and returns its summary.
pub async fn run_to_end(config: Config) -> Result<RunSummary, WorkerError> {
    run_to_end_within(config, Duration::from_secs(120)).await
}

/// [`run_to_end`], given `limit` to catch up (slow storage).
pub async fn run_to_end_within(mut config: Config, limit: Duration) -> Result<RunSummary, WorkerError> {
    config.worker.exit_when_caught_up = true;
    tokio::time::timeout(limit, position_sink::run(config, CancellationToken::new()))
        .await
        .unwrap_or_else(|_| panic!("worker caught up within {limit:?}"))
}

/// Polls `check` until it returns true or `limit` passes.
pub async fn wait_until<F: AsyncFnMut() -> bool>(limit: Duration, what: &str, mut check: F) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The group's committed offset per partition of `topic` (`None`: nothing committed).
pub fn committed_offsets(group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Option<i64>> {
    committed_offsets_on(&brokers(), group, topic, partitions)
}

/// [`committed_offsets`] on the broker at `brokers`.
pub fn committed_offsets_on(brokers: &str, group: &str, topic: &str, partitions: i32) -> BTreeMap<i32, Option<i64>> {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers).set("group.id", group).create().expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(list, Duration::from_secs(10)).expect("committed offsets");
    committed
        .elements()
        .iter()
        .map(|e| (e.partition(), if let Offset::Offset(o) = e.offset() { Some(o) } else { None }))
        .collect()
}

/// Commits `offset` for every partition of `topic` in `group` (the group must be empty).
pub fn reset_group(group: &str, topic: &str, partitions: i32, offset: i64) {
    let consumer: BaseConsumer =
        ClientConfig::new().set("bootstrap.servers", brokers()).set("group.id", group).create().expect("consumer");
    let mut list = TopicPartitionList::new();
    for p in 0..partitions {
        list.add_partition_offset(topic, p, Offset::Offset(offset)).expect("offset");
    }
    consumer.commit(&list, rdkafka::consumer::CommitMode::Sync).expect("reset offsets");
}

/// The end offset (next offset to be written) of each partition, from what was produced.
pub fn end_offsets(produced: &[Produced], partitions: i32) -> BTreeMap<i32, Option<i64>> {
    (0..partitions).map(|p| (p, produced.iter().filter(|m| m.partition == p).map(|m| m.offset + 1).max())).collect()
}

/// One table row, as compared by the tests.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub conid: i64,
    pub symbol: String,
    pub position: f64,
    pub timestamp_micros: i64,
    pub account: Option<String>,
    pub market_price: Option<f64>,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
    pub ingested_at: i64,
}

/// The expected table: for each conid, the valid produced update with the greatest
/// (timestamp, offset, partition), whatever its symbol, keyed by its symbol and conid.
/// Computed from the produced JSON with serde_json alone; messages produced as invalid
/// are left out.
pub fn model(produced: &[Produced]) -> BTreeMap<(String, i64), Row> {
    let mut expected: BTreeMap<i64, Row> = BTreeMap::new();
    for m in produced.iter().filter(|m| m.rejection.is_none()) {
        let v: serde_json::Value = serde_json::from_slice(m.value.as_deref().unwrap_or_default()).expect("valid JSON");
        let ts = match &v["timestamp"] {
            serde_json::Value::String(s) => chrono::DateTime::parse_from_rfc3339(s).expect("ts").timestamp_micros(),
            other => other.as_i64().expect("millis") * 1000,
        };
        let row = Row {
            conid: v["conid"].as_i64().expect("conid"),
            symbol: v["symbol"].as_str().expect("symbol").to_string(),
            position: v["position"].as_f64().expect("position"),
            timestamp_micros: ts,
            account: v["account"].as_str().map(String::from),
            market_price: v["market_price"].as_f64(),
            kafka_partition: m.partition,
            kafka_offset: m.offset,
            ingested_at: 0,
        };
        let wins = |old: &Row| {
            (row.timestamp_micros, row.kafka_offset, row.kafka_partition)
                > (old.timestamp_micros, old.kafka_offset, old.kafka_partition)
        };
        if expected.get(&row.conid).is_none_or(wins) {
            expected.insert(row.conid, row);
        }
    }
    expected.into_values().map(|row| ((row.symbol.clone(), row.conid), row)).collect()
}

/// Reads the whole table at `path`, keyed like [`model`].
pub async fn read_table(path: &Path) -> BTreeMap<(String, i64), Row> {
    read_table_at(&path.display().to_string(), &Default::default()).await
}

/// Reads the whole table at `path`, as a reader would mid-fault, and asserts it holds
/// one row per key (no duplicate from a partial or doubled commit).
pub async fn assert_one_row_per_key(path: &Path) {
    read_table(path).await;
}

/// Reads the whole table at `uri` (a path or an `s3://` URL) with storage `options`;
/// asserts on the way that it holds one row per key.
pub async fn read_table_at(
    uri: &str,
    options: &std::collections::HashMap<String, String>,
) -> BTreeMap<(String, i64), Row> {
    let url = deltalake::ensure_table_uri(uri).expect("url");
    let table = deltalake::open_table_with_storage_options(url, options.clone()).await.expect("open table");
    read_rows(table).await
}

/// Reads the table at `path` as of `version` (time travel), keyed like [`model`];
/// asserts on the way that it holds one row per key.
pub async fn read_version(path: &Path, version: u64) -> BTreeMap<(String, i64), Row> {
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    let table = deltalake::open_table_with_version(url, version)
        .await
        .unwrap_or_else(|e| panic!("open version {version}: {e}"));
    read_rows(table).await
}

pub async fn read_rows(table: deltalake::DeltaTable) -> BTreeMap<(String, i64), Row> {
    let ctx = SessionContext::new();
    ctx.register_table("t", table.table_provider().await.expect("provider")).expect("register");
    let batches = ctx
        .sql("SELECT conid, symbol, position, \"timestamp\", account, market_price, kafka_partition, kafka_offset, ingested_at FROM t")
        .await
        .expect("query")
        .collect()
        .await
        .expect("collect");
    let mut rows = BTreeMap::new();
    let mut conids = std::collections::BTreeSet::new();
    for b in &batches {
        for row in rows_of(b) {
            let key = (row.symbol.clone(), row.conid);
            assert!(conids.insert(row.conid), "two rows for conid {} (one of them under {:?})", row.conid, row.symbol);
            assert!(rows.insert(key.clone(), row).is_none(), "duplicate row for {key:?}");
        }
    }
    rows
}

fn rows_of(b: &RecordBatch) -> Vec<Row> {
    let text = |i: usize, r: usize| {
        let c = b.column(i);
        let s = deltalake::arrow::compute::cast(c, &deltalake::arrow::datatypes::DataType::Utf8).expect("cast");
        let s = s.as_string::<i32>();
        (!s.is_null(r)).then(|| s.value(r).to_string())
    };
    let f64_opt = |i: usize, r: usize| {
        let c = b.column(i).as_primitive::<Float64Type>();
        (!c.is_null(r)).then(|| c.value(r))
    };
    (0..b.num_rows())
        .map(|r| Row {
            conid: b.column(0).as_primitive::<Int64Type>().value(r),
            symbol: text(1, r).expect("symbol"),
            position: b.column(2).as_primitive::<Float64Type>().value(r),
            timestamp_micros: b.column(3).as_primitive::<TimestampMicrosecondType>().value(r),
            account: text(4, r),
            market_price: f64_opt(5, r),
            kafka_partition: b.column(6).as_primitive::<Int32Type>().value(r),
            kafka_offset: b.column(7).as_primitive::<Int64Type>().value(r),
            ingested_at: b.column(8).as_primitive::<TimestampMicrosecondType>().value(r),
        })
        .collect()
}

/// Asserts the table equals the model, row by row (ignoring `ingested_at`).
pub fn assert_table_matches(actual: &BTreeMap<(String, i64), Row>, expected: &BTreeMap<(String, i64), Row>) {
    let strip = |m: &BTreeMap<(String, i64), Row>| -> Vec<Row> {
        m.values()
            .cloned()
            .map(|mut r| {
                r.ingested_at = 0;
                r
            })
            .collect()
    };
    let (a, e) = (strip(actual), strip(expected));
    let missing: Vec<_> = e.iter().filter(|r| !a.contains(r)).take(5).collect();
    let unexpected: Vec<_> = a.iter().filter(|r| !e.contains(r)).take(5).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty() && a.len() == e.len(),
        "table differs from the model: {} rows vs {} expected\nmissing (first 5): {missing:#?}\nunexpected (first 5): {unexpected:#?}",
        a.len(),
        e.len()
    );
}

/// The table's latest version.
pub async fn table_version(path: &Path) -> u64 {
    let url = deltalake::ensure_table_uri(path.display().to_string()).expect("url");
    deltalake::open_table(url).await.expect("open").version().expect("version")
}

/// A fresh temporary directory for a table.
pub fn table_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("positions");
    (dir, path)
}

/// Sample messages, all valid.
pub fn sample(count: usize, instruments: usize, seed: u64) -> Vec<Msg> {
    sample_with_bad(count, instruments, seed, 0)
}

/// Whether `group` committed every partition of `topic` to the end of `produced`.
pub fn is_committed_to(group: &str, topic: &str, produced: &[Produced], partitions: i32) -> bool {
    committed_offsets(group, topic, partitions) == end_offsets(produced, partitions)
}

/// Sample messages with `bad_percent` invalid ones of every kind.
pub fn sample_with_bad(count: usize, instruments: usize, seed: u64, bad_percent: u64) -> Vec<Msg> {
    position_sink::sample::generate(position_sink::sample::SampleSpec {
        count,
        instruments,
        seed,
        bad_percent,
        ..Default::default()
    })
    .into_iter()
    .map(|m| Msg { key: Some(m.key.into_bytes()), value: Some(m.value), rejection: m.rejection.map(String::from) })
    .collect()
}

/// A minimal update as JSON.
pub fn update_json(conid: i64, symbol: &str, position: f64, timestamp: &str) -> Msg {
    let value = serde_json::json!({"conid": conid, "symbol": symbol, "position": position, "timestamp": timestamp});
    Msg { key: Some(conid.to_string().into_bytes()), value: Some(value.to_string().into_bytes()), rejection: None }
}

/// Every dead letter in the dead-letter table beside the positions table at `table`.
pub async fn read_dead_letters(table: &Path) -> Vec<position_sink::dead_letter::DeadLetter> {
    let uri = format!("{}_dead_letters", table.display());
    position_sink::dead_letter::table::read(&uri, &Default::default(), None, 10_000_000)
        .await
        .expect("read dead letters")
}

/// Asserts the dead letters are exactly the produced messages marked invalid, once
/// each, with their coordinates, original bytes and expected reason category.
pub fn assert_dead_letters_match(
    actual: &[position_sink::dead_letter::DeadLetter],
    topic: &str,
    produced: &[Produced],
) {
    /// Partition, offset, category, key, value.
    type Compared = (i32, i64, String, Option<Vec<u8>>, Option<Vec<u8>>);
    let mut got: Vec<Compared> = actual
        .iter()
        .map(|d| {
            assert_eq!(d.source.tp.topic, topic);
            (d.source.tp.partition.0, d.source.offset.0, d.category.clone(), d.key.clone(), d.value.clone())
        })
        .collect();
    got.sort();
    let mut expected: Vec<_> = produced
        .iter()
        .filter_map(|m| Some((m.partition, m.offset, m.rejection.clone()?, m.key.clone(), m.value.clone())))
        .collect();
    expected.sort();
    let duplicates = got.windows(2).filter(|w| (w[0].0, w[0].1) == (w[1].0, w[1].1)).count();
    assert_eq!(duplicates, 0, "dead letters written twice");
    let all_missing: Vec<_> = expected.iter().filter(|e| !got.contains(e)).collect();
    let mut missing_ranges: BTreeMap<i32, (i64, i64, usize)> = BTreeMap::new();
    for m in &all_missing {
        let r = missing_ranges.entry(m.0).or_insert((m.1, m.1, 0));
        *r = (r.0.min(m.1), r.1.max(m.1), r.2 + 1);
    }
    let missing: Vec<_> = all_missing.iter().take(5).map(|m| (m.0, m.1, m.2.clone())).collect();
    let unexpected: Vec<_> =
        got.iter().filter(|g| !expected.contains(g)).take(5).map(|m| (m.0, m.1, m.2.clone())).collect();
    assert!(
        missing.is_empty() && unexpected.is_empty() && got.len() == expected.len(),
        "dead letters differ: {} vs {} expected\nmissing per partition (first offset, last offset, count): \
         {missing_ranges:?}\nmissing (first 5): {missing:?}\nunexpected (first 5): {unexpected:?}",
        got.len(),
        expected.len()
    );
}

/// The Python interpreter with `deltalake` and `polars`: `POSITION_SINK_PYTHON` (set by
/// scripts/test.sh), else the virtualenv scripts/setup.sh makes, else `python3`.
pub fn python() -> String {
    if let Ok(python) = std::env::var("POSITION_SINK_PYTHON") {
        return python;
    }
    let cache = std::env::var("POSITION_SINK_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/position-sink", std::env::var("HOME").unwrap_or_default()));
    let venv = format!("{cache}/venv/bin/python");
    if std::path::Path::new(&venv).exists() { venv } else { "python3".into() }
}

/// Commits in the table's log (version 0, the creation, included).
pub fn commits(path: &std::path::Path) -> usize {
    std::fs::read_dir(path.join("_delta_log"))
        .expect("log")
        .filter(|e| e.as_ref().is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".json")))
        .count()
}

/// Commits whose writer read an older version than the one before them: another
/// writer committed while they were being written, and they went through anyway.
pub fn committed_over_a_concurrent_commit(path: &std::path::Path) -> usize {
    (1..commits(path))
        .filter(|version| {
            let log = std::fs::read_to_string(path.join(format!("_delta_log/{version:020}.json"))).expect("commit");
            log.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|action| {
                action["commitInfo"]["readVersion"].as_u64().is_some_and(|read| read + 1 < *version as u64)
            })
        })
        .count()
}

/// `config` with dead letters going to `topic` (and a short transaction timeout, so a
/// crashed worker's transaction is aborted soon).
pub fn with_dead_letter_topic(mut config: position_sink::config::Config, topic: &str) -> position_sink::config::Config {
    config.dead_letter.destination = position_sink::config::DeadLetterDestination::Topic;
    config.dead_letter.topic = topic.to_string();
    config.dead_letter.transaction_timeout = std::time::Duration::from_secs(5);
    config
}

/// Python that restores the table at `sys.argv[1]` to version 1, as an operator undoing
/// writes with the `deltalake` package would.
pub const RESTORE_VERSION_1: &str = "import sys; from deltalake import DeltaTable; DeltaTable(sys.argv[1]).restore(1)";

/// Runs Python `code` with the table path as `sys.argv[1]`.
pub fn python_on(table: &std::path::Path, code: &str) {
    run_python(&["-c".as_ref(), code.as_ref(), table.as_os_str()]);
}

/// Runs the interpreter of [`python`] with `args` (`-c CODE ARGS…`, or `SCRIPT
/// ARGS…`), asserts it succeeded, and returns what it printed.
pub fn run_python(args: &[&std::ffi::OsStr]) -> String {
    let output = std::process::Command::new(python())
        .args(args)
        .output()
        .expect("run Python (set POSITION_SINK_PYTHON, or run scripts/test.sh, which installs it)");
    assert!(
        output.status.success(),
        "Python failed:\n{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// `GET path` from a worker's HTTP listener: the status code and the body.
pub fn http_get(progress: &Progress, path: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let address = progress.http_address.get().expect("the worker serves HTTP (http.bind)");
    assert!(address.ip().is_loopback(), "tests listen on 127.0.0.1 only");
    let mut stream = std::net::TcpStream::connect(address).expect("connect to the worker's HTTP listener");
    stream.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n").expect("send request");
    let mut response = String::new();
    stream.read_to_string(&mut response).expect("read response");
    let (head, body) = response.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    (status, body.to_string())
}

/// Two workers of one group, each started with `configure()`, share a 4-partition
/// `topic`: once each owns partitions (and together all four), one round of messages,
/// then a second one while both run. Returns what was produced and both workers'
/// summaries, once the group committed to the end. Each partition is read by one
/// worker only, so the two message counts add up to exactly what was produced.
pub async fn run_two_workers(
    topic: &str,
    group: &str,
    configure: impl Fn() -> Config,
    seeds: (u64, u64),
) -> (Vec<Produced>, RunSummary, RunSummary) {
    let a = spawn_worker(configure());
    let b = spawn_worker(configure());
    let assigned = |w: &Worker| Progress::get(&w.progress.assigned_partitions);
    wait_until(Duration::from_secs(60), "each worker to own partitions, all four together", async || {
        assigned(&a) > 0 && assigned(&b) > 0 && assigned(&a) + assigned(&b) == 4
    })
    .await;
    let mut produced = produce(topic, &sample(3000, 150, seeds.0), None).await;
    produced.extend(produce(topic, &sample(3000, 150, seeds.1), None).await);
    let end = end_offsets(&produced, 4);
    wait_until(Duration::from_secs(120), "both workers committed to the end", async || {
        committed_offsets(group, topic, 4) == end
    })
    .await;
    let (sa, sb) = (a.stop().await.expect("worker a"), b.stop().await.expect("worker b"));
    for (name, summary) in [("a", &sa), ("b", &sb)] {
        assert!(summary.messages > 0 && summary.delta_commits > 0, "worker {name} read and committed: {summary:?}");
    }
    assert_eq!(sa.messages + sb.messages, produced.len() as u64, "each message read by one worker, once");
    (produced, sa, sb)
}

/// A worker of `group` crashes right after its first Delta commit, before its Kafka
/// commit (the flush window never ends, so the stop flushes the whole stream as one
/// batch); asserts the crash landed with nothing committed to Kafka, then that the
/// restart finds everything written: it skips, writes nothing and makes no version,
/// and the rows (`ingested_at` included) are unchanged. The table is at `uri`, read
/// with storage `options`; `configure()` gives the worker's configuration.
pub async fn assert_crash_between_commits_writes_nothing_twice(
    topic: &str,
    group: &str,
    configure: impl Fn() -> Config,
    uri: &str,
    options: &std::collections::HashMap<String, String>,
) {
    let produced = produce(topic, &sample(2000, 80, 3), None).await;
    let mut crashing = configure();
    crashing.flush.interval = Duration::from_secs(3600);
    let worker = spawn_worker_with(crashing, CrashPoints { crash_after_delta_commits: Some(1), ..Default::default() });
    wait_until(Duration::from_secs(60), "every message consumed", async || worker.messages() == 2000).await;
    let result = worker.stop().await;
    assert!(
        matches!(
            result,
            Err(position_sink::WorkerError::Flush(position_sink::worker::flush::FlushError::InjectedCrash(_)))
        ),
        "the crash landed: {result:?}"
    );
    let version = || async {
        let url = deltalake::ensure_table_uri(uri).expect("url");
        deltalake::open_table_with_storage_options(url, options.clone()).await.expect("open").version()
    };
    let version_after_crash = version().await;
    let committed = committed_offsets(group, topic, 2);
    assert!(committed.values().all(Option::is_none), "offsets were committed before the crash: {committed:?}");
    let written_before = read_table_at(uri, options).await;
    assert_table_matches(&written_before, &model(&produced));

    // The restart reads from the start (nothing was committed) and finds it all written.
    let summary = run_to_end(configure()).await.expect("restart");
    assert!(summary.skipped_already_written > 0, "the restart did not skip what the table held");
    assert_eq!((summary.delta_commits, summary.rows_written), (0, 0), "the restart wrote again");
    assert_eq!(version().await, version_after_crash, "the restart made a new table version");
    assert_eq!(read_table_at(uri, options).await, written_before, "rows changed (ingested_at included)");
    assert_eq!(committed_offsets(group, topic, 2), end_offsets(&produced, 2));
}

/// Rows (conid, symbol, kafka_offset) of each table in `paths` as Apache Spark with
/// Delta Lake reads them (tests/readers/spark_rows.py; scripts/spark.sh fetches both).
pub fn spark_rows(paths: &[&Path]) -> Vec<Vec<(i64, String, i64)>> {
    let cache = std::env::var("POSITION_SINK_CACHE")
        .unwrap_or_else(|_| format!("{}/.cache/position-sink", std::env::var("HOME").unwrap_or_default()));
    let jars = std::env::var("POSITION_SINK_SPARK_JARS").unwrap_or_else(|_| format!("{cache}/spark-delta-4.0.1/jars"));
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/readers/spark_rows.py");
    let output = std::process::Command::new(python())
        .arg(script)
        .args(paths)
        .env("POSITION_SINK_SPARK_JARS", jars)
        .env("SPARK_LOCAL_IP", "127.0.0.1")
        .env("PYSPARK_PYTHON", python())
        .output()
        .expect("run Spark");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "Spark failed to read {paths:?}: {}\n{stdout}",
        String::from_utf8_lossy(&output.stderr).lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    stdout.lines().filter(|l| l.starts_with('[')).map(|l| serde_json::from_str(l).expect("rows as JSON")).collect()
}
