//! The query API end to end, through real processes: `audit-node tokens
//! create` makes the tokens, `run --api-tokens` serves them, readers get
//! redacted events, an auditor's decrypting read lands in the access log.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// `audit-node tokens create`: (token, entry).
fn create_token(role: &str, name: &str) -> (String, Value) {
    let output = std::process::Command::new(BIN)
        .args(["tokens", "create", "--role", role, "--name", name])
        .env("AUDIT_LOG", "warn")
        .output()
        .expect("run tokens create");
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    let entry: Value = serde_json::from_str(lines[3]).expect("entry is JSON");
    assert_eq!(entry["name"], name);
    assert_eq!(entry["role"], role);
    assert_eq!(entry["sha256"].as_str().unwrap().len(), 64);
    (lines[1].to_owned(), entry)
}

/// A plain HTTP/1.0 GET: (status, body).
async fn get(addr: &str, path: &str, token: Option<&str>) -> (u16, Value) {
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.unwrap();
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    let status: u16 = head.split(' ').nth(1).unwrap().parse().unwrap();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    (status, body)
}

fn strip_ansi(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // Skip to the end of the escape sequence (a letter).
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

/// The address in the node's `API listening addr=…` log line.
async fn api_addr(node: &Proc) -> String {
    let mut found = None;
    wait_until("the API to listen", Duration::from_secs(60), || {
        let line = strip_ansi(&node.log_text())
            .lines()
            .find(|l| l.contains("API listening"))
            .and_then(|l| l.split("addr=").nth(1))
            .map(|a| a.split_whitespace().next().unwrap_or_default().to_owned());
        let ok = line.is_some();
        found = line;
        async move { ok }
    })
    .await;
    found.expect("address")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_serves_the_api_with_hashed_tokens() {
    let h = Harness::start(2).await;
    let (reader, reader_entry) = create_token("reader", "ci");
    let (auditor, auditor_entry) = create_token("auditor", "dpo");
    let file = h.dir.join("api-tokens.json");
    let tokens = serde_json::json!({ "tokens": [reader_entry, auditor_entry] });
    std::fs::write(&file, tokens.to_string()).unwrap();
    assert!(
        !std::fs::read_to_string(&file).unwrap().contains(&reader),
        "only hashes"
    );

    let mut args = h.run_args("node-1");
    args.extend(["--api-tokens".into(), file.display().to_string()]);
    let mut node = Proc::spawn("node-1", &args, &h.dir);
    let produced = h.produce(60, 0.0, 0.0, 11).await;
    h.wait_all_stored(produced, Duration::from_secs(120)).await;
    let addr = api_addr(&node).await;

    let (status, body) = get(&addr, "/v1/events", None).await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(get(&addr, "/v1/events", Some("wrong")).await.0, 401);
    assert_eq!(get(&addr, "/healthz", None).await.0, 200);

    // Events become readable once older transactions have finished.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let page = loop {
        let (status, body) = get(&addr, "/v1/events?limit=1000", Some(&reader)).await;
        let n = body["events"].as_array().map_or(0, Vec::len);
        if status == 200 && n as u64 == produced.valid {
            break body;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "events not readable: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let events = page["events"].as_array().unwrap();
    let with_email: Vec<&Value> = events
        .iter()
        .filter(|e| e["payload"]["customer"].get("email").is_some())
        .collect();
    assert!(!with_email.is_empty());
    for event in &with_email {
        assert_eq!(
            event["payload"]["customer"]["email"],
            serde_json::json!({"$redacted": true})
        );
    }
    let id = with_email[0]["event_id"].as_str().unwrap();

    let (status, _) = get(&addr, "/v1/access-log", Some(&reader)).await;
    assert_eq!(status, 403);
    let path = format!("/v1/events/{id}?decrypt=true&purpose=e2e-check");
    let (status, event) = get(&addr, &path, Some(&auditor)).await;
    assert_eq!(status, 200, "{event}");
    assert!(event["payload"]["customer"]["email"]
        .as_str()
        .unwrap()
        .contains('@'));
    let (status, log) = get(&addr, "/v1/access-log", Some(&auditor)).await;
    assert_eq!(status, 200, "{log}");
    assert_eq!(log["entries"][0]["actor"], "dpo");
    assert_eq!(log["entries"][0]["purpose"], "e2e-check");
    assert_eq!(log["entries"][0]["event_ids"][0], id);

    assert!(node.terminate().success(), "{}", node.log_text());
    assert!(
        !node.log_text().contains(&reader),
        "a token reached the log"
    );
    assert!(
        !node.log_text().contains(&auditor),
        "a token reached the log"
    );
    h.finish().await;
}
