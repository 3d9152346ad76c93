//! The OpenAPI contract from outside, against a running `audit-node dev`
//! (its own database, port 0, demo traffic going on):
//! - schemathesis, from the spec the node serves, finds no server error
//!   (every check it has; the node's own log is checked for 5xx as well);
//! - a client generated from docs/openapi.json by openapi-python-client
//!   works against it (node/tests/contract/client_check.py).
//!
//! The Python tools live in a virtualenv under the workspace's target/
//! (`target/contract-venv`, or `AUDIT_CONTRACT_VENV`), created on first use
//! from the pinned node/tests/contract/requirements.txt. Without python3
//! and its venv module the tests fail and say what to install: they never
//! skip.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use audit_ledger::testing::TestDatabase;
use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

const REQUIREMENTS: &str = include_str!("contract/requirements.txt");
const CLIENT_CHECK: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/contract/client_check.py"
);
const COMMITTED_SPEC: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/openapi.json");
/// Fixed, so a failure replays with the same inputs (printed on failure).
const SCHEMATHESIS_SEED: &str = "4711";
const SCHEMATHESIS_EXAMPLES: &str = "50";

fn venv_dir() -> PathBuf {
    match std::env::var_os("AUDIT_CONTRACT_VENV") {
        Some(dir) => PathBuf::from(dir),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/contract-venv"),
    }
}

fn output_text(output: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

/// The virtualenv with the pinned tools: created or updated when its stamp
/// (the requirements it was built from) differs. A file lock keeps two test
/// processes from building it at once.
fn ensure_venv() -> PathBuf {
    let venv = venv_dir();
    let parent = venv.parent().expect("the venv has a parent directory");
    std::fs::create_dir_all(parent).expect("create the venv's parent directory");
    let lock_path = venv.with_extension("lock");
    let lock = std::fs::File::create(&lock_path).expect("create the venv lock file");
    // SAFETY: flock on a file descriptor we own; released when `lock` drops.
    let locked = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(locked, 0, "cannot lock {}", lock_path.display());

    let stamp = venv.join("requirements.stamp");
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == REQUIREMENTS) {
        return venv;
    }
    let _ = std::fs::remove_dir_all(&venv);
    let created = Command::new("python3")
        .arg("-m")
        .arg("venv")
        .arg(&venv)
        .output();
    let created = match created {
        Ok(output) => output,
        Err(e) => panic!(
            "cannot run python3 ({e}): the contract tests need Python 3 with its venv module \
             (Debian: apt-get install python3 python3-venv; .ci/run installs them)"
        ),
    };
    assert!(
        created.status.success(),
        "python3 -m venv {} failed: the contract tests need Python 3 with its venv module \
         (Debian: apt-get install python3-venv; .ci/run installs it):\n{}",
        venv.display(),
        output_text(&created)
    );
    let requirements = venv.join("requirements.txt");
    std::fs::write(&requirements, REQUIREMENTS).expect("write requirements.txt");
    let installed = Command::new(venv.join("bin/python"))
        .args([
            "-m",
            "pip",
            "install",
            "--disable-pip-version-check",
            "-q",
            "-r",
        ])
        .arg(&requirements)
        .output()
        .expect("run pip");
    assert!(
        installed.status.success(),
        "pip could not install node/tests/contract/requirements.txt into {} (PyPI, or the pip index \
         configured in PIP_INDEX_URL, must be reachable):\n{}",
        venv.display(),
        output_text(&installed)
    );
    std::fs::write(&stamp, REQUIREMENTS).expect("write the venv stamp");
    venv
}

/// A plain HTTP/1.0 GET: (status, body).
async fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("a status code");
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    (status, body)
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
            continue;
        }
        out.push(c);
    }
    out
}

/// `audit-node dev` on a fresh database and port 0, with its tokens, once
/// it is ready and has stored some events and dead letters.
struct Dev {
    node: Proc,
    dir: PathBuf,
    db: TestDatabase,
    addr: String,
    tokens: Value,
}

impl Dev {
    async fn start() -> Self {
        let dir = scratch_dir();
        let db = TestDatabase::create().await.expect("test database");
        let state = dir.join("state");
        let args: Vec<String> = [
            "dev",
            "--state-dir",
            &state.display().to_string(),
            "--database-url",
            &db.url,
            "--api-addr",
            "127.0.0.1:0",
            "--demo-rate",
            "50",
            "--checkpoint-every",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut node = Proc::spawn("dev", &args, &dir);

        let mut addr = None;
        wait_until("the API to listen", Duration::from_secs(120), || {
            addr = strip_ansi(&node.log_text())
                .lines()
                .find(|l| l.contains("API listening"))
                .and_then(|l| l.split("addr=").nth(1))
                .and_then(|a| a.split_whitespace().next())
                .map(str::to_owned);
            let found = addr.is_some();
            let running = node.is_running();
            assert!(running || found, "dev exited:\n{}", node.log_text());
            async move { found }
        })
        .await;
        let addr = addr.expect("the API's address");
        let tokens: Value = serde_json::from_str(
            &std::fs::read_to_string(state.join("tokens.json")).expect("dev wrote tokens.json"),
        )
        .expect("tokens.json is JSON");
        let reader = tokens["reader"]
            .as_str()
            .expect("a reader token")
            .to_owned();

        wait_until("/readyz", Duration::from_secs(60), || {
            let addr = addr.clone();
            async move { get(&addr, "/readyz", None).await.0 == 200 }
        })
        .await;
        // Some demo events and at least one dead letter (1% are malformed).
        wait_until(
            "demo events and a dead letter",
            Duration::from_secs(120),
            || {
                let (addr, reader) = (addr.clone(), reader.clone());
                async move {
                    let (s1, events) = get(&addr, "/v1/events?limit=50", Some(&reader)).await;
                    let (s2, dls) = get(&addr, "/v1/dead-letters?limit=1", Some(&reader)).await;
                    s1 == 200
                        && s2 == 200
                        && events["events"].as_array().is_some_and(|e| e.len() == 50)
                        && dls["dead_letters"]
                            .as_array()
                            .is_some_and(|d| !d.is_empty())
                }
            },
        )
        .await;
        Self {
            node,
            dir,
            db,
            addr,
            tokens,
        }
    }

    fn token(&self, role: &str) -> String {
        self.tokens[role].as_str().expect("token").to_owned()
    }

    /// Lines of the node's log where a request ended in a 5xx.
    fn server_errors(&self) -> Vec<String> {
        strip_ansi(&self.node.log_text())
            .lines()
            .filter(|l| l.contains("request failed"))
            .map(str::to_owned)
            .collect()
    }

    async fn stop(mut self) {
        let status = self.node.terminate();
        assert!(
            status.success(),
            "dev exited with {status}:\n{}",
            self.node.log_text()
        );
        self.db.drop_database().await;
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The served spec, minus `follow` on `/v1/replay`: a live tail never ends,
/// so no generated request may ask for one.
fn spec_without_follow(spec: &Value) -> Value {
    let mut spec = spec.clone();
    let params = spec["paths"]["/v1/replay"]["get"]["parameters"]
        .as_array_mut()
        .expect("/v1/replay has parameters");
    let before = params.len();
    params.retain(|p| p["name"] != "follow");
    assert_eq!(
        params.len() + 1,
        before,
        "/v1/replay has a `follow` parameter"
    );
    spec
}

async fn schemathesis(dev: &Dev, venv: &Path, role: &str) {
    let (status, spec) = get(&dev.addr, "/openapi.json", None).await;
    assert_eq!(status, 200);
    let spec_file = dev.dir.join(format!("spec-{role}.json"));
    std::fs::write(&spec_file, spec_without_follow(&spec).to_string()).expect("write the spec");
    let report = dev.dir.join(format!("schemathesis-{role}"));
    let args: Vec<String> = vec![
        "run".into(),
        spec_file.display().to_string(),
        "--url".into(),
        format!("http://{}", dev.addr),
        "--header".into(),
        format!("Authorization: Bearer {}", dev.token(role)),
        "--checks".into(),
        "all".into(),
        // Schema-valid requests the server rightly refuses with a 400: rules
        // the document cannot state (an opaque `cursor` must be one the
        // server issued, `decrypt=true` needs `purpose`, `from` <= `to`,
        // `contains` must be a JSON object, printable text in ids and
        // reasons). Every other check runs, not_a_server_error among them.
        "--exclude-checks".into(),
        "positive_data_acceptance".into(),
        "--max-examples".into(),
        SCHEMATHESIS_EXAMPLES.into(),
        "--seed".into(),
        SCHEMATHESIS_SEED.into(),
        "--generation-database".into(),
        "none".into(),
        // One worker: CPython 3.11's ast.parse is not thread-safe, and
        // hypothesis calls it while describing strategies (a "Runtime
        // Error: AST constructor recursion depth mismatch" with two).
        "--workers".into(),
        "1".into(),
        "--request-timeout".into(),
        "30".into(),
        "--no-color".into(),
        "--report".into(),
        "junit".into(),
        "--report-dir".into(),
        report.display().to_string(),
    ];
    let schemathesis = venv.join("bin/schemathesis");
    // Its working directory gets a `.schemathesis/` cache: the scratch dir.
    let output = tokio::process::Command::new(&schemathesis)
        .args(&args)
        .current_dir(&dev.dir)
        .output()
        .await
        .expect("run schemathesis");
    let text = output_text(&output);
    let errors = dev.server_errors();
    assert!(
        output.status.success() && errors.is_empty(),
        "schemathesis as {role} failed (reproduce: {} {}, against `audit-node dev`):\n{text}\n\
         5xx in the node's log:\n{}",
        schemathesis.display(),
        args.join(" "),
        errors.join("\n")
    );
    // It really tested every operation.
    let operations = spec["paths"]
        .as_object()
        .map(|p| {
            p.values()
                .map(|m| m.as_object().map_or(0, |o| o.len()))
                .sum::<usize>()
        })
        .unwrap_or(0);
    assert!(operations >= 17, "{operations} operations in the spec");
    assert!(
        text.contains(&format!("Tested: {operations}")),
        "schemathesis did not test all {operations} operations:\n{text}"
    );
    eprintln!("schemathesis as {role}:\n{text}");
}

/// Zero server errors from schemathesis's every check, as an admin (every
/// route and option allowed) and as a reader (403s on the rest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_server_errors() {
    let venv = tokio::task::spawn_blocking(ensure_venv)
        .await
        .expect("venv task");
    let dev = Dev::start().await;
    schemathesis(&dev, &venv, "admin").await;
    schemathesis(&dev, &venv, "reader").await;
    dev.stop().await;
}

/// A client generated from the committed docs/openapi.json lists events,
/// reads one, its stream and dead letters, and gets typed problems back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generated_python_client_works_against_a_running_node() {
    let venv = tokio::task::spawn_blocking(ensure_venv)
        .await
        .expect("venv task");
    let dev = Dev::start().await;
    let out = dev.dir.join("client");
    let package = out.join("order_audit_trail_client");
    // ruff (a dependency of the generator) formats the client: on PATH.
    let path = format!(
        "{}:{}",
        venv.join("bin").display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let generated = tokio::process::Command::new(venv.join("bin/openapi-python-client"))
        .args([
            "generate",
            "--path",
            COMMITTED_SPEC,
            "--meta",
            "none",
            "--output-path",
        ])
        .arg(&package)
        .env("PATH", &path)
        .current_dir(&dev.dir)
        .output()
        .await
        .expect("run openapi-python-client");
    let text = output_text(&generated);
    assert!(
        generated.status.success(),
        "openapi-python-client failed:\n{text}"
    );
    assert!(!text.contains("Warning"), "the generator warned:\n{text}");
    assert!(package.join("api/events/list_events.py").exists(), "{text}");

    let checked = tokio::process::Command::new(venv.join("bin/python"))
        .current_dir(&dev.dir)
        .arg(CLIENT_CHECK)
        .arg(format!("http://{}", dev.addr))
        .arg(&out)
        .env("AUDIT_CONTRACT_READER", dev.token("reader"))
        .env("AUDIT_CONTRACT_AUDITOR", dev.token("auditor"))
        .output()
        .await
        .expect("run client_check.py");
    let text = output_text(&checked);
    assert!(
        checked.status.success() && text.contains("client check: OK"),
        "the generated client failed against the node:\n{text}"
    );
    assert!(dev.server_errors().is_empty(), "{:?}", dev.server_errors());
    eprintln!("{text}");
    dev.stop().await;
}
